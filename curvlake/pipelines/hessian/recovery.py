"""Recovery of the top eigenpairs of a symmetric matrix from its sketches (SkEIGH and variants).

``A`` is a symmetric ``D × D`` matrix seen only through products ``A X`` (Hessian-vector
products, HVPs: one *data pass* multiplies any number of columns at once). Every mode sketches
``Y = A Ω`` with a ``D × k`` test matrix (:mod:`~curvlake.pipelines.hessian.test_matrices`),
orthonormalizes ``Y = Q R`` and reduces ``A`` to a small ``k × k`` *core* ``C`` with
``A ≈ Q C Qᵀ``. The core is solved in float64, symmetrized (``(C + Cᵀ)/2``: projecting onto the
symmetric matrices is a Frobenius contraction and ``A`` is symmetric, so this never increases the
error) and diagonalized, ``C = W Λ Wᵀ``, with eigenpairs ordered by ``|λ|`` descending (Hessians
are indefinite). The eigenvectors are ``U = Q W``.

The modes (Ω, Ψ, Φ independent test matrices unless said otherwise; ``†`` the pseudo-inverse,
computed by least squares with relative cutoff ``rcond`` as skerch does):

* ``"hmt"`` (Halko, Martinsson & Tropp 2011, Alg. 4.1 / 4.4 and §5.3): ``Q = orth(A Ω)``, then a
  second pass ``C = Qᵀ (A Q)``. With ``power_iters = q`` the basis is refined by randomized
  subspace iteration (Alg. 4.4): ``q`` times ``Q ← orth(A orth(Aᵀ Q))``; for symmetric ``A``
  one iteration is two applications of ``A`` (``2k`` HVPs, two passes) and the basis spans
  ``A^{2q+1} Ω``, the exponent of the paper's bounds.
* ``"krylov"`` (randomized block Krylov; Musco & Musco 2015, block Lanczos with full
  reorthogonalization after Golub & Underwood 1977): the basis is the whole block Krylov space
  ``span{A Ω, A² Ω, …, A^{q+1} Ω}`` instead of its last block. ``Q_0 = orth(A Ω)``; then
  ``Q_j`` = the last ``k`` columns of the thin QR of ``[Q_0 … Q_{j-1} | A Q_{j-1}]``
  (:func:`extend_krylov_basis`: Householder QR keeps each new block orthogonal to the earlier
  ones to rounding, with no separate Gram-Schmidt pass); every ``A Q_j`` is kept, so the core
  is the Rayleigh-Ritz matrix ``C = Bᵀ (A B)`` of ``B = [Q_0 … Q_q]`` (``(q+1)k`` square, no
  extra pass) and the ``k`` Ritz pairs of largest ``|λ|`` are returned (up to ``(q + 1) k``
  with ``n_eigs``: a narrow block with a deep recursion is block Lanczos, and the block need
  not be as wide as the number of eigenpairs wanted). ``(q + 2) k`` HVPs in ``q + 2`` passes;
  the Ritz values converge like Chebyshev polynomials of degree ``q + 1`` in the spectral gap,
  against ``2q + 1`` powers for HMT's ``(2 + 2q) k`` HVPs, so the same accuracy costs far fewer
  HVPs (benchmarks/RESULTS.md: 160 HVPs where HMT needs 320-480 for the top 20 to 1e-6, and
  100-128 with blocks of 10-16 keeping 20 Ritz pairs).
* ``"oversampled"`` (skerch 1.x ``oversampled_h``; Boutsidis, Woodruff & Zhong 2016; Tropp et
  al. 2019 §4): one pass measures ``Y = A Ω`` (``k``) and ``A Ψ`` (``s``), ``Z = Φᵀ A Ψ``
  (``s × s``); ``C = (Φᵀ Q)† Z ((Ψᵀ Q)†)ᵀ``.
* ``"recycled"`` (the seed, Fernandez et al. 2025, SkEIGH): as ``oversampled`` but the outer
  test matrix is the first ``k`` columns of Ψ, so ``Y = (A Ψ)[:, :k]`` costs nothing extra: ``s``
  HVPs in all. This saves ``k`` HVPs but breaks the independence of Ω and Ψ that the error
  bounds of Tropp et al. assume.
* ``"nystrom"`` (Nyström; the stabilized shift of Tropp, Yurtsever, Udell & Cevher 2017,
  "Fixed-rank approximation of a positive-semidefinite matrix from streaming data", Alg. 3):
  ``A ≈ Y (Ωᵀ Y)† Yᵀ``. With ``Y = Q R``: ``C = R (Ωᵀ Y)† Rᵀ``. The shift ``ν`` (tiny,
  :func:`nystrom_shift`) sketches ``A + νI`` instead, ``Y_ν = Y + ν Ω``, and subtracts ``ν`` from
  the eigenvalues. Nyström is a method for **positive semidefinite** ``A``: with ``psd=True``
  the core is formed through a Cholesky factor of ``Ωᵀ Y_ν`` and the eigenvalues are clipped at 0
  (Tropp et al.'s algorithm; it raises :class:`numpy.linalg.LinAlgError` when ``Ωᵀ Y_ν`` is not
  positive definite, i.e. ``A`` is indefinite). With ``psd=False`` (the default, and skerch's
  ``nystrom_h``) it is the generalized Nyström approximation (Nakatsukasa 2020) through a
  symmetric pseudo-inverse: still exact when ``rank(A) <= k`` and sign preserving for an
  indefinite ``A``, but ``Ωᵀ A Ω`` is then indefinite and may be near singular, so there is no
  error guarantee and the result depends on ``rcond``.
* ``"singlepass"`` (Tropp, Yurtsever, Udell & Cevher 2017, "Practical sketching algorithms for
  low-rank matrix approximation", §4-5; skerch ``singlepass_h``): from ``Y`` alone,
  ``Y = A Ω ≈ Q (Qᵀ A Q) Qᵀ Ω`` gives ``C = Qᵀ Y (Qᵀ Ω)† = R (Qᵀ Ω)†``. When ``Ωᵀ Q`` is
  invertible this is the transpose of the unshifted Nyström core,
  ``R (Ωᵀ Q R)⁻¹ Rᵀ = (Ωᵀ Q)⁻¹ Rᵀ``, so after symmetrization the two modes give the same
  eigenpairs (skerch's differ only because LAPACK reads one triangle of the raw core).

The work is factored so that the big steps run elsewhere (on Dask): the thin QR of the
``(D, k)`` sketch (:func:`orthonormalize`, or ``dask.array.linalg.tsqr``), the projections
``Lᵀ X`` of tall matrices (:func:`project`: a per-row-block partial, summed over row blocks;
for an SSRFT use :func:`~curvlake.pipelines.hessian.test_matrices.ssrft_forward` on whole
columns), and the core (:func:`core_from_projections`, small and in memory).
:func:`sketched_eigh` runs a whole mode in memory (the reference the Dask pipeline must match).

A-posteriori error (Tropp et al. 2019, §6): ``q`` Gaussian probes ``ω_i`` independent of the
sketch estimate ``‖A − Â‖²_F ≈ (1/q) Σ_i ‖(A − Â) ω_i‖²`` (:func:`probe_coefficients`,
:func:`probe_residual_partials`, :func:`finalize_error_estimate`), with the tail bounds of
:func:`error_tail_bounds` and the scree bounds of :func:`scree_bounds`.

References:
    C. Boutsidis, D. Woodruff, P. Zhong, "Optimal principal component analysis in distributed
    and streaming models", STOC 2016 (arXiv 1504.06729).
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness: probabilistic
    algorithms for constructing approximate matrix decompositions", SIAM Rev. 53(2), 2011.
    J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Practical sketching algorithms for
    low-rank matrix approximation", SIAM J. Matrix Anal. Appl. 38(4), 2017.
    J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Fixed-rank approximation of a
    positive-semidefinite matrix from streaming data", NeurIPS 2017.
    J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Streaming low-rank matrix approximation
    with an application to scientific simulation", SIAM J. Sci. Comput. 41(4), 2019.
    Y. Nakatsukasa, "Fast and stable randomized low-rank matrix approximation", arXiv
    2009.11392, 2020.
    G. H. Golub, R. Underwood, "The block Lanczos method for computing eigenvalues",
    Mathematical Software III, 1977.
    C. Musco, C. Musco, "Randomized block Krylov methods for stronger and faster approximate
    singular value decomposition", NeurIPS 2015 (arXiv 1504.05477).
    A. Fernandez, F. Schneider, M. Mahsereci, P. Hennig, "Connecting Parameter Magnitudes and
    Hessian Eigenspaces at Scale using Sketched Methods", TMLR 2025 (arXiv 2504.14701).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg

from curvlake._array import get_namespace, to_numpy
from curvlake.errors import UserInputError
from curvlake.pipelines.hessian.test_matrices import KINDS, RandomTestMatrix

__all__ = [
    "DEFAULT_RCOND",
    "MODES",
    "CoreSolution",
    "ErrorEstimate",
    "ScreeBounds",
    "SketchBudget",
    "SketchedEigh",
    "budget",
    "check_n_eigs",
    "check_sketch_config",
    "core_from_projections",
    "eigh_core",
    "error_tail_bounds",
    "extend_krylov_basis",
    "finalize_error_estimate",
    "hmt_core",
    "nystrom_core",
    "nystrom_psd_eigh",
    "nystrom_shift",
    "orthonormalize",
    "oversampled_core",
    "probe_coefficients",
    "probe_residual_partials",
    "project",
    "scree_bounds",
    "singlepass_core",
    "sketched_eigh",
]

MODES: tuple[str, ...] = ("hmt", "krylov", "oversampled", "recycled", "nystrom", "singlepass")
#: Modes that take ``power_iters`` (HMT's subspace iterations, the Krylov depth).
_ITERATED_MODES = ("hmt", "krylov")
_INNER_MODES = ("oversampled", "recycled")

#: Relative singular-value cutoff of the least-squares solves (skerch's default).
DEFAULT_RCOND = 1e-6


# ---------------------------------------------------------------------------------------------
# Configuration and budgets
# ---------------------------------------------------------------------------------------------


class SketchBudget(NamedTuple):
    """Cost of one decomposition.

    Attributes:
        hvps: number of Hessian-vector products (columns multiplied by ``A``).
        data_passes: number of sequential passes over the data: the columns of one pass are
            independent of each other and are multiplied together.
    """

    hvps: int
    data_passes: int


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UserInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_sketch_config(
    mode: str, k: int, s: int | None = None, power_iters: int = 0, dim: int | None = None
) -> None:
    """Validate the sizes of a decomposition; raise :class:`UserInputError` naming the problem.

    Args:
        mode: one of :data:`MODES`.
        k: outer sketch size (number of recovered eigenpairs), ``1 <= k <= D``.
        s: inner sketch size, required by ``"oversampled"`` and ``"recycled"`` (``k <= s <= D``;
            Tropp et al. 2019 recommend ``s >= 2k + 1``, the seed uses ``s = 2k``), and not
            accepted by the other modes.
        power_iters: ``>= 0``; ``"hmt"``: subspace iterations, ``"krylov"``: the Krylov depth
            (the basis has ``q + 1`` blocks of ``k`` columns, so ``(q + 1) k <= D``); the other
            modes refuse them.
        dim: ``D`` if known.
    """
    if mode not in MODES:
        raise UserInputError(f"unknown sketch mode {mode!r}: use one of {list(MODES)}")
    k = _check_int("k (outer sketch size)", k, 1)
    power_iters = _check_int("power_iters", power_iters, 0)
    if dim is not None and k > dim:
        raise UserInputError(f"k={k} exceeds the dimension D={dim}")
    if mode in _INNER_MODES:
        if s is None:
            raise UserInputError(f"mode {mode!r} needs the inner sketch size s (s >= k={k})")
        s = _check_int("s (inner sketch size)", s, 1)
        if s < k:
            raise UserInputError(f"inner sketch size s={s} must be >= k={k} in mode {mode!r}")
        if dim is not None and s > dim:
            raise UserInputError(f"s={s} exceeds the dimension D={dim}")
    elif s is not None:
        raise UserInputError(
            f"mode {mode!r} has no inner sketch; s={s} is only used by {list(_INNER_MODES)}"
        )
    if power_iters and mode not in _ITERATED_MODES:
        raise UserInputError(
            f"power_iters={power_iters} needs mode 'hmt' or 'krylov', got {mode!r}"
        )
    if mode == "krylov" and dim is not None and (power_iters + 1) * k > dim:
        raise UserInputError(
            f"krylov with k={k} and power_iters={power_iters} needs a basis of "
            f"(power_iters + 1) * k = {(power_iters + 1) * k} columns, more than D={dim}"
        )


def check_n_eigs(mode: str, k: int, power_iters: int, n_eigs: int | None) -> int:
    """The number of eigenpairs a decomposition keeps: ``n_eigs``, or ``k`` when ``None``.

    Every mode recovers ``k`` eigenpairs from its rank-``k`` approximation, so ``n_eigs <= k``
    keeps the leading ones. ``krylov`` runs Rayleigh-Ritz on its whole basis of
    ``(q + 1) k`` columns, so it can keep up to that many Ritz pairs: a narrow block (a few
    HVPs per pass) and a deeper recursion then reach many eigenpairs, as Lanczos does with
    blocks of one.

    Raises:
        UserInputError: ``n_eigs`` is not a positive int, or more than the mode recovers.
    """
    if n_eigs is None:
        return int(k)
    n_eigs = _check_int("n_eigs (eigenpairs kept)", n_eigs, 1)
    most = (power_iters + 1) * k if mode == "krylov" else k
    if n_eigs > most:
        where = (
            f"the Krylov basis of (power_iters + 1) * k = {most} columns"
            if mode == "krylov"
            else f"k={k} in mode {mode!r} (only krylov keeps more than k)"
        )
        raise UserInputError(f"n_eigs={n_eigs} is more eigenpairs than {where}")
    return n_eigs


def budget(
    mode: str, k: int, s: int | None = None, power_iters: int = 0, probes: int = 0
) -> SketchBudget:
    """Exact number of HVPs and data passes of a decomposition.

    ==============  =====================  ================
    mode            HVPs                   data passes
    ==============  =====================  ================
    ``hmt``         ``(2 + 2q) k``         ``2 + 2q``
    ``krylov``      ``(2 + q) k``          ``2 + q``
    ``oversampled`` ``k + s``              1
    ``recycled``    ``s``                  1
    ``nystrom``     ``k``                  1
    ``singlepass``  ``k``                  1
    ==============  =====================  ================

    ``q = power_iters``. The ``probes`` Gaussian vectors of the a-posteriori error estimate are
    independent of the sketch, so they ride along in the first pass: ``+probes`` HVPs, no
    extra pass.

    Example:
        >>> budget("recycled", k=100, s=200)
        SketchBudget(hvps=200, data_passes=1)
        >>> budget("hmt", k=100, power_iters=1, probes=30)
        SketchBudget(hvps=430, data_passes=4)
    """
    check_sketch_config(mode, k, s, power_iters)
    probes = _check_int("probes", probes, 0)
    if mode == "hmt":
        hvps, passes = (2 + 2 * power_iters) * k, 2 + 2 * power_iters
    elif mode == "krylov":
        hvps, passes = (2 + power_iters) * k, 2 + power_iters
    elif mode == "oversampled":
        hvps, passes = k + int(s), 1  # type: ignore[arg-type]
    elif mode == "recycled":
        hvps, passes = int(s), 1  # type: ignore[arg-type]
    else:
        hvps, passes = k, 1
    return SketchBudget(hvps + probes, passes)


# ---------------------------------------------------------------------------------------------
# Tall steps: QR and projections
# ---------------------------------------------------------------------------------------------


def orthonormalize(y: Any) -> tuple[Any, Any]:
    """Thin QR ``Y = Q R`` of a tall ``(D, k)`` sketch (NumPy or CuPy; in ``Y``'s dtype).

    The in-memory counterpart of ``dask.array.linalg.tsqr``; any thin QR will do, since the
    cores only need ``Q`` with orthonormal columns spanning ``range(Y)`` and ``R = Qᵀ Y``.
    """
    if y.ndim != 2 or y.shape[0] < y.shape[1]:
        raise ValueError(f"expected a tall (D, k) sketch, got shape {y.shape}")
    xp = get_namespace(y)
    q, r = xp.linalg.qr(y, mode="reduced")
    return q, r


def extend_krylov_basis(basis: Any, image: Any) -> Any:
    """The next block of a block Krylov basis: ``Q_j`` from ``B = [Q_0 … Q_{j-1}]`` and
    ``A Q_{j-1}`` (NumPy or CuPy, in their dtype).

    The last ``k`` columns of the thin QR of ``[B | A Q_{j-1}]``: since ``B`` has orthonormal
    columns, the first ``jk`` columns of that ``Q`` span ``range(B)`` and the last ``k`` are an
    orthonormal basis of the part of ``A Q_{j-1}`` outside it, orthogonal to ``B`` to rounding
    (Householder QR, or Dask's TSQR in the pipeline). Where ``A Q_{j-1}`` has no new direction
    (the Krylov space is exhausted) the columns are still orthonormal, and the Rayleigh-Ritz
    core simply finds nothing there.
    """
    xp = get_namespace(basis, image)
    q, _ = orthonormalize(xp.concatenate([basis, image], axis=1))
    return q[:, basis.shape[1] :]


def project(left: Any, right: Any) -> Any:
    """Return ``leftᵀ right`` in float64: the row-block partial of a projection.

    For row blocks ``L_b, X_b`` of tall matrices ``L, X`` (the same rows), ``Lᵀ X =
    Σ_b project(L_b, X_b)``: e.g. ``Qᵀ (A Q)`` (hmt), ``Φᵀ Q`` and ``Ψᵀ Q`` (oversampled,
    recycled), ``Ωᵀ Y`` (nystrom), ``Ωᵀ Q`` (singlepass), ``Φᵀ (A Ψ)`` (the inner sketch).
    The result stays on ``left``'s device.
    """
    xp = get_namespace(left, right)
    return xp.asarray(left, dtype=xp.float64).T @ xp.asarray(right, dtype=xp.float64)


# ---------------------------------------------------------------------------------------------
# Cores (small, float64, on the host)
# ---------------------------------------------------------------------------------------------


class CoreSolution(NamedTuple):
    """Eigenpairs of the core: ``A ≈ (Q W) diag(λ) (Q W)ᵀ``.

    Attributes:
        eigenvalues: float64 ``(k,)``, ordered by ``|λ|`` descending.
        rotation: float64 ``(k, k)`` ``W``; the eigenvectors of ``A`` are ``Q @ W``.
    """

    eigenvalues: np.ndarray
    rotation: np.ndarray


def _host64(a: Any, name: str, shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    if a is None:
        raise ValueError(f"missing projection {name!r}")
    out = np.asarray(to_numpy(a), dtype=np.float64)
    if shape is not None and (
        out.ndim != len(shape)
        or any(n is not None and m != n for m, n in zip(out.shape, shape, strict=True))
    ):
        raise ValueError(f"{name} has shape {out.shape}, expected {shape}")
    return out


def _lstsq(a: np.ndarray, b: np.ndarray, rcond: float) -> np.ndarray:
    return scipy.linalg.lstsq(a, b, cond=rcond, lapack_driver="gelsd")[0]


def hmt_core(qt_aq: Any) -> np.ndarray:
    """HMT core ``C = Qᵀ (A Q)`` (``k × k``), from the projection of the second pass."""
    core = _host64(qt_aq, "qt_aq")
    if core.ndim != 2 or core.shape[0] != core.shape[1]:
        raise ValueError(f"qt_aq must be square, got {core.shape}")
    return core


def oversampled_core(
    inner: Any, phi_t_q: Any, psi_t_q: Any, rcond: float = DEFAULT_RCOND
) -> np.ndarray:
    """Oversampled core ``C = (Φᵀ Q)† Z ((Ψᵀ Q)†)ᵀ`` (modes ``oversampled`` and ``recycled``).

    Args:
        inner: ``Z = Φᵀ A Ψ`` (``s × s``; column ``j`` is ``Φᵀ (A ψ_j)``).
        phi_t_q: ``Φᵀ Q`` (``s × k``).
        psi_t_q: ``Ψᵀ Q`` (``s × k``).
        rcond: relative singular-value cutoff of the two least-squares solves.

    Returns:
        the raw (not yet symmetrized) ``k × k`` core.

    Since ``A ≈ Q Qᵀ A Q Qᵀ``, ``Z ≈ (Φᵀ Q)(Qᵀ A Q)(Ψᵀ Q)ᵀ`` and the two solves return
    ``Qᵀ A Q``; exactly so when ``range(A) ⊆ range(Q)``.
    """
    z = _host64(inner, "inner", (None, None))
    s = z.shape[0]
    phi_q = _host64(phi_t_q, "phi_t_q", (s, None))
    psi_q = _host64(psi_t_q, "psi_t_q", (z.shape[1], phi_q.shape[1]))
    left = _lstsq(phi_q, z, rcond)  # (Φᵀ Q)† Z, k × s
    return _lstsq(psi_q, left.T, rcond).T  # ... ((Ψᵀ Q)†)ᵀ, k × k


def singlepass_core(r: Any, omega_t_q: Any, rcond: float = DEFAULT_RCOND) -> np.ndarray:
    """Single-pass core ``C = R (Qᵀ Ω)†`` from ``Y = A Ω = Q R`` alone.

    Args:
        r: the ``k × k`` factor of ``Y = Q R`` (``R = Qᵀ Y``).
        omega_t_q: ``Ωᵀ Q`` (``k × k``).
        rcond: relative cutoff of the least-squares solve.

    Returns:
        the raw ``k × k`` core (not symmetric in general).
    """
    r64 = _host64(r, "r", (None, None))
    b = _host64(omega_t_q, "omega_t_q", (None, r64.shape[0]))
    # Cᵀ = (Ωᵀ Q)† Rᵀ = (Ωᵀ Q)† (Ωᵀ A Q)
    return _lstsq(b, r64.T, rcond).T


def _symmetric_pinv(b: np.ndarray, rcond: float) -> np.ndarray:
    lam, v = scipy.linalg.eigh(0.5 * (b + b.T))
    cutoff = rcond * (np.abs(lam).max() if lam.size else 0.0)
    keep = np.abs(lam) > cutoff
    return (v[:, keep] / lam[keep]) @ v[:, keep].T


def nystrom_core(r: Any, omega_t_y: Any, rcond: float = DEFAULT_RCOND) -> np.ndarray:
    """Generalized Nyström core ``C = R (Ωᵀ Y)† Rᵀ`` with ``Y = Q R``.

    ``Ωᵀ Y = Ωᵀ A Ω`` is symmetrized and pseudo-inverted through its eigendecomposition,
    eigenvalues with ``|μ| <= rcond · max|μ|`` dropped (the singular values of a symmetric
    matrix are ``|μ|``, so this is the cutoff of a least-squares solve). For an indefinite
    ``A`` the core is indefinite too; exact when ``rank(A) <= k``.

    Args:
        r: ``R`` of ``Y = Q R`` (``k × k``); ``Y`` may be the shifted sketch ``Y + ν Ω``.
        omega_t_y: ``Ωᵀ Y`` (``k × k``) for the same ``Y``.
        rcond: relative eigenvalue cutoff.
    """
    r64 = _host64(r, "r", (None, None))
    b = _host64(omega_t_y, "omega_t_y", (r64.shape[1], r64.shape[1]))
    return r64 @ _symmetric_pinv(b, rcond) @ r64.T


def nystrom_shift(y_frob_norm: float, dim: int, dtype: Any = np.float64) -> float:
    """Stabilizing shift ``ν = √D · eps(‖Y‖_F)`` of Tropp et al. (NeurIPS 2017, Alg. 3).

    ``eps(x)`` is the spacing of floating-point numbers of ``dtype`` at ``x``: the shift is at
    the rounding level of the sketch, large enough to make ``Ωᵀ (A + νI) Ω`` numerically
    positive definite for a PSD ``A``.
    """
    return float(math.sqrt(dim) * np.spacing(np.asarray(y_frob_norm, dtype=dtype)))


def nystrom_psd_eigh(r: Any, omega_t_y: Any, shift: float) -> CoreSolution:
    """Stabilized Nyström eigenpairs of a PSD ``A`` (Tropp et al., NeurIPS 2017, Alg. 3).

    With ``Y_ν = (A + νI) Ω = Q R`` and ``B = Ωᵀ Y_ν = Cᵀ C`` (Cholesky):
    ``A + νI ≈ Y_ν B⁻¹ Y_νᵀ = Q F Fᵀ Qᵀ`` with ``F = R C⁻¹``; the SVD ``F = W Σ Vᵀ`` gives
    ``λ = max(σ² − ν, 0)`` and the rotation ``W``.

    Raises:
        numpy.linalg.LinAlgError: when ``B`` is not positive definite (``A`` is not PSD).
    """
    r64 = _host64(r, "r", (None, None))
    b = _host64(omega_t_y, "omega_t_y", (r64.shape[1], r64.shape[1]))
    try:
        chol = scipy.linalg.cholesky(0.5 * (b + b.T), lower=False)
    except np.linalg.LinAlgError as err:
        raise np.linalg.LinAlgError(
            "Nyström with psd=True needs Ωᵀ(A + νI)Ω positive definite, and it is not: the "
            "matrix is not PSD (Hessians are indefinite). Use psd=False (generalized Nyström) "
            "or another mode."
        ) from err
    f = scipy.linalg.solve_triangular(chol, r64.T, trans="T", lower=False).T
    w, sigma, _ = scipy.linalg.svd(f, full_matrices=False)
    return CoreSolution(np.maximum(sigma**2 - shift, 0.0), w)


def _by_magnitude(eigenvalues: np.ndarray, rotation: np.ndarray) -> CoreSolution:
    order = np.argsort(-np.abs(eigenvalues), kind="stable")
    return CoreSolution(eigenvalues[order], rotation[:, order])


def eigh_core(core: Any) -> CoreSolution:
    """Symmetrize a ``k × k`` core in float64 and diagonalize it, ordered by ``|λ|`` descending.

    ``(C + Cᵀ)/2`` is the nearest symmetric matrix to ``C`` in Frobenius norm, and since ``A``
    is symmetric ``‖A − Q C_sym Qᵀ‖_F <= ‖A − Q C Qᵀ‖_F``. (The seed and skerch pass the raw
    core to LAPACK, which reads one triangle.)
    """
    c = _host64(core, "core", (None, None))
    lam, w = scipy.linalg.eigh(0.5 * (c + c.T))
    return _by_magnitude(lam, w)


def core_from_projections(
    mode: str,
    *,
    qt_aq: Any = None,
    inner: Any = None,
    phi_t_q: Any = None,
    psi_t_q: Any = None,
    r: Any = None,
    omega_t_y: Any = None,
    omega_t_q: Any = None,
    shift: float = 0.0,
    psd: bool = False,
    rcond: float = DEFAULT_RCOND,
) -> CoreSolution:
    """Solve the core of a mode from the small projections computed elsewhere.

    Args:
        mode: one of :data:`MODES`.
        qt_aq: ``hmt``: ``Qᵀ (A Q)``, ``k × k``; ``krylov``: ``Bᵀ (A B)`` of the whole Krylov
            basis, ``(q+1)k`` square (all its Ritz pairs are returned; keep the first ``k``).
        inner: ``oversampled`` / ``recycled``: ``Z = Φᵀ A Ψ``, ``s × s``.
        phi_t_q: ``oversampled`` / ``recycled``: ``Φᵀ Q``, ``s × k``.
        psi_t_q: ``oversampled`` / ``recycled``: ``Ψᵀ Q``, ``s × k``.
        r: ``nystrom`` / ``singlepass``: ``R`` of the sketch's QR, ``k × k`` (``nystrom``: of the
            shifted sketch ``Y + ν Ω``).
        omega_t_y: ``nystrom``: ``Ωᵀ (Y + ν Ω)``, ``k × k``.
        omega_t_q: ``singlepass``: ``Ωᵀ Q``, ``k × k``.
        shift: ``nystrom``: the shift ``ν`` the sketch was taken with (subtracted from the
            eigenvalues).
        psd: ``nystrom``: use the stabilized PSD algorithm (:func:`nystrom_psd_eigh`).
        rcond: relative cutoff of the least-squares solves.

    Returns:
        the eigenvalues (by ``|λ|`` descending) and the ``k × k`` rotation ``W`` to apply to
        ``Q``.
    """
    if mode not in MODES:
        raise UserInputError(f"unknown sketch mode {mode!r}: use one of {list(MODES)}")
    if not 0 <= rcond < 1:
        raise UserInputError(f"rcond must be in [0, 1), got {rcond}")
    if mode in _ITERATED_MODES:
        return eigh_core(hmt_core(qt_aq))
    if mode in _INNER_MODES:
        return eigh_core(oversampled_core(inner, phi_t_q, psi_t_q, rcond))
    if mode == "singlepass":
        return eigh_core(singlepass_core(r, omega_t_q, rcond))
    if psd:
        return nystrom_psd_eigh(r, omega_t_y, shift)
    lam, w = eigh_core(nystrom_core(r, omega_t_y, rcond))
    return _by_magnitude(lam - shift, w)


# ---------------------------------------------------------------------------------------------
# A-posteriori error estimate and scree bounds
# ---------------------------------------------------------------------------------------------


def probe_coefficients(u_block: Any, probe_block: Any) -> Any:
    """Row-block partial of ``Uᵀ Ω_p`` (``k × q``, float64) for the error probes ``Ω_p``.

    Summed over the row blocks it gives the coefficients that :func:`probe_residual_partials`
    needs to form ``Â Ω_p = U diag(λ) (Uᵀ Ω_p)`` block by block.
    """
    return project(u_block, probe_block)


def probe_residual_partials(
    u_block: Any, eigenvalues: Any, coefficients: Any, probe_image_block: Any
) -> np.ndarray:
    """Row-block partial sums of ``‖A ω_i‖²``, ``‖Â ω_i‖²`` and ``‖(A − Â) ω_i‖²``.

    Args:
        u_block: rows of the orthonormal eigenvectors ``U`` (``n × k``).
        eigenvalues: ``λ`` (``k``) with ``Â = U diag(λ) Uᵀ``.
        coefficients: the full ``Uᵀ Ω_p`` (``k × q``, the sum of :func:`probe_coefficients`).
        probe_image_block: the same rows of ``A Ω_p`` (``n × q``), measured by HVPs.

    Returns:
        float64 ``(3, q)`` on the host: per probe, the three squared norms restricted to the
        block. The residual is formed per entry (not as a difference of norms) so that a
        small error is not lost to cancellation.
    """
    xp = get_namespace(u_block, probe_image_block)
    lam = xp.asarray(eigenvalues, dtype=xp.float64)
    coef = xp.asarray(coefficients, dtype=xp.float64)
    a_omega = xp.asarray(probe_image_block, dtype=xp.float64)
    ahat_omega = xp.asarray(u_block, dtype=xp.float64) @ (lam[:, None] * coef)
    residual = a_omega - ahat_omega
    sums = xp.stack(
        [(a_omega**2).sum(axis=0), (ahat_omega**2).sum(axis=0), (residual**2).sum(axis=0)]
    )
    return np.asarray(to_numpy(sums), dtype=np.float64)


class ErrorEstimate(NamedTuple):
    """A-posteriori estimates from ``q`` Gaussian probes (Tropp et al. 2019, §6.3).

    Attributes:
        frob2: estimate of ``‖A‖²_F``.
        frob2_approx: estimate of ``‖Â‖²_F``.
        err2: estimate of ``‖A − Â‖²_F``.
        per_probe: float64 ``(3, q)``: the three squared norms of each probe.
    """

    frob2: float
    frob2_approx: float
    err2: float
    per_probe: np.ndarray


def finalize_error_estimate(partials: Any) -> ErrorEstimate:
    """Average the per-probe squared norms (the sum over row blocks of the partials).

    For ``ω ~ N(0, I)``, ``E‖M ω‖² = ‖M‖²_F``, so each row's mean over the ``q`` probes is an
    unbiased estimate of the corresponding squared Frobenius norm.
    """
    per_probe = np.asarray(partials, dtype=np.float64)
    if per_probe.ndim != 2 or per_probe.shape[0] != 3 or per_probe.shape[1] < 1:
        raise ValueError(f"expected (3, q) partial sums, got shape {per_probe.shape}")
    f1, f2, err = per_probe.mean(axis=1)
    return ErrorEstimate(float(f1), float(f2), float(err), per_probe)


def error_tail_bounds(
    n_probes: int, rel_err: float, is_complex: bool = False
) -> tuple[float, float]:
    """Probabilities that the a-posteriori estimate misses by more than a relative ``ε``.

    Tropp et al. 2019, §6.4: with ``q`` standard Gaussian probes (``β = 1`` real, ``2``
    complex), the estimate ``err_q²`` of ``err² = ‖A − Â‖²_F`` is a weighted chi-square and

        P{err_q² <= (1 − ε) err²} <= [e^ε (1 − ε)]^{βq/2},
        P{err_q² >= (1 + ε) err²} <= [e^{−ε} (1 + ε)]^{βq/2},

    whatever ``A``, ``Â`` and the dimension. For ``q = 30`` and ``ε = 1/2`` (real): 0.055 and
    0.242.

    Args:
        n_probes: ``q >= 1``.
        rel_err: ``ε`` in ``[0, 1]`` (the lower bound is 0 at ``ε = 1``).
        is_complex: complex probes and matrices (``β = 2``).

    Returns:
        ``(p_under, p_over)``: bounds on the two failure probabilities.
    """
    q = _check_int("n_probes", n_probes, 1)
    if not 0 <= rel_err <= 1:
        raise UserInputError(f"rel_err must be in [0, 1], got {rel_err}")
    half = (2 if is_complex else 1) * q / 2
    p_under = (math.exp(rel_err) * (1 - rel_err)) ** half
    p_over = (math.exp(-rel_err) * (1 + rel_err)) ** half
    return p_under, p_over


class ScreeBounds(NamedTuple):
    """Bounds on the scree ``τ²_{r+1}(A) / ‖A‖²_F`` for ``r = 0..k`` components kept.

    Attributes:
        lower: ``(τ_{r+1}(Â) / N)²`` (Tropp et al.'s proxy: sketches tend to underestimate
            the tail energy, so this is typically below the true scree; skerch's lower bound).
        upper: ``((τ_{r+1}(Â) + err) / N)²`` (a bound when ``err >= ‖A − Â‖_F`` and
            ``N = ‖A‖_F``: ``τ_{r+1}(A) <= ‖A − ⟦Â⟧_r‖_F <= err + τ_{r+1}(Â)``).
        lower_strict: ``(max(τ_{r+1}(Â) − err, 0) / N)²`` (a bound under the same
            conditions, by Mirsky's inequality ``|τ_{r+1}(A) − τ_{r+1}(Â)| <= ‖A − Â‖_F``).
    """

    lower: np.ndarray
    upper: np.ndarray
    lower_strict: np.ndarray


def scree_bounds(eigenvalues: Any, err_frob: float, norm_frob: float | None = None) -> ScreeBounds:
    """A-posteriori scree bounds (Tropp et al. 2019, §6.5) for ``r = 0..k`` components.

    ``τ_{r+1}(Â) = (Σ_{j>r} λ_j²)^{1/2}`` is the energy of ``Â`` left after its ``r`` largest
    (in magnitude) components; for a symmetric matrix the singular values are ``|λ|``.

    Args:
        eigenvalues: ``λ`` of ``Â`` ordered by ``|λ|`` descending (``k``).
        err_frob: the estimate of ``‖A − Â‖_F`` (not squared), e.g. ``√err2``.
        norm_frob: the normalization ``N``: the estimate of ``‖A‖_F`` (as in Tropp et al. and
            the seed's code) or, by default, ``‖Â‖_F`` (skerch 1.x; then ``lower`` starts at 1).

    Returns:
        arrays of length ``k + 1``; entry ``r`` is about the energy after ``r`` components
        (skerch's ``scree_bounds`` returns entries ``0..k-1``).
    """
    lam = np.abs(np.asarray(to_numpy(eigenvalues), dtype=np.float64))
    if lam.ndim != 1 or lam.size < 1:
        raise ValueError(f"expected a non-empty vector of eigenvalues, got shape {lam.shape}")
    if np.any(np.diff(lam) > 0):
        raise UserInputError("eigenvalues must be ordered by non-increasing magnitude")
    if err_frob < 0:
        raise UserInputError(f"err_frob must be >= 0, got {err_frob}")
    tail = np.sqrt(np.append(np.cumsum((lam**2)[::-1])[::-1], 0.0))
    norm = float(tail[0]) if norm_frob is None else float(norm_frob)
    if norm <= 0:
        raise UserInputError(f"the normalization must be > 0, got {norm}")
    return ScreeBounds(
        (tail / norm) ** 2,
        ((tail + err_frob) / norm) ** 2,
        (np.maximum(tail - err_frob, 0.0) / norm) ** 2,
    )


# ---------------------------------------------------------------------------------------------
# The whole decomposition in memory (reference for the Dask pipeline)
# ---------------------------------------------------------------------------------------------


class SketchedEigh(NamedTuple):
    """Result of :func:`sketched_eigh`.

    Attributes:
        eigenvalues: float64 ``(k,)`` by ``|λ|`` descending.
        eigenvectors: ``(D, k)`` orthonormal columns ``U = Q W``.
        budget: the HVPs and data passes spent (equals :func:`budget`).
        error: the a-posteriori estimate, if probes were asked for.
    """

    eigenvalues: np.ndarray
    eigenvectors: Any
    budget: SketchBudget
    error: ErrorEstimate | None


def sketched_eigh(
    matmat: Callable[[Any], Any],
    dim: int,
    k: int,
    *,
    mode: str = "recycled",
    s: int | None = None,
    kind: str = "ssrft",
    seed: int = 0,
    power_iters: int = 0,
    n_eigs: int | None = None,
    n_probes: int = 0,
    psd: bool = False,
    rcond: float = DEFAULT_RCOND,
    dtype: Any = np.float64,
) -> SketchedEigh:
    """Sketched eigendecomposition of a symmetric ``A`` given by ``matmat(X) = A X``.

    Every call of ``matmat`` is one data pass over all columns of ``X``; the test matrices are
    the counter-based ones of :class:`RandomTestMatrix` with the operators ``"outer"`` (Ω),
    ``"inner_right"`` (Ψ), ``"inner_left"`` (Φ) and ``"probe"`` (Gaussian error probes,
    measured in the first pass), so the Dask pipeline reproduces this function exactly.

    Args:
        matmat: ``X (D, b) -> A X (D, b)``.
        dim: ``D``.
        k: outer sketch size (eigenpairs returned, unless ``n_eigs`` says otherwise).
        mode: one of :data:`MODES` (see the module docstring).
        s: inner sketch size (``oversampled``, ``recycled``).
        kind: test-matrix kind of Ω, Ψ, Φ: ``"gaussian"``, ``"rademacher"`` or ``"ssrft"``.
        seed: seed of all test matrices.
        power_iters: subspace iterations (``hmt``) or the Krylov depth (``krylov``).
        n_eigs: eigenpairs kept (default ``k``; :func:`check_n_eigs`: up to ``(q + 1) k``
            for ``krylov``).
        n_probes: Gaussian probes for the a-posteriori error estimate (0: none).
        psd: ``nystrom``: the stabilized PSD algorithm (shift ``ν``, Cholesky, clipping).
        rcond: relative cutoff of the least-squares solves.
        dtype: dtype of the test matrices and sketches.
    """
    check_sketch_config(mode, k, s, power_iters, dim)
    n_eigs = check_n_eigs(mode, k, power_iters, n_eigs)
    if kind not in KINDS:
        raise UserInputError(f"unknown test-matrix kind {kind!r}: use one of {list(KINDS)}")
    n_probes = _check_int("n_probes", n_probes, 0)
    hvps, passes = 0, 0

    def apply(x: Any) -> Any:
        nonlocal hvps, passes
        hvps, passes = hvps + x.shape[1], passes + 1
        return matmat(x)

    xp = np
    probes = RandomTestMatrix("gaussian", seed, "probe", (dim, n_probes)) if n_probes else None
    first: list[Any] = []
    if mode in _INNER_MODES:
        psi = RandomTestMatrix(kind, seed, "inner_right", (dim, int(s)))  # type: ignore[arg-type]
        phi = RandomTestMatrix(kind, seed, "inner_left", (dim, int(s)))  # type: ignore[arg-type]
        if mode == "oversampled":
            first.append(RandomTestMatrix(kind, seed, "outer", (dim, k)).to_dense(dtype, xp))
        first.append(psi.to_dense(dtype, xp))
    else:
        omega = RandomTestMatrix(kind, seed, "outer", (dim, k))
        first.append(omega.to_dense(dtype, xp))
    if probes is not None:
        first.append(probes.to_dense(dtype, xp))
    measured = apply(xp.concatenate(first, axis=1))
    sketch_cols = measured.shape[1] - n_probes
    probe_images = measured[:, sketch_cols:]
    sketch = measured[:, :sketch_cols]

    shift = 0.0
    if mode == "hmt":
        y = sketch
        for _ in range(power_iters):
            y = apply(orthonormalize(apply(orthonormalize(y)[0]))[0])
        q, _ = orthonormalize(y)
        solution = core_from_projections(mode, qt_aq=project(q, apply(q)))
    elif mode == "krylov":
        blocks = [orthonormalize(sketch)[0]]
        images = [apply(blocks[0])]
        for _ in range(power_iters):
            blocks.append(extend_krylov_basis(xp.concatenate(blocks, axis=1), images[-1]))
            images.append(apply(blocks[-1]))
        q = xp.concatenate(blocks, axis=1)
        solution = core_from_projections(mode, qt_aq=project(q, xp.concatenate(images, axis=1)))
    elif mode in _INNER_MODES:
        a_psi = sketch[:, k:] if mode == "oversampled" else sketch
        y = sketch[:, :k]
        q, _ = orthonormalize(y)
        solution = core_from_projections(
            mode,
            inner=phi.transpose_matmul(a_psi),
            phi_t_q=phi.transpose_matmul(q),
            psi_t_q=psi.transpose_matmul(q),
            rcond=rcond,
        )
    elif mode == "singlepass":
        q, r = orthonormalize(sketch)
        solution = core_from_projections(
            mode, r=r, omega_t_q=omega.transpose_matmul(q), rcond=rcond
        )
    else:
        y = sketch
        if psd:
            shift = nystrom_shift(float(np.linalg.norm(y)), dim, dtype)
            y = y + shift * first[0]
        q, r = orthonormalize(y)
        solution = core_from_projections(
            mode,
            r=r,
            omega_t_y=omega.transpose_matmul(y),
            shift=shift,
            psd=psd,
            rcond=rcond,
        )
    solution = CoreSolution(solution.eigenvalues[:n_eigs], solution.rotation[:, :n_eigs])
    u = q @ solution.rotation.astype(q.dtype)
    error = None
    if probes is not None:
        omega_p = first[-1]
        coef = probe_coefficients(u, omega_p)
        error = finalize_error_estimate(
            probe_residual_partials(u, solution.eigenvalues, coef, probe_images)
        )
    return SketchedEigh(solution.eigenvalues, u, SketchBudget(hvps, passes), error)
