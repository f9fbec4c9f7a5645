import numpy as np
import pytest
import torch

from curvlake.errors import UserInputError
from curvlake.nn import _formats
from curvlake.nn.datasets import (
    DATASET_NAMES,
    augment_batch,
    from_arrays,
    load_npz,
    load_splits,
)

# --- digits --------------------------------------------------------------------------------


def test_digits_splits_are_deterministic_disjoint_and_complete():
    a = load_splits("digits", split_seed=3)
    b = load_splits("digits", split_seed=3)
    c = load_splits("digits", split_seed=4)
    ids = [a.train.sample_id, a.val.sample_id, a.test.sample_id]
    assert [len(i) for i in ids] == [1079, 359, 359]
    assert sorted(np.concatenate(ids).tolist()) == list(range(1797))
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split(name).sample_id, b.split(name).sample_id)
        np.testing.assert_array_equal(a.split(name).x, b.split(name).x)
    assert not np.array_equal(a.test.sample_id, c.test.sample_id)
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8) and a.name == "digits"
    assert a.train.x.dtype == np.float32 and a.train.y.dtype == np.int64


def test_digits_matches_sklearn_and_val_size():
    from sklearn.datasets import load_digits

    digits = load_digits()
    s = load_splits("digits", val_size=100, standardize=False)
    assert len(s.val) == 100 and len(s.test) == 359 and len(s.train) == 1797 - 459
    ids = s.train.sample_id
    np.testing.assert_allclose(s.train.x[:, 0], digits.images[ids] / 16.0, rtol=1e-6)
    np.testing.assert_array_equal(s.train.y, digits.target[ids])
    assert s.standardize == "none"
    np.testing.assert_array_equal(s.mean, [0.0])
    np.testing.assert_array_equal(s.std, [1.0])


def test_train_standardisation_uses_train_statistics():
    raw = load_splits("digits", standardize=False)
    s = load_splits("digits")
    assert s.standardize == "train"
    x = raw.train.x.astype(np.float64)
    np.testing.assert_allclose(s.mean, [x.mean()], rtol=1e-12)
    np.testing.assert_allclose(s.std, [x.std()], rtol=1e-12)
    assert abs(s.train.x.mean()) < 1e-5
    assert s.train.x.std() == pytest.approx(1.0, abs=1e-5)
    # the same affine map on val / test
    np.testing.assert_allclose(s.val.x, (raw.val.x - s.mean[0]) / s.std[0], atol=1e-5)
    np.testing.assert_allclose(s.pad_value, -s.mean / s.std)


def test_unknown_dataset_and_bad_options():
    with pytest.raises(UserInputError, match="digits, mnist, cifar10, cifar100"):
        load_splits("svhn")
    with pytest.raises(UserInputError, match="standardize"):
        load_splits("digits", standardize="zscore")
    with pytest.raises(UserInputError, match="published"):
        load_splits("digits", standardize="published")
    with pytest.raises(UserInputError, match="val_size"):
        load_splits("digits", val_size=5000)
    with pytest.raises(UserInputError, match="split_seed"):
        load_splits("digits", split_seed=-1)
    assert DATASET_NAMES == ("digits", "mnist", "cifar10", "cifar100")


# --- MNIST ---------------------------------------------------------------------------------


def test_mnist_from_idx_files(mnist_dir):
    root, arrays = mnist_dir
    s = load_splits("mnist", data_dir=root, val_size=10, split_seed=1, standardize=False)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    assert not set(s.train.sample_id) & set(s.val.sample_id)
    images = arrays["train-images-idx3-ubyte"]
    np.testing.assert_allclose(s.val.x[:, 0], images[s.val.sample_id] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(s.test.y, arrays["t10k-labels-idx1-ubyte.gz"])
    np.testing.assert_array_equal(s.test.sample_id, np.arange(20))
    # same data when data_dir is the folder itself
    t = load_splits("mnist", data_dir=root / "MNIST" / "raw", val_size=10, split_seed=1)
    np.testing.assert_array_equal(t.train.sample_id, s.train.sample_id)


def test_mnist_published_standardisation(mnist_dir):
    root, arrays = mnist_dir
    s = load_splits("mnist", data_dir=root, val_size=0, standardize="published")
    raw = arrays["t10k-images-idx3-ubyte.gz"] / 255.0
    np.testing.assert_allclose(s.test.x[:, 0], (raw - 0.1307) / 0.3081, atol=1e-5)
    assert len(s.val) == 0 and s.val.x.shape == (0, 1, 28, 28)


def test_mnist_default_val_size_needs_the_full_data(mnist_dir):
    root, _ = mnist_dir
    with pytest.raises(UserInputError, match="val_size=10000"):
        load_splits("mnist", data_dir=root)


def test_mnist_missing_files_name_the_layout(tmp_path, mnist_dir):
    root, _ = mnist_dir
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserInputError, match="t10k-labels-idx1-ubyte") as info:
        load_splits("mnist", data_dir=root, val_size=1)
    assert "never downloads" in str(info.value)
    with pytest.raises(UserInputError, match="train-images-idx3-ubyte"):
        load_splits("mnist", data_dir=tmp_path / "empty")


def test_file_dataset_without_data_dir(monkeypatch):
    monkeypatch.delenv("CURVLAKE_DATA_DIR", raising=False)
    with pytest.raises(UserInputError, match="cifar-10-batches-py"):
        load_splits("cifar10")


def test_data_dir_from_environment(monkeypatch, mnist_dir):
    root, _ = mnist_dir
    monkeypatch.setenv("CURVLAKE_DATA_DIR", str(root))
    assert len(load_splits("mnist", val_size=5).test) == 20


# --- CIFAR ---------------------------------------------------------------------------------


def test_cifar10_from_pickles(cifar10_dir):
    root, (train_x, train_y, test_x, test_y) = cifar10_dir
    for data_dir in (root, root / "cifar-10-batches-py"):
        s = load_splits("cifar10", data_dir=data_dir, val_size=5, standardize="none")
        assert (len(s.train), len(s.val), len(s.test)) == (15, 5, 6)
        assert s.input_shape == (3, 32, 32)
        np.testing.assert_allclose(s.train.x, train_x[s.train.sample_id] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(s.train.y, train_y[s.train.sample_id])
        np.testing.assert_array_equal(s.test.y, test_y)
        np.testing.assert_allclose(s.test.x, test_x / 255.0, rtol=1e-6)
    published = load_splits("cifar10", data_dir=root, val_size=5, standardize="published")
    np.testing.assert_allclose(published.mean, [0.4914, 0.4822, 0.4465])
    np.testing.assert_allclose(published.std, [0.2023, 0.1994, 0.2010])
    trained = load_splits("cifar10", data_dir=root, val_size=5)
    per_channel = trained.train.x.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(per_channel.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(per_channel.std(axis=1), 1.0, atol=1e-5)


def test_cifar10_missing_batch(cifar10_dir):
    root, _ = cifar10_dir
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserInputError, match="data_batch_3"):
        load_splits("cifar10", data_dir=root, val_size=1)


def test_cifar100_fine_labels(cifar100_dir):
    root, data = cifar100_dir
    s = load_splits("cifar100", data_dir=root, val_size=2, split_seed=5)
    assert s.num_classes == 100
    np.testing.assert_array_equal(s.test.y, data["test"][1])
    np.testing.assert_array_equal(s.train.y, data["train"][1][s.train.sample_id])
    with pytest.raises(UserInputError, match="cifar-100-python"):
        load_splits("cifar100", data_dir=root / "nowhere")


# --- user arrays -------------------------------------------------------------------------------


def test_from_arrays_shapes_and_splits():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 6)), rng.integers(0, 3, 50)
    s = from_arrays(x, y, split_seed=2)
    assert s.input_shape == (6,) and s.num_classes == 3
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 10)
    # per-feature standardisation
    np.testing.assert_allclose(s.train.x.mean(axis=0).ravel(), 0.0, atol=1e-5)
    np.testing.assert_allclose(s.mean, x[s.train.sample_id].mean(axis=0), rtol=1e-6)
    images = rng.integers(0, 256, (20, 5, 5), dtype=np.uint8)
    t = from_arrays(
        images,
        np.arange(20) % 2,
        x_test=images[:4],
        y_test=[0, 1, 0, 1],
        val_size=3,
        standardize=False,
        num_classes=4,
    )
    assert t.input_shape == (1, 5, 5) and t.num_classes == 4
    assert (len(t.train), len(t.val), len(t.test)) == (17, 3, 4)
    np.testing.assert_allclose(t.test.x[:, 0], images[:4] / 255.0, rtol=1e-6)


def test_from_arrays_rejects_bad_input():
    x = np.zeros((10, 2))
    with pytest.raises(UserInputError, match="shape"):
        from_arrays(x, np.zeros(9, int))
    with pytest.raises(UserInputError, match="num_classes"):
        from_arrays(x, np.arange(10), num_classes=3)
    with pytest.raises(UserInputError, match="negative"):
        from_arrays(x, -np.ones(10, int))
    with pytest.raises(UserInputError, match="integer class"):
        from_arrays(x, np.full(10, 0.5))
    with pytest.raises(UserInputError, match="both"):
        from_arrays(x, np.zeros(10, int), x_test=x)


def test_load_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 1, 4, 4)).astype(np.float32)
    _formats.write_npz_dataset(tmp_path / "toy.npz", x, np.arange(30) % 5)
    s = load_npz(tmp_path / "toy.npz", split_seed=1)
    assert s.name == "toy" and s.num_classes == 5 and len(s.test) == 6


# --- augmentation ----------------------------------------------------------------------------


def _crops(image, padding, fill=0.0):
    c, h, w = image.shape
    padded = torch.full((c, h + 2 * padding, w + 2 * padding), fill)
    padded[:, padding : padding + h, padding : padding + w] = image
    for i in range(2 * padding + 1):
        for j in range(2 * padding + 1):
            crop = padded[:, i : i + h, j : j + w]
            yield (i, j, False), crop
            yield (i, j, True), crop.flip(-1)


def test_augment_batch_is_a_random_crop_and_flip():
    x = torch.randn(40, 2, 6, 5)
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    seen = set()
    for image, result in zip(x, out, strict=True):
        matches = [key for key, crop in _crops(image, 2) if torch.equal(crop, result)]
        assert matches, "every output must be a padded crop, possibly flipped"
        seen.add(matches[0][2])
    assert seen == {False, True}


def test_augment_batch_is_deterministic_given_the_generator():
    x = torch.randn(16, 3, 8, 8)
    a = augment_batch(x, torch.Generator().manual_seed(7))
    b = augment_batch(x, torch.Generator().manual_seed(7))
    c = augment_batch(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment_batch(x, torch.Generator(), padding=0, flip=False), x)


def test_augment_batch_pad_value_per_channel():
    x = torch.zeros(8, 3, 4, 4)
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=4, pad_value=[1.0, 2.0, 3.0])
    for channel, value in enumerate((1.0, 2.0, 3.0)):
        assert set(out[:, channel].unique().tolist()) <= {0.0, value}
    # with padding = width, some pixel of the batch is padding
    assert out[:, 2].max() == 3.0
    with pytest.raises(UserInputError, match="pad_value"):
        augment_batch(x, torch.Generator(), pad_value=[1.0, 2.0])
