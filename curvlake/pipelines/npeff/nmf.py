"""D-NPEFF: non-negative factorization of a matrix of diagonal per-example Fishers.

NPEFF (Matena & Raffel, "NPEFF: Non-Negative Per-Example Fisher Factorization",
arXiv 2310.04649) stacks the diagonal PEFs of ``n`` examples into ``A ∈ R_{≥0}^{n×P}`` (one row
per example, one column per parameter) and solves

    min_{W ≥ 0, H ≥ 0} ‖A − W H‖²_F,     W ∈ R^{n×r},  H ∈ R^{r×P'}.

Two solvers share one layout:

* ``"mu"``: Lee–Seung multiplicative updates (Lee & Seung, "Algorithms for non-negative matrix
  factorization", NIPS 2001), the reference implementation's algorithm. W first, then H:
  ``W ← W ⊙ AHᵀ / (W HHᵀ + ε)``, ``H ← H ⊙ WᵀA / (WᵀW H + ε)``.
* ``"hals"``: hierarchical alternating least squares (Cichocki & Phan, "Fast local algorithms
  for large scale nonnegative matrix and tensor factorizations", IEICE 2009), i.e. exact
  coordinate minimisation over one row of H / one column of W at a time:
  ``W[:, j] ← max(0, W[:, j] + (AHᵀ[:, j] − W HHᵀ[:, j]) / HHᵀ[j, j])`` and the same for the
  rows of H with ``WᵀA`` and ``WᵀW``. Each A pass is followed by ``w_sweeps`` / ``h_sweeps``
  sweeps on the cached small products (the "accelerated HALS" of Gillis & Glineur,
  "Accelerated multiplicative updates and hierarchical ALS algorithms for nonnegative matrix
  factorization", Neural Computation 2012). With one sweep each (the default) it is the same
  algorithm as scikit-learn's ``NMF(solver="cd", shuffle=False)``.

Layout (shared by the in-memory and the Dask versions, which give the same iterates):

* A is held by **column blocks** (rows whole: ``n`` fits in memory, ``P'`` may not). Blocks are
  SciPy CSR matrices (cupyx CSR on GPU) or dense NumPy/CuPy arrays.
* W (n×r, float64) lives in memory. H (r×P') is split like A's columns.
* Per iteration, one pass over A: the W update needs only ``AHᵀ`` (n×r) and ``HHᵀ`` (r×r),
  which are sums over column blocks; the H update of a block needs only ``W``, ``WᵀW`` and that
  block (``WᵀA_b``). The pass that updates H_b also emits ``A_b H_bᵀ`` and ``H_b H_bᵀ`` of the
  *new* H_b, so the next W update and the loss need no second pass.
* The loss is exact and cheap: ``‖A − WH‖² = ‖A‖² − 2 tr(Wᵀ(AHᵀ)) + tr((WᵀW)(HHᵀ))``, reported
  as the relative loss ``‖A − WH‖_F / ‖A‖_F`` after every iteration.

The per-iteration state (:class:`NmfState`) is explicit so a fit can be checkpointed and
resumed: see :func:`nmf_step_dask`, :func:`iter_nmf_dask` and :meth:`NmfState.checkpoint`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from curvlake._array import get_namespace, to_numpy
from curvlake.errors import UserInputError

__all__ = [
    "INIT_TILE",
    "NmfConfig",
    "NmfState",
    "PefMatrix",
    "block_stats",
    "column_blocks_to_dask",
    "dask_from_block_loader",
    "fit_nmf",
    "fit_nmf_dask",
    "init_h_columns",
    "init_w",
    "iter_nmf_dask",
    "nmf_init",
    "nmf_init_dask",
    "nmf_state_from_checkpoint",
    "nmf_step",
    "nmf_step_dask",
    "preprocess_pefs",
    "relative_loss",
    "scatter_columns",
    "squared_loss",
    "topk_to_dask_column_blocks",
    "update_h_block",
    "update_w",
]

log = logging.getLogger(__name__)

Solver = Literal["mu", "hals"]
_SOLVERS = ("mu", "hals")

#: Width (in kept columns) of the tiles the random H init is drawn in. Fixed, so the init does
#: not depend on the column chunking: tile ``t`` always comes from ``default_rng([seed, 1, t])``.
INIT_TILE = 4096
#: Row normalisation offset of the reference implementation: ``A_i / (‖f_i‖ + 1e-9)``.
NORM_EPS = 1e-9
_F32_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PefMatrix:
    """A preprocessed PEF matrix held by column blocks.

    Attributes:
        blocks: column blocks ``A_b`` (each ``n × P'_b``), SciPy CSR or dense arrays, in order.
        kept_columns: int64 ``(P',)`` map new column → original parameter index.
        n_params: the original number of columns ``P``.
    """

    blocks: tuple[Any, ...]
    kept_columns: np.ndarray
    n_params: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks[0].shape[0], int(sum(b.shape[1] for b in self.blocks)))

    @property
    def col_chunks(self) -> tuple[int, ...]:
        return tuple(int(b.shape[1]) for b in self.blocks)

    @property
    def nnz(self) -> int:
        return int(sum(b.nnz if sp.issparse(b) else np.count_nonzero(b) for b in self.blocks))

    def to_dask(self) -> Any:
        """The blocks as a Dask array chunked by columns (see :func:`column_blocks_to_dask`)."""
        return column_blocks_to_dask(self.blocks)

    def scatter(self, H: Any) -> Any:
        """Scatter ``H`` (r×P') back to the full parameter space (r×P), zeros elsewhere."""
        return scatter_columns(H, self.kept_columns, self.n_params)

    def to_cupy(self) -> PefMatrix:
        """The same matrix with blocks on the GPU (cupyx CSR or CuPy dense)."""
        import cupy
        import cupyx.scipy.sparse as csp

        blocks = tuple(
            csp.csr_matrix(b) if sp.issparse(b) else cupy.asarray(b) for b in self.blocks
        )
        return replace(self, blocks=blocks)


def _block_bounds(n_cols: int, block_size: int | None) -> list[tuple[int, int]]:
    if block_size is None or block_size >= n_cols:
        return [(0, n_cols)]
    return [(s, min(s + block_size, n_cols)) for s in range(0, n_cols, block_size)]


def preprocess_pefs(
    values: Any,
    indices: Any | None = None,
    dense_norm: Any | None = None,
    *,
    n_params: int | None = None,
    min_nnz: int = 1,
    block_size: int | None = None,
    dense_blocks: bool = False,
    dtype: Any = None,
    norm_eps: float = NORM_EPS,
) -> PefMatrix:
    """Normalise rows, prune rare columns and split a PEF matrix into column blocks.

    Row ``i`` is divided by ``dense_norm_i + norm_eps`` (the L2 norm of the *dense* PEF, so the
    kept part has norm ≤ 1), then columns with fewer than ``min_nnz`` nonzeros are dropped
    (``min_nnz=1`` drops only all-zero columns), keeping the new → old column map.

    Args:
        values: the sparse top-k form ``values (n, k)`` (with ``indices``), or a dense
            ``(n, P)`` array / SciPy sparse matrix (with ``indices=None``).
        indices: int ``(n, k)`` parameter index of each value (top-k form), or ``None``.
        dense_norm: ``(n,)`` L2 norms of the dense rows; defaults to the norms of the given
            rows (exact for dense input).
        n_params: ``P`` (required for the top-k form; inferred for dense input).
        min_nnz: keep columns with at least this many nonzeros.
        block_size: column-block width in kept columns (``None``: one block).
        dense_blocks: return dense blocks instead of CSR.
        dtype: value dtype of the blocks (default: that of ``values``, float64 if not float).
        norm_eps: offset added to the norms.

    Returns:
        A :class:`PefMatrix`.
    """
    if min_nnz < 1:
        raise UserInputError(f"min_nnz must be >= 1, got {min_nnz}")
    if block_size is not None and block_size < 1:
        raise UserInputError(f"block_size must be >= 1 or None, got {block_size}")
    if indices is None:
        A = sp.csr_matrix(values) if sp.issparse(values) else sp.csr_matrix(np.asarray(values))
        if A.ndim != 2:
            raise UserInputError(f"values must be (n, P), got shape {A.shape}")
        if n_params is not None and n_params != A.shape[1]:
            raise UserInputError(f"n_params={n_params} does not match values.shape[1]")
        n_params = A.shape[1]
    else:
        values = np.asarray(values)
        indices = np.asarray(indices)
        if values.ndim != 2 or values.shape != indices.shape:
            raise UserInputError(
                f"values and indices must both be (n, k); got {values.shape}, {indices.shape}"
            )
        if n_params is None:
            raise UserInputError("n_params is required for the top-k (values, indices) form")
        if indices.size and (indices.min() < 0 or indices.max() >= n_params):
            raise UserInputError(f"indices must lie in [0, n_params={n_params})")
        n, k = values.shape
        A = sp.csr_matrix(
            # Copies: sum_duplicates sorts in place and must not touch the caller's arrays.
            (values.ravel().copy(), indices.ravel().astype(np.int64), np.arange(0, n * k + 1, k)),
            shape=(n, n_params),
        )
        A.sum_duplicates()
    if dtype is None:
        dtype = A.dtype if np.issubdtype(A.dtype, np.floating) else np.float64
    A = A.astype(dtype)
    A.eliminate_zeros()
    if np.any(A.data < 0):
        raise UserInputError("D-NPEFF needs non-negative PEF values; got negative entries")
    if dense_norm is None:
        norms = np.sqrt(np.asarray(A.multiply(A).sum(axis=1), dtype=np.float64).ravel())
    else:
        norms = np.asarray(dense_norm, dtype=np.float64).ravel()
        if norms.shape != (A.shape[0],):
            raise UserInputError(f"dense_norm must be ({A.shape[0]},), got {norms.shape}")
    A = sp.csr_matrix(sp.diags(1.0 / (norms + norm_eps)) @ A).astype(dtype)
    counts = np.bincount(A.indices, minlength=n_params)
    kept = np.flatnonzero(counts >= min_nnz).astype(np.int64)
    A = A.tocsc()[:, kept]
    blocks = []
    for s, e in _block_bounds(len(kept), block_size):
        blk = A[:, s:e].tocsr()
        blk.sort_indices()
        blocks.append(blk.toarray() if dense_blocks else blk)
    return PefMatrix(tuple(blocks), kept, int(n_params))


def scatter_columns(H: Any, kept_columns: Any, n_params: int) -> Any:
    """Scatter the kept columns back: ``out[:, kept_columns] = H``, zeros elsewhere (r×P)."""
    xp = get_namespace(H)
    out = xp.zeros((H.shape[0], n_params), dtype=H.dtype)
    out[:, xp.asarray(kept_columns)] = H
    return out


def column_blocks_to_dask(blocks: Sequence[Any]) -> Any:
    """Wrap in-memory column blocks (CSR or dense) as one Dask array chunked by columns."""
    import dask
    import dask.array as da

    parts = []
    for b in blocks:
        meta = _meta_of(b)
        parts.append(
            da.from_delayed(dask.delayed(b, pure=True), shape=b.shape, dtype=b.dtype, meta=meta)
        )
    return da.concatenate(parts, axis=1)


def _meta_of(b: Any) -> Any:
    if sp.issparse(b):
        return sp.csr_matrix((0, 0), dtype=b.dtype)
    xp = get_namespace(b)
    if type(b).__module__.startswith("cupyx"):
        import cupyx.scipy.sparse as csp

        return csp.csr_matrix((0, 0), dtype=b.dtype)
    return xp.empty((0, 0), dtype=b.dtype)


def dask_from_block_loader(
    load_block: Callable[[int], Any],
    n_rows: int,
    col_chunks: Sequence[int],
    dtype: Any,
    *,
    sparse: bool = True,
    name: str | None = None,
) -> Any:
    """A column-chunked Dask array whose block ``b`` is ``load_block(b)`` (run in the task).

    Use it to read a column-block layout from storage lazily (e.g. one CSR block per Zarr
    group) without holding A anywhere: ``load_block`` must return an ``n_rows × col_chunks[b]``
    CSR matrix (``sparse=True``) or dense array.
    """
    import dask
    import dask.array as da

    meta = sp.csr_matrix((0, 0), dtype=dtype) if sparse else np.empty((0, 0), dtype=dtype)
    name = name or f"pef-blocks-{uuid.uuid4().hex}"
    parts = [
        da.from_delayed(
            dask.delayed(load_block, pure=True)(b, dask_key_name=f"{name}-load-{b}"),
            shape=(n_rows, int(w)),
            dtype=dtype,
            meta=meta,
        )
        for b, w in enumerate(col_chunks)
    ]
    return da.concatenate(parts, axis=1)


def _row_chunk_counts(values: np.ndarray, indices: np.ndarray, n_params: int) -> np.ndarray:
    return np.bincount(indices[values != 0].astype(np.int64), minlength=n_params)[None, :]


def _row_chunk_split(
    values: np.ndarray,
    indices: np.ndarray,
    norms: np.ndarray,
    old_to_new: np.ndarray,
    bounds: list[tuple[int, int]],
    n_kept: int,
    dtype: Any,
    norm_eps: float,
) -> list[Any]:
    n, k = values.shape
    new = old_to_new[indices.ravel().astype(np.int64)]
    vals = (values.astype(np.float64) / (norms.astype(np.float64)[:, None] + norm_eps)).ravel()
    rows = np.repeat(np.arange(n), k)
    keep = (new >= 0) & (vals != 0)
    A = sp.csc_matrix((vals[keep].astype(dtype), (rows[keep], new[keep])), shape=(n, n_kept))
    A.sum_duplicates()
    return [A[:, s:e].tocsr() for s, e in bounds]


def _vstack_csr(*pieces: Any) -> Any:
    out = sp.vstack(pieces, format="csr")
    out.sort_indices()
    return out


def topk_to_dask_column_blocks(
    values: Any,
    indices: Any,
    dense_norm: Any,
    *,
    n_params: int,
    block_size: int,
    min_nnz: int = 1,
    dtype: Any = None,
    norm_eps: float = NORM_EPS,
) -> tuple[Any, np.ndarray]:
    """Dask re-layout of row-chunked top-k PEFs into normalised, pruned CSR column blocks.

    The inputs are Dask arrays chunked by examples (``values``/``indices`` ``(n, k)`` with one
    chunk along ``k``, ``dense_norm`` ``(n,)`` with the same row chunks). One pass counts the
    nonzeros per column (the only global quantity, a length-``P`` vector); a second splits each
    row chunk into the column blocks and stacks the pieces of each block (an all-to-all
    shuffle). Same result as :func:`preprocess_pefs`.

    Returns:
        ``(A, kept_columns)``: A is ``n × P'`` chunked by columns with CSR blocks of width
        ``block_size`` (the last may be narrower).
    """
    import dask
    import dask.array as da

    if min_nnz < 1 or block_size < 1:
        raise UserInputError(f"min_nnz and block_size must be >= 1, got {min_nnz}, {block_size}")
    if values.ndim != 2 or values.shape != indices.shape or values.chunks != indices.chunks:
        raise UserInputError("values and indices must be (n, k) Dask arrays with equal chunks")
    values = values.rechunk({1: -1})
    indices = indices.rechunk({1: -1})
    dense_norm = dense_norm.rechunk((values.chunks[0],))
    if dtype is None:
        dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64
    counts = da.map_blocks(
        _row_chunk_counts,
        values,
        indices,
        n_params,
        chunks=((1,) * values.numblocks[0], (n_params,)),
        dtype=np.int64,
    ).sum(axis=0)
    counts = counts.compute()
    kept = np.flatnonzero(counts >= min_nnz).astype(np.int64)
    old_to_new = np.full(n_params, -1, dtype=np.int64)
    old_to_new[kept] = np.arange(len(kept))
    bounds = _block_bounds(len(kept), block_size)
    o2n = dask.delayed(old_to_new, pure=True)
    splits = [
        dask.delayed(_row_chunk_split, nout=len(bounds), pure=True)(
            v, i, nrm, o2n, bounds, len(kept), dtype, norm_eps
        )
        for v, i, nrm in zip(
            values.to_delayed().ravel(),
            indices.to_delayed().ravel(),
            dense_norm.to_delayed().ravel(),
            strict=True,
        )
    ]
    n = values.shape[0]
    meta = sp.csr_matrix((0, 0), dtype=dtype)
    blocks = [
        da.from_delayed(
            dask.delayed(_vstack_csr, pure=True)(*[s[b] for s in splits]),
            shape=(n, e - s0),
            dtype=dtype,
            meta=meta,
        )
        for b, (s0, e) in enumerate(bounds)
    ]
    return da.concatenate(blocks, axis=1), kept


# ---------------------------------------------------------------------------------------------
# Configuration, initialisation and the state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NmfConfig:
    """Settings of a D-NPEFF fit.

    Attributes:
        n_components: ``r``.
        solver: ``"hals"`` (default: reaches a lower loss in less time, see
            ``benchmarks/npeff_nmf.py``) or ``"mu"`` (the reference implementation's).
        max_iter: total number of iterations (a resumed fit counts the ones already done).
        tol: stop when the relative loss decreases by less than ``tol`` times its previous
            value in one iteration (``0`` disables).
        eps: MU denominator offset. ``0`` reproduces scikit-learn, which instead replaces
            exactly-zero denominators by float32 eps (done here too when ``eps == 0``).
        h_sweeps: HALS sweeps over each H block per pass over A.
        w_sweeps: HALS sweeps over W per pass (cheap: ``O(n r²)`` each, on cached ``AHᵀ``,
            ``HHᵀ``; the "accelerated HALS" of Gillis & Glineur).
        seed: seed of the random init.
        init_scale: rescale the random init to the least-squares-optimal scale of ``WH``.
        tile_cols: :func:`fit_nmf` splits wider in-memory blocks once into column tiles of at
            most this width, so the H tile a sparse product gathers from stays in cache (2–4×
            faster products; same iterates up to summation order). ``None``: ``2¹⁸ / (8r)``
            clipped to [256, 16384]; ``0``: keep the blocks as given. Dask fits use A's
            chunking as is: store A in column blocks of about this width.
    """

    n_components: int
    solver: Solver = "hals"
    max_iter: int = 200
    tol: float = 1e-4
    eps: float = 1e-8
    h_sweeps: int = 1
    w_sweeps: int = 1
    seed: int = 0
    init_scale: bool = True
    tile_cols: int | None = None

    def __post_init__(self) -> None:
        if self.tile_cols is not None and self.tile_cols < 0:
            raise UserInputError(f"tile_cols must be >= 0 or None, got {self.tile_cols}")
        if int(self.n_components) < 1:
            raise UserInputError(f"n_components must be >= 1, got {self.n_components}")
        if self.solver not in _SOLVERS:
            raise UserInputError(f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        if self.max_iter < 0:
            raise UserInputError(f"max_iter must be >= 0, got {self.max_iter}")
        if not self.tol >= 0:
            raise UserInputError(f"tol must be >= 0, got {self.tol}")
        if not self.eps >= 0:
            raise UserInputError(f"eps must be >= 0, got {self.eps}")
        if self.h_sweeps < 1 or self.w_sweeps < 1:
            raise UserInputError(
                f"h_sweeps and w_sweeps must be >= 1, got {self.h_sweeps}, {self.w_sweeps}"
            )


@dataclass
class NmfState:
    """Everything needed to continue a D-NPEFF fit.

    Attributes:
        W: ``(n, r)`` float64 NumPy array.
        H: ``(r, P')`` — a NumPy/CuPy array (in-memory fit) or a Dask array chunked like A's
            columns (Dask fit; possibly backed by Zarr).
        AHt: ``A Hᵀ`` (n×r, float64) for the current H (cached from the last pass).
        HHt: ``H Hᵀ`` (r×r, float64) for the current H.
        norm_A_sq: ``‖A‖²_F``.
        iteration: number of completed iterations.
        losses: relative loss ``‖A − WH‖_F / ‖A‖_F`` at init (``losses[0]``) and after each
            iteration.
        seconds: wall time of each iteration.
        converged: the tolerance test passed.
    """

    W: np.ndarray
    H: Any
    AHt: np.ndarray
    HHt: np.ndarray
    norm_A_sq: float
    iteration: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    converged: bool = False

    def checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split the state into arrays and JSON-able metadata for persistence.

        Returns:
            ``(arrays, meta)``: ``arrays`` maps ``"W"``, ``"AHt"``, ``"HHt"`` (NumPy) and
            ``"H"`` (NumPy/CuPy or Dask — store it with ``da.store``/``to_zarr``); ``meta`` holds
            ``iteration``, ``losses``, ``seconds``, ``converged``, ``norm_A_sq``. Rebuild with
            :func:`nmf_state_from_checkpoint`.
        """
        arrays = {"W": self.W, "H": self.H, "AHt": self.AHt, "HHt": self.HHt}
        meta = {
            "iteration": int(self.iteration),
            "losses": [float(x) for x in self.losses],
            "seconds": [float(x) for x in self.seconds],
            "converged": bool(self.converged),
            "norm_A_sq": float(self.norm_A_sq),
        }
        return arrays, meta


def init_w(seed: int, n_rows: int, n_components: int) -> np.ndarray:
    """W init ``U[0, 1)`` (float64) from its own stream ``default_rng([seed, 0])``."""
    return np.random.default_rng([seed, 0]).random((n_rows, n_components))


def init_h_columns(seed: int, n_components: int, start: int, stop: int, dtype: Any = None) -> Any:
    """Columns ``[start, stop)`` of the H init ``U[0, 1)``, independent of the chunking.

    Column ``c`` lies in tile ``c // INIT_TILE``, drawn whole from ``default_rng([seed, 1,
    tile])``; so any split of the columns into blocks yields the same matrix.
    """
    out = np.empty((n_components, stop - start), dtype=np.float64)
    t0, t1 = start // INIT_TILE, (stop - 1) // INIT_TILE + 1 if stop > start else 0
    for t in range(t0, t1):
        tile = np.random.default_rng([seed, 1, t]).random((n_components, INIT_TILE))
        lo, hi = max(start, t * INIT_TILE), min(stop, (t + 1) * INIT_TILE)
        out[:, lo - start : hi - start] = tile[:, lo - t * INIT_TILE : hi - t * INIT_TILE]
    return out.astype(dtype or np.float64, copy=False)


# ---------------------------------------------------------------------------------------------
# Kernels (NumPy / CuPy; blocks may be CSR)
# ---------------------------------------------------------------------------------------------


def _xp_of(*arrays: Any) -> Any:
    return get_namespace(*arrays)


def _work_dtype(A_b: Any) -> Any:
    return A_b.dtype if np.issubdtype(A_b.dtype, np.floating) else np.float64


def _rt_matmul(A_b: Any, W: Any) -> Any:
    """``Wᵀ A_b`` (r × P'_b) for a CSR or dense block, as ``(A_bᵀ W)ᵀ``."""
    return (A_b.T @ W).T


def block_stats(A_b: Any, H_b: Any) -> tuple[Any, Any]:
    """``(A_b H_bᵀ, H_b H_bᵀ)`` of one column block, in float64 (the blocks' array module)."""
    xp = _xp_of(H_b)
    AHt = xp.asarray(A_b @ H_b.T, dtype=xp.float64)
    HHt = xp.asarray(H_b @ H_b.T, dtype=xp.float64)
    return AHt, HHt


def squared_loss(norm_A_sq: float, W: Any, AHt: Any, HHt: Any) -> float:
    """``‖A − WH‖²_F = ‖A‖² − 2 tr(Wᵀ AHᵀ) + tr((WᵀW) HHᵀ)`` from the small products."""
    W = to_numpy(W).astype(np.float64, copy=False)
    AHt, HHt = to_numpy(AHt), to_numpy(HHt)
    return float(norm_A_sq - 2.0 * np.vdot(W, AHt) + np.vdot(W.T @ W, HHt))


def relative_loss(norm_A_sq: float, W: Any, AHt: Any, HHt: Any) -> float:
    """``‖A − WH‖_F / ‖A‖_F`` (clipped at 0 against cancellation when the fit is exact)."""
    if norm_A_sq <= 0:
        return 0.0
    return math.sqrt(max(squared_loss(norm_A_sq, W, AHt, HHt), 0.0) / norm_A_sq)


def _mu_denominator(den: Any, eps: float) -> Any:
    if eps > 0:
        den += eps
    else:  # scikit-learn's guard: only exact zeros are replaced
        den[den == 0] = _F32_EPS
    return den


def _hals_rows(X: Any, G: Any, B: Any, sweeps: int) -> Any:
    """HALS sweeps on the rows of ``X`` (r × m) for ``min_{X≥0} ½ tr(XᵀGX) − tr(BᵀX)``.

    ``X[j] ← max(0, X[j] + (B[j] − G[j] X) / G[j, j])`` for ``j = 0..r−1``, in place
    (Gauss–Seidel: each row update sees the rows updated before it). Rows with ``G[j, j] = 0``
    are left unchanged.
    """
    xp = _xp_of(X)
    diag = to_numpy(G).diagonal()
    for _ in range(sweeps):
        for j in range(X.shape[0]):
            if diag[j] <= 0:
                continue
            step = (B[j] - G[j] @ X) / diag[j]
            X[j] += step
            xp.maximum(X[j], 0, out=X[j])
    return X


def update_w(
    W: np.ndarray,
    AHt: np.ndarray,
    HHt: np.ndarray,
    *,
    solver: Solver,
    eps: float = 1e-8,
    inner_sweeps: int = 1,
) -> np.ndarray:
    """One W update with H fixed, from ``AHᵀ`` and ``HHᵀ`` only (float64, returns new W).

    MU: ``W ⊙ AHᵀ / (W HHᵀ + ε)``. HALS: ``inner_sweeps`` column sweeps (see module doc).
    """
    W = np.asarray(W, dtype=np.float64)
    AHt = np.asarray(to_numpy(AHt), dtype=np.float64)
    HHt = np.asarray(to_numpy(HHt), dtype=np.float64)
    if solver == "mu":
        den = _mu_denominator(W @ HHt, eps)
        return W * (AHt / den)
    # Work on Wᵀ so the rows being updated are contiguous.
    Wt = np.ascontiguousarray(W.T)
    _hals_rows(Wt, HHt, np.ascontiguousarray(AHt.T), inner_sweeps)
    return np.ascontiguousarray(Wt.T)


def update_h_block(
    A_b: Any,
    H_b: Any,
    W: Any,
    WtW: Any,
    *,
    solver: Solver,
    eps: float = 1e-8,
    inner_sweeps: int = 1,
) -> Any:
    """The H update of one column block with W fixed (columns are independent).

    MU: ``H_b ⊙ WᵀA_b / (WᵀW H_b + ε)``. HALS: ``inner_sweeps`` row sweeps with ``WᵀA_b`` and
    ``WᵀW``. Large products run in the block's dtype; returns a new array.
    """
    xp = _xp_of(H_b)
    dt = H_b.dtype
    Wc = xp.asarray(W, dtype=dt)
    G = xp.asarray(WtW, dtype=dt)
    WtA = xp.asarray(_rt_matmul(A_b, Wc), dtype=dt)
    if solver == "mu":
        den = _mu_denominator(G @ H_b, eps)
        return H_b * (WtA / den)
    X = xp.array(H_b, dtype=dt, copy=True, order="C")
    return _hals_rows(X, G, WtA, inner_sweeps)


def _stats_sum(A_blocks: Sequence[Any], H_blocks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    AHt, HHt = None, None
    for A_b, H_b in zip(A_blocks, H_blocks, strict=True):
        a, h = block_stats(A_b, H_b)
        AHt = a if AHt is None else AHt + a
        HHt = h if HHt is None else HHt + h
    return to_numpy(AHt), to_numpy(HHt)


def _norm_sq(A_b: Any) -> float:
    if sp.issparse(A_b) or type(A_b).__module__.startswith("cupyx"):
        d = A_b.data
    else:
        d = A_b
    xp = _xp_of(d)
    return float(xp.vdot(d.astype(xp.float64).ravel(), d.astype(xp.float64).ravel()))


def _is_converged(losses: Sequence[float], tol: float) -> bool:
    if len(losses) < 2:
        return False
    prev, cur = losses[-2], losses[-1]
    if cur == 0.0:
        return True
    return tol > 0 and abs(prev - cur) <= tol * prev


def _init_scale(W: np.ndarray, AHt: np.ndarray, HHt: np.ndarray) -> float:
    """``√α`` with ``α = ⟨A, WH⟩ / ‖WH‖²``, the optimal scale of the product WH."""
    num = float(np.vdot(W, AHt))
    den = float(np.vdot(W.T @ W, HHt))
    return math.sqrt(num / den) if num > 0 and den > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# In-memory solver
# ---------------------------------------------------------------------------------------------


def _as_blocks(A: Any) -> tuple[Any, ...]:
    if isinstance(A, PefMatrix):
        blocks = A.blocks
    elif isinstance(A, (list, tuple)):
        blocks = tuple(A)
    else:
        blocks = (A,)
    if not blocks:
        raise UserInputError("A has no column blocks")
    n = blocks[0].shape[0]
    for b in blocks:
        if len(b.shape) != 2 or b.shape[0] != n:
            raise UserInputError(f"every column block must be (n={n}, P_b); got {b.shape}")
    return blocks


def _tile_width(config: NmfConfig) -> int:
    if config.tile_cols is not None:
        return int(config.tile_cols)
    return int(np.clip(2**18 // (8 * config.n_components), 256, 16384))


def _retile(blocks: Sequence[Any], width: int) -> tuple[Any, ...]:
    """Split blocks wider than ``width`` into column tiles (CSR via one CSC conversion)."""
    if width <= 0 or all(b.shape[1] <= width for b in blocks):
        return tuple(blocks)
    out = []
    for b in blocks:
        if b.shape[1] <= width:
            out.append(b)
            continue
        sparse = sp.issparse(b) or type(b).__module__.startswith("cupyx")
        src = b.tocsc() if sparse else b
        for s, e in _block_bounds(b.shape[1], width):
            out.append(src[:, s:e].tocsr() if sparse else src[:, s:e])
    return tuple(out)


def _bounds_of(blocks: Sequence[Any]) -> list[tuple[int, int]]:
    ends = np.cumsum([b.shape[1] for b in blocks])
    return [(int(e - b.shape[1]), int(e)) for e, b in zip(ends, blocks, strict=True)]


def _check_init(W0: Any, H0: Any, n: int, p: int, r: int) -> None:
    if W0 is None or H0 is None:
        raise UserInputError("give both W0 and H0 (custom init) or neither")
    if tuple(W0.shape) != (n, r) or tuple(H0.shape) != (r, p):
        raise UserInputError(
            f"W0 must be ({n}, {r}) and H0 ({r}, {p}); got {tuple(W0.shape)}, {tuple(H0.shape)}"
        )
    if np.any(to_numpy(W0) < 0):
        raise UserInputError("W0 must be non-negative")


def nmf_init(A: Any, config: NmfConfig, W0: Any = None, H0: Any = None) -> NmfState:
    """Initial state of an in-memory fit: random (seeded, chunking-invariant) or ``(W0, H0)``.

    Args:
        A: a :class:`PefMatrix`, a list of column blocks, or one matrix (dense or CSR).
        config: the fit settings.
        W0, H0: custom init (``n×r``, ``r×P'``), used as given (no rescaling).
    """
    blocks = _as_blocks(A)
    n, p, r = blocks[0].shape[0], sum(b.shape[1] for b in blocks), config.n_components
    xp = _xp_of(blocks[0])
    dt = _work_dtype(blocks[0])
    custom = W0 is not None or H0 is not None
    if custom:
        _check_init(W0, H0, n, p, r)
        W = np.array(to_numpy(W0), dtype=np.float64)
        H = xp.array(H0, dtype=dt, copy=True)
    else:
        W = init_w(config.seed, n, r)
        H = xp.asarray(init_h_columns(config.seed, r, 0, p, dt))
    bounds = _bounds_of(blocks)
    AHt, HHt = _stats_sum(blocks, [H[:, s:e] for s, e in bounds])
    if config.init_scale and not custom:
        s = _init_scale(W, AHt, HHt)
        W, H, AHt, HHt = W * s, H * xp.asarray(s, dtype=dt), AHt * s, HHt * (s * s)
    norm_A_sq = float(sum(_norm_sq(b) for b in blocks))
    loss = relative_loss(norm_A_sq, W, AHt, HHt)
    return NmfState(W=W, H=H, AHt=AHt, HHt=HHt, norm_A_sq=norm_A_sq, losses=[loss])


def nmf_step(A: Any, state: NmfState, config: NmfConfig) -> NmfState:
    """One iteration (W update, then H update block by block, then loss); returns a new state."""
    t0 = time.perf_counter()
    blocks = _as_blocks(A)
    W = update_w(
        state.W,
        state.AHt,
        state.HHt,
        solver=config.solver,
        eps=config.eps,
        inner_sweeps=config.w_sweeps,
    )
    WtW = W.T @ W
    xp = _xp_of(state.H)
    H = xp.empty_like(state.H)
    AHt = HHt = None
    for A_b, (s, e) in zip(blocks, _bounds_of(blocks), strict=True):
        H_b = update_h_block(
            A_b,
            state.H[:, s:e],
            W,
            WtW,
            solver=config.solver,
            eps=config.eps,
            inner_sweeps=config.h_sweeps,
        )
        H[:, s:e] = H_b
        a, h = block_stats(A_b, H_b)
        AHt = a if AHt is None else AHt + a
        HHt = h if HHt is None else HHt + h
    AHt, HHt = to_numpy(AHt), to_numpy(HHt)
    loss = relative_loss(state.norm_A_sq, W, AHt, HHt)
    return _advance(state, W, H, AHt, HHt, loss, time.perf_counter() - t0, config)


def _advance(
    state: NmfState,
    W: np.ndarray,
    H: Any,
    AHt: np.ndarray,
    HHt: np.ndarray,
    loss: float,
    seconds: float,
    config: NmfConfig,
) -> NmfState:
    losses = [*state.losses, loss]
    new = replace(
        state,
        W=W,
        H=H,
        AHt=AHt,
        HHt=HHt,
        iteration=state.iteration + 1,
        losses=losses,
        seconds=[*state.seconds, seconds],
        converged=_is_converged(losses, config.tol),
    )
    log.info("D-NPEFF iter %d: relative loss %.6g (%.3f s)", new.iteration, loss, seconds)
    return new


def fit_nmf(
    A: Any,
    config: NmfConfig,
    *,
    state: NmfState | None = None,
    W0: Any = None,
    H0: Any = None,
    callback: Callable[[NmfState], bool | None] | None = None,
) -> NmfState:
    """In-memory D-NPEFF fit until convergence or ``config.max_iter`` total iterations.

    Args:
        A: a :class:`PefMatrix`, a list of column blocks, or one matrix (dense or CSR).
        config: the fit settings.
        state: resume from this state (``W0``/``H0`` are then ignored).
        W0, H0: custom init.
        callback: called with the state after each iteration; returning ``True`` stops.
    """
    A = _retile(_as_blocks(A), _tile_width(config))
    if state is None:
        state = nmf_init(A, config, W0, H0)
    while state.iteration < config.max_iter and not state.converged:
        state = nmf_step(A, state, config)
        if callback is not None and callback(state):
            break
    return state


# ---------------------------------------------------------------------------------------------
# Dask graph over column blocks
# ---------------------------------------------------------------------------------------------


def _check_dask_A(A: Any) -> Any:
    import dask.array as da

    if not isinstance(A, da.Array) or A.ndim != 2:
        raise UserInputError(f"A must be a 2-D dask array, got {type(A).__name__}")
    if len(A.chunks[0]) != 1:
        # Rows must be whole: each task needs full columns of A.
        A = A.rechunk({0: -1})
    return A


def _h_chunks(A: Any, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return ((r,), A.chunks[1])


def _align_H(A: Any, H: Any, r: int) -> Any:
    import dask.array as da

    if not isinstance(H, da.Array):
        H = da.from_array(H, chunks=_h_chunks(A, r))
    if H.shape != (r, A.shape[1]):
        raise UserInputError(f"H must be ({r}, {A.shape[1]}), got {H.shape}")
    if H.chunks != _h_chunks(A, r):
        H = H.rechunk(_h_chunks(A, r))
    return H


def _h_dtype(A: Any) -> Any:
    return A.dtype if np.issubdtype(A.dtype, np.floating) else np.dtype(np.float64)


def _meta_xp(A: Any) -> Any:
    return _xp_of(A._meta)


def _stats_task(A_b: Any, H_b: Any) -> Any:
    xp = _xp_of(H_b)
    a, h = block_stats(A_b, H_b)
    n, r = a.shape
    out = xp.empty((1, n + r, r), dtype=xp.float64)
    out[0, :n] = a
    out[0, n:] = h
    return out


def _norm_task(A_b: Any) -> Any:
    return np.full((1, 1), _norm_sq(A_b))


def _stats_graph(A: Any, H: Any, r: int) -> Any:
    """Packed ``[A Hᵀ; H Hᵀ]`` ((n + r) × r) as a tree-sum over column blocks."""
    import dask.array as da

    n = A.shape[0]
    xp = _meta_xp(A)
    parts = da.blockwise(
        _stats_task,
        "bxy",
        A,
        "ib",
        H,
        "jb",
        new_axes={"x": n + r, "y": r},
        adjust_chunks={"b": 1},
        concatenate=True,
        dtype=np.float64,
        meta=xp.empty((0, 0, 0), dtype=np.float64),
    )
    return parts.sum(axis=0, split_every=8)


def _norm_graph(A: Any) -> Any:
    import dask.array as da

    parts = da.blockwise(
        _norm_task,
        "zb",
        A,
        "ib",
        new_axes={"z": 1},
        adjust_chunks={"b": 1},
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0), dtype=np.float64),
    )
    return parts.sum()


def _unpack_stats(packed: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    packed = to_numpy(packed)
    return np.ascontiguousarray(packed[:n]), np.ascontiguousarray(packed[n:])


def _init_h_task(A_b: Any, seed: int, r: int, dtype: Any, scale: float, block_info=None) -> Any:
    start, stop = block_info[0]["array-location"][1]
    H = init_h_columns(seed, r, start, stop, dtype)
    if scale != 1.0:
        H *= np.asarray(scale, dtype=H.dtype)
    return _xp_of(A_b).asarray(H)


def _init_h_graph(A: Any, seed: int, r: int, scale: float) -> Any:
    import dask.array as da

    dt = _h_dtype(A)
    xp = _meta_xp(A)
    return da.map_blocks(
        _init_h_task,
        A,
        seed,
        r,
        dt,
        scale,
        chunks=_h_chunks(A, r),
        dtype=dt,
        meta=xp.empty((0, 0), dtype=dt),
        name=f"npeff-H-init-{seed}-{r}-{scale!r}-{A.name}",
    )


def nmf_init_dask(A: Any, config: NmfConfig, W0: Any = None, H0: Any = None) -> NmfState:
    """Initial state of a Dask fit (one pass over A for ``‖A‖²``, ``AHᵀ`` and ``HHᵀ``).

    Args:
        A: Dask array ``n × P'`` chunked by columns (rows whole), CSR or dense chunks.
        config: the fit settings.
        W0, H0: custom init (``H0`` NumPy or Dask); else the seeded random init, generated
            per fixed column tile inside the tasks (same matrix as :func:`nmf_init`).

    Returns:
        The state; its ``H`` is a lazy Dask array (the random init is regenerated on use).
    """
    import dask

    A = _check_dask_A(A)
    n, p, r = A.shape[0], A.shape[1], config.n_components
    custom = W0 is not None or H0 is not None
    if custom:
        _check_init(W0, H0, n, p, r)
        W = np.array(to_numpy(W0), dtype=np.float64)
        H = _align_H(A, H0, r).astype(_h_dtype(A))
    else:
        W = init_w(config.seed, n, r)
        H = _init_h_graph(A, config.seed, r, 1.0)
    packed, norm_A_sq = dask.compute(_stats_graph(A, H, r), _norm_graph(A))
    AHt, HHt = _unpack_stats(packed, n)
    if config.init_scale and not custom:
        s = _init_scale(W, AHt, HHt)
        W, AHt, HHt = W * s, AHt * s, HHt * (s * s)
        H = _init_h_graph(A, config.seed, r, s)
    norm_A_sq = float(norm_A_sq)
    loss = relative_loss(norm_A_sq, W, AHt, HHt)
    return NmfState(W=W, H=H, AHt=AHt, HHt=HHt, norm_A_sq=norm_A_sq, losses=[loss])


def _h_update_task(
    A_b: Any, H_b: Any, W: Any, WtW: Any, solver: Solver, eps: float, inner_sweeps: int
) -> Any:
    return update_h_block(A_b, H_b, W, WtW, solver=solver, eps=eps, inner_sweeps=inner_sweeps)


def _materialize(
    H_new: Any, extra: Any, h_target: Any, lock: bool, A: Any, r: int
) -> tuple[Any, Any]:
    """Compute ``extra`` and keep ``H_new`` (persisted, or stored to ``h_target``) in one pass."""
    import dask
    import dask.array as da

    if h_target is None:
        H_p, extra_p = dask.persist(H_new, extra)
        (extra_v,) = dask.compute(extra_p)
        return H_p, extra_v
    stored = da.store(H_new, h_target, lock=lock, compute=False)
    _, extra_v = dask.compute(stored, extra)
    H = da.from_array(
        h_target, chunks=_h_chunks(A, r), name=f"npeff-H-{uuid.uuid4().hex}", asarray=False
    )
    return H, extra_v


def nmf_step_dask(
    A: Any,
    state: NmfState,
    config: NmfConfig,
    *,
    h_target: Any = None,
    lock: bool = False,
) -> NmfState:
    """One Dask iteration: W update in memory, then one pass over A's column blocks.

    The pass updates every H block (local) and reduces ``A H_newᵀ`` and ``H_new H_newᵀ`` (tree
    sums) for the loss and the next W update. A is read once.

    Args:
        A: Dask array ``n × P'`` chunked by columns.
        state: the current state (its ``H`` is rechunked to A's columns if needed).
        config: the fit settings.
        h_target: ``None`` to persist the new H in (distributed) memory, or an array-like
            supporting ``__setitem__``/``__getitem__`` (e.g. a Zarr array ``(r, P')``) to
            ``da.store`` it into; the returned state's H then reads from it. It must not be the
            storage the current H reads from (double-buffer: alternate two arrays). Its chunks
            should align with A's column chunks, or pass ``lock=True``.
        lock: lock passed to ``da.store``.
    """
    import dask.array as da

    t0 = time.perf_counter()
    A = _check_dask_A(A)
    n, r = A.shape[0], config.n_components
    H = _align_H(A, state.H, r)
    dt = _h_dtype(A)
    W = update_w(
        state.W,
        state.AHt,
        state.HHt,
        solver=config.solver,
        eps=config.eps,
        inner_sweeps=config.w_sweeps,
    )
    WtW = W.T @ W
    xp = _meta_xp(A)
    Wd = da.from_array(W, chunks=W.shape, name=f"npeff-W-{uuid.uuid4().hex}")
    Gd = da.from_array(WtW, chunks=WtW.shape, name=f"npeff-WtW-{uuid.uuid4().hex}")
    task = functools.partial(
        _h_update_task, solver=config.solver, eps=config.eps, inner_sweeps=config.h_sweeps
    )
    H_new = da.blockwise(
        task,
        "jb",
        A,
        "ib",
        H,
        "jb",
        Wd,
        "ik",
        Gd,
        "lm",
        concatenate=True,
        dtype=dt,
        meta=xp.empty((0, 0), dtype=dt),
        name=f"npeff-H-{uuid.uuid4().hex}",
    )
    H_new, packed = _materialize(H_new, _stats_graph(A, H_new, r), h_target, lock, A, r)
    AHt, HHt = _unpack_stats(packed, n)
    loss = relative_loss(state.norm_A_sq, W, AHt, HHt)
    return _advance(state, W, H_new, AHt, HHt, loss, time.perf_counter() - t0, config)


def iter_nmf_dask(
    A: Any,
    config: NmfConfig,
    *,
    state: NmfState | None = None,
    W0: Any = None,
    H0: Any = None,
    h_target: Callable[[int], Any] | None = None,
    lock: bool = False,
) -> Iterator[NmfState]:
    """Yield the state after each Dask iteration until convergence or ``config.max_iter``.

    The caller may checkpoint any yielded state (``state.checkpoint()``) and stop iterating at
    any time. ``h_target(iteration)`` (optional) returns the array to store H of that
    iteration into, e.g. ``lambda t: zarr_group[f"H{t % 2}"]`` for double buffering.
    """
    A = _check_dask_A(A)
    if state is None:
        state = nmf_init_dask(A, config, W0, H0)
    while state.iteration < config.max_iter and not state.converged:
        target = None if h_target is None else h_target(state.iteration + 1)
        state = nmf_step_dask(A, state, config, h_target=target, lock=lock)
        yield state


def fit_nmf_dask(
    A: Any,
    config: NmfConfig,
    *,
    state: NmfState | None = None,
    W0: Any = None,
    H0: Any = None,
    callback: Callable[[NmfState], bool | None] | None = None,
    h_target: Callable[[int], Any] | None = None,
    lock: bool = False,
) -> NmfState:
    """Dask D-NPEFF fit: :func:`iter_nmf_dask` run to the end (``callback`` may stop it)."""
    A = _check_dask_A(A)
    if state is None:
        state = nmf_init_dask(A, config, W0, H0)
    for state in iter_nmf_dask(A, config, state=state, h_target=h_target, lock=lock):  # noqa: B020
        if callback is not None and callback(state):
            break
    return state


def nmf_state_from_checkpoint(
    A: Any,
    arrays: dict[str, Any],
    meta: dict[str, Any],
) -> NmfState:
    """Rebuild a state saved with :meth:`NmfState.checkpoint` to resume a fit.

    ``arrays`` needs ``"W"`` and ``"H"`` (NumPy, or Dask e.g. ``da.from_zarr``); ``"AHt"`` and
    ``"HHt"`` are recomputed with one pass over A when missing, as is ``norm_A_sq`` when
    absent from ``meta``. ``A`` is a Dask array (Dask fit) or the in-memory blocks.
    """
    import dask
    import dask.array as da

    W = np.asarray(to_numpy(arrays["W"]), dtype=np.float64)
    H = arrays["H"]
    r = W.shape[1]
    AHt, HHt = arrays.get("AHt"), arrays.get("HHt")
    norm_A_sq = meta.get("norm_A_sq")
    if isinstance(A, da.Array):
        A = _check_dask_A(A)
        H = _align_H(A, H, r)
        todo = {}
        if AHt is None or HHt is None:
            todo["stats"] = _stats_graph(A, H, r)
        if norm_A_sq is None:
            todo["norm"] = _norm_graph(A)
        done = dict(zip(todo, dask.compute(*todo.values()), strict=True))
        if "stats" in done:
            AHt, HHt = _unpack_stats(done["stats"], A.shape[0])
        if "norm" in done:
            norm_A_sq = float(done["norm"])
    else:
        blocks = _as_blocks(A)
        if AHt is None or HHt is None:
            AHt, HHt = _stats_sum(blocks, [H[:, s:e] for s, e in _bounds_of(blocks)])
        if norm_A_sq is None:
            norm_A_sq = float(sum(_norm_sq(b) for b in blocks))
    return NmfState(
        W=W,
        H=H,
        AHt=np.asarray(to_numpy(AHt), dtype=np.float64),
        HHt=np.asarray(to_numpy(HHt), dtype=np.float64),
        norm_A_sq=float(norm_A_sq),
        iteration=int(meta.get("iteration", 0)),
        losses=[float(x) for x in meta.get("losses", [])],
        seconds=[float(x) for x in meta.get("seconds", [])],
        converged=bool(meta.get("converged", False)),
    )
