"""The Hessian pipeline against dense float64 oracles on tiny nets, the in-memory reference
(``recovery.sketched_eigh``), HVP accounting per mode, chunking invariance and bad input."""

import numpy as np
import pytest
import torch

from curvlake.autodiff import CurvatureOperator
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.hessian.recovery import budget, sketched_eigh
from curvlake.pipelines.hessian.sketch import balanced_rows, hessian_subset, run_hessian_sketch
from curvlake.pipelines.hessian.solve import (
    EXACT_MAX_PARAMS,
    run_hessian_eig,
    run_hessian_eig_checkpoints,
    run_hessian_solve,
)
from curvlake.pipelines.skeleton import load_block, resolve_run
from tests.hessian.pipeline_cases import (
    dense_hessian,
    projector_distance,
    top_eigenpairs,
    train_linear_run,
)
from tests.pipelines.contract import train_tiny_run

N = 40
K = 8
INNER = {"recycled": 16, "oversampled": 16}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("hessian") / "lake", create=True)
    return lake, train_tiny_run(lake)


@pytest.fixture(scope="module")
def operator(setup):
    lake, run = setup
    block = load_block(lake.url, run, -1, "train", slice(0, N), "float64")
    return CurvatureOperator(block.model, block.x, block.y, dtype=torch.float64)


def _eig(lake, run, **options):
    options = {"n_examples": N, "k": K, "probes": 5, "dtype": "float64", **options}
    return run_hessian_eig(lake, run, progress=False, **options)


@pytest.mark.parametrize(
    ("mode", "noise"),
    [
        ("recycled", "ssrft"),
        ("oversampled", "gaussian"),
        ("hmt", "rademacher"),
        ("krylov", "gaussian"),
        ("krylov", "ssrft"),
        ("nystrom", "ssrft"),
        ("singlepass", "gaussian"),
    ],
)
def test_pipeline_matches_the_in_memory_reference(setup, operator, mode, noise):
    lake, run = setup
    s = INNER.get(mode)
    iters = {"hmt": 1, "krylov": 2}.get(mode)
    block = 4 if mode == "krylov" else 5  # krylov: a divisor of k
    eigs = lake.open(
        _eig(lake, run, recovery=mode, noise=noise, s=s, power_iters=iters, block_size=block)
    )
    ref = sketched_eigh(
        operator.matmat,
        operator.n_params,
        K,
        mode=mode,
        s=s,
        kind=noise,
        seed=0,
        power_iters=iters or 0,
        n_probes=5,
    )
    np.testing.assert_allclose(eigs["eigenvalues"].values, ref.eigenvalues, rtol=1e-9, atol=1e-12)
    assert projector_distance(eigs["eigenvectors"].values, ref.eigenvectors) < 1e-8
    assert eigs.attrs["err2"] == pytest.approx(ref.error.err2, rel=1e-9)
    assert eigs.attrs["frob2"] == pytest.approx(ref.error.frob2, rel=1e-9)
    # the stored budget is the operators' count, and the reference's
    expected = budget(mode, K, s, iters or 0, probes=5)
    assert (eigs.attrs["n_hvps"], eigs.attrs["n_passes"]) == tuple(expected) == tuple(ref.budget)
    sketch = lake.group(eigs.attrs["sketch"]).attrs
    widest = max(INNER.get(mode, K), 5)  # task i takes block i of every source of its round
    tasks = -(-widest // block) + (expected.data_passes - 1) * -(-K // block)
    assert sketch["n_data_passes"] == tasks


def _low_rank_case(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    run = train_linear_run(lake)
    lam, u = top_eigenpairs(dense_hessian(lake, run, slice(0, 3)), 27)
    assert abs(lam[-1]) > 1e-3 * abs(lam[0])  # a gap to the zero eigenvalues
    return lake, run, lam, u


def _check_recovered(lake, run, lam, u, mode):
    s = 60 if mode in INNER else None
    eigs = lake.open(
        run_hessian_eig(
            lake,
            run,
            n_examples=3,
            k=30,
            s=s,
            recovery=mode,
            probes=3,
            dtype="float64",
            progress=False,
        )
    )
    np.testing.assert_allclose(eigs["eigenvalues"].values[:27], lam, rtol=1e-8, err_msg=mode)
    assert projector_distance(eigs["eigenvectors"].values[:, :27], u) < 1e-7, mode
    assert eigs.attrs["err2"] < 1e-12 * eigs.attrs["frob2"], mode


def test_low_rank_hessian_is_recovered_exactly(tmp_path):
    """Softmax regression on 3 examples: its Hessian has rank 27 <= k, and the sketch
    recovers the nonzero eigenpairs of the autograd Hessian (eigenvalues, subspace)."""
    _check_recovered(*_low_rank_case(tmp_path), "recycled")


@pytest.mark.slow
def test_low_rank_hessian_is_recovered_exactly_by_every_mode(tmp_path):
    case = _low_rank_case(tmp_path)
    for mode in ("oversampled", "hmt", "krylov", "nystrom", "singlepass"):
        _check_recovered(*case, mode)


def test_exact_method_is_the_autograd_hessian(setup):
    lake, run = setup
    h = dense_hessian(lake, run, slice(0, N))
    lam, u = top_eigenpairs(h, K)
    eigs = lake.open(_eig(lake, run, method="exact", probes=None, block_size=1024))
    np.testing.assert_allclose(eigs["eigenvalues"].values, lam, rtol=1e-10)
    stored = eigs["eigenvectors"].values
    signed = u * np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(K)])
    np.testing.assert_allclose(stored, signed, atol=1e-7)
    assert eigs.attrs["frob2"] == pytest.approx(np.sum(h**2), rel=1e-10)
    all_lam = np.linalg.eigvalsh(h)
    assert eigs.attrs["err2"] == pytest.approx(np.sum(all_lam**2) - np.sum(lam**2), rel=1e-8)
    scree = eigs["scree_upper"].values
    np.testing.assert_allclose(scree, eigs["scree_lower"].values)
    assert scree[0] == pytest.approx(1.0) and np.all(np.diff(scree) <= 0)
    assert eigs.attrs["n_hvps"] == h.shape[0] and eigs.attrs["method"] == "exact"


def test_power_iterations_converge_to_the_exact_top_eigenpairs(setup):
    lake, run = setup
    exact = lake.open(_eig(lake, run, method="exact", probes=None, block_size=1024))
    errors = []
    for iters in (None, 2):
        eigs = lake.open(_eig(lake, run, recovery="hmt", power_iters=iters, probes=0))
        lam = eigs["eigenvalues"].values[:3]
        errors.append(np.max(np.abs(lam - exact["eigenvalues"].values[:3]) / np.abs(lam)))
        # sketched and exact eigenpairs are stored alike: same arrays, same sign convention
        assert set(eigs.data_vars) <= set(exact.data_vars) | {"probe_norms"}
    assert errors[1] < 0.02 < errors[0]


def test_row_blocks_and_column_blocks_do_not_change_the_result(setup):
    lake, run = setup
    one = lake.open(_eig(lake, run, block_size=16))
    for options in ({"block_size": 3, "param_block_size": 64}, {"param_block_size": 100}):
        other = lake.open(_eig(lake, run, **options))
        np.testing.assert_allclose(
            other["eigenvalues"].values, one["eigenvalues"].values, rtol=1e-10
        )
        np.testing.assert_allclose(
            other["eigenvectors"].values, one["eigenvectors"].values, atol=1e-8
        )
        assert other.attrs["err2"] == pytest.approx(one.attrs["err2"], rel=1e-9)
    assert lake.open(_eig(lake, run, param_block_size=64))["eigenvectors"].data.chunks[0][0] == 64


def test_solve_reuses_its_artifact_and_eig_over_checkpoints(setup):
    lake, run = setup
    sketch = run_hessian_sketch(lake, run, n_examples=N, k=K, probes=0, progress=False)
    assert run_hessian_solve(lake, sketch) == run_hessian_solve(lake, sketch)
    ids = run_hessian_eig_checkpoints(lake, run, "all", n_examples=N, k=4, probes=0, progress=False)
    assert [lake.group(i).attrs["checkpoint"] for i in ids] == [0, 1]


def test_krylov_keeps_more_ritz_pairs_than_its_block_as_the_kernel_does(setup, operator):
    """Blocks of 4, depth 3, 10 Ritz pairs: the pipeline's solve keeps what the kernel keeps;
    a later solve of the same sketch with another n_eigs is its own artifact, and asking for
    more than the basis holds is refused before anything is staged."""
    lake, run = setup
    options = {"recovery": "krylov", "noise": "gaussian", "power_iters": 3, "k": 4}
    eigs_id = _eig(lake, run, n_eigs=10, block_size=4, **options)
    eigs = lake.open(eigs_id)
    ref = sketched_eigh(
        operator.matmat,
        operator.n_params,
        4,
        mode="krylov",
        kind="gaussian",
        seed=0,
        power_iters=3,
        n_eigs=10,
        n_probes=5,
    )
    np.testing.assert_allclose(eigs["eigenvalues"].values, ref.eigenvalues, rtol=1e-9, atol=1e-12)
    assert eigs["eigenvectors"].shape == (operator.n_params, 10)
    assert projector_distance(eigs["eigenvectors"].values, ref.eigenvectors) < 1e-8
    assert eigs.attrs["err2"] == pytest.approx(ref.error.err2, rel=1e-9)
    assert (eigs.attrs["k"], eigs.attrs["outer"]) == (10, 4)
    sketch = eigs.attrs["sketch"]
    four = run_hessian_solve(lake, sketch)
    assert four != eigs_id and lake.open(four)["eigenvalues"].shape == (4,)
    before = sorted(i.id for i in lake.list())
    with pytest.raises(UserInputError, match=r"^n_eigs=17 is more eigenpairs than the Krylov"):
        run_hessian_solve(lake, sketch, n_eigs=17)
    assert sorted(i.id for i in lake.list()) == before


def test_subsets_first_and_class_balanced(setup):
    lake, run = setup
    info = resolve_run(lake, run)
    first = hessian_subset(info, "train", 30, False, 0)
    assert first.rows == slice(0, 30) and first.n == 30
    labels = info.split("train").y
    rows = balanced_rows(labels, 25, 10, seed=3)
    counts = np.bincount(labels[rows], minlength=10)
    assert counts.sum() == 25 and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(rows, balanced_rows(labels, 25, 10, seed=3))
    assert not np.array_equal(rows, balanced_rows(labels, 25, 10, seed=4))
    assert np.all(np.diff(rows) > 0)
    with pytest.raises(UserInputError, match="--balanced needs --n-examples"):
        hessian_subset(info, "train", None, True, 0)
    with pytest.raises(UserInputError, match="needs 2 of class 0"):
        balanced_rows(np.ones(30, dtype=int), 20, 10, seed=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 700}, r"k=700 exceeds the dimension D=610"),
        ({"recovery": "recycled", "s": 4}, r"s=4 must be >= k=8"),
        ({"recovery": "hmt", "s": 16}, r"mode 'hmt' has no inner sketch"),
        ({"recovery": "nystrom", "power_iters": 1}, r"power_iters=1 needs mode 'hmt'"),
        ({"recovery": "lanczos"}, r"recovery='lanczos' is not valid"),
        ({"noise": "sparse"}, r"noise='sparse' is not valid"),
        ({"method": "exact", "recovery": "hmt"}, r"^recovery, probes does not apply to --me"),
        ({"method": "exact", "probes": None, "seed": 3}, r"seed does not apply to --method ex"),
        ({"method": "exact", "probes": None, "k": 611}, r"k=611 is not valid"),
        ({"n_examples": 5000}, r"n_examples=5000 is not valid"),
        ({"rcond": 2.0}, r"rcond=2.0 is not valid"),
        (
            {"recovery": "krylov", "k": 4, "power_iters": 2, "n_eigs": 13},
            r"n_eigs=13 is more eigenpairs than the Krylov basis of \(power_iters \+ 1\) \* k = 12",
        ),
        ({"recovery": "hmt", "n_eigs": 9}, r"n_eigs=9 is more eigenpairs than k=8 in mode 'hmt'"),
        ({"method": "exact", "probes": None, "n_eigs": 3}, r"n_eigs does not apply to --method"),
    ],
)
def test_bad_input_is_refused_before_staging(setup, options, message):
    lake, run = setup
    before = sorted(i.id for i in lake.list())
    with pytest.raises(UserInputError, match=message) as raised:
        _eig(lake, run, **options)
    assert "\n" not in str(raised.value)
    assert sorted(i.id for i in lake.list()) == before


def test_exact_method_refuses_large_nets(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    run = train_tiny_run(lake, model_params={"widths": [128]})  # 9610 parameters
    assert resolve_run(lake, run).n_params > EXACT_MAX_PARAMS
    with pytest.raises(UserInputError, match=r"limited to nets of at most 8192 parameters"):
        run_hessian_eig(lake, run, method="exact", n_examples=10, k=4)
