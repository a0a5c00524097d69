"""torch.distributed.pipelining, the peer: torchrun ranks that serve build/run/profile commands
(torch's side and brigade's torchrun side of a split) from files in a work folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brigade import schedulers
from brigade.engine.cli.output import atomic_write_bytes
from brigade.engine.ray_backend import actor_env
from brigade.stages.partition import split

from .config import BenchConfig, LR, _TORCH_CLASSES
from .pipeline import _brigade_pipeline, _brigade_warmup
from .profiling import make_batch, make_model

__all__ = ["TorchPeer", "TorchPeerError", "torch_worker"]

# The script torchrun runs in --torch-worker mode: the entry point beside this package.
ENTRY = Path(__file__).resolve().parents[1] / "resnet_splits.py"


# -- torch.distributed.pipelining: the peer, run by torchrun -----------------------------------------
class TorchPeerError(RuntimeError):
    """The torchrun ranks failed or stopped answering; the message holds their log's tail."""


class TorchPeer:
    """``torchrun --standalone --nproc-per-node N`` on this script in ``--torch-worker`` mode.

    Why a long-lived peer: the machine is noisy, so torch and brigade rounds rotate in one
    run; starting torchrun per round would cost seconds each. Commands are JSON files
    ``cmd-<n>.json`` in ``workdir`` that rank 0 picks up and broadcasts; rank 0 answers in
    ``res-<n>.json``. ``close()`` (also the context manager's exit) ends the ranks: an
    ``exit`` command, then SIGTERM and SIGKILL to the process group if they linger.
    """

    def __init__(self, workdir: Path, nproc: int = 2, timeout_s: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self._n = 0
        self.error: str | None = None  # set when a command failed; no more are sent
        self.log_path = self.workdir / "torchrun.log"
        # The ranks get the environment brigade gives its stage actors (one malloc arena),
        # so the two runners differ by their pipelines, not by their allocators.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR", **actor_env(),
               **(env or {})}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", str(ENTRY),
               "--torch-worker", str(self.workdir), "--parent-pid", str(os.getpid())]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, op: str, timeout_s: float | None = None, **args: Any) -> dict:
        """Send one command and wait for rank 0's answer (or the ranks' death)."""
        n, self._n = self._n, self._n + 1
        _write_json(self.workdir / f"cmd-{n}.json", {"op": op, **args})
        answer = self.workdir / f"res-{n}.json"
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while not answer.exists():
            if self.proc.poll() is not None:
                raise TorchPeerError(f"torchrun exited with status {self.proc.returncode} "
                                     f"during {op!r}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TorchPeerError(f"torchrun gave no answer to {op!r} within "
                                     f"{timeout_s or self.timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.01)
        result = json.loads(answer.read_text())
        if "error" in result:
            raise TorchPeerError(f"torch rank 0 failed in {op!r}: {result['error']}")
        return result

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def close(self, grace_s: float = 20.0) -> None:
        """Ask the ranks to exit; kill the process group if they do not."""
        if self.proc.poll() is None:
            try:
                _write_json(self.workdir / f"cmd-{self._n}.json", {"op": "exit"})
                self._n += 1
                self.proc.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        # torchrun starts each rank in a session of its own, so this reaches torchrun's
        # group only; a rank whose torchrun is gone exits by itself (see _next_command).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    def __enter__(self) -> "TorchPeer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_json(path: Path, data: Any) -> None:
    """Write atomically: readers (the ranks, the driver) never see half a file."""
    atomic_write_bytes(str(path), json.dumps(data).encode())


class _TorchSide:
    """One rank's part of a split under torch.distributed.pipelining (same seed as brigade).

    Each stage's ``forward_one_chunk``, ``backward_one_chunk`` and ``backward_weight_one_chunk``
    and the optimizer step are timed (wall clock), so a torch round yields a timeline with
    the same compute spans brigade records: its bubble is read the same way.
    """

    def __init__(self, cmd: dict, rank: int, world: int) -> None:
        from torch.distributed import pipelining as pp

        cfg = BenchConfig(**cmd["config"])
        model = make_model(cfg, cmd["model"], cmd["shape"])
        pieces = split(model, cmd["balance"])
        n = len(pieces)
        mine = [s for s in range(n) if s % world == rank]
        stages = [pp.PipelineStage(pieces[s], s, n, torch.device("cpu")) for s in mine]
        self.events: list[tuple] = []
        for st in stages:
            self._time_calls(st, rank)
        self.optimizer = torch.optim.SGD([p for s in mine for p in pieces[s].parameters()], lr=LR)
        cls = getattr(pp, _TORCH_CLASSES[cmd["schedule"]])
        multi = cmd["schedule"] == "interleaved"
        self.schedule = cls(stages if multi else stages[0], cfg.microbatches,
                            loss_fn=nn.CrossEntropyLoss())
        self.first, self.last = 0 in mine, n - 1 in mine
        self.mine, self.rank, self.world = mine, rank, world
        self.x, self.y = make_batch(cfg, cmd["shape"], cfg.batch_size)

    def _time_calls(self, stage: Any, rank: int) -> None:
        """Record (rank, stage, kind, microbatch, t0, t1) for every compute call of ``stage``."""
        for method, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"),
                             ("backward_weight_one_chunk", "W")):
            inner = getattr(stage, method, None)
            if inner is None:
                continue

            def timed(*args: Any, _inner=inner, _kind=kind, _s=stage.stage_index, **kwargs: Any):
                t0 = time.perf_counter()
                out = _inner(*args, **kwargs)
                j = args[0] if args else next(iter(kwargs.values()), -1)
                self.events.append((rank, _s, _kind, int(j), t0, time.perf_counter()))
                return out

            setattr(stage, method, timed)

    def warm_up(self, steps: int) -> float | None:
        """Untimed steps (at least one); the first step's loss."""
        losses = self.run(max(1, steps))["losses"]
        return losses[0] if losses else None

    def close(self) -> None:
        """Nothing to stop: torch's stages use the ranks' default group."""

    def step(self, step: int) -> float | None:
        """One training step (forward, backward, SGD update); the mean loss on the last rank."""
        args = (self.x,) if self.first else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": self.y, "losses": losses} if self.last else {}
        self.schedule.step(*args, **kwargs)
        t0 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for s in self.mine:
            self.events.append((self.rank, s, "U", step, t0, time.perf_counter()))
        return float(torch.stack(losses).mean()) if losses else None

    def run(self, steps: int) -> dict:
        """Timed steps, each between barriers: wall seconds and loss per step, and every
        rank's compute spans (seconds from this round's first barrier on that rank)."""
        import torch.distributed as dist

        walls, losses = [], []
        self.events = []
        dist.barrier()
        origin = time.perf_counter()
        for i in range(steps):
            if i:
                dist.barrier()
            t0 = time.perf_counter()
            out = self.step(i)
            if out is not None:
                losses.append(out)
            dist.barrier()
            walls.append(time.perf_counter() - t0)
        spans = [(w, s, k, j, t0 - origin, t1 - origin) for (w, s, k, j, t0, t1) in self.events]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, {"events": spans, "losses": losses})
        return {"wall": walls, "events": [e for g in gathered for e in g["events"]],
                "losses": next((g["losses"] for g in gathered if g["losses"]), [])}


class _BrigadeSide:
    """One rank's part of a split on brigade's torchrun backend (same seed, weights and batch
    as the other runners): the same launcher, process layout and allocator as the torch
    side, so the two differ by their pipelines alone."""

    def __init__(self, cmd: dict, rank: int, world: int) -> None:
        self.cfg = BenchConfig(**cmd["config"])
        self.schedule = cmd["schedule"]
        self.pipe = _brigade_pipeline(self.cfg, make_model(self.cfg, cmd["model"], cmd["shape"]),
                                      cmd["balance"], self.schedule, backend="torchrun")
        self.batch = make_batch(self.cfg, cmd["shape"], self.cfg.batch_size)

    def warm_up(self, steps: int) -> float:
        return _brigade_warmup(replace(self.cfg, warmup=steps), self.pipe, self.batch,
                               self.schedule)

    def profile(self, steps: int) -> dict:
        """An in-place profile of ``steps`` steps (``Pipeline.profile``; see ``_in_place_step``)."""
        return {"profile": self.pipe.profile(*self.batch, steps=steps).to_json()}

    def run(self, steps: int) -> dict:
        """``steps`` timed steps, each between barriers as torch's are (a decoupled schedule:
        one ``Pipeline.run`` of ``steps`` steps); wall seconds per step and the timeline."""
        import torch.distributed as dist

        self.pipe.reset_timeline()
        walls = []
        decoupled = self.schedule in schedulers.DECOUPLED
        rounds, batches = (1, [self.batch] * steps) if decoupled else (steps, [self.batch])
        for _ in range(rounds):
            dist.barrier()
            t0 = time.perf_counter()
            self.pipe.run(batches)
            dist.barrier()
            walls.append((time.perf_counter() - t0) / len(batches))
        return {"wall": walls, "timeline": self.pipe.timeline().to_json()}

    def close(self) -> None:
        self.pipe.shutdown()


_SIDES = {"torch": _TorchSide, "brigade": _BrigadeSide}


def _next_command(workdir: Path, n: int, parent: int | None, agent: int) -> dict:
    """Rank 0 waits for command ``n``; a vanished parent (the driver) or torchrun (``agent``,
    this rank's parent process: killed, it leaves the rank to init) means exit."""
    path = workdir / f"cmd-{n}.json"
    while not path.exists():
        if (parent is not None and not _alive(parent)) or os.getppid() != agent:
            return {"op": "exit"}
        time.sleep(0.005)
    return json.loads(path.read_text())


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (the parent, seen from rank 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def torch_worker(workdir: Path, parent: int | None = None) -> int:
    """The ``--torch-worker`` mode: one torchrun rank serving build/run/profile commands (torch's side and brigade's torchrun
    side of a split) until exit."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    agent = os.getppid()  # torchrun's agent
    sides: dict[str, Any] = {}  # runner ("torch" | "brigade") -> its side of the current split
    n = 0
    try:
        while True:
            box = [_next_command(workdir, n, parent, agent) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            cmd = box[0]
            runner = cmd.get("runner", "torch")
            if cmd["op"] == "exit":
                break
            if cmd["op"] == "build" and runner in _SIDES:
                if runner in sides:
                    sides.pop(runner).close()  # free the previous split first
                t0 = time.perf_counter()
                sides[runner] = _SIDES[runner](cmd, rank, world)
                first = sides[runner].warm_up(cmd["warmup"])
                result = {"build_s": time.perf_counter() - t0, "first_loss": first}
            elif cmd["op"] == "run" and runner in sides:
                result = sides[runner].run(cmd["steps"])
            elif cmd["op"] == "profile" and runner == "brigade" and runner in sides:
                result = sides[runner].profile(cmd["steps"])
            else:
                result = {"error": f"unknown command {cmd['op']!r} for runner {runner!r} "
                                   f"(built: {sorted(sides)})"}
            if rank == 0:
                _write_json(workdir / f"res-{n}.json", result)
            n += 1
    finally:
        for side in sides.values():
            side.close()
        dist.destroy_process_group()
    return 0
