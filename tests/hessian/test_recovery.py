"""Sketched eigendecompositions vs dense oracles: exactness, error bounds, budgets, invariance."""

import numpy as np
import pytest

from curvlake.errors import UserInputError
from curvlake.pipelines.hessian.recovery import (
    MODES,
    SketchBudget,
    budget,
    check_n_eigs,
    check_sketch_config,
    core_from_projections,
    eigh_core,
    extend_krylov_basis,
    nystrom_shift,
    orthonormalize,
    project,
    sketched_eigh,
)
from curvlake.pipelines.hessian.test_matrices import RandomTestMatrix
from tests.hessian.cases import (
    CountingOperator,
    low_rank_indefinite,
    poly_decay,
    reconstruct,
    relative_error,
    symmetric,
    tail_energy,
)

D, K, S = 240, 14, 30
INNER = {"oversampled": S, "recycled": S}


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "ssrft"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", [K, 6])
def test_exact_recovery_when_rank_at_most_k(mode, kind, rank):
    lam = low_rank_indefinite(D, rank)
    a, _ = symmetric(lam, seed=rank)
    res = sketched_eigh(lambda x: a @ x, D, K, mode=mode, s=INNER.get(mode), kind=kind, seed=3)
    assert relative_error(a, reconstruct(res.eigenvalues, res.eigenvectors)) < 1e-10
    expected = lam[np.argsort(-np.abs(lam), kind="stable")][:K]
    np.testing.assert_allclose(res.eigenvalues, expected, atol=1e-9)
    np.testing.assert_allclose(res.eigenvectors.T @ res.eigenvectors, np.eye(K), atol=1e-12)


def test_eigenpairs_are_ordered_by_magnitude():
    lam = np.zeros(D)
    lam[:5] = [1.0, -7.0, 3.0, -0.5, 5.0]
    a, v = symmetric(lam, seed=0)
    res = sketched_eigh(lambda x: a @ x, D, 6, mode="hmt", kind="gaussian", seed=0)
    np.testing.assert_allclose(res.eigenvalues[:5], [-7.0, 5.0, 3.0, 1.0, -0.5], atol=1e-10)
    cos = np.abs(res.eigenvectors[:, 0] @ v[:, 1])
    assert cos == pytest.approx(1.0, abs=1e-10)


def test_nystrom_psd_is_exact_for_low_rank_psd_and_refuses_indefinite():
    lam = np.abs(low_rank_indefinite(D, 8))
    a, _ = symmetric(lam, seed=1)
    res = sketched_eigh(lambda x: a @ x, D, K, mode="nystrom", kind="gaussian", seed=2, psd=True)
    assert np.all(res.eigenvalues >= 0)
    assert relative_error(a, reconstruct(res.eigenvalues, res.eigenvectors)) < 1e-10
    b, _ = symmetric(low_rank_indefinite(D, 8), seed=1)
    with pytest.raises(np.linalg.LinAlgError, match="not PSD"):
        sketched_eigh(lambda x: b @ x, D, K, mode="nystrom", kind="gaussian", seed=2, psd=True)


def test_singlepass_and_nystrom_coincide_after_symmetrization():
    a, _ = symmetric(poly_decay(D), seed=4)
    sp = sketched_eigh(lambda x: a @ x, D, K, mode="singlepass", kind="gaussian", seed=5)
    ny = sketched_eigh(lambda x: a @ x, D, K, mode="nystrom", kind="gaussian", seed=5)
    np.testing.assert_allclose(sp.eigenvalues, ny.eigenvalues, rtol=1e-8)


def _mean_sq_error(a, mode, k, s=None, power_iters=0, seeds=20):
    errs = []
    for seed in range(seeds):
        res = sketched_eigh(
            lambda x: a @ x, a.shape[0], k, mode=mode, s=s, kind="gaussian", seed=seed,
            power_iters=power_iters,
        )  # fmt: skip
        errs.append(np.linalg.norm(a - reconstruct(res.eigenvalues, res.eigenvectors)) ** 2)
    return float(np.mean(errs))


def test_hmt_expected_error_below_the_halko_bound():
    # Halko et al. 2011 Thm 10.5: E‖(I − QQᵀ)A‖²_F <= (1 + ϱ/(k − ϱ − 1)) τ²_{ϱ+1}; for
    # symmetric A, ‖A − QQᵀAQQᵀ‖²_F <= 2 ‖(I − QQᵀ)A‖²_F.
    lam = poly_decay(200, 1.0)
    a, _ = symmetric(lam, seed=0)
    k = 10
    bound = 2 * min((1 + r / (k - r - 1)) * tail_energy(lam, r) for r in range(k - 1))
    err0 = _mean_sq_error(a, "hmt", k)
    err1 = _mean_sq_error(a, "hmt", k, power_iters=1)
    assert tail_energy(lam, k) <= err1 < err0 <= bound


@pytest.mark.parametrize("mode", ["oversampled", "recycled"])
def test_oversampled_expected_error_below_the_tyuc_bound(mode):
    # Tropp et al. 2019 Thm 5.1 (α = 1, s >= 2k + 1). Proven for independent test matrices
    # ("oversampled"); the seed's "recycled" sketch reuses Ψ and is only checked empirically.
    lam = poly_decay(200, 1.0)
    a, _ = symmetric(lam, seed=0)
    k, s = 10, 21
    bound = (
        (s - 1)
        / (s - k - 1)
        * min((k + r - 1) / (k - r - 1) * tail_energy(lam, r) for r in range(k - 1))
    )
    assert tail_energy(lam, k) <= _mean_sq_error(a, mode, k, s=s) <= bound


@pytest.mark.parametrize(
    ("mode", "s", "q", "probes"),
    [
        ("hmt", None, 0, 0),
        ("hmt", None, 2, 5),
        ("krylov", None, 0, 0),
        ("krylov", None, 3, 4),
        ("oversampled", S, 0, 3),
        ("recycled", S, 0, 0),
        ("recycled", S, 0, 4),
        ("nystrom", None, 0, 2),
        ("singlepass", None, 0, 0),
    ],
)
def test_budget_counts_the_hvps_and_passes_really_spent(mode, s, q, probes):
    op = CountingOperator(symmetric(poly_decay(100), seed=0)[0])
    res = sketched_eigh(op, 100, 8, mode=mode, s=s, kind="gaussian", power_iters=q, n_probes=probes)
    expected = budget(mode, 8, s, power_iters=q, probes=probes)
    assert res.budget == expected == SketchBudget(op.hvps, op.passes)
    assert (res.error is None) == (probes == 0)


def test_budget_table():
    k, s = 100, 200
    assert budget("hmt", k) == (2 * k, 2)
    assert budget("hmt", k, power_iters=3) == (8 * k, 8)
    assert budget("krylov", k) == (2 * k, 2)
    assert budget("krylov", k, power_iters=3) == (5 * k, 5)
    assert budget("oversampled", k, s) == (k + s, 1)
    assert budget("recycled", k, s) == (s, 1)
    assert budget("nystrom", k) == (k, 1)
    assert budget("singlepass", k) == (k, 1)
    assert budget("recycled", k, s, probes=30) == (s + 30, 1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("lanczos", 5), "unknown sketch mode"),
        (("hmt", 0), "k"),
        (("oversampled", 5), "needs the inner sketch size"),
        (("recycled", 5, 4), "must be >= k"),
        (("hmt", 5, 10), "no inner sketch"),
        (("nystrom", 5, None, 1), "needs mode 'hmt' or 'krylov'"),
        (("krylov", 5, 10), "no inner sketch"),
        (("hmt", 5, None, -1), "power_iters"),
    ],
)
def test_config_validation(args, match):
    with pytest.raises(UserInputError, match=match):
        check_sketch_config(*args)


def test_config_validation_against_the_dimension():
    with pytest.raises(UserInputError, match="exceeds the dimension"):
        check_sketch_config("recycled", 5, 50, dim=40)
    with pytest.raises(UserInputError, match="exceeds the dimension"):
        sketched_eigh(lambda x: x, 4, 5, mode="hmt")
    with pytest.raises(UserInputError, match=r"\* k = 45 columns, more than D=40"):
        check_sketch_config("krylov", 5, None, 8, dim=40)


def test_extend_krylov_basis_is_orthonormal_and_orthogonal_to_the_basis():
    rng = np.random.default_rng(0)
    basis = orthonormalize(rng.standard_normal((D, 12)))[0]
    image = rng.standard_normal((D, 6))
    image[:, 5] = basis @ rng.standard_normal(12)  # no new direction in this column
    new = extend_krylov_basis(basis, image)
    assert new.shape == (D, 6)
    np.testing.assert_allclose(new.T @ new, np.eye(6), atol=1e-13)
    np.testing.assert_allclose(basis.T @ new, 0, atol=1e-13)
    # together they span the image
    both = np.concatenate([basis, new], axis=1)
    np.testing.assert_allclose(both @ (both.T @ image[:, :5]), image[:, :5], atol=1e-12)


def test_krylov_is_exact_once_its_basis_covers_the_rank():
    """Rank 20 > k = 8, but the Krylov basis (q + 1) k = 24 columns spans range(A)."""
    lam = low_rank_indefinite(D, 20)
    a, _ = symmetric(lam, seed=4)
    res = sketched_eigh(lambda x: a @ x, D, 8, mode="krylov", kind="gaussian", power_iters=2)
    expected = lam[np.argsort(-np.abs(lam), kind="stable")][:8]
    np.testing.assert_allclose(res.eigenvalues, expected, atol=1e-9)
    hmt = sketched_eigh(lambda x: a @ x, D, 8, mode="hmt", kind="gaussian", power_iters=2)
    assert np.abs(hmt.eigenvalues - expected).max() > 1e-6  # HMT's basis is only k wide


def test_krylov_beats_hmt_at_fewer_hvps_on_a_decaying_spectrum():
    """Block Krylov's Rayleigh-Ritz on the whole Krylov space: with 5k HVPs it is more
    accurate on the top eigenvalues than HMT with 6k (q = 2)."""
    lam = poly_decay(D, 1.0) * np.where(np.arange(D) % 3 == 0, -1.0, 1.0)
    a, _ = symmetric(lam, seed=5)
    expected = lam[np.argsort(-np.abs(lam), kind="stable")][:6]
    errors = {}
    for mode, q in (("krylov", 3), ("hmt", 2)):
        res = sketched_eigh(lambda x: a @ x, D, 10, mode=mode, kind="gaussian", power_iters=q)
        errors[mode] = np.abs(res.eigenvalues[:6] - expected).max() / abs(expected[0])
    assert errors["krylov"] < errors["hmt"] / 10


def test_krylov_keeps_more_ritz_pairs_than_its_block():
    """Blocks of k = 3, depth q = 5: the 18-column basis spans the rank-10 range, so all ten
    eigenpairs come out exact although each pass applies A to three vectors only."""
    lam = low_rank_indefinite(D, 10)
    a, u = symmetric(lam, seed=6)
    res = sketched_eigh(
        lambda x: a @ x, D, 3, mode="krylov", kind="gaussian", power_iters=5, n_eigs=10
    )
    order = np.argsort(-np.abs(lam), kind="stable")[:10]
    np.testing.assert_allclose(res.eigenvalues, lam[order], atol=1e-9)
    overlap = np.linalg.svd(u[:, order].T @ res.eigenvectors, compute_uv=False)
    np.testing.assert_allclose(overlap, 1, atol=1e-9)
    assert res.eigenvectors.shape == (D, 10)
    assert res.budget == budget("krylov", 3, power_iters=5)  # n_eigs costs no HVPs


def test_n_eigs_keeps_the_leading_pairs_of_any_mode():
    a, _ = symmetric(poly_decay(D), seed=2)
    full = sketched_eigh(lambda x: a @ x, D, 8, mode="hmt", kind="gaussian", power_iters=1)
    part = sketched_eigh(
        lambda x: a @ x, D, 8, mode="hmt", kind="gaussian", power_iters=1, n_eigs=3
    )
    np.testing.assert_array_equal(part.eigenvalues, full.eigenvalues[:3])
    np.testing.assert_array_equal(part.eigenvectors, full.eigenvectors[:, :3])


@pytest.mark.parametrize(
    ("mode", "k", "q", "n_eigs", "match"),
    [
        ("krylov", 4, 2, 13, r"n_eigs=13 is more eigenpairs than the Krylov basis .* = 12"),
        ("hmt", 4, 2, 5, r"n_eigs=5 is more eigenpairs than k=4 in mode 'hmt'"),
        ("recycled", 4, 0, 0, r"n_eigs \(eigenpairs kept\) must be an int >= 1"),
    ],
)
def test_n_eigs_validation(mode, k, q, n_eigs, match):
    with pytest.raises(UserInputError, match=match):
        check_n_eigs(mode, k, q, n_eigs)
    assert check_n_eigs(mode, k, q, None) == k


def _row_block_sum(fn, n_rows, block):
    return sum(fn(r, min(r + block, n_rows)) for r in range(0, n_rows, block))


@pytest.mark.parametrize("mode", MODES)
def test_core_is_invariant_to_the_row_blocking_of_the_projections(mode):
    """The lead's map-reduce: projections as sums over row blocks give the same eigenpairs."""
    a, _ = symmetric(poly_decay(D), seed=9)
    k, s = 8, 20
    omega = RandomTestMatrix("gaussian", 1, "outer", (D, k))
    psi = RandomTestMatrix("gaussian", 1, "inner_right", (D, s))
    phi = RandomTestMatrix("gaussian", 1, "inner_left", (D, s))
    outer = psi if mode == "recycled" else omega
    y = a @ outer.columns(0, k)
    if mode == "nystrom":
        y = y + nystrom_shift(np.linalg.norm(y), D) * omega.to_dense()
    q, r = orthonormalize(y)
    a_psi, aq = a @ psi.to_dense(), a @ q
    solutions = []
    for block in (D, 64, 37):

        def rows(tm, x, block=block):
            return _row_block_sum(lambda r0, r1: tm.transpose_matmul(x[r0:r1], r0), D, block)

        projections = {
            "hmt": {"qt_aq": _row_block_sum(lambda r0, r1: project(q[r0:r1], aq[r0:r1]), D, block)},
            "krylov": {
                "qt_aq": _row_block_sum(lambda r0, r1: project(q[r0:r1], aq[r0:r1]), D, block)
            },
            "singlepass": {"r": r, "omega_t_q": rows(omega, q)},
            "nystrom": {"r": r, "omega_t_y": rows(omega, y)},
        }.get(mode, {"inner": rows(phi, a_psi), "phi_t_q": rows(phi, q), "psi_t_q": rows(psi, q)})
        solutions.append(core_from_projections(mode, **projections))
    for sol in solutions[1:]:
        np.testing.assert_allclose(sol.eigenvalues, solutions[0].eigenvalues, rtol=1e-10)
        np.testing.assert_allclose(np.abs(sol.rotation), np.abs(solutions[0].rotation), atol=1e-8)


def test_float32_sketches():
    a, _ = symmetric(low_rank_indefinite(D, 6), seed=2)
    a32 = a.astype(np.float32)
    res = sketched_eigh(lambda x: a32 @ x, D, K, mode="recycled", s=S, dtype=np.float32)
    assert res.eigenvectors.dtype == np.float32 and res.eigenvalues.dtype == np.float64
    assert relative_error(a, reconstruct(res.eigenvalues, res.eigenvectors)) < 1e-5


def test_eigh_core_symmetrizes_and_orders():
    c = np.array([[1.0, 2.0], [0.0, -3.0]])
    sol = eigh_core(c)
    sym = np.array([[1.0, 1.0], [1.0, -3.0]])
    ev = np.linalg.eigvalsh(sym)
    np.testing.assert_allclose(sol.eigenvalues, ev[np.argsort(-np.abs(ev))])
    assert sol.eigenvalues[0] < 0 < sol.eigenvalues[1]
    np.testing.assert_allclose((sol.rotation * sol.eigenvalues) @ sol.rotation.T, sym, atol=1e-14)


def test_core_from_projections_names_missing_inputs():
    with pytest.raises(ValueError, match="qt_aq"):
        core_from_projections("hmt")
    with pytest.raises(ValueError, match="phi_t_q"):
        core_from_projections("recycled", inner=np.eye(3))
    with pytest.raises(UserInputError, match="rcond"):
        core_from_projections("hmt", qt_aq=np.eye(2), rcond=2.0)
