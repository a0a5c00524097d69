"""ResNet and RevNet stage splits: brigade beside torch.distributed.pipelining, and the simulator.

    python bench/resnet_splits.py                                  # the default set, < 10 min
    python bench/resnet_splits.py --json out.json --markdown out.md --gantt out.png
    python bench/resnet_splits.py --quick --no-measure             # seconds: a smoke run
    python bench/resnet_splits.py --models resnet50 --shapes imagenet --stages 4,8 --no-measure

What it does, for every model (resnet18/34/50, revnet18/34/50; ``--models mlp --shapes
mnist`` the MNIST MLP at its own width), input shape (CIFAR 3x32x32,
ImageNet 3x224x224, synthetic data) and stage count (2, 4, 8):

1. Profiles every block's forward and backward on this machine, one torch thread
   (``brigade.stages.partition.profile_blocks``), on one microbatch. ImageNet shapes are
   profiled on a smaller batch (``--imagenet-profile-batch``) and the times scaled linearly
   to the microbatch: the tables say ``scaled xN`` where that happened, ``profiled`` where not.
2. Balances by time (the exact contiguous min-max partition) and prints the stage table.
3. Simulates every schedule from a profile of that split (``brigade.schedulers``: build,
   lower, simulate): gpipe, 1f1b, interleaved (2 chunks per worker), zb1p, and the decoupled
   dni and dgl (every model) and petra (revnets). The costs are the per-stage action times
   of brigade's own stage classes on the balanced split, one microbatch, one thread
   (backprop F and B, zb1p F, I and W, DNI S and T, PETRA F and R, DGL F with its auxiliary
   head's loss and backward; an SGD step for U), so they include what the engine runs
   beyond the blocks (loss, saved-bytes hooks, the split backward, synthetic gradients,
   reconstruction, auxiliary heads). Sends are charged to the sender
   (``--latency-ms``, ``--bandwidth-gbs``; the defaults, 0.2 ms and 1.7 GB/s, put a 4 MB
   hand-off at 2.7 ms, about what bench/transport.py measures for gloo on this kind of
   machine, 1.7-3.1 ms). Figures: step time, samples/s, bubble, idle fraction per worker, peak stored
   activation bytes per worker.
4. Measures the splits that fit the machine (default: 2 stages, CIFAR shape, resnet18 and
   revnet18 at width 16) on brigade's engine, on each of ``--backends`` (default both): Ray
   (2 actors x 1 CPU thread, the p2p transport: on one host a Unix socket and a
   shared-memory ring) and torchrun (2 ranks, the same transport and worker code); and, side by side in the same run, the same split (same seed, same
   weights, same batch) on torch.distributed.pipelining (PipelineStage with ScheduleGPipe,
   Schedule1F1B, ScheduleInterleaved1F1B) under ``torchrun --standalone --nproc-per-node 2``
   with gloo, one thread per rank. The torchrun ranks stay up for the whole run and take
   commands from this process (a hidden ``--torch-worker DIR`` mode of this script); they
   hold both torch's side and brigade's torchrun side of a split, so those two differ by
   their pipelines alone (same launcher, processes and allocator settings). The runners
   take turns round by round: each round runs ``--window`` steps of each runner, in an order
   rotating every round, after warm-up steps that are not counted. Step time is the median
   over timed steps. On the torchrun ranks, which have no driver, each step of a flush
   schedule runs between barriers (torch's and brigade's alike); a decoupled schedule's
   round, which does not flush between steps, is one ``Pipeline.run`` of ``--window``
   steps, timed as the window's wall time over its steps. On Ray every round is one
   ``Pipeline.run`` of ``--window`` steps, as ``brigade train`` drives it (one driver round
   trip per window); ``Pipeline.step`` per step would add the round trip to every step
   (~7.5 ms on a ~190 ms resnet18 step here; bench/pipeline_schedules.py prints both). The torch
   companion of zb1p, dni and petra is torch's Schedule1F1B. torch's stages' compute calls
   (forward_one_chunk, backward_one_chunk, backward_weight_one_chunk) and its optimizer step
   are timed, which gives its busy time and bubble as brigade's timeline gives brigade's.

Reported: brigade / torch step-time ratio per schedule and backend (target <= 1.0 for GPipe
and 1F1B); brigade DNI (and PETRA, revnets) throughput over torch 1F1B's on the same split
(target >= 1.3x; printed beside its ceiling on balanced stages, the flush a decoupled schedule
drops: (m+p-1)/m, 1.125x at p=2, m=8); simulated over measured throughput for every measured
brigade row (target within 10%), simulated from in-place profiles of the split on that backend
(``Pipeline.profile`` of ``--window`` steps right before each round: every action timed on the
workers themselves, all at once; the simulator replays each action's time, with the round's
mean message latency; the rounds' predicted time summed over their measured time), and, beside
it, from the isolated profile of step 3 (the one the simulated table uses for every split).
A *calibrated* prediction simulates each measured round again with the costs that round
measured (``brigade.schedulers.predict``): profiled -> calibrated is how much slower compute
ran inside the engine than in the profile, calibrated -> measured is overhead outside compute
(driver round trips, waits); the per-worker compute per step, measured beside simulated, is in
the measured table too. Outputs: rich tables on the terminal, ``--json`` (a list of rows:
model, stages, microbatches, schedule, runner = brigade | torch | simulated, step_time_s,
samples_per_s, bubble_fraction, and more; brigade rows name their ``backend``), ``--markdown``
(the same as tables) and ``--gantt`` (measured rounds beside brigade's simulation of them, or
the simulated schedules when nothing is measured). Every process started here (the Ray
cluster, the torchrun ranks) is stopped at the end, on errors too.

The work lives in the helper package beside this file, one job per module
(``bench/resnet_bench/``): ``config`` (flags, BenchConfig), ``profiling`` (blocks, stage
tables), ``costs`` (per-action costs of a split), ``simulation`` (every schedule of a
split), ``pipeline`` (brigade's Pipeline of a split), ``peer`` (the torchrun ranks of
torch.distributed.pipelining and brigade's torchrun side), ``measure`` (the rounds and their
tallies), ``report`` (checks, tables, markdown, Gantt) and ``main`` (the run). This script
is the entry point and re-exports their public names.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper package beside it

from resnet_bench.config import (  # noqa: E402
    BACKENDS, MODELS, QUICK, SCHEDULES, SHAPES, TORCH_SCHEDULES, BenchConfig, BenchError,
    build_parser, parse_config,
)
from resnet_bench.costs import SplitCosts, split_costs, stage_costs  # noqa: E402
from resnet_bench.main import Results, main, run  # noqa: E402
from resnet_bench.measure import measure_split  # noqa: E402
from resnet_bench.peer import TorchPeer, TorchPeerError, torch_worker  # noqa: E402
from resnet_bench.profiling import ModelProfile, make_batch, make_model, profile_model  # noqa: E402
from resnet_bench.report import target_checks  # noqa: E402
from resnet_bench.simulation import simulate_split  # noqa: E402

__all__ = [
    "BenchConfig",
    "BenchError",
    "ModelProfile",
    "SplitCosts",
    "TorchPeer",
    "TorchPeerError",
    "MODELS",
    "SHAPES",
    "SCHEDULES",
    "TORCH_SCHEDULES",
    "BACKENDS",
    "QUICK",
    "Results",
    "build_parser",
    "parse_config",
    "profile_model",
    "make_model",
    "make_batch",
    "stage_costs",
    "split_costs",
    "simulate_split",
    "measure_split",
    "target_checks",
    "torch_worker",
    "run",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
