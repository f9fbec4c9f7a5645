"""``run_saturation``: the pipeline contract, np.cov / eigvalsh and delve as oracles."""

from typing import ClassVar

import numpy as np
import pytest
import torch

from curvlake.lake import open_lake
from curvlake.lake.checkpoints import load_model
from curvlake.pipelines.saturation import compute
from curvlake.pipelines.saturation.compute import run_saturation
from curvlake.pipelines.saturation.moments import conv_features
from curvlake.pipelines.saturation.spectrum import intrinsic_dimension
from curvlake.pipelines.train import cached_run_splits
from tests._markers import requires_delve
from tests.pipelines.contract import PipelineContract, train_tiny_run
from tests.saturation.pipeline_cases import train_tiny_cnn

ARRAYS = ("eigenvalue", "saturation", "intrinsic_dimension", "trace", "n_samples")


class TestSaturationContract(PipelineContract):
    module = compute
    arrays = ARRAYS
    block_sizes = (7, 32)
    bad_options: ClassVar = [
        ({"delta": 0}, r"delta=0 is not valid: must be a number > 0"),
        ({"delta": -0.5}, r"delta=-0.5 is not valid"),
        ({"conv_method": "median"}, r"conv_method='median' is not valid"),
        ({"rule": "phdlab"}, r"rule='phdlab' is not valid"),
        ({"layers": "^nothing$"}, r"matches no feature layer"),
        ({"checkpoints": [5]}, r"checkpoint=5 is not valid"),
        ({"split": "training"}, r"split='training' is not valid"),
        ({"ddof": -1}, r"ddof=-1 is not valid"),
        ({"n_examples": 10_000}, r"n_examples=10000 is not valid"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_run(lake)}

    def run(self, lake, inputs, **options):
        options = {"n_examples": 60, "block_size": 16, "dtype": "float64", **options}
        return run_saturation(lake, inputs["run_id"], progress=False, **options)

    def _assert_same(self, a, b):
        for name in self.arrays:  # float64 sums in another grouping; zero eigenvalues stay ~0
            np.testing.assert_allclose(a[name], b[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("cnn") / "lake", create=True)
    return lake, train_tiny_cnn(lake)


def _layer_outputs(lake, run_id, n):
    model = load_model(lake, run_id, -1).double()
    x = torch.as_tensor(cached_run_splits(lake.url, run_id).test.x[:n], dtype=torch.float64)
    outputs = {}
    for name in ("layer1.0", "layer3.0", "fc"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: outputs.__setitem__(name, out.detach())
        )
    with torch.no_grad():
        model(x)
    return outputs


@pytest.mark.parametrize("method", ["channelwise", "mean", "max", "flatten"])
def test_spectra_equal_eigvalsh_of_np_cov(cnn, method):
    lake, run_id = cnn
    layers = r"^(layer1\.0|layer3\.0|fc)$"
    ds = lake.open(
        run_saturation(
            lake,
            run_id,
            checkpoints=[-1],
            conv_method=method,
            layers=layers,
            n_examples=90,
            block_size=25,
            ddof=1,
            delta=0.9,
            dtype="float64",
            progress=False,
        )
    )
    assert list(ds.layer.values) == ["layer1.0", "layer3.0", "fc"]
    for i, (name, out) in enumerate(_layer_outputs(lake, run_id, 90).items()):
        assert ds.layer.values[i] == name
        rows = conv_features(out, method).numpy()
        cov = np.cov(rows, rowvar=False, ddof=1)
        expected = np.sort(np.clip(np.linalg.eigvalsh(cov), 0, None))[::-1]
        start, d = int(ds.eigen_offset[i]), int(ds.n_features[i])
        assert d == rows.shape[1]
        eigen = ds.eigenvalue.values[0, 0, start : start + d]
        np.testing.assert_allclose(eigen, expected, rtol=1e-8, atol=1e-10 * expected.max())
        assert ds.intrinsic_dimension.values[0, 0, i] == intrinsic_dimension(expected, 0.9)
        np.testing.assert_allclose(ds.trace.values[0, 0, i], np.trace(cov), rtol=1e-10)
        assert ds.n_samples.values[0, 0, i] == len(rows)


@requires_delve
def test_delve_rule_gives_delves_numbers(cnn):
    from delve.metrics import compute_intrinsic_dimensionality, compute_saturation

    lake, run_id = cnn
    ds = lake.open(
        run_saturation(lake, run_id, rule="delve", n_examples=90, dtype="float64", progress=False)
    )
    outputs = _layer_outputs(lake, run_id, 90)
    for name, out in outputs.items():
        i = list(ds.layer.values).index(name)
        cov = torch.from_numpy(np.cov(conv_features(out, "channelwise").numpy().T, ddof=0))
        assert ds.intrinsic_dimension.values[-1, 0, i] == compute_intrinsic_dimensionality(cov)
        assert ds.saturation.values[-1, 0, i] == compute_saturation(cov)


def test_delta_at_least_one_keeps_every_dimension(cnn):
    lake, run_id = cnn
    ds = lake.open(run_saturation(lake, run_id, delta=3.0, n_examples=50, progress=False))
    for row in ds.intrinsic_dimension.values[:, 0]:
        np.testing.assert_array_equal(row, ds.n_features.values)
    assert ds.attrs["source"] == "checkpoints" and list(ds.checkpoint.values) == [0, 1]
