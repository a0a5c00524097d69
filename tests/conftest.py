"""Shared fixtures: one local Ray cluster per test session, the MNIST folder, small threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (``ray.init`` costs seconds).

    Four logical CPUs on a 2-core machine, so 3- and 4-stage pipelines fit; every test that
    starts actors kills them, and the cluster is shut down at the end of the session.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # Workers import the test modules (models and optimizers defined in them).
        tests = str(Path(__file__).resolve().parent)
        # address="local": a private cluster even where `ray start --head` runs here too.
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": tests}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST digits shipped beside the project (skip with the reason if absent)."""
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {MNIST_DIR} (the ../shared/data/mnist folder)")
    return MNIST_DIR


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run on 2 shared cores: one torch thread keeps timings and runs predictable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
