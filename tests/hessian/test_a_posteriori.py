"""A-posteriori error estimate, its tail bounds and the scree bounds."""

import numpy as np
import pytest

from curvlake.errors import UserInputError
from curvlake.pipelines.hessian.recovery import (
    error_tail_bounds,
    finalize_error_estimate,
    probe_coefficients,
    probe_residual_partials,
    scree_bounds,
    sketched_eigh,
)
from curvlake.pipelines.hessian.test_matrices import RandomTestMatrix
from tests.hessian.cases import poly_decay, reconstruct, symmetric, tail_energy

D, K = 150, 10


@pytest.fixture(scope="module")
def approximation():
    lam = poly_decay(D, 1.0)
    a, _ = symmetric(lam, seed=3)
    res = sketched_eigh(lambda x: a @ x, D, K, mode="hmt", kind="gaussian", seed=1)
    return a, res.eigenvalues, res.eigenvectors


def _estimate(a, lam, u, n_probes, seed, block=None):
    omega = RandomTestMatrix("gaussian", seed, "probe", (D, n_probes)).to_dense()
    image = a @ omega
    block = block or D
    cuts = range(0, D, block)
    coef = sum(probe_coefficients(u[r : r + block], omega[r : r + block]) for r in cuts)
    partials = sum(
        probe_residual_partials(u[r : r + block], lam, coef, image[r : r + block]) for r in cuts
    )
    return finalize_error_estimate(partials)


def test_estimate_is_unbiased_and_block_invariant(approximation):
    a, lam, u = approximation
    true = np.linalg.norm(a - reconstruct(lam, u)) ** 2
    est = _estimate(a, lam, u, 3000, seed=0)
    assert est.err2 == pytest.approx(true, rel=0.05)
    assert est.frob2 == pytest.approx(np.linalg.norm(a) ** 2, rel=0.05)
    assert est.frob2_approx == pytest.approx(np.sum(lam**2), rel=0.05)
    assert est.per_probe.shape == (3, 3000)
    blocked = _estimate(a, lam, u, 3000, seed=0, block=41)
    np.testing.assert_allclose(blocked.per_probe, est.per_probe, rtol=1e-10)


def test_estimate_of_an_exact_approximation_is_zero():
    lam = np.zeros(D)
    lam[:4] = [3.0, -2.0, 1.0, -0.5]
    a, _ = symmetric(lam, seed=0)
    res = sketched_eigh(lambda x: a @ x, D, 6, mode="recycled", s=12, n_probes=10)
    assert res.error.err2 < 1e-24 * res.error.frob2
    assert res.error.frob2 > 0


def test_truncated_estimates_reuse_the_same_probes(approximation):
    """Rank-r errors from the first r coefficients: no new HVPs (the seed re-measured them)."""
    a, lam, u = approximation
    omega = RandomTestMatrix("gaussian", 0, "probe", (D, 2000)).to_dense()
    image = a @ omega
    coef = probe_coefficients(u, omega)
    for r in (K, 5, 1):
        est = finalize_error_estimate(probe_residual_partials(u[:, :r], lam[:r], coef[:r], image))
        true = np.linalg.norm(a - reconstruct(lam[:r], u[:, :r])) ** 2
        assert est.err2 == pytest.approx(true, rel=0.08)


def test_failure_rates_below_the_tail_bounds():
    """Rank-one residual (the worst case, err_q²/err² ~ χ²_q/q) over 400 probe sets."""
    q, eps = 10, 0.5
    v = np.random.default_rng(0).standard_normal(60)
    err2 = float(v @ v) ** 2
    u = np.zeros((60, 1))
    under = over = 0
    trials = 400
    for seed in range(trials):
        omega = RandomTestMatrix("gaussian", seed, "probe", (60, q)).to_dense()
        image = np.outer(v, v @ omega)  # (v vᵀ) ω
        partials = probe_residual_partials(u, np.zeros(1), np.zeros((1, q)), image)
        est = finalize_error_estimate(partials).err2
        under += est <= (1 - eps) * err2
        over += est >= (1 + eps) * err2
    p_under, p_over = error_tail_bounds(q, eps)
    assert under / trials <= p_under
    assert over / trials <= p_over


def test_tail_bound_values():
    np.testing.assert_allclose(error_tail_bounds(30, 0.5), (0.0553, 0.2421), atol=5e-4)
    np.testing.assert_allclose(
        error_tail_bounds(30, 0.5, is_complex=True), (0.0031, 0.0586), atol=5e-4
    )
    assert error_tail_bounds(5, 1.0)[0] == 0.0
    assert error_tail_bounds(3, 0.0) == (1.0, 1.0)
    with pytest.raises(UserInputError, match="rel_err"):
        error_tail_bounds(3, 1.5)
    with pytest.raises(UserInputError, match="n_probes"):
        error_tail_bounds(0, 0.5)


def test_scree_bounds_bracket_the_true_scree(approximation):
    a, lam, u = approximation
    true_lam = poly_decay(D, 1.0)
    err = np.linalg.norm(a - reconstruct(lam, u))
    norm = np.linalg.norm(a)
    b = scree_bounds(lam, err, norm_frob=norm)
    true = np.array([tail_energy(true_lam, r) for r in range(K + 1)]) / norm**2
    assert np.all(b.lower_strict <= true + 1e-12) and np.all(true <= b.upper + 1e-12)
    assert np.all(b.lower_strict <= b.lower) and np.all(b.lower <= b.upper)
    assert np.all(np.diff(b.lower) <= 0) and np.all(np.diff(b.upper) <= 0)
    default = scree_bounds(lam, err)
    assert default.lower[0] == pytest.approx(1.0) and default.lower[-1] == 0.0


def test_scree_bounds_validation():
    with pytest.raises(UserInputError, match="magnitude"):
        scree_bounds(np.array([1.0, -2.0]), 0.1)
    with pytest.raises(UserInputError, match="err_frob"):
        scree_bounds(np.array([2.0, 1.0]), -0.1)
