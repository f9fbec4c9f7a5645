"""Moments: exact merging (chunk / order invariance), offset robustness, conv reshaping."""

import itertools
import pickle

import numpy as np
import pytest
import torch

from curvlake.errors import UserInputError
from curvlake.pipelines.saturation import (
    Moments,
    conv_features,
    merge_moments,
    saturation_statistics,
    sequence_features,
)
from tests.saturation.cases import planted_rank


@pytest.fixture
def rows() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.normal(size=(97, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)


def _sequential(x: np.ndarray, chunk: int) -> Moments:
    moments = Moments.empty(x.shape[1])
    for start in range(0, len(x), chunk):
        moments.update(x[start : start + chunk])
    return moments


@pytest.mark.parametrize("chunk", [1, 7, 97])
def test_chunked_updates_equal_np_cov(rows, chunk):
    moments = _sequential(rows, chunk)
    assert moments.count == len(rows)
    np.testing.assert_allclose(moments.mean, rows.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        moments.covariance(ddof=0), np.cov(rows, rowvar=False, ddof=0), rtol=0, atol=1e-10
    )
    np.testing.assert_allclose(
        moments.covariance(ddof=1), np.cov(rows, rowvar=False), rtol=0, atol=1e-10
    )


def test_tree_merge_of_shuffled_chunks_equals_sequential(rows):
    order = np.random.default_rng(0).permutation(len(rows))
    cuts = [0, 1, 8, 9, 30, 64, 97]
    parts = [Moments.from_batch(rows[order[a:b]]) for a, b in itertools.pairwise(cuts)]
    merged = merge_moments(parts[::-1])
    sequential = _sequential(rows, 7)
    assert merged.count == sequential.count
    np.testing.assert_allclose(merged.mean, sequential.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged.m2, sequential.m2, rtol=0, atol=1e-10)


def test_merge_is_pure_and_empty_is_identity(rows):
    a, b = Moments.from_batch(rows[:40]), Moments.from_batch(rows[40:])
    a_m2 = a.m2.copy()
    a.merge(b)
    np.testing.assert_array_equal(a.m2, a_m2)
    same = a.merge(Moments.empty(6))
    assert same.count == a.count and np.array_equal(same.m2, a.m2)
    assert Moments.empty(6).merge(a).count == a.count


def test_count_is_every_row_after_many_batches(rows):
    """Regression guard for delve >= 0.1.45, which keeps only the last batch of an epoch."""
    moments = _sequential(rows, 16)
    assert moments.count == len(rows)


def test_offset_of_1e6_changes_only_the_mean():
    x = planted_rank(500, 5, 12, seed=1)
    plain = Moments.from_batch(x[:250]).merge(Moments.from_batch(x[250:]))
    shifted = Moments.from_batch(x[:250] + 1e6).merge(Moments.from_batch(x[250:] + 1e6))
    np.testing.assert_allclose(
        shifted.covariance(ddof=0), plain.covariance(ddof=0), rtol=0, atol=1e-8
    )
    # raw moments (delve's S/n - mu mu^T) lose the covariance entirely at this offset
    y = x + 1e6
    raw = y.T @ y / len(y) - np.outer(y.mean(axis=0), y.mean(axis=0))
    assert np.abs(raw - plain.covariance(ddof=0)).max() > 1e-4
    for rule in ("textbook", "delve"):
        a = saturation_statistics(plain, delta=0.99, rule=rule, ddof=0)
        b = saturation_statistics(shifted, delta=0.99, rule=rule, ddof=0)
        assert a.intrinsic_dimension == b.intrinsic_dimension
        assert a.saturation == b.saturation


def test_torch_batches_are_cast_to_float64(rows):
    x32 = torch.tensor(rows, dtype=torch.float32)
    from_torch = Moments.from_batch(x32[:50]).update(x32[50:])
    from_numpy = _sequential(x32.double().numpy(), 50)
    assert from_torch.mean.dtype == np.float64
    np.testing.assert_allclose(from_torch.m2, from_numpy.m2, rtol=0, atol=1e-10)


def test_float64_torch_batches_are_left_as_they_were(rows):
    """The batch is centred in place only on a private copy, never the caller's tensor."""
    x = torch.tensor(rows, dtype=torch.float64)
    before = x.clone()
    moments = Moments.from_batch(x[10:])
    assert torch.equal(x, before)
    np.testing.assert_allclose(moments.m2, _sequential(rows[10:], len(rows)).m2, rtol=0, atol=1e-10)


def test_arrays_round_trip_and_pickle(rows):
    moments = Moments.from_batch(rows)
    arrays = moments.to_arrays()
    assert arrays["count"].dtype == np.int64 and arrays["m2"].shape == (6, 6)
    back = Moments.from_arrays(**arrays)
    np.testing.assert_array_equal(back.m2, moments.m2)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(moments)).mean, moments.mean)


def test_bad_inputs_raise():
    with pytest.raises(UserInputError, match="cannot merge"):
        Moments.empty(3).merge(Moments.empty(4))
    with pytest.raises(UserInputError, match="ddof=1"):
        Moments.from_batch(np.ones((1, 2))).covariance(ddof=1)
    with pytest.raises(UserInputError, match="ddof"):
        Moments.from_batch(np.ones((3, 2))).covariance(ddof=-1)
    with pytest.raises(UserInputError, match=r"\(n, d\)"):
        Moments.from_batch(np.ones((2, 3, 4)))
    with pytest.raises(UserInputError, match="merge_moments"):
        merge_moments([])


def test_channelwise_equals_positions_as_rows():
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    expected = x.numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
    np.testing.assert_array_equal(conv_features(x, "channelwise").numpy(), expected)
    np.testing.assert_array_equal(conv_features(x.numpy(), "channelwise"), expected)
    moments = Moments.from_batch(conv_features(x, "channelwise"))
    np.testing.assert_allclose(
        moments.covariance(ddof=0), np.cov(expected, rowvar=False, ddof=0), atol=1e-12
    )


@pytest.mark.parametrize(
    ("method", "reference"),
    [
        ("mean", lambda a: a.mean(axis=(2, 3))),
        ("max", lambda a: a.max(axis=(2, 3))),
        ("flatten", lambda a: a.reshape(a.shape[0], -1)),
    ],
)
def test_pooled_and_flattened_conv_features(method, reference):
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(conv_features(x, method).numpy(), reference(x.numpy()), atol=1e-6)
    np.testing.assert_allclose(conv_features(x.numpy(), method), reference(x.numpy()), atol=1e-6)


def test_conv1d_outputs_and_linear_outputs():
    x = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)
    assert conv_features(x, "channelwise").shape == (8, 3)
    flat = np.ones((5, 7))
    assert conv_features(flat, "max") is flat
    with pytest.raises(UserInputError, match="conv_method"):
        conv_features(x, "median")


def test_sequence_features():
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(sequence_features(x), x[:, -1, :])
    assert sequence_features(x, "timestepwise").shape == (2, 12)
