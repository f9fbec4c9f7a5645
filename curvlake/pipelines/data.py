"""User data in the lake: ``curvlake data import`` and reading a ``dataset`` artifact back.

A dataset artifact keeps the user's arrays as given (inputs converted to float32 the way
``nn.datasets.from_arrays`` does: integers divided by 255), with ``split`` = ``train`` for the
examples of ``x`` and ``test`` for those of ``x_test``. Validation (and, without ``x_test``,
test) examples are carved at use time from the split seed, exactly as for built-in datasets.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.nn import _formats
from curvlake.nn.datasets import Splits, from_arrays

_DATASET_ID = re.compile(r"^dataset-[0-9a-f]{16}$")


def is_dataset_id(name: str) -> bool:
    """Whether ``name`` names a lake dataset artifact (rather than a built-in dataset)."""
    return bool(_DATASET_ID.match(str(name)))


def file_sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_user_arrays(path: Path, labels: Path | None) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        if labels is not None:
            raise UserInputError("an .npz file carries its labels ('y'); drop --labels")
        return _formats.read_npz_dataset(path)
    if path.suffix == ".npy":
        if labels is None:
            raise UserInputError(f"{path} holds inputs only: give the labels with --labels Y.npy")
        for p in (path, labels):
            if not p.is_file():
                raise UserInputError(f"no such file: {p}")
        return {"x": np.load(path, allow_pickle=False), "y": np.load(labels, allow_pickle=False)}
    raise UserInputError(f"{path}: expected an .npz (x, y[, x_test, y_test]) or an .npy file")


def import_dataset(
    lake: Lake,
    path: str | Path,
    *,
    labels: str | Path | None = None,
    name: str | None = None,
    num_classes: int | None = None,
) -> str:
    """Store user inputs and integer labels as a ``dataset`` artifact; return its id.

    Args:
        lake: the lake.
        path: an ``.npz`` with ``x``, ``y`` (optionally ``x_test``, ``y_test``), or an ``.npy``
            of inputs with ``labels`` an ``.npy`` of labels.
        labels: the labels file for an ``.npy`` input file.
        name: a name for the data (default: the file stem).
        num_classes: number of classes (default: largest label + 1).
    """
    path = Path(path)
    labels = Path(labels) if labels is not None else None
    arrays = _read_user_arrays(path, labels)
    # from_arrays validates shapes, values, labels and num_classes and converts inputs like
    # every loader.
    checked = from_arrays(
        **arrays,
        num_classes=num_classes,
        standardize="none",
        val_size=0,
        **({} if "x_test" in arrays else {"test_size": 0}),
    )
    parts = [checked.train] + ([checked.test] if "x_test" in arrays else [])
    x_parts, y_parts, split = [], [], []
    for part, label in zip(parts, ("train", "test"), strict=False):
        order = np.argsort(part.sample_id)  # back to the order of the file
        x_parts.append(part.x[order])
        y_parts.append(part.y[order])
        split += [label] * len(order)
    x, y = np.concatenate(x_parts), np.concatenate(y_parts)
    sample_id = np.concatenate([np.sort(p.sample_id) for p in parts]).astype(np.int64)
    name = name or path.stem
    sources = [path] + ([labels] if labels else [])
    config = {
        "name": name,
        "source_sha256": file_sha256(*sources),
        "num_classes": checked.num_classes,
    }
    writer = lake.begin("dataset", config)
    if writer.complete:
        return writer.id
    writer.write("x", x.reshape(len(x), -1))
    writer.write("y", y)
    writer.write("split", np.array(split, dtype=object))
    writer.write("sample_id", sample_id)
    writer.set_attrs(
        input_shape=list(checked.input_shape),
        num_classes=checked.num_classes,
        name=name,
        source=str(path),
    )
    return writer.commit()


def load_dataset_artifact(
    lake: Lake,
    dataset_id: str,
    *,
    split_seed: int = 0,
    val_size: int | None = None,
    standardize: bool | str = True,
) -> Splits:
    """Train / val / test splits of a dataset artifact (like ``nn.datasets.load_splits``)."""
    ds = lake.open(dataset_id)
    shape = tuple(ds.attrs["input_shape"])
    x = ds["x"].values.reshape(-1, *shape)
    y = ds["y"].values
    split = np.array([str(s) for s in ds["split"].values])
    train, test = split == "train", split == "test"
    kwargs = {"x_test": x[test], "y_test": y[test]} if test.any() else {}
    splits = from_arrays(
        x[train],
        y[train],
        name=ds.attrs["name"],
        num_classes=int(ds.attrs["num_classes"]),
        split_seed=split_seed,
        val_size=val_size,
        standardize=standardize,
        **kwargs,
    )
    return splits
