"""2-D convolutions whose backward computes only the input gradient, for vmapped VJPs.

The exact Jacobian runs one backward pass per output cotangent under ``torch.func.vmap``. For
``conv2d``, vmap's batching rule of ``convolution_backward`` materializes an expanded dummy of
the layer input, K x batch activations, and copies it into the layout oneDNN wants — although
the input gradient does not depend on the input at all. With constant weights (the Jacobian
is taken with respect to ``x`` only) the input gradient is the transposed convolution of the
output gradient,

    dL/dx = conv_transpose2d(dL/dy, W; stride, padding, output_padding, groups, dilation),

with ``output_padding`` chosen so that the result has the input's spatial size. Routing
``conv2d`` calls through :class:`_Conv2dInputGrad` inside :func:`input_gradient_convolutions`
gives the same numbers (bit-identical in float64 on resnet18_k against
``torch.autograd.functional.jacobian``, ``tests/jacobian_stats``) and removes those copies:
1.16x (1 thread) and 1.25x (2 threads) end to end on resnet18_k (k=16), CIFAR-shaped
(benchmarks/RESULTS.md).

Only calls the backward of which is fully described by the input gradient are rerouted:
positional arguments, numeric padding, and a weight and bias that do not require gradients.
Anything else (string padding, trainable weights, keyword calls) runs the stock ``conv2d``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as torch_f
from torch.overrides import TorchFunctionMode


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


class _Conv2dInputGrad(torch.autograd.Function):
    """``conv2d`` with constant weights; the backward is one transposed convolution."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return torch_f.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape[-2:]), tuple(output.shape[-2:]))
        ctx.options = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        (size_in, size_out), (stride, padding, dilation, groups) = ctx.geometry, ctx.options
        kernel = weight.shape[-2:]
        output_padding = tuple(
            n_in - ((n_out - 1) * s - 2 * p + d * (k - 1) + 1)
            for n_in, n_out, s, p, d, k in zip(
                size_in, size_out, stride, padding, dilation, kernel, strict=True
            )
        )
        grad_input = torch_f.conv_transpose2d(
            grad_output, weight, None, stride, padding, output_padding, groups, dilation
        )
        return grad_input, None, None, None, None, None, None


class _InputGradientConvolutions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch_f.conv2d and not kwargs and len(args) >= 2:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else None
            given = args[3:]
            stride, padding, dilation, groups = (*given, *(1, 0, 1, 1)[len(given) :])
            constant = not weight.requires_grad and (bias is None or not bias.requires_grad)
            if constant and x.ndim == 4 and not isinstance(padding, str):
                return _Conv2dInputGrad.apply(
                    x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups
                )
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def input_gradient_convolutions() -> Iterator[None]:
    """Within the block, ``conv2d`` with constant weights records a transposed-conv backward."""
    with _InputGradientConvolutions():
        yield
