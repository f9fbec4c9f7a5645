"""Overlap of parameter masks with Hessian eigenspaces, and Grassmannian metrics.

``U ∈ R^{D×k}`` has orthonormal columns (the sketched eigenvectors, ordered by ``|λ|``
descending) and a mask is a set of coordinates ``M ⊂ {0..D-1}`` of size ``m``, given as sorted
indices. The mask spans the coordinate subspace ``span{e_i : i ∈ M}`` with orthonormal basis
``E_M`` (``D × m``, one 1 per column), and ``E_Mᵀ U = U[M, :]``.

**Overlap** (Fernandez et al. 2025, §3): for ``k' = 1..k``::

    overlap(k') = ‖U[M, :k']‖²_F / k' = (1/k') Σ_{i∈M} Σ_{j<=k'} U_ij²  ∈ [0, 1]

(for ``m = k'`` it is the mean squared cosine of the principal angles between ``span E_M`` and
``span U[:, :k']``, ``= 1 − d²_proj / k'``). All ``k`` values come from one pass: the per-column
energies ``e_j = Σ_{i∈M} U_ij²`` are sums over row blocks (:func:`mask_energy_partial`), and
``overlap(k') = cumsum(e)[k'-1] / k'`` (:func:`overlap_curve`). The seed's curve uses a
*nested* mask instead, the top-``k'`` parameters by ``|θ|`` for each ``k'``
(:func:`ranked_mask_energy_partial`, :func:`nested_overlap_curve`), also in one pass.

**Random baseline**: for a uniformly random mask of size ``m`` (or a Haar-random ``U``),
``E[overlap(k')] = m / D`` for every ``k'`` (``k'/D`` for the nested curve), since each
coordinate is in the mask with probability ``m/D`` and the columns have unit norm.

**IoU** of two masks: ``|M₁ ∩ M₂| / |M₁ ∪ M₂|``; for equal sizes ``m`` it equals ``ov/(2 − ov)``
with ``ov = |M₁ ∩ M₂| / m`` the overlap of the two coordinate subspaces.

**Principal angles** ``0 <= θ_1 <= ... <= θ_p <= π/2`` between ``span U₁`` and ``span U₂``
(``p = min(k₁, k₂)``): ``cos θ_i`` are the singular values of ``U₁ᵀ U₂``, a sum over row blocks
(:func:`cross_gram_partial`); for a mask, ``cos² θ_i`` are the eigenvalues of
``U[M, :]ᵀ U[M, :]`` (:func:`mask_gram_partial`). The Grassmannian metrics
(:func:`grassmann_metrics`, as in the seed's ``00a_grassmannian_metrics`` notebook):

* geodesic ``‖θ‖₂``;
* chordal ``‖2 sin(θ/2)‖₂`` (and its max, the ∞-norm);
* projection ``‖sin θ‖₂ = ‖P₁ − P₂‖_F / √2`` for equal dimensions (and ``max sin θ =
  ‖P₁ − P₂‖₂``);
* Fubini–Study ``arccos(∏ cos θ_i)``.

Angles from cosines are accurate to about ``√eps ≈ 1e-8`` near 0 (the price of a one-pass
Gram); :func:`principal_angles` (SciPy's sine-based algorithm, whole arrays) is accurate there.

References:
    A. Fernandez, F. Schneider, M. Mahsereci, P. Hennig, "Connecting Parameter Magnitudes and
    Hessian Eigenspaces at Scale using Sketched Methods", TMLR 2025 (arXiv 2504.14701).
    J.-M. Ye, L.-H. Lim, "Schubert varieties and distances between subspaces of different
    dimensions", SIAM J. Matrix Anal. Appl. 37(3), 2016 (the metrics from principal angles).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import scipy.linalg

from curvlake._array import get_namespace, to_numpy
from curvlake.errors import UserInputError

__all__ = [
    "GrassmannMetrics",
    "check_mask",
    "cross_gram_partial",
    "grassmann_metrics",
    "iou_from_overlap",
    "mask_energy_partial",
    "mask_gram_partial",
    "mask_iou",
    "mask_overlap",
    "nested_overlap_curve",
    "overlap_curve",
    "principal_angles",
    "principal_angles_from_gram",
    "principal_angles_from_mask_gram",
    "random_overlap_baseline",
    "ranked_mask_energy_partial",
]


def check_mask(mask: Any, dim: int, *, ranked: bool = False) -> np.ndarray:
    """Validate mask coordinates; return them as int64.

    Args:
        mask: coordinates in ``[0, D)``, without repeats; sorted ascending unless ``ranked``
            (then in rank order, e.g. by ``|θ|`` descending).
        dim: ``D``.
        ranked: accept any order.

    Raises:
        UserInputError: for coordinates out of range, repeated or (unless ranked) unsorted.
    """
    m = np.asarray(to_numpy(mask))
    if m.ndim != 1 or (m.size and not np.issubdtype(m.dtype, np.integer)):
        raise UserInputError(
            f"a mask must be a 1-d array of int coordinates, got {m.dtype} {m.shape}"
        )
    m = m.astype(np.int64)
    if m.size and (m.min() < 0 or m.max() >= dim):
        raise UserInputError(f"mask coordinates must be in [0, {dim}), got [{m.min()}, {m.max()}]")
    if np.unique(m).size != m.size:
        raise UserInputError("mask coordinates must not repeat")
    if not ranked and np.any(np.diff(m) <= 0):
        raise UserInputError("mask coordinates must be sorted ascending")
    return m


def _rows_in_block(xp: Any, mask: Any, row_start: int, n_rows: int) -> Any:
    """Local row indices of the (sorted) mask coordinates inside ``[row_start, row_start+n)``."""
    m = xp.asarray(mask)
    lo, hi = (int(i) for i in np.searchsorted(to_numpy(mask), [row_start, row_start + n_rows]))
    return m[lo:hi] - row_start


def mask_energy_partial(u_block: Any, mask: Any, row_start: int = 0) -> Any:
    """Row-block partial of the column energies ``e_j = Σ_{i∈M} U_ij²`` (float64, ``(k,)``).

    Args:
        u_block: rows ``[row_start, row_start + n)`` of ``U`` (NumPy or CuPy).
        mask: all sorted mask coordinates (host array); those outside the block are ignored.
        row_start: global index of the block's first row.
    """
    xp = get_namespace(u_block)
    rows = _rows_in_block(xp, mask, row_start, u_block.shape[0])
    sub = xp.asarray(u_block[rows], dtype=xp.float64)
    return (sub**2).sum(axis=0)


def overlap_curve(energy: Any) -> np.ndarray:
    """``overlap(k') = (e_1 + ... + e_k') / k'`` for ``k' = 1..k`` from the summed energies."""
    e = np.asarray(to_numpy(energy), dtype=np.float64)
    return np.cumsum(e) / np.arange(1, e.size + 1)


def mask_overlap(u: Any, mask: Any) -> np.ndarray:
    """The overlap curve ``overlap(k')``, ``k' = 1..k``, of a sorted mask with ``U`` (in memory)."""
    return overlap_curve(mask_energy_partial(u, check_mask(mask, u.shape[0]), 0))


def ranked_mask_energy_partial(u_block: Any, ranked_mask: Any, row_start: int = 0) -> Any:
    """Row-block partial of ``E[r, j] = U[c_r, j]²`` for ranked coordinates ``c_0, c_1, ...``.

    Args:
        u_block: rows ``[row_start, row_start + n)`` of ``U``.
        ranked_mask: coordinates in rank order (e.g. by ``|θ|`` descending), ``(m,)``.
        row_start: global index of the block's first row.

    Returns:
        float64 ``(m, k)``: row ``r`` holds ``U[c_r, :]²`` if ``c_r`` lies in the block, else 0;
        the sum over row blocks is ``E`` (on ``u_block``'s device).
    """
    xp = get_namespace(u_block)
    coords = np.asarray(to_numpy(ranked_mask), dtype=np.int64)
    inside = np.flatnonzero((coords >= row_start) & (coords < row_start + u_block.shape[0]))
    out = xp.zeros((coords.size, u_block.shape[1]), dtype=xp.float64)
    if inside.size:
        local = xp.asarray(coords[inside] - row_start)
        out[xp.asarray(inside)] = xp.asarray(u_block[local], dtype=xp.float64) ** 2
    return out


def nested_overlap_curve(energy: Any) -> np.ndarray:
    """The seed's curve ``‖U[M_k', :k']‖²_F / k'`` with ``M_k'`` the top-``k'`` ranked coordinates.

    Args:
        energy: the summed ``E`` of :func:`ranked_mask_energy_partial` (``m × k``).

    Returns:
        float64 ``(min(m, k),)``: ``Σ_{r<k', j<k'} E[r, j] / k'``.
    """
    e = np.asarray(to_numpy(energy), dtype=np.float64)
    n = min(e.shape)
    square = np.cumsum(np.cumsum(e[:n, :n], axis=0), axis=1)
    return np.diagonal(square) / np.arange(1, n + 1)


def random_overlap_baseline(mask_size: int, dim: int) -> float:
    """Expected overlap of a uniformly random mask of size ``m``: ``m / D`` (any ``k'``)."""
    if not 0 <= mask_size <= dim or dim < 1:
        raise UserInputError(f"need 0 <= mask_size <= D and D >= 1, got m={mask_size}, D={dim}")
    return mask_size / dim


def mask_iou(mask1: Any, mask2: Any) -> float:
    """Intersection over union ``|M₁ ∩ M₂| / |M₁ ∪ M₂|`` of two masks (1 if both are empty)."""
    a = np.unique(np.asarray(to_numpy(mask1), dtype=np.int64))
    b = np.unique(np.asarray(to_numpy(mask2), dtype=np.int64))
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return 1.0 if union == 0 else inter / union


def iou_from_overlap(overlap: Any) -> Any:
    """``ov / (2 − ov)``: the IoU of two masks of equal size whose overlap is ``ov``."""
    ov = np.asarray(overlap, dtype=np.float64)
    return ov / (2.0 - ov)


def cross_gram_partial(u1_block: Any, u2_block: Any) -> Any:
    """Row-block partial of ``U₁ᵀ U₂`` (float64, ``k₁ × k₂``): same rows of both bases."""
    xp = get_namespace(u1_block, u2_block)
    return xp.asarray(u1_block, dtype=xp.float64).T @ xp.asarray(u2_block, dtype=xp.float64)


def mask_gram_partial(u_block: Any, mask: Any, row_start: int = 0) -> Any:
    """Row-block partial of ``U[M, :]ᵀ U[M, :]`` (float64, ``k × k``) for a sorted mask."""
    xp = get_namespace(u_block)
    rows = _rows_in_block(xp, mask, row_start, u_block.shape[0])
    sub = xp.asarray(u_block[rows], dtype=xp.float64)
    return sub.T @ sub


def _angles_from_cosines(cos: np.ndarray) -> np.ndarray:
    return np.sort(np.arccos(np.clip(cos, 0.0, 1.0)))


def principal_angles_from_gram(gram: Any) -> np.ndarray:
    """Principal angles (ascending) from the summed ``U₁ᵀ U₂`` of two orthonormal bases."""
    g = np.asarray(to_numpy(gram), dtype=np.float64)
    return _angles_from_cosines(scipy.linalg.svd(g, compute_uv=False))


def principal_angles_from_mask_gram(gram: Any, mask_size: int) -> np.ndarray:
    """Principal angles (ascending) between ``span E_M`` and ``span U`` from ``U[M,:]ᵀ U[M,:]``.

    ``cos² θ`` are the ``p = min(m, k)`` largest eigenvalues of the ``k × k`` Gram.
    """
    g = np.asarray(to_numpy(gram), dtype=np.float64)
    p = min(int(mask_size), g.shape[0])
    cos2 = scipy.linalg.eigvalsh(0.5 * (g + g.T))[::-1][:p]
    return _angles_from_cosines(np.sqrt(np.clip(cos2, 0.0, 1.0)))


def principal_angles(u1: Any, u2: Any) -> np.ndarray:
    """Principal angles (ascending) between the column spans of two whole matrices.

    ``scipy.linalg.subspace_angles`` (accurate also for tiny angles); the bases need not be
    orthonormal.
    """
    a = np.asarray(to_numpy(u1), dtype=np.float64)
    b = np.asarray(to_numpy(u2), dtype=np.float64)
    return np.sort(scipy.linalg.subspace_angles(a, b))


class GrassmannMetrics(NamedTuple):
    """Distances between two subspaces from their principal angles ``θ`` (radians).

    Attributes:
        geodesic: ``‖θ‖₂``.
        chordal: ``‖2 sin(θ/2)‖₂``.
        chordal_max: ``max 2 sin(θ/2)``.
        projection: ``‖sin θ‖₂``.
        projection_max: ``max sin θ``.
        fubini_study: ``arccos ∏ cos θ``.
        mean_cos2: ``mean cos² θ`` (the overlap when both dimensions are equal).
    """

    geodesic: float
    chordal: float
    chordal_max: float
    projection: float
    projection_max: float
    fubini_study: float
    mean_cos2: float


def grassmann_metrics(angles: Any) -> GrassmannMetrics:
    """Geodesic, chordal, projection and Fubini–Study distances from principal angles."""
    theta = np.asarray(to_numpy(angles), dtype=np.float64)
    if theta.ndim != 1 or theta.size < 1:
        raise ValueError(f"expected a non-empty vector of angles, got shape {theta.shape}")
    if np.any(theta < 0) or np.any(theta > np.pi / 2 + 1e-12):
        raise ValueError("principal angles must lie in [0, π/2]")
    chord = 2.0 * np.sin(theta / 2.0)
    sine = np.sin(theta)
    cos = np.cos(theta)
    return GrassmannMetrics(
        geodesic=float(np.linalg.norm(theta)),
        chordal=float(np.linalg.norm(chord)),
        chordal_max=float(chord.max()),
        projection=float(np.linalg.norm(sine)),
        projection_max=float(sine.max()),
        fubini_study=float(np.arccos(np.clip(np.prod(cos), -1.0, 1.0))),
        mean_cos2=float(np.mean(cos**2)),
    )
