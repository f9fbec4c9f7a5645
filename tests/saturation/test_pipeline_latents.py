"""``run_latents``: the contract, pooled features against torch's pooling of hooked outputs."""

from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.lake.checkpoints import load_model
from curvlake.pipelines.saturation import latents
from curvlake.pipelines.saturation.latents import run_latents
from curvlake.pipelines.train import cached_run_splits
from tests.pipelines.contract import PipelineContract
from tests.saturation.pipeline_cases import train_tiny_cnn

CONV_LAYERS = ("layer1.0", "layer2.0", "layer3.0", "layer4.0")


class TestLatentsContract(PipelineContract):
    module = latents
    arrays = ("train_features", "test_features", "train_label", "test_sample_id")
    block_sizes = (7, 32)
    rtol = 1e-6  # float64 forwards in other batch sizes, stored as float32
    bad_options: ClassVar = [
        ({"pixelwise": True, "pool": 2}, r"pool does not apply with pixelwise"),
        ({"splits": ["train", "training"]}, r"split='training' is not valid"),
        ({"splits": ["test", "test"]}, r"names a split twice"),
        ({"splits": []}, r"splits=\[\] is not valid"),
        ({"layers": "^nothing$"}, r"matches no feature layer"),
        ({"pool": 0}, r"pool=0 is not valid"),
        ({"checkpoint": 4}, r"checkpoint=4 is not valid"),
        ({"compress": "maybe"}, r"compress='maybe' is not valid"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_cnn(lake)}

    def run(self, lake, inputs, **options):
        options = {"n_examples": 40, "block_size": 16, "pool": 2, "dtype": "float64", **options}
        return run_latents(lake, inputs["run_id"], progress=False, **options)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("cnn") / "lake", create=True)
    return lake, train_tiny_cnn(lake)


def _hooked(lake, run_id, split, n, checkpoint=-1):
    model = load_model(lake, run_id, checkpoint)
    data = cached_run_splits(lake.url, run_id).split(split)
    outputs = {}
    for name in (*CONV_LAYERS, "fc"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: outputs.__setitem__(name, out.detach())
        )
    with torch.no_grad():
        model(torch.as_tensor(data.x[:n], dtype=torch.float32))
    return outputs, data


@pytest.mark.parametrize("pool", [1, 2, 4])
def test_features_are_adaptive_average_pools_in_module_order(cnn, pool):
    lake, run_id = cnn
    ds = lake.open(
        run_latents(
            lake, run_id, splits=["test", "train"], pool=pool, n_examples=30, progress=False
        )
    )
    assert list(ds.layer.values) == [*CONV_LAYERS, "fc"]
    assert ds.attrs["splits"] == ["test", "train"] and ds.attrs["pool"] == pool
    for split in ("train", "test"):
        outputs, data = _hooked(lake, run_id, split, 30)
        expected = [
            F.adaptive_avg_pool2d(outputs[name], pool).reshape(30, -1) for name in CONV_LAYERS
        ] + [outputs["fc"]]
        np.testing.assert_allclose(
            ds[f"{split}_features"].values, torch.cat(expected, 1).numpy(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_array_equal(ds[f"{split}_label"].values, data.y[:30])
        np.testing.assert_array_equal(ds[f"{split}_sample_id"].values, data.sample_id[:30])
    channels = [2, 4, 8, 16]
    assert list(ds.layer_shape.values) == [f"{c},{pool},{pool}" for c in channels] + ["10"]
    widths = [c * pool * pool for c in channels] + [10]
    np.testing.assert_array_equal(ds.n_features.values, widths)
    np.testing.assert_array_equal(ds.feature_offset.values, np.cumsum([0, *widths[:-1]]))


def test_pixelwise_keeps_whole_maps_and_a_checkpoint_can_be_chosen(cnn):
    lake, run_id = cnn
    ds = lake.open(
        run_latents(
            lake,
            run_id,
            checkpoint=0,
            splits=["test"],
            pixelwise=True,
            layers=r"layer[12]",
            n_examples=12,
            progress=False,
        )
    )
    outputs, _ = _hooked(lake, run_id, "test", 12, checkpoint=0)
    expected = torch.cat(
        [outputs["layer1.0"].reshape(12, -1), outputs["layer2.0"].reshape(12, -1)], 1
    )
    np.testing.assert_allclose(ds.test_features.values, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert list(ds.layer_shape.values) == ["2,8,8", "4,8,8"]
    assert ds.attrs["pixelwise"] and ds.attrs["pool"] is None and ds.attrs["checkpoint"] == 0


def test_compressed_and_raw_store_the_same_values(cnn):
    lake, run_id = cnn
    ids = [
        run_latents(
            lake, run_id, splits=["test"], pool=2, compress=c, n_examples=20, progress=False
        )
        for c in (True, False)
    ]
    a, b = (lake.open(i) for i in ids)
    assert a.attrs["compressed"] and not b.attrs["compressed"]
    np.testing.assert_array_equal(a.test_features.values, b.test_features.values)


def test_modules_called_twice_are_refused(tmp_path):
    from curvlake.pipelines.saturation.latents import LatentRecorder

    recorder = LatentRecorder(torch.nn.Linear(2, 2), None, 2)
    recorder.record("x", torch.zeros(3, 2), "eval")
    recorder.record("x", torch.zeros(3, 2), "eval")
    assert recorder.calls["x"] == 2
    with pytest.raises(UserInputError, match="cannot pool a 4-d"):
        latents.pooled_features(torch.zeros(1, 1, 2, 2, 2, 2), None, 2)
