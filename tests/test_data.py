"""Data sets: loaders on small files written in the real formats, corrupt files, batching."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from brigade.stages.data import Batches, Dataset, batches, dataset_names, dataset_spec, load_dataset
from brigade.stages.errors import ConfigError

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


# ---------------------------------------------------------------- writers of the real formats


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX file contents: magic 0x0000080N (unsigned bytes, N dims), big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train=6, n_test=3, gz=True, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, (n,), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def write_cifar(folder: Path, per_batch=3, protocol=2, seed=0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python batches as the originals hold them: dicts with bytes keys."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"x.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[name] = (data, labels)
    return out


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    "like, shape, classes", [("mnist", (1, 28, 28), 10), ("cifar10", (3, 32, 32), 10), ("digits", (1, 8, 8), 10)]
)
def test_synthetic_is_shaped_like(like, shape, classes):
    ds = load_dataset("synthetic", like=like, size=20)
    assert ds.shape == shape and ds.num_classes == classes and len(ds) == 20
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert dataset_spec("synthetic", like=like) == (shape, classes)


def test_synthetic_imagenet_spec_and_explicit_shape():
    assert dataset_spec("synthetic", like="imagenet") == ((3, 224, 224), 1000)
    ds = load_dataset("synthetic", shape=(2, 5, 7), num_classes=3, size=9)
    assert ds.x.shape == (9, 2, 5, 7) and int(ds.y.max()) <= 2


def test_synthetic_is_deterministic_and_splits_differ():
    a = load_dataset("synthetic", like="digits", size=50, seed=3)
    b = load_dataset("synthetic", like="digits", size=50, seed=3)
    c = load_dataset("synthetic", like="digits", split="test", size=50, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


def test_synthetic_labels_are_learnable():
    """A nearest-class-mean classifier fit on train does far better than chance on test."""
    train = load_dataset("synthetic", like="mnist", size=500)
    test = load_dataset("synthetic", like="mnist", split="test", size=200)
    means = torch.stack([train.x[train.y == k].mean(0) for k in range(10)]).flatten(1)
    pred = torch.cdist(test.x.flatten(1), means).argmin(1)
    assert (pred == test.y).float().mean() > 0.9
    assert abs(float(train.x.mean())) < 0.1 and abs(float(train.x.std()) - 1) < 0.1


def test_synthetic_option_errors():
    with pytest.raises(ConfigError, match="mnist, cifar10, imagenet"):
        load_dataset("synthetic", like="svhn")
    with pytest.raises(ConfigError, match="size"):
        load_dataset("synthetic", size=0)
    with pytest.raises(ConfigError, match="does not take colour"):
        load_dataset("synthetic", colour=True)
    with pytest.raises(ConfigError, match="shape"):
        load_dataset("synthetic", shape=(28, 28))


# ---------------------------------------------------------------- mnist


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("MNIST", tmp_path, split=split)
        images = arrays[f"{prefix}-images-idx3-ubyte"]
        assert ds.shape == (1, 28, 28) and len(ds) == len(images)
        assert torch.equal(ds.y, torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte"].astype(np.int64)))
        expected = (torch.from_numpy(images).float() / 255 - 0.1307) / 0.3081
        torch.testing.assert_close(ds.x[:, 0], expected)


def test_mnist_dotted_file_names(tmp_path):
    arrays = write_mnist(tmp_path, gz=False)
    for name in arrays:
        dotted = name.replace("-idx", ".idx")
        (tmp_path / name).rename(tmp_path / dotted)
    assert len(load_dataset("mnist", tmp_path)) == 6


def corrupt(folder: Path, name: str, data: bytes) -> None:
    (folder / f"{name}.gz").write_bytes(data)


@pytest.mark.parametrize(
    "make_bad, words",
    [
        (lambda d: corrupt(d, "train-images-idx3-ubyte", gzip.compress(idx_bytes(np.zeros((6, 28, 28)))[:-10])),
         ["train-images-idx3-ubyte.gz", "truncated", "6x28x28"]),
        (lambda d: corrupt(d, "train-images-idx3-ubyte", gzip.compress(idx_bytes(np.zeros((6,))))),
         ["train-images-idx3-ubyte.gz", "magic", "0x00000801", "0x00000803"]),
        (lambda d: corrupt(d, "train-labels-idx1-ubyte", gzip.compress(idx_bytes(np.zeros((5,))))),
         ["6 images", "5 labels"]),
        (lambda d: corrupt(d, "train-labels-idx1-ubyte", gzip.compress(idx_bytes(np.full((6,), 12)))),
         ["train-labels-idx1-ubyte.gz", "12", "0..9"]),
        (lambda d: corrupt(d, "train-images-idx3-ubyte", gzip.compress(idx_bytes(np.zeros((6, 28, 28))))[:40]),
         ["train-images-idx3-ubyte.gz", "gzip"]),
        (lambda d: corrupt(d, "train-images-idx3-ubyte", b"\x1f\x8b" + b"garbage" * 10),
         ["train-images-idx3-ubyte.gz", "gzip"]),
        (lambda d: corrupt(d, "train-images-idx3-ubyte", gzip.compress(b"\x00\x00")),
         ["train-images-idx3-ubyte.gz", "too short"]),
        (lambda d: (d / "train-labels-idx1-ubyte.gz").unlink(),
         ["train-labels-idx1-ubyte", "no label file"]),
    ],
)
def test_mnist_rejects_bad_files(tmp_path, make_bad, words):
    write_mnist(tmp_path)
    make_bad(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_dataset("mnist", tmp_path)
    for word in words:
        assert word in str(err.value)


def test_mnist_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(ConfigError, match="needs data_dir"):
        load_dataset("mnist")


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST subset not found at {MNIST_DIR}")
def test_real_mnist_subset():
    train, test = load_dataset("mnist", MNIST_DIR), load_dataset("mnist", MNIST_DIR, split="test")
    assert (len(train), len(test)) == (7000, 1000)
    assert train.shape == (1, 28, 28) and set(train.y.tolist()) == set(range(10))
    assert abs(float(train.x.mean())) < 0.1 and abs(float(train.x.std()) - 1) < 0.1


# ---------------------------------------------------------------- cifar10


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("subfolder", [False, True])
def test_cifar10_reads_python_batches(tmp_path, protocol, subfolder):
    folder = tmp_path / "cifar-10-batches-py" if subfolder else tmp_path
    written = write_cifar(folder, protocol=protocol)
    train = load_dataset("cifar10", tmp_path)
    test = load_dataset("cifar10", tmp_path, split="test")
    assert (len(train), len(test)) == (15, 3) and train.shape == (3, 32, 32)
    data, labels = written["test_batch"]
    assert test.y.tolist() == labels
    pixel = (data[0, 32 * 32] / 255 - 0.4822) / 0.2435  # channel 1 (green), row 0, column 0
    assert float(test.x[0, 1, 0, 0]) == pytest.approx(pixel, rel=1e-5)
    assert dataset_spec("cifar10", data_dir=tmp_path) == ((3, 32, 32), 10)


class Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/brigade_evil_pickle_ran"),))


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"not a pickle", ["data_batch_2", "not a readable"]),
        (None, ["data_batch_2", "not a readable"]),  # truncated
        (pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}),
         ["data_batch_2", "(3, 100)", "(N, 3072)"]),
        (pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}),
         ["data_batch_2", "3 images", "2 labels"]),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
         ["data_batch_2", "0..9"]),
        (pickle.dumps([1, 2]), ["data_batch_2", "b'data'"]),
        (pickle.dumps({b"data": Evil(), b"labels": []}), ["data_batch_2", "refusing"]),
    ],
)
def test_cifar10_rejects_bad_batches(tmp_path, payload, words):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500] if payload is None else payload)
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar10", tmp_path)
    for word in words:
        assert word in str(err.value)
    assert not Path("/tmp/brigade_evil_pickle_ran").exists()


def test_cifar10_missing_batch(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(ConfigError, match="missing .*data_batch_4"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- digits, registry, Dataset


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed (brigade[digits])")
def test_digits():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert train.shape == (1, 8, 8) and len(train) + len(test) == 1797


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is not None, reason="scikit-learn is installed")
def test_digits_without_sklearn_says_how_to_install():
    with pytest.raises(ConfigError, match=r"pip install 'brigade\[digits\]'"):
        load_dataset("digits")


def test_digits_loader_with_a_stand_in_sklearn(monkeypatch):
    """The digits path itself, run where scikit-learn is absent via a stand-in module."""
    import sys
    import types

    rng = np.random.default_rng(0)
    fake = types.ModuleType("sklearn.datasets")
    images = rng.integers(0, 17, (100, 8, 8)).astype(np.float64)
    images[:, 0, 0] = np.arange(100)  # tags each image so the split can be checked
    fake.load_digits = lambda: types.SimpleNamespace(images=images, target=np.arange(100) % 10)
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", fake)
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (80, 20) and train.shape == (1, 8, 8)
    tags = [set(ds.x[:, 0, 0, 0].tolist()) for ds in (train, test)]
    assert len(tags[0]) == 80 and len(tags[1]) == 20 and not tags[0] & tags[1]


def test_registry_errors():
    assert dataset_names() == ["synthetic", "mnist", "cifar10", "digits"]
    with pytest.raises(ConfigError, match="unknown data set 'svhn'; valid: synthetic, mnist, cifar10, digits"):
        load_dataset("svhn")
    with pytest.raises(ConfigError, match="train, test"):
        load_dataset("synthetic", split="valid")
    with pytest.raises(ConfigError, match="takes no options"):
        load_dataset("mnist", "/tmp", size=3)


def test_dataset_checks():
    x = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ConfigError, match="3 images but 2 labels"):
        Dataset("d", x, torch.zeros(2, dtype=torch.int64), 2)
    with pytest.raises(ConfigError, match="int64"):
        Dataset("d", x, torch.zeros(3, dtype=torch.int32), 2)
    with pytest.raises(ConfigError, match="expected 0..1"):
        Dataset("d", x, torch.tensor([0, 1, 2]), 2)


# ---------------------------------------------------------------- batches


def tiny(n=10) -> Dataset:
    return Dataset("t", torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 3, 3)


def epoch_ids(loader) -> list[list[int]]:
    return [y.view(-1).long().tolist() for y in (x for x, _ in loader)]


def test_batches_cover_each_sample_once_and_are_deterministic():
    ds = tiny()
    loader = batches(ds, 4, shuffle=True, seed=1)
    assert len(loader) == 3
    first = [x.view(-1).tolist() for x, _ in loader]
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(10))
    second = [x.view(-1).tolist() for x, _ in loader]
    assert first != second, "each epoch has its own order"
    again = batches(ds, 4, shuffle=True, seed=1)
    assert [x.view(-1).tolist() for x, _ in again] == first
    assert [x.view(-1).tolist() for x, _ in batches(ds, 4, shuffle=False)][0] == [0, 1, 2, 3]


def test_batches_drop_last_and_labels_follow_images():
    loader = batches(tiny(), 4, seed=2, drop_last=True)
    out = list(loader)
    assert len(loader) == len(out) == 2
    for x, y in out:
        assert torch.equal(x.view(-1).long() % 3, y)
    with pytest.raises(ConfigError, match="batch_size 20 is larger than the 10 samples"):
        batches(tiny(), 20, drop_last=True)
    with pytest.raises(ConfigError, match="positive"):
        batches(tiny(), 0)


def test_batches_resume_from_position():
    ds = tiny()
    loader = batches(ds, 3, seed=5)
    full = [x.view(-1).tolist() for x, _ in loader] + [x.view(-1).tolist() for x, _ in loader]
    loader = batches(ds, 3, seed=5)
    seen = []
    for x, _ in loader:
        seen.append(x.view(-1).tolist())
        if len(seen) == 2:
            break
    assert loader.position == (0, 2)
    state = loader.state_dict()
    resumed = Batches(ds, 3, seed=5)
    resumed.load_state_dict(state)
    rest = [x.view(-1).tolist() for x, _ in resumed]
    assert resumed.position == (1, 0), "after the last batch the position is the next epoch"
    rest += [x.view(-1).tolist() for x, _ in resumed]
    assert seen + rest == full
    with pytest.raises(ConfigError, match="0..4"):
        resumed.load_state_dict({"epoch": 0, "index": 9})
