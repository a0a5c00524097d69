"""Hand-off cost of one activation between two processes, by every route, side by side.

    python bench/transport.py                       # 4 KB .. 64 MB, all routes
    python bench/transport.py --sizes 4MB --rounds 30 --json out.json
    python bench/transport.py --sizes 4MB --repeat 5   # lowest of 5 medians per route

Routes (one way, median over ping-pong rounds, each round trip halved):
  copy       in-process tensor copy: the physical floor
  ray-torch  Ray actor call with a torch tensor argument (pickled through the object store)
  ray-numpy  brigade's engine route: actor -> actor fire-and-forget call with a numpy array
             (zero-copy read from shared memory), copied into a torch tensor on arrival
  brigade-p2p  brigade's p2p route (engine/transport.py): two Ray actors, each with a
             P2PTransport; on one host, the header over a Unix socket and the payload
             through a shared-memory ring; a receiver thread per peer files the tensor in a
             Mailbox (the pong is sent from the receiver thread, as a deliver callback would)
  brigade-gloo the same with shared_memory=False (transport="gloo"): header + payload over
             gloo, the route between hosts
  gloo       torch.distributed send/recv with the gloo backend between two processes

All routes run in this one invocation, so their ratios are comparable on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = ["4KB", "64KB", "1MB", "4MB", "16MB", "64MB"]


def parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def copy_route(nbytes: int, rounds: int) -> list[float]:
    t = torch.randn(nbytes // 4)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        t.clone()
        out.append(time.perf_counter() - t0)
    return out


class _Peer:
    """A Ray actor that bounces every message back to its partner, as stages do."""

    def __init__(self, as_numpy: bool) -> None:
        from brigade.engine.mailbox import Mailbox

        self.as_numpy = as_numpy
        self.box = Mailbox()
        self.partner = None

    def connect(self, partner) -> None:
        self.partner = partner

    def deliver(self, key, value) -> None:
        from brigade.engine.ray_backend import from_wire

        tensor = from_wire(value) if self.as_numpy else value.clone()
        if key[0] == "ping":
            self.partner.deliver.remote(("pong", key[1]), self._wire(tensor))
        else:
            self.box.put(key, tensor)

    def _wire(self, tensor):
        from brigade.engine.ray_backend import to_wire

        return to_wire(tensor) if self.as_numpy else tensor

    def run(self, nbytes: int, rounds: int) -> list[float]:
        torch.set_num_threads(1)
        t = torch.randn(nbytes // 4)
        times = []
        for i in range(rounds + 2):
            t0 = time.perf_counter()
            self.partner.deliver.remote(("ping", i), self._wire(t))
            self.box.wait([("pong", i)], 60)
            self.box.take(("pong", i))
            if i >= 2:  # two warm-up rounds
                times.append((time.perf_counter() - t0) / 2)
        return times


def ray_route(nbytes: int, rounds: int, as_numpy: bool) -> list[float]:
    import ray

    cls = ray.remote(num_cpus=0, max_concurrency=4)(_Peer)
    a, b = cls.remote(as_numpy), cls.remote(as_numpy)
    ray.get([a.connect.remote(b), b.connect.remote(a)])
    try:
        return ray.get(a.run.remote(nbytes, rounds))
    finally:
        ray.kill(a)
        ray.kill(b)


class _P2PPeer:
    """A Ray actor exchanging through P2PTransport exactly as the engine's stage actors do."""

    def __init__(self) -> None:
        from brigade.engine.mailbox import Mailbox

        self.box = Mailbox()
        self.transport = None

    def port(self) -> int:
        from brigade.engine.transport import free_port

        return free_port()

    def setup(self, rank: int, port: int, shared_memory: bool) -> None:
        from brigade.engine.transport import P2PTransport

        torch.set_num_threads(1)
        self.transport = P2PTransport(rank, 2, "127.0.0.1", port, self._deliver, timeout_s=60,
                                      shared_memory=shared_memory)

    def _deliver(self, key, tensor) -> None:
        if key[0] == "x":  # ping: bounce it from the receiver thread
            self.transport.send(1 - self.transport.rank, ("g", key[1], key[2]), tensor)
        else:
            self.box.put(key, tensor)

    def run(self, nbytes: int, rounds: int) -> list[float]:
        t = torch.randn(nbytes // 4)
        times = []
        for i in range(rounds + 2):
            t0 = time.perf_counter()
            self.transport.send(1, ("x", 0, i), t)
            self.box.wait([("g", 0, i)], 60)
            self.box.take(("g", 0, i))
            if i >= 2:  # two warm-up rounds
                times.append((time.perf_counter() - t0) / 2)
        self.transport.check()
        return times

    def close(self) -> bool:
        return self.transport.close(5.0)


def p2p_route(nbytes: int, rounds: int, shared_memory: bool = True) -> list[float]:
    import ray

    cls = ray.remote(num_cpus=0, max_concurrency=4)(_P2PPeer)
    a, b = cls.remote(), cls.remote()
    try:
        port = ray.get(a.port.remote())
        ray.get([a.setup.remote(0, port, shared_memory), b.setup.remote(1, port, shared_memory)])
        times = ray.get(a.run.remote(nbytes, rounds))
        ray.get([a.close.remote(), b.close.remote()])
        return times
    finally:
        ray.kill(a)
        ray.kill(b)


def _gloo_worker(rank: int, port: int, nbytes: int, rounds: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    t = torch.randn(nbytes // 4)
    times = []
    for i in range(rounds + 2):
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(t, 1)
            dist.recv(t, 1)
        else:
            dist.recv(t, 0)
            dist.send(t, 0)
        if i >= 2:
            times.append((time.perf_counter() - t0) / 2)
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def gloo_route(nbytes: int, rounds: int) -> list[float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    from brigade.engine.transport import free_port

    port = free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, nbytes, rounds, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


ROUTES = {
    "copy": copy_route,
    "ray-torch": lambda nbytes, n: ray_route(nbytes, n, as_numpy=False),
    "ray-numpy": lambda nbytes, n: ray_route(nbytes, n, as_numpy=True),
    "brigade-p2p": p2p_route,
    "brigade-gloo": lambda nbytes, n: p2p_route(nbytes, n, shared_memory=False),
    "gloo": gloo_route,
}


def measure(sizes: list[str], rounds: int, repeat: int = 1) -> list[dict]:
    """Median one-way seconds per route and size; with ``repeat`` > 1 every route is
    measured that many times, in rotating order, and the lowest median is kept (on a
    machine shared with other jobs, the run least disturbed by them)."""
    rows = []
    names = list(ROUTES)
    for size in sizes:
        nbytes = parse_size(size)
        n = rounds if nbytes <= 16 * 1024**2 else max(5, rounds // 3)
        best: dict[str, float] = {}
        for rep in range(repeat):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                median = statistics.median(ROUTES[name](nbytes, n))
                best[name] = min(best.get(name, median), median)
        row = {"size": size, "bytes": nbytes}
        row.update({r: best[r] for r in names})
        row["ray-numpy / gloo"] = row["ray-numpy"] / row["gloo"]
        row["brigade-p2p / gloo"] = row["brigade-p2p"] / row["gloo"]
        rows.append(row)
        print(f"  {size:>5}: " + "  ".join(
            f"{r} {row[r] * 1e3:.3f} ms" for r in names) +
            f"  ray-numpy/gloo {row['ray-numpy / gloo']:.2f}"
            f"  brigade-p2p/gloo {row['brigade-p2p / gloo']:.2f}", file=sys.stderr)
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="one-way hand-off, median ms (with --repeat, the lowest median; "
                        "brigade's engine uses brigade-p2p, ray-numpy with transport='ray')")
    routes = tuple(ROUTES)
    for col in ("size", *routes, "ray-numpy / gloo", "brigade-p2p / gloo"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["size"], *(f"{r[k] * 1e3:.3f}" for k in routes),
                      f"{r['ray-numpy / gloo']:.2f}x", f"{r['brigade-p2p / gloo']:.2f}x")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each route N times (rotating order), keep the lowest "
                             "median: for a machine shared with other jobs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        rows = measure([s.strip() for s in args.sizes.split(",")], args.rounds, args.repeat)
    finally:
        ray.shutdown()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
