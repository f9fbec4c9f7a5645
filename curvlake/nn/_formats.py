"""Readers and writers of the on-disk formats of the standard image datasets.

- IDX (MNIST): a big-endian header ``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian
  uint32 dimensions, then the data in C order (LeCun et al., http://yann.lecun.com/exdb/mnist/).
  Files ending in ``.gz`` are gzip-compressed.
- CIFAR python pickles (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html): each file
  is a pickled dict with byte-string keys; ``b"data"`` is an ``N x 3072`` uint8 array (1024 red,
  then 1024 green, then 1024 blue values per row, row-major 32x32), labels are ``b"labels"``
  (CIFAR-10) or ``b"fine_labels"`` / ``b"coarse_labels"`` (CIFAR-100).
- NPZ datasets (curvlake's own import format): ``x``, ``y`` and optionally ``x_test``,
  ``y_test``.

The writers exist so tests can build tiny files and users can convert data into these layouts.
Unpickling runs code from the file: only read CIFAR files you trust (the official archives).
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from curvlake.errors import UserInputError

# IDX type code -> big-endian numpy dtype
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_IDX_CODES = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in _IDX_DTYPES.items()}


def _open(path: str | os.PathLike, mode: str) -> IO[bytes]:
    if str(path).endswith(".gz"):
        return gzip.open(path, mode)  # type: ignore[return-value]
    return open(path, mode)  # the caller closes it


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally ``.gz``) into an array in native byte order.

    Raises:
        UserInputError: the file is not a valid IDX file.
    """
    with _open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserInputError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserInputError(f"{path} is truncated: IDX header of {ndim} dimensions incomplete")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise UserInputError(
            f"{path} has {len(raw)} bytes; an IDX array of shape {shape} and type {dtype} "
            f"needs {expected}"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    Supported dtypes: uint8, int8, int16, int32, float32, float64.
    """
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=").str[1:]
    if key not in _IDX_CODES:
        raise UserInputError(
            f"IDX cannot store dtype {array.dtype}; use uint8, int8, int16, int32, float32 "
            "or float64"
        )
    code = _IDX_CODES[key]
    if array.ndim > 255:
        raise UserInputError(f"IDX stores at most 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    with _open(path, "wb") as f:
        f.write(header + body)


def read_cifar_batch(
    path: str | os.PathLike, label_key: str = "labels"
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch: ``(images N x 3 x 32 x 32 uint8, labels int64)``.

    ``label_key`` is ``"labels"`` (CIFAR-10), ``"fine_labels"`` or ``"coarse_labels"``
    (CIFAR-100).

    Raises:
        UserInputError: the file is not a CIFAR batch or lacks ``label_key``.
    """
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as exc:  # any unpickling failure means a bad file
            raise UserInputError(f"{path} is not a CIFAR python batch: {exc}") from exc
    if not isinstance(batch, Mapping):
        raise UserInputError(f"{path} is not a CIFAR python batch (not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise UserInputError(
            f"{path} lacks the 'data' or {label_key!r} entry (has: {', '.join(sorted(batch))})"
        )
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserInputError(f"{path}: 'data' has shape {data.shape}, expected N x 3072")
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise UserInputError(
            f"{path}: {labels.shape[0]} labels for {data.shape[0]} images in {label_key!r}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def write_cifar_batch(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | Mapping[str, np.ndarray],
    *,
    batch_label: str = "curvlake batch",
) -> None:
    """Write images (``N x 3 x 32 x 32`` uint8) and labels as a CIFAR python batch.

    ``labels`` is an array (written as ``labels``, CIFAR-10 layout) or a mapping of label keys to
    arrays (e.g. ``{"fine_labels": ..., "coarse_labels": ...}`` for CIFAR-100).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32):
        raise UserInputError(
            f"CIFAR images must be uint8 N x 3 x 32 x 32, got {images.dtype} {images.shape}"
        )
    label_map = {"labels": labels} if not isinstance(labels, Mapping) else dict(labels)
    batch: dict[bytes, Any] = {
        b"batch_label": batch_label.encode(),
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"image_{i}.png".encode() for i in range(len(images))],
    }
    for key, value in label_map.items():
        batch[key.encode()] = [int(v) for v in np.asarray(value)]
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def read_npz_dataset(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an NPZ dataset: ``x``, ``y`` and optionally ``x_test``, ``y_test``.

    Raises:
        UserInputError: the file is missing, is not an NPZ, or lacks ``x`` / ``y``.
    """
    if not Path(path).is_file():
        raise UserInputError(f"no such NPZ dataset file: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # corrupt or foreign file
        raise UserInputError(f"{path} is not a readable .npz file: {exc}") from exc
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing or (("x_test" in arrays) != ("y_test" in arrays)):
        raise UserInputError(
            f"{path} must hold arrays 'x' and 'y' (and optionally both 'x_test' and 'y_test'); "
            f"it has: {', '.join(sorted(arrays)) or '(none)'}"
        )
    unknown = sorted(set(arrays) - {"x", "y", "x_test", "y_test"})
    if unknown:
        raise UserInputError(
            f"{path} has unexpected arrays {unknown}; allowed: x, y, x_test, y_test"
        )
    return arrays


def write_npz_dataset(
    path: str | os.PathLike,
    x: np.ndarray,
    y: np.ndarray,
    *,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
) -> None:
    """Write an NPZ dataset readable by ``read_npz_dataset`` (uncompressed)."""
    arrays = {"x": np.asarray(x), "y": np.asarray(y)}
    if (x_test is None) != (y_test is None):
        raise UserInputError("give both x_test and y_test, or neither")
    if x_test is not None:
        arrays.update(x_test=np.asarray(x_test), y_test=np.asarray(y_test))
    with open(path, "wb") as f:
        np.savez(f, **arrays)
