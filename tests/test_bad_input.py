"""Bad input everywhere a user gives it: one line naming the value and the fix, exit 2.

A table of command lines across commands (train, schedule, report, models) and of bad data
folders and checkpoints. Each row asserts the exit status, that the message is one line,
and a fragment of it that names the offending value or the way out.
"""

from __future__ import annotations

import gzip
import struct

import pytest

from brigade.engine.cli import main

TRAIN = ["train", "--model", "mlp", "--width", "16", "--data", "synthetic", "--backend",
         "local", "--steps", "1", "--quiet"]

CASES = [
    # brigade train
    (TRAIN + ["--window", "0"], "--window 0 must be >= 1"),
    (TRAIN + ["--checkpoint-every", "5"], "need --checkpoint DIR"),
    (TRAIN + ["--resume"], "need --checkpoint DIR"),
    (TRAIN + ["--max-restarts", "-1"], "--max-restarts -1 must be >= 0"),
    (TRAIN + ["--steps", "0"], "--steps 0 must be >= 1"),
    (TRAIN + ["--virtual", "2"], "virtual=2 needs schedule='interleaved'"),
    (TRAIN + ["--schedule", "interleaved", "--virtual", "2", "--balance", "1,1,1"],
     "not a multiple of virtual=2"),
    (TRAIN + ["--accumulate", "2"], "--accumulate applies to --method petra"),
    (TRAIN + ["--method", "petra", "--schedule", "1f1b"], "valid schedules for petra: petra"),
    (TRAIN + ["--model", "revnet18", "--width", "7"], "width must be even"),
    (TRAIN + ["--batch-size", "2", "--microbatches", "4"], "smaller than --microbatches 4"),
    (TRAIN + ["--method", "fwdgrad", "--optimizer", "adamw"],
     "--optimizer adamw is not a forward-gradient optimizer"),
    (TRAIN + ["--cpus-per-stage", "-1"], "--cpus-per-stage -1 must be >= 0"),
    (TRAIN + ["--gpus-per-stage", "-0.5"], "--gpus-per-stage -0.5 must be >= 0"),
    (TRAIN + ["--placement", "ring"],
     "unknown placement 'ring'; valid placements: pack, spread, strict_pack, strict_spread"),
    (TRAIN + ["--placement-timeout", "0"], "--placement-timeout 0 must be a positive number"),
    # brigade schedule
    (["schedule", "show", "--schedule", "1f1b", "--stages", "4", "--microbatches", "2"],
     "use m >= 4, or 'gpipe' for m=2"),
    (["schedule", "show", "--schedule", "nope", "--stages", "4", "--microbatches", "8"],
     "unknown schedule 'nope'; valid names: gpipe, 1f1b"),
    (["schedule", "show", "--schedule", "interleaved", "--stages", "4", "--microbatches",
      "8", "--virtual", "1"], "interleaved needs virtual >= 2"),
    (["schedule", "show", "--schedule", "gpipe", "--stages", "0", "--microbatches", "8"],
     "stages must be a positive integer, got 0"),
    (["schedule", "compare", "--schedules", "gpipe,1f1b", "--stages", "2", "--microbatches",
      "4", "--costs", "f=x"], "cannot read f='x'"),
    (["schedule", "compare", "--schedules", "gpipe", "--stages", "2", "--microbatches", "4",
      "--plot", "out.txt"], "use a file name ending in .png, .svg or .pdf"),
    # brigade models
    (["models", "--data", "foo"], "unknown data set 'foo'; valid: synthetic, mnist"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_command_lines(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1, err


# Rows that reach the Ray cluster (the session's shared one: 4 CPUs, no GPU) and are
# refused before any stage actor starts.
RAY_TRAIN = TRAIN[:7] + ["--backend", "ray", "--steps", "1", "--quiet"]
RAY_CASES = [
    (RAY_TRAIN + ["--gpus-per-stage", "1"],
     "2 stages x 1 GPU need 2 GPUs; the cluster has 0; pass --gpus-per-stage 0"),
    (RAY_TRAIN + ["--stages", "3", "--cpus-per-stage", "2", "--placement-timeout", "1"],
     "cannot place 3 stages x {2 CPU, 0 GPU} (placement pack): the cluster has 4 CPU"),
    (RAY_TRAIN + ["--placement", "strict_spread", "--cpus-per-stage", "1"],
     "1 node(s) can take one stage each (strict_spread)"),
]


@pytest.mark.ray
@pytest.mark.parametrize("argv,message", RAY_CASES, ids=["gpu-where-none", "too-many-stages", "strict-spread-one-node"])
def test_bad_resource_requests(ray_cluster, argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1, err


def _idx_images(n: int, rows: int = 28) -> bytes:
    return struct.pack(">IIII", 0x803, n, rows, rows) + bytes(n * rows * rows)


def _idx_labels(n: int) -> bytes:
    return struct.pack(">II", 0x801, n) + bytes(n)


def _mnist_folder(tmp_path, images: bytes, labels: bytes):
    for split in ("train", "t10k"):
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (tmp_path / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    return tmp_path


@pytest.mark.parametrize("make,message", [
    (lambda p: _mnist_folder(p, _idx_images(4)[:-100], _idx_labels(4)),
     "truncated: header says 4x28x28"),
    (lambda p: _mnist_folder(p, _idx_labels(4), _idx_labels(4)), "wrong magic number 0x00000801"),
    (lambda p: _mnist_folder(p, _idx_images(4), _idx_labels(5)), "holds 4 images but"),
    (lambda p: p / "missing", "missing"),
], ids=["truncated", "wrong-magic", "count-mismatch", "no-folder"])
def test_bad_data_folders(tmp_path, make, message, capsys):
    folder = make(tmp_path)
    argv = TRAIN[:5] + ["--data", "mnist", "--data-dir", str(folder), "--backend", "local",
                        "--steps", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_bad_checkpoint_folder(tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "step-00000003").mkdir()
    (ck / "step-00000003" / "manifest.json").write_text("{broken")
    assert main(TRAIN + ["--checkpoint", str(ck), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unreadable manifest" in err and len(err.splitlines()) == 1, err
