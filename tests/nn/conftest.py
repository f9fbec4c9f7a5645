"""Tiny on-disk datasets in the official layouts, written with curvlake's own writers."""

import numpy as np
import pytest

from curvlake.nn import _formats


def make_images(rng, n, shape):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


@pytest.fixture
def mnist_dir(tmp_path):
    """``tmp_path/MNIST/raw`` with 50 train and 20 test images; gzipped test files."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": make_images(rng, 50, (28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 50).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": make_images(rng, 20, (28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 20).astype(np.uint8),
    }
    for name, array in arrays.items():
        _formats.write_idx(folder / name, array)
    return tmp_path, arrays


@pytest.fixture
def cifar10_dir(tmp_path):
    """``tmp_path/cifar-10-batches-py`` with 5 train batches of 4 images and 6 test images."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = make_images(rng, 4, (3, 32, 32)), rng.integers(0, 10, 4)
        _formats.write_cifar_batch(folder / f"data_batch_{i}", x, y)
        train_x.append(x)
        train_y.append(y)
    test_x, test_y = make_images(rng, 6, (3, 32, 32)), rng.integers(0, 10, 6)
    _formats.write_cifar_batch(folder / "test_batch", test_x, test_y)
    return tmp_path, (np.concatenate(train_x), np.concatenate(train_y), test_x, test_y)


@pytest.fixture
def cifar100_dir(tmp_path):
    """``tmp_path/cifar-100-python`` with 12 train and 5 test images."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = {}
    for name, n in (("train", 12), ("test", 5)):
        x = make_images(rng, n, (3, 32, 32))
        fine, coarse = rng.integers(0, 100, n), rng.integers(0, 20, n)
        _formats.write_cifar_batch(folder / name, x, {"fine_labels": fine, "coarse_labels": coarse})
        data[name] = (x, fine)
    return tmp_path, data
