"""Receptive fields: hand-computed stacks, pooling, skip connections (min vs max), the zoo."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlake.errors import UserInputError
from curvlake.nn.models import BasicBlock, build_model
from curvlake.pipelines.saturation import UnsupportedLayerError, receptive_fields


def _row(table, name):
    layer = table[name]
    return layer.r_min[0], layer.r_max[0], layer.jump[0], layer.start[0]


@pytest.mark.parametrize("depth", [1, 2, 3, 6])
def test_vgg_stack_of_3x3_convs_is_1_plus_2L(depth):
    stack = nn.Sequential(
        *[m for _ in range(depth) for m in (nn.Conv2d(2, 2, 3, padding=1), nn.ReLU())]
    )
    table = receptive_fields(stack, (2, 32, 32))
    assert table.names == [str(2 * i) for i in range(depth)]
    for i, layer in enumerate(table.layers, start=1):
        assert layer.r_min == layer.r_max == (1.0 + 2 * i,) * 2
        assert layer.jump == (1.0, 1.0) and layer.start == (0.5, 0.5)
        assert layer.map_size == (32, 32)


def test_strides_dilation_and_padding():
    model = nn.Sequential(
        nn.Conv2d(1, 1, 3, stride=2, padding=1),  # r 3, j 2, start 0.5
        nn.Conv2d(1, 1, 3),  # r 3 + 2*2 = 7, start 0.5 + 1*2 = 2.5
        nn.Conv2d(1, 1, 3, stride=2, dilation=2, padding=2),  # k_eff 5: r 7 + 4*2 = 15, j 4
        nn.Conv2d(1, 1, (1, 3), padding=(0, 1)),  # axis 1 only: r 15 + 2*4 = 23
    )
    table = receptive_fields(model, (1, 33, 33))
    assert _row(table, "0") == (3, 3, 2, 0.5)
    assert _row(table, "1") == (7, 7, 2, 2.5)
    assert _row(table, "2") == (15, 15, 4, 2.5)
    assert table["3"].r_min == (15, 23) and table["3"].jump == (4, 4)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AvgPool2d(3, 2, 1)])
def test_pooling_is_a_window_and_avgpool_gives_no_nan(pool):
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), pool, nn.Conv2d(1, 1, 3, padding=1))
    table = receptive_fields(model, (1, 16, 16), layers=["0", "1", "2"])
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    assert _row(table, "1") == (3 + k - 1, 3 + k - 1, s, 0.5 + ((k - 1) / 2 - p))
    assert _row(table, "2")[0] == 3 + k - 1 + 2 * s
    arrays = table.to_arrays()
    assert not np.isnan(arrays["r_min"]).any() and arrays["r_min"].shape == (3, 2)


def test_functional_pooling_slicing_and_padding():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.head = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            x = F.max_pool2d(self.conv(x), 2)  # r 4, j 2, start 1
            x = F.pad(x[:, :, 1::2, 1::2], (1, 1, 1, 1))  # start 1 + 2 - 4 = -1, j 4
            return self.head(F.avg_pool2d(x, 2))  # r 4 + 4 = 8, j 8, start -1 + 2 = 1

    assert _row(receptive_fields(Functional(), (1, 16, 16)), "head") == (8, 8, 8, 1)


def _block_model(stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        BasicBlock(4, 4 if stride == 1 else 8, stride, batch_norm=False, shortcut="conv"),
        nn.Conv2d(4 if stride == 1 else 8, 2, 1),
    )


def test_resnet_basic_block_min_and_max_over_paths():
    identity = receptive_fields(_block_model(1), (2, 16, 16))
    assert _row(identity, "1.conv1") == (5, 5, 1, 0.5)
    assert _row(identity, "1.conv2") == (7, 7, 1, 0.5)
    assert _row(identity, "2") == (3, 7, 1, 0.5)  # shortcut path: the stem's 3
    down = receptive_fields(_block_model(2), (2, 16, 16))
    assert _row(down, "1.conv1") == (5, 5, 2, 0.5)
    assert _row(down, "1.conv2") == (9, 9, 2, 0.5)
    assert _row(down, "1.downsample") == (3, 3, 2, 0.5)
    assert _row(down, "2") == (3, 9, 2, 0.5)


def test_merge_of_differently_centred_paths_takes_the_union():
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2)  # window [0, 2]
            self.skip = nn.Conv2d(1, 1, 1, stride=2)  # window [0, 1]
            self.head = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.head(self.pool(x) + self.skip(x))

    assert _row(receptive_fields(TwoPaths(), (1, 8, 8)), "head") == (1, 2, 2, 1)


def test_global_context_branch_is_inf_for_max_only():
    class SqueezeExcite(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.head = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.head(y * torch.sigmoid(y.mean((2, 3), keepdim=True)))

    assert _row(receptive_fields(SqueezeExcite(), (2, 8, 8)), "head") == (3, math.inf, 1, 0.5)


def test_vgg11_values_and_border_layer_moves_with_resolution():
    model = build_model("vgg11", num_classes=10, input_shape=(3, 32, 32))
    table = receptive_fields(model, (3, 32, 32))
    expected = [3, 8, 18, 26, 46, 62, 102, 134]
    convs = [layer for layer in table.layers if layer.name.startswith("features")]
    assert [layer.r_min[0] for layer in convs] == expected
    assert [layer.jump[0] for layer in convs] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert table.border_layer() == "features.15"  # 46 >= 32 > 26
    assert table["classifier.6"].r_min == (math.inf, math.inf)
    assert receptive_fields(model, (3, 64, 64)).border_layer() == "features.22"  # 102 >= 64


def test_resnet18_k_min_stays_at_the_stem_max_grows():
    model = build_model("resnet18_k", num_classes=10, input_shape=(3, 32, 32), k=2)
    table = receptive_fields(model, (3, 32, 32))
    assert _row(table, "layer1.1.conv1")[:2] == (5, 9)
    assert _row(table, "layer2.0.downsample")[:3] == (3, 11, 2)
    assert _row(table, "layer3.0.conv2")[:3] == (15, 37, 4)
    assert table.border_layer(by="max") == "layer3.0.conv2"  # 37 >= 32 > 29
    # the all-shortcut path keeps the stem's 3 through every block output, so only a block's
    # own convs raise r_min: layer4.1.conv2 = 3 (block input) + 2 * 8 + 2 * 8 = 35 >= 32
    assert _row(table, "layer4.1.conv2")[:2] == (35, 109)
    assert table.border_layer() == "layer4.1.conv2"


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("vgg11", {}),
        ("resnet18_k", {"k": 2, "batch_norm": True}),
        ("cnn5_k", {"k": 2}),
        ("cnn5_k", {"k": 2, "pooling": "max", "batch_norm": True}),
        ("resnet20", {}),
        ("3c3d", {}),
        ("allcnnc", {}),
        ("mlp", {"widths": [8]}),
    ],
)
def test_zoo_models_run_and_restore_state(name, params):
    model = build_model(name, num_classes=10, input_shape=(3, 32, 32), **params)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = receptive_fields(model, (3, 32, 32))
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    arrays = table.to_arrays()
    assert len(table.layers) == len(arrays["name"]) > 0
    assert not np.isnan(arrays["r_min"]).any() and not np.isnan(arrays["start"]).any()
    assert (arrays["r_min"] <= arrays["r_max"]).all()


def test_3c3d_tensorflow_same_padding():
    table = receptive_fields(
        build_model("3c3d", num_classes=10, input_shape=(3, 32, 32)), (3, 32, 32)
    )
    assert _row(table, "conv1") == (5, 5, 1, 2.5)
    assert _row(table, "conv2") == (11, 11, 2, 5.5)  # TF-same max pool 3/2 pads after only


def test_conv1d_model():
    model = nn.Sequential(nn.Conv1d(2, 3, 5), nn.MaxPool1d(2), nn.Conv1d(3, 3, 3))
    table = receptive_fields(model, (2, 40))
    assert table.input_size == (40,)
    assert table["2"].r_min == (5 + 1 + 2 * 2,)


def test_border_layer_none_when_nothing_covers():
    table = receptive_fields(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 9, 9))
    assert table.border_layer() is None
    with pytest.raises(UserInputError, match="by="):
        table.border_layer(by="mean")


def test_unsupported_operations_raise_clearly():
    with pytest.raises(UnsupportedLayerError, match="ConvTranspose2d"):
        receptive_fields(nn.Sequential(nn.ConvTranspose2d(1, 1, 3)), (1, 8, 8))

    class Upsample(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.conv(F.interpolate(x, scale_factor=2.0))

    with pytest.raises(UnsupportedLayerError, match="interpolate"):
        receptive_fields(Upsample(), (1, 8, 8))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedLayerError, match=r"torch\.fx"):
        receptive_fields(Branchy(), (1, 8, 8))


def test_bad_arguments():
    model = nn.Sequential(nn.Conv2d(1, 1, 3))
    with pytest.raises(UserInputError, match="input_shape"):
        receptive_fields(model, (1, 0, 8))
    with pytest.raises(UserInputError, match="unknown layer"):
        receptive_fields(model, (1, 8, 8), layers=["nope"])
