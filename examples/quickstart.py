"""Quickstart: train a small model with a 2-stage 1F1B pipeline through the Python API.

    python examples/quickstart.py            # Ray: one actor per stage (local cluster)
    python examples/quickstart.py --local    # everything in this process

It checks the pipeline against the same model trained in one process, prints the loss per
step, the test accuracy, and the measured per-stage idle time.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from brigade.engine import Pipeline
from brigade.stages.data import load_dataset
from brigade.stages.models import build_model
from brigade.stages.trainer import reference_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", action="store_true", help="run the stages in this process")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    train = load_dataset("synthetic", like="mnist", size=1024, seed=0)
    test = load_dataset("synthetic", like="mnist", size=256, seed=0, split="test")
    model = build_model("mlp", width=128)          # 3 blocks: [flatten+linear+relu] ...
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)

    with Pipeline(
        model,
        stages=2,                                   # two workers: blocks [2, 1]
        schedule="1f1b",
        microbatches=4,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        loss_fn=nn.CrossEntropyLoss(),
        backend="local" if args.local else "ray",
    ) as pipe:
        for step in range(args.steps):
            i = (step * 64) % (len(train) - 64)
            x, y = train.x[i : i + 64], train.y[i : i + 64]
            out = pipe.step(x, y)
            ref_loss = reference_step(reference, opt, nn.CrossEntropyLoss(), x, y, 4)
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step:3d}  pipeline loss {out['loss']:.4f}  "
                      f"single-process loss {ref_loss:.4f}")
        accuracy = (pipe.predict(test.x).argmax(1) == test.y).float().mean().item()
        drift = max((a - b).abs().max().item() for a, b in
                    zip(pipe.state_dict().values(), reference.state_dict().values()))
        tl = pipe.timeline()
        print(f"test accuracy {accuracy:.3f}; max weight difference to single-process "
              f"training {drift:.2e}")
        print(f"bubble fraction {tl.bubble_fraction:.3f}; idle fraction per stage "
              + ", ".join(f"{tl.idle_fraction(w):.3f}" for w in range(tl.num_workers)))


if __name__ == "__main__":
    main()
