"""The Dask steps of the Hessian solve on CuPy chunks give the NumPy results (skipped without a
CUDA GPU): what GPU workers run, by the same code path."""

import dask
import numpy as np
import zarr

from curvlake.pipelines.hessian import _tall
from curvlake.pipelines.hessian.hdf5_import import seed_ssrft_forward
from curvlake.pipelines.hessian.test_matrices import RandomTestMatrix
from tests._markers import requires_cupy

pytestmark = requires_cupy


def _steps(y: np.ndarray) -> dict:
    target = zarr.create_array(store={}, shape=y.shape, chunks=(50, 3), dtype="f8")
    r = _tall.orthonormalize_into(_tall.tall(y, 50), target)
    q = np.asarray(target[...])
    out = {"r": np.abs(r), "qqt": q @ q.T}
    for kind in ("gaussian", "ssrft"):
        matrix = RandomTestMatrix(kind, 0, "inner_left", (y.shape[0], 12))
        (out[kind],) = dask.compute(_tall.transpose_project(matrix, y, 50, 3))
    (out["signs"],) = dask.compute(_tall.sign_convention(_tall.tall(y, 50), np.eye(6)))
    return out


def test_solve_steps_on_cupy_chunks_match_numpy(monkeypatch):
    import cupy

    y = np.random.default_rng(0).standard_normal((230, 6))
    host = _steps(y)
    monkeypatch.setattr("curvlake.engine.torch_device", lambda: "cuda")
    device = _steps(y)
    for name, value in host.items():
        np.testing.assert_allclose(device[name], value, atol=1e-10, err_msg=name)
    x = np.random.default_rng(1).standard_normal((230, 4))
    np.testing.assert_allclose(
        seed_ssrft_forward(cupy.asarray(x), 3, 20).get(), seed_ssrft_forward(x, 3, 20)
    )
