"""Tiny float64 classifiers shared by the NPEFF tests, and a dense autograd oracle."""

from __future__ import annotations

import torch
from torch import nn

DTYPE = torch.float64


class TiedMLP(nn.Module):
    """Applies the same hidden Linear twice: the layerwise back-end must fall back to torch.func."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.hidden = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden(h))
        return self.out(h)


class ReshapedLinear(nn.Module):
    """Folds the positions into the batch axis before a Linear, so rows are not examples."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = torch.tanh(self.inner(x.reshape(-1, 3)))
        return self.out(h.reshape(n, 8))


def _make(name: str) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    if name == "logreg":
        model, shape = nn.Linear(4, 3), (4,)
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
        shape = (5,)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 2, bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 4),
        )
        shape = (2, 6, 6)
    elif name == "cnn_same":  # string padding, even kernel (asymmetric), dilation
        model = nn.Sequential(
            nn.Conv2d(2, 3, 2, padding="same"),
            nn.Tanh(),
            nn.Conv2d(3, 2, 3, padding="same", dilation=2),
            nn.Tanh(),
            nn.Conv2d(2, 2, 3, padding="valid", stride=2),
            nn.Flatten(),
            nn.Linear(2 * 2 * 2, 3),
        )
        shape = (2, 5, 5)
    elif name == "conv1d":
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2, dilation=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 4, 3),
        )
        shape = (2, 8)
    elif name == "seq_linear":  # Linear applied at several positions per example
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2, 3))
        shape = (2, 3)
    elif name == "layernorm":
        model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
        shape = (4,)
    elif name == "batchnorm":  # eval mode: running statistics, set to non-trivial values
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 4),
            nn.BatchNorm1d(4),
            nn.Tanh(),
            nn.Linear(4, 3),
        )
        for m in model:
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
        shape = (2, 4, 4)
    elif name == "groupnorm":  # GroupNorm parameters: torch.func back-end only
        model = nn.Sequential(
            nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 3)
        )
        shape = (2, 8)
    elif name in ("embedding", "tokens"):  # integer inputs stay integer
        if name == "embedding":
            model = nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Flatten(), nn.Linear(6, 3))
        else:  # embedding + position-wise Linear + LayerNorm, like a tiny transformer block
            model = nn.Sequential(
                nn.Embedding(7, 4),
                nn.Linear(4, 4),
                nn.LayerNorm(4),
                nn.Tanh(),
                nn.Flatten(),
                nn.Linear(2 * 4, 3),
            )
        x = torch.randint(0, 6, (7, 2), generator=g)
        x[0, 0] = 0  # padding index present
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
        return model.to(DTYPE), x
    elif name == "reshaped":  # a Linear on (n·T, d) rows: layerwise must fall back
        model, shape = ReshapedLinear(), (2, 3)
    elif name == "tied":
        model, shape = TiedMLP(), (4,)
    else:
        raise KeyError(name)
    # Larger weights than the default init give non-trivial, well-spread probabilities.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    x = torch.randn(7, *shape, generator=g)
    return model.to(DTYPE), x.to(DTYPE)


LAYERWISE_CASES = (
    "logreg",
    "mlp",
    "cnn",
    "cnn_same",
    "conv1d",
    "seq_linear",
    "layernorm",
    "batchnorm",
    "embedding",
    "tokens",
)
CASES = (*LAYERWISE_CASES, "groupnorm", "tied", "reshaped")


def make_case(name: str) -> tuple[nn.Module, torch.Tensor]:
    """``(model, x)`` in float64, 7 examples."""
    return _make(name)


def oracle(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense per-example ``(J, p)``: ``J[i] = ∂ log softmax / ∂θ`` of shape ``(C, P)``.

    One example at a time with ``torch.autograd.functional.jacobian`` (independent of the
    kernels under test: no vmap, no hooks).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = tuple(p.detach().clone() for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    jacs, probs = [], []
    for i in range(x.shape[0]):

        def log_softmax(*params: torch.Tensor, i: int = i) -> torch.Tensor:
            out = torch.func.functional_call(
                model, dict(zip(names, params, strict=True)), x[i : i + 1]
            )
            return torch.log_softmax(out, dim=-1)[0]

        jac = torch.autograd.functional.jacobian(log_softmax, values)
        jacs.append(torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1))
        probs.append(log_softmax(*values).exp().detach())
    return torch.stack(jacs), torch.stack(probs)
