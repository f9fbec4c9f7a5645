"""The seed's skerch 0.x HDF5 measurement layouts imported and solved; its SSRFT vs skerch."""

import numpy as np
import pytest

from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.hessian.hdf5_import import (
    SeedSsrft,
    import_hessian_hdf5,
    seed_ssrft_forward,
)
from curvlake.pipelines.hessian.solve import run_hessian_solve
from tests._markers import requires_h5py, requires_skerch
from tests.hessian.pipeline_cases import (
    dense_hessian,
    projector_distance,
    top_eigenpairs,
    train_linear_run,
)

K, S, SEED = 30, 60, 12345


@requires_skerch
def test_seed_ssrft_is_skerchs():
    import torch
    from skerch.measurements import SSRFT

    x = np.random.default_rng(0).standard_normal((301, 5))
    theirs = SSRFT.ssrft(torch.from_numpy(x.T.copy()), 40, seed=SEED + 1).numpy().T
    np.testing.assert_allclose(seed_ssrft_forward(x, SEED + 1, 40), theirs, atol=1e-12)


def test_seed_ssrft_has_orthonormal_nested_rows():
    dense = seed_ssrft_forward(np.eye(64), 7, 20)
    np.testing.assert_allclose(dense @ dense.T, np.eye(20), atol=1e-12)
    np.testing.assert_allclose(seed_ssrft_forward(np.eye(64), 7, 8), dense[:8], atol=1e-14)
    with pytest.raises(ValueError, match="whole columns"):
        SeedSsrft(7, (64, 20)).transpose_matmul(np.ones((10, 2)), row_start=5)


def _write_seed_layout(directory, a, *, merged=False, bad=None):
    """The seed's measurements of ``a``: outer ``A ψ_i`` (i < k), inner ``Φ A ψ_i``."""
    import h5py

    psi = seed_ssrft_forward(np.eye(a.shape[0]), SEED + 2, S)  # rows ψ_i
    images = a @ psi.T  # column i: A ψ_i
    inner = seed_ssrft_forward(images, SEED + 1, S)
    directory.mkdir()
    flags = ["measured"] * S
    if bad is not None:
        flags[bad] = "initialized"
    layouts = (("leftouter", images[:, :K], flags[:K]), ("inner", inner, flags))
    for name, data, names in layouts:
        if merged:
            with h5py.File(directory / f"{name}_MERGED.h5", "w") as f:
                f["data"] = data.astype(np.float32)
                f.create_dataset("flags", data=names, dtype=h5py.string_dtype())
            continue
        for i in range(data.shape[1]):
            with h5py.File(directory / f"{name}_{i:010d}.h5", "w") as f:
                f["data"] = data[:, i].astype(np.float32)
                f.create_dataset("flags", data=[names[i]], dtype=h5py.string_dtype())


@pytest.fixture(scope="module")
def low_rank(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("hdf5") / "lake", create=True)
    run = train_linear_run(lake)
    a = dense_hessian(lake, run, slice(0, 3))
    return lake, run, a


@requires_h5py
@pytest.mark.parametrize("merged", [False, True])
def test_seed_measurements_import_and_solve(low_rank, tmp_path, merged):
    lake, run, a = low_rank
    _write_seed_layout(tmp_path / "meas", a, merged=merged)
    sketch = import_hessian_hdf5(lake, tmp_path / "meas", run, seed=SEED, block_size=8)
    assert import_hessian_hdf5(lake, tmp_path / "meas", run, seed=SEED) == sketch
    attrs = lake.group(sketch).attrs
    assert (attrs["recovery"], attrs["noise"], attrs["k"], attrs["s"]) == (
        "recycled",
        "seed_ssrft",
        K,
        S,
    )
    eigs = lake.open(run_hessian_solve(lake, sketch))
    lam, u = top_eigenpairs(a, 27)  # rank 27: recovered up to the float32 files' rounding
    np.testing.assert_allclose(eigs["eigenvalues"].values[:27], lam, rtol=1e-4)
    assert projector_distance(eigs["eigenvectors"].values[:, :27], u) < 1e-3


@requires_h5py
def test_unfinished_measurements_are_refused_before_staging(low_rank, tmp_path):
    lake, run, a = low_rank
    _write_seed_layout(tmp_path / "meas", a, bad=40)
    before = [i.id for i in lake.list()]
    with pytest.raises(UserInputError, match=r"1 of 60 inner measurements are not flagged"):
        import_hessian_hdf5(lake, tmp_path / "meas", run, seed=SEED)
    with pytest.raises(UserInputError, match=r"give the seed's RANDOM_SEED as seed, or both"):
        import_hessian_hdf5(lake, tmp_path / "meas", run)
    with pytest.raises(UserInputError, match=r"no leftouter_MERGED.h5 or leftouter_<i>.h5"):
        import_hessian_hdf5(lake, tmp_path, run, seed=SEED)
    assert [i.id for i in lake.list()] == before
