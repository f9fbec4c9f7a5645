"""Per-example gradients from output cotangents vs autograd loops over examples (float64)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from curvlake.autodiff import per_example_grads, per_example_loss_grads, predict_logits
from curvlake.errors import UserInputError
from curvlake.nn.params import flat_tensor, parameter_table
from tests.autodiff.cases import (
    DTYPE,
    loop_loss_grads,
    loop_per_example_grads,
    make_case,
    outputs_at,
)

BACKENDS = ("func", "layerwise")
MODELS = ("mlp", "cnn")
ATOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add contention on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _loss_oracle(name: str) -> torch.Tensor:
    return loop_loss_grads(*make_case(name))


def _cotangents(name: str, K: int = 3) -> torch.Tensor:
    model, x, _ = make_case(name)
    C = predict_logits(model, x, dtype=DTYPE).shape[1]
    g = torch.Generator().manual_seed(7)
    cot = torch.randn(x.shape[0], K, C, dtype=DTYPE, generator=g)
    cot[:, 1] = 0  # a row that is zero for every example costs nothing and stays zero
    return cot


@functools.cache
def _cotangent_oracle(name: str) -> torch.Tensor:
    model, x, _ = make_case(name)
    return loop_per_example_grads(model, x, _cotangents(name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_loss_grads_equal_autograd_loop(name, backend):
    model, x, y = make_case(name)
    g = per_example_loss_grads(model, x, y, dtype=DTYPE, backend=backend, batch_size=3)
    assert g.shape == (x.shape[0], parameter_table(model).total) and g.dtype == DTYPE
    torch.testing.assert_close(g, _loss_oracle(name), atol=ATOL, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_random_cotangents_equal_loop_of_vjps(name, backend):
    model, x, _ = make_case(name)
    cot = _cotangents(name)
    g = per_example_grads(model, x, cot, dtype=DTYPE, backend=backend, batch_size=4)
    torch.testing.assert_close(g, _cotangent_oracle(name), atol=ATOL, rtol=1e-10)
    assert (g[:, 1] == 0).all()
    # numpy cotangents, another compute batch
    g_np = per_example_grads(model, x, cot.numpy(), dtype=DTYPE, backend=backend, batch_size=7)
    torch.testing.assert_close(g_np, g, atol=1e-15, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqsum_is_sum_of_squares(backend):
    model, x, _ = make_case("cnn")
    cot = _cotangents("cnn")
    s = per_example_grads(model, x, cot, sqsum=True, dtype=DTYPE, backend=backend, row_chunk=1)
    assert s.shape == (x.shape[0], parameter_table(model).total)
    torch.testing.assert_close(s, _cotangent_oracle("cnn").square().sum(1), atol=ATOL, rtol=1e-10)
    zero = per_example_grads(model, x, torch.zeros_like(cot), sqsum=True, dtype=DTYPE)
    assert (zero == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_callable_cotangents_see_logits_and_rows_and_return_aux(backend):
    model, x, y = make_case("mlp")
    logits = predict_logits(model, x, dtype=DTYPE)
    seen = []

    def cotangents(z: torch.Tensor, rows: slice):
        seen.append(rows)
        torch.testing.assert_close(z, logits[rows], atol=1e-14, rtol=0)
        assert not z.requires_grad
        p = torch.softmax(z, dim=-1)
        return (p - torch.nn.functional.one_hot(y[rows], z.shape[1])).unsqueeze(1), rows.start

    g, aux = per_example_grads(
        model, x, cotangents, dtype=DTYPE, backend=backend, batch_size=3, return_aux=True
    )
    assert seen == [slice(0, 3), slice(3, 6), slice(6, 7)] and aux == [0, 3, 6]
    torch.testing.assert_close(g[:, 0], _loss_oracle("mlp"), atol=ATOL, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_rows_in_a_batch_are_zero_padded(backend):
    model, x, _ = make_case("mlp")
    cot = _cotangents("mlp")

    def cotangents(z: torch.Tensor, rows: slice) -> torch.Tensor:
        return cot[rows, : 3 if rows.start == 0 else 2]

    g = per_example_grads(model, x, cotangents, dtype=DTYPE, backend=backend, batch_size=4)
    want = _cotangent_oracle("mlp").clone()
    want[4:, 2] = 0
    torch.testing.assert_close(g, want, atol=ATOL, rtol=1e-10)
    with pytest.raises(UserInputError, match="n_rows"):
        per_example_grads(model, x, lambda z, rows: cot[rows, : rows.start + 1], batch_size=4)
    wide = per_example_grads(
        model, x, lambda z, rows: cot[rows, : rows.start + 1], batch_size=4, n_rows=5, dtype=DTYPE
    )
    assert wide.shape[1] == 5 and (wide[:, 4:] == 0).all() and (wide[:4, 1:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_batch_size_invariance(name, backend):
    model, x, y = make_case(name)
    ref = per_example_loss_grads(model, x, y, dtype=DTYPE, backend=backend, batch_size=7)
    for bs in (1, 3, None):
        got = per_example_loss_grads(model, x, y, dtype=DTYPE, backend=backend, batch_size=bs)
        torch.testing.assert_close(got, ref, atol=1e-15, rtol=0)


def test_backends_agree_on_a_batchnorm_dropout_model_in_eval_mode():
    model, x, y = make_case("bn_dropout")
    model.train()
    want = loop_loss_grads(model, x, y)
    for backend in BACKENDS:
        got = per_example_loss_grads(model, x, y, dtype=DTYPE, backend=backend)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-10)
    assert all(m.training for m in model.modules())


def test_frozen_parameters_are_columns_too():
    model, x, y = make_case("mlp")
    model[0].weight.requires_grad_(False)
    for backend in BACKENDS:
        got = per_example_loss_grads(model, x, y, dtype=DTYPE, backend=backend)
        torch.testing.assert_close(got, _loss_oracle("mlp"), atol=ATOL, rtol=1e-10)


def test_mean_of_loss_grads_is_the_gradient_of_the_mean_loss():
    model, x, y = make_case("cnn")
    theta = flat_tensor(model).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(outputs_at(model, theta, x), y)
    (want,) = torch.autograd.grad(loss, theta)
    got = per_example_loss_grads(model, x, y, dtype=DTYPE).mean(0)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-10)


def test_float32_default_and_model_untouched():
    model, x, y = make_case("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g32 = per_example_loss_grads(model, x, y)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), _loss_oracle("mlp"), atol=1e-5, rtol=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == DTYPE
    assert all(p.grad is None for p in model.parameters())


def test_input_validation():
    model, x, y = make_case("mlp")
    with pytest.raises(UserInputError, match="cotangents"):
        per_example_grads(model, x, torch.zeros(7, 2, 3))
    with pytest.raises(UserInputError, match="cotangents"):
        per_example_grads(model, x, torch.zeros(6, 2, 4))
    with pytest.raises(UserInputError, match="cotangents"):
        per_example_grads(model, x, lambda z, rows: z)
    with pytest.raises(UserInputError, match="y must"):
        per_example_loss_grads(model, x, y[:3])
    with pytest.raises(UserInputError, match="y must"):
        per_example_loss_grads(model, x, y.double())
    with pytest.raises(UserInputError, match=r"\[0, 4\)"):
        per_example_loss_grads(model, x, np.full(7, 4))
    with pytest.raises(UserInputError, match="loss"):
        per_example_loss_grads(model, x, y, loss="hinge")
    with pytest.raises(UserInputError, match="backend"):
        per_example_grads(model, x, torch.zeros(7, 1, 4), backend="jax")
    with pytest.raises(UserInputError, match="row_chunk"):
        per_example_grads(model, x, torch.zeros(7, 1, 4), row_chunk=0)
