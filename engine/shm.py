"""A one-way ring of bytes in shared memory between two processes on one host.

Why: over gloo (TCP on loopback) a send of a few hundred KB returns only once the
receiving process's gloo thread has read the bytes out of the socket, and on a machine whose
cores are all computing that thread waits for the scheduler: measured on 2 CPU stages
(resnet18 width 16, 256 KB gradients, 1F1B), the last stage's sends took 0.42 ms median and
1.0 ms mean, ~8 ms per step on the critical path. Through a ring the sender copies the bytes
into shared memory and sends only the header over a Unix socket, whose buffer takes it at
once unless full; the receiver thread copies them out when it runs.

    writer (sender's step thread)               reader (receiver thread of that source)
    offset, end = reserve(sizes, timeout_s)     bufs = read(offset, sizes, alloc)
      (waits while the ring is full)            release(end)
    write(offset, tensors)
    header {offset, end} ── Unix socket ─────▶  (the header names where the bytes are)

The file lives in ``/dev/shm`` (tmpfs): the writer creates it with ``posix_fallocate``, so a
full ``/dev/shm`` is an error at creation (the transport then sends that peer's payloads
behind their headers on the socket),
never a SIGBUS at a later write. The reader unlinks it as soon as it has mapped it; the
writer unlinks it again at close (for a reader that never attached), so nothing is left
behind once both ends are up. Bytes before offset 64 hold one int64: how many bytes the
reader has released (it only grows; the writer compares it with how many it has produced).
One writer and one reader per ring; messages are read in the order they were written.
"""

from __future__ import annotations

import mmap
import os
import socket
import time
import uuid

import numpy as np
import torch

__all__ = ["ShmRing", "ShmRingFull", "SHM_DIR", "probe", "can_read", "listen", "send_buffers",
           "recv_exact"]

SHM_DIR = "/dev/shm"
_HEADER = 64  # the released counter, padded to a cache line
_ALIGN = 64


class ShmRingFull(TimeoutError):
    """The reader did not release space within the writer's timeout."""


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class ShmRing:
    """One direction's ring: ``create`` on the writer's side, ``attach`` on the reader's."""

    def __init__(self, path: str, size: int, mm: mmap.mmap) -> None:
        self.path = path
        self.size = size
        self._mm = mm
        self._data = torch.frombuffer(mm, dtype=torch.uint8, offset=_HEADER, count=size)
        self._released = np.frombuffer(mm, dtype=np.int64, count=1)
        self._produced = 0  # writer side only

    @classmethod
    def create(cls, size: int, tag: str = "ring") -> "ShmRing":
        """A new ring of ``size`` bytes (rounded up to 64) in ``SHM_DIR``; raises OSError
        (ENOSPC) when shared memory cannot hold it."""
        size = _aligned(size)
        path = os.path.join(SHM_DIR, f"brigade-{tag}-{uuid.uuid4().hex[:12]}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, _HEADER + size)
            mm = _map(fd, _HEADER + size)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        return cls(path, size, mm)

    @classmethod
    def attach(cls, path: str) -> "ShmRing":
        """Map the ring at ``path`` (made by the writer) and unlink its name."""
        fd = os.open(path, os.O_RDWR)
        try:
            total = os.fstat(fd).st_size
            mm = _map(fd, total)
        finally:
            os.close(fd)
        _unlink(path)
        return cls(path, total - _HEADER, mm)

    # -- writer ----------------------------------------------------------------------------
    def fits(self, sizes: tuple[int, ...]) -> bool:
        """Whether one message of ``sizes`` may go through this ring (half of it at most,
        so a message never waits for more than the one before it to be read)."""
        return sum(_aligned(n) for n in sizes) <= self.size // 2

    def reserve(self, sizes: tuple[int, ...], timeout_s: float) -> tuple[int, int]:
        """Room for one message: its byte offset in the ring and the produced count once it
        is read (the reader releases up to that). A message never wraps: when it would, it
        starts again at offset 0 and the tail is skipped. Waits while the reader lags."""
        total = sum(_aligned(n) for n in sizes)
        pos = self._produced % self.size
        start = self._produced + (self.size - pos if pos + total > self.size else 0)
        end = start + total
        deadline = None
        pause = 0.0
        while end - int(self._released[0]) > self.size:
            now = time.monotonic()
            deadline = deadline or now + timeout_s
            if now > deadline:
                raise ShmRingFull(
                    f"shared ring {self.path}: the reader released {int(self._released[0])} "
                    f"of {self._produced} bytes and has not freed {total} more in "
                    f"{timeout_s:.0f} s; is the reader still receiving?"
                )
            time.sleep(pause)
            pause = min(2 * pause + 20e-6, 1e-3)
        self._produced = end
        return start % self.size, end

    def write(self, offset: int, wires: list[torch.Tensor]) -> None:
        """Copy flat uint8 tensors into the ring from ``offset`` (as :meth:`reserve` said)."""
        for w in wires:
            n = w.numel()
            self._data[offset:offset + n].copy_(w)
            offset += _aligned(n)

    # -- reader ----------------------------------------------------------------------------
    def read(self, offset: int, sizes: tuple[int, ...], alloc) -> list[torch.Tensor]:
        """Copy one message's tensors out (into buffers from ``alloc(nbytes)``)."""
        out = []
        for n in sizes:
            buf = alloc(n)
            buf.copy_(self._data[offset:offset + n])
            out.append(buf)
            offset += _aligned(n)
        return out

    def release(self, end: int) -> None:
        """Tell the writer everything up to ``end`` is read (after :meth:`read`)."""
        self._released[0] = end

    # -- both --------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap, and unlink the name if it is still there (the reader never attached)."""
        self._data = self._released = None  # the mmap refuses to close while viewed
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: unmapped when it goes
            pass
        _unlink(self.path)


def _map(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of ``fd`` shared, with every page table entry made now
    (MAP_POPULATE, where the platform has it): otherwise the writer takes a page fault on
    its first touch of every 4 KB page and the reader about one per 64 KB (the kernel maps
    read faults 16 pages at a time): on 2 busy cores the first six 4 MB ping-pongs through a
    fresh 32 MB ring took 21-48 ms one way, the later ones 4-6 ms; mapped up front, the
    first ones took 5-7 ms (``bench/transport.py``'s brigade-p2p route, 40 rounds)."""
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def probe() -> tuple[str, str]:
    """A small file in ``SHM_DIR`` and its contents: a peer that reads the same contents
    back shares this host's shared memory (same machine, same container)."""
    token = uuid.uuid4().hex
    path = os.path.join(SHM_DIR, f"brigade-probe-{token[:12]}")
    with open(path, "w") as f:
        f.write(token)
    return path, token


def can_read(path: str, token: str) -> bool:
    """Whether ``path`` is visible here with ``token`` in it (see :func:`probe`)."""
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


# -- the socket beside the ring --------------------------------------------------------------
def listen() -> tuple[socket.socket, str]:
    """A Unix stream socket listening in ``SHM_DIR`` (peers that read our probe can reach
    it there), and its path."""
    path = os.path.join(SHM_DIR, f"brigade-sock-{uuid.uuid4().hex[:12]}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(64)
    except BaseException:
        sock.close()
        _unlink(path)
        raise
    return sock, path


def send_buffers(sock: socket.socket, buffers: list) -> None:
    """Write every buffer, in order, in as few system calls as the socket allows."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def recv_exact(sock: socket.socket, buffer) -> None:
    """Fill ``buffer`` from ``sock``; ConnectionError when the peer closes first."""
    view = memoryview(buffer).cast("B")
    while view.nbytes:
        got = sock.recv_into(view)
        if not got:
            raise ConnectionError("connection closed by peer")
        view = view[got:]
