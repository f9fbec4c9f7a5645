"""Coefficient fitting with H fixed (NNLS) and sparsification of H."""

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls

from curvlake.errors import UserInputError
from curvlake.pipelines.npeff.coeffs import (
    SparseH,
    fit_coeffs,
    fit_coeffs_dask,
    gram,
    nnls_active_set,
    nnls_gram,
    sparsify,
)
from curvlake.pipelines.npeff.nmf import NmfConfig, fit_nmf, preprocess_pefs, squared_loss


def _problem(n=40, P=60, r=6, seed=1):
    rng = np.random.default_rng(seed)
    H = rng.random((r, P)) * (rng.random((r, P)) < 0.5)
    A = rng.random((n, P)) * (rng.random((n, P)) < 0.4)
    return A, H


def _scipy_nnls(A, H):
    return np.stack([nnls(H.T, a)[0] for a in A])


@pytest.mark.parametrize("method", ["active_set", "hals"])
def test_nnls_matches_scipy(method):
    A, H = _problem()
    ref = _scipy_nnls(A, H)
    assert 0.05 < (ref == 0).mean() < 0.95  # constraints are active somewhere
    W = fit_coeffs(A, H, method=method, max_iter=5000, tol=1e-12)
    np.testing.assert_allclose(W, ref, atol=1e-8)


def test_nnls_mu_approaches_scipy():
    A, H = _problem()
    W = fit_coeffs(A, H, method="mu", max_iter=20_000)
    np.testing.assert_allclose(W, _scipy_nnls(A, H), atol=1e-5)


def test_active_set_kkt_on_random_grams():
    rng = np.random.default_rng(0)
    for _ in range(20):
        M = rng.standard_normal((12, 8))
        G, b = M.T @ M, rng.standard_normal(8) * 3
        x = nnls_active_set(G, b)
        grad = G @ x - b
        assert np.all(x >= 0)
        np.testing.assert_allclose(grad[x > 0], 0, atol=1e-9)
        assert np.all(grad[x == 0] >= -1e-9)


def test_sparse_and_blocked_inputs_and_chunking_invariance():
    A, H = _problem()
    ref = fit_coeffs(A, H)
    blocks = [sp.csr_matrix(A[:, :17]), sp.csr_matrix(A[:, 17:50]), A[:, 50:]]
    np.testing.assert_allclose(fit_coeffs(blocks, H), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fit_coeffs(sp.csr_matrix(A), sp.csr_matrix(H)), ref, atol=1e-14)
    # Each example stops on its own: the result does not depend on how rows are chunked.
    np.testing.assert_allclose(fit_coeffs(A, H, chunk_rows=7), ref, rtol=1e-12, atol=1e-14)
    with dask.config.set(scheduler="threads"):
        for chunks in [(7, 13), (40, 60), (3, 60)]:
            got = fit_coeffs_dask(da.from_array(A, chunks=chunks), H).compute()
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
        Hd = da.from_array(H, chunks=(6, 25))
        got = fit_coeffs_dask(da.from_array(A, chunks=(11, 20)), Hd).compute()
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
        got = fit_coeffs_dask(da.from_array(A, chunks=(11, 20)), sp.csr_matrix(H)).compute()
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_refit_on_training_pefs_reproduces_the_learned_loss():
    rng = np.random.default_rng(4)
    idx = np.stack([rng.choice(900, 80, replace=False) for _ in range(30)])
    vals = rng.lognormal(size=(30, 80))
    pm = preprocess_pefs(vals, idx, None, n_params=900)
    state = fit_nmf(pm, NmfConfig(4, max_iter=300, tol=1e-9))
    W = fit_coeffs(pm, state.H)
    AHt, HHt = state.AHt, state.HHt
    # With H fixed, the exact NNLS cannot do worse than the W the fit ended with.
    assert squared_loss(state.norm_A_sq, W, AHt, HHt) <= squared_loss(
        state.norm_A_sq, state.W, AHt, HHt
    ) * (1 + 1e-9)
    np.testing.assert_allclose(W, state.W, rtol=0, atol=5e-3 * state.W.max())


def test_gram_variants():
    _, H = _problem()
    ref = H @ H.T
    np.testing.assert_allclose(gram(H), ref, rtol=1e-14)
    np.testing.assert_allclose(gram(sp.csr_matrix(H)), ref, rtol=1e-14)
    with dask.config.set(scheduler="sync"):
        np.testing.assert_allclose(gram(da.from_array(H, chunks=(3, 7))), ref, rtol=1e-14)


def test_nnls_rejects_bad_input():
    with pytest.raises(UserInputError, match="method"):
        nnls_gram(np.eye(2), np.ones((3, 2)), method="lbfgs")
    with pytest.raises(UserInputError, match="G"):
        nnls_gram(np.eye(3), np.ones((3, 2)))


# --------------------------------------------------------------------------- sparsify


def test_sparsify_normalises_without_changing_wh():
    rng = np.random.default_rng(2)
    W, H = rng.random((10, 4)), rng.random((4, 30)) * (rng.random((4, 30)) < 0.6)
    H[2] = 0  # a dead component stays dead
    W2, Hs = sparsify(W, H, 0.0)
    assert isinstance(Hs, SparseH)
    assert Hs.indptr.dtype == np.int64 and Hs.indptr.shape == (5,)
    assert Hs.shape == (4, 30) and Hs.nnz == np.count_nonzero(H)
    Hd = Hs.toarray()
    np.testing.assert_allclose(W2 @ Hd, W @ H, rtol=1e-13)
    norms = np.linalg.norm(Hd, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3]], 1.0, rtol=1e-13)
    assert norms[2] == 0 and not W2[:, 2].any()


def test_sparsify_threshold_and_csr_round_trip():
    rng = np.random.default_rng(3)
    W, H = rng.random((10, 3)), rng.random((3, 50)).astype(np.float32)
    thr = 0.12
    W2, Hs = sparsify(W, H, thr)
    Hn = H / np.linalg.norm(H.astype(np.float64), axis=1, keepdims=True)
    expect = np.where(Hn >= thr, Hn, 0)
    np.testing.assert_allclose(Hs.toarray(), expect, rtol=1e-6)
    assert Hs.values.dtype == np.float32
    assert np.all(Hs.values >= thr * (1 - 1e-6))
    # CSR arrays rebuild the same matrix, indices sorted within rows.
    csr = Hs.to_scipy()
    assert csr.has_sorted_indices
    np.testing.assert_array_equal(csr.indptr, Hs.indptr)
    with dask.config.set(scheduler="sync"):
        W3, Hs3 = sparsify(W, da.from_array(H, chunks=(3, 13)), thr)
    np.testing.assert_allclose(W3, W2, rtol=1e-12)
    np.testing.assert_array_equal(Hs3.indptr, Hs.indptr)
    np.testing.assert_array_equal(Hs3.indices, Hs.indices)
    np.testing.assert_allclose(Hs3.values, Hs.values, rtol=1e-6)
    with pytest.raises(UserInputError, match="threshold"):
        sparsify(W, H, -1.0)
