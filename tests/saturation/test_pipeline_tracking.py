"""Saturation during training: the recorder, the tree merge, the run's saturation artifact,
equality with ``saturation compute``, and kill + resume without duplicated epochs."""

import numpy as np
import pytest
import torch
from torch import nn

from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.nn.hooks import attach
from curvlake.nn.training import TrainConfig
from curvlake.pipelines import train as train_module
from curvlake.pipelines.quickstart import CNN_CONFIG, MLP_CONFIG
from curvlake.pipelines.saturation.compute import run_saturation
from curvlake.pipelines.saturation.moments import Moments, conv_features, merge_moments
from curvlake.pipelines.saturation.tracking import (
    MomentsTree,
    SaturationRecorder,
    layer_observations,
    tracked_saturation_id,
    training_saturation_id,
)
from curvlake.pipelines.train import as_train_config
from tests.saturation.cases import TinyCNN
from tests.saturation.pipeline_cases import TINY_CNN, train_tiny_cnn

EXTRA = {"epochs": 3, "save_every": 1, "track": ["saturation"]}
TRACKED = {**TINY_CNN, **EXTRA}
ARRAYS = ("eigenvalue", "saturation", "intrinsic_dimension", "trace", "n_samples")


def _values(lake, artifact):
    ds = lake.open(artifact)
    return {name: ds[name].values for name in (*ARRAYS, "epoch")}


# -- the tree ---------------------------------------------------------------------------------


class _Tag:
    """Stands for moments: records the grouping its merges form."""

    def __init__(self, label):
        self.label = label

    def merge(self, other):
        return _Tag(f"({self.label}+{other.label})")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 8, 9, 13, 16, 31, 40])
def test_tree_groups_as_merge_moments(n):
    tree = MomentsTree()
    for i in range(n):
        tree.push(_Tag(str(i)))
    assert tree.result().label == merge_moments([_Tag(str(i)) for i in range(n)]).label
    assert len(tree) == n


def test_tree_is_bit_identical_to_merge_moments():
    rng = np.random.default_rng(0)
    parts = [Moments.from_batch(rng.normal(size=(int(rng.integers(1, 9)), 4))) for _ in range(23)]
    tree = MomentsTree()
    for part in parts:
        tree.push(part)
    merged, reference = tree.result(), merge_moments(parts)
    assert merged.count == reference.count
    np.testing.assert_array_equal(merged.m2, reference.m2)
    np.testing.assert_array_equal(merged.mean, reference.mean)


# -- the recorder -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["channelwise", "mean", "max", "flatten"])
def test_recorder_moments_equal_np_cov_over_the_epoch(method, dtype):
    """Also: the layers' outputs are left as they were (the recorder centres only copies of
    its own in place), whatever the model's dtype."""
    torch.manual_seed(0)
    model = TinyCNN().to(dtype).eval()
    recorder = SaturationRecorder(
        model, conv_method=method, phases={"train": "train", "eval:test": "eval"}
    )
    outputs = {name: [] for name in ("conv1", "conv2", "fc")}
    for name in outputs:
        getattr(model, name).register_forward_hook(
            lambda m, i, out, name=name: outputs[name].append(out.detach())
        )
    recorder.start_epoch(0)
    x = (torch.randn(23, 3, 6, 6, dtype=torch.float64) * 3 + 1e3).to(dtype)
    with attach(model, [recorder], "train"), torch.no_grad():
        for start in range(0, 23, 5):
            model(x[start : start + 5])
    with attach(model, [recorder], "eval:val"), torch.no_grad():
        model(x)  # ignored: not a tracked phase
    recorder.end_epoch(0)
    assert set(recorder.moments) == {("train", name) for name in outputs}
    with torch.no_grad():
        model(x[:5])  # the outputs of the first batch again, no recorder attached
    for name, parts in outputs.items():
        torch.testing.assert_close(parts[-1], parts[0], rtol=0, atol=0)
        rows = conv_features(torch.cat(parts[:5]), method).double().numpy()
        moments = recorder.moments[("train", name)]
        np.testing.assert_allclose(
            moments.covariance(ddof=0), np.cov(rows, rowvar=False, ddof=0), rtol=1e-9, atol=1e-9
        )
        np.testing.assert_allclose(moments.mean, rows.mean(axis=0), rtol=1e-12)
        assert moments.count == len(rows)


def test_recurrent_output_gives_its_last_time_step():
    lstm = nn.LSTM(3, 4)  # sequence first
    with torch.no_grad():
        out, _ = lstm(torch.randn(5, 2, 3))
    np.testing.assert_array_equal(layer_observations(out, lstm, "channelwise"), out[-1])


# -- the training config ----------------------------------------------------------------------


def test_untracked_configs_keep_their_run_ids():
    for config in (MLP_CONFIG, CNN_CONFIG, TINY_CNN):
        stored = as_train_config(config).to_dict()
        assert not {"track", "saturation_delta", "conv_method", "track_layers"} & set(stored)
    tracked = TrainConfig.from_dict(TRACKED)
    assert TrainConfig.from_dict(tracked.to_dict()) == tracked
    assert tracked.to_dict()["saturation_delta"] == 0.99


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"conv_method": "mean"}, r"conv_method: only with track"),
        ({"saturation_delta": 0.9}, r"saturation_delta: only with track"),
        ({"track": ["saturation"], "saturation_delta": 0}, r"saturation_delta=0"),
        ({"track": ["saturation"], "conv_method": "median"}, r"conv_method='median'"),
        ({"track": ["saturation"], "saturation_rule": "x"}, r"saturation_rule='x'"),
        ({"track": ["weights"]}, r"track=\('weights',\)"),
        ({"track": ["saturation"], "epochs": 0}, r"track needs epochs >= 1"),
    ],
)
def test_bad_tracking_options_are_refused(options, message):
    with pytest.raises(UserInputError, match=message):
        TrainConfig.from_dict({**TINY_CNN, **options})


def test_a_pattern_matching_no_layer_is_refused_before_staging(tmp_path):
    lake = open_lake(tmp_path / "lake", create=True)
    with pytest.raises(UserInputError, match="matches no feature layer"):
        train_tiny_cnn(lake, track=["saturation"], track_layers="^nothing$")
    assert lake.list() == []
    assert not (tmp_path / "lake" / "_staging").exists() or not any(
        (tmp_path / "lake" / "_staging").iterdir()
    )


# -- the run's artifact -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("tracked") / "lake", create=True)
    run_id = train_tiny_cnn(lake, **EXTRA)
    return lake, run_id


def test_one_row_per_epoch_and_phase(tracked):
    lake, run_id = tracked
    saturation_id = training_saturation_id(lake, run_id)
    assert lake.info(saturation_id).inputs == [run_id]
    ds = lake.open(saturation_id)
    assert list(ds.epoch.values) == [1, 2, 3]
    assert list(ds.phase.values) == ["train", "eval"]
    assert list(ds.layer.values) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0", "fc"]
    n_train = int(lake.open(run_id).sizes["train_example"])
    # channelwise: every position of every example is an observation (8x8 maps for layer1)
    assert ds.n_samples.sel(phase="train").values[0, 0] == n_train * 64
    assert ds.attrs["ddof"] == 0 and ds.attrs["rule"] == "textbook"
    k, d = ds.intrinsic_dimension.values, ds.n_features.values
    np.testing.assert_array_equal(ds.saturation.values, k / d)


def test_in_training_eval_equals_saturation_compute(tracked):
    lake, run_id = tracked
    training = lake.open(training_saturation_id(lake, run_id)).sel(phase="eval")
    computed = lake.open(run_saturation(lake, run_id, checkpoints=[1, 2, 3], progress=False))
    assert list(computed.epoch.values) == [1, 2, 3]
    for name in ARRAYS:  # same data, same batches, same order: bit-identical
        np.testing.assert_array_equal(
            computed[name].sel(phase="eval").values, training[name].values, err_msg=name
        )


def test_a_missing_artifact_is_replayed(tracked, tmp_path):
    lake, run_id = tracked
    config = as_train_config(lake.info(run_id).config)
    before = _values(lake, tracked_saturation_id(run_id, config))
    other = open_lake(tmp_path / "copy", create=True)
    run_again = train_tiny_cnn(other, **EXTRA)
    other.remove(tracked_saturation_id(run_again, config))  # as if killed between the commits
    assert train_tiny_cnn(other, **EXTRA) == (run_again)
    after = _values(other, tracked_saturation_id(run_again, config))
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


class _Killed(Exception):
    pass


def test_killed_between_epoch_rows_and_checkpoint_resumes_without_duplicates(
    tracked, tmp_path, monkeypatch
):
    lake0, run_id = tracked
    reference = _values(lake0, training_saturation_id(lake0, run_id))
    lake = open_lake(tmp_path / "kill", create=True)
    real = train_module.flatten_parameters
    calls = []

    def killed_at_epoch_2(model):  # checkpoints 0, 1, then epoch 2's: its row is written
        calls.append(1)
        if len(calls) == 3:
            raise _Killed
        return real(model)

    monkeypatch.setattr(train_module, "flatten_parameters", killed_at_epoch_2)
    with pytest.raises(_Killed):
        train_tiny_cnn(lake, **EXTRA)
    monkeypatch.setattr(train_module, "flatten_parameters", real)
    resumed = train_tiny_cnn(lake, **EXTRA)
    assert resumed == run_id
    values = _values(lake, training_saturation_id(lake, resumed))
    assert list(values["epoch"]) == [1, 2, 3]
    for name in reference:
        np.testing.assert_array_equal(values[name], reference[name], err_msg=name)
