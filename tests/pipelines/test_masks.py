"""Mask artifacts: magnitude masks of a run, imported files, pipeline-written masks, the CLI."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from curvlake._cli.common import Settings
from curvlake._cli.masks import mask as mask_group
from curvlake.errors import ArtifactNotFoundError, UserInputError
from curvlake.lake import open_lake
from curvlake.nn.masks import ParameterMask
from curvlake.nn.params import LayerTable
from curvlake.pipelines.masks import (
    import_mask,
    load_mask,
    run_magnitude_mask,
    run_table,
    write_mask,
)
from curvlake.pipelines.train import run_train

TINY = {
    "model": "mlp",
    "model_params": {"widths": [8]},
    "dataset": "digits",
    "epochs": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("lake")
    lake = open_lake(path, create=True)
    return path, lake, run_train(lake, TINY, progress=False)


def _staged(path):
    staging = path / "_staging"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


def _theta(lake, run_id, checkpoint):
    return lake.group(run_id)["theta"][checkpoint]


def test_magnitude_mask_artifact(trained):
    _, lake, run_id = trained
    mask_id = run_magnitude_mask(lake, run_id, fraction=0.1)
    lake.validate(mask_id)
    assert mask_id.startswith("mask-")
    # same options -> same artifact; -1 is checkpoint 1 of a 1-epoch run
    assert run_magnitude_mask(lake, run_id, checkpoint=1, fraction=0.1) == mask_id
    assert run_magnitude_mask(lake, run_id, fraction=0.2) != mask_id
    table = run_table(lake, run_id)
    loaded = load_mask(lake, mask_id)
    assert loaded == ParameterMask.magnitude(_theta(lake, run_id, 1), table, fraction=0.1)
    assert len(loaded) == round(0.1 * table.total)
    ds = lake.open(mask_id)
    assert ds.attrs["source"] == "magnitude" and ds.attrs["scope"] == "global"
    assert ds.attrs["run"] == run_id and ds.attrs["checkpoint"] == 1
    assert ds.attrs["n_params"] == table.total
    assert ds.attrs["parameter_fingerprint"] == table.fingerprint
    assert list(ds.layer.values) == list(table.names)
    np.testing.assert_array_equal(ds.layer_count.values, loaded.count_per_layer())
    assert ds["index"].dtype == np.int64 and (np.diff(ds["index"].values) > 0).all()


def test_layer_scope_and_pattern(trained):
    _, lake, run_id = trained
    mask_id = run_magnitude_mask(lake, run_id, checkpoint=0, size=9, scope="layer", layers="bias")
    table = run_table(lake, run_id)
    expected = ParameterMask.magnitude(
        _theta(lake, run_id, 0), table, size=9, scope="layer", layers="bias"
    )
    assert load_mask(lake, mask_id) == expected
    counts = dict(zip(table.names, expected.count_per_layer(), strict=True))
    assert counts["fc1.weight"] == 0 and (counts["fc1.bias"], counts["fc2.bias"]) == (4, 5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of size and fraction"),
        ({"size": 3, "fraction": 0.5}, "exactly one of size and fraction"),
        ({"size": 10**6}, r"size=1000000 must lie in \[0, "),
        ({"fraction": -0.1}, "fraction=-0.1 must be a number"),
        ({"size": 3, "scope": "all"}, "scope='all' is not valid: must be one of global, layer"),
        ({"size": 3, "layers": "conv"}, "layer pattern 'conv' matches none"),
        ({"size": 3, "checkpoint": 2}, r"has checkpoints 0\.\.1"),
        ({"size": 3, "checkpoint": "last"}, "checkpoint='last' is not valid"),
    ],
)
def test_bad_magnitude_options_are_refused_before_staging(trained, options, message):
    path, lake, run_id = trained
    before = (_staged(path), len(lake.list("mask")))
    with pytest.raises(UserInputError, match=message):
        run_magnitude_mask(lake, run_id, **options)
    assert (_staged(path), len(lake.list("mask"))) == before


def test_unknown_runs_and_other_kinds_are_refused(trained):
    path, lake, run_id = trained
    mask_id = run_magnitude_mask(lake, run_id, size=5)
    before = _staged(path)
    with pytest.raises(ArtifactNotFoundError, match="no artifact 'run-0000000000000000'"):
        run_magnitude_mask(lake, "run-0000000000000000", size=5)
    with pytest.raises(UserInputError, match="is not an artifact id"):
        run_magnitude_mask(lake, "latest", size=5)
    with pytest.raises(UserInputError, match=f"{mask_id} is a mask artifact, not a run"):
        run_magnitude_mask(lake, mask_id, size=5)
    with pytest.raises(UserInputError, match=f"{run_id} is a run artifact, not a mask"):
        load_mask(lake, run_id)
    assert _staged(path) == before


def test_import_is_identified_by_content(trained, tmp_path):
    _, lake, run_id = trained
    table = run_table(lake, run_id)
    vector = np.zeros(table.total, bool)
    vector[[0, 3, table.total - 1]] = True
    np.save(tmp_path / "a.npy", vector)
    np.save(tmp_path / "b.npy", vector)
    mask_id = import_mask(lake, tmp_path / "a.npy", run_id)
    lake.validate(mask_id)
    assert import_mask(lake, tmp_path / "b.npy", run_id) == mask_id  # same bytes, other path
    assert load_mask(lake, mask_id) == ParameterMask.from_bool(table, vector)
    attrs = lake.group(mask_id).attrs
    assert attrs["source"] == "file" and attrs["checkpoint"] is None and attrs["run"] == run_id
    tensors = {"fc2.weight_mask": torch.ones(table.shapes[table.names.index("fc2.weight")])}
    torch.save(tensors, tmp_path / "pruned.pt")
    pruned = load_mask(lake, import_mask(lake, tmp_path / "pruned.pt", run_id))
    assert len(pruned) == int(np.prod(table.shapes[table.names.index("fc2.weight")]))


def test_bad_mask_files_are_refused_before_staging(trained, tmp_path):
    path, lake, run_id = trained
    before = (_staged(path), len(lake.list("mask")))
    np.save(tmp_path / "short.npy", np.ones(5, bool))
    torch.save({"conv.weight": torch.ones(2)}, tmp_path / "other.pt")
    for name, message in (
        ("short.npy", r"must have shape \("),
        ("other.pt", "'conv.weight' is not a parameter tensor"),
        ("missing.npy", "no such mask file"),
    ):
        with pytest.raises(UserInputError, match=message):
            import_mask(lake, tmp_path / name, run_id)
    assert (_staged(path), len(lake.list("mask"))) == before


def test_write_mask_for_pipelines(trained):
    path, lake, run_id = trained
    table = run_table(lake, run_id)
    mask = ParameterMask.from_indices(table, [1, 2, 40])
    config = {"method": "obs", "sparsity": 0.5}
    mask_id = write_mask(lake, mask, source="obs", config=config, inputs=[run_id], checkpoint=-1)
    lake.validate(mask_id)
    assert write_mask(lake, mask, source="obs", config=config, inputs=[run_id]) == mask_id
    assert load_mask(lake, mask_id) == mask
    attrs = lake.group(mask_id).attrs
    assert attrs["source"] == "obs" and attrs["checkpoint"] == 1 and attrs["run"] == run_id
    before = _staged(path)
    foreign = ParameterMask.from_indices(LayerTable(("w",), ((table.total,),)), [1])
    for kwargs, message in (
        ({"mask": foreign}, f"run {run_id} has {table.fingerprint}"),
        ({"inputs": []}, "needs run= or a run among inputs"),
        ({"source": ""}, "source='' must be a non-empty pipeline name"),
        ({"config": {"source": "magnitude"}}, "config has source='magnitude'"),
        ({"inputs": [run_id, "mask-0000000000000000"]}, "no artifact 'mask-0000000000000000'"),
    ):
        arguments = {"mask": mask, "source": "obs", "config": config, "inputs": [run_id]}
        with pytest.raises((UserInputError, ArtifactNotFoundError), match=message):
            write_mask(lake, **{**arguments, **kwargs})
    assert _staged(path) == before


def _cli(path, *args):
    settings = Settings(str(path), None, None, "auto", None)
    return CliRunner().invoke(mask_group, list(args), obj=settings, catch_exceptions=False)


def test_cli_round_trip(trained, tmp_path):
    path, lake, run_id = trained
    result = _cli(path, "magnitude", "--run", run_id, "--fraction", "0.1")
    assert result.exit_code == 0, result.output
    mask_id = result.output.strip()
    assert mask_id == run_magnitude_mask(lake, run_id, fraction=0.1)
    shown = _cli(path, "show", mask_id).output
    table = run_table(lake, run_id)
    assert f"{round(0.1 * table.total)} of {table.total} parameters" in shown
    counts = load_mask(lake, mask_id).count_per_layer()
    for name, count in zip(table.names, counts, strict=True):
        assert any(line.split()[:1] == [name] and str(count) in line for line in shown.splitlines())
    np.save(tmp_path / "m.npy", np.array([0, 7]))
    imported = _cli(path, "import", str(tmp_path / "m.npy"), "--run", run_id).output.strip()
    assert len(load_mask(lake, imported)) == 2
    layered = _cli(path, "magnitude", "--run", run_id, "--size", "9", "--scope", "layer")
    assert layered.exit_code == 0 and layered.output.strip().startswith("mask-")
    for args, message in (
        (("magnitude", "--run", run_id), "exactly one of size and fraction"),
        (("magnitude", "--run", run_id, "--size", "1", "--checkpoint", "7"), "checkpoints"),
        (("show", run_id), "is a run artifact, not a mask"),
    ):
        result = _cli(path, *args)
        assert result.exit_code == 1 and message in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
