"""The shared-memory ring and the socket helpers of the same-host route (engine/shm.py),
in one process: a ring's writer and reader are two mappings of one file, as they are in two
processes."""

from __future__ import annotations

import os
import socket
import threading

import pytest
import torch

from brigade.engine.shm import (SHM_DIR, ShmRing, ShmRingFull, can_read, listen, probe,
                                recv_exact, send_buffers)

from _procs import shm_files

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"no {SHM_DIR} here")


def _pair(size: int) -> tuple[ShmRing, ShmRing]:
    writer = ShmRing.create(size, "test")
    return writer, ShmRing.attach(writer.path)


def _message(i: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in sizes]


def test_messages_cross_in_order_through_many_wrap_arounds():
    before = shm_files()
    writer, reader = _pair(4096)
    assert writer.path not in [os.path.join(SHM_DIR, f) for f in shm_files()]  # unlinked
    shapes = [(100,), (1000, 7), (2000,), (1,), (999, 1000), (64,)]  # none over half the ring
    for i in range(60):
        sizes = shapes[i % len(shapes)]
        assert writer.fits(sizes)
        offset, end = writer.reserve(sizes, timeout_s=1.0)
        assert offset + sum(-(-n // 64) * 64 for n in sizes) <= writer.size  # never wraps
        writer.write(offset, _message(i, sizes))
        got = reader.read(offset, sizes, lambda n: torch.empty(n, dtype=torch.uint8))
        assert all(torch.equal(a, b) for a, b in zip(got, _message(i, sizes))), i
        reader.release(end)
    writer.close()
    reader.close()
    assert shm_files() == before


def test_a_full_ring_waits_for_the_reader_then_times_out_with_numbers():
    writer, reader = _pair(4096)
    try:
        first = writer.reserve((2048,), timeout_s=1.0)
        writer.reserve((2048,), timeout_s=1.0)
        with pytest.raises(ShmRingFull, match="released 0 of 4096 bytes"):
            writer.reserve((64,), timeout_s=0.2)
        # the reader frees the first message from another thread while the writer waits
        timer = threading.Timer(0.1, reader.release, args=(first[1],))
        timer.start()
        offset, _ = writer.reserve((2048,), timeout_s=5.0)
        timer.join()
        assert offset == 0
        assert not writer.fits((2049, 64))  # over half the ring: the socket carries it
    finally:
        writer.close()
        reader.close()


def test_probe_is_readable_here_and_not_with_another_token():
    path, token = probe()
    try:
        assert can_read(path, token)
        assert not can_read(path, token[::-1])
        assert not can_read(path + "-missing", token)
    finally:
        os.unlink(path)


def test_socket_helpers_carry_several_buffers_and_report_a_closed_peer():
    server, path = listen()
    try:
        out = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        out.connect(path)
        conn, _ = server.accept()
        big = torch.arange(300_000, dtype=torch.int64)  # more than the socket buffer holds
        header = torch.tensor([7, 8, 9], dtype=torch.int64)
        sender = threading.Thread(target=send_buffers,
                                  args=(out, [header.numpy(), big.numpy(), bytes(0)]))
        sender.start()
        got_header, got_big = torch.empty(3, dtype=torch.int64), torch.empty_like(big)
        recv_exact(conn, got_header.numpy())
        recv_exact(conn, got_big.numpy())
        sender.join()
        assert torch.equal(got_header, header) and torch.equal(got_big, big)
        out.close()
        with pytest.raises(ConnectionError, match="closed by peer"):
            recv_exact(conn, got_header.numpy())
        conn.close()
    finally:
        server.close()
        os.unlink(path)


def test_both_ends_map_every_page_up_front():
    """The first pass through a fresh ring takes no page faults on either end (MAP_POPULATE):
    without it, the writer faults once per 4 KB page (1024 for this 4 MB ring) and the reader
    about once per 64 KB; 1091-1114 in all, measured twice, with the flag removed."""
    import resource

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    payload = torch.ones(2 * 1024**2, dtype=torch.uint8)  # half the ring: one message
    out = torch.zeros_like(payload)  # touched now: its own first-touch faults are not counted
    writer = ShmRing.create(4 * 1024**2, "faults")
    reader = ShmRing.attach(writer.path)
    try:
        before = faults()
        for _ in range(2):  # the whole ring, written and read once
            offset, end = writer.reserve((payload.numel(),), timeout_s=5)
            writer.write(offset, [payload])
            reader.read(offset, (payload.numel(),), lambda n: out)
            reader.release(end)
        assert faults() - before < 100, faults() - before
        assert torch.equal(out, payload)
    finally:
        reader.close()
        writer.close()
