"""PEFs and NPEFF decompositions from the reference implementation's HDF5 files into the lake.

Layouts (``mmatena/npeff_ref``, see docs of :func:`import_pefs_hdf5` /
:func:`import_npeff_hdf5`):

============== ================================================================================
D-PEF          ``data/labels`` [n], ``data/predicted_logits`` [n, C] (or ``data/logits``),
               ``data/fisher/values`` [n, k], ``data/fisher/indices`` [n, k],
               ``data/dense_fisher_norms`` [n]; attribute ``dense_fisher_size`` (P) of
               ``data/fisher``
LRM-PEF        ``data/labels``, ``data/logits``, ``data/values`` [n, k], ``data/col_offsets``
               [n, C'+1] (cumulative per-class entry counts), ``data/row_indices`` [n, k]
               (parameter index), ``data/pef_frobenius_norms`` [n]; attributes ``n_classes``
               (C') and ``n_parameters`` of ``data``
LVRM-PEF       ``data/labels``, ``data/logits``, ``data/values`` [n, k], ``data/row_indices``
               [n, k], ``data/ranks`` [n] (r_i), ``data/col_sizes`` [sum r_i] (entries in each of
               example i's r_i columns, not cumulative; column j = the (j+1)-th most probable
               class), ``data/pef_frobenius_norms`` [n]; attribute ``n_parameters`` of ``data``
D-NPEFF        ``data/W`` [n, r], ``data/H`` [r, P'], ``data/reduce_kept_indices`` [P'] with
               attribute ``full_dense_size`` (P)
sparse D-NPEFF ``data/W``, ``data/H/{values, row_indices (CSR pointers), column_indices}``,
               attribute ``shape`` of ``data/H``, ``data/reduce_kept_indices`` as above
LRM-NPEFF      ``data/W``, ``data/G`` [r, P'], ``data/new_to_old_col_indices``; attributes
               ``n_parameters``, ``n_classes`` of ``data``
============== ================================================================================

Large datasets are copied in blocks of rows (columns for H / G) under a progress record, so
an interrupted import resumes. h5py is an optional dependency (``pip install 'curvlake[hdf5]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curvlake.errors import UserInputError
from curvlake.lake import ArtifactWriter, Lake, open_lake
from curvlake.pipelines.data import file_sha256

ROWS_PER_BLOCK = 4096

_DPEF = ("data/labels", "data/fisher/values", "data/fisher/indices", "data/dense_fisher_norms")
_LRM_PEF = (
    "data/labels",
    "data/logits",
    "data/values",
    "data/col_offsets",
    "data/row_indices",
    "data/pef_frobenius_norms",
)
_LVRM_PEF = (
    "data/labels",
    "data/logits",
    "data/values",
    "data/row_indices",
    "data/ranks",
    "data/col_sizes",
    "data/pef_frobenius_norms",
)


def _h5py():
    try:
        import h5py
    except ImportError:
        raise UserInputError(
            "reading HDF5 files needs h5py: pip install 'curvlake[hdf5]'"
        ) from None
    return h5py


def _open(path: Path):
    h5py = _h5py()
    if not path.is_file():
        raise UserInputError(f"no such file: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise UserInputError(f"{path} is not a readable HDF5 file: {error}") from None


def _require(file, path: Path, what: str, datasets=(), attrs=()) -> None:
    """Raise naming every missing dataset and ``object.attribute`` of a ``what`` file."""
    missing = [name for name in datasets if name not in file]
    missing += [
        f"attribute {name}.{attr}"
        for name, attr in attrs
        if name not in file or attr not in file[name].attrs
    ]
    if missing:
        raise UserInputError(f"{path} is not a complete {what} file: missing {', '.join(missing)}")


def _scalar(value: Any) -> int:
    # The C++ writer stores sizes as 1-element arrays.
    return int(np.asarray(value).ravel()[0])


def _index_dtype(size: int) -> str:
    return "int32" if size < 2**31 else "int64"


def _copy_row_blocks(writer: ArtifactWriter, n: int, convert, outputs: dict, rows_per_block: int):
    """Copy rows in blocks (chunk rows = blocks), resumable: ``convert(rows) -> {name: array}``."""
    n_blocks = max(1, -(-n // rows_per_block))
    done = writer.progress("rows", n_blocks)
    for block in done.pending():
        rows = slice(block * rows_per_block, min(n, (block + 1) * rows_per_block))
        for name, values in convert(rows).items():
            outputs[name][rows] = values
        done.mark_done(block)


def _check_indices(indices: np.ndarray, n_parameters: int, name: str) -> None:
    if indices.size and (indices.min() < 0 or indices.max() >= n_parameters):
        raise UserInputError(
            f"{name} has parameter indices outside 0..{n_parameters - 1} "
            f"({indices.min()}..{indices.max()})"
        )


# -- PEFs ----------------------------------------------------------------------------------------


def _dpef_rows(file, rows: slice, n_parameters: int) -> dict[str, np.ndarray]:
    """One block of a D-PEF file, entries re-sorted by parameter index."""
    values = np.asarray(file["data/fisher/values"][rows], dtype=np.float32)
    indices = np.asarray(file["data/fisher/indices"][rows], dtype=np.int64)
    _check_indices(indices, n_parameters, "data/fisher/indices")
    order = np.argsort(indices, axis=1, kind="stable")
    return {
        "values": np.take_along_axis(values, order, axis=1),
        "indices": np.take_along_axis(indices, order, axis=1),
    }


def lrm_class_index(col_offsets: np.ndarray, k: int) -> np.ndarray:
    """Per-entry class of LRM-PEF rows from cumulative ``col_offsets`` (n, C'+1) -> (n, k).

    Entry t of row i belongs to class c when ``col_offsets[i, c] <= t < col_offsets[i, c+1]``.
    """
    col_offsets = np.asarray(col_offsets, dtype=np.int64)
    counts = np.diff(col_offsets, axis=1)
    n, n_classes = counts.shape
    bad = (col_offsets[:, 0] != 0) | (col_offsets[:, -1] != k) | (counts < 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserInputError(
            f"col_offsets row {row} is {col_offsets[row].tolist()}: expected a non-decreasing "
            f"cumulative count from 0 to k={k}"
        )
    classes = np.tile(np.arange(n_classes, dtype=np.int64), n)
    return np.repeat(classes, counts.ravel()).reshape(n, k)


def _lrm_rows(
    file, rows: slice, n_parameters: int, lvrm: _LvrmCounts | None
) -> dict[str, np.ndarray]:
    """One block of an LRM/LVRM-PEF file with per-entry classes, sorted by (class, parameter).

    Classes come from the cumulative ``col_offsets`` (LRM) or from the LVRM ranks and column
    sizes of the block's examples.
    """
    values = np.asarray(file["data/values"][rows], dtype=np.float32)
    params = np.asarray(file["data/row_indices"][rows], dtype=np.int64)
    _check_indices(params, n_parameters, "data/row_indices")
    k = values.shape[1]
    if lvrm is None:
        classes = lrm_class_index(file["data/col_offsets"][rows], k)
    else:
        ranks = lvrm.ranks[rows]
        first = lvrm.starts[rows.start]
        classes = lvrm_class_index(ranks, lvrm.col_sizes[first : first + ranks.sum()], k)
    order = np.argsort(classes * n_parameters + params, axis=1, kind="stable")
    return {
        "values": np.take_along_axis(values, order, axis=1),
        "indices": np.take_along_axis(params, order, axis=1),
        "class_index": np.take_along_axis(classes, order, axis=1),
    }


@dataclass(frozen=True)
class _LvrmCounts:
    """An LVRM file's ranks, column sizes and each example's first column (all small)."""

    ranks: np.ndarray
    col_sizes: np.ndarray
    starts: np.ndarray


def _check_lvrm_counts(ranks: np.ndarray, col_sizes: np.ndarray, k: int) -> None:
    """Refuse ranks / column sizes that do not give every example exactly ``k`` entries."""
    if ranks.size and ranks.min() < 0:
        raise UserInputError("data/ranks has negative ranks")
    if col_sizes.size != ranks.sum():
        raise UserInputError(
            f"data/col_sizes has {col_sizes.size} entries, data/ranks sums to {ranks.sum()}"
        )
    if col_sizes.size and col_sizes.min() < 0:
        raise UserInputError("data/col_sizes has negative sizes")
    example = np.repeat(np.arange(ranks.size), ranks)
    per_example = np.bincount(example, weights=col_sizes, minlength=ranks.size).astype(np.int64)
    bad = np.flatnonzero(per_example != k)
    if bad.size:
        raise UserInputError(
            f"data/col_sizes of example {bad[0]} sum to {per_example[bad[0]]}, not k = {k} "
            f"({bad.size} such examples)"
        )


def lvrm_class_index(ranks: np.ndarray, col_sizes: np.ndarray, k: int) -> np.ndarray:
    """Per-entry column (rank position) ``(n, k)`` from LVRM ranks and per-column entry counts.

    Example ``i`` owns ``col_sizes[s_i : s_i + r_i]`` with ``s_i = r_0 + … + r_{i-1}``; its ``k``
    entries run through columns ``0 … r_i − 1`` in order, ``col_sizes`` entries each.
    """
    ranks = np.asarray(ranks, dtype=np.int64).ravel()
    col_sizes = np.asarray(col_sizes, dtype=np.int64).ravel()
    _check_lvrm_counts(ranks, col_sizes, k)
    column = np.arange(col_sizes.size) - np.repeat(np.cumsum(ranks) - ranks, ranks)
    return np.repeat(column, col_sizes).reshape(ranks.size, k)


def import_pefs_hdf5(
    lake: Lake | str,
    path: str | Path,
    *,
    name: str | None = None,
    rows_per_block: int = ROWS_PER_BLOCK,
) -> str:
    """Store a reference-implementation PEF file (D-, LRM- or LVRM-PEF) as a ``pefs`` artifact.

    Entries are re-sorted as our PEFs are: by parameter index (D-PEF; the reference stores them
    by descending value), by (class, parameter) for LRM-PEFs, whose cumulative ``col_offsets``
    become a per-entry ``class_index``, and for LVRM-PEFs, whose ``ranks`` and per-column
    ``col_sizes`` become the per-example ``rank`` and a per-entry ``class_index`` (the rank
    position of the class, as :func:`~curvlake.pipelines.npeff.pefs.per_example_fisher_lvrm`
    numbers the rows of A). ``sample_id`` is the row in the file; the artifact names
    no run (the model and inputs are not in the file), so perturbation tests and image collages
    do not apply to it.

    Args:
        lake: the lake (or its URL).
        path: the HDF5 file.
        name: a name for the data (default: the file stem).
        rows_per_block: examples per stored chunk and per copy step.

    Returns:
        The ``pefs`` artifact id (config: file name and sha256 of the file).

    Raises:
        UserInputError: h5py missing, not an HDF5 file, an unknown layout, missing datasets /
            attributes, or inconsistent entry counts.
    """
    lake = open_lake(lake) if isinstance(lake, str) else lake
    path = Path(path)
    if not isinstance(rows_per_block, int) or rows_per_block < 1:
        raise UserInputError(f"rows_per_block must be a positive integer, got {rows_per_block!r}")
    with _open(path) as file:
        lvrm = None
        if "data/ranks" in file:
            pef_kind = "lvrm"
            _require(file, path, "LVRM-PEF", _LVRM_PEF, [("data", "n_parameters")])
            logits_name = "data/logits"
            n_parameters = _scalar(file["data"].attrs["n_parameters"])
            values_name, norms_name = "data/values", "data/pef_frobenius_norms"
            ranks = np.asarray(file["data/ranks"][:], dtype=np.int64).ravel()
            col_sizes = np.asarray(file["data/col_sizes"][:], dtype=np.int64).ravel()
            _check_lvrm_counts(ranks, col_sizes, int(file[values_name].shape[1]))
            lvrm = _LvrmCounts(ranks, col_sizes, np.cumsum(ranks) - ranks)
        elif "data/fisher" in file:
            pef_kind = "diag"
            _require(file, path, "D-PEF", _DPEF, [("data/fisher", "dense_fisher_size")])
            # The reference writes predicted_logits but its own loader reads logits.
            logits_name = next(
                (m for m in ("data/predicted_logits", "data/logits") if m in file), None
            )
            if logits_name is None:
                raise UserInputError(
                    f"{path} is not a complete D-PEF file: missing data/predicted_logits"
                )
            n_parameters = _scalar(file["data/fisher"].attrs["dense_fisher_size"])
            values_name, norms_name = "data/fisher/values", "data/dense_fisher_norms"
        elif "data/col_offsets" in file:
            pef_kind = "lowrank"
            _require(
                file, path, "LRM-PEF", _LRM_PEF, [("data", "n_classes"), ("data", "n_parameters")]
            )
            logits_name = "data/logits"
            n_parameters = _scalar(file["data"].attrs["n_parameters"])
            values_name, norms_name = "data/values", "data/pef_frobenius_norms"
        else:
            raise UserInputError(
                f"{path} is not a PEF file: expected data/fisher/values (D-PEF), "
                "data/col_offsets (LRM-PEF) or data/ranks (LVRM-PEF)"
            )
        n, k = (int(s) for s in file[values_name].shape)
        num_classes = int(file[logits_name].shape[1])
        if pef_kind == "lowrank":
            lrm_class_index(file["data/col_offsets"][:], k)  # validate before writing anything
        if lvrm is not None and lvrm.ranks.size and lvrm.ranks.max() > num_classes:
            raise UserInputError(
                f"{path}: data/ranks has ranks up to {lvrm.ranks.max()}, more than the "
                f"{num_classes} classes of data/logits"
            )
        config = {
            "imported_from": path.name,
            "sha256": file_sha256(path),
            "name": name or path.stem,
            "pef_kind": pef_kind,
            "storage": "topk",
            "k": int(k),
            "n_examples": int(n),
        }
        writer = lake.begin("pefs", config)
        if writer.complete:
            return writer.id
        with writer:
            chunks = (rows_per_block, k)
            outputs = {
                "values": writer.create_array("values", (n, k), "float32", chunks=chunks),
                "indices": writer.create_array(
                    "indices", (n, k), _index_dtype(n_parameters), chunks=chunks
                ),
            }
            if pef_kind == "diag":
                convert = lambda rows: _dpef_rows(file, rows, n_parameters)  # noqa: E731
            else:
                outputs["class_index"] = writer.create_array(
                    "class_index", (n, k), "int32", chunks=chunks
                )
                convert = lambda rows: _lrm_rows(file, rows, n_parameters, lvrm)  # noqa: E731
            _copy_row_blocks(writer, n, convert, outputs, rows_per_block)
            writer.write(
                "logits",
                np.asarray(file[logits_name][:], dtype=np.float32),
                chunks=(rows_per_block, num_classes),
            )
            writer.write("dense_norm", np.asarray(file[norms_name][:], dtype=np.float32))
            writer.write("label", np.asarray(file["data/labels"][:], dtype=np.int64))
            writer.write("sample_id", np.arange(n, dtype=np.int64))
            if lvrm is not None:
                writer.write("rank", lvrm.ranks)
            attrs = {
                "pef_kind": pef_kind,
                "storage": "topk",
                "n_parameters": n_parameters,
                "num_classes": num_classes,
                "imported_from": path.name,
                "name": name or path.stem,
            }
            if pef_kind == "lowrank":
                attrs["n_pef_classes"] = _scalar(file["data"].attrs["n_classes"])
            for holder in (file, file["data"]):
                if "min_prob_class" in holder.attrs:
                    min_prob = np.asarray(holder.attrs["min_prob_class"]).ravel()[0]
                    attrs["min_prob"] = float(min_prob)
            writer.set_attrs(**attrs)
    return writer.commit()


# -- NPEFF decompositions ------------------------------------------------------------------------


def _copy_columns(writer: ArtifactWriter, name: str, source, dtype) -> None:
    """Copy an (r, P') dataset into a new array, one stored column chunk at a time."""
    shape = tuple(int(s) for s in source.shape)
    target = writer.create_array(name, shape, dtype)
    step = int(target.chunks[1])
    n_blocks = max(1, -(-shape[1] // step))
    done = writer.progress(name, n_blocks)
    for block in done.pending():
        cols = slice(block * step, min(shape[1], (block + 1) * step))
        target[:, cols] = np.asarray(source[:, cols], dtype=dtype)
        done.mark_done(block)


def _copy_vector(writer: ArtifactWriter, name: str, source, dtype) -> None:
    """Copy a 1-D dataset into a new array, one stored chunk at a time."""
    size = int(source.shape[0])
    target = writer.create_array(name, (size,), dtype)
    step = int(target.chunks[0])
    done = writer.progress(name, max(1, -(-size // step)))
    for block in done.pending():
        part = slice(block * step, min(size, (block + 1) * step))
        target[part] = np.asarray(source[part], dtype=dtype)
        done.mark_done(block)


def _float_dtype(dataset) -> np.dtype:
    dtype = np.dtype(dataset.dtype)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype("float64")


def import_npeff_hdf5(lake: Lake | str, path: str | Path, *, pefs_id: str | None = None) -> str:
    """Store a reference-implementation NPEFF decomposition as an ``npeff`` artifact.

    D-NPEFF files become ``format=dense`` (H, with ``reduce_kept_indices`` as
    ``kept_columns``), sparse D-NPEFF files ``format=csr`` (``H_data``, ``H_indices``,
    ``H_indptr``), LRM-NPEFF files ``format=lowrank`` (G). The loss history is not imported
    (the reference logs a different, offset quantity); ``loss`` and ``seconds`` are empty.

    Args:
        lake: the lake (or its URL).
        path: the HDF5 file.
        pefs_id: the ``pefs`` artifact the decomposition was fitted on (an input of the new
            artifact; gives labels and sample ids, and lets top-example collages and
            perturbation tests find the run). Without it, labels are -1 and sample ids
            0..n-1.

    Returns:
        The ``npeff`` artifact id (config: file name and sha256 of the file).

    Raises:
        UserInputError: h5py missing, not an HDF5 file, an unknown layout, missing datasets or
            attributes, or a ``pefs_id`` with another number of examples or parameters.
    """
    lake = open_lake(lake) if isinstance(lake, str) else lake
    path = Path(path)
    pefs = None
    if pefs_id is not None:
        info = lake.info(pefs_id)
        if info.kind != "pefs":
            raise UserInputError(f"{pefs_id} is a {info.kind} artifact, not pefs")
        pefs = lake.group(pefs_id)
    with _open(path) as file:
        if "data/W" not in file:
            raise UserInputError(f"{path} is not an NPEFF decomposition file: missing data/W")
        if "data/G" in file:
            fmt, what = "lowrank", "LRM-NPEFF"
            _require(
                file,
                path,
                what,
                ["data/new_to_old_col_indices"],
                [("data", "n_parameters")],
            )
            kept_name = "data/new_to_old_col_indices"
            n_parameters = _scalar(file["data"].attrs["n_parameters"])
        else:
            fmt = "csr" if isinstance(file.get("data/H"), _h5py().Group) else "dense"
            what = "sparse D-NPEFF" if fmt == "csr" else "D-NPEFF"
            needed = ["data/H", "data/reduce_kept_indices"]
            attrs = [("data/reduce_kept_indices", "full_dense_size")]
            if fmt == "csr":
                needed += ["data/H/values", "data/H/row_indices", "data/H/column_indices"]
                attrs.append(("data/H", "shape"))
            _require(file, path, what, needed, attrs)
            kept_name = "data/reduce_kept_indices"
            n_parameters = _scalar(file[kept_name].attrs["full_dense_size"])
        W = file["data/W"]
        n, r = (int(s) for s in W.shape)
        n_columns = int(file[kept_name].shape[0])
        if fmt == "dense" and tuple(file["data/H"].shape) != (r, n_columns):
            raise UserInputError(
                f"{path}: data/H has shape {file['data/H'].shape}, expected ({r}, {n_columns})"
            )
        if fmt == "lowrank" and tuple(file["data/G"].shape) != (r, n_columns):
            raise UserInputError(
                f"{path}: data/G has shape {file['data/G'].shape}, expected ({r}, {n_columns})"
            )
        if fmt == "csr":
            shape = [int(s) for s in np.asarray(file["data/H"].attrs["shape"]).ravel()]
            indptr = np.asarray(file["data/H/row_indices"][:], dtype=np.int64)
            nnz = int(file["data/H/values"].shape[0])
            if shape != [r, n_columns]:
                raise UserInputError(
                    f"{path}: data/H has shape attribute {shape}, expected [{r}, {n_columns}]"
                )
            if (
                indptr.shape != (r + 1,)
                or indptr[0] != 0
                or indptr[-1] != nnz
                or (np.diff(indptr) < 0).any()
                or file["data/H/column_indices"].shape != (nnz,)
            ):
                raise UserInputError(
                    f"{path}: data/H/row_indices is not a CSR row pointer of {r} rows over "
                    f"{nnz} values"
                )
        if pefs is not None:
            n_pefs = int(pefs["label"].shape[0])
            if n_pefs != n:
                raise UserInputError(
                    f"{path} has {n} examples, the PEFs {pefs_id} {n_pefs}: not the same data"
                )
            if int(pefs.attrs["n_parameters"]) != n_parameters:
                raise UserInputError(
                    f"{path} has {n_parameters} parameters, the PEFs {pefs_id} "
                    f"{pefs.attrs['n_parameters']}: not the same model"
                )
        config = {"imported_from": path.name, "sha256": file_sha256(path)}
        writer = lake.begin("npeff", config, [pefs_id] if pefs_id else [])
        if writer.complete:
            return writer.id
        with writer:
            writer.write("W", np.asarray(W[:], dtype=_float_dtype(W)))
            if fmt == "dense":
                _copy_columns(writer, "H", file["data/H"], _float_dtype(file["data/H"]))
            elif fmt == "lowrank":
                _copy_columns(writer, "G", file["data/G"], _float_dtype(file["data/G"]))
            else:
                _copy_vector(writer, "H_data", file["data/H/values"], np.float32)
                _copy_vector(writer, "H_indices", file["data/H/column_indices"], np.int64)
                writer.write("H_indptr", indptr)
            _copy_vector(writer, "kept_columns", file[kept_name], np.int64)
            writer.write("loss", np.zeros(0, np.float64))
            writer.write("seconds", np.zeros(0, np.float64))
            if pefs is not None:
                writer.write("label", np.asarray(pefs["label"][:], dtype=np.int64))
                writer.write("sample_id", np.asarray(pefs["sample_id"][:], dtype=np.int64))
            else:
                writer.write("label", np.full(n, -1, dtype=np.int64))
                writer.write("sample_id", np.arange(n, dtype=np.int64))
            writer.set_attrs(
                format=fmt,
                n_components=r,
                n_parameters=n_parameters,
                solver="imported",
                converged=None,
                pefs=pefs_id,
                imported_from=path.name,
            )
    return writer.commit()


__all__ = ["import_npeff_hdf5", "import_pefs_hdf5", "lrm_class_index"]
