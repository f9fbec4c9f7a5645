import math

import pytest
import torch
from torch import nn

from curvlake.errors import UserInputError
from curvlake.nn.models import (
    MODEL_NAMES,
    TFConv2d,
    TFMaxPool2d,
    build_model,
    count_parameters,
    model_params,
)

CIFAR = (3, 32, 32)

# Published counts (jacobian.md §3, verified against the seed code). The seed keeps an unused
# stem BatchNorm (2k parameters) when BN is off; we do not create it.
RESNET18_K_SEED_COUNTS = {
    1: 2_904,
    4: 44_274,
    8: 175_706,
    16: 700_074,
    32: 2_794_826,
    64: 11_168_394,
}


@pytest.mark.parametrize(("k", "seed_count"), sorted(RESNET18_K_SEED_COUNTS.items()))
def test_resnet18_k_parameter_counts(k, seed_count):
    model = build_model("resnet18_k", num_classes=10, input_shape=CIFAR, k=k)
    assert count_parameters(model) + 2 * k == seed_count


def test_deepobs_and_he_parameter_counts():
    assert count_parameters(build_model("3c3d", num_classes=10, input_shape=CIFAR)) == 895_210
    allcnnc = build_model("allcnnc", num_classes=100, input_shape=CIFAR)
    assert count_parameters(allcnnc) == 1_387_108
    assert count_parameters(build_model("resnet20", num_classes=10, input_shape=CIFAR)) == 269_722
    # skerch's mnist_mini: 256-20-20-20-20-20-10
    mini = build_model("mnist_mini", num_classes=10, input_shape=(1, 28, 28))
    assert count_parameters(mini) == 7_030


def test_counts_by_hand():
    # cnn5_k: 3x3 convs k, 2k, 4k, 8k with biases, linear 8k -> K
    k = 3
    expected = sum(9 * a * b + b for a, b in [(3, k), (k, 2 * k), (2 * k, 4 * k), (4 * k, 8 * k)])
    expected += 8 * k * 10 + 10
    model = build_model("cnn5_k", num_classes=10, input_shape=CIFAR, k=k)
    assert count_parameters(model) == expected
    mlp = build_model("mlp", num_classes=4, input_shape=(2, 3, 3), widths=[5, 7], activation="tanh")
    assert count_parameters(mlp) == (18 * 5 + 5) + (5 * 7 + 7) + (7 * 4 + 4)


def test_batch_norm_variants():
    k = 2
    bn = build_model("resnet18_k", num_classes=10, input_shape=CIFAR, k=k, batch_norm=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert all(m.bias is None for m in bn.modules() if isinstance(m, nn.Conv2d))
    plain = build_model("resnet18_k", num_classes=10, input_shape=CIFAR, k=k)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(m.bias is not None for m in convs)
    no_bn = build_model("resnet20", num_classes=10, input_shape=CIFAR, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 12, 20)])
def test_every_model_runs_on_every_shape(name, shape):
    params = {"k": 2} if name.endswith("_k") else {}
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, input_shape=shape, **params)
    model.eval()
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_architectures_unchanged_on_cifar():
    m = build_model("3c3d", num_classes=10, input_shape=CIFAR)
    names = [n for n, _ in m.named_children()]
    assert "pool_to_3x3" not in names
    features = m[: names.index("flatten")](torch.zeros(1, *CIFAR))
    assert features.shape == (1, 128, 3, 3)
    assert [m.conv1.tf_padding, m.conv2.tf_padding, m.conv3.tf_padding] == [
        "valid",
        "valid",
        "same",
    ]
    a = build_model("allcnnc", num_classes=100, input_shape=CIFAR)
    assert a[:-1](torch.zeros(1, *CIFAR)).shape == (1, 100, 6, 6)  # DeepOBS' 6x6 before the mean
    assert a.conv7.tf_padding == "valid"
    tiny = build_model("3c3d", num_classes=10, input_shape=(1, 8, 8))
    assert "pool_to_3x3" in dict(tiny.named_children())


def test_tf_same_padding():
    for size in range(1, 12):
        x = torch.randn(1, 1, size, size)
        assert TFMaxPool2d(3, 2)(x).shape[-1] == math.ceil(size / 2)
        conv = TFConv2d(1, 1, 3, stride=2, tf_padding="same")
        assert conv(x).shape[-1] == math.ceil(size / 2)
    # TF puts the odd padding pixel after: on 4 pixels, max-pool 3/2 windows are [0:3], [2:4]
    x = torch.tensor([[[[1.0, 5.0, 2.0, 3.0]]]]).expand(1, 1, 4, 4).transpose(-1, -2).contiguous()
    out = TFMaxPool2d(3, 2)(x.transpose(-1, -2))
    assert out[0, 0, 0].tolist() == [5.0, 3.0]


def test_mnist_mini_resizes_inside_the_model():
    mini = build_model("mnist_mini", num_classes=10, input_shape=(1, 28, 28))
    assert mini.resize.size == 16 and isinstance(mini.act1, nn.Tanh)
    native = build_model("mnist_mini", num_classes=10, input_shape=(1, 16, 16))
    assert "resize" not in dict(native.named_children())
    off = build_model("mnist_mini", num_classes=10, input_shape=(1, 28, 28), input_size=0)
    assert off.fc1.in_features == 784
    # the resize is linear with weights summing to one: it commutes with standardisation
    x = torch.rand(2, 1, 28, 28)
    a, b = 0.7, -0.3
    torch.testing.assert_close(mini.resize(a * x + b), a * mini.resize(x) + b)


def test_fixup_init_zeroes_residual_branches():
    m = build_model("resnet18_k", num_classes=10, input_shape=CIFAR, k=2, weight_init="fixup")
    assert torch.count_nonzero(m.layer1[0].conv2.weight) == 0
    assert torch.count_nonzero(m.fc.weight) == 0
    assert torch.count_nonzero(m.layer1[0].conv1.weight) > 0


def test_model_params_and_errors():
    assert model_params("mlp") == {"widths": [256, 256], "activation": "relu"}
    assert model_params("3c3d") == {}
    defaults = model_params("mlp")
    defaults["widths"].append(1)
    assert model_params("mlp")["widths"] == [256, 256]
    with pytest.raises(UserInputError, match="valid models are: mlp, mnist_mini"):
        build_model("resnet50", num_classes=10, input_shape=CIFAR)
    with pytest.raises(UserInputError, match="valid models are"):
        model_params("vit")
    with pytest.raises(UserInputError, match=r"'depth'.*valid parameters: widths, activation"):
        build_model("mlp", num_classes=10, input_shape=CIFAR, depth=3)
    with pytest.raises(UserInputError, match=r"\(none\)"):
        build_model("3c3d", num_classes=10, input_shape=CIFAR, k=2)
    with pytest.raises(UserInputError, match="activation"):
        build_model("mlp", num_classes=10, input_shape=CIFAR, activation="swish")
    with pytest.raises(UserInputError, match="positive int"):
        build_model("cnn5_k", num_classes=10, input_shape=CIFAR, k=0)
    with pytest.raises(UserInputError, match="input_shape"):
        build_model("mlp", num_classes=10, input_shape=(32, 32))
    with pytest.raises(UserInputError, match="num_classes"):
        build_model("mlp", num_classes=0, input_shape=CIFAR)
