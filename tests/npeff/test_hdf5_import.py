"""Import of the reference implementation's HDF5 files (PEFs and NPEFF decompositions).

The files are built here in exactly the reference layouts (``npeff/fishers/pefs.py``,
``npeff/decomp/decomps.py`` and the C++ writer of ``mmatena/npeff_ref``): D-PEF entries in
descending value order, LRM-PEF entries by flat ``class * P + param`` index with cumulative
``col_offsets``, sizes as 1-element int arrays the way the C++ code writes them.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from curvlake.errors import UserInputError
from curvlake.lake import open_lake
from curvlake.pipelines.npeff import pefs as pef_kernels
from curvlake.pipelines.npeff.hdf5_import import (
    import_npeff_hdf5,
    import_pefs_hdf5,
    lrm_class_index,
    lvrm_class_index,
)
from tests._markers import requires_h5py

N, K, P, C = 6, 4, 20, 3


@pytest.fixture
def lake(tmp_path):
    return open_lake(tmp_path / "lake", create=True)


def _dpef_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = rng.random((N, P)) * (rng.random((N, P)) < 0.6)
    indices = np.argsort(-dense, axis=1, kind="stable")[:, :K].astype(np.int32)  # tf.top_k order
    return {
        "data/labels": rng.integers(0, C, N).astype(np.int32),
        "data/predicted_logits": rng.standard_normal((N, C)).astype(np.float32),
        "data/fisher/values": np.take_along_axis(dense, indices, 1).astype(np.float32),
        "data/fisher/indices": indices,
        "data/dense_fisher_norms": np.linalg.norm(dense, axis=1).astype(np.float32),
    }


def _write(path, arrays: dict[str, np.ndarray], attrs: dict[tuple[str, str], object]):
    import h5py

    with h5py.File(path, "w") as f:
        for name, values in arrays.items():
            f.create_dataset(name, data=values)
        for (name, attr), value in attrs.items():
            f[name].attrs[attr] = value
    return path


def _dpef_file(path, arrays=None, logits_name="data/predicted_logits"):
    arrays = dict(arrays or _dpef_arrays())
    arrays[logits_name] = arrays.pop("data/predicted_logits")
    return _write(path, arrays, {("data/fisher", "dense_fisher_size"): np.array([P], np.int32)})


def _lrm_factors(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, C, P)) * (rng.random((N, C, P)) < 0.5)


def _lrm_file(path, a: np.ndarray, k: int, col_offsets=None):
    """An LRM-PEF file as the reference's ``SparseLrmPefComputer`` writes it."""
    flat = a.reshape(N, C * P)
    idx = np.sort(np.argsort(-np.abs(flat), axis=1, kind="stable")[:, :k], axis=1)
    classes = idx // P
    counts = np.stack([(classes == c).sum(1) for c in range(C)], axis=1)
    offsets = np.concatenate([np.zeros((N, 1), int), np.cumsum(counts, 1)], 1).astype(np.int32)
    rng = np.random.default_rng(2)
    arrays = {
        "data/labels": rng.integers(0, C, N).astype(np.int32),
        "data/logits": rng.standard_normal((N, C)).astype(np.float32),
        "data/values": np.take_along_axis(flat, idx, 1).astype(np.float32),
        "data/col_offsets": offsets if col_offsets is None else col_offsets,
        "data/row_indices": (idx % P).astype(np.int32),
        "data/pef_frobenius_norms": rng.random(N).astype(np.float32),
    }
    return _write(path, arrays, {("data", "n_classes"): C, ("data", "n_parameters"): P}), arrays


def test_lrm_class_index_from_cumulative_offsets():
    offsets = np.array([[0, 2, 2, 5], [0, 0, 5, 5]])
    np.testing.assert_array_equal(lrm_class_index(offsets, 5), [[0, 0, 2, 2, 2], [1, 1, 1, 1, 1]])
    for bad in ([[0, 2, 1, 5]], [[1, 2, 3, 5]], [[0, 2, 3, 4]]):
        with pytest.raises(UserInputError, match="col_offsets"):
            lrm_class_index(np.array(bad), 5)


def test_missing_h5py_is_a_clear_error(lake, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(UserInputError, match=r"pip install 'curvlake\[hdf5\]'"):
        import_pefs_hdf5(lake, tmp_path / "x.h5")


@requires_h5py
@pytest.mark.parametrize("logits_name", ["data/predicted_logits", "data/logits"])
def test_dpef_round_trip(lake, tmp_path, logits_name):
    arrays = _dpef_arrays()
    path = _dpef_file(tmp_path / "dpefs.h5", arrays, logits_name)
    pefs_id = import_pefs_hdf5(lake, path, rows_per_block=4)
    ds = lake.open(pefs_id)
    values, indices = ds["values"].values, ds["indices"].values
    assert (np.diff(indices, axis=1) > 0).all()  # sorted by parameter index
    for i in range(N):  # the same (index, value) pairs
        order = np.argsort(arrays["data/fisher/indices"][i])
        np.testing.assert_array_equal(indices[i], arrays["data/fisher/indices"][i][order])
        np.testing.assert_array_equal(values[i], arrays["data/fisher/values"][i][order])
    np.testing.assert_array_equal(ds["dense_norm"].values, arrays["data/dense_fisher_norms"])
    np.testing.assert_array_equal(ds["logits"].values, arrays["data/predicted_logits"])
    np.testing.assert_array_equal(ds["label"].values, arrays["data/labels"])
    np.testing.assert_array_equal(ds["sample_id"].values, np.arange(N))
    assert ds["label"].dtype == np.int64 and values.dtype == np.float32
    attrs = ds.attrs
    assert (attrs["pef_kind"], attrs["storage"], attrs["n_parameters"]) == ("diag", "topk", P)
    assert attrs["num_classes"] == C and attrs["imported_from"] == "dpefs.h5"
    assert lake.info(pefs_id).config["sha256"]
    assert import_pefs_hdf5(lake, path, rows_per_block=4) == pefs_id  # same file -> reused


@requires_h5py
def test_lrm_pef_round_trip_matches_our_kernel(lake, tmp_path):
    a = _lrm_factors()
    path, arrays = _lrm_file(tmp_path / "lrm.h5", a, k=9)
    ds = lake.open(import_pefs_hdf5(lake, path))
    values, indices, classes = (ds[n].values for n in ("values", "indices", "class_index"))
    assert ds.attrs["pef_kind"] == "lowrank" and ds.attrs["n_parameters"] == P
    key = classes.astype(np.int64) * P + indices
    assert (np.diff(key, axis=1) > 0).all()  # sorted by (class, parameter)
    # the same entries as our own top-k sparsification of the same factors
    ours = pef_kernels.topk_sparsify_lowrank(torch.as_tensor(a), 9)
    np.testing.assert_array_equal(values, ours[0].numpy())
    np.testing.assert_array_equal(classes, ours[1].numpy())
    np.testing.assert_array_equal(indices, ours[2].numpy())
    offsets = pef_kernels.lowrank_class_offsets(torch.as_tensor(classes), C).numpy()
    np.testing.assert_array_equal(offsets, arrays["data/col_offsets"])
    np.testing.assert_array_equal(ds["dense_norm"].values, arrays["data/pef_frobenius_norms"])
    np.testing.assert_array_equal(ds["logits"].values, arrays["data/logits"])


@requires_h5py
def test_bad_pef_files(lake, tmp_path):
    arrays = _dpef_arrays()
    del arrays["data/dense_fisher_norms"]
    path = _write(tmp_path / "incomplete.h5", arrays, {})
    with pytest.raises(UserInputError, match=r"dense_fisher_norms.*attribute data/fisher"):
        import_pefs_hdf5(lake, path)
    bad_offsets = np.tile(np.array([[0, 3, 2, 9]], np.int32), (N, 1))
    path, _ = _lrm_file(tmp_path / "bad_offsets.h5", _lrm_factors(), 9, col_offsets=bad_offsets)
    with pytest.raises(UserInputError, match="col_offsets"):
        import_pefs_hdf5(lake, path)
    assert lake.list() == []  # refused before anything was written
    arrays = _dpef_arrays()
    arrays["data/fisher/indices"][0, 0] = P
    with pytest.raises(UserInputError, match=r"outside 0\.\.19"):
        import_pefs_hdf5(lake, _dpef_file(tmp_path / "range.h5", arrays))
    with pytest.raises(UserInputError, match="not a PEF file"):
        import_pefs_hdf5(lake, _write(tmp_path / "other.h5", {"data/x": np.zeros(3)}, {}))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserInputError, match="not a readable HDF5"):
        import_pefs_hdf5(lake, tmp_path / "text.h5")
    with pytest.raises(UserInputError, match="no such file"):
        import_pefs_hdf5(lake, tmp_path / "missing.h5")


def _decomposition(seed: int = 3):
    rng = np.random.default_rng(seed)
    r, n_cols = 3, 12
    kept = np.sort(rng.choice(P, n_cols, replace=False)).astype(np.int32)
    H = (rng.random((r, n_cols)) * (rng.random((r, n_cols)) < 0.4)).astype(np.float32)
    return rng.random((N, r)).astype(np.float32), H, kept


@requires_h5py
def test_dense_npeff_round_trip_with_pefs(lake, tmp_path):
    pefs_id = import_pefs_hdf5(lake, _dpef_file(tmp_path / "dpefs.h5"))
    W, H, kept = _decomposition()
    path = _write(
        tmp_path / "nmf.h5",
        {"data/W": W, "data/H": H, "data/reduce_kept_indices": kept},
        {("data/reduce_kept_indices", "full_dense_size"): np.array([P], np.int32)},
    )
    npeff_id = import_npeff_hdf5(lake, path, pefs_id=pefs_id)
    ds = lake.open(npeff_id)
    np.testing.assert_array_equal(ds["W"].values, W)
    np.testing.assert_array_equal(ds["H"].values, H)
    np.testing.assert_array_equal(ds["kept_columns"].values, kept)
    np.testing.assert_array_equal(ds["label"].values, lake.open(pefs_id)["label"].values)
    assert ds.attrs["format"] == "dense" and ds.attrs["pefs"] == pefs_id
    assert (ds.attrs["n_components"], ds.attrs["n_parameters"]) == (3, P)
    assert lake.info(npeff_id).inputs == [pefs_id]
    alone = lake.open(import_npeff_hdf5(lake, path))
    assert alone.attrs["pefs"] is None and (alone["label"].values == -1).all()


@requires_h5py
def test_sparse_and_lrm_npeff_round_trip(lake, tmp_path):
    W, H, kept = _decomposition()
    csr = sp.csr_matrix(H)
    path = _write(
        tmp_path / "sparse.h5",
        {
            "data/W": W,
            "data/H/values": csr.data,
            "data/H/row_indices": csr.indptr.astype(np.int64),
            "data/H/column_indices": csr.indices.astype(np.int32),
            "data/reduce_kept_indices": kept,
        },
        {
            ("data/H", "shape"): np.array(H.shape),
            ("data/reduce_kept_indices", "full_dense_size"): np.array([P], np.int32),
        },
    )
    ds = lake.open(import_npeff_hdf5(lake, path))
    assert ds.attrs["format"] == "csr"
    shape = (ds.sizes["component_ptr"] - 1, ds.sizes["column"])
    back = sp.csr_matrix(
        (ds["H_data"].values, ds["H_indices"].values, ds["H_indptr"].values), shape=shape
    )
    np.testing.assert_array_equal(back.toarray(), H)
    np.testing.assert_array_equal(ds["kept_columns"].values, kept)

    G = np.random.default_rng(4).standard_normal(H.shape).astype(np.float32)
    path = _write(
        tmp_path / "lrm_npeff.h5",
        {"data/W": W, "data/G": G, "data/new_to_old_col_indices": kept},
        {("data", "n_parameters"): P, ("data", "n_classes"): C},
    )
    ds = lake.open(import_npeff_hdf5(lake, path))
    assert ds.attrs["format"] == "lowrank"
    np.testing.assert_array_equal(ds["G"].values, G)
    np.testing.assert_array_equal(ds["W"].values, W)


@requires_h5py
def test_bad_npeff_files(lake, tmp_path):
    W, H, kept = _decomposition()
    path = _write(tmp_path / "nokept.h5", {"data/W": W, "data/H": H}, {})
    with pytest.raises(UserInputError, match="missing data/reduce_kept_indices"):
        import_npeff_hdf5(lake, path)
    attrs = {("data/reduce_kept_indices", "full_dense_size"): np.array([P], np.int32)}
    path = _write(
        tmp_path / "nmf.h5",
        {"data/W": W[:-1], "data/H": H, "data/reduce_kept_indices": kept},
        attrs,
    )
    pefs_id = import_pefs_hdf5(lake, _dpef_file(tmp_path / "dpefs.h5"))
    with pytest.raises(UserInputError, match="5 examples"):
        import_npeff_hdf5(lake, path, pefs_id=pefs_id)
    with pytest.raises(UserInputError, match="not pefs"):
        import_npeff_hdf5(lake, path, pefs_id=import_npeff_hdf5(lake, path))
    bad_h = _write(
        tmp_path / "badh.h5",
        {"data/W": W, "data/H": H[:, :-1], "data/reduce_kept_indices": kept},
        attrs,
    )
    with pytest.raises(UserInputError, match="data/H has shape"):
        import_npeff_hdf5(lake, bad_h)


@requires_h5py
def test_imported_pefs_feed_the_fit(lake, tmp_path):
    from curvlake.pipelines.npeff.fit import run_npeff_fit

    diag = import_pefs_hdf5(lake, _dpef_file(tmp_path / "dpefs.h5"))
    lrm = import_pefs_hdf5(lake, _lrm_file(tmp_path / "lrm.h5", _lrm_factors(), 9)[0])
    fitted = run_npeff_fit(lake, diag, n_components=2, max_iter=3, progress=False)
    assert lake.open(fitted)["W"].shape == (N, 2)
    # Random Gaussian factors need a smaller G step than PEFs do.
    fitted = run_npeff_fit(
        lake,
        lrm,
        n_components=2,
        kind="lowrank",
        max_iter=3,
        lrm_options={"learning_rate": 0.03},
        progress=False,
    )
    assert lake.open(fitted)["G"].shape[0] == 2


def _lvrm_file(path, a: np.ndarray, ranks: np.ndarray, k: int, col_sizes=None):
    """An LVRM-PEF file as the reference's LVRM computer writes it: entries by flat index over
    the example's ``r_i x P`` factor block, per-column entry counts, ranks."""
    flat = a.reshape(a.shape[0], -1)
    idx = np.sort(np.argsort(-np.abs(flat), axis=1, kind="stable")[:, :k], axis=1)
    columns = idx // P
    sizes = np.concatenate(
        [(columns[i][None] == np.arange(r)[:, None]).sum(1) for i, r in enumerate(ranks)]
    ).astype(np.int32)
    rng = np.random.default_rng(4)
    arrays = {
        "data/labels": rng.integers(0, C, len(ranks)).astype(np.int32),
        "data/logits": rng.standard_normal((len(ranks), C)).astype(np.float32),
        "data/values": np.take_along_axis(flat, idx, 1).astype(np.float32),
        "data/row_indices": (idx % P).astype(np.int32),
        "data/ranks": ranks.astype(np.int32),
        "data/col_sizes": sizes if col_sizes is None else col_sizes,
        "data/pef_frobenius_norms": rng.random(len(ranks)).astype(np.float32),
    }
    attrs = {("data", "n_parameters"): P, ("data", "min_prob_class"): 0.2}
    return _write(path, arrays, attrs), arrays


def test_lvrm_class_index_from_ranks_and_col_sizes():
    got = lvrm_class_index(np.array([2, 1, 3]), np.array([1, 3, 4, 0, 2, 2]), 4)
    np.testing.assert_array_equal(got, [[0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 2, 2]])
    with pytest.raises(UserInputError, match="sums to 6"):
        lvrm_class_index(np.array([2, 1, 3]), np.array([1, 3, 4, 0, 2]), 4)
    with pytest.raises(UserInputError, match="example 1 sum to 3"):
        lvrm_class_index(np.array([2, 1]), np.array([1, 3, 3]), 4)


@requires_h5py
def test_lvrm_pef_round_trip_matches_our_kernel(lake, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Tanh(), torch.nn.Linear(2, C))
    with torch.no_grad():
        model[2].weight.mul_(6)  # confident on some examples: ranks 1 and 2 both occur
    assert sum(p.numel() for p in model.parameters()) == P - 1  # P = 20 with the padding below
    x = torch.randn(N, 4, dtype=torch.float64) * 3
    a, ranks, _ = pef_kernels.per_example_fisher_lvrm(
        model, x, max_classes=2, min_prob=0.2, dtype=torch.float64
    )
    a = torch.nn.functional.pad(a, (0, 1)).numpy()  # a parameter that never gets gradient
    ranks = ranks.numpy()
    assert set(ranks) == {1, 2}  # both ranks occur
    k = 5
    path, arrays = _lvrm_file(tmp_path / "lvrm.h5", a[:, : ranks.max()], ranks, k)
    pefs_id = import_pefs_hdf5(lake, path, rows_per_block=4)
    ds = lake.open(pefs_id)
    assert ds.attrs["pef_kind"] == "lvrm" and ds.attrs["min_prob"] == pytest.approx(0.2)
    np.testing.assert_array_equal(ds["rank"].values, ranks)
    ours = pef_kernels.topk_sparsify_lowrank(torch.as_tensor(a), k, dtype=torch.float32)
    np.testing.assert_array_equal(ds["values"].values, ours[0].numpy())
    np.testing.assert_array_equal(ds["class_index"].values, ours[1].numpy())
    np.testing.assert_array_equal(ds["indices"].values, ours[2].numpy())
    assert (ds["class_index"].values < ranks[:, None]).all()
    np.testing.assert_array_equal(ds["dense_norm"].values, arrays["data/pef_frobenius_norms"])
    from curvlake.pipelines.npeff.fit import run_npeff_fit

    fitted = lake.open(
        run_npeff_fit(
            lake,
            pefs_id,
            n_components=2,
            kind="lowrank",
            max_iter=3,
            lrm_options={"learning_rate": 0.03},  # random factors: a smaller G step
            progress=False,
        )
    )
    assert fitted["G"].shape[0] == 2 and np.isfinite(fitted["loss"].values).all()
    # an inconsistent file is refused before anything is written
    bad = arrays["data/col_sizes"].copy()
    bad[0] += 1
    path, _ = _lvrm_file(tmp_path / "bad.h5", a[:, :2], ranks, k, col_sizes=bad)
    n_before = len(lake.list())
    with pytest.raises(UserInputError, match="col_sizes of example 0"):
        import_pefs_hdf5(lake, path)
    assert len(lake.list()) == n_before
