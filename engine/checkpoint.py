"""Checkpoints on disk: one folder per save, written under a temporary name and renamed.

Layout of ``DIR/step-00000100/``::

    manifest.json     what was saved: step, run identity (model, options, balance, schedule,
                      method, microbatches), and the SHA-256 and size of every file below
    stage-0.pt ...    per stage: module state, optimizer state, method state (e.g. the
                      synthetic-gradient module), the stage process's RNG state
    driver.pt         the driver's state: data-loader position, RNG state, losses so far

``DIR/latest`` names the newest complete folder. A folder appears under its final name only
after every file in it is written and fsynced, and ``latest`` is replaced atomically, so a
crash never leaves a half-written checkpoint where a reader would look. Loading verifies
every checksum and reads tensors with ``torch.load(weights_only=True)``; a checkpoint of a
different run (other model, other split) is refused with what differs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineConfigError

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "read_manifest"]

FORMAT = 1


class CheckpointError(PipelineConfigError):
    """A checkpoint that cannot be used: missing, corrupt, or from another run."""


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    step: int
    identity: dict[str, Any]  # must match the resuming run's
    stages: dict[int, dict[str, Any]]  # stage index -> its state
    driver: dict[str, Any]
    path: Path | None = None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write(folder: Path, name: str, data: bytes) -> dict[str, Any]:
    with open(folder / name, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": _digest(data), "bytes": len(data)}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` under ``root`` atomically; keep the newest ``keep`` folders."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{ckpt.step:08d}"
    tmp = root / f".tmp-step-{ckpt.step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {f"stage-{s}.pt": _write(tmp, f"stage-{s}.pt", _to_bytes(state))
             for s, state in sorted(ckpt.stages.items())}
    files["driver.pt"] = _write(tmp, "driver.pt", _to_bytes(ckpt.driver))
    manifest = {"format": FORMAT, "step": ckpt.step, "identity": ckpt.identity,
                "stages": sorted(ckpt.stages), "files": files}
    _write(tmp, "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point_latest(root, final.name)
    _prune(root, keep)
    return final


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f".latest-{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def _prune(root: Path, keep: int) -> None:
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in folders[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (None if there is none)."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if folder.is_dir():
            return folder
    folders = sorted(p for p in root.glob("step-*") if (p / "manifest.json").is_file())
    return folders[-1] if folders else None


def load_checkpoint(path: str | Path, identity: dict[str, Any] | None = None) -> Checkpoint:
    """Read and verify a checkpoint folder (or the latest one under a root folder).

    Raises :class:`CheckpointError` naming the file and the problem when a file is missing
    or its checksum differs, or when ``identity`` (the resuming run's) does not match.
    """
    path = Path(path)
    if not (path / "manifest.json").is_file():
        found = latest_checkpoint(path) if path.is_dir() else None
        if found is None:
            raise CheckpointError(f"no checkpoint in {str(path)!r}: expected a folder with a "
                                  "manifest.json, or a folder of step-* checkpoints")
        path = found
    manifest = _read_manifest(path)
    if identity is not None:
        _check_identity(path, manifest["identity"], identity)
    stages = {s: _load_file(path, f"stage-{s}.pt", manifest) for s in manifest["stages"]}
    driver = _load_file(path, "driver.pt", manifest)
    return Checkpoint(manifest["step"], manifest["identity"], stages, driver, path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A checkpoint folder's manifest (step, identity, files), without loading its tensors:
    what a run checks before it starts anything."""
    return _read_manifest(Path(path))


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'manifest.json'}: unreadable manifest ({err}); "
                              "the checkpoint is corrupt, resume from an older one") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')!r}, this "
                              f"brigade reads format {FORMAT}")
    return manifest


def _load_file(path: Path, name: str, manifest: dict[str, Any]) -> Any:
    expected = manifest["files"].get(name)
    file = path / name
    if expected is None or not file.is_file():
        raise CheckpointError(f"{file}: missing from the checkpoint; resume from an older one")
    data = file.read_bytes()
    if len(data) != expected["bytes"] or _digest(data) != expected["sha256"]:
        raise CheckpointError(
            f"{file}: checksum mismatch ({len(data)} bytes, manifest says "
            f"{expected['bytes']}); the file is corrupt, resume from an older checkpoint"
        )
    return torch.load(io.BytesIO(data), weights_only=True)


def _check_identity(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"{path} is from another run ({'; '.join(diffs)}); resume "
                              "with the same model, split, schedule and method, or start fresh")
