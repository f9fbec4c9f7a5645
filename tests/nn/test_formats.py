import gzip
import pickle

import numpy as np
import pytest

from curvlake.errors import UserInputError
from curvlake.nn import _formats


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / f"a-idx3{suffix}"
    _formats.write_idx(path, array)
    back = _formats.read_idx(path)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)
    if suffix:
        with gzip.open(path, "rb") as f:  # really gzip-compressed
            assert f.read(4)[:2] == b"\x00\x00"


def test_idx_header_matches_the_mnist_spec(tmp_path):
    labels = np.array([7, 2, 1], dtype=np.uint8)
    _formats.write_idx(tmp_path / "labels", labels)
    raw = (tmp_path / "labels").read_bytes()
    # magic 0x00000801 (ubyte, 1 dim), then the big-endian count, then the bytes
    assert raw == b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([7, 2, 1])


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(UserInputError, match="not an IDX file"):
        _formats.read_idx(tmp_path / "bad")
    _formats.write_idx(tmp_path / "ok", np.zeros((2, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(UserInputError, match="needs"):
        _formats.read_idx(tmp_path / "short")
    with pytest.raises(UserInputError, match="cannot store"):
        _formats.write_idx(tmp_path / "x", np.zeros(3, np.uint64))


def test_cifar_batch_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 5)
    _formats.write_cifar_batch(tmp_path / "b", images, labels)
    x, y = _formats.read_cifar_batch(tmp_path / "b")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert y.dtype == np.int64
    # the official layout: bytes keys, rows of 1024 R then 1024 G then 1024 B values
    with open(tmp_path / "b", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert raw[b"data"].shape == (5, 3072)
    np.testing.assert_array_equal(raw[b"data"][1, 1024:2048], images[1, 1].ravel())


def test_cifar100_label_keys(tmp_path):
    images = np.zeros((2, 3, 32, 32), np.uint8)
    _formats.write_cifar_batch(
        tmp_path / "t", images, {"fine_labels": [42, 99], "coarse_labels": [1, 19]}
    )
    assert _formats.read_cifar_batch(tmp_path / "t", "fine_labels")[1].tolist() == [42, 99]
    assert _formats.read_cifar_batch(tmp_path / "t", "coarse_labels")[1].tolist() == [1, 19]
    with pytest.raises(UserInputError, match="'labels'"):
        _formats.read_cifar_batch(tmp_path / "t", "labels")


def test_cifar_rejects_non_batches(tmp_path):
    (tmp_path / "junk").write_bytes(b"not a pickle")
    with pytest.raises(UserInputError, match="not a CIFAR"):
        _formats.read_cifar_batch(tmp_path / "junk")
    with pytest.raises(UserInputError, match="uint8"):
        _formats.write_cifar_batch(tmp_path / "f", np.zeros((1, 3, 32, 32)), [0])


def test_npz_dataset_round_trip(tmp_path):
    x, y = np.arange(24.0).reshape(6, 4), np.arange(6) % 3
    _formats.write_npz_dataset(tmp_path / "d.npz", x, y, x_test=x[:2], y_test=y[:2])
    arrays = _formats.read_npz_dataset(tmp_path / "d.npz")
    assert sorted(arrays) == ["x", "x_test", "y", "y_test"]
    np.testing.assert_array_equal(arrays["x"], x)
    np.savez(tmp_path / "bad.npz", inputs=x)
    with pytest.raises(UserInputError, match="must hold arrays 'x' and 'y'"):
        _formats.read_npz_dataset(tmp_path / "bad.npz")
    with pytest.raises(UserInputError, match="no such"):
        _formats.read_npz_dataset(tmp_path / "missing.npz")
