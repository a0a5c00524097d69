"""Data sets as tensors in memory, read from a folder the user names or made up; no downloads.

``load_dataset(name, data_dir, split, **kw) -> Dataset`` with names (case-insensitive):

- ``synthetic``: images shaped like a real data set (``like="mnist" | "cifar10" |
  "imagenet" | "digits"``) or any ``shape=(C, H, W)``; ``num_classes``, ``size``, ``seed``,
  ``noise``. Each class has a smooth random template; a sample is its class template plus
  Gaussian noise, so labels are learnable and a training run shows falling loss. Train and
  test splits share templates (same ``seed``) and draw different samples.
- ``mnist``: a folder of IDX files, gzipped or raw (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-...``).
- ``cifar10``: a folder of the python batches (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``), or its ``cifar-10-batches-py`` subfolder. The pickles are read with an
  unpickler that only admits numpy arrays, so a crafted file cannot run code.
- ``digits``: scikit-learn's bundled 8x8 digits (optional extra ``brigade[digits]``).

A missing folder or file, a truncated or corrupt file, a wrong magic number or mismatched
image and label counts raise ``ConfigError`` naming the file and what was expected.
Images come out float32 (N, C, H, W), normalised; labels int64.

``batches(ds, batch_size, shuffle, seed)`` iterates minibatches deterministically and can
resume from a saved position (epoch, index).
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, choose

__all__ = [
    "Dataset",
    "load_dataset",
    "dataset_spec",
    "dataset_names",
    "Batches",
    "batches",
    "read_idx",
    "SPLITS",
]

SPLITS = ("train", "test")

# (shape, classes) of the data sets synthetic data can imitate.
_LIKE: dict[str, tuple[tuple[int, int, int], int]] = {
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "imagenet": ((3, 224, 224), 1000),
    "digits": ((1, 8, 8), 10),
}
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """A whole split in memory: images ``x`` (N, C, H, W) float32, labels ``y`` (N,) int64."""

    name: str
    x: Tensor
    y: Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise ConfigError(f"{self.name}: x must be float32 (N, C, H, W); got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.dtype != torch.int64:
            raise ConfigError(f"{self.name}: y must be int64 (N,); got {self.y.dtype} {tuple(self.y.shape)}")
        if len(self.x) != len(self.y):
            raise ConfigError(f"{self.name}: {len(self.x)} images but {len(self.y)} labels; they must match")
        if self.num_classes < 1:
            raise ConfigError(f"{self.name}: num_classes must be positive; got {self.num_classes}")
        if len(self.y) and not (0 <= int(self.y.min()) and int(self.y.max()) < self.num_classes):
            raise ConfigError(
                f"{self.name}: labels span {int(self.y.min())}..{int(self.y.max())}, "
                f"expected 0..{self.num_classes - 1}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image, (C, H, W): what a model for this data set is built for."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int) -> "Dataset":
        """The first ``n`` samples (a view): for quick runs and tests."""
        return Dataset(self.name, self.x[:n], self.y[:n], self.num_classes)


# ---------------------------------------------------------------- synthetic


def _synthetic_spec(like: str = "mnist", shape=None, num_classes=None) -> tuple[tuple[int, int, int], int]:
    """Shape and classes of a synthetic set: those of ``like`` unless given explicitly."""
    base_shape, base_classes = _LIKE[choose("data set to imitate", like, _LIKE)]
    shape = tuple(base_shape if shape is None else shape)
    num_classes = base_classes if num_classes is None else num_classes
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ConfigError(f"synthetic: shape must be three positive ints (C, H, W); got {shape!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"synthetic: num_classes must be an integer >= 2; got {num_classes!r}")
    return shape, num_classes


def _synthetic(split: str, like: str = "mnist", shape=None, num_classes=None,
               size: int | None = None, seed: int = 0, noise: float = 1.0) -> Dataset:
    """Class templates (smooth, seeded by ``seed``) plus noise; see the module docstring."""
    shape, num_classes = _synthetic_spec(like, shape, num_classes)
    c, h, w = shape
    if size is None:
        per_sample = c * h * w
        size = (2048 if split == "train" else 512) if per_sample <= 4096 else (256 if split == "train" else 64)
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"synthetic: size must be a positive integer; got {size!r}")
    if noise < 0:
        raise ConfigError(f"synthetic: noise must be >= 0; got {noise}")
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, c, math.ceil(h / 4), math.ceil(w / 4), generator=gen)
    gen = torch.Generator().manual_seed(seed * 2 + (1 if split == "train" else 2) + 7919)
    y = torch.arange(size) % num_classes
    y = y[torch.randperm(size, generator=gen)]
    t = torch.nn.functional.interpolate(coarse[y], size=(h, w), mode="bilinear", align_corners=False)
    t = (t - t.mean(dim=(1, 2, 3), keepdim=True)) / t.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    x = (t + noise * torch.randn(t.shape, generator=gen)) / math.sqrt(1 + noise**2)
    return Dataset("synthetic", x.float().contiguous(), y.long(), num_classes)


# ---------------------------------------------------------------- files


def _folder(name: str, data_dir, expected: str) -> Path:
    """The data folder, or an error saying what it should hold."""
    if data_dir is None:
        raise ConfigError(f"{name} needs data_dir: a folder with {expected} (nothing is downloaded)")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{name}: data folder {str(path)!r} does not exist; expected a folder with {expected}")
    return path


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped if they start with the gzip magic; errors name the file."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ConfigError(f"{path}: corrupt or truncated gzip file ({err}); expected a complete .gz") from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (MNIST's format).

    Checks the magic number (0x0000080N: ubyte, N dims) and that the data length matches
    the dimensions in the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    magic = 0x800 + ndim
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise ConfigError(f"{path}: {len(data)} bytes, too short for an IDX header; expected magic 0x{magic:08X}")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ConfigError(
            f"{path}: wrong magic number 0x{found:08X}; expected 0x{magic:08X} "
            f"(IDX unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    if len(data) < header:
        raise ConfigError(f"{path}: truncated header ({len(data)} bytes); expected {header}")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    count = math.prod(dims)
    if len(data) - header != count:
        raise ConfigError(
            f"{path}: {'truncated' if len(data) - header < count else 'too long'}: header says "
            f"{'x'.join(map(str, dims))} = {count} bytes of data, file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, stems: list[str], what: str) -> Path:
    """First existing file among ``stems`` (raw or .gz) in ``folder``, or an error."""
    for stem in stems:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"mnist: no {what} file in {str(folder)!r}; expected {stems[0]} or {stems[0]}.gz")


def _mnist(split: str, data_dir=None) -> Dataset:
    """MNIST from IDX files, normalised with MNIST's mean and std."""
    prefix = "train" if split == "train" else "t10k"
    folder = _folder("mnist", data_dir, f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]")
    images_path = _find(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"], "image")
    labels_path = _find(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"], "label")
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ConfigError(
            f"mnist: {images_path.name} holds {len(images)} images but {labels_path.name} "
            f"holds {len(labels)} labels; they must match"
        )
    if len(labels) and labels.max() > 9:
        raise ConfigError(f"{labels_path}: label {int(labels.max())} out of range; expected digits 0..9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - _MNIST_MEAN) / _MNIST_STD
    return Dataset("mnist", x, torch.from_numpy(labels.astype(np.int64)), 10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that admits only what CIFAR batches hold: dicts, lists, numpy arrays."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (N, 3072) uint8 images and N labels, checked."""
    if not path.is_file():
        raise ConfigError(f"cifar10: missing {path}; expected data_batch_1..data_batch_5 and test_batch")
    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as err:  # pickle raises many kinds on corrupt input
        raise ConfigError(f"{path}: not a readable CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ConfigError(f"{path}: expected a pickled dict with b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ConfigError(f"{path}: b'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data):
        raise ConfigError(f"{path}: {len(data)} images but {labels.size} labels; they must match")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ConfigError(f"{path}: labels span {labels.min()}..{labels.max()}; expected 0..9")
    return data, labels


def _cifar10(split: str, data_dir=None) -> Dataset:
    """CIFAR-10 from the python batches, normalised per channel."""
    folder = _folder("cifar10", data_dir, "data_batch_1..data_batch_5 and test_batch")
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_cifar_batch(folder / n) for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)
    return Dataset("cifar10", (x - mean) / std, torch.from_numpy(labels), 10)


def _digits(split: str) -> Dataset:
    """scikit-learn's 8x8 digits: a fixed 80/20 split (seeded), standardised."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("digits needs scikit-learn: pip install 'brigade[digits]'") from None
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 16.0
    y = torch.from_numpy(bunch.target.astype(np.int64))
    x = (x - x.mean()) / x.std()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    idx = order[:cut] if split == "train" else order[cut:]
    return Dataset("digits", x[idx].contiguous(), y[idx], 10)


# ---------------------------------------------------------------- registry

_LOADERS = {
    "synthetic": (_synthetic, ("like", "shape", "num_classes", "size", "seed", "noise")),
    "mnist": (_mnist, ()),
    "cifar10": (_cifar10, ()),
    "digits": (_digits, ()),
}
_NEEDS_DIR = {"mnist", "cifar10"}


def dataset_names() -> list[str]:
    """The data set names ``load_dataset`` knows."""
    return list(_LOADERS)


def _check_kwargs(name: str, kw: dict, accepted: tuple[str, ...]) -> None:
    """Unknown options are errors listing the accepted ones."""
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        accepts = f"it accepts {', '.join(accepted)}" if accepted else "it takes no options"
        raise ConfigError(f"data set {name} does not take {', '.join(unknown)}; {accepts}")


def load_dataset(name: str, data_dir: str | Path | None = None, split: str = "train", **kw) -> Dataset:
    """Load split ``train`` or ``test`` of data set ``name`` (see the module docstring)."""
    name = choose("data set", name, _LOADERS)
    split = choose("split", split, SPLITS)
    loader, accepted = _LOADERS[name]
    kw = {k: v for k, v in kw.items() if v is not None}
    _check_kwargs(name, kw, accepted)
    if name in _NEEDS_DIR:
        return loader(split, data_dir)
    return loader(split, **kw)


def dataset_spec(name: str, **kw) -> tuple[tuple[int, int, int], int]:
    """Image shape (C, H, W) and class count of a data set, without loading it.

    Accepts (and ignores) ``data_dir`` and ``split`` so callers can pass their load options.
    """
    name = choose("data set", name, _LOADERS)
    kw = {k: v for k, v in kw.items() if v is not None and k not in ("data_dir", "split")}
    _check_kwargs(name, kw, _LOADERS[name][1])
    if name == "synthetic":
        kw = {k: v for k, v in kw.items() if k in ("like", "shape", "num_classes")}
        return _synthetic_spec(**kw)
    return _LIKE[name]


# ---------------------------------------------------------------- batching


class Batches:
    """Minibatches of a ``Dataset``, reproducible from ``seed`` and resumable.

    Iterating yields the rest of the current epoch as ``(x, y)`` and moves on to the next
    epoch. The order of epoch ``e`` depends only on ``(seed, e)``, so ``position``
    ``(epoch, index)`` — the next batch to be produced — is all a checkpoint needs.
    """

    def __init__(self, ds: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, epoch: int = 0, index: int = 0) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
        if drop_last and batch_size > len(ds):
            raise ConfigError(
                f"batch_size {batch_size} is larger than the {len(ds)} samples and drop_last "
                f"drops everything; use batch_size <= {len(ds)}"
            )
        self.ds, self.batch_size, self.shuffle = ds, batch_size, shuffle
        self.seed, self.drop_last = seed, drop_last
        self.epoch, self.index = 0, 0
        self.load_state_dict({"epoch": epoch, "index": index})

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.ds)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, index of the next batch within it)."""
        return self.epoch, self.index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state['epoch']``, ``state['index']``."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self):
            raise ConfigError(f"batch position ({epoch}, {index}) out of range; index must be 0..{len(self)}")
        self.epoch, self.index = epoch, index
        if self.index == len(self):
            self.epoch, self.index = self.epoch + 1, 0

    def order(self, epoch: int) -> Tensor:
        """Sample order of ``epoch``: a permutation seeded by (seed, epoch), or 0..N-1."""
        n = len(self.ds)
        if not self.shuffle:
            return torch.arange(n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=gen)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, order, total = self.epoch, self.order(self.epoch), len(self)
        for i in range(self.index, total):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            self.epoch, self.index = (epoch + 1, 0) if i + 1 == total else (epoch, i + 1)
            yield self.ds.x[idx], self.ds.y[idx]


def batches(ds: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
            drop_last: bool = False) -> Batches:
    """Minibatches of ``ds`` (see ``Batches``); iterate once per epoch."""
    return Batches(ds, batch_size, shuffle, seed, drop_last)
