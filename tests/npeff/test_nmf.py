"""D-NPEFF factorization: oracles (scikit-learn, direct loss), invariances, Dask parity."""

import itertools
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import NMF

from curvlake.errors import UserInputError
from curvlake.pipelines.npeff.nmf import (
    INIT_TILE,
    NmfConfig,
    fit_nmf,
    fit_nmf_dask,
    init_h_columns,
    iter_nmf_dask,
    nmf_init,
    nmf_init_dask,
    nmf_state_from_checkpoint,
    nmf_step,
    preprocess_pefs,
    topk_to_dask_column_blocks,
)
from tests._markers import requires_cupy

SOLVERS = ["mu", "hals"]


@pytest.fixture(scope="module")
def dask_client():
    """A threads-only distributed cluster (2 workers), shared by the module's tests."""
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def _topk_pefs(n=24, P=3000, k=150, seed=0):
    rng = np.random.default_rng(seed)
    # Heavy-tailed non-negative values, like D-PEFs; columns concentrated on a subset.
    pool = rng.choice(P, size=P // 2, replace=False)
    idx = np.stack([rng.choice(pool, size=k, replace=False) for _ in range(n)])
    vals = rng.lognormal(size=(n, k)) * (rng.random((n, k)) < 0.9)
    norm = np.linalg.norm(vals, axis=1) * 1.3
    return vals, idx, norm, P


def _dense_oracle(vals, idx, norm, P):
    D = np.zeros((vals.shape[0], P))
    np.put_along_axis(D, idx, vals, axis=1)
    return D / (norm[:, None] + 1e-9)


def _planted(n=60, P=80, r=4, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.random((n, r)) * (rng.random((n, r)) < 0.5)
    W[np.arange(n), rng.integers(0, r, n)] += 0.5
    H = rng.random((r, P)) * (rng.random((r, P)) < 0.4)
    return W @ H, W, H


def _match_cos(H, H_true):
    Hn = H / np.linalg.norm(H, axis=1, keepdims=True)
    Tn = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    c = Hn @ Tn.T
    i, j = linear_sum_assignment(-c)
    return c[i, j].min()


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_matches_dense_oracle_and_pruning_round_trip():
    vals, idx, norm, P = _topk_pefs()
    D = _dense_oracle(vals, idx, norm, P)
    pm = preprocess_pefs(vals, idx, norm, n_params=P, block_size=500)
    kept = np.flatnonzero((D != 0).sum(axis=0) >= 1)
    np.testing.assert_array_equal(pm.kept_columns, kept)
    A = np.hstack([b.toarray() for b in pm.blocks])
    np.testing.assert_allclose(A, D[:, kept], rtol=1e-15, atol=0)
    # Scatter back to the full parameter space reproduces the normalised rows exactly.
    full = pm.scatter(A)
    np.testing.assert_array_equal(full[:, kept], A)
    np.testing.assert_allclose(full, D, rtol=1e-15, atol=0)
    assert not full[:, np.setdiff1d(np.arange(P), kept)].any()
    assert np.all(np.linalg.norm(A, axis=1) <= 1.0)
    assert pm.col_chunks[:-1] == (500,) * (len(pm.blocks) - 1)
    # The caller's arrays are not modified.
    vals2, idx2, *_ = _topk_pefs()
    np.testing.assert_array_equal(vals, vals2)
    np.testing.assert_array_equal(idx, idx2)


def test_preprocess_min_nnz_and_dense_input():
    vals, idx, norm, P = _topk_pefs()
    D = _dense_oracle(vals, idx, norm, P)
    pm = preprocess_pefs(vals, idx, norm, n_params=P, min_nnz=2)
    np.testing.assert_array_equal(pm.kept_columns, np.flatnonzero((D != 0).sum(axis=0) >= 2))
    # Dense input: the dense norm is the row norm, so rows come out unit-norm.
    raw = np.zeros((vals.shape[0], P))
    np.put_along_axis(raw, idx, vals, axis=1)
    pd = preprocess_pefs(raw, dense_blocks=True, block_size=700)
    A = np.hstack(pd.blocks)
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), 1.0, rtol=1e-8)


def test_topk_dask_relayout_matches_in_memory():
    vals, idx, norm, P = _topk_pefs()
    pm = preprocess_pefs(vals, idx, norm, n_params=P, block_size=400)
    Ad, kept = topk_to_dask_column_blocks(
        da.from_array(vals, chunks=(7, -1)),
        da.from_array(idx, chunks=(7, -1)),
        da.from_array(norm, chunks=7),
        n_params=P,
        block_size=400,
    )
    np.testing.assert_array_equal(kept, pm.kept_columns)
    assert Ad.chunks[1] == pm.col_chunks
    with dask.config.set(scheduler="sync"):
        got = Ad.compute()
    ref = np.hstack([b.toarray() for b in pm.blocks])
    np.testing.assert_allclose(got.toarray() if sp.issparse(got) else got, ref, rtol=1e-15)


def test_preprocess_rejects_bad_input():
    vals, idx, norm, P = _topk_pefs()
    with pytest.raises(UserInputError, match="n_params"):
        preprocess_pefs(vals, idx, norm)
    with pytest.raises(UserInputError, match="indices"):
        preprocess_pefs(vals, idx + P, norm, n_params=P)
    with pytest.raises(UserInputError, match="non-negative"):
        preprocess_pefs(-vals, idx, norm, n_params=P)
    with pytest.raises(UserInputError, match="min_nnz"):
        preprocess_pefs(vals, idx, norm, n_params=P, min_nnz=0)


def test_init_is_chunking_invariant():
    r, p = 3, 2 * INIT_TILE + 123
    whole = init_h_columns(7, r, 0, p)
    cuts = [0, 5, INIT_TILE - 1, INIT_TILE + 17, 2 * INIT_TILE + 100, p]
    parts = [init_h_columns(7, r, s, e) for s, e in itertools.pairwise(cuts)]
    np.testing.assert_array_equal(np.hstack(parts), whole)
    assert not np.array_equal(init_h_columns(8, r, 0, p), whole)


# --------------------------------------------------------------------------- oracles


@pytest.mark.parametrize(("solver", "sk_solver"), [("mu", "mu"), ("hals", "cd")])
@pytest.mark.parametrize("sparse", [False, True])
def test_iterates_match_sklearn(solver, sk_solver, sparse):
    """Same iterates as scikit-learn from the same (W0, H0).

    scikit-learn's MU (beta_loss='frobenius') updates W then H like the reference, but instead
    of adding ε to the denominators it replaces exact zeros by float32 eps: ``eps=0`` here does
    the same. Its 'cd' solver with ``shuffle=False`` is HALS with one sweep per update.
    """
    rng = np.random.default_rng(3)
    A = rng.random((25, 40)) ** 3 * (rng.random((25, 40)) < 0.5)
    W0, H0 = rng.random((25, 4)), rng.random((4, 40))
    cfg = NmfConfig(4, solver=solver, max_iter=12, tol=0, eps=0.0, w_sweeps=1, h_sweeps=1)
    state = fit_nmf(sp.csr_matrix(A) if sparse else A, cfg, W0=W0, H0=H0)
    kw = {"shuffle": False} if sk_solver == "cd" else {}
    model = NMF(4, solver=sk_solver, beta_loss="frobenius", init="custom", max_iter=12, tol=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = model.fit_transform(sp.csr_matrix(A) if sparse else A, W=W0.copy(), H=H0.copy())
    np.testing.assert_allclose(state.W, W, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(state.H, model.components_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(("w_sweeps", "h_sweeps"), [(1, 1), (3, 2)])
def test_loss_is_monotone_and_equals_direct(solver, w_sweeps, h_sweeps):
    vals, idx, norm, P = _topk_pefs()
    pm = preprocess_pefs(vals, idx, norm, n_params=P, block_size=600)
    A = np.hstack([b.toarray() for b in pm.blocks])
    cfg = NmfConfig(5, solver=solver, max_iter=40, tol=0, w_sweeps=w_sweeps, h_sweeps=h_sweeps)
    losses = []

    def check(state):
        direct = np.linalg.norm(A - state.W @ state.H) / np.linalg.norm(A)
        assert state.losses[-1] == pytest.approx(direct, rel=1e-9, abs=1e-12)
        losses.append(direct)

    state = fit_nmf(pm, cfg, callback=check)
    assert state.iteration == 40 and len(state.losses) == 41
    assert np.all(np.diff(state.losses) <= 1e-12)
    np.testing.assert_allclose(state.losses[1:], losses, rtol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_planted_factors_recovered(solver):
    A, _, H_true = _planted()
    cfg = NmfConfig(4, solver=solver, max_iter=3000 if solver == "mu" else 500, tol=1e-10)
    state = fit_nmf(A, cfg)
    assert state.losses[-1] < 1e-2
    assert _match_cos(state.H, H_true) > 0.99


def test_tolerance_stops_early():
    A, *_ = _planted()
    A = A + 0.05 * np.random.default_rng(5).random(A.shape)
    state = fit_nmf(A, NmfConfig(4, max_iter=10_000, tol=1e-3))
    assert state.converged and state.iteration < 10_000
    prev, cur = state.losses[-2:]
    assert prev - cur <= 1e-3 * prev


def test_sparse_and_dense_blocks_agree():
    vals, idx, norm, P = _topk_pefs()
    for solver in SOLVERS:
        cfg = NmfConfig(4, solver=solver, max_iter=15, tol=0)
        s_sp = fit_nmf(preprocess_pefs(vals, idx, norm, n_params=P, block_size=500), cfg)
        s_de = fit_nmf(
            preprocess_pefs(vals, idx, norm, n_params=P, block_size=500, dense_blocks=True), cfg
        )
        np.testing.assert_allclose(s_sp.W, s_de.W, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(s_sp.H, s_de.H, rtol=1e-10, atol=1e-13)


def test_float32_data_runs_with_float64_small_products():
    vals, idx, norm, P = _topk_pefs()
    pm = preprocess_pefs(vals.astype(np.float32), idx, norm, n_params=P, block_size=900)
    state = fit_nmf(pm, NmfConfig(4, max_iter=10, tol=0))
    assert state.H.dtype == np.float32 and state.W.dtype == np.float64
    assert state.AHt.dtype == np.float64 and state.HHt.dtype == np.float64
    ref = fit_nmf(preprocess_pefs(vals, idx, norm, n_params=P), NmfConfig(4, max_iter=10, tol=0))
    np.testing.assert_allclose(state.losses, ref.losses, rtol=1e-4)


def test_bad_config_and_init_rejected():
    with pytest.raises(UserInputError, match="solver"):
        NmfConfig(3, solver="als")
    with pytest.raises(UserInputError, match="n_components"):
        NmfConfig(0)
    A, *_ = _planted()
    with pytest.raises(UserInputError, match="W0"):
        nmf_init(A, NmfConfig(4), W0=np.ones((3, 4)), H0=np.ones((4, A.shape[1])))


# --------------------------------------------------------------------------- Dask parity


def _uneven_dask(pm_blocks_dense, cuts):
    A = np.hstack(pm_blocks_dense)
    blocks = [sp.csr_matrix(A[:, s:e]) for s, e in itertools.pairwise(cuts)]
    from curvlake.pipelines.npeff.nmf import column_blocks_to_dask

    return column_blocks_to_dask(blocks), A


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_dask_iterates_equal_in_memory_for_any_chunking(solver, scheduler, request):
    vals, idx, norm, P = _topk_pefs()
    pm = preprocess_pefs(vals, idx, norm, n_params=P)
    p = pm.shape[1]
    cfg = NmfConfig(5, solver=solver, max_iter=8, tol=0)
    ref = fit_nmf(pm, cfg)
    cuts = [0, 37, 38, 400, p - 5, p]
    Ad, _ = _uneven_dask([pm.blocks[0].toarray()], cuts)
    if scheduler == "distributed":
        request.getfixturevalue("dask_client")
        got = fit_nmf_dask(Ad, cfg)
    else:
        with dask.config.set(scheduler="threads"):
            got = fit_nmf_dask(Ad, cfg)
    assert got.H.chunks[1] == Ad.chunks[1]
    np.testing.assert_allclose(got.W, ref.W, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.H.compute(), ref.H, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-10)


def test_dask_dense_zarr_input_and_custom_init():
    A, *_ = _planted()
    rng = np.random.default_rng(1)
    W0, H0 = rng.random((A.shape[0], 4)), rng.random((4, A.shape[1]))
    cfg = NmfConfig(4, solver="hals", max_iter=6, tol=0)
    ref = fit_nmf(A, cfg, W0=W0, H0=H0)
    store = zarr.storage.MemoryStore()
    z = zarr.create_array(store, shape=A.shape, chunks=(A.shape[0], 30), dtype="f8")
    z[:] = A
    Ad = da.from_zarr(z)
    with dask.config.set(scheduler="threads"):
        got = fit_nmf_dask(Ad, cfg, W0=W0, H0=da.from_array(H0, chunks=(4, 25)))
    np.testing.assert_allclose(got.W, ref.W, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.H.compute(), ref.H, rtol=1e-10, atol=1e-12)


def test_dask_init_equals_in_memory_init():
    vals, idx, norm, P = _topk_pefs()
    pm = preprocess_pefs(vals, idx, norm, n_params=P, block_size=333)
    cfg = NmfConfig(6, seed=11)
    a = nmf_init(pm, cfg)
    with dask.config.set(scheduler="threads"):
        b = nmf_init_dask(pm.to_dask(), cfg)
        Hb = b.H.compute()
    np.testing.assert_allclose(b.W, a.W, rtol=1e-12)
    np.testing.assert_allclose(Hb, a.H, rtol=1e-12)
    assert b.norm_A_sq == pytest.approx(a.norm_A_sq, rel=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_checkpoint_to_zarr_and_resume(solver, tmp_path):
    """A fit stored to Zarr every iteration (double buffer), killed, and resumed from the
    checkpoint reproduces the uninterrupted fit."""
    vals, idx, norm, P = _topk_pefs()
    pm = preprocess_pefs(vals, idx, norm, n_params=P, block_size=300)
    Ad = pm.to_dask()
    r, p = 4, pm.shape[1]
    cfg = NmfConfig(r, solver=solver, max_iter=7, tol=0)
    ref = fit_nmf(pm, cfg)
    group = zarr.open_group(str(tmp_path / "fit.zarr"), mode="w")
    for name in ("H0", "H1"):
        group.create_array(name, shape=(r, p), chunks=(r, 300), dtype="f8")

    def target(t):
        return group[f"H{t % 2}"]

    saved = None
    with dask.config.set(scheduler="threads"):
        for state in iter_nmf_dask(Ad, cfg, h_target=target):
            arrays, meta = state.checkpoint()
            saved = ({"W": arrays["W"].copy()}, meta)  # W and metadata persisted by the caller
            if state.iteration == 4:
                break  # "killed"
        arrays, meta = saved
        arrays["H"] = da.from_zarr(str(tmp_path / "fit.zarr"), component=f"H{4 % 2}")
        resumed = nmf_state_from_checkpoint(Ad, arrays, meta)
        np.testing.assert_allclose(resumed.AHt, state.AHt, rtol=1e-12)
        final = fit_nmf_dask(Ad, cfg, state=resumed, h_target=target)
    assert final.iteration == 7
    np.testing.assert_allclose(final.W, ref.W, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(final.H.compute(), ref.H, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(final.losses, ref.losses, rtol=1e-10)


def test_in_memory_checkpoint_resume():
    A, *_ = _planted()
    cfg = NmfConfig(4, max_iter=9, tol=0)
    ref = fit_nmf(A, cfg)
    st = fit_nmf(A, NmfConfig(4, max_iter=5, tol=0))
    arrays, meta = st.checkpoint()
    st2 = nmf_state_from_checkpoint(A, {"W": arrays["W"], "H": arrays["H"]}, meta)
    for _ in range(4):
        st2 = nmf_step(A, st2, cfg)
    np.testing.assert_allclose(st2.W, ref.W, rtol=1e-12)
    np.testing.assert_allclose(st2.losses, ref.losses, rtol=1e-12)


@requires_cupy
@pytest.mark.gpu
@pytest.mark.parametrize("solver", SOLVERS)
def test_cupy_blocks_give_the_numpy_iterates(solver):
    vals, idx, norm, P = _topk_pefs()
    pm = preprocess_pefs(vals, idx, norm, n_params=P, block_size=700)
    cfg = NmfConfig(4, solver=solver, max_iter=6, tol=0)
    ref = fit_nmf(pm, cfg)
    got = fit_nmf(pm.to_cupy(), cfg)
    np.testing.assert_allclose(got.W, ref.W, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.H.get(), ref.H, rtol=1e-9, atol=1e-12)
