"""Point-to-point tensor transport between worker processes: shared memory on one host,
torch.distributed gloo between hosts.

Why: a Ray actor call carrying a numpy array costs ~3x a gloo send/recv for a 4 MB activation
(``bench/transport.py``). This module moves the same messages over a gloo process group,
or, between ranks that share a host's /dev/shm (found at construction: each leaves a probe
file there and says which peers' it can read), over the same-host route:

    sender (step thread)                        receiver (one thread per source rank)
    copy the bytes into the ring for dest       recv header from the Unix socket
    header ──── Unix socket (SOCK_STREAM) ───▶  copy the bytes out of the ring, release
      (returns at once: the socket buffer       deliver(key, tensor)
       takes a header without the receiver)

The ring is :class:`~brigade.engine.shm.ShmRing`. Why not gloo there too: a gloo send,
even of a header, completes only once the receiving process's gloo thread has taken it, and
with every core computing that thread waits for the scheduler (the last stage's 256 KB
sends on 2 CPU stages: 0.42 ms median, 1.0 ms mean). A payload of at most SHM_MIN_BYTES, or
one over half the ring, follows its header on the socket instead. Over gloo:

    sender (step thread)                        receiver (one thread per source rank)
    send(dest, ("x", 2, 5), tensor)             loop:
      send frame  ───── tag 0 ─────────────▶      recv frame: header [+ bytes if small]
      [send bytes ───── tag 1 or a slot's ──▶     [recv bytes, or take them from a
                                                    receive posted ahead (a "slot")]
      (returns when gloo has the bytes)           deliver(("x", 2, 5), tensor)

The header names the key (kind code, up to three integers), whether the payload is one tensor,
a tuple (PETRA sends (x, dx) pairs; entries may be None) or None, and per tensor its dtype
code and shape. Payload bytes travel as a flat uint8 view, so any dtype crosses unchanged
(bool, bfloat16, complex). Over gloo, a payload of at most ``INLINE_BYTES`` rides in the
header's frame (one message, one wake-up; copied in and out, which costs less than a round
trip); a larger
one follows as one message per tensor, received straight into the tensor that is delivered
(a pooled buffer, reused once nothing references it). Empty tensors send no bytes.

Ordering: gloo matches sends and receives between one pair of ranks FIFO per tag; frames use
one tag and separate payloads another, and one receiver thread per source consumes a frame
and then exactly its payloads, so messages from one rank to another arrive in send order. On
the same-host route the stream socket keeps the headers in order and the ring is read in
the order it was written.

Sends block until gloo (or the socket, or the ring) has the bytes (see
:meth:`P2PTransport.send`). No deadlock when two ranks send to each other at once: a send
waits only for the peer's receiver thread, never for the peer's step thread, and gloo pairs
are full duplex (the same-host route has one socket and one ring per direction). The
receiver thread waits for nothing but bytes, provided ``deliver`` does not block (a mailbox
``put``); a ``deliver`` that sends (the benchmark's echo) is safe as long as the two ends do
not both do it at once.

The group is built directly (``TCPStore`` + ``ProcessGroupGloo``), not with
``init_process_group``: no process-global default group, a short timeout for the rendezvous
and a long one for receives (a receiver idles between steps for as long as the user likes;
a gloo receive that times out cannot be re-posted safely).

``close()`` sends a CLOSE header to every peer; a receiver thread exits when its source's CLOSE
arrives, so when all ranks close together every thread ends (a same-host receiver whose peer
has not closed is ended by shutting its socket). A peer that died makes the receive raise
("connection closed by peer"): the thread records it and ends. Threads are daemons, so a
rank closed alone (or killed) never hangs its process on exit.

CUDA: tensors are staged through host memory (sent from a CPU copy, delivered on the
transport's device). A direct NCCL route for payloads is not built: nothing here could test it.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
import warnings
from datetime import timedelta
from typing import Any, Callable, Hashable

import numpy as np
import torch
import torch.distributed as dist

from .shm import ShmRing, recv_exact, send_buffers
from .shm import can_read as shm_can_read
from .shm import listen as shm_listen
from .shm import probe as shm_probe

__all__ = ["P2PTransport", "TransportError", "KINDS", "DTYPES", "free_port"]


class TransportError(RuntimeError):
    """A message could not be sent or received (peer gone, bad payload, closed transport)."""


# -- wire format -----------------------------------------------------------------------------
KINDS = ("x", "g", "y", "l", "d")  # message kinds; the code is the index
DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
MAX_KEY_INTS = 3
MAX_TENSORS = 4
MAX_NDIM = 8

OP_MESSAGE, OP_CLOSE = 1, 2
FORM_TENSOR, FORM_TUPLE, FORM_NONE = 0, 1, 2
_NO_TENSOR = -1  # dtype code of a None entry in a tuple

# header slots: op, kind, number of key ints, key ints, form, number of tensors, whether
# the bytes follow inline in the same frame (gloo), where the payload is (a gloo slot, or
# SLOT_SHM: in the ring, at the offset and with the produced count after it), then per
# tensor (dtype code, ndim, shape padded to MAX_NDIM)
_H_OP, _H_KIND, _H_NINTS, _H_INTS = 0, 1, 2, 3
_H_FORM = _H_INTS + MAX_KEY_INTS
_H_COUNT = _H_FORM + 1
_H_INLINE = _H_COUNT + 1
_H_SLOT = _H_INLINE + 1
_H_SHM_OFF = _H_SLOT + 1  # shared-memory route: byte offset in the ring
_H_SHM_END = _H_SHM_OFF + 1  # and the ring's produced count once this message is read
_H_TENSORS = _H_SHM_END + 1
_SLOT = 2 + MAX_NDIM
HEADER_LEN = _H_TENSORS + MAX_TENSORS * _SLOT
HEADER_BYTES = HEADER_LEN * 8

# A frame is a header, followed by the payload bytes when they total at most INLINE_BYTES
# (one message instead of 1 + tensors: a small activation costs one wake-up, not a header
# and then a receive that the sender must wait to see posted). Each receiver thread keeps a
# frame-sized receive posted; gloo accepts a message shorter than the receive buffer.
INLINE_BYTES = 128 * 1024
FRAME_BYTES = HEADER_BYTES + INLINE_BYTES

# A larger payload would need a round trip: the receiver learns its size from the frame,
# posts the receive, and gloo's sender waits to see it posted. So each receiver keeps
# receives posted ahead for the byte sizes it saw last ("slots": up to PREPOSTED_SLOTS size
# signatures per source, each at most PREPOSTED_MAX_BYTES); the sender mirrors the same
# rule, and a payload whose sizes match a slot goes straight into the waiting buffers. A
# pipeline sends the same shapes every microbatch (two when the batch splits unevenly), so
# after the first message nearly every one takes this path.
PREPOSTED_SLOTS = 2
PREPOSTED_MAX_BYTES = 32 * 1024**2

# Between ranks that share a host's /dev/shm, a payload of more than SHM_MIN_BYTES is copied
# into a ring in shared memory and only its header goes over the Unix socket (see
# engine/shm.py: a gloo send of that size waits for the receiving process to be scheduled).
# Each direction's ring is made at its first such message: SHM_RING_FACTOR times that
# message, within SHM_RING_BYTES; a message over half the ring follows its header on the
# socket instead.
SHM_MIN_BYTES = 16 * 1024
SHM_RING_FACTOR = 8
SHM_RING_BYTES = (4 * 1024**2, 256 * 1024**2)
SLOT_SHM = -2  # the header's slot field for a payload that is in the ring

TAG_FRAME, TAG_PAYLOAD = 0, 1  # slot j, tensor i: tag _slot_tag(j, i)
_RECEIVE_TIMEOUT = timedelta(days=30)  # receivers idle between steps; see module docstring
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def encode(key: Hashable, payload: Any) -> tuple[list[int], list[torch.Tensor | None]]:
    """The header (as ints) and the tensors of one message, in send order."""
    if not (isinstance(key, tuple) and key and key[0] in KINDS
            and len(key) - 1 <= MAX_KEY_INTS
            and all(isinstance(i, int) for i in key[1:])):
        raise TransportError(
            f"cannot send key {key!r}: keys are (kind, up to {MAX_KEY_INTS} ints) with kind "
            f"in {KINDS}"
        )
    header = [0] * HEADER_LEN
    header[_H_OP] = OP_MESSAGE
    header[_H_KIND] = KINDS.index(key[0])
    header[_H_NINTS] = len(key) - 1
    header[_H_INTS:_H_INTS + len(key) - 1] = key[1:]
    if payload is None:
        form, tensors = FORM_NONE, []
    elif isinstance(payload, torch.Tensor):
        form, tensors = FORM_TENSOR, [payload]
    elif isinstance(payload, tuple):
        form, tensors = FORM_TUPLE, list(payload)
    else:
        raise TransportError(
            f"cannot send {type(payload).__name__} for {key!r}: a payload is a tensor, "
            "a tuple of tensors (entries may be None), or None"
        )
    if len(tensors) > MAX_TENSORS:
        raise TransportError(
            f"cannot send {len(tensors)} tensors for {key!r}: at most {MAX_TENSORS} per message"
        )
    header[_H_FORM] = form
    header[_H_COUNT] = len(tensors)
    for i, t in enumerate(tensors):
        base = _H_TENSORS + i * _SLOT
        if t is None:
            header[base] = _NO_TENSOR
            continue
        if not isinstance(t, torch.Tensor):
            raise TransportError(
                f"cannot send a {type(t).__name__} in the tuple for {key!r}: entries are "
                "tensors or None"
            )
        if t.dtype not in _DTYPE_CODE or t.dim() > MAX_NDIM:
            raise TransportError(
                f"cannot send a {t.dtype} tensor of {t.dim()} dims for {key!r}: dtypes are "
                f"{[str(d) for d in DTYPES]}, at most {MAX_NDIM} dims"
            )
        header[base] = _DTYPE_CODE[t.dtype]
        header[base + 1] = t.dim()
        header[base + 2:base + 2 + t.dim()] = t.shape
    return header, tensors


def decode(header: list[int]) -> tuple[tuple, int, list[tuple[torch.dtype, tuple] | None]]:
    """The key, the payload form and per tensor (dtype, shape) or None."""
    n = header[_H_NINTS]
    key = (KINDS[header[_H_KIND]], *header[_H_INTS:_H_INTS + n])
    metas: list[tuple[torch.dtype, tuple] | None] = []
    for i in range(header[_H_COUNT]):
        base = _H_TENSORS + i * _SLOT
        if header[base] == _NO_TENSOR:
            metas.append(None)
        else:
            ndim = header[base + 1]
            metas.append((DTYPES[header[base]], tuple(header[base + 2:base + 2 + ndim])))
    return key, header[_H_FORM], metas


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous copy-if-needed of ``t`` (same device)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    return math.prod(shape) * dtype.itemsize


def _sizes(metas: list) -> tuple[int, ...]:
    """Byte counts of a message's non-empty tensors, in order (what travels)."""
    return tuple(n for n in (_nbytes(*m) for m in metas if m is not None) if n)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (bind port 0, read it, close): for rank 0's store."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _slot_tag(slot: int, i: int) -> int:
    return 2 + slot * MAX_TENSORS + i


class P2PTransport:
    """Sends keyed tensor messages to peer ranks; delivers arriving ones to a callback.

    ``deliver(key, payload)`` runs on a receiver thread (one per source rank) and must not
    block for long; a mailbox ``put`` is the intended use. ``send`` may be called from any
    thread; messages from one sending thread to one destination arrive in order.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        deliver: Callable[[Hashable, Any], None],
        device: torch.device | str = "cpu",
        *,
        timeout_s: float = 60.0,
        host: str | None = None,
        pool_bytes: int = 256 * 1024**2,
        shared_memory: bool = True,
    ) -> None:
        """Rendezvous with the other ``world_size - 1`` ranks (all must call this at once).

        ``master_addr:master_port`` is where rank 0 opens the TCP store; ``host`` is the
        address this rank's gloo device listens on (default: loopback when the master is on
        loopback, else gloo's resolution of this host's name). ``timeout_s`` bounds the
        rendezvous and every wait for a send to complete. ``pool_bytes``: receive buffers
        each receiver thread keeps for reuse (see :class:`_BufferPool`). ``shared_memory``:
        send payloads over ``SHM_MIN_BYTES`` to peers that share this host's /dev/shm
        through a ring there (:mod:`brigade.engine.shm`); every rank takes part in finding
        out which peers do, whatever it passes here.
        """
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self._timeout = timedelta(seconds=timeout_s)
        self.pool_bytes = pool_bytes
        self._deliver = deliver
        self._closing = False
        self._closed = False
        self._errors: list[str] = []
        self._send_lock = threading.Lock()
        self._slots_out: dict[int, list[tuple[int, ...]]] = {}  # per dest: see _pick_slot
        self._posted: dict[int, list] = {}  # per source: receives posted ahead
        self._rings_out: dict[int, ShmRing] = {}  # per dest, made at its first ring message
        self._rings_in: dict[int, ShmRing] = {}  # per source, mapped at its first
        self._no_ring: set[int] = set()  # local dests /dev/shm could not make a ring for
        self._links_out: dict[int, socket.socket] = {}  # local dests: their frames go here
        self._links_in: dict[int, socket.socket] = {}
        self.peers = [r for r in range(world_size) if r != rank]

        self._store = dist.TCPStore(
            master_addr, master_port, world_size, rank == 0,
            timeout=self._timeout, wait_for_workers=True,
        )
        if host is None and master_addr in _LOOPBACK:
            host = "127.0.0.1"
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host or "")]
        options._timeout = _RECEIVE_TIMEOUT
        self._pg = dist.ProcessGroupGloo(
            dist.PrefixStore("brigade/gloo", self._store), rank, world_size, options
        )
        self._shm_store = dist.PrefixStore("brigade/shm", self._store)
        self._connect_local(shared_memory)
        self._threads = [
            threading.Thread(
                target=self._receive_local if src in self.local_peers else self._receive_gloo,
                args=(src,), daemon=True, name=f"brigade-p2p-recv-{src}-to-{rank}")
            for src in self.peers
        ]
        for t in self._threads:
            t.start()

    # -- sending ----------------------------------------------------------------------------
    def send(self, dest: int, key: Hashable, payload: Any) -> None:
        """Send one message to rank ``dest``; returns once its bytes are handed over.

        Blocking, by measurement: gloo's send writes into the socket from the calling
        thread until the kernel buffer is full anyway, and its ``is_completed()`` stays
        False until someone waits, so a background send would hold its tensors (and the
        receive buffers they came in) until the next wait; handing sends to a sender thread
        made a 2-stage 1F1B step slower (172.9 and 168.8 ms vs 162.7 and 166.4 ms, its
        thread competing with compute). It waits only for the peer's receiver thread (see
        the module docstring); on the same-host route, only while the ring or the socket
        to the peer is full. The payload may be modified once this returns. Raises :class:`TransportError` for a bad payload, a failed send (after
        ``timeout_s``), or a closed transport.
        """
        if self._closing:
            raise TransportError(f"rank {self.rank}: transport is closed; cannot send {key!r}")
        if dest == self.rank or not 0 <= dest < self.world_size:
            raise TransportError(
                f"rank {self.rank}: cannot send {key!r} to rank {dest}; peers are {self.peers}"
            )
        header, tensors = encode(key, payload)
        wires: list[torch.Tensor] = []
        for t in tensors:
            if t is None:
                continue
            if t.device.type != "cpu":
                t = t.detach().cpu()  # stage CUDA tensors through host memory
            if t.numel():
                wires.append(_as_bytes(t))
        sizes = tuple(w.numel() for w in wires)
        with self._send_lock:
            try:
                if dest in self._links_out:
                    self._send_local(dest, header, wires, sizes)
                else:
                    self._send_gloo(dest, header, wires, sizes)
            except Exception as err:  # noqa: BLE001 - e.g. the peer's connection is gone
                raise TransportError(
                    f"rank {self.rank}: sending {key!r} to rank {dest} failed: {err}"
                ) from err

    def _send_gloo(self, dest: int, header: list[int], wires: list[torch.Tensor],
                   sizes: tuple[int, ...]) -> None:
        """A frame (with the bytes when small), then the bytes into a slot or by tag."""
        inline = sum(sizes) <= INLINE_BYTES
        header[_H_INLINE] = int(inline)
        slot = -1 if inline else self._pick_slot(self._slots_out.setdefault(dest, []), sizes)
        header[_H_SLOT] = slot
        head = torch.tensor(header, dtype=torch.int64).view(torch.uint8)
        if inline:
            head, wires = torch.cat([head, *wires]), []
        works = []
        if slot >= 0:  # bytes first: when the frame lands they are in, one wake-up
            works += [self._pg.send([w], dest, _slot_tag(slot, i)) for i, w in enumerate(wires)]
        works.append(self._pg.send([head], dest, TAG_FRAME))
        if slot < 0:
            works += [self._pg.send([w], dest, TAG_PAYLOAD) for w in wires]
        for w in works:
            w.wait(self._timeout)

    def _send_local(self, dest: int, header: list[int], wires: list[torch.Tensor],
                    sizes: tuple[int, ...]) -> None:
        """The header over the peer's socket; the bytes into the ring when over
        ``SHM_MIN_BYTES`` and it fits, else right behind the header on the socket."""
        ring = self._ring_to(dest, sizes) if sum(sizes) > SHM_MIN_BYTES else None
        header[_H_SLOT] = -1  # the receiver reads only this: ring, or bytes on the socket
        if ring is not None:
            offset, end = ring.reserve(sizes, self.timeout_s)  # waits while the reader lags
            ring.write(offset, wires)
            header[_H_SHM_OFF], header[_H_SHM_END] = offset, end
            header[_H_SLOT], wires = SLOT_SHM, []
        send_buffers(self._links_out[dest],
                     [np.asarray(header, dtype=np.int64), *(w.numpy() for w in wires)])

    def _ring_to(self, dest: int, sizes: tuple[int, ...]) -> ShmRing | None:
        """The shared ring for a payload of ``sizes`` to local peer ``dest``, made (and its
        name left in the store for the receiver) at the first; None where the bytes follow
        the header on the socket instead: /dev/shm could not hold a ring (from then on,
        for that peer), or the payload is over half the ring."""
        if dest in self._no_ring:
            return None
        ring = self._rings_out.get(dest)
        if ring is None:
            low, high = SHM_RING_BYTES
            size = min(max(SHM_RING_FACTOR * sum(sizes), low), high)
            try:
                ring = ShmRing.create(size, f"{self.rank}to{dest}")
            except OSError as err:
                self._no_ring.add(dest)
                warnings.warn(f"rank {self.rank}: no shared-memory ring of {size} bytes "
                              f"for rank {dest} ({err}); sending it payloads over its "
                              "socket", stacklevel=4)
                return None
            self._rings_out[dest] = ring
            self._shm_store.set(f"ring/{self.rank}/{dest}", ring.path)
        return ring if ring.fits(sizes) else None

    @property
    def local_peers(self) -> set[int]:
        """The peers reached by the same-host route (a socket each way, rings as needed)."""
        return set(self._links_out)

    def _connect_local(self, enabled: bool) -> None:
        """Find the peers on this host and connect to them: the local route's sockets.

        Each rank leaves a probe file and a listening socket in /dev/shm and says, through
        the store, which peers' probes it can read (same host, same container). Peers that
        read each other's are local: each connects to the other's socket and sends frames
        over it. Every rank runs this at construction, ``enabled`` or not (a disabled rank
        leaves no probe, so it and its peers keep to gloo).
        """
        probe_path = token = sock_path = ""
        listener = None
        if enabled:
            try:
                probe_path, token = shm_probe()
                listener, sock_path = shm_listen()
            except OSError:  # no /dev/shm here: gloo only
                probe_path = token = sock_path = ""
        store = self._shm_store
        try:
            store.set(f"probe/{self.rank}", "\n".join((probe_path, token, sock_path)))
            socks = {}
            for q in self.peers:
                p, t, sp = store.get(f"probe/{q}").decode().split("\n")
                if listener is not None and p and shm_can_read(p, t):
                    socks[q] = sp
            store.set(f"sees/{self.rank}", ",".join(map(str, socks)))
            # a peer writes "sees" after reading every probe: ours may go once all have
            local = {q for q in socks
                     if str(self.rank) in store.get(f"sees/{q}").decode().split(",")}
            for q in sorted(local):  # connect to each (the listener's backlog takes it) ...
                out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                out.settimeout(self.timeout_s)
                out.connect(socks[q])
                out.sendall(np.array([self.rank], dtype=np.int64))
                self._links_out[q] = out
            for _ in local:  # ... then take each one's connection
                listener.settimeout(self.timeout_s)
                conn, _ = listener.accept()
                conn.settimeout(None)  # receivers idle between steps for as long as they like
                src = np.zeros(1, dtype=np.int64)
                recv_exact(conn, src)
                self._links_in[int(src[0])] = conn
        except OSError as err:
            raise TransportError(f"rank {self.rank}: connecting to the peers on this host "
                                 f"failed: {err}") from err
        finally:
            for path in (probe_path, sock_path):
                if path:
                    os.unlink(path)
            if listener is not None:
                listener.close()

    @staticmethod
    def _pick_slot(slots: list[tuple[int, ...]], sizes: tuple[int, ...]) -> int:
        """The slot whose pre-posted receives fit ``sizes`` exactly, else -1 (the payload
        goes by TAG_PAYLOAD), claiming a free slot for ``sizes`` after this message. Sender
        and receiver apply this same rule to the same sequence of messages."""
        if sizes in slots:
            return slots.index(sizes)
        if len(slots) < PREPOSTED_SLOTS and sum(sizes) <= PREPOSTED_MAX_BYTES:
            slots.append(sizes)
        return -1

    def check(self) -> None:
        """Raise if a receiver thread stopped on an error (a peer died, a bad delivery);
        sends are blocking and raise on their own, so this is all there is to report."""
        if self._errors:
            raise TransportError(f"rank {self.rank}: " + "; ".join(self._errors))

    # -- receiving --------------------------------------------------------------------------
    def _receive_gloo(self, src: int) -> None:
        """Receive from ``src`` over gloo: a frame, then its bytes (see the module docstring)."""
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        header = frame[:HEADER_BYTES].view(torch.int64)
        slots: list[tuple[int, ...]] = []  # size signatures, mirrored from the sender
        pool = _BufferPool(self.pool_bytes)
        posted: list[list[tuple[Any, torch.Tensor]]] = []  # per slot: (work, buffer)
        self._posted[src] = posted  # kept referenced until close
        while True:
            try:
                self._pg.recv([frame], src, TAG_FRAME).wait()
                fields = header.tolist()
                if fields[_H_OP] == OP_CLOSE:
                    return
                key, form, metas = decode(fields)
                sizes = _sizes(metas)
                if fields[_H_INLINE]:  # the bytes came in the frame: copy them out
                    bufs, offset = [], HEADER_BYTES
                    for n in sizes:
                        bufs.append(frame[offset:offset + n].clone())
                        offset += n
                else:
                    slot = self._pick_slot(slots, sizes)
                    if slot != fields[_H_SLOT]:
                        raise TransportError(
                            f"slot mismatch for {key!r}: sender {fields[_H_SLOT]}, "
                            f"receiver {slot} (sizes {sizes})"
                        )
                    if slot >= 0:  # the bytes are landing in the receives posted ahead
                        for work, _ in posted[slot]:
                            work.wait()
                        bufs = [buf for _, buf in posted[slot]]
                        posted[slot] = self._post(src, slot, sizes, pool)
                    else:
                        bufs = [pool.get(n) for n in sizes]
                        for buf in bufs:
                            self._pg.recv([buf], src, TAG_PAYLOAD).wait()
                        if len(slots) > len(posted):  # a slot was claimed for these sizes
                            posted.append(self._post(src, len(posted), sizes, pool))
                payload = self._payload(form, metas, bufs)
            except Exception as err:  # noqa: BLE001 - a peer died or the group broke
                self._stopped(src, err)
                return
            self._hand_over(src, key, payload)

    def _receive_local(self, src: int) -> None:
        """Receive from local peer ``src``: a header on its socket, the bytes in its ring
        or right behind the header."""
        sock = self._links_in[src]
        header = np.zeros(HEADER_LEN, dtype=np.int64)
        pool = _BufferPool(self.pool_bytes)
        while True:
            try:
                recv_exact(sock, header)
                fields = header.tolist()
                if fields[_H_OP] == OP_CLOSE:
                    return
                key, form, metas = decode(fields)
                sizes = _sizes(metas)
                if fields[_H_SLOT] == SLOT_SHM:
                    ring = self._rings_in.get(src) or self._attach(src)
                    bufs = ring.read(fields[_H_SHM_OFF], sizes, pool.get)
                    ring.release(fields[_H_SHM_END])
                else:
                    bufs = [pool.get(n) for n in sizes]
                    for buf in bufs:
                        recv_exact(sock, buf.numpy())
                payload = self._payload(form, metas, bufs)
            except Exception as err:  # noqa: BLE001 - the peer died or closed its end
                self._stopped(src, err)
                return
            self._hand_over(src, key, payload)

    def _payload(self, form: int, metas: list, bufs: list[torch.Tensor]) -> Any:
        """The delivered payload: each tensor a typed view of its received bytes."""
        tensors: list[torch.Tensor | None] = []
        it = iter(bufs)
        for meta in metas:
            if meta is None:
                tensors.append(None)
                continue
            dtype, shape = meta
            empty = _nbytes(dtype, shape) == 0
            raw = torch.empty(0, dtype=torch.uint8) if empty else next(it)
            t = raw.view(dtype).reshape(shape)
            tensors.append(t if t.device == self.device else t.to(self.device))
        if form == FORM_TENSOR:
            return tensors[0]
        if form == FORM_TUPLE:
            return tuple(tensors)
        return None

    def _stopped(self, src: int, err: Exception) -> None:
        """A receiver thread ends on an error: record it unless this rank is closing."""
        if not self._closing:
            self._errors.append(f"receiving from rank {src}: {err}")

    def _hand_over(self, src: int, key: Hashable, payload: Any) -> None:
        try:
            self._deliver(key, payload)
        except Exception as err:  # noqa: BLE001 - keep receiving; surfaced by check()
            self._errors.append(f"delivering {key!r} from rank {src}: "
                                f"{type(err).__name__}: {err}")

    def _attach(self, src: int) -> ShmRing:
        """Map the ring ``src`` made for this rank (its name is in the store already)."""
        ring = ShmRing.attach(self._shm_store.get(f"ring/{src}/{self.rank}").decode())
        self._rings_in[src] = ring
        return ring

    def _post(self, src: int, slot: int, sizes: tuple[int, ...],
              pool: "_BufferPool") -> list[tuple[Any, Any]]:
        """Post receives for one message of ``sizes`` from ``src`` in ``slot``."""
        out = []
        for i, n in enumerate(sizes):
            buf = pool.get(n)
            out.append((self._pg.recv([buf], src, _slot_tag(slot, i)), buf))
        return out

    # -- lifetime ---------------------------------------------------------------------------
    def close(self, timeout_s: float = 2.0) -> bool:
        """Tell every peer this rank is done, and join the receiver threads.

        Returns whether every receiver thread ended: a gloo receiver ends once its peer has
        closed too (one still blocked is a daemon and dies with the process); a local
        peer's receiver is ended here if its peer has not closed by then. Never raises.
        """
        if self._closed:
            return True
        self._closing = True
        end = time.monotonic() + timeout_s
        with self._send_lock:
            self._say_close(end)
            for ring in self._rings_out.values():  # no send is writing to a ring now
                ring.close()
            self._rings_out.clear()
            for sock in self._links_out.values():  # our CLOSE is ahead of the end of stream
                sock.close()
        for t in self._threads:
            t.join(max(end - time.monotonic(), 0.0))
        for src, t in zip(self.peers, self._threads):
            if t.is_alive() and src in self._links_in:  # wake it: it ends quietly
                try:
                    self._links_in[src].shutdown(socket.SHUT_RDWR)
                except OSError:  # already disconnected
                    pass
                t.join(1.0)
        self._closed = not any(t.is_alive() for t in self._threads)
        if self._closed:  # no thread uses the groups any more: release sockets and store
            for sock in self._links_in.values():
                sock.close()
            for ring in self._rings_in.values():
                ring.close()
            self._rings_in.clear()
            self._posted.clear()
            self._pg = None
            self._store = self._shm_store = None
        return self._closed

    def _say_close(self, end: float) -> None:
        """Send every peer the CLOSE header (a peer that is gone is skipped)."""
        head = np.zeros(HEADER_LEN, dtype=np.int64)
        head[_H_OP] = OP_CLOSE
        works = []
        for peer in self.peers:
            try:
                if peer in self._links_out:
                    self._links_out[peer].settimeout(max(end - time.monotonic(), 0.01))
                    send_buffers(self._links_out[peer], [head])
                else:
                    works.append(self._pg.send([torch.from_numpy(head).view(torch.uint8)],
                                               peer, TAG_FRAME))
            except Exception:  # noqa: BLE001 - a peer is gone; nothing more to say to it
                pass
        for w in works:
            try:
                w.wait(timedelta(seconds=max(end - time.monotonic(), 0.01)))
            except Exception:  # noqa: BLE001 - as above
                pass

    def alive_threads(self) -> list[str]:
        """Names of receiver threads still running (empty after a clean close)."""
        return [t.name for t in self._threads if t.is_alive()]

    def __enter__(self) -> "P2PTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _BufferPool:
    """Receive buffers of a receiver thread, reused once nothing references them.

    A fresh buffer per message costs a page fault per 4 KB page as the bytes land (about
    as much as the transfer itself at 4 MB, measured). The delivered tensor wraps a numpy
    array (``torch.from_numpy``, as the Ray route delivers), and its storage holds a
    reference to that array for as long as any tensor or view of it lives; so an array whose
    only references are the pool's is free. Only the owning thread takes buffers; other
    threads only drop references, which can make a busy buffer free, never the reverse.
    Up to ``max_bytes`` are kept; beyond, buffers are plain allocations.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.kept = 0
        self._arrays: dict[int, list[np.ndarray]] = {}

    def get(self, nbytes: int) -> torch.Tensor:
        arrays = self._arrays.setdefault(nbytes, [])
        for i in range(len(arrays)):
            if sys.getrefcount(arrays[i]) <= 2:  # the list's reference and the argument's
                return torch.from_numpy(arrays[i])
        array = np.empty(nbytes, dtype=np.uint8)
        if self.kept + nbytes <= self.max_bytes:
            arrays.append(array)
            self.kept += nbytes
        return torch.from_numpy(array)
