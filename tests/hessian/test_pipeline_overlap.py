"""``run_hessian_overlap`` against in-memory overlaps and principal angles, its input checks,
sketched vs exact overlaps, the plot and the ``curvlake hessian`` commands."""

import numpy as np
import pytest
import scipy.linalg
from click.testing import CliRunner

from curvlake._cli.hessian import hessian
from curvlake.cli import cli
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.hessian.overlap import grassmann_metrics, mask_overlap
from curvlake.pipelines.hessian.overlap_pipeline import run_hessian_overlap
from curvlake.pipelines.hessian.plot import plot_hessian
from curvlake.pipelines.hessian.solve import run_hessian_eig
from curvlake.pipelines.masks import run_magnitude_mask
from curvlake.pipelines.skeleton import resolve_run
from tests.hessian.pipeline_cases import train_linear_run
from tests.pipelines.contract import train_tiny_run

K = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("overlap") / "lake", create=True)
    run = train_tiny_run(lake)
    eigs = run_hessian_eig(
        lake,
        run,
        n_examples=30,
        k=K,
        probes=4,
        dtype="float64",
        param_block_size=50,
        progress=False,
    )
    return lake, run, eigs


def test_overlap_matches_the_in_memory_metrics(setup):
    lake, run, eigs_id = setup
    overlap_id = run_hessian_overlap(lake, eigs_id, mask="magnitude", mask_size=10)
    assert run_hessian_overlap(lake, eigs_id, mask="magnitude", mask_size=10) == overlap_id
    lake.validate(overlap_id)
    ds = lake.open(overlap_id)
    u = lake.open(eigs_id)["eigenvectors"].values
    theta = resolve_run(lake, run).theta(-1).astype(np.float64)
    mask = np.sort(np.argsort(-np.abs(theta), kind="stable")[:10])
    np.testing.assert_array_equal(lake.group(ds.attrs["mask"])["index"][:], mask)
    np.testing.assert_allclose(ds["overlap"].values, mask_overlap(u, mask), rtol=1e-12)
    np.testing.assert_allclose(ds["iou"].values, ds["overlap"] / (2 - ds["overlap"]))
    assert ds.attrs["baseline"] == 10 / u.shape[0]
    ranked = np.argsort(-np.abs(theta), kind="stable")
    nested = [np.sum(u[ranked[:j], :j] ** 2) / j for j in range(1, K + 1)]
    np.testing.assert_allclose(ds["nested_overlap"].values, nested, rtol=1e-12)
    np.testing.assert_allclose(ds["nested_baseline"].values, np.arange(1, K + 1) / u.shape[0])
    e_m = np.eye(u.shape[0])[:, mask]
    angles = np.sort(scipy.linalg.subspace_angles(e_m, u))
    np.testing.assert_allclose(ds["principal_angles"].values, angles, atol=1e-7)
    assert ds.attrs["geodesic"] == pytest.approx(grassmann_metrics(angles).geodesic, abs=1e-7)
    assert ds.attrs["mean_cos2"] == pytest.approx(np.mean(np.cos(angles) ** 2), abs=1e-10)


def test_layer_masks_stored_masks_and_refusals(setup, tmp_path):
    lake, run, eigs_id = setup
    layer = lake.open(run_hessian_overlap(lake, eigs_id, mask="magnitude:layer"))
    assert layer.attrs["mask_size"] == K and "nested_overlap" not in layer
    stored = run_magnitude_mask(lake, run, size=12, scope="global")
    ds = lake.open(run_hessian_overlap(lake, eigs_id, mask=stored))
    assert ds.attrs["mask"] == stored and ds.attrs["mask_size"] == 12
    other_run = train_tiny_run(lake, seed=1)
    foreign = run_magnitude_mask(lake, other_run, size=12)
    before = sorted(i.id for i in lake.list())
    for options, message in [
        ({"mask": foreign}, r"indexes the parameters of run run-"),
        ({"mask": stored, "mask_size": 3}, r"--mask-size applies to --mask magnitude"),
        ({"mask": "largest"}, r"--mask 'largest' is not valid"),
        ({"mask": "magnitude", "mask_size": 10_000}, r"mask_size=10000 is not valid"),
        ({"mask": "magnitude", "mask_size": 0}, r"mask_size=0 is not valid"),
    ]:
        with pytest.raises(UserInputError, match=message):
            run_hessian_overlap(lake, eigs_id, **options)
    assert sorted(i.id for i in lake.list()) == before
    with pytest.raises(UserInputError, match="is a run artifact, not a hessian_eigs"):
        run_hessian_overlap(lake, run)


def test_sketched_and_exact_overlaps_agree_on_a_low_rank_hessian(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    run = train_linear_run(lake)
    common = {"n_examples": 3, "k": 30, "dtype": "float64", "progress": False}
    sketched = run_hessian_eig(lake, run, s=60, probes=0, **common)
    exact = run_hessian_eig(lake, run, method="exact", block_size=1024, **common)
    curves = [
        lake.open(run_hessian_overlap(lake, e, mask="magnitude", mask_size=50))["overlap"].values
        for e in (sketched, exact)
    ]
    # the 27 nonzero eigenpairs are recovered exactly; beyond them the null space is arbitrary
    np.testing.assert_allclose(curves[0][:27], curves[1][:27], rtol=1e-7)


def test_plot_one_and_several_checkpoints(setup, tmp_path):
    lake, run, eigs_id = setup
    first = run_hessian_eig(
        lake, run, checkpoint=0, n_examples=30, k=K, probes=4, dtype="float64", progress=False
    )
    overlaps = [run_hessian_overlap(lake, e) for e in (first, eigs_id)]
    for ids, name in ((overlaps[:1], "one.png"), (overlaps, "two.png"), ([eigs_id], "s.png")):
        path = plot_hessian(lake, ids, tmp_path / name)
        assert path.stat().st_size > 10_000
    with pytest.raises(UserInputError, match="not hessian_eigs, hessian_overlap"):
        plot_hessian(lake, [eigs_id, overlaps[0]], tmp_path / "mixed.png")
    with pytest.raises(UserInputError, match="does not exist"):
        plot_hessian(lake, overlaps, tmp_path / "missing" / "f.png")


def _cli(lake, *args):
    cli.add_command(hessian)  # the lead registers the group in curvlake/cli.py
    result = CliRunner().invoke(
        cli, ["--lake", lake.url, "--cluster", "sync", "hessian", *args], catch_exceptions=False
    )
    return result, [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def test_cli_eig_overlap_plot_and_one_line_errors(setup, tmp_path):
    lake, run, _ = setup
    common = ("--run", run, "--n-examples", "30", "--outer", "4", "--probes", "2")
    result, eigs = _cli(lake, "eig", *common, "--checkpoints", "all")
    assert result.exit_code == 0 and len(eigs) == 2
    assert "sketch: top-4 eigenvalues" in result.stdout and "checkpoint 1" in result.stdout
    result, overlaps = _cli(lake, "overlap", *eigs, "--mask", "magnitude:global")
    assert result.exit_code == 0 and len(overlaps) == 2
    assert "overlap at k'=4: " in result.stdout and "random mask" in result.stdout
    result, paths = _cli(lake, "plot", *overlaps, "--out", str(tmp_path / "f.png"))
    assert result.exit_code == 0 and paths == [str(tmp_path / "f.png")]
    result, sketches = _cli(lake, "sketch", *common, "--recovery", "hmt")
    result, solved = _cli(lake, "solve", *sketches)
    assert result.exit_code == 0 and solved[0].startswith("hessian_eigs-")
    krylov = ("--recovery", "krylov", "--power-iters", "2")
    result, sketches = _cli(lake, "sketch", *common, *krylov)
    result, solved = _cli(lake, "solve", *sketches, "--eigs", "10")
    assert result.exit_code == 0 and "top-10 eigenvalues" in result.stdout
    assert "estimated relative error of the rank-10 part" in result.stdout
    result, _ = _cli(lake, "solve", *sketches, "--eigs", "13")
    assert result.exit_code == 1 and "n_eigs=13 is more eigenpairs than the Krylov" in result.output
    result, _ = _cli(lake, "eig", *common, "--recovery", "hmt", "--inner", "8")
    assert result.exit_code == 1 and "mode 'hmt' has no inner sketch" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result, _ = _cli(lake, "eig", *common, "--checkpoint", "0", "--checkpoints", "all")
    assert result.exit_code == 2 and "not both" in result.output
