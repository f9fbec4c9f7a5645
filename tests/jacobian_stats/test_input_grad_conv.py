"""The input-gradient-only conv2d used by the exact Jacobian equals autograd on conv models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlake.nn.models import build_model
from curvlake.pipelines.jacobian_stats import _input_grad_conv
from curvlake.pipelines.jacobian_stats._input_grad_conv import input_gradient_convolutions
from curvlake.pipelines.jacobian_stats.metrics import input_jacobian

CONVS = {
    "plain": dict(kernel_size=3),
    "padded": dict(kernel_size=3, padding=1),
    "stride 2, odd output padding": dict(kernel_size=3, stride=2, padding=1),
    "stride 3, no bias": dict(kernel_size=2, stride=3, bias=False),
    "dilated, rectangular": dict(kernel_size=(3, 2), dilation=(2, 1), padding=(2, 0)),
    "grouped": dict(kernel_size=3, groups=2, padding=1),
    "reflect padding": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "same (stock path)": dict(kernel_size=3, padding="same"),
}


def _oracle(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    rows = [
        torch.autograd.functional.jacobian(lambda z: model(z[None])[0], xi).reshape(3, -1)
        for xi in x
    ]
    return torch.stack(rows)


@pytest.fixture
def backward_calls(monkeypatch):
    calls = []
    original = _input_grad_conv._Conv2dInputGrad.backward

    def counting(ctx, grad_output):
        calls.append(grad_output.shape)
        return original(ctx, grad_output)

    monkeypatch.setattr(_input_grad_conv._Conv2dInputGrad, "backward", staticmethod(counting))
    return calls


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_jacobians_match_autograd(name, channels_last, backward_calls):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **CONVS[name]).double()
    with torch.no_grad():
        out_shape = conv(torch.zeros(1, 4, 9, 8, dtype=torch.float64)).shape
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out_shape.numel(), 3))
    model = model.double().eval()
    x = torch.randn(5, 4, 9, 8, dtype=torch.float64)
    jac = input_jacobian(model, x, channels_last=channels_last)
    torch.testing.assert_close(jac, _oracle(model, x), rtol=1e-12, atol=1e-12)
    rerouted = name != "same (stock path)"
    assert bool(backward_calls) == rerouted


def test_resnet_jacobian_matches_autograd(backward_calls):
    torch.manual_seed(1)
    model = build_model("resnet18_k", k=2, num_classes=3, input_shape=(3, 12, 12))
    model = model.double().eval()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(input_jacobian(model, x), _oracle(model, x), rtol=0, atol=1e-12)
    assert len(backward_calls) == sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_trainable_weights_keep_the_stock_backward(backward_calls):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    with input_gradient_convolutions():
        out = F.conv2d(x, w, None, 1, 1)
    out.square().sum().backward()
    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.conv2d(x_ref, w_ref, None, 1, 1).square().sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert backward_calls == []
