"""Mask overlap, baseline, IoU and Grassmannian metrics; invariance to row blocking."""

import numpy as np
import pytest
import scipy.linalg

from curvlake.errors import UserInputError
from curvlake.pipelines.hessian.overlap import (
    check_mask,
    cross_gram_partial,
    grassmann_metrics,
    iou_from_overlap,
    mask_energy_partial,
    mask_gram_partial,
    mask_iou,
    mask_overlap,
    nested_overlap_curve,
    overlap_curve,
    principal_angles,
    principal_angles_from_gram,
    principal_angles_from_mask_gram,
    random_overlap_baseline,
    ranked_mask_energy_partial,
)
from tests.hessian.cases import random_orthogonal

D, K = 120, 8


def _basis(seed, k=K, dim=D):
    """Haar-random orthonormal ``dim × k`` (thin QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(np.random.default_rng([seed, 3]).standard_normal((dim, k)))
    return q * np.sign(np.diag(r))


def _mask(seed, m=K, dim=D):
    return np.sort(np.random.default_rng(seed).choice(dim, m, replace=False))


def _blocked(fn, u, block, *args):
    return sum(fn(u[r : r + block], *args, r) for r in range(0, u.shape[0], block))


def test_overlap_of_a_mask_with_its_own_coordinate_subspace_is_one():
    mask = _mask(0)
    u = np.zeros((D, K))
    u[mask, np.arange(K)] = 1.0
    np.testing.assert_allclose(mask_overlap(u, mask), 1.0)
    rot = random_orthogonal(K, 1)
    np.testing.assert_allclose(mask_overlap(u @ rot, mask)[-1], 1.0)
    np.testing.assert_allclose(
        principal_angles_from_mask_gram(mask_gram_partial(u @ rot, mask), K), 0.0, atol=1e-7
    )


def test_rotation_invariance():
    u, mask = _basis(2), _mask(3)
    rot = random_orthogonal(K, 4)
    np.testing.assert_allclose(
        mask_overlap(u @ rot, mask)[-1], mask_overlap(u, mask)[-1], rtol=1e-12
    )
    # rotations inside the leading 3 and trailing 5 columns keep the curve at k' = 3 and 8
    block_rot = scipy.linalg.block_diag(random_orthogonal(3, 5), random_orthogonal(5, 6))
    np.testing.assert_allclose(
        mask_overlap(u @ block_rot, mask)[[2, 7]], mask_overlap(u, mask)[[2, 7]], rtol=1e-12
    )
    v = _basis(7)
    angles = principal_angles_from_gram(cross_gram_partial(u, v))
    np.testing.assert_allclose(
        principal_angles_from_gram(cross_gram_partial(u @ rot, v)), angles, atol=1e-7
    )


def test_random_baseline_exact_over_a_partition_and_in_expectation():
    u = _basis(8)
    m = 10
    perm = np.random.default_rng(9).permutation(D)
    curves = [mask_overlap(u, np.sort(perm[i : i + m])) for i in range(0, D, m)]
    np.testing.assert_allclose(np.mean(curves, axis=0), random_overlap_baseline(m, D), rtol=1e-12)
    # Haar-random bases against one fixed mask
    mask = _mask(10, m=K)
    mean = np.mean([mask_overlap(_basis(100 + i), mask) for i in range(300)], axis=0)
    np.testing.assert_allclose(mean, K / D, rtol=0.25)
    assert mean[-1] == pytest.approx(K / D, rel=0.1)


def test_partials_are_invariant_to_row_blocking():
    u, v, mask = _basis(11), _basis(12, k=5), _mask(13, m=15)
    ranked = np.random.default_rng(14).permutation(mask)
    ref_energy = mask_energy_partial(u, mask)
    ref_gram = mask_gram_partial(u, mask)
    ref_cross = cross_gram_partial(u, v)
    ref_ranked = ranked_mask_energy_partial(u, ranked)
    for block in (1, 7, 50, D):
        np.testing.assert_allclose(
            _blocked(mask_energy_partial, u, block, mask), ref_energy, rtol=1e-12
        )
        np.testing.assert_allclose(
            _blocked(mask_gram_partial, u, block, mask), ref_gram, atol=1e-14
        )
        np.testing.assert_allclose(
            _blocked(ranked_mask_energy_partial, u, block, ranked), ref_ranked, rtol=1e-12
        )
        cross = sum(
            cross_gram_partial(u[r : r + block], v[r : r + block]) for r in range(0, D, block)
        )
        np.testing.assert_allclose(cross, ref_cross, atol=1e-14)
    np.testing.assert_allclose(overlap_curve(ref_energy), mask_overlap(u, mask))


def test_nested_curve_matches_the_seeds_loop():
    u = _basis(15)
    ranked = np.random.default_rng(16).permutation(D)[:K]  # e.g. parameters by |θ| descending
    expected = [np.sum(u[ranked[:k], :k] ** 2) / k for k in range(1, K + 1)]
    curve = nested_overlap_curve(_blocked(ranked_mask_energy_partial, u, 33, ranked))
    np.testing.assert_allclose(curve, expected, rtol=1e-12)


def test_iou():
    assert mask_iou([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(2 / 6)
    assert mask_iou([], []) == 1.0 and mask_iou([1], [2]) == 0.0
    m1, m2 = _mask(17, m=20), _mask(18, m=20)
    u2 = np.zeros((D, 20))
    u2[m2, np.arange(20)] = 1.0
    ov = mask_overlap(u2, m1)[-1]
    assert iou_from_overlap(ov) == pytest.approx(mask_iou(m1, m2))


def test_metrics_for_known_angles():
    a, b = 0.3, 1.1
    u1 = np.eye(6)[:, :2]
    u2 = np.zeros((6, 2))
    u2[[0, 2], 0] = [np.cos(a), np.sin(a)]
    u2[[1, 3], 1] = [np.cos(b), np.sin(b)]
    theta = principal_angles_from_gram(cross_gram_partial(u1, u2))
    np.testing.assert_allclose(theta, [a, b], atol=1e-12)
    np.testing.assert_allclose(principal_angles(u1, u2), [a, b], atol=1e-12)
    m = grassmann_metrics(theta)
    assert m.geodesic == pytest.approx(np.hypot(a, b))
    assert m.chordal == pytest.approx(np.hypot(2 * np.sin(a / 2), 2 * np.sin(b / 2)))
    assert m.chordal_max == pytest.approx(2 * np.sin(b / 2))
    assert m.projection == pytest.approx(np.hypot(np.sin(a), np.sin(b)))
    assert m.fubini_study == pytest.approx(np.arccos(np.cos(a) * np.cos(b)))
    assert m.mean_cos2 == pytest.approx((np.cos(a) ** 2 + np.cos(b) ** 2) / 2)
    diff = u1 @ u1.T - u2 @ u2.T
    assert m.projection == pytest.approx(np.linalg.norm(diff) / np.sqrt(2))
    assert m.projection_max == pytest.approx(np.linalg.norm(diff, 2))
    same = grassmann_metrics(np.zeros(3))
    assert same.geodesic == same.chordal == same.projection == same.fubini_study == 0.0


def test_mask_angles_agree_with_scipy_and_the_overlap():
    u, mask = _basis(19), _mask(20)
    coords = np.eye(D)[:, mask]
    theta = principal_angles_from_mask_gram(mask_gram_partial(u, mask), mask.size)
    np.testing.assert_allclose(theta, principal_angles(coords, u), atol=1e-7)
    assert grassmann_metrics(theta).mean_cos2 == pytest.approx(mask_overlap(u, mask)[-1], rel=1e-10)


def test_mask_validation():
    with pytest.raises(UserInputError, match="sorted"):
        check_mask([3, 1], 5)
    with pytest.raises(UserInputError, match="repeat"):
        check_mask([1, 1], 5)
    with pytest.raises(UserInputError, match=r"\[0, 5\)"):
        check_mask([1, 5], 5)
    with pytest.raises(UserInputError, match="int"):
        check_mask([0.5], 5)
    np.testing.assert_array_equal(check_mask([3, 1], 5, ranked=True), [3, 1])
