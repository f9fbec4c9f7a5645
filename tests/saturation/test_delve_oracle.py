"""delve 0.1.50 as an oracle for ``rule="delve"`` (skipped when delve is not installed).

delve >= 0.1.45 keeps only the last batch of an epoch in its tracker, so the tracker is fed
exactly one batch; its functions are compared on the same covariance matrices.
"""

import numpy as np
import pytest
import torch

from curvlake.pipelines.saturation import (
    CONV_METHODS,
    Moments,
    conv_features,
    covariance_spectrum,
    intrinsic_dimension,
    saturation_statistics,
)
from tests._markers import requires_delve
from tests.saturation.cases import TinyCNN, planted_rank

pytestmark = requires_delve


def _spectra(seed: int):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 40))
    kind = seed % 4
    if kind == 0:  # generic
        values = np.sort(rng.random(d) ** 4)[::-1]
    elif kind == 1:  # exact ties, some zeros
        values = np.r_[np.ones(int(rng.integers(1, d + 1))), np.zeros(d)][:d]
    elif kind == 2:  # geometric
        values = rng.uniform(0.3, 0.95) ** np.arange(d)
    else:  # one dominant direction
        values = np.r_[100.0, rng.random(d - 1)]
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q @ np.diag(values) @ q.T


@pytest.mark.parametrize("delta", [0.5, 0.9, 0.97, 0.99, 0.999, 1.0, 3.0])
def test_delve_rule_equals_delve_functions(delta):
    from delve.metrics import compute_intrinsic_dimensionality, compute_saturation

    for seed in range(40):
        cov = _spectra(seed)
        ours = intrinsic_dimension(covariance_spectrum(cov).eigenvalues, delta, rule="delve")
        theirs = compute_intrinsic_dimensionality(torch.from_numpy(cov), thresh=delta)
        assert ours == theirs, (seed, delta)
        assert ours / len(cov) == compute_saturation(torch.from_numpy(cov), thresh=delta)


@pytest.mark.parametrize("cov", [np.zeros((4, 4)), np.diag([10.0, 0.01, 0.0])])
def test_degenerate_covariances_give_zero_like_delve(cov):
    from delve.metrics import compute_intrinsic_dimensionality

    assert compute_intrinsic_dimensionality(torch.from_numpy(cov)) == 0
    assert intrinsic_dimension(covariance_spectrum(cov).eigenvalues, 0.99, rule="delve") == 0


def test_planted_rank_against_delve():
    from delve.metrics import compute_intrinsic_dimensionality

    for rank in (10, 40, 63):
        x = planted_rank(200, rank, 64, seed=rank, equal=True)
        cov = Moments.from_batch(x).covariance(ddof=0)
        assert compute_intrinsic_dimensionality(torch.from_numpy(cov), thresh=0.99) == rank - 1


def test_covariance_equals_delve_fix_on_one_batch():
    from delve import TorchCovarianceMatrix

    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    theirs = TorchCovarianceMatrix(device="cpu")
    theirs.update(x, False)
    ours = Moments.from_batch(x).covariance(ddof=0)
    np.testing.assert_allclose(ours, theirs.fix().numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("delta", [0.9, 0.99])
def test_tracker_on_one_batch_matches_compat_mode(tmp_path, method, delta):
    from delve import SaturationTracker

    torch.manual_seed(0)
    model = TinyCNN().eval()
    outputs: dict[str, torch.Tensor] = {}
    for name in ("conv1", "conv2", "fc"):
        getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name: outputs.__setitem__(name, out.detach())
        )
    tracker = SaturationTracker(
        str(tmp_path / "delve"),
        save_to="csv",
        modules=model,
        stats=["lsat", "idim", "trc"],
        device="cpu",
        conv_method=method,
        sat_threshold=delta,
    )
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    tracker.add_saturations(save=False)
    logged = tracker.writer.value_dict
    for name, out in outputs.items():
        moments = Moments.from_batch(conv_features(out, method))
        stats = saturation_statistics(moments, delta=delta, rule="delve", ddof=0)
        assert logged[f"eval-intrinsic-dimensionality_{name}"] == [stats.intrinsic_dimension]
        assert logged[f"eval-saturation_{name}"] == [stats.saturation]
        np.testing.assert_allclose(logged[f"eval-covariance-trace_{name}"][0], stats.trace)
