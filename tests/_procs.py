"""Process helpers for tests that check that what they started has stopped (Linux /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["gone", "wait_gone", "descendants", "with_cmdline", "holding_files", "run_session",
           "shm_files"]


def shm_files() -> set[str]:
    """brigade's files in /dev/shm now (probes, sockets, rings): a test compares the set
    before and after to see that nothing was left behind."""
    from brigade.engine.shm import SHM_DIR

    if not os.path.isdir(SHM_DIR):
        return set()
    return {f for f in os.listdir(SHM_DIR) if f.startswith("brigade-")}


def gone(pid: int) -> bool:
    """Whether process ``pid`` no longer exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pids, seconds: float = 15.0) -> bool:
    """Poll until every pid is gone or ``seconds`` pass; True when all are gone."""
    deadline = time.monotonic() + seconds
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return all(gone(p) for p in pids)


def _ppid(entry: Path) -> int | None:
    try:
        return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid``, depth first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (ppid := _ppid(entry)) is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def with_cmdline(marker: str, pids=None) -> list[int]:
    """Processes (among ``pids``, default all) whose command line contains ``marker``."""
    if pids is None:
        pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    found = []
    for p in pids:
        try:
            if marker in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="ignore"):
                found.append(p)
        except OSError:
            pass
    return found


def holding_files(prefix: str) -> list[int]:
    """Processes with a file open below ``prefix`` (a path): Ray's agents rename their
    command line (``ray::DashboardAgent``), so :func:`with_cmdline` does not see them, but
    they keep their node's log files open."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd).startswith(prefix) for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def run_session(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` that leaves nothing behind on a timeout: the command and every
    process below it (torchrun starts each rank in a session of its own, so one process
    group is not enough) get SIGTERM, then SIGKILL, before ``TimeoutExpired`` is raised."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [proc.pid, *descendants(proc.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=5.0)  # reaps our child (a zombie would look alive)
            except subprocess.TimeoutExpired:
                continue
            if wait_gone(tree[1:], 5.0):
                break
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
