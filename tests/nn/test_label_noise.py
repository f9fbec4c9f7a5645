import numpy as np
import pytest
from scipy import stats

from curvlake.errors import UserInputError
from curvlake.nn.label_noise import apply_label_noise


@pytest.mark.parametrize(("n", "fraction"), [(1000, 0.2), (999, 0.15), (10, 0.25), (7, 1.0)])
def test_exact_count_and_always_another_class(n, fraction):
    labels = np.random.default_rng(0).integers(0, 10, n)
    noisy = apply_label_noise(labels, 10, fraction, seed=1)
    changed = noisy != labels
    assert changed.sum() == round(fraction * n)
    assert noisy.dtype == np.int64 and noisy.min() >= 0 and noisy.max() < 10
    np.testing.assert_array_equal(labels, np.random.default_rng(0).integers(0, 10, n))  # input kept


def test_zero_fraction_is_a_copy():
    labels = np.arange(5)
    noisy = apply_label_noise(labels, 5, 0.0, seed=0)
    np.testing.assert_array_equal(noisy, labels)
    assert noisy is not labels


def test_reproducible_and_seed_dependent():
    labels = np.random.default_rng(0).integers(0, 10, 500)
    a = apply_label_noise(labels, 10, 0.3, seed=42)
    np.testing.assert_array_equal(a, apply_label_noise(labels, 10, 0.3, seed=42))
    assert not np.array_equal(a, apply_label_noise(labels, 10, 0.3, seed=43))


def test_new_class_uniform_over_the_others():
    k = 5
    labels = np.zeros(20_000, dtype=np.int64)
    noisy = apply_label_noise(labels, k, 1.0, seed=3)
    counts = np.bincount(noisy, minlength=k)
    assert counts[0] == 0
    # chi-square goodness of fit to uniform over classes 1..4; a loose threshold
    assert stats.chisquare(counts[1:]).pvalue > 1e-4


def test_positions_uniform():
    labels = np.zeros(100, dtype=np.int64)
    hits = np.zeros(100)
    for seed in range(300):
        hits += apply_label_noise(labels, 3, 0.1, seed=seed) != labels
    assert stats.chisquare(hits).pvalue > 1e-4


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), True, "0.2"])
def test_rejects_bad_fraction(fraction):
    with pytest.raises(UserInputError, match=r"\[0, 1\]"):
        apply_label_noise(np.zeros(3, int), 2, fraction, seed=0)


def test_rejects_bad_labels_seed_and_classes():
    with pytest.raises(UserInputError, match="lie in"):
        apply_label_noise(np.array([0, 3]), 3, 0.5, seed=0)
    with pytest.raises(UserInputError, match="seed"):
        apply_label_noise(np.array([0, 1]), 2, 0.5, seed=None)
    with pytest.raises(UserInputError, match="at least 2 classes"):
        apply_label_noise(np.zeros(4, int), 1, 0.5, seed=0)
