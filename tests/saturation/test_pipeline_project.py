"""``run_saturation_project``: the contract, delta >= 1 is the unchanged model, ranks agree with
``saturation compute``, projections applied to every layer at once."""

from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curvlake.lake import open_lake
from curvlake.lake.checkpoints import load_model
from curvlake.pipelines.saturation import project
from curvlake.pipelines.saturation.compute import run_saturation
from curvlake.pipelines.saturation.project import run_saturation_project
from curvlake.pipelines.train import cached_run_splits
from tests.pipelines.contract import PipelineContract
from tests.saturation.pipeline_cases import train_tiny_cnn


class TestProjectContract(PipelineContract):
    module = project
    arrays = ("loss", "accuracy", "intrinsic_dimension", "random_loss", "random_accuracy")
    block_sizes = (7, 32)
    rtol = 1e-9
    bad_options: ClassVar = [
        ({"deltas": []}, r"deltas=\[\] is not valid"),
        ({"deltas": [0.9, 0]}, r"delta=0 is not valid: must be a number > 0"),
        ({"deltas": "0.9"}, r"deltas='0.9' is not valid"),
        ({"random": False, "seed": 3}, r"seed does not apply without random"),
        ({"fit_split": "all"}, r"fit_split='all' is not valid"),
        ({"layers": "^nothing$"}, r"matches no feature layer"),
        ({"checkpoint": 9}, r"checkpoint=9 is not valid"),
        ({"conv_method": "median"}, r"conv_method='median' is not valid"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_cnn(lake)}

    def run(self, lake, inputs, **options):
        options = {
            "n_examples": 40,
            "block_size": 16,
            "deltas": [0.8, 0.99, 1.0],
            "random": True,
            "dtype": "float64",
            **options,
        }
        return run_saturation_project(lake, inputs["run_id"], progress=False, **options)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("cnn") / "lake", create=True)
    return lake, train_tiny_cnn(lake, epochs=3)


def _plain(lake, run_id, n):
    model = load_model(lake, run_id, -1)
    data = cached_run_splits(lake.url, run_id).test
    with torch.no_grad():
        logits = model(torch.as_tensor(data.x[:n], dtype=torch.float32))
    y = torch.as_tensor(data.y[:n])
    loss = float(F.cross_entropy(logits.double(), y, reduction="sum")) / n
    return loss, float((logits.argmax(1) == y).double().mean())


def test_delta_at_least_one_is_the_unchanged_model(cnn):
    lake, run_id = cnn
    ds = lake.open(
        run_saturation_project(
            lake,
            run_id,
            deltas=[1.0, 3.0, 0.5],
            random=True,
            n_examples=100,
            block_size=100,
            progress=False,
        )
    )
    loss, accuracy = _plain(lake, run_id, 100)
    for i in (0, 1):
        assert ds.loss.values[i] == loss and ds.accuracy.values[i] == accuracy
        assert ds.random_loss.values[i] == loss  # full rank: the identity too
        np.testing.assert_array_equal(ds.intrinsic_dimension.values[i], ds.n_features.values)
    assert ds.loss.values[2] != loss  # delta 0.5 changes the model


def test_ranks_are_the_saturation_of_the_fit_split(cnn):
    lake, run_id = cnn
    deltas = [0.7, 0.9, 0.99]
    ds = lake.open(
        run_saturation_project(
            lake, run_id, deltas=deltas, fit_split="val", n_examples=80, progress=False
        )
    )
    for i, delta in enumerate(deltas):
        sat = lake.open(
            run_saturation(
                lake,
                run_id,
                checkpoints=[-1],
                split="val",
                delta=delta,
                n_examples=80,
                progress=False,
            )
        )
        np.testing.assert_array_equal(
            ds.intrinsic_dimension.values[i], sat.intrinsic_dimension.values[0, 0]
        )
        np.testing.assert_allclose(ds.saturation.values[i], sat.saturation.values[0, 0])
    assert (np.diff(ds.intrinsic_dimension.values, axis=0) >= 0).all()
    assert ds.attrs["fit_split"] == "val" and ds.attrs["split"] == "test"


def test_projecting_one_layer_equals_projecting_it_by_hand(cnn):
    from curvlake.pipelines.saturation.moments import Moments, conv_features
    from curvlake.pipelines.saturation.spectrum import (
        covariance_spectrum,
        delta_projection,
        project_features,
    )

    lake, run_id = cnn
    n = 60
    ds = lake.open(
        run_saturation_project(
            lake,
            run_id,
            deltas=[0.9],
            fit_split="test",
            layers=r"^layer2\.0$",
            n_examples=n,
            block_size=n,
            dtype="float64",
            progress=False,
        )
    )
    model = load_model(lake, run_id, -1).double()
    data = cached_run_splits(lake.url, run_id).test
    x = torch.as_tensor(data.x[:n], dtype=torch.float64)
    layer = model.get_submodule("layer2.0")
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, out: captured.setdefault("out", out))
    with torch.no_grad():
        model(x)
    handle.remove()
    moments = Moments.from_batch(conv_features(captured["out"], "channelwise"))
    p, k = delta_projection(covariance_spectrum(moments.covariance(ddof=0)), 0.9)
    assert ds.intrinsic_dimension.values[0, 0] == k
    layer.register_forward_hook(lambda m, i, out: project_features(out, moments.mean, p))
    with torch.no_grad():
        logits = model(x)
    y = torch.as_tensor(data.y[:n])
    expected = float(F.cross_entropy(logits, y, reduction="sum")) / n
    np.testing.assert_allclose(ds.loss.values[0], expected, rtol=1e-12)
