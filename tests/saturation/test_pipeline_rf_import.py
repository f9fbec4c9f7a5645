"""``run_receptive_field`` (hand-computed fields) and the phd-lab imports (tiny files of the
same formats: delve CSV logs, latent pickle streams, probe CSVs)."""

import os
import pickle

import numpy as np
import pandas as pd
import pytest

from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.saturation.import_phdlab import (
    import_phdlab_latents,
    import_phdlab_probes,
    import_phdlab_saturation,
    pickle_stream,
)
from curvlake.pipelines.saturation.probes_pipeline import run_probes
from curvlake.pipelines.saturation.rf_pipeline import run_receptive_field
from tests.saturation.pipeline_cases import (
    planted_latents,
    train_tiny_cnn,
    write_phdlab_latents,
    write_phdlab_log,
    write_stream,
)


@pytest.fixture
def lake(tmp_path):
    return open_lake(tmp_path / "lake", create=True)


# -- receptive fields -------------------------------------------------------------------------


def test_receptive_fields_of_a_run_by_hand(lake):
    run_id = train_tiny_cnn(lake)
    ds = lake.open(run_receptive_field(lake, run_id))
    # cnn5_k on 8x8: conv3 (r 3), conv3 (5), maxpool2 (6, j 2), conv3 (10), maxpool2 (12, j 4),
    # conv3 (20), maxpool2, global pool, fc
    np.testing.assert_array_equal(ds.r_min.values[:, 0], [3, 5, 10, 20, np.inf])
    np.testing.assert_array_equal(ds.r_max.values, ds.r_min.values)  # one path
    np.testing.assert_array_equal(ds.jump.values[:4, 1], [1, 1, 2, 4])
    np.testing.assert_array_equal(ds.map_size.values[:, 0], [8, 8, 4, 2, -1])
    assert ds.attrs["border_layer"] == "layer3.0" and ds.attrs["input_size"] == [8, 8]
    assert lake.info(ds.attrs["curvlake:provenance"]["inputs"][0]).kind == "run"


def test_receptive_fields_of_a_zoo_model_with_skips(lake):
    ds = lake.open(
        run_receptive_field(lake, model="resnet18_k", model_params={"k": 4}, input_size=[32, 32])
    )
    names = list(ds.layer.values)
    at = names.index("layer1.1.conv1")  # after the first residual block: min 5, max 9
    assert ds.r_min.values[at, 0] == 5 and ds.r_max.values[at, 0] == 9
    assert ds.attrs["border_layer"] == "layer4.1.conv2"
    assert ds.attrs["border_layer_max"] == "layer3.0.conv2"
    small = lake.open(
        run_receptive_field(lake, model="resnet18_k", model_params={"k": 4}, input_size=[8, 8])
    )
    assert names.index(small.attrs["border_layer"]) < names.index(ds.attrs["border_layer"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"give exactly one of run_id, model"),
        ({"model": "cnn5_k"}, r"give --input-size H,W with --model"),
        ({"model": "cnn5_k", "input_size": [0, 4]}, r"input_size=\[0, 4\] is not valid"),
        ({"model": "nonet", "input_size": [8, 8]}, r"unknown model 'nonet'"),
    ],
)
def test_receptive_field_refusals(lake, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        run_receptive_field(lake, **kwargs)
    assert lake.list() == []


# -- per-epoch logs ---------------------------------------------------------------------------


def test_phdlab_log_becomes_a_saturation_artifact(lake, tmp_path):
    layers = ["layer1-0-conv1", "layer1-0-conv2", "fc"]  # delve's names, in module order
    table = write_phdlab_log(tmp_path / "ResNet18-Cifar10-r32-bs128-e3.csv", layers, 3)
    artifact = import_phdlab_saturation(lake, tmp_path / "ResNet18-Cifar10-r32-bs128-e3.csv")
    ds = lake.open(artifact)
    assert list(ds.layer.values) == layers and list(ds.phase.values) == ["train", "eval"]
    assert list(ds.epoch.values) == [1, 2, 3]
    for p, phase in enumerate(("train", "eval")):
        for i, layer in enumerate(layers):
            np.testing.assert_array_equal(
                ds.saturation.values[:, p, i], table[f"{phase}-saturation_{layer}"]
            )
            np.testing.assert_array_equal(
                ds.intrinsic_dimension.values[:, p, i],
                table[f"{phase}-intrinsic-dimensionality_{layer}"].astype(int),
            )
    assert ds.attrs["rule"] == "delve" and ds.attrs["source"] == "phdlab"
    assert ds.attrs["phdlab_metrics"]["training_accuracy"] == list(table["training_accuracy"])
    assert import_phdlab_saturation(lake, tmp_path / "ResNet18-Cifar10-r32-bs128-e3.csv") == (
        artifact
    )


def test_a_csv_that_is_no_log_is_refused(lake, tmp_path):
    pd.DataFrame({"a": [1, 2]}).to_csv(tmp_path / "x.csv", sep=";")
    with pytest.raises(UserInputError, match="has no columns like train-saturation_<layer>"):
        import_phdlab_saturation(lake, tmp_path / "x.csv")
    with pytest.raises(UserInputError, match="does not exist"):
        import_phdlab_saturation(lake, tmp_path / "missing.csv")


# -- latent pickle streams --------------------------------------------------------------------


def test_phdlab_latents_become_a_latents_artifact(lake, tmp_path):
    data = planted_latents(n_train=37, n_test=21)
    folder = write_phdlab_latents(tmp_path / "ResNet18_Cifar10_32", data, batch=8)
    artifact = import_phdlab_latents(lake, folder, block_size=10)
    ds = lake.open(artifact)
    assert list(ds.layer.values) == ["conv1", "fc"]
    assert ds.attrs["splits"] == ["train", "test"]  # phd-lab's eval is the test set
    for ours, theirs in (("train", "train"), ("test", "eval")):
        expected = np.concatenate([data[theirs]["conv1"], data[theirs]["fc"]], axis=1)
        np.testing.assert_array_equal(ds[f"{ours}_features"].values, expected)
        np.testing.assert_array_equal(ds[f"{ours}_label"].values, data[theirs]["labels"])
    assert ds.attrs["model_pointer"] == "./logs/TinyNet/Planted_8/run0"
    assert ds.attrs["num_classes"] == 3
    ordered = import_phdlab_latents(lake, folder, layers=["fc", "conv1"])
    assert list(lake.open(ordered).layer.values) == ["fc", "conv1"]
    probes = lake.open(run_probes(lake, artifact, progress=False))
    assert probes.test_accuracy.values[0] > 0.8  # conv1 separates the classes; fc barely


def test_pixelwise_latents_are_stacked_as_channel_maps(lake, tmp_path):
    folder = tmp_path / "pixelwise"
    folder.mkdir()
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((9, 3, 2, 2)).astype(np.float32)  # (N, C, H, W)
    for i in range(2):
        for j in range(2):
            write_stream(
                folder / f"train-conv-({i}, {j}).p", [maps[:5, :, i, j], maps[5:, :, i, j]]
            )
    write_stream(folder / "train-labels.p", [np.arange(9) % 2])
    ds = lake.open(import_phdlab_latents(lake, folder))
    np.testing.assert_array_equal(ds.train_features.values, maps.reshape(9, -1))
    assert list(ds.layer_shape.values) == ["3,2,2"] and ds.attrs["pixelwise"]


def test_only_numpy_arrays_are_unpickled(lake, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    with open(folder / "train-conv.p", "wb") as handle:
        pickle.dump(os.getcwd, handle)  # would call a function on load if allowed
    write_stream(folder / "train-labels.p", [np.zeros(2, dtype=np.int64)])
    with pytest.raises(UserInputError, match="is not a NumPy array type"):
        list(pickle_stream(folder / "train-conv.p"))
    with pytest.raises(UserInputError, match="is not a NumPy array type"):
        import_phdlab_latents(lake, folder)


def test_mismatched_row_counts_are_refused(lake, tmp_path):
    data = planted_latents(n_train=20, n_test=10)
    data["train"]["labels"] = data["train"]["labels"][:15]
    folder = write_phdlab_latents(tmp_path / "bad", data)
    with pytest.raises(UserInputError, match=r"more rows than train-labels\.p"):
        import_phdlab_latents(lake, folder)


# -- probe CSVs -------------------------------------------------------------------------------


def test_probe_csv_rows_are_put_in_order(lake, tmp_path):
    rows = {
        "name": ["train-layer10", "train-layer2", "train-layer1"],
        "train_acc": [0.9, 0.5, 0.4],
        "eval_acc": [0.8, 0.45, 0.35],
    }
    pd.DataFrame(rows).to_csv(tmp_path / "4x4_probe_performances.csv", sep=";")
    ds = lake.open(import_phdlab_probes(lake, tmp_path / "4x4_probe_performances.csv"))
    assert list(ds.layer.values) == ["layer1", "layer2", "layer10"]  # natural order
    np.testing.assert_array_equal(ds.test_accuracy.values, [0.35, 0.45, 0.8])
    assert np.isnan(ds.val_accuracy.values).all() and ds.attrs["source"] == "phdlab"
    log = write_phdlab_log(tmp_path / "log.csv", ["layer10", "layer1", "layer2"], 2)
    assert len(log) == 2
    order = import_phdlab_saturation(lake, tmp_path / "log.csv")
    like = lake.open(
        import_phdlab_probes(lake, tmp_path / "4x4_probe_performances.csv", order_like=order)
    )
    assert list(like.layer.values) == ["layer10", "layer1", "layer2"]
    assert lake.info(like.attrs["curvlake:provenance"]["inputs"][0]).id == order
