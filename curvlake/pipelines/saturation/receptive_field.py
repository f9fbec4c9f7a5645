"""Analytic receptive fields over a model's module graph (torch.fx), with skip connections.

For a chain of windowed operations (convolutions, pooling) the receptive field of a unit obeys
the classic recurrence, per spatial axis, starting from one input pixel
(:math:`r_0 = 1, j_0 = 1, s_0 = 1/2`, pixel ``i`` centred at ``i + 1/2``):

.. math::

    k' = d (k - 1) + 1, \\quad r = r_{prev} + (k' - 1) j_{prev}, \\quad
    j = j_{prev} \\cdot \\mathrm{stride}, \\quad
    s = s_{prev} + \\left(\\tfrac{k' - 1}{2} - p\\right) j_{prev},

with kernel ``k``, dilation ``d`` and padding ``p``; ``r`` is the receptive field size, ``j``
the *jump* (distance in input pixels between neighbouring units) and ``s`` the centre of the
first unit's field. Max and average pooling follow the same recurrence (phd-lab's version
turns every layer after an ``AvgPool2d`` into NaN; here it is an ordinary window).

A network with several paths (residual blocks) has one receptive field per path. Following
Richter et al. (2022), every tensor carries the minimum ``r_min`` and the maximum ``r_max``
over the paths that reach it: an elementwise merge (``a + b``, ``torch.cat`` over channels)
takes the minimum of ``r_min`` and the extent of the union of the inputs' widest windows
(equal to the maximum of ``r_max`` when the paths are centred alike, as in ResNets). A global
operation (global pooling, flatten before a Linear, a mean over the positions) makes every
unit depend on the whole input: its ``r_min = r_max = jump = inf``.

The *border layer* is the first layer whose minimum receptive field covers the input on every
axis (``r_min >= input size``): layers after it cannot integrate more context and tend to be
unproductive (low saturation "tail", flat probe accuracy) [Richter et al. 2021, 2022].

References:
    Araujo, A., Norris, W., & Sim, J. (2019). Computing receptive fields of convolutional
    neural networks. Distill.
    Richter, M. L., Byttner, W., Krumnack, U., Wiedenroth, A., Schallner, L., & Shenk, J.
    (2021). (Input) size matters for CNN classifiers. ICANN 2021 (arXiv 2102.01582).
    Richter, M. L., Schöning, J., Wiedenroth, A., & Krumnack, U. (2021). Should you go deeper?
    Optimizing convolutional neural network architectures without training by receptive field
    analysis. ICMLA 2021 (arXiv 2106.12307).
    Richter, M. L., Schöning, J., Wiedenroth, A., & Krumnack, U. (2022). Receptive field
    refinement for convolutional neural networks reliably improves predictive performance.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from curvlake.errors import UserInputError
from curvlake.nn.hooks import FEATURE_TYPES, feature_layers
from curvlake.nn.models import TFMaxPool2d, _tf_same_pad

INF = math.inf


class UnsupportedLayerError(UserInputError):
    """The receptive-field analysis met an operation it has no rule for."""


@dataclass(frozen=True)
class LayerReceptiveField:
    """Receptive field of the output units of one layer, per spatial axis.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        r_min: smallest receptive field size over the paths from the input.
        r_max: largest receptive field size (extent of the union of the widest windows).
        jump: input pixels between neighbouring output units (cumulative stride).
        start: centre of the first output unit's field, in input pixels (pixel ``i`` is
            centred at ``i + 0.5``; may be negative with padding).
        map_size: spatial size of the layer's output (``()`` once flattened).

    Global layers have ``r_min = r_max = jump = inf`` on every axis.
    """

    name: str
    r_min: tuple[float, ...]
    r_max: tuple[float, ...]
    jump: tuple[float, ...]
    start: tuple[float, ...]
    map_size: tuple[int, ...]

    def covers(self, input_size: Sequence[int], by: Literal["min", "max"] = "min") -> bool:
        """Whether ``r_min`` (or ``r_max``) reaches ``input_size`` on every axis."""
        sizes = self.r_min if by == "min" else self.r_max
        return all(r >= s for r, s in zip(sizes, input_size, strict=True))


@dataclass(frozen=True)
class ReceptiveFieldTable:
    """Receptive fields of a model's layers, in module order.

    Attributes:
        input_size: spatial size of the input, e.g. ``(32, 32)``.
        layers: one entry per analysed layer, in ``named_modules()`` order.
    """

    input_size: tuple[int, ...]
    layers: tuple[LayerReceptiveField, ...]

    def __getitem__(self, name: str) -> LayerReceptiveField:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        """Layer names in module order."""
        return [layer.name for layer in self.layers]

    def border_layer(self, by: Literal["min", "max"] = "min") -> str | None:
        """First layer whose ``r_min`` (``by="max"``: ``r_max``) covers the input; else None."""
        if by not in ("min", "max"):
            raise UserInputError(f"by={by!r}; allowed: 'min', 'max'")
        for layer in self.layers:
            if layer.covers(self.input_size, by):
                return layer.name
        return None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Columns as arrays: ``name`` (L,), ``r_min`` / ``r_max`` / ``jump`` / ``start`` (L, A)."""
        axes = len(self.input_size)

        def column(attr: str) -> np.ndarray:
            values = [getattr(layer, attr) for layer in self.layers]
            return np.asarray(values, dtype=np.float64).reshape(len(values), axes)

        return {
            "name": np.asarray(self.names, dtype=str),
            "r_min": column("r_min"),
            "r_max": column("r_max"),
            "jump": column("jump"),
            "start": column("start"),
        }


# ---------------------------------------------------------------------------------------------
# the state carried by every tensor of the graph


@dataclass(frozen=True)
class _Field:
    r_min: tuple[float, ...]
    r_max: tuple[float, ...]
    jump: tuple[float, ...]
    start: tuple[float, ...]

    @classmethod
    def pixel(cls, axes: int) -> _Field:
        return cls((1.0,) * axes, (1.0,) * axes, (1.0,) * axes, (0.5,) * axes)

    def window(
        self, kernel: Sequence[int], stride: Sequence[int], pad: Sequence[float], dilation=None
    ) -> _Field:
        dilation = dilation or (1,) * len(kernel)
        per_axis = [
            self._window_axis(a, k, s, p, d)
            for a, (k, s, p, d) in enumerate(zip(kernel, stride, pad, dilation, strict=True))
        ]
        return _Field(*(tuple(column) for column in zip(*per_axis, strict=True)))

    def _window_axis(self, a: int, k: int, s: int, p: float, d: int) -> tuple[float, ...]:
        j = self.jump[a]
        if math.isinf(j):  # a global axis stays global
            return INF, INF, INF, self.start[a]
        grow = d * (k - 1) * j
        start = self.start[a] + (d * (k - 1) / 2 - p) * j
        return self.r_min[a] + grow, self.r_max[a] + grow, j * s, start

    def make_global(self, axes: Sequence[int], input_size: Sequence[int]) -> _Field:
        r_min, r_max, jump, start = (
            list(v) for v in (self.r_min, self.r_max, self.jump, self.start)
        )
        for a in axes:
            r_min[a] = r_max[a] = jump[a] = INF
            start[a] = input_size[a] / 2
        return _Field(tuple(r_min), tuple(r_max), tuple(jump), tuple(start))


def _merge(fields: Sequence[_Field], where: str) -> _Field:
    """Receptive field of a unit that combines same-position units of several tensors."""
    if len(fields) == 1:
        return fields[0]
    per_axis = [_merge_axis(fields, a, where) for a in range(len(fields[0].jump))]
    return _Field(*(tuple(column) for column in zip(*per_axis, strict=True)))


def _merge_axis(fields: Sequence[_Field], a: int, where: str) -> tuple[float, ...]:
    r_min = min(f.r_min[a] for f in fields)
    local = [f for f in fields if not math.isinf(f.jump[a])]
    if not local:
        return r_min, INF, INF, fields[0].start[a]
    jumps = {f.jump[a] for f in local}
    if len(jumps) > 1:
        raise UnsupportedLayerError(
            f"{where}: merges feature maps with different jumps {sorted(jumps)} on spatial "
            f"axis {a}; their units are not aligned"
        )
    jump = local[0].jump[a]
    finite = [f for f in local if not math.isinf(f.r_max[a])]
    if not finite:
        return r_min, INF, jump, local[0].start[a]
    low = min(f.start[a] - f.r_max[a] / 2 for f in finite)
    high = max(f.start[a] + f.r_max[a] / 2 for f in finite)
    # a path that already sees the whole axis makes the union unbounded
    r_max = high - low if len(finite) == len(fields) else INF
    return r_min, r_max, jump, (low + high) / 2


# ---------------------------------------------------------------------------------------------
# operation rules

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Threshold,
)

_ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.neg,
        operator.iadd,
        operator.imul,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.clamp,
        F.relu,
        F.relu6,
        F.leaky_relu,
        F.elu,
        F.selu,
        F.gelu,
        F.silu,
        F.mish,
        F.hardswish,
        F.hardtanh,
        F.sigmoid,
        F.tanh,
        F.softplus,
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
    }
)

_ELEMENTWISE_METHODS = frozenset(
    {
        "add",
        "add_",
        "sub",
        "sub_",
        "mul",
        "mul_",
        "div",
        "div_",
        "relu",
        "relu_",
        "sigmoid",
        "sigmoid_",
        "tanh",
        "tanh_",
        "clamp",
        "clamp_",
        "contiguous",
        "clone",
        "detach",
        "float",
        "double",
        "half",
        "to",
        "type_as",
    }
)

_RESHAPE_METHODS = frozenset({"view", "reshape", "flatten"})
_REDUCE_METHODS = frozenset({"mean", "sum", "amax", "amin"})
_SHAPE_QUERIES = frozenset({"size", "dim", "numel"})

_MAX_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
_AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
_ADAPTIVE_FUNCTIONS = (
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
)
_ADAPTIVE_MODULES = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_LEAF_TYPES: tuple[type[nn.Module], ...] = (
    *FEATURE_TYPES,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    TFMaxPool2d,
)


def _ntuple(value: Any, n: int) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise UnsupportedLayerError(f"expected {n} values per axis, got {value!r}")
        return tuple(value)
    return (value,) * n


class _Tracer(fx.Tracer):
    """Keeps convolutions, pooling and feature layers (zoo subclasses included) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)


class _Analysis:
    def __init__(self, gm: fx.GraphModule, input_size: tuple[int, ...]):
        self.gm = gm
        self.input_size = input_size
        self.axes = len(input_size)
        self.fields: dict[fx.Node, _Field | None] = {}
        self._placeholder_seen = False

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _shape(node: Any) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.gm.get_submodule(node.target)).__name__})"
        target = getattr(node.target, "__name__", node.target)
        return f"{node.op} {target!r} (graph node {node.name!r})"

    def _unsupported(self, node: fx.Node, why: str = "") -> UnsupportedLayerError:
        detail = f": {why}" if why else ""
        return UnsupportedLayerError(
            f"receptive field analysis cannot handle {self._where(node)}{detail}; supported: "
            "Conv1d/2d/3d, max/average pooling (also adaptive with a divisible size), "
            "elementwise layers and ops (norms, activations, dropout, +, *, torch.cat over "
            "channels), F.pad, strided slicing, flatten/view to (N, features), spatial means, "
            "and Linear layers on flat inputs"
        )

    @staticmethod
    def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    def _spatial_input(self, node: fx.Node) -> tuple[fx.Node, _Field, tuple[int, ...]]:
        source = node.args[0]
        field = self.fields.get(source)
        shape = self._shape(source)
        if field is None or shape is None or len(shape) != 2 + self.axes:
            raise self._unsupported(
                node, f"expected a feature map of rank {2 + self.axes}, got shape {shape}"
            )
        return source, field, shape

    def _window(self, node, kernel, stride, padding, dilation=1) -> _Field:
        field = self._spatial_input(node)[1]
        n = self.axes
        kernel = _ntuple(kernel, n)
        stride = kernel if stride is None or stride == [] else _ntuple(stride, n)
        dilation = _ntuple(dilation, n)
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * n
            elif padding == "same":
                padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
            else:
                raise self._unsupported(node, f"padding={padding!r}")
        padding = _ntuple(padding, n)
        return field.window(kernel, stride, padding, dilation)

    def _adaptive(self, node: fx.Node, output_size: Any) -> _Field:
        _, field, shape = self._spatial_input(node)
        global_axes, kernel = [], []
        for a, (size, out) in enumerate(
            zip(shape[2:], _ntuple(output_size, self.axes), strict=True)
        ):
            out = size if out is None else out
            if out == size:
                kernel.append(1)
            elif out == 1:
                global_axes.append(a)
                kernel.append(1)
            elif size % out == 0:
                kernel.append(size // out)
            else:
                raise self._unsupported(
                    node, f"adaptive pooling from {size} to {out} has windows of unequal size"
                )
        pooled = field.window(kernel, kernel, (0,) * self.axes)
        return pooled.make_global(global_axes, self.input_size)

    def _global(self, field: _Field) -> _Field:
        return field.make_global(range(self.axes), self.input_size)

    def _reshape(self, node: fx.Node, field: _Field) -> _Field:
        before, after = self._shape(node.args[0]), self._shape(node)
        if before == after or all(math.isinf(j) for j in field.jump):
            return field
        if after is not None and len(after) == 2:
            return self._global(field)
        raise self._unsupported(node, f"reshape from {before} to {after}")

    def _reduce(self, node: fx.Node, field: _Field) -> _Field:
        rank = len(self._shape(node.args[0]) or ())
        dim = self._arg(node, 1, "dim")
        if dim is None:
            return self._global(field)
        dims = {d % rank for d in ((dim,) if isinstance(dim, int) else dim)}
        spatial = set(range(2, rank))
        if spatial and spatial <= dims:
            return self._global(field)
        if not dims & spatial:
            return field
        raise self._unsupported(node, "a reduction over some but not all spatial axes")

    def _cat(self, node: fx.Node, fields: list[_Field]) -> _Field:
        rank = len(self._shape(node) or ())
        dim = self._arg(node, 1, "dim", 0) % max(rank, 1)
        if dim >= 2:
            raise self._unsupported(node, "concatenation along a spatial axis")
        return _merge(fields, self._where(node))

    def _pad(self, node: fx.Node) -> _Field:
        _, field, shape = self._spatial_input(node)
        pad = list(self._arg(node, 1, "pad"))
        rank = len(shape)
        start = list(field.start)
        for a in range(self.axes):
            pair = rank - 1 - (2 + a)  # F.pad lists (before, after) from the last axis backwards
            if 2 * pair < len(pad) and not math.isinf(field.jump[a]):
                start[a] -= pad[2 * pair] * field.jump[a]
        return _Field(field.r_min, field.r_max, field.jump, tuple(start))

    def _slice(self, node: fx.Node) -> _Field:
        if len(self._shape(node.args[0]) or ()) == 2:  # columns of flat features
            return self.fields[node.args[0]]
        _, field, shape = self._spatial_input(node)
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
        index = index + (slice(None),) * (len(shape) - len(index))
        if len(index) != len(shape) or not all(isinstance(i, slice) for i in index):
            raise self._unsupported(node, f"indexing with {node.args[1]!r}")
        start, jump = list(field.start), list(field.jump)
        for a in range(self.axes):
            item = index[2 + a]
            if any(isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)):
                raise self._unsupported(node, "a slice with traced bounds")
            first = item.start or 0
            first = first + shape[2 + a] if first < 0 else first
            step = item.step or 1
            if not math.isinf(jump[a]):
                start[a] += first * jump[a]
                jump[a] *= step
        return _Field(field.r_min, field.r_max, tuple(jump), tuple(start))

    # -- dispatch ------------------------------------------------------------------------------

    def run(self) -> dict[fx.Node, _Field | None]:
        for node in self.gm.graph.nodes:
            self.fields[node] = self._visit(node)
        return self.fields

    def _visit(self, node: fx.Node) -> _Field | None:
        if node.op == "placeholder":
            first = not self._placeholder_seen
            self._placeholder_seen = True
            return _Field.pixel(self.axes) if first else None
        if node.op in ("get_attr", "output"):
            return None
        inputs = [self.fields[n] for n in node.all_input_nodes if self.fields.get(n) is not None]
        if not inputs:
            return None
        if self._shape(node) is None:
            if self._is_shape_query(node):
                return None
            raise self._unsupported(node, "it does not return a single tensor")
        if node.op == "call_module":
            return self._module(node, self.gm.get_submodule(node.target), inputs)
        if node.op == "call_function":
            return self._function(node, inputs)
        return self._method(node, inputs)

    @staticmethod
    def _is_shape_query(node: fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in _SHAPE_QUERIES
        return node.op == "call_function" and node.target in (getattr, len)

    def _module(self, node: fx.Node, m: nn.Module, inputs: list[_Field]) -> _Field:
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            padding = m.padding
            if getattr(m, "tf_padding", None) == "same":  # the zoo's TensorFlow "same" convs
                size = self._shape(node.args[0])[2:]
                padding = tuple(
                    _tf_same_pad(s, k, st)[0]
                    for s, k, st in zip(size, m.kernel_size, m.stride, strict=True)
                )
            return self._window(node, m.kernel_size, m.stride, padding, m.dilation)
        if isinstance(m, nn.modules.pooling._MaxPoolNd):
            return self._window(node, m.kernel_size, m.stride, m.padding, m.dilation)
        if isinstance(m, nn.modules.pooling._AvgPoolNd):
            return self._window(node, m.kernel_size, m.stride, m.padding)
        if isinstance(m, TFMaxPool2d):
            size = self._shape(node.args[0])[2:]
            padding = tuple(_tf_same_pad(s, m.kernel_size, m.stride)[0] for s in size)
            return self._window(node, m.kernel_size, m.stride, padding)
        if isinstance(m, _ADAPTIVE_MODULES):
            return self._adaptive(node, m.output_size)
        if isinstance(m, nn.Flatten):
            return self._reshape(node, inputs[0])
        if isinstance(m, nn.Linear):
            if len(self._shape(node.args[0]) or ()) == 2:
                return self._global(inputs[0])
            raise self._unsupported(node, "a Linear layer applied to a feature map")
        if isinstance(m, _ELEMENTWISE_MODULES):
            return _merge(inputs, self._where(node))
        raise self._unsupported(node)

    def _function(self, node: fx.Node, inputs: list[_Field]) -> _Field:
        target: Callable = node.target  # type: ignore[assignment]
        if target in _ELEMENTWISE_FUNCTIONS:
            return _merge(inputs, self._where(node))
        if target in (torch.cat, torch.concat):
            return self._cat(node, inputs)
        if target is torch.flatten:
            return self._reshape(node, inputs[0])
        if target is operator.getitem:
            return self._slice(node)
        if target is F.pad:
            return self._pad(node)
        if target in _MAX_POOL_FUNCTIONS:
            return self._window(
                node,
                self._arg(node, 1, "kernel_size"),
                self._arg(node, 2, "stride"),
                self._arg(node, 3, "padding", 0),
                self._arg(node, 4, "dilation", 1),
            )
        if target in _AVG_POOL_FUNCTIONS:
            return self._window(
                node,
                self._arg(node, 1, "kernel_size"),
                self._arg(node, 2, "stride"),
                self._arg(node, 3, "padding", 0),
            )
        if target in _ADAPTIVE_FUNCTIONS:
            return self._adaptive(node, self._arg(node, 1, "output_size"))
        if target in (torch.mean, torch.sum, torch.amax, torch.amin):
            return self._reduce(node, inputs[0])
        raise self._unsupported(node)

    def _method(self, node: fx.Node, inputs: list[_Field]) -> _Field:
        if node.target in _ELEMENTWISE_METHODS:
            return _merge(inputs, self._where(node))
        if node.target in _RESHAPE_METHODS:
            return self._reshape(node, inputs[0])
        if node.target in _REDUCE_METHODS:
            return self._reduce(node, inputs[0])
        raise self._unsupported(node)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises several types for untraceable Python
        raise UnsupportedLayerError(
            f"cannot trace {type(model).__name__} with torch.fx for receptive field analysis: "
            f"{error}"
        ) from error
    return fx.GraphModule(tracer.root, graph)


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, input_shape: tuple[int, ...]):
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    model.eval()  # one example through BatchNorm in eval mode: no statistics change
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros((1, *input_shape), dtype=dtype, device=device))
    finally:
        for m, mode in modes.items():
            m.training = mode


def receptive_fields(
    model: nn.Module, input_shape: Sequence[int], layers: Sequence[str] | None = None
) -> ReceptiveFieldTable:
    """Minimum / maximum receptive field, jump and start of each layer of ``model``.

    The model is traced with torch.fx (convolutions, pooling and feature layers are kept as
    leaves) and one zero example of shape ``input_shape`` is run through it in eval mode to
    learn the feature-map sizes (modules' training flags are restored afterwards).

    Args:
        model: the network; its forward must be traceable by torch.fx.
        input_shape: one example's shape ``(C, *spatial)``, e.g. ``(3, 32, 32)``.
        layers: module names to report; default: the feature layers
            (:func:`curvlake.nn.hooks.feature_layers`: Conv / Linear / recurrent), i.e. the
            layers whose saturation is tracked. A module called several times is reported once,
            with the minimum and maximum over its calls.

    Returns:
        The table, in ``named_modules()`` order; modules that the forward never calls are left
        out.

    Raises:
        UserInputError: a bad ``input_shape`` or an unknown layer name.
        UnsupportedLayerError: an operation without a receptive-field rule (transposed
            convolutions, interpolation, recurrent layers, ...) or an untraceable forward.

    Example:
        >>> stack = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(4)])
        >>> receptive_fields(stack, (1, 16, 16))["3"].r_min
        (9.0, 9.0)
    """
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
    if not shape or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
        raise UserInputError(
            f"input_shape must be (channels, *spatial) ints >= 1, got {input_shape!r}"
        )
    shape = tuple(int(s) for s in shape)
    known = dict(model.named_modules())
    if layers is None:
        names = [name for name, _ in feature_layers(model)]
    else:
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise UserInputError(f"unknown layer name(s) {unknown}; not in model.named_modules()")
        order = {name: i for i, name in enumerate(known)}
        names = sorted(dict.fromkeys(layers), key=order.__getitem__)
    gm = _trace(model)
    _propagate_shapes(gm, model, shape)
    fields = _Analysis(gm, shape[1:]).run()
    rows = []
    for name in names:
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
        found = [fields[n] for n in calls if fields[n] is not None]
        if not found:
            continue
        field = _merge(found, f"module {name!r}")
        out_shape = _Analysis._shape(calls[0]) or ()
        map_size = tuple(out_shape[2:]) if len(out_shape) == len(shape) + 1 else ()
        rows.append(
            LayerReceptiveField(name, field.r_min, field.r_max, field.jump, field.start, map_size)
        )
    return ReceptiveFieldTable(shape[1:], tuple(rows))
