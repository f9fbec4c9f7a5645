"""BlockedInverseFisher against the dense inverse of the block-diagonal Fisher."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from curvlake.errors import UserInputError
from curvlake.pipelines.mfac import BlockedInverseFisher, InverseFisher
from tests._markers import requires_cupy
from tests.mfac.cases import block_diagonal_inverse, relative_error, window

# d = 50: every block size leaves a short tail; 4 < m (direct s × s form), 8 and 16 >= m
# (Woodbury form), 50 is one block, 64 one block wider than the window.
BLOCK_SIZES = [1, 4, 8, 16, 50, 64]


@pytest.mark.parametrize("damp", [1e-1, 1e-5])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_blocked_matches_dense_block_diagonal_inverse(block_size, damp):
    grads = window(7, 50)
    dense = block_diagonal_inverse(grads, damp, block_size)
    inv = BlockedInverseFisher(grads, damp, block_size)
    x = np.random.default_rng(0).normal(size=(50, 3))
    assert relative_error(inv @ x, dense @ x) < 1e-8
    assert relative_error(inv @ x[:, 0], dense @ x[:, 0]) < 1e-8
    assert relative_error(inv.diagonal(), np.diag(dense)) < 1e-8
    picked = [0, 3, 9, 48, 49, 3 if block_size > 4 else 2]
    assert relative_error(inv.submatrix(picked), dense[np.ix_(picked, picked)]) < 1e-8
    assert inv.entry(1, 49) == pytest.approx(dense[1, 49], abs=1e-8 * np.abs(dense).max())


def test_one_block_equals_the_full_inverse():
    grads = window(5, 30)
    x = np.arange(30.0)
    np.testing.assert_allclose(
        BlockedInverseFisher(grads, 1e-3, 30) @ x, InverseFisher(grads, 1e-3) @ x, rtol=1e-10
    )


@pytest.mark.parametrize("chunk_size", [8, 16, 24, 56])
def test_blocked_is_invariant_to_chunking(chunk_size):
    grads = window(6, 50)
    x = np.random.default_rng(1).normal(size=50)
    reference = BlockedInverseFisher(grads, 1e-4, 8, chunk_size=64)
    chunked = BlockedInverseFisher(grads, 1e-4, 8, chunk_size=chunk_size)
    lazy = BlockedInverseFisher(da.from_array(grads, chunks=(6, chunk_size)), 1e-4, 8)
    for inv in (chunked, lazy):
        np.testing.assert_allclose(np.asarray(inv @ x), reference @ x, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(inv.diagonal()), reference.diagonal(), rtol=1e-12)
    assert isinstance(lazy @ x, da.Array)


def test_chunks_must_be_block_aligned():
    grads = window(4, 30)
    with pytest.raises(UserInputError, match="multiples of block_size=8"):
        BlockedInverseFisher([grads[:, :10], grads[:, 10:]], 1e-3, 8)
    with pytest.raises(UserInputError, match="rechunk"):
        BlockedInverseFisher(da.from_array(grads, chunks=(4, 10)), 1e-3, 8)
    with pytest.raises(UserInputError, match="block_size"):
        BlockedInverseFisher(grads, 1e-3, 0)


def test_blocked_all_zero_window():
    inv = BlockedInverseFisher(np.zeros((3, 10)), 0.25, 4)
    np.testing.assert_array_equal(inv @ np.ones(10), np.full(10, 4.0))
    np.testing.assert_array_equal(inv.diagonal(), np.full(10, 4.0))


@requires_cupy
def test_blocked_cupy_matches_numpy():
    import cupy

    grads = window(7, 50)
    x = np.arange(50.0)
    for block_size in (4, 16):
        host = BlockedInverseFisher(grads, 1e-3, block_size)
        device = BlockedInverseFisher(cupy.asarray(grads), 1e-3, block_size)
        np.testing.assert_allclose(cupy.asnumpy(device @ cupy.asarray(x)), host @ x, rtol=1e-10)
        np.testing.assert_allclose(cupy.asnumpy(device.diagonal()), host.diagonal(), rtol=1e-10)
