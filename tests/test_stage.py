"""The backprop Stage's memory accounting: what it holds per microbatch in flight."""

import torch
from torch import nn

from brigade.engine.microbatch import split_batch
from brigade.stages.stage import Stage, StageSpec


def test_a_microbatch_view_counts_its_own_bytes_not_the_batch():
    """Microbatches are views of one batch; holding 2 of 4 is 2 microbatches' bytes."""
    stage = Stage(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), StageSpec(1, 3))
    batch = torch.randn(64, 8)
    mbs = split_batch(batch, 4)
    stage.forward(0, mbs[0])
    one = stage.stored_bytes()
    stage.forward(1, mbs[1])
    # input 16x8 floats, the ReLU output 16x16 (saved once for ReLU's backward, which is
    # also the stage output): per microbatch (16*8 + 16*16) * 4 bytes
    assert one == (16 * 8 + 16 * 16) * 4
    assert stage.stored_bytes() == 2 * one
    stage.backward(0, torch.ones(16, 16))
    assert stage.stored_bytes() == one and stage.peak_stored_bytes == 2 * one
