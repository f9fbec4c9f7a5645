"""Bring phd-lab's outputs into the lake: per-epoch CSV logs, latent pickle streams, probe CSVs.

Formats (phd-lab at its last commit, delve's ``CSVWriter``; see docs/SCHEMA.md for ours):

- **Per-epoch log** ``<Model>-<Dataset>-r<res>-bs<bs>-e<E>.csv``: ``;``-separated, an unnamed
  index column, one row per epoch; columns ``train-saturation_<layer>``,
  ``eval-saturation_<layer>``, ``train-intrinsic-dimensionality_<layer>``,
  ``eval-intrinsic-dimensionality_<layer>`` (optionally ``...-covariance-trace_<layer>``) in the
  order delve tracked the layers (module order), plus metrics (``training_accuracy``,
  ``test_loss``, ...). Becomes a ``saturation`` artifact (source ``phdlab``); the metrics are kept
  in its ``phdlab_metrics`` attribute. delve's rule is the ``delve`` rule. A row repeated by a
  crash between phd-lab's CSV and checkpoint writes cannot be told from a real epoch.
- **Latent datasets** ``latent_datasets/<Model>_<Dataset>_<res>/``: ``{train,eval}-<layer>.p``
  (pixelwise: ``{train,eval}-<layer>-(i,j).p``, one file per position), each a stream of pickled
  per-batch float32 arrays read by repeated ``pickle.load`` until EOF, and
  ``{train,eval}-labels.p``. Becomes a ``latents`` artifact; ``eval`` is phd-lab's test set.
  Only NumPy arrays are unpickled (no other code runs). phd-lab records no example ids (and
  shuffles the train split), so ``sample_id`` is the row order; nor the module order, so layers
  are ordered as given (``layers``) or in natural order of their names.
- **Probe CSV** ``<prefix><d>x<d>_probe_performances.csv``: ``;``-separated, columns ``name``
  (``train-<layer>``), ``train_acc``, ``eval_acc``. Becomes a ``probes`` artifact (source
  ``phdlab``). phd-lab pairs train and eval files by position in unsorted directory listings, so
  its rows may be shuffled (and, at worst, mismatched): rows are put in the order of an artifact
  given as ``order_like`` or in natural order.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.pipelines.skeleton import as_lake
from curvlake.validation import Interval, validate_params

_STAT = re.compile(r"^(train|eval)-(saturation|intrinsic-dimensionality|covariance-trace)_(.+)$")
_LATENT = re.compile(r"^(train|eval)-(.+?)(?:-\((\d+),\s*(\d+)\))?\.p$")
#: phd-lab's split names -> ours
_SPLITS = {"train": "train", "eval": "test"}


def natural_key(name: str) -> list:
    """Sort key that orders ``layer2`` before ``layer10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _sha256(*paths: Path) -> str:
    from curvlake.pipelines.data import file_sha256

    return file_sha256(*paths)


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} {path} does not exist or is not a file")
    return path


def _read_csv(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path, sep=";")
    except (ValueError, pd.errors.ParserError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(f"{path} is not a ;-separated CSV: {first}") from None


# ---------------------------------------------------------------------------------------------
# per-epoch CSV logs -> saturation


@validate_params({"delta": [Interval(float, 0, None, closed="neither")]})
def import_phdlab_saturation(
    lake: Lake | str,
    path: str | Path,
    *,
    delta: float = 0.99,
    rule: str = "delve",
    conv_method: str = "channelwise",
) -> str:
    """Import a phd-lab / delve per-epoch CSV log as a ``saturation`` artifact.

    Args:
        lake: the lake (or its URL).
        path: the ``.csv`` log.
        delta: the threshold it was computed with (phd-lab's config ``delta``, default 0.99).
        rule: ``delve`` (delve computed it) or ``textbook`` (for logs of another tool).
        conv_method: phd-lab's ``conv_method`` (it always used ``channelwise``).

    Returns:
        The ``saturation`` artifact id (epochs 1..E, phases as found).
    """
    from curvlake.constants import CONV_METHODS, SATURATION_RULES
    from curvlake.validation import Options, check

    check("rule", rule, Options(*SATURATION_RULES))
    check("conv_method", conv_method, Options(*CONV_METHODS))
    lake = as_lake(lake)
    path = _existing_file(path, "log")
    table = _read_csv(path)
    table = table.drop(columns=[c for c in table.columns if str(c).startswith("Unnamed")])
    stats: dict[tuple[str, str, str], Any] = {}
    layers: list[str] = []
    phases: list[str] = []
    metrics = {}
    for column in table.columns:
        match = _STAT.match(str(column))
        if match is None:
            values = table[column].tolist()
            numeric = all(isinstance(v, (int, float)) for v in values)
            metrics[str(column)] = [
                None if numeric and v != v else (float(v) if numeric else str(v)) for v in values
            ]
            continue
        phase, stat, layer = match.groups()
        stats[(phase, stat, layer)] = table[column].to_numpy(dtype=np.float64)
        if layer not in layers:
            layers.append(layer)
        if phase not in phases:
            phases.append(phase)
    if not layers:
        raise UserInputError(
            f"{path} has no columns like train-saturation_<layer> or eval-saturation_<layer>; "
            "is it a phd-lab / delve per-epoch log?"
        )
    phases = [p for p in ("train", "eval") if p in phases]
    n_epochs = len(table)
    shape = (n_epochs, len(phases), len(layers))

    def gather(stat: str, fill: float) -> np.ndarray:
        out = np.full(shape, fill, dtype=np.float64)
        for p, phase in enumerate(phases):
            for layer_at, layer in enumerate(layers):
                if (phase, stat, layer) in stats:
                    out[:, p, layer_at] = stats[(phase, stat, layer)]
        return out

    saturation = gather("saturation", np.nan)
    idim = gather("intrinsic-dimensionality", np.nan)
    arrays = {
        "epoch": np.arange(1, n_epochs + 1, dtype=np.int64),
        "phase": np.array(phases, dtype=object),
        "layer": np.array(layers, dtype=object),
        "saturation": saturation,
        "intrinsic_dimension": np.where(np.isnan(idim), -1, idim).astype(np.int64),
    }
    if any(stat == "covariance-trace" for _, stat, _ in stats):
        arrays["trace"] = gather("covariance-trace", np.nan)
    digest = _sha256(path)
    config = {
        "source": "phdlab",
        "file_sha256": digest,
        "delta": float(delta),
        "rule": rule,
        "conv_method": conv_method,
    }
    writer = lake.begin("saturation", config, sources={"log": f"{path} sha256:{digest}"})
    if writer.complete:
        return writer.id
    with writer:
        writer.write_many(arrays)
        writer.set_attrs(
            source="phdlab",
            delta=float(delta),
            rule=rule,
            ddof=0,
            conv_method=conv_method,
            eval_split="test",
            imported_from=str(path),
            phdlab_metrics=metrics,
        )
    return writer.commit()


# ---------------------------------------------------------------------------------------------
# latent pickle streams -> latents


class _NumpyOnly(pickle.Unpickler):
    """Unpickles NumPy arrays, dtypes and scalars and refuses every other global."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not a NumPy array type; only NumPy arrays are imported"
            )
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def pickle_stream(path: Path) -> Iterator[np.ndarray]:
    """The arrays of a phd-lab pickle stream (``pickle.load`` until EOF), as they come."""
    with open(path, "rb") as handle:
        reader = _NumpyOnly(handle)
        while True:
            try:
                item = reader.load()
            except EOFError:
                return
            except pickle.UnpicklingError as error:
                raise UserInputError(f"{path}: {error}") from None
            array = np.asarray(item)
            yield array.reshape(len(array), -1) if array.ndim != 1 else array


class _Rows:
    """Reads exactly ``n`` rows at a time from a pickle stream of row batches."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._batches = pickle_stream(path)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def take(self, n: int) -> np.ndarray:
        while self._buffered < n:
            batch = next(self._batches, None)
            if batch is None:
                raise UserInputError(f"{self.path} ends before the rows of the other files do")
            self._buffer.append(batch)
            self._buffered += len(batch)
        joined = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        rows, rest = joined[:n], joined[n:]
        self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)
        return rows

    def exhausted(self) -> bool:
        return self._buffered == 0 and next(self._batches, None) is None


def _latent_files(folder: Path) -> dict[str, dict[str, list[tuple[tuple[int, int] | None, Path]]]]:
    """``{split: {layer: [(position or None, file)]}}`` of a phd-lab latent folder."""
    found: dict[str, dict[str, list]] = {}
    for path in sorted(folder.iterdir()):
        match = _LATENT.match(path.name)
        if match is None or not path.is_file():
            continue
        split, layer, i, j = match.groups()
        if layer == "labels":
            continue
        position = (int(i), int(j)) if i is not None else None
        found.setdefault(split, {}).setdefault(layer, []).append((position, path))
    return found


def import_phdlab_latents(
    lake: Lake | str,
    folder: str | Path,
    *,
    layers: Sequence[str] | None = None,
    num_classes: int | None = None,
    block_size: int | None = None,
    compress: bool = True,
) -> str:
    """Import a phd-lab latent folder as a ``latents`` artifact (``eval`` becomes ``test``).

    Args:
        lake: the lake (or its URL).
        folder: ``latent_datasets/<Model>_<Dataset>_<res>``.
        layers: the layer names in module order (default: every layer found, in natural order).
        num_classes: number of classes (default: the largest label + 1).
        block_size: rows per stored chunk (default: as many as fit the lake's chunk size).
        compress: zstd-compress the features.

    Returns:
        The ``latents`` artifact id.
    """
    lake = as_lake(lake)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"latent folder {folder} does not exist")
    files = _latent_files(folder)
    splits = [s for s in ("train", "eval") if s in files]
    if not splits:
        raise UserInputError(f"{folder} holds no phd-lab latents ({{train,eval}}-<layer>.p)")
    found = sorted({layer for s in splits for layer in files[s]}, key=natural_key)
    if layers is None:
        order = found
    else:
        order = list(layers)
        unknown = [name for name in order if name not in found]
        if unknown:
            raise UserInputError(f"no latents of layer(s) {unknown} in {folder}")
    for split in splits:
        missing = [name for name in order if name not in files[split]]
        if missing:
            raise UserInputError(f"{folder} has no {split} latents of layer(s) {missing}")
        if not (folder / f"{split}-labels.p").is_file():
            raise UserInputError(f"{folder} has no {split}-labels.p")

    # one reader per (layer, position); shapes from the first batch of each split's files
    labels = {
        split: np.concatenate(list(pickle_stream(folder / f"{split}-labels.p"))).astype(np.int64)
        for split in splits
    }
    layouts: dict[str, tuple[list[Path], tuple[int, ...]]] = {}
    for name in order:
        entries = files[splits[0]][name]
        stream = pickle_stream(entries[0][1])
        first = next(stream, None)
        stream.close()
        if first is None:
            raise UserInputError(f"{entries[0][1]} holds no arrays")
        if entries[0][0] is None:
            layouts[name] = ([entries[0][1]], (int(np.prod(first.shape[1:])),))
            continue
        height = 1 + max(p[0] for p, _ in entries)
        width = 1 + max(p[1] for p, _ in entries)
        channels = int(np.prod(first.shape[1:]))
        by_position = {p: f for p, f in entries}
        if len(by_position) != height * width:
            raise UserInputError(f"pixelwise latents of {name} miss positions ({folder})")
        layouts[name] = ([], (channels, height, width))
    widths = [int(np.prod(layouts[name][1])) for name in order]
    total = sum(widths)
    all_paths = [path for split in splits for name in order for _, path in files[split][name]] + [
        folder / f"{split}-labels.p" for split in splits
    ]
    digest = _sha256(*all_paths)
    longest = max(len(y) for y in labels.values())
    rows = block_size or max(1, min(longest, lake.chunk_bytes // (4 * total)))
    config = {
        "source": "phdlab",
        "files_sha256": digest,
        "layers": order,
        "block_size": int(rows),
        "compress": bool(compress),
    }
    num_classes = num_classes or int(max(int(y.max()) for y in labels.values()) + 1)
    writer = lake.begin("latents", config, sources={"folder": f"{folder} sha256:{digest}"})
    if writer.complete:
        return writer.id
    with writer:
        for split in splits:
            n = len(labels[split])
            out = writer.create_array(
                f"{_SPLITS[split]}_features",
                (n, total),
                "float32",
                chunks=(min(rows, n), total),
                compress=compress,
            )
            readers = []
            for name in order:
                entries = files[split][name]
                if entries[0][0] is None:
                    readers.append([_Rows(entries[0][1])])
                else:
                    by_position = {p: f for p, f in entries}
                    _, (_, height, width) = layouts[name]
                    readers.append(
                        [_Rows(by_position[(i, j)]) for i in range(height) for j in range(width)]
                    )
            for start in range(0, n, rows):
                count = min(rows, n - start)
                parts = []
                for name, layer_readers in zip(order, readers, strict=True):
                    blocks = [reader.take(count) for reader in layer_readers]
                    if len(blocks) == 1:
                        parts.append(blocks[0].reshape(count, -1))
                    else:  # (position, n, C) -> (n, C, H, W) flattened, as ours
                        _, (channels, height, width) = layouts[name]
                        stacked = np.stack([b.reshape(count, channels) for b in blocks], axis=2)
                        parts.append(stacked.reshape(count, channels * height * width))
                block = np.concatenate(parts, axis=1).astype(np.float32, copy=False)
                if block.shape[1] != total:
                    raise UserInputError(f"{folder}: layers change width between batches")
                out[start : start + count] = block
            if not all(r.exhausted() for layer_readers in readers for r in layer_readers):
                raise UserInputError(
                    f"{folder}: the {split} latents have more rows than {split}-labels.p"
                )
            writer.write(f"{_SPLITS[split]}_label", labels[split])
            writer.write(f"{_SPLITS[split]}_sample_id", np.arange(n, dtype=np.int64))
        offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
        writer.write_many(
            {
                "layer": np.array(order, dtype=object),
                "feature_offset": offsets,
                "n_features": np.asarray(widths, dtype=np.int64),
                "layer_shape": np.array(
                    [",".join(map(str, layouts[name][1])) for name in order], dtype=object
                ),
            }
        )
        pixelwise = any(len(layouts[name][1]) == 3 for name in order)
        pointer = folder / "model_pointer.txt"
        writer.set_attrs(
            source="phdlab",
            splits=[_SPLITS[s] for s in splits],
            pool=None,
            pixelwise=pixelwise,
            num_classes=int(num_classes),
            compressed=bool(compress),
            imported_from=str(folder),
            model_pointer=pointer.read_text().strip() if pointer.is_file() else None,
            sample_ids="row order of phd-lab's files (it records no example ids)",
        )
    return writer.commit()


# ---------------------------------------------------------------------------------------------
# probe CSVs -> probes


def import_phdlab_probes(
    lake: Lake | str,
    path: str | Path,
    *,
    order_like: str | None = None,
    num_classes: int | None = None,
) -> str:
    """Import a phd-lab ``*_probe_performances.csv`` as a ``probes`` artifact (accuracies).

    Args:
        lake: the lake (or its URL).
        path: the CSV.
        order_like: a ``saturation``, ``latents`` or ``probes`` artifact whose layer order the
            rows take (default: natural order of the names).
        num_classes: recorded in the attributes (phd-lab does not store it).

    Returns:
        The ``probes`` artifact id (source ``phdlab``; ``val_accuracy`` NaN).
    """
    lake = as_lake(lake)
    path = _existing_file(path, "probe CSV")
    table = _read_csv(path)
    needed = {"name", "train_acc", "eval_acc"}
    if not needed <= set(table.columns):
        raise UserInputError(
            f"{path} has columns {list(table.columns)}; a phd-lab probe CSV has name, "
            "train_acc, eval_acc"
        )
    names = [re.sub(r"^(train|eval)-", "", str(n)) for n in table["name"]]
    if len(set(names)) != len(names):
        raise UserInputError(f"{path} lists a layer twice")
    if order_like is not None:
        known = [str(n) for n in lake.group(order_like)["layer"][:]]
        rank = {name: i for i, name in enumerate(known)}
        missing = [n for n in names if n not in rank]
        if missing:
            raise UserInputError(f"{order_like} has no layer(s) {missing}")
        order = sorted(range(len(names)), key=lambda i: rank[names[i]])
    else:
        order = sorted(range(len(names)), key=lambda i: natural_key(names[i]))
    digest = _sha256(path)
    config = {"source": "phdlab", "file_sha256": digest, "order_like": order_like}
    writer = lake.begin(
        "probes",
        config,
        [order_like] if order_like else [],
        sources={"csv": f"{path} sha256:{digest}"},
    )
    if writer.complete:
        return writer.id
    with writer:
        writer.write_many(
            {
                "layer": np.array([names[i] for i in order], dtype=object),
                "train_accuracy": table["train_acc"].to_numpy(np.float64)[order],
                "val_accuracy": np.full(len(order), np.nan),
                "test_accuracy": table["eval_acc"].to_numpy(np.float64)[order],
            }
        )
        writer.set_attrs(
            source="phdlab",
            C=1.0,
            num_classes=num_classes,
            solver="scikit-learn saga (phd-lab), unstandardized features",
            imported_from=str(path),
        )
    return writer.commit()
