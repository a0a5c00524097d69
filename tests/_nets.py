"""Small models and runs the tests share (one definition each, so the files agree)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["mlp", "local_and_torchrun"]


def mlp(width: int = 32, seed: int = 3) -> nn.Sequential:
    """A 4-block MLP over 1x4x4 inputs and 3 classes, seeded: every pipelined run and its
    one-process reference start from the same weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Linear(width, 3),
    )


def local_and_torchrun(tmp_path: Path, flags: list[str], local: list[str] = ()
                       ) -> tuple[dict, dict, dict]:
    """``brigade train FLAGS`` on the local backend (plus ``local``) and under torchrun, in
    a session of its own; returns (local state, torchrun state, torchrun's --json)."""
    import json

    from brigade.engine.cli import main

    from _procs import run_session

    want, got, js = tmp_path / "want.pt", tmp_path / "got.pt", tmp_path / "o.json"
    assert main(["train", *flags, "--backend", "local", *local, "--save", str(want)]) == 0
    proc = run_session(
        [sys.executable, "-m", "brigade.engine.cli", "train", *flags, "--backend", "torchrun",
         "--save", str(got), "--json", str(js)], timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (torch.load(want, weights_only=True), torch.load(got, weights_only=True),
            json.loads(js.read_text()))
