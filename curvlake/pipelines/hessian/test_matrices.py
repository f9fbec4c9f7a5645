"""Counter-based random test matrices for sketching: Gaussian, Rademacher and SSRFT.

A test matrix ``Ω ∈ R^{D×s}`` (``D`` parameters, ``s`` columns) multiplies the Hessian from the
right, ``Y = A Ω``, and its transpose projects from the left, ``Ωᵀ X``. All randomness is
counter based (``numpy.random.default_rng(key)`` with a key of integers), so a matrix depends
only on ``(kind, seed, operator, shape)``: never on how it is cut into blocks, on the worker that
draws a block or on the order in which blocks are drawn.

**i.i.d. kinds** (``"gaussian"``: N(0, 1) entries; ``"rademacher"``: ±1 with probability 1/2).
Ω is laid on a fixed *generation grid* of cells of :data:`GENERATION_ROWS` rows by one column:
cell ``(b, j)`` holds rows ``[b·G, (b+1)·G)`` of column ``j`` and is the stream of::

    default_rng([seed, operator, kind_tag, j, b])

Any requested block ``Ω[r0:r1, c0:c1]`` is assembled from the cells it touches (each cell is
drawn up to the last row needed: NumPy fills an array sequentially, so a prefix of a stream is
the stream of the prefix). Hence a block equals the same slice of the full matrix, bit for bit,
whatever the cut. Columns are *nested*: column ``j`` does not depend on ``s``, so the ``(D, k)``
matrix is the first ``k`` columns of the ``(D, s)`` one with the same seed and operator (the
``recycled`` mode relies on this). Float32 blocks are the float64 draws rounded, so the two
precisions see the same matrix. Every key has five words: :class:`numpy.random.SeedSequence`
pads short entropy with zeros (``[1, 2]`` and ``[1, 2, 0]`` give the same stream), so keys of one
fixed length, with a kind tag that is never zero, cannot collide with each other nor with the
two-word ``[seed, block]`` keys used elsewhere in curvlake.

**SSRFT** (scrambled subsampled randomized Fourier transform, Tropp et al. 2019 §3.2; the
seed's sketching operator): the ``s × D`` operator::

    S = R · F · Π₂ · F · Π₁,        Ω = Sᵀ  (D × s)

where ``Πᵢ x = σᵢ ⊙ x[πᵢ]`` permutes with ``πᵢ`` and flips signs with a Rademacher vector
``σᵢ``, ``F`` is the orthonormal DCT-II (``scipy.fft.dct(norm="ortho")``, an orthogonal matrix)
and ``R`` keeps the entries ``ρ[0], ..., ρ[s-1]`` of a random permutation ``ρ`` of ``0..D-1``.
``S`` has orthonormal rows (``S Sᵀ = I_s``) and its rows are nested: the first ``s'`` rows of
the ``s``-row SSRFT are the ``s'``-row SSRFT, because ``R`` takes a prefix of one fixed
permutation. The five random objects ``π₁, σ₁, π₂, σ₂, ρ`` are drawn from
``default_rng([seed, operator, 3, stage, 0])``, ``stage = 0..4``. The SSRFT is a transform of
whole vectors (the DCT mixes all ``D`` entries), so it is applied to **whole columns**:
:func:`ssrft_forward` maps a ``(D, b)`` block of columns to ``S X`` (``(s, b)``, i.e. ``Ωᵀ X``,
as the seed applies it to each HVP) and :func:`ssrft_adjoint` maps ``(s, b)`` to ``Sᵀ Y``
(``(D, b)``, i.e. ``Ω Y``); the column block, not the row block, is the unit of work. A column
``ω_j = Sᵀ e_j`` of Ω costs one adjoint transform, ``O(D log D)``.

The DCT runs on NumPy (``scipy.fft``) or CuPy (``cupyx.scipy.fft``) arrays; the permutations
and signs are drawn on the host, so both devices see the same operator.

References:
    J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Streaming low-rank matrix approximation
    with an application to scientific simulation", SIAM J. Sci. Comput. 41(4), 2019
    (arXiv 1902.08651), §3.2.
    A. Fernandez, F. Schneider, M. Mahsereci, P. Hennig, "Connecting Parameter Magnitudes and
    Hessian Eigenspaces at Scale using Sketched Methods", TMLR 2025 (arXiv 2504.14701).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from curvlake._array import get_namespace
from curvlake.errors import UserInputError

__all__ = [
    "GENERATION_ROWS",
    "KINDS",
    "OPERATOR_IDS",
    "RandomTestMatrix",
    "generation_cell",
    "iid_block",
    "operator_id",
    "ssrft_adjoint",
    "ssrft_columns",
    "ssrft_forward",
]

KINDS: tuple[str, ...] = ("gaussian", "rademacher", "ssrft")

#: Rows of one generation cell of the i.i.d. kinds. Fixed: changing it changes every matrix.
GENERATION_ROWS = 2**16

#: Operator indices of the sketches of one decomposition (any other non-negative int is allowed).
OPERATOR_IDS: dict[str, int] = {"outer": 0, "inner_right": 1, "inner_left": 2, "probe": 3}

_KIND_TAGS = {"gaussian": 1, "rademacher": 2, "ssrft": 3}
_SSRFT_STAGES = 5


def operator_id(operator: int | str) -> int:
    """Return the integer index of an operator given by index or by name.

    Args:
        operator: a non-negative int, or one of the names of :data:`OPERATOR_IDS`.

    Raises:
        UserInputError: for a negative index or an unknown name.
    """
    if isinstance(operator, str):
        if operator not in OPERATOR_IDS:
            raise UserInputError(
                f"unknown test-matrix operator {operator!r}: use one of "
                f"{sorted(OPERATOR_IDS)} or a non-negative integer"
            )
        return OPERATOR_IDS[operator]
    if isinstance(operator, bool) or not isinstance(operator, int | np.integer) or operator < 0:
        raise UserInputError(f"test-matrix operator must be a non-negative int, got {operator!r}")
    return int(operator)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UserInputError(f"test-matrix seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UserInputError(f"unknown test-matrix kind {kind!r}: use one of {list(KINDS)}")
    return kind


# ---------------------------------------------------------------------------------------------
# i.i.d. kinds: the generation grid
# ---------------------------------------------------------------------------------------------


def generation_cell(
    kind: str, seed: int, operator: int | str, column: int, row_block: int, stop: int | None = None
) -> np.ndarray:
    """Draw one cell of the generation grid: rows ``[b·G, b·G + stop)`` of column ``j``.

    Args:
        kind: ``"gaussian"`` or ``"rademacher"``.
        seed: the seed of the decomposition.
        operator: which test matrix of the decomposition (see :func:`operator_id`).
        column: the column ``j``.
        row_block: the generation row block ``b`` (rows ``b·G .. (b+1)·G - 1``).
        stop: how many leading rows of the cell to draw (default: all ``G`` rows).

    Returns:
        float64 ``(stop,)``: the first ``stop`` entries of the cell's stream.
    """
    if kind not in ("gaussian", "rademacher"):
        raise UserInputError(
            f"generation cells exist for 'gaussian' and 'rademacher', not {kind!r}"
        )
    n = GENERATION_ROWS if stop is None else int(stop)
    if not 0 <= n <= GENERATION_ROWS:
        raise ValueError(f"stop must be in [0, {GENERATION_ROWS}], got {stop}")
    key = [_check_seed(seed), operator_id(operator), _KIND_TAGS[kind], int(column), int(row_block)]
    rng = np.random.default_rng(key)
    if kind == "gaussian":
        return rng.standard_normal(n)
    return rng.integers(0, 2, size=n, dtype=np.int8).astype(np.float64) * 2.0 - 1.0


def iid_block(
    kind: str,
    seed: int,
    operator: int | str,
    rows: tuple[int, int],
    cols: tuple[int, int],
    dtype: Any = np.float64,
) -> np.ndarray:
    """Return ``Ω[r0:r1, c0:c1]`` of a Gaussian or Rademacher test matrix.

    The block is assembled from the generation cells it overlaps, so it equals the same slice
    of the full matrix for any ``(rows, cols)`` (the matrix has no fixed shape: any number of
    rows and columns can be asked for).

    Args:
        kind: ``"gaussian"`` or ``"rademacher"``.
        seed: the seed of the decomposition.
        operator: which test matrix (see :func:`operator_id`).
        rows: ``(r0, r1)``, half open.
        cols: ``(c0, c1)``, half open.
        dtype: output dtype (the float64 draws, cast).

    Returns:
        ``(r1 - r0, c1 - c0)`` array on the host.
    """
    (r0, r1), (c0, c1) = (int(rows[0]), int(rows[1])), (int(cols[0]), int(cols[1]))
    if r0 < 0 or r1 < r0 or c0 < 0 or c1 < c0:
        raise ValueError(f"invalid block rows={rows}, cols={cols}")
    out = np.empty((r1 - r0, c1 - c0), dtype=dtype)
    if r1 == r0 or c1 == c0:
        return out
    g = GENERATION_ROWS
    for b in range(r0 // g, (r1 - 1) // g + 1):
        lo, hi = max(r0, b * g), min(r1, (b + 1) * g)
        for j in range(c0, c1):
            cell = generation_cell(kind, seed, operator, j, b, stop=hi - b * g)
            out[lo - r0 : hi - r0, j - c0] = cell[lo - b * g :]
    return out


# ---------------------------------------------------------------------------------------------
# SSRFT
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=3)
def _ssrft_plan(seed: int, operator: int, dim: int) -> tuple[np.ndarray, ...]:
    """``(π₁, σ₁, π₂, σ₂, ρ)`` of one SSRFT; read-only, cached (about ``14·D`` bytes)."""
    index = np.int32 if dim < 2**31 else np.int64
    plan = []
    for stage in range(_SSRFT_STAGES):
        rng = np.random.default_rng([seed, operator, _KIND_TAGS["ssrft"], stage, 0])
        if stage in (1, 3):
            arr = rng.integers(0, 2, size=dim, dtype=np.int8) * np.int8(2) - np.int8(1)
        else:
            arr = rng.permutation(dim).astype(index)
        arr.setflags(write=False)
        plan.append(arr)
    return tuple(plan)


def _fft_module(xp: ModuleType) -> ModuleType:
    if xp is np:
        import scipy.fft

        return scipy.fft
    import cupyx.scipy.fft  # only reached with CuPy input

    return cupyx.scipy.fft


def _plan_on(xp: ModuleType, seed: int, operator: int | str, dim: int) -> list[Any]:
    plan = _ssrft_plan(_check_seed(seed), operator_id(operator), int(dim))
    return [xp.asarray(a) for a in plan]


def _sign_shape(x: Any) -> tuple[int, ...]:
    return (-1,) + (1,) * (x.ndim - 1)


def ssrft_forward(x: Any, seed: int, operator: int | str, n_out: int) -> Any:
    """Apply the ``n_out × D`` SSRFT to whole columns: ``S x`` (``= Ωᵀ x`` with ``Ω = Sᵀ``).

    Args:
        x: ``(D,)`` or ``(D, b)`` NumPy or CuPy array (float32 or float64); the transform acts
            along axis 0, column by column.
        seed: the seed of the decomposition.
        operator: which test matrix (see :func:`operator_id`).
        n_out: number of output rows ``s <= D``.

    Returns:
        ``(n_out,)`` or ``(n_out, b)`` array of ``x``'s module and dtype.
    """
    xp = get_namespace(x)
    dim = x.shape[0]
    if not 1 <= n_out <= dim:
        raise UserInputError(f"SSRFT output size must be in [1, D={dim}], got {n_out}")
    fft = _fft_module(xp)
    pi1, sigma1, pi2, sigma2, rho = _plan_on(xp, seed, operator, dim)
    shape = _sign_shape(x)
    y = x[pi1] * sigma1.reshape(shape).astype(x.dtype)
    y = fft.dct(y, type=2, norm="ortho", axis=0)
    y = y[pi2] * sigma2.reshape(shape).astype(x.dtype)
    y = fft.dct(y, type=2, norm="ortho", axis=0)
    return y[rho[:n_out]]


def ssrft_adjoint(y: Any, seed: int, operator: int | str, dim: int) -> Any:
    """Apply the adjoint (transpose) of the ``s × D`` SSRFT: ``Sᵀ y`` (``= Ω y``).

    Each step of :func:`ssrft_forward` is inverted in reverse order: the row selection becomes a
    zero embedding, the DCT-II its inverse (the orthonormal DCT-III), a signed permutation its
    inverse. Because ``S Sᵀ = I``, ``ssrft_forward(ssrft_adjoint(y)) == y`` up to rounding.

    Args:
        y: ``(s,)`` or ``(s, b)`` NumPy or CuPy array, ``s <= dim``.
        seed: the seed of the decomposition.
        operator: which test matrix (see :func:`operator_id`).
        dim: ``D``, the length of the output columns.

    Returns:
        ``(D,)`` or ``(D, b)`` array of ``y``'s module and dtype.
    """
    xp = get_namespace(y)
    n_out = y.shape[0]
    if not 1 <= n_out <= dim:
        raise UserInputError(f"SSRFT input size must be in [1, D={dim}], got {n_out}")
    fft = _fft_module(xp)
    pi1, sigma1, pi2, sigma2, rho = _plan_on(xp, seed, operator, dim)
    shape = _sign_shape(y)
    z = xp.zeros((dim, *y.shape[1:]), dtype=y.dtype)
    z[rho[:n_out]] = y
    z = fft.idct(z, type=2, norm="ortho", axis=0) * sigma2.reshape(shape).astype(y.dtype)
    w = xp.empty_like(z)
    w[pi2] = z
    w = fft.idct(w, type=2, norm="ortho", axis=0) * sigma1.reshape(shape).astype(y.dtype)
    out = xp.empty_like(w)
    out[pi1] = w
    return out


def ssrft_columns(
    seed: int,
    operator: int | str,
    dim: int,
    cols: tuple[int, int],
    dtype: Any = np.float64,
    xp: ModuleType = np,
) -> Any:
    """Return the columns ``Ω[:, c0:c1] = Sᵀ[:, c0:c1]`` (adjoint transforms of one-hots).

    Column ``j`` does not depend on the number of rows of ``S`` (nested rows), so no ``s`` is
    needed. Cost ``O((c1 - c0) · D log D)``.
    """
    c0, c1 = int(cols[0]), int(cols[1])
    if not 0 <= c0 <= c1 <= dim:
        raise ValueError(f"SSRFT columns must satisfy 0 <= c0 <= c1 <= D={dim}, got {cols}")
    if c1 == c0:
        return xp.zeros((dim, 0), dtype=dtype)
    # one-hots of the first c1 rows: rows are nested, so this is column j of any s >= c1
    onehots = xp.zeros((c1, c1 - c0), dtype=dtype)
    onehots[xp.arange(c0, c1), xp.arange(c1 - c0)] = 1
    return ssrft_adjoint(onehots, seed, operator, dim)


# ---------------------------------------------------------------------------------------------
# One picklable spec for all kinds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomTestMatrix:
    """A ``D × s`` test matrix Ω given by its kind, seed, operator and shape (small, picklable).

    Attributes:
        kind: ``"gaussian"``, ``"rademacher"`` or ``"ssrft"``.
        seed: the seed of the decomposition (non-negative int).
        operator: which test matrix of the decomposition (index or name, see
            :data:`OPERATOR_IDS`).
        shape: ``(D, s)``; for the SSRFT ``s <= D``.

    Example:
        >>> om = RandomTestMatrix("gaussian", 0, "outer", (300, 8))
        >>> bool(np.array_equal(om.block((100, 250), (2, 5)), om.to_dense()[100:250, 2:5]))
        True
    """

    kind: str
    seed: int
    operator: int | str
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        _check_seed(self.seed)
        operator_id(self.operator)
        dim, cols = (int(n) for n in self.shape)
        if dim < 1 or cols < 1:
            raise UserInputError(f"test-matrix shape must be positive, got {self.shape}")
        if self.kind == "ssrft" and cols > dim:
            raise UserInputError(f"an SSRFT test matrix needs s <= D, got shape {self.shape}")
        object.__setattr__(self, "shape", (dim, cols))

    def block(
        self,
        rows: tuple[int, int],
        cols: tuple[int, int],
        dtype: Any = np.float64,
        xp: ModuleType = np,
    ) -> Any:
        """Return ``Ω[r0:r1, c0:c1]`` (SSRFT: computed from whole columns, then sliced)."""
        dim, n_cols = self.shape
        (r0, r1), (c0, c1) = rows, cols
        if not (0 <= r0 <= r1 <= dim and 0 <= c0 <= c1 <= n_cols):
            raise ValueError(f"block rows={rows}, cols={cols} outside shape {self.shape}")
        if self.kind == "ssrft":
            return ssrft_columns(self.seed, self.operator, dim, (c0, c1), dtype, xp)[r0:r1]
        return xp.asarray(iid_block(self.kind, self.seed, self.operator, rows, cols, dtype))

    def columns(self, start: int, stop: int, dtype: Any = np.float64, xp: ModuleType = np) -> Any:
        """Return the whole columns ``Ω[:, start:stop]`` (the vectors to multiply A with)."""
        return self.block((0, self.shape[0]), (start, stop), dtype, xp)

    def to_dense(self, dtype: Any = np.float64, xp: ModuleType = np) -> Any:
        """Return the full ``D × s`` matrix (tests and small problems)."""
        return self.columns(0, self.shape[1], dtype, xp)

    def transpose_matmul(self, x: Any, row_start: int = 0) -> Any:
        """Return ``Ω[row_start : row_start + n, :]ᵀ x`` in float64 for a row block ``x``.

        For the i.i.d. kinds this is the per-row-block partial of ``Ωᵀ X``: summing it over the
        row blocks of ``X`` gives ``Ωᵀ X``. The SSRFT needs whole columns (``row_start = 0`` and
        all ``D`` rows). Computed in float64 (the projections feed the small float64 solves),
        on ``x``'s device.
        """
        dim, n_cols = self.shape
        n = x.shape[0]
        xp = get_namespace(x)
        x64 = xp.asarray(x, dtype=xp.float64)
        if self.kind == "ssrft":
            if row_start != 0 or n != dim:
                raise ValueError("the SSRFT acts on whole columns: pass all D rows")
            return ssrft_forward(x64, self.seed, self.operator, n_cols)
        return self.block((row_start, row_start + n), (0, n_cols), xp.float64, xp).T @ x64

    def matmul(self, y: Any) -> Any:
        """Return ``Ω y`` (``(D, b)``) for ``y`` of shape ``(s, b)`` or ``(s,)``.

        The i.i.d. kinds are drawn one generation row block at a time, so memory stays at
        ``G × s`` entries whatever ``D``.
        """
        dim, n_cols = self.shape
        if y.shape[0] != n_cols:
            raise ValueError(f"expected {n_cols} rows, got {y.shape[0]}")
        if self.kind == "ssrft":
            return ssrft_adjoint(y, self.seed, self.operator, dim)
        xp = get_namespace(y)
        out = xp.empty((dim, *y.shape[1:]), dtype=y.dtype)
        for r0 in range(0, dim, GENERATION_ROWS):
            r1 = min(dim, r0 + GENERATION_ROWS)
            out[r0:r1] = self.block((r0, r1), (0, n_cols), y.dtype, xp) @ y
        return out
