"""The saturation pipelines' kernels on GPU arrays (skipped without CuPy and a CUDA GPU)."""

import numpy as np
import torch

from curvlake.constants import CONV_METHODS, SATURATION_RULES
from curvlake.pipelines.saturation.moments import CONV_METHODS as KERNEL_CONV_METHODS
from curvlake.pipelines.saturation.moments import Moments
from curvlake.pipelines.saturation.probes_pipeline import DiagonalMoments
from curvlake.pipelines.saturation.spectrum import RULES
from curvlake.pipelines.saturation.tracking import SaturationRecorder, layer_observations
from tests._markers import requires_cupy


def test_the_cli_choices_are_the_kernels():
    assert CONV_METHODS == KERNEL_CONV_METHODS and SATURATION_RULES == RULES


@requires_cupy
def test_observations_and_moments_of_cupy_conv_outputs():
    import cupy

    x = np.random.default_rng(0).normal(size=(6, 3, 4, 4)) + 100
    for method in CONV_METHODS:
        ours = Moments.from_batch(layer_observations(cupy.asarray(x), None, method))
        reference = Moments.from_batch(layer_observations(x, None, method))
        np.testing.assert_allclose(ours.m2, reference.m2, rtol=1e-10)
    rows = x.reshape(6, -1)
    diagonal = DiagonalMoments.from_batch(cupy.asarray(rows))
    np.testing.assert_allclose(diagonal.variance(0), rows.var(axis=0), rtol=1e-10)


@requires_cupy
def test_recorder_on_a_cuda_model_equals_the_cpu_one():
    from curvlake.nn.hooks import attach
    from tests.saturation.cases import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        model.to(device)
        recorder = SaturationRecorder(model, phases={"eval": "eval"})
        with attach(model, [recorder], "eval"), torch.no_grad():
            model(x.to(device))
        recorder.end_epoch(0)
        results.append(recorder.moments)
    for key, moments in results[0].items():
        np.testing.assert_allclose(results[1][key].m2, moments.m2, rtol=1e-9, atol=1e-9)
