"""DNI vs cDNI vs backprop: the same 2-stage MLP on MNIST, trained three ways.

    python examples/dni_vs_backprop.py                  # Ray: one actor per stage
    python examples/dni_vs_backprop.py --local          # everything in this process
    python examples/dni_vs_backprop.py --epochs 3 --data-dir /path/to/mnist

Backprop (1F1B) accumulates a batch's 4 microbatches and updates once; with decoupled
neural interfaces (``method="dni"``) stage 0 updates after every microbatch with the
gradient its synthetic-gradient module predicts, never waiting for stage 1, and the module
learns from the true gradient when it comes back. cDNI also gives the module the label.
Same model, data, seed and optimizer (SGD lr 0.05) for all three. Prints test accuracy,
training time and each stage's idle fraction (on this small MLP the synthetic-gradient
module costs stage 0 more than stage 1's whole work, so stage 1 waits: see
bench/unlocked_mnist.py for a balanced split).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from brigade.engine import Pipeline
from brigade.stages.data import Batches, load_dataset
from brigade.stages.models import build_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def train(method: str, schedule: str, data, test, args) -> dict:
    torch.manual_seed(args.seed)  # the same initial weights for every method
    model = build_model("mlp")  # [flatten+linear+relu] [linear+relu] [linear], 1024 units
    with Pipeline(
        model, stages=[1, 2], schedule=schedule, method=method, microbatches=4,
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr),
        loss_fn=nn.CrossEntropyLoss(), backend="local" if args.local else "ray",
        **({"cpus_per_stage": 1} if not args.local else {}),
    ) as pipe:
        loader = Batches(data, 64, shuffle=True, seed=args.seed)
        t0, losses = time.perf_counter(), []
        for _ in range(args.epochs):
            batches = list(loader)  # one epoch; decoupled schedules fill/drain once per run
            for i in range(0, len(batches), 32):
                losses += [out["loss"] for out in pipe.run(batches[i:i + 32])]
        wall = time.perf_counter() - t0
        acc = (pipe.predict(test.x).argmax(1) == test.y).float().mean().item()
        tl = pipe.timeline()
        return {"acc": acc, "loss": sum(losses[-10:]) / len(losses[-10:]), "wall": wall,
                "idle": [tl.idle_fraction(w) for w in range(tl.num_workers)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local", action="store_true", help="run the stages in this process")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", data_dir=args.data_dir, split="train")
    test = load_dataset("mnist", data_dir=args.data_dir, split="test")
    print(f"{'method':<10}{'test acc':>10}{'loss':>8}{'wall s':>9}   idle per stage")
    for method, schedule in (("backprop", "1f1b"), ("dni", "dni"), ("cdni", "dni")):
        r = train(method, schedule, data, test, args)
        print(f"{method:<10}{100 * r['acc']:>9.2f}%{r['loss']:>8.3f}{r['wall']:>9.1f}   "
              + "  ".join(f"{100 * v:.1f}%" for v in r["idle"]))


if __name__ == "__main__":
    main()
