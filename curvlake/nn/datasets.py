"""Datasets as in-memory train / val / test splits, plus training-time augmentation.

``load_splits(name, data_dir=..., split_seed=..., val_size=..., standardize=...)`` returns a
``Splits`` of three ``Split`` (float32 ``x`` of shape N x C x H x W, int64 ``y``, int64
``sample_id``). Nothing is ever downloaded.

Datasets (``DATASET_NAMES``) and their splits:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), as 1x8x8 images
  scaled to [0, 1] (pixel / 16). It has no official test split: a permutation drawn from
  ``split_seed`` gives test = the first 20% (359), val = the next ``val_size`` (default 20%, 359),
  train = the rest (1,079 by default). ``sample_id`` indexes ``load_digits()``.
- ``mnist``: the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``), 1x28x28
  scaled to [0, 1]. Val = ``val_size`` (default 10,000, as DeepOBS) examples of the official
  training set drawn with ``split_seed``; test = the official 10,000.
- ``cifar10`` / ``cifar100``: the python pickles (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``; ``cifar-100-python/train``, ``test`` with the 100 fine labels), 3x32x32
  scaled to [0, 1]. Val = ``val_size`` (default 1,000, as Gamba et al. 2023's 49k/1k split)
  examples of the official training set drawn with ``split_seed``; test = the official 10,000.

For MNIST and CIFAR, ``sample_id`` of train and val examples is the index in the official
training set (so the two are disjoint), of test examples the index in the official test set.
Within a split, examples are in ascending ``sample_id`` order; shuffling is the training loop's
job.

Standardisation (``standardize``) is per channel, ``x' = (x - mean) / std``:

- ``"train"`` (or ``True``, the default): mean and population std (ddof=0) of the train split;
- ``"published"``: the constants used by the seed codebases (MNIST (0.1307, 0.3081); CIFAR-10
  mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010); CIFAR-100 mean (0.5071, 0.4865,
  0.4409), std (0.2009, 0.1984, 0.2023)). Note these CIFAR "std" values are the mean per-image
  std, not the dataset std (~0.247, 0.243, 0.262), so inputs are not unit-variance;
- ``"none"`` (or ``False``): raw [0, 1] pixels (mean 0, std 1 recorded).

User data: ``from_arrays(x, y, ...)`` / ``load_npz(path, ...)`` build the same ``Splits``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlake.constants import DATASET_NAMES, STANDARDIZE_MODES
from curvlake.errors import UserInputError
from curvlake.nn import _formats

DATA_DIR_ENV = "CURVLAKE_DATA_DIR"

DEFAULT_VAL_SIZES: dict[str, int | None] = {
    "digits": None,  # None = 20% of the data
    "mnist": 10_000,
    "cifar10": 1_000,
    "cifar100": 1_000,
}
DEFAULT_FRACTION = 0.2

PUBLISHED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2009, 0.1984, 0.2023)),
}

_NUM_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_CIFAR100_FILES = ("train", "test")


@dataclass(frozen=True, eq=False)
class Split:
    """One split: ``x`` float32 N x C x H x W (images) or N x D (tabular), ``y`` int64 labels,
    ``sample_id`` int64."""

    x: np.ndarray
    y: np.ndarray
    sample_id: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.x)
        if self.x.ndim not in (2, 4) or self.y.shape != (n,) or self.sample_id.shape != (n,):
            raise UserInputError(
                f"a split needs x of shape N x C x H x W or N x D and y, sample_id of shape "
                f"(N,); got "
                f"{self.x.shape}, {self.y.shape}, {self.sample_id.shape}"
            )

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True, eq=False)
class Splits:
    """Train, val and test splits of one dataset and how they were standardised.

    ``mean`` / ``std`` (float64, one per channel) map raw [0, 1] pixels to the stored inputs:
    ``x_stored = (x_raw - mean) / std``.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    mean: np.ndarray
    std: np.ndarray
    standardize: str = "train"
    split_seed: int = 0

    @property
    def pad_value(self) -> np.ndarray:
        """The stored value of a raw black (0) pixel per channel: ``-mean / std``.

        Pass it to ``augment_batch`` to pad crops with black as torchvision does on raw images.
        """
        return -self.mean / self.std

    def split(self, name: str) -> Split:
        """The split called ``name`` (train, val or test)."""
        if name not in ("train", "val", "test"):
            raise UserInputError(f"unknown split {name!r}; valid splits: train, val, test")
        return getattr(self, name)


# ---------------------------------------------------------------------------------------------
# public loaders


def load_splits(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    split_seed: int = 0,
    val_size: int | None = None,
    standardize: bool | str = True,
) -> Splits:
    """Load dataset ``name`` as standardised train / val / test splits.

    Args:
        name: one of ``DATASET_NAMES``.
        data_dir: folder with the dataset files (the dataset folder itself or its parent);
            defaults to ``$CURVLAKE_DATA_DIR``. Not needed for ``digits``.
        split_seed: seed of the train / val (and for digits test) permutation.
        val_size: number of validation examples (default ``DEFAULT_VAL_SIZES[name]``).
        standardize: ``"train"`` / ``True``, ``"published"`` or ``"none"`` / ``False``.

    Raises:
        UserInputError: unknown name, missing files, bad sizes or mode.
    """
    if name not in DATASET_NAMES:
        raise UserInputError(
            f"unknown dataset {name!r}; valid datasets are: {', '.join(DATASET_NAMES)} "
            "(use from_arrays / load_npz for your own data)"
        )
    mode = _standardize_mode(standardize, name)
    _check_seed(split_seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images.astype(np.float32) / 16.0)[:, None]
        y = digits.target.astype(np.int64)
        train, val, test = _carve(len(x), split_seed, val_size, None)
        parts = [(x[idx], y[idx], idx) for idx in (train, val, test)]
        return _finish("digits", parts, 10, mode, split_seed)

    folder = _resolve_data_dir(data_dir, name)
    if name == "mnist":
        x_train, y_train, x_test, y_test = _read_mnist(folder)
    else:
        x_train, y_train, x_test, y_test = _read_cifar(folder, name)
    default_val = DEFAULT_VAL_SIZES[name]
    train, val = _carve_val(len(x_train), split_seed, default_val if val_size is None else val_size)
    parts = [
        (_to_unit(x_train[train]), y_train[train], train),
        (_to_unit(x_train[val]), y_train[val], val),
        (_to_unit(x_test), y_test, np.arange(len(x_test), dtype=np.int64)),
    ]
    return _finish(name, parts, _NUM_CLASSES[name], mode, split_seed)


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    name: str = "custom",
    num_classes: int | None = None,
    split_seed: int = 0,
    val_size: int | None = None,
    test_size: int | None = None,
    standardize: bool | str = True,
) -> Splits:
    """Build ``Splits`` from user arrays.

    ``x`` is N x C x H x W (channels first), N x H x W (one channel) or N x D (D tabular
    features; standardisation is then per feature). Integer ``x`` is divided by 255; float ``x``
    is used as is. Without ``x_test``, test (default 20%) and val (default 20%) are carved from
    ``x`` with ``split_seed``; with it, only val is carved from ``x`` and the test split is
    ``x_test``. ``sample_id`` indexes ``x`` (``x_test`` for the given test split).
    ``num_classes`` defaults to ``max(y) + 1``. ``standardize="published"`` is not available.

    Raises:
        UserInputError: inconsistent shapes, labels that are not class indices, bad sizes.
    """
    mode = _standardize_mode(standardize, None)
    _check_seed(split_seed)
    x = _as_images(x, "x")
    y = _as_labels(y, len(x), "y")
    arrays = [y]
    if (x_test is None) != (y_test is None):
        raise UserInputError("give both x_test and y_test, or neither")
    if x_test is not None:
        x_test = _as_images(x_test, "x_test")
        y_test = _as_labels(y_test, len(x_test), "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise UserInputError(
                f"x_test examples have shape {x_test.shape[1:]}, x examples {x.shape[1:]}"
            )
        arrays.append(y_test)
    max_label = max((int(a.max()) for a in arrays if a.size), default=-1)
    if num_classes is None:
        num_classes = max_label + 1
    if not isinstance(num_classes, int) or num_classes < 1 or max_label >= num_classes:
        raise UserInputError(
            f"num_classes={num_classes!r} must be a positive int larger than every label "
            f"(largest label: {max_label})"
        )
    if x_test is None:
        train, val, test = _carve(len(x), split_seed, val_size, test_size)
        parts = [(x[idx], y[idx], idx) for idx in (train, val, test)]
    else:
        if test_size is not None:
            raise UserInputError("test_size cannot be combined with x_test")
        default_val = round(DEFAULT_FRACTION * len(x)) if val_size is None else val_size
        train, val = _carve_val(len(x), split_seed, default_val)
        parts = [
            (x[train], y[train], train),
            (x[val], y[val], val),
            (x_test, y_test, np.arange(len(x_test), dtype=np.int64)),
        ]
    return _finish(name, parts, num_classes, mode, split_seed)


def load_npz(path: str | os.PathLike, **kwargs: Any) -> Splits:
    """``from_arrays`` on an NPZ file with ``x``, ``y`` and optionally ``x_test``, ``y_test``.

    Keyword arguments go to ``from_arrays``; ``name`` defaults to the file's stem.
    """
    arrays = _formats.read_npz_dataset(path)
    kwargs.setdefault("name", Path(path).stem)
    return from_arrays(**arrays, **kwargs)


# ---------------------------------------------------------------------------------------------
# augmentation


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    padding: int = 4,
    *,
    flip: bool = True,
    pad_value: float | Sequence[float] | np.ndarray | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Random crop with padding and random horizontal flip of a batch ``N x C x H x W``.

    Each image is padded by ``padding`` pixels of ``pad_value`` (a scalar or one value per
    channel) on every side, cropped back to H x W at an offset uniform in
    ``{0..2*padding}^2``, and flipped left-right with probability 1/2 (torchvision's
    ``RandomCrop(H, padding)`` + ``RandomHorizontalFlip()``). All random numbers come from
    ``generator`` (drawn on its device, then moved to ``x``'s), in a fixed order: N row
    offsets and N column offsets, then N flip draws; the result is a deterministic function of
    ``x`` and the generator state.
    """
    if x.ndim != 4:
        raise UserInputError(
            f"augment_batch needs a batch N x C x H x W, got shape {tuple(x.shape)}"
        )
    if not isinstance(padding, int) or padding < 0:
        raise UserInputError(f"padding must be a non-negative int, got {padding!r}")
    n, c, h, w = x.shape
    offsets = torch.randint(
        0, 2 * padding + 1, (2, n), generator=generator, device=generator.device
    )
    flips = torch.rand(n, generator=generator, device=generator.device) < 0.5
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    fill = torch.as_tensor(pad_value, dtype=x.dtype, device=x.device).reshape(-1)
    if fill.numel() not in (1, c):
        raise UserInputError(f"pad_value needs 1 or {c} values, got {fill.numel()}")
    padded = x.new_empty((n, c, h + 2 * padding, w + 2 * padding))
    padded[:] = fill.view(1, -1, 1, 1)
    padded[:, :, padding : padding + h, padding : padding + w] = x
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flip:
        cols = torch.where(flips[:, None], w - 1 - cols, cols)
    cols = offsets[1, :, None] + cols
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------------------------
# helpers


def _check_seed(seed: Any) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UserInputError(f"split_seed must be a non-negative int, got {seed!r}")


def _standardize_mode(standardize: bool | str, name: str | None) -> str:
    if standardize is True:
        mode = "train"
    elif standardize is False:
        mode = "none"
    elif isinstance(standardize, str) and standardize in STANDARDIZE_MODES:
        mode = standardize
    else:
        raise UserInputError(
            f"standardize={standardize!r}; allowed: True, False, "
            + ", ".join(map(repr, STANDARDIZE_MODES))
        )
    if mode == "published" and name not in PUBLISHED_STATS:
        raise UserInputError(
            f"standardize='published' has constants only for {', '.join(PUBLISHED_STATS)}; "
            f"use 'train' for {name or 'user data'}"
        )
    return mode


def _check_size(value: Any, what: str, available: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise UserInputError(f"{what} must be a non-negative int, got {value!r}")
    if value > available:
        raise UserInputError(f"{what}={value} is larger than the {available} examples available")
    return int(value)


def _carve_val(n: int, seed: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) index arrays, each sorted: val = the first ``val_size`` of a permutation."""
    val_size = _check_size(val_size, "val_size", n)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _carve(
    n: int, seed: int, val_size: int | None, test_size: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) sorted index arrays: test first, then val, from one permutation."""
    default = round(DEFAULT_FRACTION * n)
    test_size = _check_size(default if test_size is None else test_size, "test_size", n)
    val_size = _check_size(default if val_size is None else val_size, "val_size", n - test_size)
    perm = np.random.default_rng(seed).permutation(n)
    test = perm[:test_size]
    val = perm[test_size : test_size + val_size]
    train = perm[test_size + val_size :]
    return np.sort(train), np.sort(val), np.sort(test)


def _to_unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255.0)


def _as_images(x: Any, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim not in (2, 4):
        raise UserInputError(
            f"{what} must be N x C x H x W, N x H x W or N x D, got shape {x.shape}"
        )
    if np.issubdtype(x.dtype, np.integer):
        return _to_unit(x)
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise UserInputError(f"{what} has {bad} NaN or infinite value(s)")
        return np.ascontiguousarray(x, dtype=np.float32)
    raise UserInputError(f"{what} must hold numbers, got dtype {x.dtype}")


def _as_labels(y: Any, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise UserInputError(f"{what} must have shape ({n},), got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.mod(y, 1) == 0):
            raise UserInputError(f"{what} must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise UserInputError(f"{what} has negative labels (smallest {y.min()})")
    return y


def per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    """``values`` (one per channel, or per feature of tabular data) shaped to broadcast against
    a batch of ``ndim`` dimensions (``(1, C, 1, 1)`` for images, ``(1, D)`` for tables)."""
    return np.asarray(values).reshape(1, -1, *([1] * (ndim - 2)))


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (per-feature for tables) mean and population std in float64, chunked."""
    axes = (0, *range(2, x.ndim))
    count = x.shape[0] * int(np.prod(x.shape[2:], dtype=np.int64))
    if count == 0:
        raise UserInputError("cannot standardise with an empty train split")
    total = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        total += x[start : start + chunk].sum(axis=axes, dtype=np.float64)
    mean = total / count
    sq = np.zeros(x.shape[1])
    for start in range(0, len(x), chunk):
        d = x[start : start + chunk].astype(np.float64) - per_channel(mean, x.ndim)
        sq += np.square(d).sum(axis=axes)
    return mean, np.sqrt(sq / count)


def _finish(
    name: str,
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
    mode: str,
    split_seed: int,
) -> Splits:
    x_train = parts[0][0]
    channels = x_train.shape[1]
    if mode == "train":
        mean, std = _channel_stats(x_train)
        std = np.where(std > 0, std, 1.0)
    elif mode == "published":
        mean, std = (np.asarray(v, dtype=np.float64) for v in PUBLISHED_STATS[name])
    else:
        mean, std = np.zeros(channels), np.ones(channels)
    shift = per_channel(mean.astype(np.float32), x_train.ndim)
    scale = per_channel(std.astype(np.float32), x_train.ndim)
    splits = []
    for x, y, ids in parts:
        if mode != "none":
            x = (x - shift) / scale
        splits.append(
            Split(
                x=np.ascontiguousarray(x, dtype=np.float32),
                y=np.asarray(y, dtype=np.int64),
                sample_id=np.asarray(ids, dtype=np.int64),
            )
        )
    return Splits(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in x_train.shape[1:]),  # type: ignore[arg-type]
        mean=mean,
        std=std,
        standardize=mode,
        split_seed=int(split_seed),
    )


# ---------------------------------------------------------------------------------------------
# file discovery


def _resolve_data_dir(data_dir: str | os.PathLike | None, name: str) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir is None:
        raise UserInputError(
            f"dataset {name!r} is read from local files and never downloaded: pass data_dir "
            f"(or set ${DATA_DIR_ENV}). Expected layout: {_layout(name)}"
        )
    return Path(data_dir).expanduser()


def _layout(name: str) -> str:
    if name == "mnist":
        return (
            "<data_dir>/ (or <data_dir>/mnist/, <data_dir>/MNIST/raw/) holding "
            + ", ".join(_MNIST_FILES)
            + " (each may end in .gz)"
        )
    if name == "cifar10":
        return "<data_dir>/cifar-10-batches-py/ (or <data_dir> itself) holding " + ", ".join(
            _CIFAR10_FILES
        )
    return "<data_dir>/cifar-100-python/ (or <data_dir> itself) holding " + ", ".join(
        _CIFAR100_FILES
    )


def _find(folder: Path, filename: str) -> Path | None:
    for candidate in (folder / filename, folder / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_error(name: str, root: Path, missing: Sequence[str]) -> UserInputError:
    return UserInputError(
        f"dataset {name!r} not found under {root}: missing {', '.join(missing)}. Expected "
        f"layout: {_layout(name)}. curvlake never downloads data; fetch the official files "
        "yourself."
    )


def _read_mnist(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    best_missing: list[str] = list(_MNIST_FILES)
    for folder in (root, root / "mnist", root / "MNIST" / "raw", root / "MNIST"):
        found = {f: _find(folder, f) for f in _MNIST_FILES}
        missing = [f for f, path in found.items() if path is None]
        if not missing:
            x_train, y_train, x_test, y_test = (_formats.read_idx(found[f]) for f in _MNIST_FILES)
            for x, y, which in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
                if x.ndim != 3 or y.shape != (len(x),):
                    raise UserInputError(
                        f"MNIST {which} files in {folder} disagree: images {x.shape}, "
                        f"labels {y.shape}"
                    )
                if y.size and (y.min() < 0 or y.max() > 9):
                    raise UserInputError(f"MNIST {which} labels in {folder} fall outside 0..9")
            return (
                x_train[:, None],
                y_train.astype(np.int64),
                x_test[:, None],
                y_test.astype(np.int64),
            )
        if len(missing) < len(best_missing):
            best_missing = missing
    raise _missing_error("mnist", root, best_missing)


def _read_cifar(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    subdir, files = (
        ("cifar-10-batches-py", _CIFAR10_FILES)
        if name == "cifar10"
        else ("cifar-100-python", _CIFAR100_FILES)
    )
    label_key = "labels" if name == "cifar10" else "fine_labels"
    best_missing: list[str] = list(files)
    for folder in (root, root / subdir):
        missing = [f for f in files if not (folder / f).is_file()]
        if not missing:
            batches = [_formats.read_cifar_batch(folder / f, label_key) for f in files]
            x_train = np.concatenate([b[0] for b in batches[:-1]])
            y_train = np.concatenate([b[1] for b in batches[:-1]])
            x_test, y_test = batches[-1]
            limit = _NUM_CLASSES[name]
            for y in (y_train, y_test):
                if y.size and (y.min() < 0 or y.max() >= limit):
                    raise UserInputError(
                        f"{name} labels in {folder} fall outside 0..{limit - 1}: is this the "
                        "right dataset?"
                    )
            return x_train, y_train, x_test, y_test
        if len(missing) < len(best_missing):
            best_missing = missing
    raise _missing_error(name, root, best_missing)
