"""The MFAC optimizer against a dense float64 inverse of the window's Fisher."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from curvlake.errors import UserInputError
from curvlake.pipelines.mfac import MFAC
from tests.mfac.cases import dense_inverse, relative_error

DAMP = 1e-3


def _model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _backward(model: nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 3, generator=generator, dtype=dtype)
    y = torch.randn(8, 2, generator=generator, dtype=dtype)
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()


def _flat(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double().numpy().copy()


def _grads(model) -> np.ndarray:
    return _flat(p.grad for p in model.parameters())


class _Oracle:
    """The window of inserted gradients, and F⁻¹ of its last min(count, m) rows, densely."""

    def __init__(self, ngrads: int):
        self.ngrads, self.history = ngrads, []

    def direction(self, gradient: np.ndarray) -> np.ndarray:
        self.history.append(gradient)
        rows = np.array(self.history[-self.ngrads :])
        return dense_inverse(rows, DAMP) @ gradient


@pytest.mark.parametrize("refresh_every", [None, 1, 10**6])
@pytest.mark.parametrize(("ngrads", "steps"), [(1, 4), (4, 25), (33, 75)])
def test_step_is_minus_lr_inverse_fisher_of_the_decayed_gradient(ngrads, steps, refresh_every):
    model = _model()
    lr, decay = 0.05, 0.1
    opt = MFAC(
        model.parameters(), lr=lr, weight_decay=decay, ngrads=ngrads, damp=DAMP,
        refresh_every=refresh_every,
    )  # fmt: skip
    oracle = _Oracle(ngrads)
    for step in range(steps):
        _backward(model, step)
        before = _flat(model.parameters())
        expected = -lr * oracle.direction(_grads(model) + decay * before)
        opt.step()
        assert relative_error(_flat(model.parameters()) - before, expected) < 1e-8


def test_window_larger_than_1024_and_not_a_multiple_of_32():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=1031, damp=DAMP)
    oracle = _Oracle(1031)
    for step in range(4):
        _backward(model, step)
        before = _flat(model.parameters())
        expected = -0.1 * oracle.direction(_grads(model))
        opt.step()
        assert relative_error(_flat(model.parameters()) - before, expected) < 1e-8
    assert opt.state_dict()["mfac"]["window"].shape == (1031, 26)


def test_momentum_is_an_average_of_preconditioned_directions():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.05, momentum=0.9, ngrads=3, damp=DAMP)
    oracle, velocity = _Oracle(3), 0.0
    for step in range(8):
        _backward(model, step)
        before = _flat(model.parameters())
        velocity = 0.9 * velocity + 0.1 * oracle.direction(_grads(model))
        opt.step()
        assert relative_error(_flat(model.parameters()) - before, -0.05 * velocity) < 1e-8


def test_decoupled_weight_decay_keeps_the_window_free_of_decay():
    model = _model()
    lr, decay = 0.05, 0.3
    opt = MFAC(
        model.parameters(), lr=lr, weight_decay=decay, ngrads=3, damp=DAMP,
        decoupled_weight_decay=True,
    )  # fmt: skip
    oracle = _Oracle(3)
    for step in range(6):
        _backward(model, step)
        before = _flat(model.parameters())
        expected = -lr * decay * before - lr * oracle.direction(_grads(model))
        opt.step()
        assert relative_error(_flat(model.parameters()) - before, expected) < 1e-8


def test_learning_rate_and_decay_per_group():
    model = _model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = MFAC(
        [{"params": first}, {"params": second, "lr": 0.5, "weight_decay": 0.2}],
        lr=0.05, ngrads=4, damp=DAMP,
    )  # fmt: skip
    split = sum(p.numel() for p in first)
    oracle = _Oracle(4)
    for step in range(6):
        _backward(model, step)
        before = _flat(model.parameters())
        gradient = _grads(model)
        gradient[split:] += 0.2 * before[split:]
        direction = oracle.direction(gradient)
        expected = np.concatenate([-0.05 * direction[:split], -0.5 * direction[split:]])
        opt.step()
        assert relative_error(_flat(model.parameters()) - before, expected) < 1e-8


@pytest.mark.parametrize("form", ["flat", "per_param"])
@pytest.mark.parametrize("decoupled", [False, True])
def test_masked_coordinates_stay_exactly_zero(form, decoupled):
    model = _model()
    rng = np.random.default_rng(0)
    keep = [torch.from_numpy(rng.random(tuple(p.shape)) > 0.4) for p in model.parameters()]
    with torch.no_grad():
        for p, k in zip(model.parameters(), keep, strict=True):
            p.mul_(k)
    mask = torch.cat([k.reshape(-1) for k in keep]) if form == "flat" else keep
    opt = MFAC(
        model.parameters(), lr=0.05, momentum=0.5, weight_decay=0.1, ngrads=4, damp=DAMP,
        decoupled_weight_decay=decoupled, mask=mask,
    )  # fmt: skip
    kept = torch.cat([k.reshape(-1) for k in keep]).numpy()
    assert torch.equal(opt.trained_coordinates, torch.from_numpy(np.flatnonzero(kept)))
    oracle, velocity = _Oracle(4), 0.0
    for step in range(7):
        _backward(model, step)
        before = _flat(model.parameters())
        gradient = _grads(model)[kept]
        if not decoupled:
            gradient += 0.1 * before[kept]
        velocity = 0.5 * velocity + 0.5 * oracle.direction(gradient)
        expected = -0.05 * velocity - (0.05 * 0.1 * before[kept] if decoupled else 0.0)
        opt.step()
        after = _flat(model.parameters())
        assert np.all(after[~kept] == 0.0)
        assert relative_error(after[kept] - before[kept], expected) < 1e-8
    assert opt.state_dict()["mfac"]["window"].shape == (4, int(kept.sum()))


def _train(model, opt, steps):
    for step in steps:
        _backward(model, step)
        opt.step()


@pytest.mark.parametrize("via_bytes", [True, False])
def test_state_round_trip_continues_bit_for_bit(via_bytes):
    settings = dict(lr=0.05, momentum=0.9, weight_decay=0.01, ngrads=3, damp=DAMP, refresh_every=2)
    reference = _model()
    reference_opt = MFAC(reference.parameters(), **settings)
    _train(reference, reference_opt, range(10))

    model = _model()
    opt = MFAC(model.parameters(), **settings)
    _train(model, opt, range(5))
    if via_bytes:
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
    else:
        saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    _train(model, opt, range(100, 103))  # the saved run moves on; the copy must not see it

    resumed = _model(seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_opt = MFAC(resumed.parameters(), **settings)
    resumed_opt.load_state_dict(saved["opt"])
    _train(resumed, resumed_opt, range(5, 10))
    for a, b in zip(resumed.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    state, reference_state = resumed_opt.state_dict()["mfac"], reference_opt.state_dict()["mfac"]
    for key in ("count", "slot", "since_refresh"):
        assert state[key] == reference_state[key]
    for key in ("window", "gram", "inverse"):
        assert torch.equal(state[key], reference_state[key])


def test_state_of_another_window_is_refused():
    model = _model()
    opt = MFAC(model.parameters(), ngrads=3)
    _train(model, opt, range(2))
    with pytest.raises(UserInputError, match="ngrads=3"):
        MFAC(model.parameters(), ngrads=4).load_state_dict(opt.state_dict())
    with pytest.raises(UserInputError, match="mfac"):
        MFAC(model.parameters(), ngrads=3).load_state_dict(
            torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
        )


def test_float32_model_uses_a_float32_window():
    model = _model(dtype=torch.float32)
    opt = MFAC(model.parameters(), lr=0.05, ngrads=4, damp=DAMP)
    oracle = _Oracle(4)
    for step in range(6):
        _backward(model, step)
        before = _flat(model.parameters())
        expected = -0.05 * oracle.direction(_grads(model))
        opt.step()
        assert relative_error(_flat(model.parameters()) - before, expected) < 1e-4
    assert opt.state_dict()["mfac"]["window"].dtype == torch.float32


def test_parameter_without_gradient_is_not_updated():
    model = _model()
    frozen = model[2].bias
    opt = MFAC(model.parameters(), lr=0.05, weight_decay=0.1, ngrads=2, damp=DAMP)
    _backward(model, 0)
    opt.step()
    before = frozen.detach().clone()
    _backward(model, 1)
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)


def test_closure_and_inverse_fisher_view():
    model = _model()
    opt = MFAC(model.parameters(), lr=0.05, ngrads=3, damp=DAMP)

    def closure():
        _backward(model, 0)
        return torch.tensor(1.5)

    assert opt.step(closure).item() == 1.5
    g = _grads(model)
    np.testing.assert_allclose(opt.inverse_fisher() @ g, dense_inverse(g[None], DAMP) @ g)


def test_bad_arguments_are_refused():
    params = list(_model().parameters())
    for kwargs, match in [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"damp": 0.0}, "damp"),
        ({"ngrads": 0}, "ngrads"),
        ({"refresh_every": 0}, "refresh_every"),
        ({"mask": torch.ones(26)}, "bool"),
        ({"mask": torch.ones(25, dtype=torch.bool)}, r"\(26,\)"),
        ({"mask": [torch.ones(4, 3, dtype=torch.bool)]}, "4 parameters"),
    ]:
        with pytest.raises(UserInputError, match=match):
            MFAC(params, **kwargs)
    opt = MFAC(params[:2])
    with pytest.raises(UserInputError, match="parameter group"):
        opt.add_param_group({"params": params[2:]})
