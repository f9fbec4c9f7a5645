"""Gradient windows in the lake (``run_grad_window``) and ``InverseFisher.from_lake``: against an
autograd loop and dense float64 inversion, invariant to blocks, chunks, backends and workers."""

from __future__ import annotations

from typing import ClassVar

import dask.array as da
import numpy as np
import pytest
import torch

from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.lake.checkpoints import load_model
from curvlake.nn.masks import ParameterMask
from curvlake.pipelines.masks import run_magnitude_mask, write_mask
from curvlake.pipelines.mfac import BlockedInverseFisher, InverseFisher, grads
from curvlake.pipelines.mfac.grads import batch_positions, run_grad_window
from curvlake.pipelines.mfac.lake import open_grad_window
from curvlake.pipelines.train import cached_run_splits
from tests._markers import requires_cupy
from tests.mfac.cases import block_diagonal_inverse, dense_inverse, relative_error
from tests.pipelines.contract import PipelineContract, train_tiny_run

DAMP = 1e-3


class TestGradWindowContract(PipelineContract):
    module = grads
    arrays = ("gradient", "sample_id")
    rtol = 1e-12
    bad_options: ClassVar = [
        ({"n_grads": 0}, r"n_grads=0 is not valid: must be an int >= 1"),
        ({"batch_size": 100_000}, r"batch_size=100000 is not valid.*examples"),
        ({"n_grads": 2000, "batch_size": 1}, r"n_grads=2000 batches of 1 need 2000 examples"),
        ({"seed": 3}, r"seed does not apply to order='sequential'"),
        ({"order": "random"}, r"order='random' is not valid"),
        ({"split": "training"}, r"split='training' is not valid"),
        ({"checkpoint": 9}, r"checkpoint=9 is not valid"),
        ({"dtype": "float16"}, r"dtype='float16' is not valid"),
        ({"mask": "mask-0123456789abcdef"}, r"no artifact 'mask-0123456789abcdef'"),
    ]

    def make_inputs(self, lake):
        return {"run_id": train_tiny_run(lake)}

    def run(self, lake, inputs, **options):
        options = {"n_grads": 40, "batch_size": 3, "block_size": 16, "dtype": "float64", **options}
        return run_grad_window(lake, inputs["run_id"], progress=False, **options)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    lake = open_lake(tmp_path_factory.mktemp("grads") / "lake", create=True)
    return lake, train_tiny_run(lake)


def _autograd_window(lake, run_id, positions, split="train", columns=None) -> np.ndarray:
    """The dense oracle: one backward of the mean loss per batch, float64."""
    model = load_model(lake, run_id).double()
    data = cached_run_splits(lake.url, run_id).split(split)
    rows = []
    for batch in positions:
        model.zero_grad()
        x = torch.as_tensor(data.x[batch], dtype=torch.float64)
        torch.nn.functional.cross_entropy(model(x), torch.as_tensor(data.y[batch])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy())
    window = np.array(rows)
    return window if columns is None else window[:, columns]


@pytest.mark.parametrize(("batch_size", "order"), [(1, "sequential"), (4, "shuffled")])
def test_window_is_the_autograd_mean_loss_gradient(tiny, batch_size, order):
    lake, run_id = tiny
    window_id = run_grad_window(
        lake, run_id, n_grads=24, batch_size=batch_size, order=order, block_size=5,
        dtype="float64", progress=False,
    )  # fmt: skip
    ds = lake.open(window_id)
    n = len(cached_run_splits(lake.url, run_id).train)
    positions = batch_positions(n, 24, batch_size, order, 0 if order == "shuffled" else None)
    expected = _autograd_window(lake, run_id, positions)
    assert relative_error(ds["gradient"].values, expected) < 1e-12
    sample_id = cached_run_splits(lake.url, run_id).train.sample_id
    np.testing.assert_array_equal(ds["sample_id"].values, sample_id[positions])
    assert ds["gradient"].data.chunks[0] == (24,)  # all rows in every chunk


def test_shuffled_positions_are_counter_based_per_pass():
    whole = batch_positions(10, 12, 3, "shuffled", 5)
    assert whole.shape == (12, 3)
    # 3 batches per pass: every pass is a permutation's first 9 positions, without repeats
    for epoch in range(4):
        part = whole[3 * epoch : 3 * epoch + 3].reshape(-1)
        assert len(set(part)) == 9
        np.testing.assert_array_equal(part, np.random.default_rng([5, epoch]).permutation(10)[:9])
    np.testing.assert_array_equal(batch_positions(10, 5, 3, "shuffled", 5, start=7), whole[7:])
    np.testing.assert_array_equal(
        batch_positions(10, 3, 3, "sequential"), np.arange(9).reshape(3, 3)
    )


def test_masked_window_holds_the_mask_coordinates(tiny):
    lake, run_id = tiny
    mask_id = run_magnitude_mask(lake, run_id, fraction=0.3)
    window_id = run_grad_window(
        lake, run_id, n_grads=10, mask=mask_id, dtype="float64", progress=False
    )
    columns = open_grad_window(lake, window_id).coordinates
    mask = lake.open(mask_id)["index"].values
    np.testing.assert_array_equal(columns, mask)
    full = run_grad_window(lake, run_id, n_grads=10, dtype="float64", progress=False)
    np.testing.assert_array_equal(
        lake.open(window_id)["gradient"].values, lake.open(full)["gradient"].values[:, mask]
    )
    inv = InverseFisher.from_lake(lake, window_id, DAMP)
    np.testing.assert_array_equal(inv.window.coordinates, mask)


def test_mask_of_another_run_is_refused(tiny, tmp_path):
    lake, run_id = tiny
    other = train_tiny_run(lake, seed=1)
    table = open_grad_window(lake, run_grad_window(lake, run_id, n_grads=2, progress=False)).table
    foreign = write_mask(
        lake, ParameterMask(table, np.arange(5)), source="test", config={}, inputs=[other]
    )
    with pytest.raises(UserInputError, match=f"indexes the parameters of run {other}"):
        run_grad_window(lake, run_id, n_grads=4, mask=foreign, progress=False)


@pytest.mark.parametrize("param_chunk", [None, 7, 128])
def test_from_lake_matches_dense_inverse_for_every_chunking(tiny, param_chunk):
    lake, run_id = tiny
    window_id = run_grad_window(
        lake, run_id, n_grads=30, batch_size=2, order="shuffled", param_chunk=param_chunk,
        dtype="float64", progress=False,
    )  # fmt: skip
    window = lake.open(window_id)["gradient"].values
    dense = dense_inverse(window, DAMP)
    x = np.random.default_rng(0).normal(size=(window.shape[1], 3))
    for backend in ("numpy", "dask"):
        inv = InverseFisher.from_lake(lake, window_id, DAMP, backend=backend)
        product, diagonal = inv @ x, inv.diagonal()
        if backend == "dask":
            assert isinstance(product, da.Array)
            assert inv.chunk_sizes == lake.open(window_id)["gradient"].data.chunks[1]
            product, diagonal = product.compute(), diagonal.compute()
        assert relative_error(product, dense @ x) < 1e-9
        assert relative_error(diagonal, np.diag(dense)) < 1e-9
        assert abs(inv.entry(3, 11) - dense[3, 11]) < 1e-9 * np.abs(dense).max()


def test_blocked_from_lake_aligns_dask_chunks_to_blocks(tiny):
    lake, run_id = tiny
    window_id = run_grad_window(
        lake, run_id, n_grads=12, param_chunk=50, dtype="float64", progress=False
    )
    window = lake.open(window_id)["gradient"].values
    dense = block_diagonal_inverse(window, DAMP, 16)
    x = np.random.default_rng(1).normal(size=window.shape[1])
    for backend in ("numpy", "dask"):
        inv = BlockedInverseFisher.from_lake(lake, window_id, DAMP, 16, backend=backend)
        got = inv @ x
        got = got.compute() if backend == "dask" else got
        assert relative_error(got, dense @ x) < 1e-9


def test_float32_window_gives_float64_accurate_inverse(tiny):
    lake, run_id = tiny
    window_id = run_grad_window(lake, run_id, n_grads=16, progress=False)
    window = lake.open(window_id)["gradient"].values
    assert window.dtype == np.float32
    dense = dense_inverse(window.astype(np.float64), 1e-5)
    inv = InverseFisher.from_lake(lake, window_id, 1e-5)
    assert relative_error(inv.diagonal(), np.diag(dense)) < 1e-8


def test_auto_backend_reads_large_windows_with_dask(tiny, monkeypatch):
    lake, run_id = tiny
    window_id = run_grad_window(lake, run_id, n_grads=8, progress=False)
    monkeypatch.setattr("curvlake.engine.memory_budget", lambda: 1000)
    assert isinstance(InverseFisher.from_lake(lake, window_id, DAMP).diagonal(), da.Array)
    with pytest.raises(UserInputError, match="backend='gpu' is not valid"):
        InverseFisher.from_lake(lake, window_id, DAMP, backend="gpu")
    with pytest.raises(UserInputError, match="a run artifact, not a grad_window"):
        InverseFisher.from_lake(lake, run_id, DAMP)


@requires_cupy
def test_cupy_backend_matches_numpy(tiny):
    lake, run_id = tiny
    window_id = run_grad_window(lake, run_id, n_grads=8, dtype="float64", progress=False)
    host = InverseFisher.from_lake(lake, window_id, DAMP, backend="numpy")
    device = InverseFisher.from_lake(lake, window_id, DAMP, backend="cupy")
    np.testing.assert_allclose(device.diagonal().get(), host.diagonal(), rtol=1e-10)


def test_dask_products_do_not_depend_on_the_worker_count(tiny):
    from curvlake.engine import client_session

    lake, run_id = tiny
    window_id = run_grad_window(lake, run_id, n_grads=16, param_chunk=64, progress=False)
    x = np.random.default_rng(2).normal(size=lake.open(window_id)["gradient"].shape[1])
    results = []
    for workers in (1, 2):
        with client_session(
            cluster="local", n_workers=workers, threads_per_worker=1, processes=False
        ):
            inv = InverseFisher.from_lake(lake, window_id, DAMP, backend="dask")
            results.append((inv.diagonal().compute(), (inv @ x).compute()))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
