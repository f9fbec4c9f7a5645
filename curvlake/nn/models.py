"""Model zoo: the networks of the seed papers, built for any input shape.

Every model maps a float32 batch ``N x C x H x W`` (``mlp`` also ``N x D`` tabular inputs) to
logits ``N x num_classes``.
``build_model(name, num_classes=..., input_shape=..., **params)`` builds one;
``model_params(name)`` lists the accepted keyword parameters and their defaults.

Models (``MODEL_NAMES``):

- ``mlp``: flatten, then ``Linear -> activation`` per entry of ``widths``, then a linear
  classifier. PyTorch default initialisation.
- ``mnist_mini``: the skerch paper's ``mnist_mini`` (DeepOBS ``mnist_mlp`` with dims
  256-20-20-20-20-20-10 and tanh) [Fernandez et al. 2024]. The original feeds MNIST resized to
  16x16 (torchvision ``Resize(16)``); here the resize is the model's first, parameter-free layer
  (bilinear, antialiased), so the model takes the dataset's native images and input-space
  quantities stay in the native pixel space. Bilinear resizing commutes with per-channel
  standardisation, so it does not matter that the original did not standardise. 7,030
  parameters for one input channel. ``input_size=0`` disables the resize.
- ``cnn5_k``: the 5-layer mCNN of Nakkiran et al. 2019 ("Deep Double Descent") as implemented
  in the seed of Gamba et al. 2023: four 3x3 conv layers of widths ``k, 2k, 4k, 8k`` (each
  conv [-> BN] -> ReLU), a global pool and a linear classifier. ``pooling="avg"`` is the seed's
  variant (2x2 average pooling after conv 2 and 3, global average pooling);
  ``pooling="max"`` is Nakkiran's original (2x2 max pooling after conv 2, 3 and 4, global max
  pooling). Both have the same parameters. Convs have biases unless ``batch_norm=True``.
- ``resnet18_k``: CIFAR-style ResNet18 of Nakkiran et al. 2019 / Gamba et al. 2023: BasicBlock
  ``[2, 2, 2, 2]``, 3x3 stride-1 stem, no max-pool, stage widths ``k, 2k, 4k, 8k``, global
  average pool, linear classifier. No BatchNorm by default, and then every 3x3 conv has a bias.
  As in the seed, the projection shortcut is a bias-free 1x1 conv without BatchNorm, also when
  ``batch_norm=True``. ``weight_init="fixup"`` gives the seed's Fixup initialisation
  [Zhang et al. 2019]. Parameter count: the seed counts 2k more parameters than this model
  (e.g. 2,904 vs 2,902 for k=1) because it keeps an unused stem BatchNorm when BN is off; we
  do not create parameters that never receive a gradient.
- ``resnet20``: the CIFAR ResNet-20 of He et al. 2016 (§4.2): 16-32-64 channels, 3 BasicBlocks
  per stage, parameter-free "option A" shortcuts (strided subsampling + zero channel padding),
  BatchNorm by default, Kaiming-normal conv init. 269,722 parameters on CIFAR-10.
- ``vgg11``: VGG-11 (configuration A of Simonyan & Zisserman 2015) in the CIFAR form of
  phd-lab (Richter et al. 2021): 3x3 convs [-> BN] -> ReLU with 2x2 max pooling, a global
  average pool, and the classifier ``BN1d -> Dropout -> Linear(512, 256) -> ReLU -> BN1d ->
  Dropout -> Linear(256, K)``; phd-lab's initialisation.
- ``3c3d``: DeepOBS ``cifar10_3c3d`` (Schneider et al. 2019): conv5x5(64, valid) -> maxpool ->
  conv3x3(96, valid) -> maxpool -> conv3x3(128, same) -> maxpool -> FC 512 -> FC 256 -> FC K,
  ReLUs, TensorFlow-style "same" max pooling 3x3 stride 2, Xavier init. 895,210 parameters on
  CIFAR-10.
- ``allcnnc``: DeepOBS ``cifar100_allcnnc`` (All-CNN-C of Springenberg et al. 2015): nine convs
  with dropout 0.2/0.5/0.5, TensorFlow "same" padding, a ReLU after the last conv (as in
  DeepOBS) and a spatial mean. 1,387,108 parameters on CIFAR-100.

Deviations for small inputs (none of them changes a model on 32x32 inputs):

- max pools use ``ceil_mode=True`` (identical for even sizes, defined on a 1x1 map);
- in ``3c3d`` and ``allcnnc`` a "valid" conv whose input is smaller than twice its kernel uses
  "same" padding instead, and ``3c3d`` average-pools adaptively to 3x3 before its first dense
  layer when the feature map is not 3x3, so the dense layers keep their size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curvlake.errors import UserInputError

MODEL_NAMES = (
    "mlp",
    "mnist_mini",
    "cnn5_k",
    "resnet18_k",
    "resnet20",
    "vgg11",
    "3c3d",
    "allcnnc",
)

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


# ---------------------------------------------------------------------------------------------
# parameter specs


@dataclass(frozen=True)
class _Param:
    default: Any
    check: Callable[[Any], bool]
    allowed: str


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _one_of(*choices: str) -> _Param:
    return _Param(choices[0], lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))


def _widths_ok(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_pos_int(w) for w in v)


def _prob_ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0


_WIDTH = _Param(64, _is_pos_int, "a positive int")
_BN_OFF = _Param(False, _is_bool, "true or false")
_BN_ON = _Param(True, _is_bool, "true or false")

_PARAMS: dict[str, dict[str, _Param]] = {
    "mlp": {
        "widths": _Param([256, 256], _widths_ok, "a list of positive ints"),
        "activation": _one_of("relu", "tanh", "gelu"),
    },
    "mnist_mini": {
        "input_size": _Param(16, _is_nonneg_int, "a non-negative int (0 = no resize)"),
        "activation": _one_of("tanh", "relu", "gelu"),
    },
    "cnn5_k": {"k": _WIDTH, "batch_norm": _BN_OFF, "pooling": _one_of("avg", "max")},
    "resnet18_k": {
        "k": _WIDTH,
        "batch_norm": _BN_OFF,
        "weight_init": _one_of("pytorch", "fixup"),
    },
    "resnet20": {"batch_norm": _BN_ON},
    "vgg11": {
        "batch_norm": _BN_ON,
        "dropout": _Param(0.25, _prob_ok, "a probability in [0, 1)"),
    },
    "3c3d": {},
    "allcnnc": {"dropout": _Param(True, _is_bool, "true or false")},
}


def _check_name(name: str) -> None:
    if name not in _PARAMS:
        raise UserInputError(f"unknown model {name!r}; valid models are: {', '.join(MODEL_NAMES)}")


def model_params(name: str) -> dict[str, Any]:
    """The keyword parameters that model ``name`` accepts, with their defaults.

    Raises:
        UserInputError: ``name`` is not in ``MODEL_NAMES``.
    """
    _check_name(name)
    return {key: _copy_default(p.default) for key, p in _PARAMS[name].items()}


def _copy_default(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def resolve_model_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of model ``name`` updated with ``params``, validated.

    Raises:
        UserInputError: an unknown model, an unknown parameter, or a bad value.
    """
    _check_name(name)
    params = dict(params or {})
    spec = _PARAMS[name]
    unknown = sorted(set(params) - set(spec))
    if unknown:
        valid = ", ".join(spec) if spec else "(none)"
        raise UserInputError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"valid parameters: {valid}"
        )
    resolved = model_params(name)
    for key, value in params.items():
        if not spec[key].check(value):
            raise UserInputError(
                f"model {name!r}: parameter {key!r} = {value!r} is invalid; expected "
                f"{spec[key].allowed}"
            )
        resolved[key] = _copy_default(list(value) if isinstance(value, tuple) else value)
    return resolved


def _check_shape(name: str, num_classes: Any, input_shape: Any) -> tuple[int, ...]:
    if not _is_pos_int(num_classes):
        raise UserInputError(f"num_classes must be a positive int, got {num_classes!r}")
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
    if len(shape) not in (1, 3) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise UserInputError(
            f"input_shape must be (channels, height, width) or (features,) of positive ints, "
            f"got {input_shape!r}"
        )
    if len(shape) == 1 and name != "mlp":
        raise UserInputError(
            f"model {name!r} needs image inputs (channels, height, width), got input_shape "
            f"{list(shape)}; tabular inputs (features,) go with model 'mlp'"
        )
    return tuple(int(s) for s in shape)


def build_model(
    name: str, *, num_classes: int, input_shape: Sequence[int], **params: Any
) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` = (C, H, W), or (D,) for ``mlp``.

    Parameters are drawn from torch's global RNG (seed it, or use
    ``curvlake.nn.training.make_model`` which seeds it from the config).

    Raises:
        UserInputError: an unknown model or parameter, a bad value, or a bad shape.
    """
    resolved = resolve_model_params(name, params)
    shape = _check_shape(name, num_classes, input_shape)
    return _BUILDERS[name](num_classes, shape, **resolved)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries: the size of θ (:mod:`curvlake.nn.params`)."""
    from curvlake.nn.params import parameter_table

    return parameter_table(model).total


# ---------------------------------------------------------------------------------------------
# shared layers


class Resize(nn.Module):
    """Parameter-free bilinear resize to ``size x size`` (antialiased when shrinking)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding (before, after): output = ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" / "valid" padding (asymmetric when needed), as DeepOBS."""

    def __init__(self, *args: Any, tf_padding: str = "valid", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tf_padding = tf_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_padding == "same":
            (kh, kw), (sh, sw) = self.kernel_size, self.stride
            top, bottom = _tf_same_pad(x.shape[-2], kh, sh)
            left, right = _tf_same_pad(x.shape[-1], kw, sw)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tf_padding={self.tf_padding!r}"


class TFMaxPool2d(nn.Module):
    """Max pooling with TensorFlow "same" padding (pads with -inf)."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = _tf_same_pad(x.shape[-2], self.kernel_size, self.stride)
        left, right = _tf_same_pad(x.shape[-1], self.kernel_size, self.stride)
        x = F.pad(x, (left, right, top, bottom), value=-math.inf)
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, tf_padding='same'"


class SpatialMean(nn.Module):
    """Mean over the spatial dimensions: N x C x H x W -> N x C."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _same_size(size: int, stride: int) -> int:
    return -(-size // stride)


# ---------------------------------------------------------------------------------------------
# MLPs


def _mlp_layers(in_features: int, widths: Sequence[int], num_classes: int, act: str) -> list:
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    previous = in_features
    for i, width in enumerate(widths, start=1):
        layers += [(f"fc{i}", nn.Linear(previous, width)), (f"act{i}", _ACTIVATIONS[act]())]
        previous = width
    layers.append((f"fc{len(widths) + 1}", nn.Linear(previous, num_classes)))
    return layers


def _build_mlp(num_classes: int, shape: tuple[int, ...], *, widths, activation) -> nn.Module:
    return nn.Sequential(
        OrderedDict(_mlp_layers(math.prod(shape), widths, num_classes, activation))
    )


def _build_mnist_mini(num_classes: int, shape, *, input_size, activation) -> nn.Module:
    channels, height, width = shape
    layers: list[tuple[str, nn.Module]] = []
    if input_size and (height, width) != (input_size, input_size):
        layers.append(("resize", Resize(input_size)))
        height = width = input_size
    layers += _mlp_layers(channels * height * width, [20] * 5, num_classes, activation)
    return nn.Sequential(OrderedDict(layers))


# ---------------------------------------------------------------------------------------------
# cnn5_k


class ConvBlock(nn.Sequential):
    """3x3 conv (stride 1, padding 1) [-> BatchNorm] -> ReLU; conv bias only without BN."""

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
        ]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        super().__init__(*layers)


def _build_cnn5_k(num_classes: int, shape, *, k, batch_norm, pooling) -> nn.Module:
    widths = [k, 2 * k, 4 * k, 8 * k]
    layers: list[tuple[str, nn.Module]] = []
    previous = shape[0]
    # seed (Gamba et al.): avg-pool after convs 2 and 3; Nakkiran et al.: max-pool after 2, 3, 4
    pool_after = {2, 3} if pooling == "avg" else {2, 3, 4}
    for i, width in enumerate(widths, start=1):
        layers.append((f"layer{i}", ConvBlock(previous, width, batch_norm)))
        if i in pool_after:
            pool = (
                nn.AvgPool2d(2, ceil_mode=True)
                if pooling == "avg"
                else nn.MaxPool2d(2, ceil_mode=True)
            )
            layers.append((f"pool{i}", pool))
        previous = width
    global_pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
    layers += [
        ("global_pool", global_pool),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(widths[-1], num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


# ---------------------------------------------------------------------------------------------
# ResNets


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3 [-> BN] -> ReLU -> conv3x3 [-> BN] (+ shortcut) -> ReLU.

    ``shortcut`` is ``"conv"`` (bias-free 1x1 conv projection when the shape changes, as in the
    resnet18_k seed) or ``"pad"`` (He et al.'s parameter-free option A).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, batch_norm: bool, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(planes) if batch_norm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(planes) if batch_norm else nn.Identity()
        self.relu2 = nn.ReLU()
        self.stride = stride
        self.pad_channels = 0
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "conv":
                self.downsample = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            else:
                self.pad_channels = planes - in_planes

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride != 1 or self.pad_channels:
            x = x[:, :, :: self.stride, :: self.stride]
            before = self.pad_channels // 2
            return F.pad(x, (0, 0, 0, 0, before, self.pad_channels - before))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self._shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem, BasicBlock stages, global average pool, linear."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        batch_norm: bool,
        shortcut: str,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(widths[0]) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        previous = widths[0]
        for stage, (width, n_blocks) in enumerate(zip(widths, blocks, strict=True), start=1):
            stride = 1 if stage == 1 else 2
            layer = []
            for b in range(n_blocks):
                layer.append(
                    BasicBlock(previous, width, stride if b == 0 else 1, batch_norm, shortcut)
                )
                previous = width
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _fixup_init(model: ResNet) -> None:
    """Fixup [Zhang et al. 2019] as in the resnet18_k seed: scaled He init of each block's
    first conv, zero second conv and classifier."""
    num_blocks = sum(1 for m in model.modules() if isinstance(m, BasicBlock))
    for module in model.modules():
        if isinstance(module, BasicBlock):
            w = module.conv1.weight
            std = math.sqrt(2.0 / (w.shape[0] * math.prod(w.shape[2:]))) * num_blocks**-0.5
            nn.init.normal_(w, mean=0.0, std=std)
            nn.init.zeros_(module.conv2.weight)
            for conv in (module.conv1, module.conv2):
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
    nn.init.zeros_(model.fc.weight)
    nn.init.zeros_(model.fc.bias)


def _build_resnet18_k(num_classes: int, shape, *, k, batch_norm, weight_init) -> nn.Module:
    model = ResNet(
        shape[0], num_classes, [k, 2 * k, 4 * k, 8 * k], [2, 2, 2, 2], batch_norm, "conv"
    )
    if weight_init == "fixup":
        _fixup_init(model)
    return model


def _build_resnet20(num_classes: int, shape, *, batch_norm) -> nn.Module:
    model = ResNet(shape[0], num_classes, [16, 32, 64], [3, 3, 3], batch_norm, "pad")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
    return model


# ---------------------------------------------------------------------------------------------
# VGG11


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _build_vgg11(num_classes: int, shape, *, batch_norm, dropout) -> nn.Module:
    features: list[nn.Module] = []
    previous = shape[0]
    for v in _VGG11:
        if v == "M":
            features.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            continue
        features.append(nn.Conv2d(previous, v, 3, padding=1))
        if batch_norm:
            features.append(nn.BatchNorm2d(v))
        features.append(nn.ReLU())
        previous = v
    classifier: list[nn.Module] = []
    if batch_norm:
        classifier.append(nn.BatchNorm1d(previous))
    classifier += [nn.Dropout(dropout), nn.Linear(previous, previous // 2), nn.ReLU()]
    if batch_norm:
        classifier.append(nn.BatchNorm1d(previous // 2))
    classifier += [nn.Dropout(dropout), nn.Linear(previous // 2, num_classes)]
    model = nn.Sequential(
        OrderedDict(
            [
                ("features", nn.Sequential(*features)),
                ("avgpool", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("classifier", nn.Sequential(*classifier)),
            ]
        )
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model


# ---------------------------------------------------------------------------------------------
# DeepOBS


def _valid_or_same(size: int, kernel: int) -> str:
    return "valid" if size >= 2 * kernel else "same"


def _conv_out(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "same":
        return _same_size(size, stride)
    return (size - kernel) // stride + 1


def _build_3c3d(num_classes: int, shape) -> nn.Module:
    channels, height, width = shape
    layers: list[tuple[str, nn.Module]] = []
    previous = channels
    for i, (out, kernel, padding) in enumerate(
        [(64, 5, "valid"), (96, 3, "valid"), (128, 3, "same")], start=1
    ):
        if padding == "valid":
            padding = _valid_or_same(min(height, width), kernel)
        layers += [
            (f"conv{i}", TFConv2d(previous, out, kernel, tf_padding=padding)),
            (f"relu{i}", nn.ReLU()),
            (f"maxpool{i}", TFMaxPool2d(3, 2)),
        ]
        height = _same_size(_conv_out(height, kernel, 1, padding), 2)
        width = _same_size(_conv_out(width, kernel, 1, padding), 2)
        previous = out
    if (height, width) != (3, 3):
        layers.append(("pool_to_3x3", nn.AdaptiveAvgPool2d(3)))
    layers += [
        ("flatten", nn.Flatten()),
        ("dense1", nn.Linear(3 * 3 * 128, 512)),
        ("relu4", nn.ReLU()),
        ("dense2", nn.Linear(512, 256)),
        ("relu5", nn.ReLU()),
        ("dense3", nn.Linear(256, num_classes)),
    ]
    model = nn.Sequential(OrderedDict(layers))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _build_allcnnc(num_classes: int, shape, *, dropout) -> nn.Module:
    channels, height, width = shape
    # (out channels, kernel, stride, padding, dropout before)
    plan = [
        (96, 3, 1, "same", 0.2),
        (96, 3, 1, "same", 0.0),
        (96, 3, 2, "same", 0.0),
        (192, 3, 1, "same", 0.5),
        (192, 3, 1, "same", 0.0),
        (192, 3, 2, "same", 0.0),
        (192, 3, 1, "valid", 0.5),
        (192, 1, 1, "same", 0.0),
        (num_classes, 1, 1, "same", 0.0),
    ]
    layers: list[tuple[str, nn.Module]] = []
    previous, n_dropout = channels, 0
    for i, (out, kernel, stride, padding, p_drop) in enumerate(plan, start=1):
        if p_drop and dropout:
            n_dropout += 1
            layers.append((f"dropout{n_dropout}", nn.Dropout(p_drop)))
        if padding == "valid":
            padding = _valid_or_same(min(height, width), kernel)
        layers += [
            (f"conv{i}", TFConv2d(previous, out, kernel, stride=stride, tf_padding=padding)),
            (f"relu{i}", nn.ReLU()),
        ]
        height = _conv_out(height, kernel, stride, padding)
        width = _conv_out(width, kernel, stride, padding)
        previous = out
    layers.append(("mean", SpatialMean()))
    model = nn.Sequential(OrderedDict(layers))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            nn.init.constant_(m.bias, 0.1)
    return model


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _build_mlp,
    "mnist_mini": _build_mnist_mini,
    "cnn5_k": _build_cnn5_k,
    "resnet18_k": _build_resnet18_k,
    "resnet20": _build_resnet20,
    "vgg11": _build_vgg11,
    "3c3d": _build_3c3d,
    "allcnnc": _build_allcnnc,
}
