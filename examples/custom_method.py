"""A learning rule of your own, declared outside brigade, trained on Ray.

``signsgd`` is backprop whose stages step along the sign of each gradient entry (signSGD,
Bernstein et al. 2018): the stage class overrides ``update`` and the declaration reuses
backprop's handlers and schedules. Registering it is all it takes; ``Pipeline(...,
method="signsgd")``, ``brigade methods --import examples/custom_method.py`` and the
exposure table then know it.

How the rule reaches the Ray workers: each worker gets the declaration itself with its
``WorkerSpec`` (not the name), and the Ray backend ships a module outside brigade by value
(cloudpickle), so an actor builds ``SignSGDStage`` without importing this file (run as a
script it is ``__main__``, which goes by value anyway). Processes that look a rule up by
name (torchrun ranks, which each build the pipeline) import the modules listed in
``BRIGADE_METHODS`` (comma-separated module names) first.

    python examples/custom_method.py --steps 30        # trains on a local Ray cluster
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from brigade.stages import handlers
from brigade.stages.rules import Message, MethodSpec, activation_size, register_method
from brigade.stages.stage import Stage


class SignSGDStage(Stage):
    """A backprop stage whose update steps along sign(grad)."""

    def update(self) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad = p.grad.sign()
        super().update()


SIGNSGD = MethodSpec(
    name="signsgd", stage_class=SignSGDStage, schedules=("1f1b", "gpipe"),
    handlers=handlers.BACKPROP_HANDLERS, default_optimizer=("sgd", 0.002),
    forward=(Message("activation h", "B·F", activation_size),),
    backward=(Message("gradient dL/dh", "B·F", activation_size),),
    summary="backprop stepping along the sign of each gradient entry (an example rule)",
    reference="Bernstein et al. 2018 (signSGD)")
register_method(SIGNSGD, replace=True)  # replace: importing this file twice is harmless


def problem(steps: int, n: int = 64, seed: int = 0):
    """Batches of a learnable 10-class problem: a template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 28, 28, generator=g)
    for _ in range(steps):
        y = torch.randint(0, 10, (n,), generator=g)
        yield templates[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=g), y


def train(steps: int = 30, backend: str = "ray") -> list[float]:
    """Train the built-in MLP with signsgd for ``steps`` steps; returns the losses."""
    from brigade.engine import Pipeline
    from brigade.stages.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", width=64)
    with Pipeline(model, stages=2, schedule="1f1b", method="signsgd", microbatches=4,
                  optimizer=lambda p: torch.optim.SGD(p, lr=0.002),
                  loss_fn=nn.CrossEntropyLoss(), backend=backend) as pipe:
        return [out["loss"] for out in pipe.run(list(problem(steps)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--backend", default="ray", choices=["ray", "local"])
    args = p.parse_args(argv)
    losses = train(args.steps, args.backend)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"signsgd on {args.backend}: loss {first:.3f} (first 5 steps) -> {last:.3f} "
          f"(last 5 steps)")
    if not last < 0.5 * first:
        print("signsgd did not learn: the last steps' loss is not below half the first's",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
