"""Probes: scikit-learn parity, block invariance, separable / shuffled labels, standardization."""

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from curvlake.errors import UserInputError
from curvlake.pipelines.saturation import (
    LossGrad,
    Moments,
    accuracy,
    block_correct,
    block_loss_grad,
    fit_probe,
    merge_moments,
    standardization,
)


def _classes(n: int, d: int, k: int, seed: int, margin: float = 1.0):
    """Gaussian clusters around ``k`` random centres, offset and rescaled per feature."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * margin
    y = np.arange(n) % k
    rng.shuffle(y)
    x = centres[y] + rng.normal(size=(n, d))
    return x * rng.uniform(0.5, 4.0, size=d) + rng.normal(size=d) * 10, y


def _streamed_moments(x: np.ndarray, rows: int) -> Moments:
    moments = Moments.empty(x.shape[1])
    for start in range(0, len(x), rows):
        moments.update(x[start : start + rows])
    return moments


def _summed(x, y, mean, std, rows):
    def loss_grad(coef, intercept):
        total = None
        for start in range(0, len(x), rows):
            part = block_loss_grad(
                coef, intercept, x[start : start + rows], y[start : start + rows], mean, std
            )
            total = part if total is None else total + part
        return total

    return loss_grad


def _fit(x, y, k, rows=7, **options):
    mean, std = standardization(_streamed_moments(x, rows))
    fit = fit_probe(_summed(x, y, mean, std, rows), x.shape[1], k, **options)
    return fit, mean, std


@pytest.mark.parametrize(("k", "C"), [(2, 1.0), (3, 1.0), (4, 0.1), (3, 10.0)])
def test_same_optimum_as_sklearn_on_standardized_features(k, C):
    x, y = _classes(150, 5, k, seed=k)
    fit, mean, std = _fit(x, y, k, C=C, tol=1e-10, max_iter=1000)
    z = StandardScaler().fit_transform(x)
    sk = LogisticRegression(C=C, tol=1e-10, max_iter=1000).fit(z, y)
    assert fit.converged and fit.coef.shape == sk.coef_.shape
    np.testing.assert_allclose(fit.coef, sk.coef_, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fit.intercept, sk.intercept_, rtol=0, atol=1e-4)
    assert accuracy(fit.coef, fit.intercept, x, y, mean, std) == sk.score(z, y)


def test_default_options_match_sklearn_defaults_too():
    x, y = _classes(120, 4, 3, seed=9)
    fit, _, _ = _fit(x, y, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = LogisticRegression().fit(StandardScaler().fit_transform(x), y)
    assert fit.n_iter == sk.n_iter_[0]
    np.testing.assert_allclose(fit.coef, sk.coef_, rtol=0, atol=1e-4)


def test_blocks_of_7_and_50_rows_give_the_same_optimum():
    x, y = _classes(200, 6, 3, seed=1)
    small, _, _ = _fit(x, y, 3, rows=7, tol=1e-10, max_iter=1000)
    large, _, _ = _fit(x, y, 3, rows=50, tol=1e-10, max_iter=1000)
    np.testing.assert_allclose(small.coef, large.coef, rtol=0, atol=1e-8)
    np.testing.assert_allclose(small.intercept, large.intercept, rtol=0, atol=1e-8)


def test_offset_of_1e6_leaves_the_probe_unchanged():
    x, y = _classes(150, 4, 3, seed=2)
    plain, _, _ = _fit(x, y, 3, tol=1e-10, max_iter=1000)
    shifted, _, _ = _fit(x + 1e6, y, 3, tol=1e-10, max_iter=1000)
    np.testing.assert_allclose(shifted.coef, plain.coef, rtol=0, atol=1e-6)


def test_separable_classes_are_learned():
    x, y = _classes(600, 8, 4, seed=3, margin=8.0)
    fit, mean, std = _fit(x[:300], y[:300], 4, rows=64)
    assert accuracy(fit.coef, fit.intercept, x[:300], y[:300], mean, std) == 1.0
    assert accuracy(fit.coef, fit.intercept, x[300:], y[300:], mean, std) >= 0.99


def test_shuffled_labels_give_chance_on_held_out_data():
    k = 4
    x, y = _classes(2400, 6, k, seed=4, margin=8.0)
    y = np.random.default_rng(5).permutation(y)
    fit, mean, std = _fit(x[:400], y[:400], k, rows=100)
    held_out = accuracy(fit.coef, fit.intercept, x[400:], y[400:], mean, std)
    assert abs(held_out - 1 / k) < 0.05


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(9, 3)), rng.integers(0, 3, size=9)
    mean, std = np.zeros(3), np.ones(3)
    for coef, intercept in (
        (rng.normal(size=(3, 3)), rng.normal(size=3)),
        (rng.normal(size=(1, 3)), rng.normal(size=1)),
    ):
        labels = y if coef.shape[0] == 3 else y % 2
        result = block_loss_grad(coef, intercept, x, labels, mean, std)
        step = 1e-6
        for index in np.ndindex(coef.shape):
            bumped = coef.copy()
            bumped[index] += step
            up = block_loss_grad(bumped, intercept, x, labels, mean, std).loss
            bumped[index] -= 2 * step
            down = block_loss_grad(bumped, intercept, x, labels, mean, std).loss
            assert np.isclose((up - down) / (2 * step), result.grad_coef[index], atol=1e-6)
        assert result.grad_intercept.shape == intercept.shape


def test_blocks_add_up():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(20, 3)), rng.integers(0, 3, size=20)
    coef, intercept = rng.normal(size=(3, 3)), rng.normal(size=3)
    args = (np.zeros(3), np.ones(3))
    whole = block_loss_grad(coef, intercept, x, y, *args)
    parts = block_loss_grad(coef, intercept, x[:6], y[:6], *args) + block_loss_grad(
        coef, intercept, x[6:], y[6:], *args
    )
    assert isinstance(parts, LossGrad) and parts.count == 20
    assert np.isclose(parts.loss, whole.loss)
    np.testing.assert_allclose(parts.grad_coef, whole.grad_coef, atol=1e-12)
    assert block_correct(coef, intercept, x, y, *args)[1] == 20


def test_standardization_is_standard_scalers():
    rng = np.random.default_rng(8)
    x = np.c_[rng.normal(size=(50, 3)) * 3 + 2, np.full(50, 7.0), np.full(50, 1e6)]
    mean, std = standardization(_streamed_moments(x, 9))
    scaler = StandardScaler().fit(x)
    np.testing.assert_allclose(mean, scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(std, scaler.scale_, rtol=1e-10)
    assert std[3] == std[4] == 1.0


def test_bad_arguments():
    def loss_grad(coef, intercept):
        raise AssertionError("not reached")

    for kwargs, match in (
        ({"n_classes": 1}, "n_classes"),
        ({"C": 0.0}, "C must"),
        ({"tol": -1.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
    ):
        options = {"n_features": 3, "n_classes": 3, **kwargs}
        with pytest.raises(UserInputError, match=match):
            fit_probe(loss_grad, **options)


def test_moments_and_loss_as_dask_reductions_over_blocks():
    """The intended out-of-core use: every pass is a reduction over the blocks of a Dask array."""
    import dask
    import dask.array as da

    x, y = _classes(210, 5, 3, seed=10)
    xd, yd = da.from_array(x, chunks=(40, 5)), da.from_array(y, chunks=40)
    x_blocks, y_blocks = xd.to_delayed().ravel(), yd.to_delayed().ravel()
    with dask.config.set(scheduler="synchronous"):
        parts = dask.compute(*[dask.delayed(Moments.from_batch)(b) for b in x_blocks])
        mean, std = standardization(merge_moments(parts))

        def loss_grad(coef, intercept):
            blocks = [
                dask.delayed(block_loss_grad)(coef, intercept, xb, yb, mean, std)
                for xb, yb in zip(x_blocks, y_blocks, strict=True)
            ]
            return dask.compute(dask.delayed(sum)(blocks[1:], blocks[0]))[0]

        fit = fit_probe(loss_grad, 5, 3, tol=1e-10, max_iter=1000)
    reference, _, _ = _fit(x, y, 3, tol=1e-10, max_iter=1000)
    np.testing.assert_allclose(fit.coef, reference.coef, rtol=0, atol=1e-8)
