"""LRM-NPEFF: loss and gradient against brute force (explicit P×P Fishers), invariances,
planted recovery, Dask parity, checkpoint/resume, expansion and coefficient fitting."""

import dask
import dask.array as da
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from curvlake.errors import UserInputError
from curvlake.pipelines.npeff.lrm import (
    LrmConfig,
    expand_lrm,
    fit_lrm,
    fit_lrm_coeffs,
    fit_lrm_coeffs_dask,
    fit_lrm_dask,
    fit_lrm_expansion,
    iter_lrm_dask,
    lrm_block_grad,
    lrm_init,
    lrm_loss,
    lrm_state_from_checkpoint,
    lrm_step,
    lrm_trace_const_dask,
    preprocess_lrm_pefs,
)


def _factors(n=7, C=3, P=11, seed=0, density=0.6):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, C, P)) * (rng.random((n, C, P)) < density)


def _fishers(pm):
    X = np.hstack([b.toarray() for b in pm.blocks])
    A = X.reshape(pm.n_examples, pm.n_classes, -1)
    return np.einsum("icp,icq->ipq", A, A), X


def _brute(F, W, G, lam=0.0, s=0.0):
    M = np.einsum("ij,jp,jq->ipq", W, G, G)
    D = G @ G.T - s * np.eye(G.shape[0])
    return ((F - M) ** 2).sum() + lam * (D**2).sum()


def _sparse_form(a, k):
    """Top-k by |value| over the flattened C×P factors, as in ``pefs.topk_sparsify_lowrank``."""
    n, C, P = a.shape
    flat = a.reshape(n, C * P)
    idx = np.sort(np.argsort(-np.abs(flat), axis=1)[:, :k], axis=1)
    vals = np.take_along_axis(flat, idx, axis=1)
    fro = np.linalg.norm(np.einsum("icp,idp->icd", a, a), axis=(1, 2))
    return vals, idx // P, idx % P, fro


def test_sparse_form_preprocessing_and_trace_constant():
    a = _factors(n=6, C=3, P=40, density=1.0)
    vals, ci, pi, fro = _sparse_form(a, k=50)
    pm = preprocess_lrm_pefs(vals, ci, pi, fro, n_params=40, n_classes=3, block_size=9)
    # Oracle: scatter the kept values, divide A_i by sqrt(‖F_i‖).
    dense = np.zeros((6, 3 * 40))
    np.put_along_axis(dense, ci * 40 + pi, vals, axis=1)
    dense = dense.reshape(6, 3, 40) / np.sqrt(fro + 1e-9)[:, None, None]
    kept = np.flatnonzero(np.abs(dense).sum(axis=(0, 1)) > 0)
    np.testing.assert_array_equal(pm.kept_columns, kept)
    F, X = _fishers(pm)
    np.testing.assert_allclose(X.reshape(6, 3, -1), dense[:, :, kept], rtol=1e-14)
    np.testing.assert_allclose(pm.tr_per_example, (F**2).sum(axis=(1, 2)), rtol=1e-12)
    assert np.all(pm.tr_per_example <= 1 + 1e-9)  # truncated part of a unit-norm PEF
    with dask.config.set(scheduler="sync"):
        tr = lrm_trace_const_dask(pm.to_dask(), 3).compute()
    np.testing.assert_allclose(tr, pm.tr_per_example, rtol=1e-12)
    # Dense input with exact norms: every F̂_i has unit norm.
    full = preprocess_lrm_pefs(a)
    np.testing.assert_allclose(full.tr_per_example, 1.0, rtol=1e-8)


@pytest.mark.parametrize(("lam", "s"), [(0.0, 0.0), (0.3, 0.5)])
def test_loss_and_gradient_vs_brute_force_and_finite_differences(lam, s):
    pm = preprocess_lrm_pefs(_factors())
    F, X = _fishers(pm)
    rng = np.random.default_rng(1)
    r = 4
    W, G = rng.random((pm.n_examples, r)), rng.standard_normal((r, X.shape[1]))
    AG, S = X @ G.T, G @ G.T
    obj, data = lrm_loss(pm.tr_const, W, AG, S, 3, lam, s)
    # The reported loss includes the true constant Σ‖F_i‖²: it equals the brute force.
    assert obj == pytest.approx(_brute(F, W, G, lam, s), rel=1e-12)
    assert data == pytest.approx(_brute(F, W, G), rel=1e-12)
    assert data - pm.tr_const == pytest.approx(_brute(F, W, G) - (F**2).sum(), rel=1e-12)
    grad = lrm_block_grad(pm.blocks[0], G, W, AG, S, 3, lam, s)
    # Brute-force gradient: d/dg_j of Σ_i‖F_i − M_i‖² = −4 Σ_i W_ij (F_i − M_i) g_j (+ penalty).
    R = F - np.einsum("ij,jp,jq->ipq", W, G, G)
    brute = -4 * np.einsum("ij,ipq,jq->jp", W, R, G) + 4 * lam * (S - s * np.eye(r)) @ G
    np.testing.assert_allclose(grad, brute, rtol=1e-10, atol=1e-10)
    h, fd = 1e-6, np.zeros_like(G)
    for j in range(r):
        for p in range(G.shape[1]):
            E = np.zeros_like(G)
            E[j, p] = h
            fd[j, p] = (_brute(F, W, G + E, lam, s) - _brute(F, W, G - E, lam, s)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


def test_sign_invariances():
    a = _factors()
    pm = preprocess_lrm_pefs(a)
    flipped = a.copy()
    flipped[:, 1] *= -1  # the sign of a class row (a column of A_i in P×C layout)
    flipped[3] *= -1
    pm2 = preprocess_lrm_pefs(flipped)
    cfg = LrmConfig(3, n_iters_g_only=2, n_iters_joint=4, learning_rate=1e-2)
    s1, s2 = fit_lrm(pm, cfg), fit_lrm(pm2, cfg)
    np.testing.assert_allclose(s2.losses, s1.losses, rtol=1e-12)
    np.testing.assert_allclose(s2.G, s1.G, rtol=1e-12, atol=1e-14)
    # G → −G leaves the loss, the W update and (up to sign) the G update unchanged.
    W0 = np.random.default_rng(2).random((pm.n_examples, 3))
    G0 = np.random.default_rng(3).standard_normal((3, pm.shape[1]))
    sp_, sn = fit_lrm(pm, cfg, W0=W0, G0=G0), fit_lrm(pm, cfg, W0=W0, G0=-G0)
    np.testing.assert_allclose(sn.losses, sp_.losses, rtol=1e-12)
    np.testing.assert_allclose(sn.G, -sp_.G, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sn.W, sp_.W, rtol=1e-12)


def _planted(n=150, P=30, r=3, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((r, P))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    W = rng.random((n, r)) * (rng.random((n, r)) < 0.6)
    W[W.sum(axis=1) == 0, 0] = 1.0
    a = np.sqrt(W)[:, :, None] * g[None]  # exact low-rank factors: F_i = Σ_j W_ij g_j g_jᵀ
    return a, g


def _match_abs_cos(G, g):
    Gn = G / np.linalg.norm(G, axis=1, keepdims=True)
    c = np.abs(Gn @ g.T)
    i, j = linear_sum_assignment(-c)
    return c[i, j].min()


@pytest.mark.parametrize(("optimizer", "lr"), [("gd", 0.3), ("adam", 3e-2)])
def test_planted_recovery(optimizer, lr):
    a, g = _planted()
    pm = preprocess_lrm_pefs(a)
    cfg = LrmConfig(3, n_iters_g_only=20, n_iters_joint=300, learning_rate=lr, optimizer=optimizer)
    state = fit_lrm(pm, cfg)
    assert state.rel_losses[-1] < 1e-2
    assert _match_abs_cos(state.G, g) > 0.99
    F, _ = _fishers(pm)
    assert state.losses[-1] == pytest.approx(_brute(F, state.W, state.G), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("optimizer", ["gd", "adam"])
@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_dask_iterates_equal_in_memory(optimizer, scheduler, request):
    a = _factors(n=9, P=40)
    pm1 = preprocess_lrm_pefs(a)
    pm3 = preprocess_lrm_pefs(a, block_size=13)
    cfg = LrmConfig(
        4,
        n_iters_g_only=2,
        n_iters_joint=4,
        learning_rate=1e-2,
        optimizer=optimizer,
        ortho_strength=0.1,
    )
    ref = fit_lrm(pm1, cfg)
    if scheduler == "distributed":
        request.getfixturevalue("dask_client")
        got = fit_lrm_dask(pm3.to_dask(), cfg, n_classes=3)
    else:
        with dask.config.set(scheduler="threads"):
            got = fit_lrm_dask(pm3.to_dask(), cfg, n_classes=3)
    assert got.tr_const == pytest.approx(pm1.tr_const, rel=1e-12)
    np.testing.assert_allclose(got.W, ref.W, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got.G.compute(), ref.G, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-10)


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def test_checkpoint_and_resume_dask_adam(tmp_path):
    zarr = pytest.importorskip("zarr")
    a = _factors(n=9, P=40)
    pm = preprocess_lrm_pefs(a, block_size=10)
    X, r, p = pm.to_dask(), 3, pm.shape[1]
    cfg = LrmConfig(r, n_iters_g_only=2, n_iters_joint=5, learning_rate=1e-2, optimizer="adam")
    ref = fit_lrm(pm, cfg)
    group = zarr.open_group(str(tmp_path / "lrm.zarr"), mode="w")
    for buf in range(2):
        for name in ("G", "m", "v"):
            group.create_array(f"{name}{buf}", shape=(r, p), chunks=(r, 10), dtype="f8")

    def target(t):
        return [group[f"{name}{t % 2}"] for name in ("G", "m", "v")]

    with dask.config.set(scheduler="threads"):
        for state in iter_lrm_dask(X, cfg, n_classes=3, tr_const=pm.tr_const, g_target=target):
            if state.iteration == 3:
                arrays, meta = state.checkpoint()
                break
        arrays = {"W": arrays["W"]} | {
            key: da.from_zarr(group[f"{name}{3 % 2}"])
            for key, name in (("G", "G"), ("adam_m", "m"), ("adam_v", "v"))
        }
        resumed = lrm_state_from_checkpoint(X, arrays, meta)
        final = fit_lrm_dask(X, cfg, n_classes=3, state=resumed, g_target=target)
    assert final.iteration == 7
    np.testing.assert_allclose(final.W, ref.W, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(final.G.compute(), ref.G, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(final.losses, ref.losses, rtol=1e-10)


def test_in_memory_resume_matches():
    pm = preprocess_lrm_pefs(_factors())
    cfg = LrmConfig(3, n_iters_g_only=2, n_iters_joint=4, learning_rate=1e-2)
    ref = fit_lrm(pm, cfg)
    st = lrm_init(pm, cfg)
    for _ in range(3):
        st = lrm_step(pm, st, cfg)
    arrays, meta = st.checkpoint()
    st = lrm_state_from_checkpoint(pm, {"W": arrays["W"], "G": arrays["G"]}, meta)
    final = fit_lrm(pm, cfg, state=st)
    np.testing.assert_allclose(final.G, ref.G, rtol=1e-12)
    np.testing.assert_allclose(final.losses, ref.losses, rtol=1e-12)


def test_g_only_phase_keeps_w():
    pm = preprocess_lrm_pefs(_factors())
    cfg = LrmConfig(3, n_iters_g_only=3, n_iters_joint=0, learning_rate=1e-2)
    st0 = lrm_init(pm, cfg)
    st = fit_lrm(pm, cfg)
    np.testing.assert_array_equal(st.W, st0.W)
    assert not np.allclose(st.G, st0.G)


def test_expansion_freezes_old_components_then_trains_all():
    a, _ = _planted(r=3)
    pm = preprocess_lrm_pefs(a)
    base = fit_lrm(pm, LrmConfig(2, n_iters_g_only=10, n_iters_joint=100, learning_rate=0.3))
    exp = expand_lrm(pm, base, 1, seed=9)
    assert exp.G.shape[0] == 3 and exp.W.shape[1] == 3
    np.testing.assert_array_equal(exp.G[:2], base.G)
    cfg = LrmConfig(3, learning_rate=0.3)
    staged = []
    out = fit_lrm_expansion(
        pm,
        exp,
        cfg,
        2,
        n_iters_g_only=5,
        n_iters_joint_new_only=5,
        n_iters_joint=200,
        callback=lambda s: staged.append(s) and False,
    )
    # The first two stages leave the old components untouched.
    np.testing.assert_array_equal(staged[9].G[:2], base.G)
    np.testing.assert_array_equal(staged[9].W[:, :2], base.W)
    assert not np.array_equal(out.G[:2], base.G)
    assert out.rel_losses[-1] < base.rel_losses[-1]
    # Dask parity of the staged schedule (short).
    kw = {"n_iters_g_only": 2, "n_iters_joint_new_only": 2, "n_iters_joint": 2}
    ref = fit_lrm_expansion(pm, exp, cfg, 2, **kw)
    with dask.config.set(scheduler="threads"):
        pm3 = preprocess_lrm_pefs(a, block_size=7)
        exp_d = expand_lrm(pm3.to_dask(), base, 1, seed=9)
        out_d = fit_lrm_expansion(pm3.to_dask(), exp_d, cfg, 2, **kw)
    np.testing.assert_allclose(out_d.G.compute(), ref.G, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(out_d.W, ref.W, rtol=1e-10, atol=1e-13)


def test_coefficients_with_g_fixed():
    a, g = _planted(n=40)
    pm = preprocess_lrm_pefs(a)
    W = fit_lrm_coeffs(pm, g, method="active_set")
    F, X = _fishers(pm)
    # Brute force: NNLS over vec(F_i) with the vec(g_j g_jᵀ) as columns.
    from scipy.optimize import nnls

    M = np.stack([np.outer(gj, gj).ravel() for gj in g], axis=1)
    ref = np.stack([nnls(M, Fi.ravel())[0] for Fi in F])
    np.testing.assert_allclose(W, ref, atol=1e-8)
    np.testing.assert_allclose(fit_lrm_coeffs(pm, g), ref, atol=1e-7)
    with dask.config.set(scheduler="threads"):
        Wd = fit_lrm_coeffs_dask(da.from_array(X, chunks=(9, 11)), g, n_classes=3).compute()
    np.testing.assert_allclose(Wd, fit_lrm_coeffs(pm, g), rtol=1e-12, atol=1e-14)


def test_bad_input_rejected():
    with pytest.raises(UserInputError, match="optimizer"):
        LrmConfig(3, optimizer="sgd")
    with pytest.raises(UserInputError, match="n_classes"):
        preprocess_lrm_pefs(np.ones((2, 3)), np.zeros((2, 3), int), np.zeros((2, 3), int))
    X = da.ones((7, 5), chunks=(7, 2))
    with pytest.raises(UserInputError, match="multiple"):
        fit_lrm_dask(X, LrmConfig(2), n_classes=3)
    with pytest.raises(UserInputError, match="multiples"):
        fit_lrm_coeffs_dask(da.ones((9, 5), chunks=(4, 5)), np.ones((2, 5)), n_classes=3)
