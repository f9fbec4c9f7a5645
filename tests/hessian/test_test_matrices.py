"""Counter-based test matrices: slice invariance, nesting, determinism; SSRFT algebra."""

import numpy as np
import pytest

from curvlake.errors import UserInputError
from curvlake.pipelines.hessian.test_matrices import (
    GENERATION_ROWS,
    RandomTestMatrix,
    generation_cell,
    iid_block,
    ssrft_adjoint,
    ssrft_columns,
    ssrft_forward,
)

IID = ("gaussian", "rademacher")
G = GENERATION_ROWS


@pytest.mark.parametrize("kind", IID)
def test_any_block_equals_the_slice_of_the_full_matrix(kind):
    om = RandomTestMatrix(kind, 5, "outer", (300, 12))
    full = om.to_dense()
    rng = np.random.default_rng(0)
    for _ in range(20):
        r0, r1 = np.sort(rng.integers(0, 301, 2))
        c0, c1 = np.sort(rng.integers(0, 13, 2))
        np.testing.assert_array_equal(om.block((r0, r1), (c0, c1)), full[r0:r1, c0:c1])


@pytest.mark.parametrize("kind", IID)
def test_blocks_across_generation_cells(kind):
    dim = G + 1000
    full = iid_block(kind, 3, 1, (0, dim), (0, 3))
    for r0, r1 in [(G - 500, G + 200), (G, G + 1), (G - 1, G), (17, dim)]:
        np.testing.assert_array_equal(iid_block(kind, 3, 1, (r0, r1), (1, 3)), full[r0:r1, 1:])
    # the second cell of a column is its own stream, not the continuation of the first
    np.testing.assert_array_equal(full[G:, 0], generation_cell(kind, 3, 1, 0, 1, stop=1000))
    assert not np.array_equal(full[G : G + 1000, 0], full[:1000, 0])


@pytest.mark.parametrize("kind", IID)
def test_full_matrix_independent_of_the_chunk_grid(kind):
    om = RandomTestMatrix(kind, 11, "inner_left", (257, 9))
    full = om.to_dense()
    for row_chunk, col_chunk in [(1, 9), (64, 2), (100, 4), (257, 1)]:
        rows = [
            np.concatenate(
                [
                    om.block((r, min(r + row_chunk, 257)), (c, min(c + col_chunk, 9)))
                    for c in range(0, 9, col_chunk)
                ],
                axis=1,
            )
            for r in range(0, 257, row_chunk)
        ]
        np.testing.assert_array_equal(np.concatenate(rows, axis=0), full)


@pytest.mark.parametrize("kind", (*IID, "ssrft"))
def test_columns_are_nested_and_deterministic(kind):
    big = RandomTestMatrix(kind, 2, "inner_right", (200, 40)).to_dense()
    small = RandomTestMatrix(kind, 2, "inner_right", (200, 7)).to_dense()
    np.testing.assert_array_equal(small, big[:, :7])
    np.testing.assert_array_equal(big, RandomTestMatrix(kind, 2, 1, (200, 40)).to_dense())
    assert not np.allclose(big, RandomTestMatrix(kind, 3, "inner_right", (200, 40)).to_dense())
    assert not np.allclose(big, RandomTestMatrix(kind, 2, "inner_left", (200, 40)).to_dense())


@pytest.mark.parametrize("kind", IID)
def test_float32_is_the_rounded_float64_matrix(kind):
    om = RandomTestMatrix(kind, 1, "outer", (100, 5))
    np.testing.assert_array_equal(om.to_dense(np.float32), om.to_dense().astype(np.float32))


def test_distributions():
    g = RandomTestMatrix("gaussian", 0, "outer", (20000, 5)).to_dense()
    assert abs(g.mean()) < 0.02 and abs(g.var() - 1) < 0.03
    r = RandomTestMatrix("rademacher", 0, "outer", (20000, 5)).to_dense()
    assert set(np.unique(r)) == {-1.0, 1.0} and abs(r.mean()) < 0.02


@pytest.mark.parametrize("kind", IID)
def test_transpose_matmul_is_a_row_block_partial(kind):
    om = RandomTestMatrix(kind, 4, "outer", (150, 6))
    x = np.random.default_rng(1).standard_normal((150, 3)).astype(np.float32)
    total = sum(om.transpose_matmul(x[r : r + 40], r) for r in range(0, 150, 40))
    expected = om.to_dense().T @ x.astype(np.float64)
    assert total.dtype == np.float64
    np.testing.assert_allclose(total, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(om.matmul(x[:6]), om.to_dense(np.float32) @ x[:6])


@pytest.mark.parametrize("dim", [1, 2, 97, 256])
def test_ssrft_adjoint_identity(dim):
    rng = np.random.default_rng(dim)
    s = max(1, dim // 3)
    x, y = rng.standard_normal((dim, 4)), rng.standard_normal((s, 4))
    sx = ssrft_forward(x, 9, "inner_left", s)
    sty = ssrft_adjoint(y, 9, "inner_left", dim)
    np.testing.assert_allclose(np.sum(sx * y), np.sum(x * sty), rtol=1e-12, atol=1e-12)


def test_ssrft_rows_are_orthonormal_and_match_the_dense_matrix():
    dim, s = 301, 60
    dense_rows = ssrft_forward(np.eye(dim), 1, "outer", s)  # S (s × D)
    np.testing.assert_allclose(dense_rows @ dense_rows.T, np.eye(s), atol=1e-12)
    omega = RandomTestMatrix("ssrft", 1, "outer", (dim, s))
    np.testing.assert_allclose(omega.to_dense(), dense_rows.T, atol=1e-12)
    # square SSRFT: orthogonal, adjoint inverts the forward transform
    x = np.random.default_rng(0).standard_normal(dim)
    back = ssrft_adjoint(ssrft_forward(x, 1, "outer", dim), 1, "outer", dim)
    np.testing.assert_allclose(back, x, atol=1e-12)


def test_ssrft_nested_rows():
    dim = 128
    x = np.random.default_rng(3).standard_normal((dim, 5))
    full = ssrft_forward(x, 4, 2, 100)
    for s in (1, 10, 64):
        np.testing.assert_array_equal(ssrft_forward(x, 4, 2, s), full[:s])
    np.testing.assert_allclose(
        ssrft_columns(4, 2, dim, (3, 9)), ssrft_columns(4, 2, dim, (0, 20))[:, 3:9]
    )


def test_ssrft_block_slices_and_float32():
    om = RandomTestMatrix("ssrft", 0, "inner_right", (90, 30))
    full = om.to_dense()
    np.testing.assert_allclose(om.block((10, 50), (5, 12)), full[10:50, 5:12], atol=1e-15)
    x = np.random.default_rng(0).standard_normal((90, 2)).astype(np.float32)
    y32 = ssrft_forward(x, 0, "inner_right", 30)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, full.T @ x, atol=1e-5)
    np.testing.assert_allclose(om.transpose_matmul(x), full.T @ x.astype(np.float64), atol=1e-12)
    np.testing.assert_allclose(om.matmul(np.eye(30)), full, atol=1e-15)
    with pytest.raises(ValueError, match="whole columns"):
        om.transpose_matmul(x[:50])


def test_input_validation():
    with pytest.raises(UserInputError, match="kind"):
        RandomTestMatrix("uniform", 0, "outer", (10, 2))
    with pytest.raises(UserInputError, match="operator"):
        RandomTestMatrix("gaussian", 0, "middle", (10, 2))
    with pytest.raises(UserInputError, match="seed"):
        RandomTestMatrix("gaussian", -1, "outer", (10, 2))
    with pytest.raises(UserInputError, match="s <= D"):
        RandomTestMatrix("ssrft", 0, "outer", (10, 11))
    with pytest.raises(UserInputError, match="positive"):
        RandomTestMatrix("gaussian", 0, "outer", (0, 2))
    with pytest.raises(UserInputError, match="output size"):
        ssrft_forward(np.ones(5), 0, 0, 6)
