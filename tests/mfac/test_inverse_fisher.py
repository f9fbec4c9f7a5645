"""InverseFisher (Woodbury / Cholesky) against dense float64 inversion and the seed's recursion."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest

from curvlake.errors import UserInputError
from curvlake.pipelines.mfac import (
    InverseFisher,
    apply_partial,
    factor_window,
    gram_partial,
    project_partial,
    seed_recursion_ihvp,
)
from tests._markers import requires_cupy
from tests.mfac.cases import (
    dense_inverse,
    relative_error,
    sherman_morrison_ihvp,
    window,
)

WINDOW_SIZES = [1, 7, 32, 33, 100, 2048]
DAMPS = [1e-1, 1e-5]


def _d(m: int) -> int:
    return 40 if m > 200 else 60


@pytest.mark.parametrize("damp", DAMPS)
@pytest.mark.parametrize("m", WINDOW_SIZES)
def test_products_match_dense_inverse(m, damp):
    grads = window(m, _d(m))
    dense = dense_inverse(grads, damp)
    inv = InverseFisher(grads, damp)
    rng = np.random.default_rng(1)
    x = rng.normal(size=_d(m))
    xs = rng.normal(size=(_d(m), 5))
    assert relative_error(inv @ x, dense @ x) < 1e-8
    assert relative_error(inv @ xs, dense @ xs) < 1e-8
    assert (inv @ xs).shape == xs.shape


@pytest.mark.parametrize("damp", DAMPS)
@pytest.mark.parametrize("m", WINDOW_SIZES)
def test_diagonal_and_entries_match_dense_inverse(m, damp):
    d = _d(m)
    grads = window(m, d)
    dense = dense_inverse(grads, damp)
    inv = InverseFisher(grads, damp)
    assert relative_error(inv.diagonal(), np.diag(dense)) < 1e-8
    scale = np.abs(dense).max()
    for j, k in [(0, 0), (3, 17), (d - 1, 5), (12, 12)]:
        assert abs(inv.entry(j, k) - dense[j, k]) < 1e-8 * scale
    picked = [4, 0, 9, 4]
    assert relative_error(inv.submatrix(picked), dense[np.ix_(picked, picked)]) < 1e-8


@pytest.mark.parametrize("damp", DAMPS)
@pytest.mark.parametrize("m", [1, 7, 32, 33, 100])
def test_seed_recursion_static_recursion_and_woodbury_agree(m, damp):
    grads = window(m, 50, seed=2)
    x = np.random.default_rng(3).normal(size=(50, 2))
    woodbury = InverseFisher(grads, damp) @ x
    assert relative_error(seed_recursion_ihvp(grads, x, damp), woodbury) < 1e-9
    assert relative_error(seed_recursion_ihvp(grads, x[:, 0], damp), woodbury[:, 0]) < 1e-9
    assert relative_error(sherman_morrison_ihvp(grads, x, damp), woodbury) < 1e-9


def test_slot_order_does_not_matter():
    grads = window(20, 30)
    x = np.random.default_rng(0).normal(size=30)
    permuted = grads[np.random.default_rng(1).permutation(20)]
    a = InverseFisher(grads, 1e-3) @ x
    b = InverseFisher(permuted, 1e-3) @ x
    assert relative_error(a, b) < 1e-12


def test_n_grads_sets_the_normalization():
    grads = window(5, 20)
    dense = dense_inverse(grads, 1e-2, n_grads=3)
    inv = InverseFisher(grads, 1e-2, n_grads=3)
    x = np.arange(20.0)
    assert relative_error(inv @ x, dense @ x) < 1e-10
    assert relative_error(inv.diagonal(), np.diag(dense)) < 1e-10
    assert relative_error(seed_recursion_ihvp(grads, x, 1e-2, n_grads=3), dense @ x) < 1e-10


def test_zero_rows_of_an_unfilled_window_change_nothing():
    grads = window(4, 25)
    padded = np.vstack([grads, np.zeros((3, 25))])
    x = np.ones(25)
    np.testing.assert_allclose(
        InverseFisher(padded, 1e-3, n_grads=4) @ x, InverseFisher(grads, 1e-3) @ x, rtol=1e-12
    )


@pytest.mark.parametrize("chunks", [[60], [1] * 60, [7, 13, 40], [30, 30]])
def test_invariant_to_chunking(chunks):
    grads = window(9, 60)
    x = np.random.default_rng(0).normal(size=(60, 3))
    reference = InverseFisher(grads, 1e-4, chunk_size=60)
    bounds = np.cumsum([0, *chunks])
    pieces = [grads[:, a:b] for a, b in itertools.pairwise(bounds)]
    listed = InverseFisher(pieces, 1e-4)
    lazy = InverseFisher(da.from_array(grads, chunks=(3, tuple(chunks))), 1e-4)
    assert listed.chunk_sizes == tuple(chunks) == lazy.chunk_sizes
    for inv in (listed, lazy):
        np.testing.assert_allclose(np.asarray(inv @ x), reference @ x, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(inv @ x[:, 1]), reference @ x[:, 1], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(inv.diagonal()), reference.diagonal(), rtol=1e-12)
        assert inv.entry(5, 41) == pytest.approx(reference.entry(5, 41), rel=1e-12)


def test_dask_window_gives_lazy_results_and_accepts_dask_vectors():
    grads = window(6, 40)
    lazy = InverseFisher(da.from_array(grads, chunks=(6, 16)), 1e-2)
    x = np.linspace(-1, 1, 40)
    product = lazy @ da.from_array(x, chunks=10)
    assert isinstance(product, da.Array) and isinstance(lazy.diagonal(), da.Array)
    assert product.chunks == ((16, 16, 8),)
    np.testing.assert_allclose(product.compute(), dense_inverse(grads, 1e-2) @ x, rtol=1e-10)


def test_per_chunk_kernels_compose_to_the_product():
    grads = window(5, 30)
    x = np.random.default_rng(0).normal(size=30)
    cols = [slice(0, 12), slice(12, 30)]
    factor = factor_window(sum(gram_partial(grads[:, c]) for c in cols), 1e-3)
    coefficients = factor.solve(sum(project_partial(grads[:, c], x[c]) for c in cols))
    result = np.concatenate([apply_partial(grads[:, c], x[c], coefficients, 1e-3) for c in cols])
    np.testing.assert_allclose(result, dense_inverse(grads, 1e-3) @ x, rtol=1e-10)


def test_all_zero_window_is_identity_over_damp():
    inv = InverseFisher(np.zeros((4, 10)), 0.5)
    x = np.arange(10.0)
    np.testing.assert_array_equal(inv @ x, x / 0.5)
    np.testing.assert_array_equal(inv.diagonal(), np.full(10, 2.0))
    assert inv.entry(2, 3) == 0.0


def test_rank_deficient_window():
    grads = window(3, 20)
    duplicated = np.vstack([grads, grads, grads[:1]])  # rank 3 of 7 rows
    dense = dense_inverse(duplicated, 1e-5)
    inv = InverseFisher(duplicated, 1e-5)
    x = np.random.default_rng(0).normal(size=20)
    assert relative_error(inv @ x, dense @ x) < 1e-8
    assert relative_error(inv.diagonal(), np.diag(dense)) < 1e-8


def test_large_damp_is_about_x_over_damp():
    inv = InverseFisher(window(8, 30), 1e6)
    x = np.ones(30)
    np.testing.assert_allclose(inv @ x, x / 1e6, rtol=1e-6)


def test_float32_window_uses_float64_algebra():
    grads = window(16, 50, dtype=np.float32)
    dense = dense_inverse(grads.astype(np.float64), 1e-5)
    inv = InverseFisher(grads, 1e-5)
    x = np.random.default_rng(0).normal(size=50)
    result = inv @ x
    assert result.dtype == np.float64
    assert relative_error(result, dense @ x) < 1e-8
    assert relative_error(inv.diagonal(), np.diag(dense)) < 1e-8


@pytest.mark.parametrize("damp", [0.0, -1e-3, float("nan"), float("inf"), "x"])
def test_bad_damp_is_refused(damp):
    with pytest.raises(UserInputError, match="damp"):
        InverseFisher(window(3, 5), damp)


def test_bad_inputs_are_refused():
    grads = window(3, 5)
    inv = InverseFisher(grads, 1e-2)
    with pytest.raises(UserInputError, match="shape"):
        inv @ np.ones(4)
    with pytest.raises(UserInputError, match="indices"):
        inv.entry(0, 5)
    with pytest.raises(UserInputError, match="2-D"):
        InverseFisher(np.ones(5), 1e-2)
    with pytest.raises(UserInputError, match="rows"):
        InverseFisher([grads, np.ones((2, 3))], 1e-2)
    with pytest.raises(UserInputError, match="non-finite"):
        InverseFisher(np.full((2, 3), np.nan), 1e-2)
    with pytest.raises(UserInputError, match="n_grads"):
        InverseFisher(grads, 1e-2, n_grads=0)


def test_not_positive_definite_is_a_clear_error():
    with pytest.raises(UserInputError, match="increase damp"):
        factor_window(np.array([[1.0, 2.0], [2.0, 1.0]]), 1e-12)


@requires_cupy
def test_cupy_chunks_match_numpy():
    import cupy

    grads = window(7, 40)
    x = np.arange(40.0)
    host = InverseFisher(grads, 1e-3, chunk_size=16)
    device = InverseFisher(cupy.asarray(grads), 1e-3, chunk_size=16)
    np.testing.assert_allclose(cupy.asnumpy(device @ cupy.asarray(x)), host @ x, rtol=1e-10)
    np.testing.assert_allclose(cupy.asnumpy(device.diagonal()), host.diagonal(), rtol=1e-10)
    assert device.entry(3, 9) == pytest.approx(host.entry(3, 9), rel=1e-10)
