"""Cross-method analyses against direct computations on tiny artifacts, and their refusals of
inputs that do not describe the same thing."""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from click.testing import CliRunner
from scipy.special import log_softmax

from curvlake._cli.common import Settings
from curvlake._cli.compare import compare
from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.compare import (
    npeff_top_parameters,
    run_drift,
    run_eigs_of,
    run_examples,
    run_layers,
    run_masks_eigenspace,
)
from curvlake.pipelines.hessian.overlap import GrassmannMetrics, grassmann_metrics
from curvlake.storage_schema.comparison_drift import METRICS
from tests.report.cases import (
    N_PARAMS,
    TABLE,
    orthonormal,
    put,
    write_eigs,
    write_mask,
    write_npeff_family,
    write_phdlab,
    write_pruning,
    write_run,
    write_stats,
)


@pytest.fixture
def lake(tmp_path):
    return open_lake(tmp_path / "lake", create=True)


@pytest.fixture
def run(lake):
    return write_run(lake, 0, 8)


def _unit(i: int, n: int = N_PARAMS) -> np.ndarray:
    e = np.zeros(n)
    e[i] = 1.0
    return e


# -- masks against eigenspaces --------------------------------------------------------------------


def test_overlap_of_a_mask_with_a_known_subspace(lake, run):
    u = np.stack([_unit(0), _unit(1), (_unit(2) + _unit(3)) / np.sqrt(2)], axis=1)
    eigs = write_eigs(lake, 0, run, 1, vectors=u)
    mask = write_mask(lake, 0, run, [0, 2], {"case": "known"}, "magnitude")
    ds = lake.open(run_masks_eigenspace(lake, eigs, masks=[mask]))
    # column energies in the mask: 1, 0, 1/2
    np.testing.assert_allclose(ds["overlap"].values[0], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(ds["baseline"].values, [2 / N_PARAMS])
    assert ds["mask_size"].values.tolist() == [2] and ds["sparsity"].values[0] == 0.8
    assert ds.attrs["run"] == run and ds.attrs["checkpoint"] == 1


def test_overlap_of_every_mask_against_numpy(lake, run):
    rng = np.random.default_rng(0)
    u = orthonormal(rng, N_PARAMS, 4)
    eigs = write_eigs(lake, 0, run, 1, vectors=u)
    pruning = write_pruning(lake, 0, run)
    magnitude = write_mask(lake, 0, run, [1, 4, 9], {"case": "magnitude"}, "magnitude")
    imported = write_mask(lake, 0, run, [3], {"case": "file"}, "file", checkpoint=None)
    write_mask(lake, 0, run, [5], {"case": "other checkpoint"}, "magnitude", checkpoint=0)
    comparison = run_masks_eigenspace(lake, eigs)  # every mask of the run at checkpoint 1
    ds = lake.open(comparison)
    labels = [str(m) for m in ds["mask"].values]
    pruning_masks = [str(m) for g in ("mask", "baseline_mask") for m in lake.group(pruning)[g][:]]
    assert set(labels) == {magnitude, imported, *pruning_masks}  # not the checkpoint-0 mask
    for i, label in enumerate(labels):
        index = np.asarray(lake.group(label)["index"][:])
        k = np.arange(1, 5)
        expected = np.cumsum((u[index] ** 2).sum(axis=0)) / k
        np.testing.assert_allclose(ds["overlap"].values[i], expected, rtol=1e-6)
        assert ds["baseline"].values[i] == index.size / N_PARAMS
    sources = dict(zip(labels, (str(s) for s in ds["mask_source"].values), strict=True))
    assert sources[magnitude] == "magnitude" and sources[imported] == "file"
    assert {sources[m] for m in pruning_masks} == {"prune/mfac", "prune/magnitude"}
    # the pruning artifact names the same masks
    by_pruning = lake.open(run_masks_eigenspace(lake, eigs, pruning=[pruning]))
    assert [str(m) for m in by_pruning["mask"].values] == pruning_masks
    assert run_masks_eigenspace(lake, eigs) == comparison  # same inputs, same artifact


def test_npeff_top_parameters_against_a_direct_sort(lake, run):
    pefs, npeff = write_npeff_family(lake, 0, run)
    group = lake.group(npeff)
    h = np.asarray(group["H"][:], dtype=np.float64)
    kept = np.asarray(group["kept_columns"][:])
    tops = npeff_top_parameters(lake, npeff, 2)
    for j, top in enumerate(tops):
        expected = np.sort(kept[np.argsort(-h[j], kind="stable")[:2]])
        np.testing.assert_array_equal(top, expected)
    eigs = write_eigs(lake, 0, run, 1)
    ds = lake.open(run_masks_eigenspace(lake, eigs, npeff=[npeff], n_top_params=2))
    assert [str(m) for m in ds["mask"].values] == [f"{npeff}:{j}" for j in range(3)]
    u = np.asarray(lake.group(eigs)["eigenvectors"][:], dtype=np.float64)
    for j, top in enumerate(tops):
        expected = np.cumsum((u[top] ** 2).sum(axis=0)) / np.arange(1, 4)
        np.testing.assert_allclose(ds["overlap"].values[j], expected, rtol=1e-6)
    assert pefs in lake.info(npeff).inputs


def test_masks_of_another_run_checkpoint_or_space_are_refused(lake, run):
    eigs = write_eigs(lake, 0, run, 1)
    other_run = write_run(lake, 0, 16)
    other = write_mask(lake, 0, other_run, [1], {"case": "run"}, "magnitude")
    with pytest.raises(UserInputError, match=f"{other} and {eigs} are not of the same run"):
        run_masks_eigenspace(lake, eigs, masks=[other])
    early = write_mask(lake, 0, run, [1], {"case": "early"}, "magnitude", checkpoint=0)
    with pytest.raises(UserInputError, match="not of the same checkpoint: 0 vs 1"):
        run_masks_eigenspace(lake, eigs, masks=[early])
    table = {**TABLE, "layer_shape": np.array(["4,2", "2"], dtype=object)}
    reshaped = write_eigs(lake, 1, run, 1, table=table)
    mask = write_mask(lake, 0, run, [1], {"case": "space"}, "magnitude")
    with pytest.raises(UserInputError, match=r"different parameter spaces.*fc.weight \(2,4\)"):
        run_masks_eigenspace(lake, reshaped, masks=[mask])
    with pytest.raises(UserInputError, match="is a run artifact, not a hessian_eigs"):
        run_masks_eigenspace(lake, run)
    lonely = write_eigs(lake, 2, run, 2)
    with pytest.raises(UserInputError, match=r"no mask of run .* at checkpoint 2.*mask magnitude"):
        run_masks_eigenspace(lake, lonely)


# -- eigenspace drift -----------------------------------------------------------------------------


def test_principal_angles_of_known_subspaces(lake, run):
    t = 0.3
    first = np.stack([_unit(0), _unit(1)], axis=1)
    second = np.stack([_unit(0), np.cos(t) * _unit(1) + np.sin(t) * _unit(2)], axis=1)
    third = np.stack([_unit(5), _unit(6)], axis=1)
    ids = [write_eigs(lake, 0, run, c, vectors=u) for c, u in enumerate((first, second, third))]
    assert run_eigs_of(lake, run) == ids
    ds = lake.open(run_drift(lake, ids))
    np.testing.assert_allclose(ds["angle"].values[0], [0.0, t], atol=1e-7)
    np.testing.assert_allclose(ds["angle"].values[1], [np.pi / 2] * 2, atol=1e-7)
    assert [str(m) for m in ds["metric"].values] == list(METRICS) == list(GrassmannMetrics._fields)
    np.testing.assert_allclose(ds["distance"].values[0], grassmann_metrics(np.array([0, t])))
    assert ds["first_epoch"].values.tolist() == [0, 2] and ds["second_epoch"].values.tolist() == [
        2,
        4,
    ]
    np.testing.assert_allclose(ds["baseline_mean_cos2"].values, 2 / N_PARAMS)
    reference = lake.open(run_drift(lake, ids, mode="reference"))
    assert [str(s) for s in reference["first"].values] == [ids[0], ids[0]]
    assert [str(s) for s in reference["second"].values] == ids[1:]


def test_principal_angles_against_scipy(lake, run):
    rng = np.random.default_rng(1)
    bases = [orthonormal(rng, N_PARAMS, 3) for _ in range(2)]
    ids = [write_eigs(lake, 0, run, c, vectors=u) for c, u in enumerate(bases)]
    ds = lake.open(run_drift(lake, ids, k=2))
    expected = np.sort(scipy.linalg.subspace_angles(bases[0][:, :2], bases[1][:, :2]))
    np.testing.assert_allclose(ds["angle"].values[0], expected, atol=1e-6)
    assert ds.attrs["k"] == 2


def test_drift_refuses_other_parameter_spaces_and_bad_k(lake, run):
    first = write_eigs(lake, 0, run, 0)
    table = {**TABLE, "layer": np.array(["fc.weight", "head.bias"], dtype=object)}
    other = write_eigs(lake, 1, run, 1, table=table)
    with pytest.raises(
        UserInputError,
        match=rf"{first} and {other} index different parameter.*"
        r"fc.bias \(2\) vs head.bias \(2\)",
    ):
        run_drift(lake, [first, other])
    second = write_eigs(lake, 0, run, 1)
    with pytest.raises(UserInputError, match=r"k=4 is not valid.*smallest eigenspace has k=3"):
        run_drift(lake, [first, second], k=4)
    with pytest.raises(UserInputError, match="two or more distinct"):
        run_drift(lake, [first, first])


# -- examples -------------------------------------------------------------------------------------


def test_examples_correlations_against_direct_computations(lake, run):
    wide = write_run(lake, 0, 32)
    stats = write_stats(lake, 0, [wide, run])
    pefs, npeff = write_npeff_family(lake, 0, run)
    ds = lake.open(run_examples(lake, npeff, stats=stats, n_top=4))
    names = [str(s) for s in ds["statistic"].values]
    assert names == [
        "loss",
        "max_probability",
        "pef_norm",
        "jacobian_operator",
        "jacobian_frobenius",
        "cross_entropy",
        "accuracy",
    ]
    w = np.asarray(lake.group(npeff)["W"][:], dtype=np.float64)
    group = lake.group(pefs)
    logits = np.asarray(group["logits"][:], dtype=np.float64)
    label = np.asarray(group["label"][:])
    values = {
        "loss": -log_softmax(logits, axis=1)[np.arange(len(label)), label],
        "max_probability": np.exp(log_softmax(logits, axis=1)).max(axis=1),
        "pef_norm": np.asarray(group["dense_norm"][:], dtype=np.float64),
    }
    sample_id = np.asarray(group["sample_id"][:])  # 3..14: rows 3..14 of the stats
    stats_ds = lake.open(stats)
    for name in names[3:]:
        values[name] = stats_ds[name].values[1, 1, sample_id]  # run 1, epoch 2 = checkpoint 1
    for j in range(3):
        for s, name in enumerate(names):
            rho = scipy.stats.spearmanr(w[:, j], values[name]).statistic
            ranks = np.corrcoef(scipy.stats.rankdata(w[:, j]), scipy.stats.rankdata(values[name]))
            np.testing.assert_allclose(ds["spearman"].values[j, s], rho)
            np.testing.assert_allclose(ds["spearman"].values[j, s], ranks[0, 1])
        top = np.argsort(-w[:, j], kind="stable")[:4]
        assert ds["top_example"].values[j].tolist() == top.tolist()
        np.testing.assert_array_equal(ds["top_sample_id"].values[j], sample_id[top])
        np.testing.assert_allclose(ds["top_w"].values[j], w[top, j])
        for s, name in enumerate(names):
            np.testing.assert_allclose(ds["top_value"].values[j, :, s], values[name][top])
    np.testing.assert_allclose(ds["mean_value"].values, [values[n].mean() for n in names])


def test_examples_refuse_other_runs_splits_epochs_examples(lake, run):
    pefs, npeff = write_npeff_family(lake, 0, run)
    other = write_run(lake, 0, 16)
    not_ours = write_stats(lake, 0, [other])
    with pytest.raises(UserInputError, match=f"{not_ours} has the runs .*not the same run"):
        run_examples(lake, npeff, stats=not_ours)
    ours = write_stats(lake, 1, [run])
    attrs = dict(lake.group(ours).attrs)
    group = lake.group(ours)
    arrays = {name: np.asarray(a[:]) for name, a in group.arrays()}
    on_test = put(
        lake,
        "jacobian_stats",
        arrays,
        {**_kind_attrs(attrs), "split": "test"},
        {"split": "test"},
        [run],
    )
    with pytest.raises(UserInputError, match="not of the same split: test vs train"):
        run_examples(lake, npeff, stats=on_test)
    arrays_epochs = {**arrays, "checkpoint_epoch": np.array([[0, 3, 4]])}
    shifted = put(lake, "jacobian_stats", arrays_epochs, _kind_attrs(attrs), {"e": 1}, [run])
    with pytest.raises(UserInputError, match=r"at epochs \[0, 3, 4\], not epoch 2"):
        run_examples(lake, npeff, stats=shifted)
    few = {
        name: (
            a[..., :10]
            if name
            in ("jacobian_operator", "jacobian_frobenius", "cross_entropy", "accuracy", "label")
            else a
        )
        for name, a in arrays.items()
    }
    few["sample_id"], few["clean_label"] = arrays["sample_id"][:10], arrays["clean_label"][:10]
    fewer = put(lake, "jacobian_stats", few, _kind_attrs(attrs), {"few": 1}, [run])
    with pytest.raises(UserInputError, match=f"5 of the 12 examples of {pefs} are not in {fewer}"):
        run_examples(lake, npeff, stats=fewer)
    with pytest.raises(UserInputError, match="components \\[7\\] out of range"):
        run_examples(lake, npeff, components=[7])


def _kind_attrs(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if not k.startswith("curvlake:") and k != "coordinates"}


# -- layers ---------------------------------------------------------------------------------------


def test_layers_on_one_axis(lake, run):
    saturation, probes, receptive_field = write_phdlab(lake, 0, run)
    ds = lake.open(
        run_layers(lake, saturation=saturation, probes=[probes], receptive_field=receptive_field)
    )
    assert [str(n) for n in ds["layer"].values] == ["conv1", "conv2", "fc"]
    assert ds["epoch"].values.tolist() == [1, 2, 3, 4]  # probes of checkpoint 2 = epoch 4
    sat = lake.open(saturation)
    np.testing.assert_array_equal(ds["saturation"].values, sat["saturation"].values[:, 1, :])
    probe = ds["probe_accuracy"].values
    assert np.isnan(probe[:3]).all()
    np.testing.assert_array_equal(probe[3], lake.group(probes)["test_accuracy"][:])
    rf = lake.open(receptive_field)
    np.testing.assert_array_equal(ds["receptive_field_min"].values, rf["r_min"].values)
    assert ds["input_size"].values.tolist() == [8, 8]
    assert ds.attrs["border_layer"] == "conv2" and ds.attrs["run"] == run
    train = lake.open(run_layers(lake, saturation=saturation, phase="train"))
    np.testing.assert_array_equal(train["saturation"].values, sat["saturation"].values[:, 0, :])
    assert np.isnan(train["receptive_field_min"].values).all()


def test_layers_refuse_other_runs_and_foreign_layers(lake, run):
    saturation, _, _ = write_phdlab(lake, 0, run)
    other = write_run(lake, 0, 16)
    _, probes, _ = write_phdlab(lake, 1, other)
    with pytest.raises(
        UserInputError, match=f"{probes} and the other inputs are not of the same run"
    ):
        run_layers(lake, saturation=saturation, probes=[probes])
    arrays = {name: np.asarray(a[:]) for name, a in lake.group(saturation).arrays()}
    arrays["layer"] = np.array(["a", "b", "c"], dtype=object)
    attrs = _kind_attrs(dict(lake.group(saturation).attrs))
    foreign = put(lake, "saturation", arrays, attrs, {"foreign": 1}, [run])
    _, _, receptive_field = write_phdlab(lake, 2, run)
    with pytest.raises(UserInputError, match="have no layer in common"):
        run_layers(lake, saturation=foreign, receptive_field=receptive_field)
    with pytest.raises(UserInputError, match="give a saturation, probes or receptive_field"):
        run_layers(lake)
    with pytest.raises(UserInputError, match="phase='test' is not valid"):
        run_layers(lake, saturation=saturation, phase="test")


# -- command line ---------------------------------------------------------------------------------


def test_cli_compare_writes_the_artifact_and_its_figure(lake, run, tmp_path):
    eigs = write_eigs(lake, 0, run, 1)
    write_mask(lake, 0, run, [0, 1], {"case": "cli"}, "magnitude")
    settings = Settings(lake.url, None, None, "sync", None)
    figures = tmp_path / "figures"
    result = CliRunner().invoke(
        compare, ["masks-eigenspace", eigs, "--figures", str(figures)], obj=settings
    )
    assert result.exit_code == 0, result.output
    artifact = result.output.splitlines()[0]
    assert lake.info(artifact).kind == "comparison_masks"
    assert sorted(p.suffix for p in figures.iterdir()) == [".png", ".svg"]
    ids = [write_eigs(lake, 0, run, c) for c in (0, 2)]
    drift = CliRunner().invoke(
        compare, ["drift", "--run", run, "--figures", str(figures)], obj=settings
    )
    assert drift.exit_code == 0, drift.output
    assert lake.open(drift.output.splitlines()[0]).sizes["pair"] == 2
    both = CliRunner().invoke(compare, ["drift", *ids, "--run", run], obj=settings)
    assert "not both" in both.output
