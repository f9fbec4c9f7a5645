r"""The inverse empirical Fisher of a gradient window, matrix-free (M-FAC).

A *window* is ``m`` gradients ``g_1, …, g_m ∈ R^d`` stacked as the rows of ``G ∈ R^{m×d}``.
M-FAC (Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", NeurIPS 2021, arXiv 2107.03356) works with the damped empirical Fisher

    F = λ I + (1/n) Σ_i g_i g_iᵀ = λ I + (1/n) Gᵀ G,

``λ > 0`` the dampening (``damp``) and ``n`` the number of gradients it averages (``n_grads``,
default ``m``; the optimizer passes ``min(count, m)`` while its window fills up).

**Woodbury / Cholesky form.** With ``A = λI``, ``U = Gᵀ``, ``C = I/n`` and ``V = G`` in
``(A + UCV)⁻¹ = A⁻¹ − A⁻¹U (C⁻¹ + V A⁻¹ U)⁻¹ V A⁻¹``::

    F⁻¹ = λ⁻¹ I − λ⁻² Gᵀ (n I + G Gᵀ / λ)⁻¹ G
        = λ⁻¹ (I − Gᵀ K⁻¹ G),          K = n λ I + G Gᵀ ∈ R^{m×m}.

``K ⪰ nλ I`` is symmetric positive definite for every window when ``λ > 0``; it is factored once
in float64, ``K = L Lᵀ``, and with ``W = L⁻¹ G`` (``WᵀW = Gᵀ K⁻¹ G``, a triangular solve per
chunk)::

    F⁻¹ X     = λ⁻¹ (X − Gᵀ C),        C = K⁻¹ (G X)            (m × r coefficients)
    [F⁻¹]_jj = λ⁻¹ (1 − ‖W_{:,j}‖²)
    [F⁻¹]_jk = λ⁻¹ (δ_jk − W_{:,j}ᵀ W_{:,k}).

(The seed factors ``K/λ = mI + GGᵀ/λ`` by LU without pivoting; ``K`` itself has entries of the
size of the Gram matrix instead of ``1/λ`` times it.)

**Chunks.** Every d-sized quantity is a sum over column chunks ``G = [G_1 | … | G_p]``:
``G Gᵀ = Σ_c G_c G_cᵀ``, ``G X = Σ_c G_c X_c``, and the chunk ``c`` of ``F⁻¹X`` and of the
diagonal needs only ``G_c``, ``X_c`` and an m×m (or m×r) matrix. The per-chunk kernels below
(:func:`gram_partial`, :func:`project_partial`, :func:`apply_partial`,
:func:`diagonal_partial`) are what a Dask graph maps over zarr chunks; the m×m algebra
(:func:`factor_window`, :class:`WindowFactor`) stays in NumPy float64. Chunks may be NumPy or
CuPy; every chunk is promoted to float64 before use, so a float32 or bfloat16-stored window
gives float64-accurate results.

**Blocked variant.** :class:`BlockedInverseFisher` cuts the parameters into consecutive blocks
of ``block_size`` (the last one shorter) and inverts the block-diagonal Fisher
``blockdiag(λI + G_bᵀ G_b / n)``: every block is an independent window ``G_b = G[:, block]``.
A block is never split across chunks (chunk boundaries must be block boundaries), so the
blocked kernels are maps over chunks with no reduction.

Costs (d parameters, m gradients, r right-hand sides): factoring ``O(d m² + m³)`` once;
``F⁻¹ X`` ``O(d m r + m² r)``; the diagonal ``O(d m²)``; an entry ``O(m²)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.linalg

from curvlake._array import get_namespace, to_numpy
from curvlake.errors import UserInputError
from curvlake.pipelines.mfac._checks import check_damp, check_indices, check_int

__all__ = [
    "BlockFactors",
    "BlockedInverseFisher",
    "InverseFisher",
    "WindowFactor",
    "apply_partial",
    "blocked_apply_partial",
    "blocked_diagonal_partial",
    "blocked_factors",
    "diagonal_partial",
    "factor_window",
    "gram_partial",
    "project_partial",
    "seed_recursion_ihvp",
]

#: float64 bytes of one in-memory chunk that :class:`InverseFisher` cuts a plain array into, so
#: the float64 copy a kernel makes of a float32 chunk stays bounded (16 MiB: the copy is then
#: about 1.5x faster than at 64 MiB, benchmarks/mfac.py).
_CHUNK_BYTES = 16 * 2**20


def _float64(array: Any) -> Any:
    """``array`` as float64 in its own array module (a no-op for float64 input)."""
    return get_namespace(array).asarray(array, dtype="float64")


# -- m × m algebra -----------------------------------------------------------------------------


class WindowFactor:
    r"""The Cholesky factor of ``K = n λ I + G Gᵀ`` (float64, host): the m × m part of F⁻¹.

    Attributes:
        damp: λ.
        n_grads: n, the number of gradients the Fisher averages.
        cholesky: the lower-triangular ``L`` with ``K = L Lᵀ`` (m × m, float64).
    """

    def __init__(self, damp: float, n_grads: int, cholesky: np.ndarray):
        self.damp = damp
        self.n_grads = n_grads
        self.cholesky = cholesky

    @property
    def m(self) -> int:
        """Number of gradients (rows) in the window."""
        return int(self.cholesky.shape[0])

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``K⁻¹ rhs`` for ``rhs`` of shape (m,) or (m, r), float64 (two triangular solves)."""
        return scipy.linalg.cho_solve((self.cholesky, True), np.asarray(rhs, dtype=np.float64))

    def entries_from_columns(
        self, columns: np.ndarray, identity: np.ndarray | None = None
    ) -> np.ndarray:
        r"""``[F⁻¹]_{QQ} = λ⁻¹ (I_Q − W_Qᵀ W_Q)`` from the window columns ``G[:, Q]`` (m × q).

        Args:
            columns: the window's columns ``G[:, Q]``.
            identity: ``[δ_jk]`` for the columns (q × q; default the identity, i.e. ``Q``
                without repeats).
        """
        weights = _solve_lower(self.cholesky, np.asarray(columns, dtype=np.float64))
        if identity is None:
            identity = np.eye(weights.shape[1])
        return (identity - weights.T @ weights) / self.damp


def factor_window(gram: np.ndarray, damp: float, n_grads: int | None = None) -> WindowFactor:
    r"""Factor ``K = n λ I + G Gᵀ`` from the Gram matrix ``G Gᵀ`` (the sum of the chunks'
    :func:`gram_partial`), by Cholesky in float64.

    Args:
        gram: ``G Gᵀ`` (m × m).
        damp: λ > 0.
        n_grads: n (default m).

    Raises:
        UserInputError: λ <= 0, a non-finite Gram matrix, or ``K`` not numerically positive
            definite (λ below the rounding error of the Gram matrix).
    """
    damp = check_damp(damp)
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise UserInputError(f"the Gram matrix must be square m × m, got shape {gram.shape}")
    n_grads = gram.shape[0] if n_grads is None else check_int("n_grads", n_grads)
    if not np.all(np.isfinite(gram)):
        raise UserInputError("the gradient window holds non-finite values (nan or inf)")
    kernel = gram + n_grads * damp * np.eye(gram.shape[0])
    try:
        cholesky = scipy.linalg.cholesky(kernel, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise UserInputError(
            f"K = n·damp·I + G Gᵀ is not numerically positive definite (n={n_grads}, "
            f"damp={damp:g}, largest Gram entry {np.abs(gram).max():.3g}): increase damp"
        ) from None
    return WindowFactor(damp, n_grads, cholesky)


# -- per-chunk kernels (NumPy or CuPy chunks; small outputs on the host) -----------------------


def gram_partial(chunk: Any) -> np.ndarray:
    """``G_c G_cᵀ`` of one column chunk ``G_c`` (m × d_c), float64 on the host (m × m)."""
    chunk = _float64(chunk)
    return to_numpy(chunk @ chunk.T)


def project_partial(chunk: Any, x_chunk: Any) -> np.ndarray:
    """``G_c X_c`` (m,) or (m, r), float64 on the host: one chunk's share of ``G X``."""
    return to_numpy(_float64(chunk) @ _float64(x_chunk))


def apply_partial(chunk: Any, x_chunk: Any, coefficients: np.ndarray, damp: float) -> Any:
    """Chunk ``c`` of ``F⁻¹ X``: ``λ⁻¹ (X_c − G_cᵀ C)`` with ``C = K⁻¹ G X``.

    Args:
        chunk: ``G_c`` (m × d_c).
        x_chunk: ``X_c`` (d_c,) or (d_c, r).
        coefficients: ``C`` (m,) or (m, r), from :meth:`WindowFactor.solve`.
        damp: λ.

    Returns:
        float64 (d_c,) or (d_c, r), in the chunk's array module.
    """
    xp = get_namespace(chunk)
    return (_float64(x_chunk) - _float64(chunk).T @ xp.asarray(coefficients)) / damp


def diagonal_partial(chunk: Any, cholesky: np.ndarray, damp: float) -> Any:
    """Chunk ``c`` of the diagonal of ``F⁻¹``: ``λ⁻¹ (1 − Σ_i W_ij²)``, ``W = L⁻¹ G_c`` by a
    triangular solve (``cholesky`` is ``L`` of :class:`WindowFactor`), float64."""
    weights = _solve_lower(cholesky, _float64(chunk))
    return (1.0 - (weights * weights).sum(axis=0)) / damp


def _solve_lower(cholesky: np.ndarray, rhs: Any) -> Any:
    """``L⁻¹ rhs`` for a lower-triangular host matrix ``L``, in ``rhs``'s array module."""
    if get_namespace(rhs) is np:
        return scipy.linalg.solve_triangular(cholesky, rhs, lower=True, check_finite=False)
    import cupyx.scipy.linalg

    xp = get_namespace(rhs)
    return cupyx.scipy.linalg.solve_triangular(xp.asarray(cholesky), rhs, lower=True)


# -- the window as column chunks ---------------------------------------------------------------


def _is_dask(array: Any) -> bool:
    return type(array).__module__.startswith("dask")


def _as_chunk_list(window: Any, chunk_size: int | None, align: int) -> list[Any]:
    """The window as a list of 2-D column chunks with equal rows. A plain array is cut into
    views of ``chunk_size`` columns (default: about 16 MiB of float64, a multiple of
    ``align``); a list is taken as it is."""
    is_list = isinstance(window, Sequence) and not isinstance(window, str | bytes)
    chunks = list(window) if is_list else [window]
    if not chunks:
        raise UserInputError("the window needs at least one column chunk")
    for chunk in chunks:
        if not hasattr(chunk, "ndim") or chunk.ndim != 2:
            raise UserInputError(
                "a window is a 2-D array (m gradients × d parameters) or a list of 2-D column "
                f"chunks, got {type(chunk).__name__} with shape {getattr(chunk, 'shape', None)}"
            )
    rows = {int(chunk.shape[0]) for chunk in chunks}
    if len(rows) != 1 or 0 in rows:
        raise UserInputError(f"column chunks must all have the same m >= 1 rows, got {rows}")
    if any(int(chunk.shape[1]) == 0 for chunk in chunks):
        raise UserInputError("column chunks must have at least one column")
    if is_list:
        return chunks
    m, d = window.shape
    size = _check_chunk_size(chunk_size, m, align)
    return [window[:, start : start + size] for start in range(0, d, size)]


def _check_chunk_size(chunk_size: int | None, m: int, align: int) -> int:
    if chunk_size is None:
        return max(align, _CHUNK_BYTES // (8 * m) // align * align)
    return check_int("chunk_size", chunk_size)


def _check_dask_window(window: Any) -> Any:
    if window.ndim != 2 or 0 in window.shape:
        raise UserInputError(f"the window must be 2-D m × d with m, d >= 1, got {window.shape}")
    # All m rows in every chunk: the kernels contract over the gradients.
    return window.rechunk({0: -1})


class _Columns:
    """A window stored as in-memory column chunks (NumPy or CuPy)."""

    def __init__(self, chunks: list[Any]):
        self.chunks = chunks
        sizes = [int(chunk.shape[1]) for chunk in chunks]
        self.sizes = tuple(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.m = int(chunks[0].shape[0])
        self.n_params = int(self.offsets[-1])

    def split(self, x: Any) -> list[Any]:
        bounds = zip(self.offsets[:-1], self.offsets[1:], strict=True)
        return [x[int(a) : int(b)] for a, b in bounds]

    def gram(self) -> np.ndarray:
        return sum(gram_partial(chunk) for chunk in self.chunks)

    def project(self, x: Any) -> np.ndarray:
        return sum(project_partial(c, xc) for c, xc in zip(self.chunks, self.split(x), strict=True))

    def apply(self, x: Any, coefficients: np.ndarray, damp: float) -> Any:
        parts = [
            apply_partial(c, xc, coefficients, damp)
            for c, xc in zip(self.chunks, self.split(x), strict=True)
        ]
        return get_namespace(parts[0]).concatenate(parts)

    def diagonal(self, cholesky: np.ndarray, damp: float) -> Any:
        parts = [diagonal_partial(c, cholesky, damp) for c in self.chunks]
        return get_namespace(parts[0]).concatenate(parts)

    def columns(self, indices: np.ndarray) -> np.ndarray:
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((self.m, indices.size), dtype=np.float64)
        for c in np.unique(which):
            here = np.flatnonzero(which == c)
            local = indices[here] - self.offsets[c]
            out[:, here] = to_numpy(_float64(self.chunks[c][:, local]))
        return out


def _meta(window: Any, ndim: int) -> Any:
    xp = get_namespace(window._meta)
    return xp.empty((0,) * ndim, dtype="float64")


def _stacked(partial, *args: Any) -> np.ndarray:
    return partial(*args)[None]


class _DaskColumns:
    """A window stored as a Dask array chunked along the parameter axis (lazy results)."""

    def __init__(self, window: Any):
        self.window = _check_dask_window(window)
        self.m, self.n_params = (int(s) for s in self.window.shape)
        self.sizes = tuple(int(s) for s in self.window.chunks[1])

    def _align(self, x: Any) -> Any:
        import dask.array as da

        chunks = (self.sizes, *((int(s),) for s in x.shape[1:]))
        if _is_dask(x):
            return x.rechunk(chunks)
        return da.from_array(x, chunks=chunks)

    def gram(self) -> np.ndarray:
        import dask.array as da

        parts = da.blockwise(
            _stacked, "jab", gram_partial, None, self.window, "ij",
            new_axes={"a": self.m, "b": self.m}, adjust_chunks={"j": 1},
            concatenate=True, meta=np.empty((0, 0, 0)),
        )  # fmt: skip
        return np.asarray(parts.sum(axis=0).compute())

    def project(self, x: Any) -> Any:
        import dask.array as da

        x = self._align(x)
        x_index = "jr"[: x.ndim]
        parts = da.blockwise(
            _stacked, "ji" + x_index[1:], project_partial, None, self.window, "ij", x, x_index,
            adjust_chunks={"j": 1}, concatenate=True, meta=np.empty((0,) * (x.ndim + 1)),
        )  # fmt: skip
        return parts.sum(axis=0)

    def apply(self, x: Any, coefficients: Any, damp: float) -> Any:
        import dask.array as da

        x = self._align(x)
        x_index = "jr"[: x.ndim]
        return da.blockwise(
            apply_partial, x_index, self.window, "ij", x, x_index, coefficients,
            "i" + x_index[1:], damp, None, concatenate=True, meta=_meta(self.window, x.ndim),
        )  # fmt: skip

    def diagonal(self, cholesky: np.ndarray, damp: float) -> Any:
        import dask.array as da

        matrix = da.from_array(cholesky, chunks=-1)
        return da.blockwise(
            diagonal_partial, "j", self.window, "ij", matrix, "ik", damp, None,
            concatenate=True, meta=_meta(self.window, 1),
        )  # fmt: skip

    def columns(self, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices, kind="stable")
        picked = to_numpy(self.window[:, indices[order]].compute()).astype(np.float64)
        out = np.empty_like(picked)
        out[:, order] = picked
        return out


def _columns_of(window: Any, chunk_size: int | None, align: int = 1) -> _Columns | _DaskColumns:
    if _is_dask(window):
        if chunk_size is not None:
            window = window.rechunk({1: _check_chunk_size(chunk_size, 1, align)})
        return _DaskColumns(window)
    return _Columns(_as_chunk_list(window, chunk_size, align))


def _check_rhs(x: Any, n_params: int) -> None:
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) not in (1, 2) or shape[0] != n_params:
        raise UserInputError(
            f"F⁻¹ applies to a vector ({n_params},) or a matrix ({n_params}, r), got shape {shape}"
        )


# -- the public operator -----------------------------------------------------------------------


class _WindowOperator:
    """What both inverse-Fisher operators say about the window they read (``_columns``)."""

    _columns: _Columns | _DaskColumns

    @property
    def m(self) -> int:
        """Number of gradients (rows) in the window."""
        return self._columns.m

    @property
    def n_params(self) -> int:
        """Number of parameters d."""
        return self._columns.n_params

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Columns per chunk of the window as this operator reads it."""
        return self._columns.sizes


class InverseFisher(_WindowOperator):
    r"""``F⁻¹`` for ``F = λ I + Gᵀ G / n`` of a window ``G`` (m × d), matrix-free.

    ``K = n λ I + G Gᵀ`` is built from per-chunk Gram partials and factored once (float64
    Cholesky) at construction; products, the diagonal and entries then cost one pass over the
    window (see the module docstring for the maths).

    Args:
        window: the gradients as rows: a NumPy or CuPy array (m × d), a list of column chunks
            ``G[:, cols]`` (m × d_c each, in parameter order), or a Dask array (m × d) chunked
            along the parameter axis (results of ``@`` and :meth:`diagonal` are then lazy Dask
            arrays and memory stays bounded by a chunk).
        damp: λ > 0.
        n_grads: n, the number of gradients ``F`` averages (default m). For a ring buffer
            that is not full yet pass the number of filled rows: zero rows add nothing to
            ``GᵀG`` (and nothing but ``nλ`` on the diagonal of ``K``).
        chunk_size: columns per chunk to cut a plain array (or rechunk a Dask array) into
            (default: a plain array into chunks of about 16 MiB of float64; a Dask array as
            it is chunked).

    Raises:
        UserInputError: a malformed window, ``damp <= 0``, ``n_grads < 1``, non-finite values.

    Example:
        >>> import numpy as np
        >>> G = np.random.default_rng(0).normal(size=(4, 10))
        >>> inv = InverseFisher(G, damp=0.1)
        >>> dense = np.linalg.inv(0.1 * np.eye(10) + G.T @ G / 4)
        >>> x = np.arange(10.0)
        >>> bool(np.allclose(inv @ x, dense @ x) and np.allclose(inv.diagonal(), np.diag(dense)))
        True
    """

    def __init__(
        self,
        window: Any,
        damp: float,
        *,
        n_grads: int | None = None,
        chunk_size: int | None = None,
    ):
        damp = check_damp(damp)
        self._columns = _columns_of(window, chunk_size)
        self.factor = factor_window(self._columns.gram(), damp, n_grads)
        #: The lake window it was read from (:meth:`from_lake`), else None.
        self.window: Any = None

    @classmethod
    def from_lake(
        cls,
        lake: Any,
        window_id: str,
        damp: float,
        *,
        n_grads: int | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> InverseFisher:
        """``F⁻¹`` of a ``grad_window`` artifact of the lake.

        Args:
            lake: the lake (or its URL).
            window_id: a ``grad_window`` artifact (``curvlake mfac grads``).
            damp: λ > 0.
            n_grads: n (default m).
            chunk_size: columns per chunk (default: about 16 MiB of float64 in memory; the
                stored chunks with Dask).
            backend: ``numpy`` or ``cupy`` (the window read into memory), ``dask`` (lazy
                results, memory bounded by the chunks), or ``auto``: Dask when the window
                takes more than a quarter of the memory budget
                (:func:`curvlake.engine.memory_budget`), else CuPy on a GPU, else NumPy.

        The operator's ``window`` attribute is the window's
        :class:`~curvlake.pipelines.mfac.lake.GradWindow`: its ``coordinates`` say which θ
        coordinate each row and column of ``F⁻¹`` is (None: all of θ, in order).

        Usage: ``inv = InverseFisher.from_lake(lake, window_id, damp=1e-4)``, then ``inv @ x``,
        ``inv.diagonal()`` and ``inv.entry(j, k)`` as for an in-memory window.
        """
        from curvlake.pipelines.mfac.lake import window_operand

        operand, window = window_operand(lake, window_id, backend)
        operator = cls(operand, damp, n_grads=n_grads, chunk_size=chunk_size)
        operator.window = window
        return operator

    @property
    def damp(self) -> float:
        """λ."""
        return self.factor.damp

    @property
    def n_grads(self) -> int:
        """n in ``F = λI + GᵀG/n``."""
        return self.factor.n_grads

    def __matmul__(self, x: Any) -> Any:
        """``F⁻¹ x`` for a vector (d,) or matrix (d, r): float64, same array kind as the
        window (NumPy, CuPy, or lazy Dask)."""
        _check_rhs(x, self.n_params)
        projection = self._columns.project(x)
        if isinstance(self._columns, _DaskColumns):
            coefficients = projection.map_blocks(self.factor.solve, dtype=np.float64)
        else:
            coefficients = self.factor.solve(projection)
        return self._columns.apply(x, coefficients, self.damp)

    def diagonal(self) -> Any:
        """The diagonal of ``F⁻¹`` (d,), float64."""
        return self._columns.diagonal(self.factor.cholesky, self.damp)

    def entry(self, j: int, k: int) -> float:
        """``[F⁻¹]_jk`` (O(m²): two columns of the window and triangular solves)."""
        return float(self.submatrix([j, k])[0, 1])

    def submatrix(self, indices: Any) -> np.ndarray:
        """``[F⁻¹]_{QQ}`` for the parameter indices ``Q`` (q × q, float64 on the host;
        O(m² q + m q²)). Repeated indices repeat rows and columns."""
        indices = check_indices(indices, self.n_params)
        identity = (indices[:, None] == indices[None, :]).astype(np.float64)
        return self.factor.entries_from_columns(self._columns.columns(indices), identity)


# -- blocked (block-diagonal) variant ----------------------------------------------------------


class _BlockBatch:
    """Equal-size consecutive blocks of one chunk, factored together.

    ``dual``: the matrices are ``L_b⁻¹`` of ``K_b = nλI + G_b G_bᵀ`` (count × m × m) and
    products need the window; otherwise they are ``F_b⁻¹`` itself (count × s × s), cheaper
    when the block is narrower than the window (s < m).
    """

    def __init__(self, start: int, size: int, count: int, dual: bool, matrices: np.ndarray):
        self.start, self.size, self.count, self.dual = start, size, count, dual
        self.matrices = matrices

    @property
    def stop(self) -> int:
        return self.start + self.size * self.count

    def blocks_of(self, array: Any) -> Any:
        """(count, s, ...) view of rows [start, stop) of a (d_c, ...) array."""
        part = array[self.start : self.stop]
        return part.reshape((self.count, self.size, *part.shape[1:]))

    def window_blocks(self, chunk: Any) -> Any:
        """(count, m, s) blocks of the chunk's columns [start, stop), float64."""
        part = _float64(chunk[:, self.start : self.stop])
        m = part.shape[0]
        return part.reshape(m, self.count, self.size).transpose(1, 0, 2)


class BlockFactors:
    """The factors of every block of one column chunk (a whole number of blocks, the last of
    them possibly short): the output of :func:`blocked_factors`."""

    def __init__(self, damp: float, batches: list[_BlockBatch]):
        self.damp = damp
        self.batches = batches


def _batched_cholesky(matrices: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.cholesky(matrices, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise UserInputError(
            "a block's damped Fisher is not numerically positive definite "
            f"(largest entry {np.abs(matrices).max():.3g}): increase damp"
        ) from None


def blocked_factors(chunk: Any, block_size: int, damp: float, n_grads: int) -> BlockFactors:
    r"""Factor every block of a column chunk that starts at a block boundary.

    The chunk holds ``⌊d_c / s⌋`` full blocks of ``s = block_size`` columns and possibly a
    shorter tail. Each block is an independent window ``G_b`` (m × s): when ``s >= m`` it is
    factored in the dual (Woodbury) form ``K_b = nλI + G_b G_bᵀ`` (m × m), otherwise the
    block's own ``F_b = λI + G_bᵀG_b/n`` (s × s) is inverted directly, whichever is smaller.
    Blocks of equal size are factored together by batched float64 Cholesky.

    Raises:
        UserInputError: a non-finite window or a block that is not numerically positive
            definite.
    """
    m, width = int(chunk.shape[0]), int(chunk.shape[1])
    full, tail = divmod(width, block_size)
    batches = []
    for start, size, count in ((0, block_size, full), (full * block_size, tail, 1)):
        if size == 0 or count == 0:
            continue
        batch = _BlockBatch(start, size, count, size >= m, np.empty(0))
        blocks = batch.window_blocks(chunk)
        if batch.dual:
            gram = to_numpy(blocks @ blocks.transpose(0, 2, 1)) + n_grads * damp * np.eye(m)
        else:
            gram = to_numpy(blocks.transpose(0, 2, 1) @ blocks) / n_grads + damp * np.eye(size)
        if not np.all(np.isfinite(gram)):
            raise UserInputError("the gradient window holds non-finite values (nan or inf)")
        identity = np.broadcast_to(np.eye(gram.shape[-1]), gram.shape)
        inverse = scipy.linalg.solve_triangular(_batched_cholesky(gram), identity, lower=True)
        batch.matrices = inverse if batch.dual else inverse.transpose(0, 2, 1) @ inverse
        batches.append(batch)
    return BlockFactors(damp, batches)


def blocked_apply_partial(chunk: Any, x_chunk: Any, factors: BlockFactors) -> Any:
    r"""Chunk ``c`` of ``F_blocked⁻¹ X``: per block ``λ⁻¹(X_b − G_bᵀ K_b⁻¹ G_b X_b)`` (dual)
    or ``F_b⁻¹ X_b`` (direct). Float64, in the chunk's array module."""
    xp = get_namespace(chunk)
    x_chunk = _float64(x_chunk)
    vector = x_chunk.ndim == 1
    if vector:
        x_chunk = x_chunk[:, None]
    parts = []
    for batch in factors.batches:
        matrices = xp.asarray(batch.matrices)
        xb = batch.blocks_of(x_chunk)
        if batch.dual:
            blocks = batch.window_blocks(chunk)
            coefficients = matrices.transpose(0, 2, 1) @ (matrices @ (blocks @ xb))
            out = (xb - blocks.transpose(0, 2, 1) @ coefficients) / factors.damp
        else:
            out = matrices @ xb
        parts.append(out.reshape(-1, x_chunk.shape[1]))
    result = xp.concatenate(parts)
    return result[:, 0] if vector else result


def blocked_diagonal_partial(chunk: Any, factors: BlockFactors) -> Any:
    """Chunk ``c`` of the diagonal of ``F_blocked⁻¹`` (d_c,), float64."""
    xp = get_namespace(chunk)
    parts = []
    for batch in factors.batches:
        matrices = xp.asarray(batch.matrices)
        if batch.dual:
            weights = matrices @ batch.window_blocks(chunk)
            parts.append(((1.0 - (weights * weights).sum(axis=1)) / factors.damp).reshape(-1))
        else:
            parts.append(xp.diagonal(matrices, axis1=1, axis2=2).reshape(-1))
    return xp.concatenate(parts)


def _blocked_apply_task(chunk, x_chunk, block_size, damp, n_grads):
    factors = blocked_factors(chunk, block_size, damp, n_grads)
    return blocked_apply_partial(chunk, x_chunk, factors)


def _blocked_diagonal_task(chunk, block_size, damp, n_grads):
    return blocked_diagonal_partial(chunk, blocked_factors(chunk, block_size, damp, n_grads))


def _check_aligned(sizes: Sequence[int], block_size: int) -> None:
    misaligned = [i for i, size in enumerate(sizes[:-1]) if size % block_size]
    if misaligned:
        raise UserInputError(
            f"chunk boundaries must be block boundaries: chunk sizes {tuple(sizes)} are not "
            f"multiples of block_size={block_size} (chunk {misaligned[0]}); rechunk the window "
            f"along the parameter axis to a multiple of {block_size}"
        )


class BlockedInverseFisher(_WindowOperator):
    r"""``F⁻¹`` of the block-diagonal Fisher ``blockdiag_b(λ I + G_bᵀ G_b / n)``.

    The parameters are cut into consecutive blocks of ``block_size`` (the last one may be
    shorter); block ``b`` sees only its columns ``G_b = G[:, b]`` of the window, as in the
    seed's ``HInvFastBlock``. Blocks are aligned to chunks: every chunk but the last must hold
    a whole number of blocks. Blocks of width ``s >= m`` use the Woodbury form, narrower ones
    invert their s × s Fisher directly (see :func:`blocked_factors`).

    Args:
        window: as for :class:`InverseFisher` (plain arrays are cut into block-aligned chunks
            of about 16 MiB; Dask arrays keep their chunks, results are lazy, and each task
            refactors its chunk's blocks so nothing but a chunk is ever in memory).
        damp: λ > 0.
        block_size: columns per block s >= 1.
        n_grads: n (default m).
        chunk_size: columns per chunk, a multiple of ``block_size`` (default: see above).

    Raises:
        UserInputError: bad arguments or chunks that are not aligned to blocks.
    """

    def __init__(
        self,
        window: Any,
        damp: float,
        block_size: int,
        *,
        n_grads: int | None = None,
        chunk_size: int | None = None,
    ):
        self.damp = check_damp(damp)
        self.block_size = check_int("block_size", block_size)
        self._columns = _columns_of(window, chunk_size, align=self.block_size)
        _check_aligned(self._columns.sizes, self.block_size)
        #: The lake window it was read from (:meth:`from_lake`), else None.
        self.window: Any = None
        self.n_grads = self._columns.m if n_grads is None else check_int("n_grads", n_grads)
        if isinstance(self._columns, _Columns):
            self._factors = [
                blocked_factors(chunk, self.block_size, self.damp, self.n_grads)
                for chunk in self._columns.chunks
            ]

    @classmethod
    def from_lake(
        cls,
        lake: Any,
        window_id: str,
        damp: float,
        block_size: int,
        *,
        n_grads: int | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> BlockedInverseFisher:
        """The blocked ``F⁻¹`` of a ``grad_window`` artifact (arguments as for
        :meth:`InverseFisher.from_lake`; with Dask the stored chunks are regrouped into
        block-aligned chunks of about the stored size unless ``chunk_size`` is given)."""
        from curvlake.pipelines.mfac.lake import window_operand

        block_size = check_int("block_size", block_size)
        operand, window = window_operand(lake, window_id, backend)
        if _is_dask(operand) and chunk_size is None:
            chunk_size = max(1, window.chunk_columns // block_size) * block_size
        operator = cls(operand, damp, block_size, n_grads=n_grads, chunk_size=chunk_size)
        operator.window = window
        return operator

    def _task_args(self) -> tuple[Any, ...]:
        return (self.block_size, None, self.damp, None, self.n_grads, None)

    def __matmul__(self, x: Any) -> Any:
        """``F_blocked⁻¹ x`` for a vector (d,) or matrix (d, r), float64."""
        _check_rhs(x, self.n_params)
        columns = self._columns
        if isinstance(columns, _DaskColumns):
            import dask.array as da

            x = columns._align(x)
            index = "jr"[: x.ndim]
            return da.blockwise(
                _blocked_apply_task, index, columns.window, "ij", x, index, *self._task_args(),
                concatenate=True, meta=_meta(columns.window, x.ndim),
            )  # fmt: skip
        pieces = zip(columns.chunks, columns.split(x), self._factors, strict=True)
        parts = [blocked_apply_partial(chunk, xc, factors) for chunk, xc, factors in pieces]
        return get_namespace(parts[0]).concatenate(parts)

    def diagonal(self) -> Any:
        """The diagonal of ``F_blocked⁻¹`` (d,), float64."""
        columns = self._columns
        if isinstance(columns, _DaskColumns):
            import dask.array as da

            return da.blockwise(
                _blocked_diagonal_task, "j", columns.window, "ij", *self._task_args(),
                concatenate=True, meta=_meta(columns.window, 1),
            )  # fmt: skip
        parts = [
            blocked_diagonal_partial(chunk, factors)
            for chunk, factors in zip(columns.chunks, self._factors, strict=True)
        ]
        return get_namespace(parts[0]).concatenate(parts)

    def entry(self, j: int, k: int) -> float:
        """``[F_blocked⁻¹]_jk`` (zero across blocks)."""
        return float(self.submatrix([j, k])[0, 1])

    def submatrix(self, indices: Any) -> np.ndarray:
        """``[F_blocked⁻¹]_{QQ}`` (q × q, float64 on the host): per block of ``Q``, the block's
        own Woodbury entries from its window columns; zero between blocks."""
        indices = check_indices(indices, self.n_params)
        out = np.zeros((indices.size, indices.size))
        block_of = indices // self.block_size
        for block in np.unique(block_of):
            here = np.flatnonzero(block_of == block)
            start = int(block) * self.block_size
            stop = min(start + self.block_size, self.n_params)
            gram = gram_partial(self._columns.columns(np.arange(start, stop)))
            factor = factor_window(gram, self.damp, self.n_grads)
            local = indices[here]
            identity = (local[:, None] == local[None, :]).astype(np.float64)
            sub = factor.entries_from_columns(self._columns.columns(local), identity)
            out[np.ix_(here, here)] = sub
        return out


# -- the seed's dynamic recursion (reference) --------------------------------------------------


def seed_recursion_ihvp(
    window: np.ndarray, x: np.ndarray, damp: float, *, n_grads: int | None = None
) -> np.ndarray:
    r"""``F⁻¹ x`` by the recursion of the seed's dynamic algorithm (reference, float64, O(m³)).

    Re-derived from the maths (research/mfac.md §1), not the seed's code. Adding the gradients
    one at a time by Sherman–Morrison, ``F_0 = λI``,
    ``F_i⁻¹ = F_{i-1}⁻¹ − v_i v_iᵀ / (n + g_iᵀ v_i)`` with ``v_i = F_{i-1}⁻¹ g_i``:

    1. ``D_ij = g_iᵀ F_{i-1}⁻¹ g_j`` (j >= i) from ``D⁰ = G Gᵀ / λ`` by the elimination
       ``D_ij ← D_ij − D_ki D_kj / (n + D_kk)``, k < i (LU of ``nI + GGᵀ/λ`` without pivoting);
       ``den_i = n + D_ii``.
    2. ``T_ik = −D_ki / den_k`` (k < i) and the coefficients ``B = λ⁻¹ (I − T)⁻¹`` by the row
       recursion ``B_i = λ⁻¹ e_i + Σ_{k<i} T_ik B_k``, so that ``v_i = Σ_j B_ij g_j``.
    3. ``q = (I − T)⁻¹ (G x / λ)`` by forward substitution (``q_i = v_iᵀ x``),
       ``c = Bᵀ (q / den)`` and ``F⁻¹ x = x / λ − Gᵀ c``.

    Args:
        window: G (m × d).
        x: (d,) or (d, r).
        damp: λ > 0.
        n_grads: n (default m).
    """
    damp = check_damp(damp)
    grads = np.asarray(window, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    m = grads.shape[0]
    n = m if n_grads is None else check_int("n_grads", n_grads)
    dots = grads @ grads.T / damp
    for k in range(m):
        row = dots[k, k + 1 :].copy()
        dots[k + 1 :, k + 1 :] -= np.outer(row, row) / (n + dots[k, k])
    denom = n + np.diag(dots)
    lower = -np.tril(dots.T, -1) / denom[None, :]
    coef = np.zeros((m, m))
    for i in range(m):
        coef[i] = lower[i, :i] @ coef[:i]
        coef[i, i] += 1.0 / damp
    q = grads @ x / damp
    for i in range(1, m):
        q[i] += lower[i, :i] @ q[:i]
    scaled = q / denom.reshape((m,) + (1,) * (q.ndim - 1))
    return x / damp - grads.T @ (coef.T @ scaled)
