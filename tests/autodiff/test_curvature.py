"""Hessian- and GGN-vector products vs dense autograd oracles (float64) and CurvLinOps."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from curvlake.autodiff import CurvatureOperator, per_example_grads, predict_logits
from curvlake.errors import UserInputError
from tests._markers import requires_curvlinops
from tests.autodiff.cases import CASES, DTYPE, dense_ggn, dense_hessian, make_case

# torch scripts its forward-mode decompositions on the first jvp (and CurvLinOps' linear_operator
# dependency some helpers on import): torch's own deprecation, nothing to act on here.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

KINDS = ("hessian", "ggn")
ATOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add contention on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _dense(name: str, kind: str) -> torch.Tensor:
    model, x, y = make_case(name)
    return dense_hessian(model, x, y) if kind == "hessian" else dense_ggn(model, x)


def _vectors(n_params: int, k: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_params, k, dtype=DTYPE, generator=g)


def _operator(name: str, kind: str, **kwargs) -> CurvatureOperator:
    model, x, y = make_case(name)
    return CurvatureOperator(model, x, y, kind=kind, dtype=DTYPE, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASES)
def test_products_equal_dense_matrix(name, kind):
    op = _operator(name, kind, batch_size=3)
    dense = _dense(name, kind)
    assert op.shape == dense.shape
    V = _vectors(op.n_params)
    torch.testing.assert_close(op.matmat(V), dense @ V, atol=ATOL, rtol=1e-10)
    torch.testing.assert_close(dense, dense.T, atol=1e-12, rtol=0)


def test_ggn_differs_from_hessian_and_is_positive_semidefinite():
    hessian, ggn = _dense("mlp", "hessian"), _dense("mlp", "ggn")
    assert (hessian - ggn).abs().max() > 1e-3  # the case has a non-trivial residual term
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12


def test_ggn_diagonal_is_the_mean_of_per_example_fisher_diagonals():
    # For cross-entropy the GGN is the Fisher: diag G = (1/n) Σ_i Σ_c p_ic (J_iᵀ (e_c − p_i))².
    model, x, y = make_case("cnn")
    op = CurvatureOperator(model, x, y, kind="ggn", dtype=DTYPE)
    p = torch.softmax(predict_logits(model, x, dtype=DTYPE), dim=-1)
    scores = p.sqrt().unsqueeze(-1) * (torch.eye(p.shape[1], dtype=DTYPE) - p.unsqueeze(1))
    dpefs = per_example_grads(model, x, scores, sqsum=True, dtype=DTYPE)
    identity = torch.eye(op.n_params, dtype=DTYPE)
    torch.testing.assert_close(torch.diagonal(op @ identity), dpefs.mean(0), atol=1e-12, rtol=1e-10)
    assert (op.n_products, op.n_passes) == (op.n_params, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_block_equals_one_vector_at_a_time(kind):
    op = _operator("cnn", kind)
    V = _vectors(op.n_params, k=3)
    block = op.matmat(V)
    columns = torch.stack([op.matmat(V[:, j]) for j in range(3)], dim=1)
    torch.testing.assert_close(block, columns, atol=1e-13, rtol=0)
    assert (op.n_products, op.n_passes) == (6, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_changes_only_rounding_and_results_are_deterministic(kind):
    V = _vectors(_operator("bn_dropout", kind).n_params)
    ref = _operator("bn_dropout", kind, batch_size=7).matmat(V)
    for bs in (1, 2, None):
        got = _operator("bn_dropout", kind, batch_size=bs).matmat(V)
        torch.testing.assert_close(got, ref, atol=1e-13, rtol=0)
    op = _operator("bn_dropout", kind, batch_size=3)
    assert torch.equal(op.matmat(V), op.matmat(V))


@pytest.mark.parametrize("kind", KINDS)
def test_train_mode_model_is_evaluated_in_eval_mode_and_restored(kind):
    model, x, y = make_case("bn_dropout")
    model.train()
    model[0].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = CurvatureOperator(model, x, y, kind=kind, dtype=DTYPE)
    V = _vectors(op.n_params)
    torch.testing.assert_close(op @ V, _dense("bn_dropout", kind) @ V, atol=ATOL, rtol=1e-10)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # running statistics not updated
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_are_coordinates_too():
    model, x, y = make_case("mlp")
    model[2].weight.requires_grad_(False)
    op = CurvatureOperator(model, x, y, dtype=DTYPE)
    V = _vectors(op.n_params)
    torch.testing.assert_close(op @ V, _dense("mlp", "hessian") @ V, atol=ATOL, rtol=1e-10)


def test_numpy_torch_and_scipy_interfaces():
    op = _operator("mlp", "ggn")
    dense = _dense("mlp", "ggn").numpy()
    V = _vectors(op.n_params, k=2)
    out = op.matmat(V.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == V.shape
    np.testing.assert_allclose(out, dense @ V.numpy(), atol=ATOL, rtol=1e-10)
    v32 = V[:, 0].float()
    out32 = op.matmat(v32)
    assert torch.is_tensor(out32) and out32.dtype == torch.float32 and out32.shape == v32.shape
    lin = op.to_scipy()
    assert isinstance(lin, LinearOperator) and lin.shape == dense.shape
    assert lin.dtype == np.float64
    np.testing.assert_allclose(lin.matvec(V[:, 1].numpy()), dense @ V[:, 1].numpy(), atol=ATOL)
    np.testing.assert_allclose(lin.rmatvec(V[:, 1].numpy()), dense @ V[:, 1].numpy(), atol=ATOL)
    np.testing.assert_allclose(lin @ V.numpy(), dense @ V.numpy(), atol=ATOL)
    assert op.n_passes == 5 and op.n_products == 2 + 1 + 1 + 1 + 2


def test_input_validation():
    model, x, y = make_case("mlp")
    with pytest.raises(UserInputError, match="kind"):
        CurvatureOperator(model, x, y, kind="fisher")
    with pytest.raises(UserInputError, match="loss"):
        CurvatureOperator(model, x, y, loss="mse")
    with pytest.raises(UserInputError, match=r"\[0, 4\)"):
        CurvatureOperator(model, x, torch.full((7,), 4))
    with pytest.raises(UserInputError, match="y must"):
        CurvatureOperator(model, x, y[:5])
    with pytest.raises(UserInputError, match="batch_size"):
        CurvatureOperator(model, x, y, batch_size=0)
    with pytest.raises(UserInputError, match="dtype"):
        CurvatureOperator(model, x, y, dtype=torch.int32)
    op = CurvatureOperator(model, x, y, dtype=DTYPE)
    with pytest.raises(UserInputError, match="shape"):
        op.matmat(torch.zeros(op.n_params + 1))
    with pytest.raises(UserInputError, match="numpy array or a torch tensor"):
        op.matmat([0.0] * op.n_params)
    assert (op.n_products, op.n_passes) == (0, 0)


@requires_curvlinops
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASES)
def test_matches_curvlinops(name, kind):
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    model, x, y = make_case(name)
    model.eval()  # CurvLinOps calls the model as it is
    peer_class = HessianLinearOperator if kind == "hessian" else GGNLinearOperator
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    # reduction="mean" over batches of unequal size: CurvLinOps rescales each batch by its
    # share of the data, so the operator is that of the mean over all n examples.
    peer = peer_class(model, nn.CrossEntropyLoss(reduction="mean"), list(model.parameters()), data)
    op = CurvatureOperator(model, x, y, kind=kind, dtype=DTYPE, batch_size=3)
    V = _vectors(op.n_params)
    torch.testing.assert_close(op @ V, peer @ V, atol=ATOL, rtol=1e-10)
