"""The kernels on CuPy arrays give the NumPy results (skipped without a CUDA GPU)."""

import numpy as np

from curvlake.pipelines.hessian.overlap import cross_gram_partial, mask_energy_partial
from curvlake.pipelines.hessian.recovery import probe_residual_partials, project
from curvlake.pipelines.hessian.test_matrices import (
    RandomTestMatrix,
    ssrft_adjoint,
    ssrft_forward,
)
from tests._markers import requires_cupy

pytestmark = requires_cupy


def test_kernels_on_cupy_match_numpy():
    import cupy

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((301, 4)), rng.standard_normal((40, 4))
    xc, yc = cupy.asarray(x), cupy.asarray(y)
    np.testing.assert_allclose(ssrft_forward(xc, 1, 2, 40).get(), ssrft_forward(x, 1, 2, 40))
    np.testing.assert_allclose(ssrft_adjoint(yc, 1, 2, 301).get(), ssrft_adjoint(y, 1, 2, 301))
    for kind in ("gaussian", "ssrft"):
        om = RandomTestMatrix(kind, 0, "outer", (301, 6))
        np.testing.assert_allclose(om.transpose_matmul(xc).get(), om.transpose_matmul(x))
        np.testing.assert_allclose(
            om.block((5, 90), (1, 4), xp=cupy).get(), om.block((5, 90), (1, 4))
        )
    u = np.linalg.qr(x)[0]
    uc = cupy.asarray(u)
    np.testing.assert_allclose(project(uc, xc).get(), project(u, x))
    coef = project(u, x)
    lam = np.arange(4.0)
    np.testing.assert_allclose(
        probe_residual_partials(uc, lam, coef, xc), probe_residual_partials(u, lam, coef, x)
    )
    mask = np.array([3, 50, 200])
    np.testing.assert_allclose(mask_energy_partial(uc, mask).get(), mask_energy_partial(u, mask))
    np.testing.assert_allclose(cross_gram_partial(uc, uc).get(), cross_gram_partial(u, u))
