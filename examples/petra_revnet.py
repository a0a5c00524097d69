"""PETRA vs backprop on a RevNet-18: same model, data, seed and optimizer, MNIST.

    python examples/petra_revnet.py                     # Ray: one actor per stage
    python examples/petra_revnet.py --local --steps 40  # quicker, in this process

PETRA (Rivaud et al., ICLR 2025) runs the forward and the (delayed) backward of different
microbatches at once, with one version of the weights: a reversible stage stores NO
activations, it rebuilds its input from its output when the gradient comes back. Printed:
test accuracy, training time, idle fraction per stage, and the peak bytes each stage held
for pending backwards, backprop (1F1B) against PETRA on the same split.
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
    torch.manual_seed(args.seed)
    # 10 blocks: stem, 8 residual blocks (5 reversible), head; cut after block 4
    model = build_model("revnet18", width=args.width, in_channels=1, image_size=28)
    with Pipeline(
        model, stages=[4, 6], schedule=schedule, method=method, microbatches=4,
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr),
        loss_fn=nn.CrossEntropyLoss(), backend="local" if args.local else "ray",
        **({"cpus_per_stage": 1} if not args.local else {}),
    ) as pipe:
        loader = Batches(data, 64, shuffle=True, seed=args.seed)
        batches = [b for _, b in zip(range(args.steps), loader)]
        t0, losses = time.perf_counter(), []
        for i in range(0, len(batches), 16):  # PETRA fills and drains once per run
            losses += [out["loss"] for out in pipe.run(batches[i:i + 16])]
        wall = time.perf_counter() - t0
        acc = (pipe.predict(test.x).argmax(1) == test.y).float().mean().item()
        tl = pipe.timeline()
        return {"acc": acc, "loss": sum(losses[-10:]) / len(losses[-10:]), "wall": wall,
                "idle": [tl.idle_fraction(w) for w in range(tl.num_workers)],
                "peak": tl.meta["peak_stored_activation_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--steps", type=int, default=110, help="110 steps of 64 = one epoch")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local", action="store_true", help="run the stages in this process")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", data_dir=args.data_dir, split="train")
    test = load_dataset("mnist", data_dir=args.data_dir, split="test")
    print(f"{'method':<10}{'test acc':>10}{'loss':>8}{'wall s':>9}   idle per stage   "
          "peak stored activations per stage")
    for method, schedule in (("backprop", "1f1b"), ("petra", "petra")):
        r = train(method, schedule, data, test, args)
        print(f"{method:<10}{100 * r['acc']:>9.2f}%{r['loss']:>8.3f}{r['wall']:>9.1f}   "
              + "  ".join(f"{100 * v:.1f}%" for v in r["idle"]) + "      "
              + "  ".join(f"{b / 2**20:.2f} MiB" for b in r["peak"]))


if __name__ == "__main__":
    main()
