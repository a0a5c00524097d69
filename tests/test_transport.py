"""The p2p transport: keyed tensors between real Ray actors, over the same-host route
(a socket and a shared-memory ring) or a gloo group.

Three actors send to each other at once, every pair in both directions, messages of several
dtypes and shapes (0-d, empty, 4-D, non-contiguous, bool, bfloat16), tuples with None
entries and None payloads, small ones (inline) and large ones (through the ring; over gloo
into receives posted ahead, or not), with every rank on the same-host route, none, or two of
three. Each arrives bit-exact and, per source, in send order. Closing all together ends every
receiver thread and leaves nothing in /dev/shm; a killed peer makes the survivor's transport
report the error instead of hanging (either route); the engine trains the same with every
transport.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch import nn

from brigade.engine.transport import P2PTransport, TransportError, _BufferPool, decode, encode

from _procs import shm_files, wait_gone

pytestmark = pytest.mark.ray

ROUNDS = 6  # each round sends every kind of payload below once


def payloads(src: int, dest: int, round_: int) -> list:
    """What ``src`` sends ``dest`` in one round (deterministic: the receiver rebuilds it)."""
    g = torch.Generator().manual_seed(1000 * src + 100 * dest + round_)
    grid = torch.randn(5, 6, generator=g)
    return [
        torch.randn(2, 3, generator=g),                                    # float32
        torch.randint(-(2**40), 2**40, (7,), generator=g),                 # int64
        torch.tensor(float(round_ + src), dtype=torch.float64),            # 0-d
        torch.empty(0, 4),                                                 # empty
        torch.randn(2, 3, 4, 5, generator=g),                              # 4-D
        grid.t(),                                                          # non-contiguous
        torch.randn(3, generator=g).to(torch.bfloat16),
        torch.randint(0, 2, (4, 2), generator=g).bool(),
        (torch.randn(2, 2, generator=g), None, torch.arange(3)),           # tuple with None
        (None,),
        None,
        # larger than INLINE_BYTES: three size signatures for two pre-posted slots, so
        # one of them always takes the plain receive path
        torch.randn(256 * 1024, generator=g),                              # 1 MB
        torch.randint(0, 9, (20 * 1024,), generator=g),                    # 160 KB
        (torch.randn(50 * 1024, generator=g), None, torch.randn(50 * 1024, generator=g)),
    ]


def messages(src: int, dest: int) -> list[tuple[tuple, object]]:
    """Keys number the messages so the receiver can check the order."""
    out = []
    for r in range(ROUNDS):
        for p in payloads(src, dest, r):
            kind = "x" if len(out) % 2 == 0 else "g"
            out.append(((kind, src, len(out)), p))
    return out


def same(a, b) -> bool:
    """Bit-exact equality of payloads (dtype, shape, values; tuples entry by entry)."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(same, a, b))
    return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            and a.device == b.device and torch.equal(a, b))


class _Peer:
    """A Ray actor holding one P2PTransport; records arrivals in order."""

    def __init__(self) -> None:
        self.arrived: list = []
        self.transport: P2PTransport | None = None

    def endpoint(self) -> int:
        from brigade.engine.transport import free_port

        return free_port()

    def setup(self, rank: int, world: int, port: int, shared_memory: bool = True) -> int:
        self.transport = P2PTransport(rank, world, "127.0.0.1", port, self._deliver,
                                      timeout_s=30, shared_memory=shared_memory)
        return os.getpid()

    def routes(self) -> tuple[list[int], list[int]]:
        """The peers on the same-host route, and those this rank made a ring for."""
        t = self.transport
        return sorted(t.local_peers), sorted(t._rings_out)

    def _deliver(self, key, payload) -> None:
        self.arrived.append((key, payload))

    def send_all(self) -> None:
        """Interleave messages to every peer from this one thread, as a step thread does."""
        t = self.transport
        queues = [messages(t.rank, d) for d in t.peers]
        for i in range(max(len(q) for q in queues)):
            for dest, q in zip(t.peers, queues):
                if i < len(q):
                    t.send(dest, *q[i])
        t.check()

    def check_arrivals(self, timeout: float) -> list[str]:
        """Problems with what arrived (empty when everything is exact and in order)."""
        t = self.transport
        deadline = time.monotonic() + timeout
        want = {src: messages(src, t.rank) for src in t.peers}
        total = sum(len(m) for m in want.values())
        while len(self.arrived) < total and time.monotonic() < deadline:
            time.sleep(0.01)
        t.check()
        problems = []
        for src, expected in want.items():
            got = [(k, p) for k, p in self.arrived if k[1] == src]
            if [k for k, _ in got] != [k for k, _ in expected]:
                problems.append(f"from {src}: keys {[k for k, _ in got]}")
                continue
            problems += [f"from {src}: {k} differs" for (k, p), (_, q) in zip(got, expected)
                         if not same(p, q)]
        return problems

    def close(self) -> tuple[bool, list[str], list[str]]:
        ok = self.transport.close(10.0)
        threads = [th.name for th in threading.enumerate() if th.name.startswith("brigade-")]
        return ok, self.transport.alive_threads(), threads

    def check_error(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.transport.check()
            except TransportError as err:
                return str(err)
            time.sleep(0.05)
        return ""

    def send_to_dead(self, dest: int) -> str:
        try:
            self.transport.send(dest, ("x", 0, 0), torch.ones(1 << 20))
            self.transport.check()
        except TransportError as err:
            return str(err)
        return ""




def _start(ray, world: int, shared: tuple[bool, ...] | None = None):
    cls = ray.remote(num_cpus=0, max_concurrency=4)(_Peer)
    actors = [cls.remote() for _ in range(world)]
    port = ray.get(actors[0].endpoint.remote())
    shared = shared or (True,) * world
    pids = ray.get([a.setup.remote(r, world, port, shared[r]) for r, a in enumerate(actors)],
                   timeout=60)
    return actors, pids


def test_header_round_trip_without_processes():
    key = ("g", 3, 17)
    payload = (torch.zeros(2, 1, 3, dtype=torch.int16), None, torch.tensor(True))
    header, tensors = encode(key, payload)
    got_key, form, metas = decode(header)
    assert got_key == key and tensors[1] is None
    assert metas == [(torch.int16, (2, 1, 3)), None, (torch.bool, ())]
    with pytest.raises(TransportError, match="keys are"):
        encode(("z", 1), torch.ones(1))
    with pytest.raises(TransportError, match="a payload is a tensor"):
        encode(("x", 0, 0), [torch.ones(1)])
    with pytest.raises(TransportError, match="at most 8 dims"):
        encode(("x", 0, 0), torch.ones([1] * 9))


def test_receive_buffers_are_reused_only_when_nothing_references_them():
    pool = _BufferPool(max_bytes=1 << 20)
    a = pool.get(4096)
    view = a.view(torch.float32).reshape(32, 32)[1:]  # a view keeps the buffer busy
    ptr = a.data_ptr()
    del a
    assert pool.get(4096).data_ptr() != ptr
    kept = view.detach()
    del view
    assert pool.get(4096).data_ptr() != ptr
    del kept
    assert pool.get(4096).data_ptr() == ptr
    big = pool.get(2 << 20)  # over max_bytes: allocated, not kept
    assert pool.kept == 2 * 4096 and big.numel() == 2 << 20  # the 2nd freed buffer served the 3rd


# which ranks offer the same-host route; the peers each rank then reaches through it
ROUTES = {
    "same-host": ((True, True, True), [[1, 2], [0, 2], [0, 1]]),
    "gloo": ((False, False, False), [[], [], []]),
    "mixed": ((True, True, False), [[1], [0], []]),  # rank 2 keeps to gloo with both
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_three_actors_exchange_exactly_and_in_order_then_close_cleanly(ray_cluster, route):
    ray = ray_cluster
    shared, local = ROUTES[route]
    if any(shared) and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    before = shm_files()
    actors, pids = _start(ray, 3, shared)
    try:
        ray.get([a.send_all.remote() for a in actors], timeout=120)
        # every local peer got a 1 MB payload, so each has a ring made for it
        assert ray.get([a.routes.remote() for a in actors]) == [(p, p) for p in local]
        problems = ray.get([a.check_arrivals.remote(30) for a in actors], timeout=60)
        assert problems == [[], [], []]
        closed = ray.get([a.close.remote() for a in actors], timeout=30)
        assert closed == [(True, [], [])] * 3
        assert shm_files() == before  # probes, sockets and rings all unlinked
    finally:
        for a in actors:
            ray.kill(a)
    assert wait_gone(pids), pids


@pytest.mark.parametrize("shared", [True, False], ids=["same-host", "gloo"])
def test_a_killed_peer_is_reported_not_waited_for(ray_cluster, shared):
    ray = ray_cluster
    before = shm_files()
    actors, pids = _start(ray, 2, (shared, shared))
    try:
        ray.kill(actors[1])
        assert wait_gone(pids[1:])
        err = ray.get(actors[0].check_error.remote(10), timeout=30)
        assert "receiving from rank 1" in err
        assert "sending ('x', 0, 0) to rank 1 failed" in ray.get(
            actors[0].send_to_dead.remote(1), timeout=60)
        t0 = time.monotonic()
        ok, alive, _ = ray.get(actors[0].close.remote(), timeout=30)
        assert ok and alive == [] and time.monotonic() - t0 < 12
        assert shm_files() == before  # the ring made for the dead peer is gone too
    finally:
        for a in actors:
            ray.kill(a)
    assert wait_gone(pids), pids


def _net() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh()),
                         nn.Linear(8, 8), nn.Linear(8, 3))


def _train(transport: str) -> tuple[dict, list, str]:
    from brigade.engine import Pipeline

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 1, 2, 3, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(2)]
    with Pipeline(_net(), stages=[1, 2], schedule="1f1b", microbatches=4, backend="ray",
                  transport=transport, optimizer=lambda p: torch.optim.SGD(p, lr=0.1)) as pipe:
        losses = [pipe.step(x, y)["loss"] for x, y in data]
        return pipe.state_dict(), losses, pipe._backend.transport


def test_engine_trains_the_same_over_every_transport(ray_cluster):
    runs = {name: _train(name) for name in ("p2p", "gloo", "ray")}
    assert {name: used for name, (_, _, used) in runs.items()} == {
        "p2p": "p2p", "gloo": "gloo", "ray": "ray"}
    p2p, p2p_losses, _ = runs["p2p"]
    for name in ("gloo", "ray"):
        state, losses, _ = runs[name]
        assert losses == p2p_losses, name
        for k in p2p:
            assert torch.equal(p2p[k], state[k]), (name, k)
