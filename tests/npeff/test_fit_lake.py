"""NPEFF fits through the lake: against the in-memory solver, resume after SIGKILL, workers."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
import zarr
from click.testing import CliRunner

from curvlake.cli import cli
from curvlake.engine import client_session
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.npeff import fit as fit_module
from curvlake.pipelines.npeff import nmf
from curvlake.pipelines.npeff.compute_pefs import run_pefs
from curvlake.pipelines.npeff.fit import (
    dense_components,
    run_npeff_coeffs,
    run_npeff_fit,
    run_npeff_sparsify,
)
from curvlake.pipelines.train import run_train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pef_lake(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("npeff"), create=True)
    run_id = run_train(
        lake,
        {"model": "mlp", "model_params": {"widths": [16]}, "epochs": 1, "device": "cpu", "lr": 0.1},
        progress=False,
    )
    pefs = run_pefs(lake, run_id, n_examples=80, k=64, block_size=32, progress=False)
    test_pefs = run_pefs(lake, run_id, split="test", n_examples=20, k=64, progress=False)
    return lake, run_id, pefs, test_pefs


def _dense_A(lake, pefs_id, kept):
    ds = lake.open(pefs_id)
    values, indices = ds["values"].values.astype(np.float64), ds["indices"].values
    n, k = values.shape
    A = sp.csr_matrix(
        (values.ravel(), (np.repeat(np.arange(n), k), indices.ravel())),
        shape=(n, ds.attrs["n_parameters"]),
    ).toarray()
    A /= ds["dense_norm"].values[:, None].astype(np.float64) + nmf.NORM_EPS
    return A[:, kept]


@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_matches_in_memory_solver_and_logs_true_loss(pef_lake, solver):
    lake, _, pefs, _ = pef_lake
    npeff_id = run_npeff_fit(
        lake,
        pefs,
        n_components=4,
        solver=solver,
        max_iter=15,
        tol=0,
        block_size=100,
        progress=False,
    )
    ds = lake.open(npeff_id)
    kept = ds["kept_columns"].values
    A = _dense_A(lake, pefs, kept)
    assert (A.sum(axis=0) > 0).all() and ds.sizes["column"] == A.shape[1]
    reference = nmf.fit_nmf(
        [sp.csr_matrix(A[:, s : s + 100].astype(np.float32)) for s in range(0, A.shape[1], 100)],
        nmf.NmfConfig(n_components=4, solver=solver, max_iter=15, tol=0),
    )
    np.testing.assert_allclose(ds["W"].values, reference.W, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ds["H"].values, reference.H, rtol=1e-3, atol=1e-6)
    W, H = ds["W"].values, ds["H"].values.astype(np.float64)
    direct = np.linalg.norm(A - W @ H) / np.linalg.norm(A)
    np.testing.assert_allclose(ds["loss"].values[-1], direct, rtol=1e-4)
    assert ds.sizes["iteration"] == 16 and (ds["W"].values >= 0).all()


def test_worker_count_does_not_change_the_fit(pef_lake):
    lake, _, pefs, _ = pef_lake
    options = {"n_components": 3, "max_iter": 8, "tol": 0, "progress": False}
    alone = lake.open(run_npeff_fit(lake, pefs, block_size=90, **options))
    with client_session(cluster="local", n_workers=2, threads_per_worker=1, processes=False):
        spread = lake.open(run_npeff_fit(lake, pefs, block_size=37, **options))
    np.testing.assert_allclose(spread["W"].values, alone["W"].values, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(spread["loss"].values, alone["loss"].values, rtol=1e-6)


def test_blocks_kept_in_memory_when_they_fit_else_streamed(pef_lake, monkeypatch):
    """Persisted A (fits the budget) and streamed A (out of core) give the same fit; only the
    streamed one reads every block again on every pass."""
    lake, _, pefs, _ = pef_lake
    loads = []
    load_block = fit_module._load_block

    def counting_load(url, widths, b):
        loads.append(b)
        return load_block(url, widths, b)

    monkeypatch.setattr(fit_module, "_load_block", counting_load)
    results = {}
    for name, share in (("persisted", fit_module.PERSIST_SHARE), ("streamed", 0.0)):
        monkeypatch.setattr(fit_module, "PERSIST_SHARE", share)
        loads.clear()
        options = {"n_components": 3, "max_iter": 6, "tol": 0, "block_size": 50}
        npeff_id = run_npeff_fit(lake, pefs, progress=False, **options)
        ds = lake.open(npeff_id).load()
        results[name] = (ds, sorted(loads), -(-ds.sizes["column"] // 50))
        shutil.rmtree(Path(lake.url) / "npeff" / npeff_id)  # the same fit again, from scratch
    persisted, persisted_loads, n_blocks = results["persisted"]
    streamed, streamed_loads, _ = results["streamed"]
    assert persisted_loads == list(range(n_blocks))
    assert len(streamed_loads) >= 6 * n_blocks
    np.testing.assert_array_equal(persisted["W"].values, streamed["W"].values)
    np.testing.assert_array_equal(persisted["loss"].values, streamed["loss"].values)


def test_killed_fit_resumes_to_the_same_result(pef_lake):
    lake, _, pefs, _ = pef_lake
    options = {"n_components": 3, "max_iter": 40, "tol": 0, "block_size": 40, "solver": "mu"}
    code = (
        "import json,sys; from curvlake.pipelines.npeff.fit import run_npeff_fit; "
        "run_npeff_fit(sys.argv[1], sys.argv[2], progress=False, **json.loads(sys.argv[3]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, lake.url, pefs, json.dumps(options)], cwd=REPO
    )
    staging = Path(lake.url) / "_staging"
    deadline, meta = time.time() + 120, None
    while time.time() < deadline and process.poll() is None:
        states = list(staging.glob("npeff-*/_work/state"))
        if states:
            meta = zarr.open_group(states[0], mode="r").attrs.get("meta")
            if meta and meta["iteration"] >= 3:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert meta and meta["iteration"] < 40, "the fit was not killed mid-way"
    resumed = lake.open(run_npeff_fit(lake, pefs, progress=False, **options))
    uninterrupted = nmf.fit_nmf(
        [
            sp.csr_matrix(b)
            for b in np.array_split(
                _dense_A(lake, pefs, resumed["kept_columns"].values).astype(np.float32),
                range(40, resumed.sizes["column"], 40),
                axis=1,
            )
        ],
        nmf.NmfConfig(n_components=3, solver="mu", max_iter=40, tol=0),
    )
    np.testing.assert_allclose(resumed["W"].values, uninterrupted.W, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(resumed["loss"].values, uninterrupted.losses, rtol=1e-5)


def test_sparsify_round_trip_and_coefficients(pef_lake):
    lake, _, pefs, test_pefs = pef_lake
    npeff_id = run_npeff_fit(lake, pefs, n_components=4, max_iter=20, progress=False)
    dense = lake.open(npeff_id)
    sparse_id = run_npeff_sparsify(lake, npeff_id, threshold=0.0)
    sparse = lake.open(sparse_id)
    WH = dense["W"].values @ dense["H"].values.astype(np.float64)
    WH_sparse = sparse["W"].values @ dense_components(lake, sparse_id).astype(np.float64)
    np.testing.assert_allclose(WH_sparse, WH, rtol=1e-5, atol=1e-9)
    rows = np.linalg.norm(dense_components(lake, sparse_id), axis=1)
    np.testing.assert_allclose(rows[rows > 0], 1, rtol=1e-5)

    coeffs = lake.open(run_npeff_coeffs(lake, npeff_id, test_pefs, block_size=7, progress=False))
    H = dense["H"].values.astype(np.float64)
    A = _dense_A(lake, test_pefs, dense["kept_columns"].values)
    for i in range(3):
        expected, _ = scipy.optimize.nnls(H.T, A[i])
        np.testing.assert_allclose(coeffs["W"].values[i], expected, rtol=1e-4, atol=1e-7)
    # on the sparsified (CSR) components, kept sparse in the tasks
    coeffs = lake.open(run_npeff_coeffs(lake, sparse_id, test_pefs, block_size=7, progress=False))
    H_sparse = dense_components(lake, sparse_id).astype(np.float64)
    for i in range(3):
        expected, _ = scipy.optimize.nnls(H_sparse.T, A[i])
        np.testing.assert_allclose(coeffs["W"].values[i], expected, rtol=1e-4, atol=1e-7)


def test_lowrank_fit_runs_and_refuses_diag(pef_lake):
    lake, run_id, pefs, _ = pef_lake
    with pytest.raises(UserInputError, match="LRM-NPEFF needs lowrank"):
        run_npeff_fit(lake, pefs, n_components=2, kind="lowrank", progress=False)
    low = run_pefs(lake, run_id, n_examples=30, pef_kind="lowrank", k=128, progress=False)
    ds = lake.open(
        run_npeff_fit(
            lake,
            low,
            n_components=2,
            kind="lowrank",
            max_iter=5,
            tol=0,
            lrm_options={"learning_rate": 0.05, "n_iters_g_only": 2},
            progress=False,
        )
    )
    assert ds["G"].shape[0] == 2 and (ds["W"].values >= 0).all()
    assert ds["loss"].values[-1] <= ds["loss"].values[0]
    with pytest.raises(UserInputError, match="n_components"):
        run_npeff_fit(lake, pefs, n_components=0)


def test_cli_lrm_options_are_parsed_as_users_write_them(pef_lake):
    lake, run_id, _, _ = pef_lake
    low = run_pefs(lake, run_id, n_examples=30, pef_kind="lowrank", k=128, progress=False)
    base = ["--lake", lake.url, "--cluster", "sync", "npeff", "fit", "--pefs", low]
    base += ["--components", "2", "--kind", "lowrank", "--max-iter", "3"]
    runner = CliRunner()
    result = runner.invoke(cli, [*base, "--lrm", "learning_rate=1e-3", "--lrm", "n_iters_g_only=1"])
    assert result.exit_code == 0, result.output
    npeff_id = re.search(r"npeff-[0-9a-f]{16}", result.output).group()
    options = lake.info(npeff_id).config["lrm_options"]
    assert options == {"learning_rate": 0.001, "n_iters_g_only": 1}
    for bad, message in (
        ("learning_rate=fast", "learning_rate must be a number, got 'fast'"),
        ("n_iters_g_only=2.5", "n_iters_g_only must be an integer, got 2.5"),
        ("adam_beta=0.9", "bad LRM option"),
    ):
        result = runner.invoke(cli, [*base, "--lrm", bad])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output


@pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
def test_lowrank_loss_is_the_true_relative_loss_and_divergence_is_an_error(pef_lake):
    lake, run_id, _, _ = pef_lake
    low = run_pefs(lake, run_id, n_examples=12, pef_kind="lowrank", storage="dense", progress=False)
    options = {"n_components": 2, "kind": "lowrank", "max_iter": 4, "tol": 0, "progress": False}
    ds = lake.open(run_npeff_fit(lake, low, **options))
    pefs = lake.open(low)
    A = pefs["factors"].values.astype(np.float64)  # (n, C, P)
    A /= np.sqrt(pefs["dense_norm"].values.astype(np.float64) + nmf.NORM_EPS)[:, None, None]
    G = np.zeros((2, A.shape[2]))
    G[:, ds["kept_columns"].values] = ds["G"].values
    W = ds["W"].values
    residual = total = 0.0
    for i in range(A.shape[0]):
        F = A[i].T @ A[i]
        residual += np.sum((F - (G.T * W[i]) @ G) ** 2)
        total += np.sum(F**2)
    np.testing.assert_allclose(ds["loss"].values[-1], np.sqrt(residual / total), rtol=1e-4)
    assert ds["objective"].shape == ds["loss"].shape
    np.testing.assert_allclose(ds["objective"].values[-1], residual, rtol=1e-3)
    with pytest.raises(UserInputError, match=r"diverged at iteration .* lower the learning rate"):
        run_npeff_fit(lake, low, **options, lrm_options={"learning_rate": 1e6})
