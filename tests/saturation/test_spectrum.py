"""Spectra: planted ranks under both rules, closed forms, and the PCA projection invariants."""

import itertools
import math

import numpy as np
import pytest
import torch

from curvlake.errors import UserInputError
from curvlake.pipelines.saturation import (
    Moments,
    covariance_spectrum,
    cumulative_explained_variance,
    delta_projection,
    explained_variance_ratio,
    intrinsic_dimension,
    project_features,
    projection_matrix,
    random_projection_matrix,
    saturation_statistics,
)
from tests.saturation.cases import planted_rank


@pytest.mark.parametrize(("rank", "dim"), [(1, 16), (10, 64), (40, 64), (64, 128), (99, 128)])
def test_planted_rank_textbook_r_delve_r_minus_1(rank, dim):
    """Equal eigenvalues with delta * r not an integer: k* = ceil(0.99 r) = r for r < 100."""
    moments = Moments.from_batch(planted_rank(400, rank, dim, seed=rank, equal=True))
    textbook = saturation_statistics(moments, delta=0.99, rule="textbook", ddof=0)
    delve = saturation_statistics(moments, delta=0.99, rule="delve", ddof=0)
    assert textbook.intrinsic_dimension == rank
    assert delve.intrinsic_dimension == rank - 1
    assert textbook.saturation == rank / dim
    np.testing.assert_allclose(textbook.eigenvalues[:rank], 1.0, atol=1e-10)
    np.testing.assert_allclose(textbook.eigenvalues[rank:], 0.0, atol=1e-10)


@pytest.mark.parametrize(("rank", "dim"), [(150, 160), (180, 192)])
def test_planted_large_rank_is_ceil_delta_r(rank, dim):
    moments = Moments.from_batch(planted_rank(300, rank, dim, seed=rank, equal=True))
    expected = math.ceil(0.99 * rank)
    assert saturation_statistics(moments, delta=0.99, ddof=0).intrinsic_dimension == expected
    assert (
        saturation_statistics(moments, delta=0.99, rule="delve", ddof=0).intrinsic_dimension
        == expected - 1
    )


@pytest.mark.parametrize(
    ("rank", "textbook", "delve"), [(10, 10, 9), (50, 50, 49), (100, 99, 98), (200, 198, 197)]
)
def test_exactly_equal_eigenvalues_in_256_dims(rank, textbook, delve):
    """The research note's delve figures 9 / 49 / 98 / 197 (exact ties: p_k == delta counts)."""
    values = np.r_[np.ones(rank), np.zeros(256 - rank)]
    assert intrinsic_dimension(values, 0.99) == textbook
    assert intrinsic_dimension(values, 0.99, rule="delve") == delve


@pytest.mark.parametrize("delta", [0.5, 0.9, 0.95, 0.99, 0.999])
def test_geometric_spectrum_closed_form(delta):
    q, d = 0.8, 60
    values = q ** np.arange(d)
    # p_k = (1 - q^k) / (1 - q^d) >= delta  <=>  k >= log(1 - delta (1 - q^d)) / log q
    bound = math.log(1 - delta * (1 - q**d)) / math.log(q)
    assert abs(bound - round(bound)) > 1e-6
    assert intrinsic_dimension(values, delta) == math.ceil(bound)
    assert intrinsic_dimension(values, delta, rule="delve") == math.ceil(bound) - 1


def test_delve_rule_ignores_its_own_gap_extension():
    """p = (0.5, 0.95, 1): delta - p_2 = 0.04 > 0.02, yet delve still counts 2."""
    values = np.array([0.5, 0.45, 0.05])
    assert intrinsic_dimension(values, 0.99) == 3
    assert intrinsic_dimension(values, 0.99, rule="delve") == 2


def test_delve_rule_has_no_minimum_of_one():
    """delve's "at least one dimension" branch slices an empty matrix: a dominant first
    eigenvalue gives 0."""
    values = np.array([10.0, 0.01, 0.0])
    assert intrinsic_dimension(values, 0.99) == 1
    assert intrinsic_dimension(values, 0.99, rule="delve") == 0


def test_degenerate_spectra_and_delta_at_least_one():
    zeros = np.zeros(5)
    assert intrinsic_dimension(zeros, 0.99) == 0
    assert intrinsic_dimension(zeros, 0.99, rule="delve") == 0
    values = np.array([3.0, 1.0, 0.0, 0.0])
    assert intrinsic_dimension(values, 1.0) == 4
    assert intrinsic_dimension(values, 3.0) == 4
    assert intrinsic_dimension(values, 3.0, rule="delve") == 4
    assert intrinsic_dimension(values, 1e-9) == 1


def test_ratios():
    values = np.array([3.0, 1.0, 0.0])
    np.testing.assert_allclose(explained_variance_ratio(values), [0.75, 0.25, 0.0])
    np.testing.assert_allclose(cumulative_explained_variance(values), [0.75, 1.0, 1.0])
    assert cumulative_explained_variance(values)[-1] == 1.0
    np.testing.assert_array_equal(cumulative_explained_variance(np.zeros(3)), 1.0)


def test_spectrum_is_descending_nonnegative_and_ddof_only_scales():
    x = planted_rank(50, 3, 8, seed=2)
    moments = Moments.from_batch(x)
    spectrum = covariance_spectrum(moments.covariance(ddof=0))
    assert np.all(np.diff(spectrum.eigenvalues) <= 0) and np.all(spectrum.eigenvalues >= 0)
    cov = moments.covariance(ddof=0)
    v, lam = spectrum.eigenvectors, spectrum.eigenvalues
    np.testing.assert_allclose(v @ np.diag(lam) @ v.T, cov, atol=1e-10)
    s0 = saturation_statistics(moments, delta=0.9, ddof=0)
    s1 = saturation_statistics(moments, delta=0.9, ddof=1)
    assert s0.intrinsic_dimension == s1.intrinsic_dimension == 3
    assert (s0.ddof, s1.ddof, s0.n_samples) == (0, 1, 50)
    np.testing.assert_allclose(s1.trace * 49, s0.trace * 50)
    np.testing.assert_allclose(s0.trace, np.trace(np.cov(x, rowvar=False, ddof=0)))


def test_bad_delta_and_rule():
    values = np.ones(3)
    for delta in (0, -0.5, float("nan"), "0.9", True):
        with pytest.raises(UserInputError, match="delta"):
            intrinsic_dimension(values, delta)
    with pytest.raises(UserInputError, match="rule"):
        intrinsic_dimension(values, 0.9, rule="phdlab")


# -- PCA projections ---------------------------------------------------------------------------


def test_projection_matrix_is_an_orthogonal_projector():
    v = covariance_spectrum(np.cov(planted_rank(40, 6, 6, seed=0), rowvar=False)).eigenvectors
    p = projection_matrix(v, 3)
    np.testing.assert_allclose(p @ p, p, atol=1e-12)
    np.testing.assert_allclose(p, p.T, atol=0)
    assert np.isclose(np.trace(p), 3)
    assert np.array_equal(projection_matrix(v, 6), np.eye(6))
    assert not projection_matrix(v, 0).any()
    with pytest.raises(UserInputError, match="rank"):
        projection_matrix(v, 7)


def test_random_projection_is_seeded_orthonormal_same_rank():
    p = random_projection_matrix(10, 4, seed=[7, 2])
    np.testing.assert_allclose(p @ p, p, atol=1e-12)
    np.testing.assert_allclose(p, p.T, atol=1e-15)
    assert np.linalg.matrix_rank(p) == 4 and np.isclose(np.trace(p), 4)
    np.testing.assert_array_equal(p, random_projection_matrix(10, 4, seed=[7, 2]))
    assert not np.allclose(p, random_projection_matrix(10, 4, seed=[7, 3]))
    assert np.array_equal(random_projection_matrix(10, 10, seed=0), np.eye(10))


def test_delta_at_least_one_leaves_features_unchanged():
    x = torch.randn(3, 4, 5, 5)
    spectrum = covariance_spectrum(np.cov(np.random.default_rng(0).normal(size=(30, 4)).T))
    for rule in ("textbook", "delve"):
        p, k = delta_projection(spectrum, 3.0, rule)
        assert k == 4 and np.array_equal(p, np.eye(4))
        assert project_features(x, np.ones(4), p) is x


def test_planted_rank_layer_is_kept_by_its_delta_eigenspace():
    x = planted_rank(300, 4, 10, seed=5, offset=3.0)
    moments = Moments.from_batch(x)
    spectrum = covariance_spectrum(moments.covariance(ddof=0))
    p, k = delta_projection(spectrum, 0.99)
    assert k == 4
    np.testing.assert_allclose(project_features(x, moments.mean, p), x, atol=1e-10)
    # centering matters: projecting without the mean would move the rows
    assert np.abs(x @ p - x).max() > 1e-3


def test_reconstruction_error_falls_with_delta_and_pca_beats_random():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 12)) * 0.7 ** np.arange(12)
    moments = Moments.from_batch(x)
    spectrum = covariance_spectrum(moments.covariance(ddof=0))
    errors = []
    for delta in (0.5, 0.8, 0.9, 0.99, 0.999, 1.0):
        p, k = delta_projection(spectrum, delta)
        error = np.sum((project_features(x, moments.mean, p) - x) ** 2)
        errors.append(error)
        random_p = random_projection_matrix(12, k, seed=[0, k])
        assert error <= np.sum((project_features(x, moments.mean, random_p) - x) ** 2) + 1e-9
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(errors))
    assert errors[-1] == 0


def test_channelwise_projection_matches_rows_and_numpy_matches_torch():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 5, 3, 4))
    mean = rng.normal(size=5)
    p = random_projection_matrix(5, 2, seed=1)
    out = project_features(x, mean, p)
    rows = x.transpose(0, 2, 3, 1).reshape(-1, 5)
    expected = ((rows - mean) @ p + mean).reshape(2, 3, 4, 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    out_t = project_features(torch.tensor(x), mean, p)
    assert out_t.dtype == torch.float64
    np.testing.assert_allclose(out_t.numpy(), expected, atol=1e-12)
    flat_p = random_projection_matrix(60, 7, seed=2)
    flat = project_features(x, np.zeros(60), flat_p, conv_method="flatten")
    np.testing.assert_allclose(flat.reshape(2, -1), x.reshape(2, -1) @ flat_p, atol=1e-12)
    with pytest.raises(UserInputError, match="dimensions"):
        project_features(x, mean, flat_p)
