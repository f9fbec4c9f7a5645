"""Tall ``(param, column)`` matrices on Dask: row blocks, TSQR, projections, row-block sums.

The sketches and eigenvectors of a Hessian are ``D × k`` with ``D`` up to many millions, so no
step holds one whole: they are cut into row blocks of :func:`param_block_rows` rows (the chunks
of the ``param`` axis) and every reduction over ``param`` is a sum of per-row-block partials,
added in block order on a fixed pairwise tree (:func:`row_block_reduce`), so the result does
not depend on the worker count or on the order in which blocks finish. The QR is Dask's TSQR
(Benson, Gleich & Demmel 2013), stored block by block (:func:`orthonormalize_into`).

Chunks are moved to the worker's device before any arithmetic (:func:`on_worker_device`: CuPy
on GPU workers, NumPy otherwise) and the kernels of :mod:`~curvlake.pipelines.hessian.recovery`
and :mod:`~curvlake.pipelines.hessian.overlap` pick the array module of their input, so the same
graph runs on either; partial results come back to the host as float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

from curvlake._array import get_namespace, to_numpy

#: Bytes of one generated block of an i.i.d. test matrix inside a projection.
PROJECTION_BYTES = 32 * 2**20
#: Test-matrix kinds that act on whole columns (a transform of all ``D`` entries).
WHOLE_COLUMN_KINDS = ("ssrft", "seed_ssrft")


def param_block_rows(n_params: int, width: int, budget: int, itemsize: int = 8) -> int:
    """Rows of θ per row block of a ``(param, width)`` matrix.

    As many rows as fit in ``budget`` bytes, but at least ``2 · width``: Dask's TSQR only
    reduces the stacked ``R`` factors recursively when blocks are at least twice as tall as
    wide, which keeps every step's memory at one block. At most ``D``.
    """
    rows = max(2 * max(1, width), budget // (itemsize * max(1, width)))
    return int(max(1, min(n_params, rows)))


def on_worker_device(block: Any) -> Any:
    """A chunk on the task's device: a CuPy array on a GPU worker, else a NumPy array."""
    from curvlake.engine import torch_device

    if torch_device() == "cuda":
        import cupy

        return cupy.asarray(block)
    return np.asarray(block)


def _host(block: Any) -> np.ndarray:
    return to_numpy(block)


def tall(array: Any, rows: int) -> da.Array:
    """A Dask array of a tall matrix (a zarr array or a Dask array) in row blocks of ``rows``
    rows and one column block."""
    if isinstance(array, da.Array):
        return array.rechunk((rows, array.shape[1]))
    return da.from_array(array, chunks=(rows, array.shape[1]), name=False)


def column_blocks(array: Any, width: int) -> da.Array:
    """A Dask array of a tall matrix in blocks of whole columns (all ``D`` rows each)."""
    if isinstance(array, da.Array):
        return array.rechunk((array.shape[0], width))
    return da.from_array(array, chunks=(array.shape[0], width), name=False)


def _combine_sum(a: Any, b: Any) -> Any:
    if isinstance(a, tuple):
        return tuple(x + y for x, y in zip(a, b, strict=True))
    return a + b


def _pairwise(parts: list, combine: Callable[[Any, Any], Any]) -> Any:
    """Reduce delayed ``parts`` pairwise, in index order (a fixed tree: deterministic)."""
    if not parts:
        raise ValueError("nothing to reduce")
    combine_delayed = dask.delayed(combine, pure=True)
    while len(parts) > 1:
        paired = [combine_delayed(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        parts = paired + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def _call_on_rows(function: Callable[..., Any], row_start: int, blocks: list, args: tuple) -> Any:
    result = function(row_start, *[on_worker_device(b) for b in blocks], *args)
    if isinstance(result, tuple):
        return tuple(np.asarray(_host(r), dtype=np.float64) for r in result)
    return np.asarray(_host(result), dtype=np.float64)


def _row_starts(arrays: Sequence[da.Array]) -> list[int]:
    chunks = arrays[0].chunks[0]
    for a in arrays:
        if a.chunks[0] != chunks or a.numblocks[1] != 1:
            raise ValueError("row-block reductions need equal row blocks and one column block")
    return [int(s) for s in np.cumsum((0, *chunks[:-1]))]


def row_block_partials(
    function: Callable[..., Any], arrays: Sequence[da.Array], *args: Any
) -> list:
    """Delayed ``function(row_start, block_0, block_1, ..., *args)`` of every row block."""
    starts = _row_starts(arrays)
    blocks = [a.to_delayed().reshape(-1) for a in arrays]
    call = dask.delayed(_call_on_rows, pure=True)
    return [call(function, start, [b[i] for b in blocks], args) for i, start in enumerate(starts)]


def row_block_reduce(
    function: Callable[..., Any],
    arrays: Sequence[da.Array],
    *args: Any,
    combine: Callable[[Any, Any], Any] = _combine_sum,
):
    """Delayed reduction (default: the sum, float64, on the host) of
    ``function(row_start, *row blocks, *args)`` over the common row blocks of ``arrays``, in
    row order on a fixed pairwise tree."""
    return _pairwise(row_block_partials(function, arrays, *args), combine)


# -- projections through test matrices ----------------------------------------------------------


def iid_transpose_matmul(matrix: Any, x: Any, row_start: int = 0) -> Any:
    """``Ω[r0 : r0 + n, :]ᵀ x`` (float64) for a row block ``x`` of a Gaussian / Rademacher
    test matrix, generated a few columns at a time so memory stays at ``PROJECTION_BYTES``."""
    xp = get_namespace(x)
    x64 = xp.asarray(x, dtype=xp.float64)
    n, n_cols = x.shape[0], matrix.shape[1]
    width = max(1, PROJECTION_BYTES // (8 * max(1, n)))
    out = xp.empty((n_cols, *x.shape[1:]), dtype=xp.float64)
    for c0 in range(0, n_cols, width):
        c1 = min(n_cols, c0 + width)
        out[c0:c1] = matrix.block((row_start, row_start + n), (c0, c1), xp.float64, xp).T @ x64
    return out


def transpose_columns(matrix: Any, x: Any) -> Any:
    """``Ωᵀ x`` (float64, on ``x``'s device) for whole columns ``x`` (all ``D`` rows)."""
    if matrix.kind in WHOLE_COLUMN_KINDS:
        return matrix.transpose_matmul(x)
    return iid_transpose_matmul(matrix, x, 0)


def _project_rows(row_start: int, block: Any, matrix: Any) -> Any:
    return iid_transpose_matmul(matrix, block, row_start)


def _project_columns(block: Any, matrix: Any) -> np.ndarray:
    return np.asarray(_host(matrix.transpose_matmul(on_worker_device(block))), dtype=np.float64)


def transpose_project(matrix: Any, x: Any, rows: int, width: int):
    """Delayed ``Ωᵀ X`` (``s × n``, float64 on the host) for a tall ``X`` (zarr or Dask).

    i.i.d. kinds: a sum of row-block partials over blocks of ``rows`` rows. Whole-column kinds
    (SSRFT): one transform per block of ``width`` whole columns, concatenated.
    """
    if matrix.kind in WHOLE_COLUMN_KINDS:
        blocks = column_blocks(x, width).to_delayed().reshape(-1)
        project = dask.delayed(_project_columns, pure=True)
        parts = [project(b, matrix) for b in blocks]
        return dask.delayed(np.concatenate, pure=True)(parts, axis=1)
    return row_block_reduce(_project_rows, [tall(x, rows)], matrix)


# -- QR and rotations ---------------------------------------------------------------------------


def orthonormalize_into(y: da.Array, target: Any, last: int | None = None) -> np.ndarray:
    """Thin QR ``Y = Q R`` by Dask's TSQR over the row blocks of ``y``; ``Q`` (or its ``last``
    columns only: a block Krylov extension, :func:`~curvlake.pipelines.hessian.recovery.
    extend_krylov_basis`) is stored into ``target`` block by block (each block writes whole
    chunks of it) and ``R`` returned (float64, host)."""
    on_device = y.map_blocks(on_worker_device, dtype=y.dtype, meta=np.empty((0, 0), y.dtype))
    q, r = da.linalg.tsqr(on_device)
    if last is not None:
        q = q[:, q.shape[1] - last :]
    stored = da.store(
        q.map_blocks(_host, dtype=q.dtype, meta=np.empty((0, 0), q.dtype)),
        target,
        lock=False,
        compute=False,
    )
    _, r_value = dask.compute(stored, r)
    return np.asarray(_host(r_value), dtype=np.float64)


def _rotate(block: Any, rotation: np.ndarray) -> np.ndarray:
    b = on_worker_device(block)
    xp = get_namespace(b)
    w = xp.asarray(rotation, dtype=xp.float64)
    return _host(xp.asarray(b, dtype=xp.float64) @ w).astype(block.dtype)


def store_rotated(q: da.Array, rotation: np.ndarray, target: Any) -> None:
    """Store ``Q W`` (in ``Q``'s dtype) into ``target``, row block by row block."""
    rotated = q.map_blocks(
        _rotate,
        rotation,
        dtype=q.dtype,
        chunks=(q.chunks[0], (rotation.shape[1],)),
        meta=np.empty((0, 0), q.dtype),
    )
    da.store(rotated, target, lock=False)


def _largest_entries(row_start: int, block: Any, rotation: np.ndarray) -> tuple:
    xp = get_namespace(block)
    u = xp.asarray(block, dtype=xp.float64) @ xp.asarray(rotation)
    where = xp.argmax(xp.abs(u), axis=0)
    value = u[where, xp.arange(u.shape[1])]
    return (xp.abs(value), value, where.astype(xp.float64) + row_start)


def _larger_entry(a: tuple, b: tuple) -> tuple:
    """Per column, the entry of larger magnitude (the earlier row on ties)."""
    take_b = b[0] > a[0]
    return tuple(np.where(take_b, y, x) for x, y in zip(a, b, strict=True))


def sign_convention(q: da.Array, rotation: np.ndarray):
    """Delayed signs ``σ_j`` making the entry of largest magnitude of column ``j`` of
    ``Q W diag(σ)`` positive (the first such row on ties): a deterministic sign for each
    eigenvector, whatever the algorithm that found it."""
    best = row_block_reduce(_largest_entries, [q], rotation, combine=_larger_entry)
    return dask.delayed(_signs_of, pure=True)(best)


def _signs_of(entries: tuple) -> np.ndarray:
    return np.where(entries[1] < 0, -1.0, 1.0)


def signed_by_largest_entry(u: np.ndarray) -> np.ndarray:
    """Flip the columns of an in-memory ``U`` by :func:`sign_convention` (the exact method)."""
    where = np.argmax(np.abs(u), axis=0)
    return u * np.where(u[where, np.arange(u.shape[1])] < 0, -1.0, 1.0)
