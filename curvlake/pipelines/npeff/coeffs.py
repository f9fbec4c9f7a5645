"""NPEFF coefficients with the dictionary fixed, and sparsification of a D-NPEFF dictionary.

With H (r×P') fixed, the coefficients of a PEF row ``a`` solve the non-negative least squares

    min_{w ≥ 0} ‖a − w H‖²  ⇔  min_{w ≥ 0} ½ wᵀ G w − bᵀ w,   G = H Hᵀ (r×r),  b = H aᵀ,

which only needs the Gram ``G`` (once) and one row of ``A Hᵀ`` per example. The same holds for
LRM-NPEFF with ``G = (GGᵀ)∘(GGᵀ)`` and ``b_ij = ‖A_iᵀ g_j‖²`` (see :mod:`.lrm`). A is streamed
over example chunks (and column blocks); every example is an independent small problem, solved
batched over a chunk:

* ``"hals"`` (default): exact coordinate descent on the Gram (Cichocki & Phan 2009), vectorised
  over the examples of a chunk; each example stops on its own once its projected gradient is
  below ``tol · ‖b‖_∞``, so results do not depend on the chunking.
* ``"active_set"``: Lawson & Hanson's active-set NNLS ("Solving Least Squares Problems", 1974,
  ch. 23) on the normal equations, one example at a time, in float64: exact, for small chunks
  and as an oracle.
* ``"mu"``: the reference implementation's W-only multiplicative updates (fixed iterations).

:func:`sparsify` implements ``sparsify_d_npeff.py``: unit-norm rows of H, the scale moved into
W, small entries dropped, H returned in CSR form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from curvlake._array import get_namespace, to_numpy
from curvlake.errors import UserInputError

__all__ = [
    "SparseH",
    "coeffs_dask",
    "fit_coeffs",
    "fit_coeffs_dask",
    "gram",
    "nnls_active_set",
    "nnls_gram",
    "sparsify",
]

Method = Literal["hals", "active_set", "mu"]
_METHODS = ("hals", "active_set", "mu")


# ---------------------------------------------------------------------------------------------
# Batched NNLS on a Gram matrix
# ---------------------------------------------------------------------------------------------


def _projected_gradient_inf(X: Any, G: Any, B: Any) -> Any:
    """``max_j |pg_j|`` per row, ``pg = XG − B`` with negative parts only where ``x_j = 0``."""
    xp = get_namespace(X)
    g = X @ G - B
    pg = xp.where(X > 0, g, xp.minimum(g, 0))
    return xp.abs(pg).max(axis=1)


def _nnls_hals(G: Any, B: Any, X: Any, max_iter: int, tol: float) -> Any:
    xp = get_namespace(B)
    diag = to_numpy(G).diagonal()
    scale = xp.abs(B).max(axis=1)
    active = xp.arange(B.shape[0])
    for _ in range(max_iter):
        if active.size == 0:
            break
        Xa, Ba = X[active], B[active]
        for j in range(G.shape[0]):
            if diag[j] <= 0:
                continue
            Xa[:, j] = xp.maximum(Xa[:, j] + (Ba[:, j] - Xa @ G[:, j]) / diag[j], 0)
        X[active] = Xa
        done = _projected_gradient_inf(Xa, G, Ba) <= tol * scale[active]
        active = active[~done]
    return X


def nnls_active_set(G: np.ndarray, b: np.ndarray, *, tol: float | None = None) -> np.ndarray:
    """Lawson–Hanson active-set NNLS on the normal equations: ``min_{x≥0} ½xᵀGx − bᵀx``.

    Args:
        G: ``(r, r)`` symmetric positive semi-definite Gram matrix.
        b: ``(r,)`` linear term.
        tol: dual feasibility tolerance (default ``1e-12 · r · max(‖G‖, ‖b‖)``).

    Returns:
        The float64 minimiser ``x`` (``(r,)``).
    """
    G = np.asarray(G, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    r = b.shape[0]
    if tol is None:
        tol = 1e-12 * r * max(np.abs(G).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-300)
    x = np.zeros(r)
    passive = np.zeros(r, dtype=bool)
    w = b.copy()
    for _ in range(3 * r + 10):
        cand = np.where(~passive, w, -np.inf)
        j = int(np.argmax(cand))
        if cand[j] <= tol:
            break
        passive[j] = True
        for _ in range(3 * r + 10):
            idx = np.flatnonzero(passive)
            s = np.zeros(r)
            s[idx] = np.linalg.lstsq(G[np.ix_(idx, idx)], b[idx], rcond=None)[0]
            if np.all(s[idx] > 0):
                x = s
                break
            # Step back to the boundary: the first passive variable to hit zero leaves.
            neg = idx[s[idx] <= 0]
            ratios = x[neg] / (x[neg] - s[neg])
            k = int(np.argmin(ratios))
            x = x + ratios[k] * (s - x)
            x[neg[k]] = 0.0
            passive &= x > 0
            x[~passive] = 0.0
        w = b - G @ x
    return x


def nnls_gram(
    G: Any,
    B: Any,
    *,
    method: Method = "hals",
    max_iter: int = 1000,
    tol: float = 1e-10,
    eps: float = 1e-7,
    X0: Any = None,
) -> Any:
    """Batched NNLS ``min_{x_i ≥ 0} ½ x_iᵀ G x_i − b_iᵀ x_i`` for every row ``b_i`` of ``B``.

    Equivalent to ``min_{x_i ≥ 0} ‖a_i − x_i H‖²`` with ``G = HHᵀ`` and ``B = A Hᵀ``.

    Args:
        G: ``(r, r)`` Gram matrix (used in float64).
        B: ``(m, r)`` linear terms (NumPy or CuPy).
        method: ``"hals"``, ``"active_set"`` or ``"mu"`` (see module doc).
        max_iter: sweeps (HALS) or iterations (MU).
        tol: HALS per-row stop: ``max|projected gradient| ≤ tol · max|b_i|``.
        eps: MU denominator offset (the reference implementation's 1e-7).
        X0: warm start ``(m, r)`` for HALS/MU (default: zeros for HALS, ones for MU).

    Returns:
        ``(m, r)`` float64 coefficients in ``B``'s array module.
    """
    if method not in _METHODS:
        raise UserInputError(f"method must be one of {_METHODS}, got {method!r}")
    xp = get_namespace(B)
    B = xp.asarray(B, dtype=xp.float64)
    if B.ndim != 2 or tuple(G.shape) != (B.shape[1], B.shape[1]):
        raise UserInputError(f"need G (r, r) and B (m, r); got {G.shape}, {B.shape}")
    Gh = np.asarray(to_numpy(G), dtype=np.float64)
    if method == "active_set":
        Bh = to_numpy(B)
        out = np.stack([nnls_active_set(Gh, b) for b in Bh]) if len(Bh) else np.zeros(B.shape)
        return xp.asarray(out)
    Gd = xp.asarray(Gh)
    if method == "mu":
        X = xp.ones_like(B) if X0 is None else xp.array(X0, dtype=xp.float64)
        Bp = xp.maximum(B, 0)
        for _ in range(max_iter):
            X *= Bp / (X @ Gd + eps)
        return X
    X = xp.zeros_like(B) if X0 is None else xp.maximum(xp.array(X0, dtype=xp.float64), 0)
    return _nnls_hals(Gd, B, X, max_iter, tol)


# ---------------------------------------------------------------------------------------------
# Streaming over examples
# ---------------------------------------------------------------------------------------------


def _dense(x: Any) -> Any:
    if sp.issparse(x) or type(x).__module__.startswith("cupyx"):
        return x.toarray()
    return x


def gram(H: Any) -> np.ndarray:
    """``H Hᵀ`` in float64 NumPy for a dense, SciPy-sparse, CuPy or Dask ``H`` (r×P')."""
    import dask.array as da

    if isinstance(H, da.Array):
        return np.asarray(to_numpy(_gram_dask(H).compute()), dtype=np.float64)
    if sp.issparse(H):
        H64 = H.astype(np.float64)
        return np.asarray((H64 @ H64.T).toarray())
    xp = get_namespace(H)
    H64 = xp.asarray(H, dtype=xp.float64)
    return np.asarray(to_numpy(H64 @ H64.T))


def _gram_task(H_b: Any) -> Any:
    xp = get_namespace(H_b)
    H64 = H_b.astype(xp.float64) if not sp.issparse(H_b) else H_b.astype(np.float64)
    return _dense(H64 @ H64.T)[None]


def _gram_dask(H: Any) -> Any:
    import dask.array as da

    r = H.shape[0]
    H = H.rechunk({0: -1})
    parts = da.blockwise(
        _gram_task,
        "bxy",
        H,
        "jb",
        new_axes={"x": r, "y": r},
        adjust_chunks={"b": 1},
        concatenate=True,
        dtype=np.float64,
        meta=get_namespace(H._meta).empty((0, 0, 0), dtype=np.float64),
    )
    return parts.sum(axis=0)


def _aht(A_b: Any, H_b: Any) -> Any:
    """``A_b H_bᵀ`` (float64, dense) for any mix of dense/CSR blocks."""
    if sp.issparse(H_b) and not sp.issparse(A_b):
        out = (H_b @ A_b.T).T
    else:
        out = A_b @ H_b.T
    out = _dense(out)
    xp = get_namespace(out)
    return xp.asarray(out, dtype=xp.float64)


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise UserInputError(f"method must be one of {_METHODS}, got {method!r}")


def fit_coeffs(
    A: Any,
    H: Any,
    *,
    method: Method = "hals",
    max_iter: int = 1000,
    tol: float = 1e-10,
    eps: float = 1e-7,
    chunk_rows: int | None = None,
) -> Any:
    """In-memory coefficients ``W`` (n×r) of PEF rows ``A`` for a fixed dictionary ``H``.

    Args:
        A: ``(n, P')`` dense or CSR matrix, a list of column blocks, or a ``PefMatrix`` (its
            columns must be the dictionary's kept columns, rows normalised the same way).
        H: ``(r, P')`` dense or SciPy-sparse (e.g. ``SparseH.to_scipy()``).
        method, max_iter, tol, eps: see :func:`nnls_gram`.
        chunk_rows: solve this many examples at a time (memory bound on the solver).
    """
    _check_method(method)
    blocks = tuple(getattr(A, "blocks", A if isinstance(A, (list, tuple)) else (A,)))
    if sum(b.shape[1] for b in blocks) != H.shape[1]:
        raise UserInputError(f"A has {sum(b.shape[1] for b in blocks)} columns, H {H.shape[1]}")
    G = gram(H)
    B = None
    start = 0
    for A_b in blocks:
        stop = start + A_b.shape[1]
        part = _aht(A_b, H[:, start:stop])
        B = part if B is None else B + part
        start = stop
    n = B.shape[0]
    step = n if chunk_rows is None else max(1, int(chunk_rows))
    xp = get_namespace(B)
    outs = [
        nnls_gram(G, B[s : s + step], method=method, max_iter=max_iter, tol=tol, eps=eps)
        for s in range(0, n, step)
    ]
    return xp.concatenate(outs, axis=0) if outs else xp.zeros((0, G.shape[0]))


def _nnls_task(B: Any, G: np.ndarray, method: str, max_iter: int, tol: float, eps: float) -> Any:
    return nnls_gram(G, B, method=method, max_iter=max_iter, tol=tol, eps=eps)


def _h_as_dask(H: Any, col_chunks: Sequence[int]) -> Any:
    import dask
    import dask.array as da

    if isinstance(H, da.Array):
        return H.rechunk(((H.shape[0],), tuple(col_chunks)))
    if not sp.issparse(H):
        return da.from_array(H, chunks=((H.shape[0],), tuple(col_chunks)))
    H = sp.csr_matrix(H)
    parts, start = [], 0
    for w in col_chunks:
        piece = H[:, start : start + w]
        parts.append(
            da.from_delayed(
                dask.delayed(piece, pure=True),
                shape=piece.shape,
                dtype=H.dtype,
                meta=sp.csr_matrix((0, 0), dtype=H.dtype),
            )
        )
        start += w
    return da.concatenate(parts, axis=1)


def _aht_task(A_b: Any, H_b: Any) -> Any:
    return _aht(A_b, H_b)[:, None, :]


def coeffs_dask(A: Any, H: Any) -> Any:
    """``A Hᵀ`` (n×r float64) as a Dask array chunked like A's rows: a sum over column blocks."""
    import dask.array as da

    Hd = _h_as_dask(H, A.chunks[1])
    xp = get_namespace(A._meta) if not sp.issparse(A._meta) else np
    parts = da.blockwise(
        _aht_task,
        "ibk",
        A,
        "ib",
        Hd,
        "kb",
        adjust_chunks={"b": 1},
        concatenate=True,
        dtype=np.float64,
        meta=xp.empty((0, 0, 0), dtype=np.float64),
    )
    return parts.sum(axis=1, split_every=8)


def fit_coeffs_dask(
    A: Any,
    H: Any,
    *,
    method: Method = "hals",
    max_iter: int = 1000,
    tol: float = 1e-10,
    eps: float = 1e-7,
) -> Any:
    """Lazy coefficients ``W`` (n×r) of a Dask PEF matrix for a fixed dictionary ``H``.

    A is a Dask array ``(n, P')`` chunked by examples and (optionally) columns; ``H`` is dense,
    SciPy-sparse or a Dask array. ``HHᵀ`` is computed once (eagerly), ``A Hᵀ`` is reduced over
    column blocks per example chunk and the NNLS runs per example chunk. Returns a Dask array
    chunked like A's rows.
    """
    import dask.array as da

    _check_method(method)
    if not isinstance(A, da.Array) or A.ndim != 2:
        raise UserInputError(f"A must be a 2-D dask array, got {type(A).__name__}")
    if A.shape[1] != H.shape[1]:
        raise UserInputError(f"A has {A.shape[1]} columns, H {H.shape[1]}")
    G = gram(H)
    B = coeffs_dask(A, H)
    return B.map_blocks(_nnls_task, G, method, max_iter, tol, eps, dtype=np.float64, meta=B._meta)


# ---------------------------------------------------------------------------------------------
# Sparsification of H
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseH:
    """A CSR dictionary ``H`` (r×P'): ``values``, ``indptr`` (int64, r+1), ``indices``."""

    values: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    shape: tuple[int, int]

    def to_scipy(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.values, self.indices, self.indptr), shape=self.shape)

    def toarray(self) -> np.ndarray:
        return self.to_scipy().toarray()

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])


def _threshold_task(H_b: Any, norms: np.ndarray, threshold: float) -> Any:
    Hn = to_numpy(H_b) / norms[:, None]
    Hn[Hn < threshold] = 0
    return sp.csr_matrix(Hn)


def sparsify(W: Any, H: Any, threshold: float) -> tuple[np.ndarray, SparseH]:
    """Unit-norm rows of H with the scale moved into W, then drop entries below ``threshold``.

    ``W' = W diag(‖h_j‖)``, ``H' = diag(1/‖h_j‖) H`` (so ``W'H' = WH`` before thresholding;
    rows of norm 0 stay zero and zero their W column), then entries of ``H'`` below
    ``threshold`` are set to zero and ``H'`` is returned in CSR form.

    Args:
        W: ``(n, r)`` coefficients.
        H: ``(r, P')`` non-negative dictionary, NumPy/CuPy or Dask (column chunks).
        threshold: keep entries ``≥ threshold`` of the normalised rows (``0`` keeps all
            nonzeros).

    Returns:
        ``(W', SparseH)`` with float64 ``W'``; values keep H's dtype, ``indptr`` is int64.
    """
    import dask
    import dask.array as da

    if not threshold >= 0:
        raise UserInputError(f"threshold must be >= 0, got {threshold}")
    W = np.asarray(to_numpy(W), dtype=np.float64)
    if W.shape[1] != H.shape[0]:
        raise UserInputError(f"W is {W.shape}, H {H.shape}: need W (n, r) and H (r, P')")
    if isinstance(H, da.Array):
        norms = np.sqrt(np.asarray(to_numpy((H.astype(np.float64) ** 2).sum(axis=1).compute())))
    else:
        H64 = np.asarray(to_numpy(H), dtype=np.float64)
        norms = np.sqrt((H64 * H64).sum(axis=1))
    safe = np.where(norms > 0, norms, 1.0)
    W2 = W * np.where(norms > 0, norms, 0.0)[None, :]
    if isinstance(H, da.Array):
        pieces = dask.compute(
            *[
                dask.delayed(_threshold_task)(blk, safe, threshold)
                for blk in H.rechunk({0: -1}).to_delayed().ravel()
            ]
        )
        Hs = sp.hstack(pieces, format="csr")
    else:
        Hs = _threshold_task(H, safe, threshold)
    Hs = sp.csr_matrix(Hs)
    Hs.sort_indices()
    Hs.eliminate_zeros()
    dtype = H.dtype if np.issubdtype(H.dtype, np.floating) else np.float64
    return W2, SparseH(
        values=np.asarray(Hs.data, dtype=dtype),
        indptr=np.asarray(Hs.indptr, dtype=np.int64),
        indices=np.asarray(Hs.indices, dtype=np.int64 if H.shape[1] >= 2**31 else np.int32),
        shape=(int(H.shape[0]), int(H.shape[1])),
    )
