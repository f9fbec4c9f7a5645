r"""Optimal Brain Surgeon (OBS) pruning with an M-FAC inverse Fisher.

OBS (Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon",
NIPS 1993) models the loss near the current weights ``w`` by the quadratic
``ΔL(δw) = ½ δwᵀ F δw`` (a minimum, so no linear term) and removes weights by the smallest
increase of that model. For one weight ``q`` (constraint ``e_qᵀ(w + δw) = 0``):

    δw = −(w_q / [F⁻¹]_qq) F⁻¹ e_q,        ΔL = ρ_q = w_q² / (2 [F⁻¹]_qq),

the *OBS score* ``ρ_q``. For a set ``Q`` at once (constraint ``E_Qᵀ(w + δw) = 0``, ``E_Q``
the columns ``e_q``, q ∈ Q), the exact group solution is

    δw = −F⁻¹ E_Q (E_Qᵀ F⁻¹ E_Q)⁻¹ w_Q,    ΔL = ½ w_Qᵀ (E_Qᵀ F⁻¹ E_Q)⁻¹ w_Q.

M-FAC (Frantar, Kurtic & Alistarh, NeurIPS 2021) and WoodFisher prune many weights per step
with the *sum of the single-weight updates*, ``δw = −F⁻¹ Σ_{q∈Q} (w_q / [F⁻¹]_qq) e_q``: one
F⁻¹ product with a sparse right-hand side, then ``w_Q ← 0``. It ignores the correlations
among the weights of ``Q``: it equals the group solution when ``[F⁻¹]_QQ`` is diagonal and
is worse (a larger ΔL) otherwise. :func:`group_obs_update` gives the exact solution for small
groups (cost ``O(|Q| m² + |Q|³)`` on top of one product).

``inverse_fisher`` below is any operator with ``@``, ``diagonal()``, ``submatrix(indices)``
and ``n_params`` — :class:`~curvlake.pipelines.mfac.InverseFisher` or
:class:`~curvlake.pipelines.mfac.BlockedInverseFisher`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import scipy.linalg

from curvlake._array import to_numpy
from curvlake.errors import UserInputError
from curvlake.pipelines.mfac._checks import check_indices, check_int

__all__ = [
    "InverseFisherOperator",
    "geometric_density_schedule",
    "group_obs_update",
    "lowest_scores",
    "obs_scores",
    "summed_obs_update",
]


class InverseFisherOperator(Protocol):
    """What the pruning kernels need from an inverse Fisher."""

    n_params: int

    def __matmul__(self, x: Any) -> Any: ...

    def diagonal(self) -> Any: ...

    def submatrix(self, indices: Any) -> np.ndarray: ...


def _host(array: Any) -> np.ndarray:
    """A NumPy array from a NumPy, CuPy or Dask result."""
    if hasattr(array, "compute"):
        array = array.compute()
    return to_numpy(array)


def _check_weights(weights: Any, n_params: int) -> np.ndarray:
    values = np.asarray(_host(weights), dtype=np.float64)
    if values.shape != (n_params,):
        raise UserInputError(f"weights must have shape ({n_params},), got {values.shape}")
    return values


def obs_scores(weights: Any, inverse_diagonal: Any) -> np.ndarray:
    r"""OBS scores ``ρ_q = w_q² / (2 [F⁻¹]_qq)``: the loss increase of removing weight ``q``
    alone (and letting the others compensate).

    Args:
        weights: w (d,).
        inverse_diagonal: the diagonal of F⁻¹ (d,), e.g. ``inverse_fisher.diagonal()``.

    Returns:
        float64 (d,).
    """
    weights = np.asarray(_host(weights), dtype=np.float64)
    inverse_diagonal = np.asarray(_host(inverse_diagonal), dtype=np.float64)
    if weights.shape != inverse_diagonal.shape or weights.ndim != 1:
        raise UserInputError(
            f"weights {weights.shape} and the inverse diagonal {inverse_diagonal.shape} must be "
            "vectors of the same length"
        )
    return weights * weights / (2.0 * inverse_diagonal)


def lowest_scores(scores: Any, count: int, *, eligible: Any = None) -> np.ndarray:
    """Indices of the ``count`` lowest scores (global ranking, ties by index), optionally among
    the ``eligible`` coordinates only (a bool vector, e.g. the weights not yet pruned).

    Returns:
        int64 indices, sorted ascending.
    """
    scores = np.asarray(_host(scores), dtype=np.float64)
    count = check_int("count", count, minimum=0)
    candidates = np.arange(scores.size)
    if eligible is not None:
        eligible = np.asarray(_host(eligible))
        if eligible.dtype != bool or eligible.shape != scores.shape:
            raise UserInputError(
                f"eligible must be a bool vector of shape {scores.shape}, got {eligible.dtype} "
                f"{eligible.shape}"
            )
        candidates = np.flatnonzero(eligible)
    if count > candidates.size:
        raise UserInputError(f"cannot pick {count} of {candidates.size} eligible coordinates")
    order = np.argsort(scores[candidates], kind="stable")[:count]
    return np.sort(candidates[order])


def summed_obs_update(
    inverse_fisher: InverseFisherOperator,
    weights: Any,
    indices: Any,
    *,
    inverse_diagonal: Any = None,
) -> np.ndarray:
    r"""The summed single-weight OBS update that removes the weights ``Q = indices``:

        δw = −F⁻¹ x,   x = Σ_{q∈Q} (w_q / [F⁻¹]_qq) e_q     (one product, sparse x),

    and then ``δw_Q = −w_Q`` exactly, so that ``w + δw`` is zero on ``Q`` (the seed's
    ``w_Q ← 0``). For a single weight this is the exact OBS step.

    Args:
        inverse_fisher: F⁻¹ (see the module docstring).
        weights: w (d,).
        indices: the weights to remove (distinct flat indices).
        inverse_diagonal: the diagonal of F⁻¹ if already computed (else it is computed).

    Returns:
        δw (d,), float64.
    """
    weights = _check_weights(weights, inverse_fisher.n_params)
    indices = _distinct(check_indices(indices, inverse_fisher.n_params))
    if inverse_diagonal is None:
        diagonal = _host(inverse_fisher.diagonal())[indices]
    else:
        diagonal = np.asarray(_host(inverse_diagonal), dtype=np.float64)[indices]
    rhs = np.zeros_like(weights)
    rhs[indices] = weights[indices] / diagonal
    update = -np.asarray(_host(inverse_fisher @ rhs), dtype=np.float64)
    update[indices] = -weights[indices]
    return update


def group_obs_update(
    inverse_fisher: InverseFisherOperator, weights: Any, indices: Any
) -> tuple[np.ndarray, float]:
    r"""The exact OBS update for removing a (small) group ``Q`` of weights together:

        δw = −F⁻¹ E_Q (E_Qᵀ F⁻¹ E_Q)⁻¹ w_Q,    ΔL = ½ w_Qᵀ (E_Qᵀ F⁻¹ E_Q)⁻¹ w_Q

    (Hassibi & Stork 1993). ``[F⁻¹]_QQ`` is formed explicitly (|Q| × |Q|, float64) and solved
    by Cholesky; then one F⁻¹ product with a right-hand side supported on ``Q``. ``δw_Q`` is
    set to ``−w_Q`` exactly.

    Returns:
        ``(δw, ΔL)``: the update (d,), float64, and the predicted loss increase.
    """
    weights = _check_weights(weights, inverse_fisher.n_params)
    indices = _distinct(check_indices(indices, inverse_fisher.n_params))
    block = np.asarray(inverse_fisher.submatrix(indices), dtype=np.float64)
    try:
        factor = scipy.linalg.cho_factor(block, lower=True)
    except np.linalg.LinAlgError:
        raise UserInputError(
            "[F⁻¹]_QQ of the group is not numerically positive definite: increase damp"
        ) from None
    multipliers = scipy.linalg.cho_solve(factor, weights[indices])
    rhs = np.zeros_like(weights)
    rhs[indices] = multipliers
    update = -np.asarray(_host(inverse_fisher @ rhs), dtype=np.float64)
    update[indices] = -weights[indices]
    return update, float(0.5 * weights[indices] @ multipliers)


def _distinct(indices: np.ndarray) -> np.ndarray:
    if np.unique(indices).size != indices.size:
        raise UserInputError("the weights to remove must be distinct indices")
    return indices


def geometric_density_schedule(
    target_density: float, steps: int, *, start_density: float = 1.0
) -> np.ndarray:
    r"""Densities of a pruning run that reaches ``target_density`` in ``steps`` geometric steps
    from ``start_density`` (the seed's ``--nrecomps``): ``d_j = d_0 · f^j``, ``j = 1..k``,
    ``f = (d_target / d_0)^{1/k}``; the inverse Fisher is recomputed before every step. Each
    step removes the same fraction ``1 − f`` of the weights still alive.

    Returns:
        float64 (steps,), decreasing, the last entry exactly ``target_density``.
    """
    steps = check_int("steps", steps)
    start, target = float(start_density), float(target_density)
    if not (0 < target <= start <= 1):
        raise UserInputError(
            f"densities must satisfy 0 < target_density <= start_density <= 1, got "
            f"target_density={target_density!r}, start_density={start_density!r}"
        )
    factor = (target / start) ** (1.0 / steps)
    densities = start * factor ** np.arange(1, steps + 1, dtype=np.float64)
    densities[-1] = target
    return densities
