"""OBS pruning on a quadratic loss whose Hessian is the M-FAC Fisher F."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from curvlake.errors import UserInputError
from curvlake.pipelines.mfac import (
    InverseFisher,
    geometric_density_schedule,
    group_obs_update,
    lowest_scores,
    obs_scores,
    summed_obs_update,
)
from tests.mfac.cases import dense_fisher, window

DAMP = 1e-2


def _loss(hessian, weights, minimum):
    delta = weights - minimum
    return 0.5 * delta @ hessian @ delta


def _constrained_minimum(hessian, weights, indices):
    """argmin ½(w + δ − w)ᵀH(...) s.t. (w + δ)_Q = 0, by the dense KKT system."""
    d, q = hessian.shape[0], len(indices)
    constraints = np.zeros((q, d))
    constraints[np.arange(q), indices] = 1.0
    kkt = np.block([[hessian, constraints.T], [constraints, np.zeros((q, q))]])
    rhs = np.concatenate([np.zeros(d), -weights[indices]])
    return np.linalg.solve(kkt, rhs)[:d]


@pytest.fixture
def problem():
    grads = window(12, 30, seed=4)
    weights = np.random.default_rng(5).normal(size=30)
    return InverseFisher(grads, DAMP), dense_fisher(grads, DAMP), weights


def test_single_weight_update_is_the_constrained_minimiser(problem):
    inv, hessian, weights = problem
    for q in (0, 7, 29):
        update = summed_obs_update(inv, weights, [q])
        assert update[q] == -weights[q]
        np.testing.assert_allclose(update, _constrained_minimum(hessian, weights, [q]), atol=1e-9)
        predicted = obs_scores(weights, inv.diagonal())[q]
        assert _loss(hessian, weights + update, weights) == pytest.approx(predicted, rel=1e-9)


def test_group_update_is_exact(problem):
    inv, hessian, weights = problem
    group = [2, 5, 11, 20]
    update, change = group_obs_update(inv, weights, group)
    np.testing.assert_allclose(update, _constrained_minimum(hessian, weights, group), atol=1e-9)
    assert np.all((weights + update)[group] == 0)
    assert _loss(hessian, weights + update, weights) == pytest.approx(change, rel=1e-9)


def test_summed_update_is_worse_than_group_when_correlated(problem):
    inv, hessian, weights = problem
    group = [2, 5, 11, 20]
    summed = summed_obs_update(inv, weights, group)
    _, change = group_obs_update(inv, weights, group)
    assert np.all((weights + summed)[group] == 0)
    assert _loss(hessian, weights + summed, weights) > change * (1 + 1e-6)


def test_summed_equals_group_for_a_diagonal_fisher():
    # Orthogonal columns: GᵀG, F and F⁻¹ are diagonal.
    basis = scipy.linalg.qr(np.random.default_rng(0).normal(size=(20, 20)))[0][:, :8]
    grads = basis * np.linspace(1.0, 3.0, 8)
    weights = np.random.default_rng(1).normal(size=8)
    inv = InverseFisher(grads, DAMP)
    group = [1, 4, 6]
    exact, change = group_obs_update(inv, weights, group)
    np.testing.assert_allclose(summed_obs_update(inv, weights, group), exact, atol=1e-10)
    scores = obs_scores(weights, inv.diagonal())
    assert change == pytest.approx(scores[group].sum(), rel=1e-10)


def test_summed_update_uses_a_given_diagonal(problem):
    inv, _, weights = problem
    diagonal = inv.diagonal()
    np.testing.assert_array_equal(
        summed_obs_update(inv, weights, [3, 4], inverse_diagonal=diagonal),
        summed_obs_update(inv, weights, [3, 4]),
    )


def test_lowest_scores_global_and_eligible():
    scores = np.array([5.0, 1.0, 3.0, 1.0, 0.5, 9.0])
    np.testing.assert_array_equal(lowest_scores(scores, 3), [1, 3, 4])
    eligible = np.array([True, True, True, False, False, True])
    np.testing.assert_array_equal(lowest_scores(scores, 2, eligible=eligible), [1, 2])
    with pytest.raises(UserInputError, match="eligible"):
        lowest_scores(scores, 5, eligible=eligible)


def test_geometric_density_schedule():
    densities = geometric_density_schedule(0.1, 4)
    assert densities[-1] == 0.1
    np.testing.assert_allclose(densities[1:] / densities[:-1], 0.1**0.25)
    np.testing.assert_allclose(densities[0], 0.1**0.25)
    np.testing.assert_allclose(geometric_density_schedule(0.2, 2, start_density=0.8), [0.4, 0.2])
    with pytest.raises(UserInputError, match="target_density"):
        geometric_density_schedule(0.9, 3, start_density=0.5)


def test_bad_pruning_inputs(problem):
    inv, _, weights = problem
    with pytest.raises(UserInputError, match="distinct"):
        summed_obs_update(inv, weights, [1, 1])
    with pytest.raises(UserInputError, match="shape"):
        group_obs_update(inv, weights[:5], [1])
