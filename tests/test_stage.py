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


def _graph_probe(stage: Stage, mb: int):
    """A weak reference to microbatch ``mb``'s stage input, which its graph holds (the
    first Linear saves it) until the graph is freed."""
    import weakref

    return weakref.ref(stage._saved[mb].inp)


def test_split_backward_frees_the_graph():
    """I then W retain the graph between them; afterwards nothing may keep it alive.

    Regression: the byte-counting hook packed each saved output as itself, a cycle through
    autograd's C++ nodes; backward (retain_graph=False) broke it, I + W did not, and zb1p
    leaked every microbatch's activations (3.6 MB per microbatch on resnet18's last stage).
    """
    import gc

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Tanh())
    stage = Stage(module, StageSpec(1, 3))
    probes = []
    for mb in range(3):  # the first forward counts bytes with the hook, later ones reuse it
        stage.forward(mb, torch.randn(5, 8))
        probes.append(_graph_probe(stage, mb))
        stage.backward_input(mb, torch.ones(5, 4))
        stage.backward_weight(mb)
    gc.collect()
    assert [p() is None for p in probes] == [True, True, True]
    assert stage.stored_bytes() == 0


def test_bytes_are_counted_once_per_input_shape():
    """Later microbatches of one shape reuse the first count; a new shape is counted anew."""
    stage = Stage(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), StageSpec(1, 3))
    stage.forward(0, torch.randn(16, 8))
    stage.forward(1, torch.randn(16, 8))
    stage.forward(2, torch.randn(5, 8))  # an odd last microbatch
    assert [s.nbytes for s in stage._saved.values()] == [
        (16 * 8 + 16 * 16) * 4, (16 * 8 + 16 * 16) * 4, (5 * 8 + 5 * 16) * 4]
    assert len(stage._bytes_by_shape) == 2  # counted twice for three microbatches
