"""Per-example Fisher kernels vs dense float64 oracles, identities, invariances and BackPACK."""

from __future__ import annotations

import copy
import functools
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from curvlake.errors import UserInputError
from curvlake.pipelines.npeff import pefs
from tests._markers import requires_backpack
from tests.npeff.cases import CASES, DTYPE, LAYERWISE_CASES, make_case, oracle

pytestmark = pytest.mark.filterwarnings(
    "ignore:Using padding='same':UserWarning",  # torch, for the even-kernel 'same' case
    "ignore:Full backward hook is firing:UserWarning",  # BackPACK's hooks on an input-free graph
)

BACKENDS = ("func", "layerwise")
ATOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add contention on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _case(name: str):
    model, x = make_case(name)
    jac, probs = oracle(model, x)
    return model, x, jac, probs


def _backend_cases():
    for name in CASES:
        for backend in BACKENDS:
            if backend == "layerwise" and name not in LAYERWISE_CASES:
                continue
            yield pytest.param(name, backend, id=f"{name}-{backend}")


@pytest.mark.parametrize(("name", "backend"), list(_backend_cases()))
def test_dpef_equals_diagonal_of_dense_fisher(name, backend):
    model, x, jac, probs = _case(name)
    f = pefs.per_example_fisher_diag(model, x, dtype=DTYPE, backend=backend, class_chunk=2)
    for i in range(x.shape[0]):
        fisher = jac[i].T @ torch.diag(probs[i]) @ jac[i]  # Σ_c p_c g_c g_cᵀ, P × P
        torch.testing.assert_close(f[i], torch.diagonal(fisher), atol=ATOL, rtol=1e-10)
    assert (f >= 0).all()


@pytest.mark.parametrize("name", ["groupnorm", "tied", "reshaped"])
def test_auto_falls_back_to_func(name):
    model, x, jac, probs = _case(name)
    f = pefs.per_example_fisher_diag(model, x, dtype=DTYPE, batch_size=4)
    torch.testing.assert_close(
        f, (probs.unsqueeze(-1) * jac.square()).sum(1), atol=ATOL, rtol=1e-10
    )


@pytest.mark.parametrize(("name", "backend"), list(_backend_cases()))
def test_lowrank_factors_and_identities(name, backend):
    model, x, jac, probs = _case(name)
    a = pefs.per_example_fisher_lowrank(model, x, dtype=DTYPE, backend=backend)
    n, C = probs.shape
    assert a.shape == (n, C, jac.shape[2])
    torch.testing.assert_close(a, probs.sqrt().unsqueeze(-1) * jac, atol=ATOL, rtol=1e-10)
    f = pefs.per_example_fisher_diag(model, x, dtype=DTYPE, backend=backend)
    # D-PEF = diag(AᵀA) = Σ_c a_c²
    torch.testing.assert_close(f, a.square().sum(1), atol=ATOL, rtol=1e-10)
    # Σ_c √p_c a_c = ∇ Σ_c p_c = 0, hence rank(A) ≤ C − 1
    null = (probs.sqrt().unsqueeze(-1) * a).sum(1)
    assert null.abs().max() < 1e-12
    for i in range(n):
        assert torch.linalg.matrix_rank(a[i]) <= C - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_generic_logprob_grads(backend):
    model, x, jac, _ = _case("mlp")
    classes = torch.tensor([[3, 0], [1, 1], [2, 3], [0, 2], [1, 0], [3, 3], [2, 1]])
    weights = torch.rand(classes.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    g = pefs.per_example_logprob_grads(
        model, x, classes, weights=weights, dtype=DTYPE, backend=backend, batch_size=3
    )
    expected = weights.unsqueeze(-1) * jac.gather(
        1, classes.unsqueeze(-1).expand(-1, -1, jac.shape[2])
    )
    torch.testing.assert_close(g, expected, atol=ATOL, rtol=1e-10)
    full = pefs.per_example_logprob_grads(model, x, dtype=DTYPE, backend=backend)
    torch.testing.assert_close(full, jac, atol=ATOL, rtol=1e-10)


def test_layer_table_and_flat_params():
    model, _, jac, _ = _case("cnn")
    table = pefs.layer_table(model)
    named = list(model.named_parameters())
    assert [t.name for t in table] == [n for n, _ in named]
    assert table[0].offset == 0
    for prev, cur in itertools.pairwise(table):
        assert cur.offset == prev.offset + prev.size
    assert table[-1].offset + table[-1].size == jac.shape[2]
    theta = pefs.flat_params(model, dtype=DTYPE)
    for info, (_, p) in zip(table, named, strict=True):
        assert info.shape == tuple(p.shape)
        torch.testing.assert_close(theta[info.offset : info.offset + info.size], p.reshape(-1))
    # θ is every parameter: a frozen one is a column like any other, with the same D-PEF.
    frozen = copy.deepcopy(model)
    frozen[0].weight.requires_grad_(False)
    assert pefs.layer_table(frozen) == table
    torch.testing.assert_close(pefs.flat_params(frozen, dtype=DTYPE), theta, atol=0, rtol=0)
    x = _case("cnn")[1]
    for backend in BACKENDS:
        f = pefs.per_example_fisher_diag(frozen, x, dtype=DTYPE, backend=backend)
        expected = pefs.per_example_fisher_diag(model, x, dtype=DTYPE, backend=backend)
        torch.testing.assert_close(f, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_prob_drops_classes_without_renormalising(backend):
    model, x, jac, probs = _case("mlp")
    tau = float(probs.median())
    f = pefs.per_example_fisher_diag(model, x, min_prob=tau, dtype=DTYPE, backend=backend)
    kept = (probs >= tau).to(DTYPE)
    expected = ((kept * probs).unsqueeze(-1) * jac.square()).sum(1)
    torch.testing.assert_close(f, expected, atol=ATOL, rtol=1e-10)
    full = pefs.per_example_fisher_diag(model, x, dtype=DTYPE, backend=backend)
    zero_tau = pefs.per_example_fisher_diag(model, x, min_prob=0.0, dtype=DTYPE, backend=backend)
    torch.testing.assert_close(zero_tau, full, atol=0, rtol=0)
    none = pefs.per_example_fisher_diag(model, x, min_prob=1.0, dtype=DTYPE, backend=backend)
    assert (none == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_classes_keeps_largest_logits(backend):
    model, x, jac, probs = _case("mlp")
    a = pefs.per_example_fisher_lowrank(model, x, top_k_classes=2, dtype=DTYPE, backend=backend)
    logits = pefs.predict_logits(model, x, dtype=DTYPE)
    top = pefs.top_classes(logits, 2)
    assert (logits.gather(1, top)[:, 0] >= logits.gather(1, top)[:, 1]).all()
    assert (logits.gather(1, top)[:, 1:].min(1).values >= logits.topk(2).values[:, 1]).all()
    expected = probs.gather(1, top).sqrt().unsqueeze(-1) * jac.gather(
        1, top.unsqueeze(-1).expand(-1, -1, jac.shape[2])
    )
    assert a.shape == (x.shape[0], 2, jac.shape[2])
    torch.testing.assert_close(a, expected, atol=ATOL, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lvrm_ranks_and_rows(backend):
    model, x, jac, probs = _case("mlp")
    max_classes, tau = 3, 0.12
    a, ranks, classes = pefs.per_example_fisher_lvrm(
        model, x, max_classes=max_classes, min_prob=tau, dtype=DTYPE, backend=backend, batch_size=2
    )
    n, _, P = jac.shape
    assert a.shape == (n, max_classes, P) and ranks.shape == (n,) and classes.shape == (n, 3)
    expected_ranks = torch.clamp((probs >= tau).sum(1), max=max_classes)
    assert torch.equal(ranks, expected_ranks)
    assert len(set(ranks.tolist())) > 1  # the case exercises different ranks
    order = torch.argsort(probs, dim=1, descending=True)
    for i in range(n):
        r = int(ranks[i])
        assert torch.equal(classes[i, :r], order[i, :r])
        assert (classes[i, r:] == -1).all()
        assert (a[i, r:] == 0).all()
        expected = probs[i, order[i, :r]].sqrt().unsqueeze(-1) * jac[i, order[i, :r]]
        torch.testing.assert_close(a[i, :r], expected, atol=ATOL, rtol=1e-10)
    _, r0, _ = pefs.per_example_fisher_lvrm(
        model, x, max_classes=2, min_prob=0.0, dtype=DTYPE, backend=backend
    )
    assert (r0 == 2).all()


def test_frobenius_norm_via_gram():
    _, _, jac, probs = _case("cnn")
    a = probs.sqrt().unsqueeze(-1) * jac
    norms = pefs.lowrank_frobenius_norm(a)
    for i in range(a.shape[0]):
        dense = torch.linalg.matrix_norm(a[i].T @ a[i])  # P × P, fine at this size
        gram = torch.linalg.matrix_norm(a[i] @ a[i].T)
        torch.testing.assert_close(norms[i], dense, atol=0, rtol=1e-10)
        torch.testing.assert_close(norms[i], gram, atol=0, rtol=1e-12)
    values, dense_norms = pefs.dense_lowrank(a, dtype=DTYPE)
    assert torch.equal(values, a)
    torch.testing.assert_close(dense_norms, norms)


def test_topk_sparsify_diag():
    model, x, _, _ = _case("cnn")
    f = pefs.per_example_fisher_diag(model, x, dtype=DTYPE)
    n, P = f.shape
    k = 17
    values, indices, norms = pefs.topk_sparsify_diag(f, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int32
    assert values.shape == indices.shape == (n, k) and norms.shape == (n,)
    assert (indices >= 0).all() and (indices < P).all()
    assert (indices[:, 1:] > indices[:, :-1]).all()  # sorted ascending by parameter index
    idx = indices.long()
    torch.testing.assert_close(values, f.gather(1, idx).float())
    for i in range(n):
        dropped = torch.ones(P, dtype=torch.bool)
        dropped[idx[i]] = False
        assert f[i, idx[i]].min() >= f[i, dropped].max()
    torch.testing.assert_close(norms, torch.linalg.vector_norm(f, dim=1).float())
    dense, dense_norms = pefs.dense_diag(f, dtype=DTYPE)
    assert torch.equal(dense, f)
    torch.testing.assert_close(dense_norms, torch.linalg.vector_norm(f, dim=1))
    values_all, indices_all, _ = pefs.topk_sparsify_diag(f, P, dtype=DTYPE)
    assert torch.equal(indices_all.long(), torch.arange(P).expand(n, P))
    assert torch.equal(values_all, f)


def test_topk_sparsify_lowrank():
    _, _, jac, probs = _case("mlp")
    a = probs.sqrt().unsqueeze(-1) * jac
    n, C, P = a.shape
    k = 23
    values, cls, par, norms = pefs.topk_sparsify_lowrank(a, k, dtype=DTYPE)
    assert cls.dtype == par.dtype == torch.int32
    assert ((cls >= 0) & (cls < C)).all() and ((par >= 0) & (par < P)).all()
    flat = cls.long() * P + par.long()
    assert (flat[:, 1:] > flat[:, :-1]).all()  # sorted by (class, parameter)
    torch.testing.assert_close(values, a[torch.arange(n)[:, None], cls.long(), par.long()])
    for i in range(n):
        dropped = torch.ones(C * P, dtype=torch.bool)
        dropped[flat[i]] = False
        assert values[i].abs().min() >= a[i].reshape(-1)[dropped].abs().max()
    assert (values < 0).any()  # signs are kept
    torch.testing.assert_close(norms, pefs.lowrank_frobenius_norm(a))
    offsets = pefs.lowrank_class_offsets(cls, C)
    assert (
        offsets.shape == (n, C + 1) and (offsets[:, 0] == 0).all() and (offsets[:, -1] == k).all()
    )
    for i in range(n):
        for c in range(C):
            assert (cls[i, offsets[i, c] : offsets[i, c + 1]] == c).all()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_batch_size_invariance(name):
    model, x, _, _ = _case(name)
    kw = {"dtype": DTYPE}
    f_all = pefs.per_example_fisher_diag(model, x, batch_size=64, **kw)
    a_all = pefs.per_example_fisher_lowrank(model, x, batch_size=64, **kw)
    lv_all = pefs.per_example_fisher_lvrm(model, x, max_classes=3, min_prob=0.1, **kw)
    for bs in (1, 3):
        torch.testing.assert_close(
            pefs.per_example_fisher_diag(model, x, batch_size=bs, **kw), f_all, atol=1e-15, rtol=0
        )
        torch.testing.assert_close(
            pefs.per_example_fisher_lowrank(model, x, batch_size=bs, **kw),
            a_all,
            atol=1e-15,
            rtol=0,
        )
        lv = pefs.per_example_fisher_lvrm(
            model, x, max_classes=3, min_prob=0.1, batch_size=bs, **kw
        )
        for got, want in zip(lv, lv_all, strict=True):
            torch.testing.assert_close(got, want, atol=1e-15, rtol=0)


def test_dataset_fisher_expectation_is_mean_of_dpefs_and_block_invariant():
    model, x, _, _ = _case("mlp")
    f = pefs.per_example_fisher_diag(model, x, dtype=DTYPE)
    dsf = pefs.dataset_fisher_diag(model, x, mode="expectation", dtype=DTYPE)
    torch.testing.assert_close(dsf, f.mean(0), atol=1e-15, rtol=1e-12)
    for block in (1, 3):
        torch.testing.assert_close(
            pefs.dataset_fisher_diag(model, x, mode="expectation", block_size=block, dtype=DTYPE),
            dsf,
            atol=1e-15,
            rtol=1e-12,
        )
    s, count = pefs.dataset_fisher_diag_sum(model, x[2:5], mode="expectation", dtype=DTYPE)
    assert count == 3
    torch.testing.assert_close(s, f[2:5].sum(0))


def test_dataset_fisher_sampling_block_invariant_and_seeded():
    model, x, _, _ = _case("mlp")
    ref = pefs.dataset_fisher_diag(model, x, mode="sampling", seed=5, dtype=DTYPE)
    for block, batch in ((1, 1), (3, 2), (7, 64)):
        got = pefs.dataset_fisher_diag(
            model, x, mode="sampling", seed=5, block_size=block, batch_size=batch, dtype=DTYPE
        )
        torch.testing.assert_close(got, ref, atol=1e-15, rtol=1e-12)
    # a block's partial sum only depends on the global example indices
    s1, _ = pefs.dataset_fisher_diag_sum(model, x[:4], mode="sampling", seed=5, dtype=DTYPE)
    s2, _ = pefs.dataset_fisher_diag_sum(
        model, x[4:], mode="sampling", seed=5, example_offset=4, dtype=DTYPE
    )
    torch.testing.assert_close((s1 + s2) / 7, ref, atol=1e-15, rtol=1e-12)
    other = pefs.dataset_fisher_diag(model, x, mode="sampling", seed=6, dtype=DTYPE)
    assert not torch.equal(other, ref)


def test_dataset_fisher_sampling_converges_to_expectation():
    model, x, jac, probs = _case("logreg")
    n_rep = 3000
    xs = x[:2].repeat(n_rep, 1)  # every copy gets its own counter-based draw
    est = pefs.dataset_fisher_diag(
        model, xs, mode="sampling", seed=11, dtype=DTYPE, batch_size=2000
    )
    g2 = jac[:2].square()  # (2, C, P)
    mean = (probs[:2].unsqueeze(-1) * g2).sum(1)  # D-PEFs
    var = (probs[:2].unsqueeze(-1) * g2.square()).sum(1) - mean.square()
    expected = mean.mean(0)
    std = (var.sum(0) / 4).sqrt() / np.sqrt(n_rep)  # std of the mean of 2·n_rep draws
    assert ((est - expected).abs() <= 5 * std + 1e-12).all()
    exp_dsf = pefs.dataset_fisher_diag(model, x[:2], mode="expectation", dtype=DTYPE)
    torch.testing.assert_close(exp_dsf, expected, atol=1e-14, rtol=1e-12)


def test_filter_examples():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [4.0, 0.0, 0.0]])
    labels = np.array([0, 2, 2, 1])
    assert pefs.filter_examples(logits, labels).tolist() == [0, 1, 2, 3]
    assert pefs.filter_examples(logits, labels, incorrect_only=True).tolist() == [1, 3]
    assert pefs.filter_examples(logits, labels, labels_in=[2]).tolist() == [1, 2]
    got = pefs.filter_examples(
        torch.as_tensor(logits), torch.as_tensor(labels), incorrect_only=True, indices=[3, 2, 0]
    )
    assert got.tolist() == [3] and got.dtype == np.int64
    with pytest.raises(UserInputError):
        pefs.filter_examples(logits, labels, indices=[4])
    with pytest.raises(UserInputError):
        pefs.filter_examples(logits, labels[:2])


class _WithUnusedLayer(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.unused = nn.Linear(3, 2)  # registered, never called in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_never_called_has_zero_columns(backend):
    model, x, jac, probs = _case("mlp")
    model = _WithUnusedLayer(copy.deepcopy(model)).to(DTYPE)
    f = pefs.per_example_fisher_diag(model, x, dtype=DTYPE, backend=backend)
    a = pefs.per_example_fisher_lowrank(model, x, dtype=DTYPE, backend=backend)
    P = jac.shape[2]
    assert f.shape[1] == P + 8 and (f[:, P:] == 0).all() and (a[:, :, P:] == 0).all()
    expected = (probs.unsqueeze(-1) * jac.square()).sum(1)
    torch.testing.assert_close(f[:, :P], expected, atol=ATOL, rtol=1e-10)


def test_model_state_is_restored_and_untouched():
    model, x, _, _ = _case("mlp")
    model = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pefs.per_example_fisher_diag(model, x, dtype=torch.float32)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == DTYPE
    assert all(p.grad is None for p in model.parameters())


def test_float32_default_is_close_to_float64():
    model, x, _, _ = _case("cnn")
    f32 = pefs.per_example_fisher_diag(model, x)
    assert f32.dtype == torch.float32
    f64 = pefs.per_example_fisher_diag(model, x, dtype=DTYPE)
    torch.testing.assert_close(f32.double(), f64, atol=1e-5, rtol=1e-4)


def test_input_validation():
    model, x, _, _ = _case("mlp")
    with pytest.raises(UserInputError, match="dtype"):
        pefs.per_example_fisher_diag(model, x, dtype=torch.int64)
    with pytest.raises(UserInputError, match="min_prob"):
        pefs.per_example_fisher_diag(model, x, min_prob=1.5)
    with pytest.raises(UserInputError, match="backend"):
        pefs.per_example_fisher_diag(model, x, backend="jax")
    with pytest.raises(UserInputError, match="batch_size"):
        pefs.per_example_fisher_diag(model, x, batch_size=0)
    with pytest.raises(UserInputError, match="top_k_classes"):
        pefs.per_example_fisher_lowrank(model, x, top_k_classes=9)
    with pytest.raises(UserInputError, match="max_classes"):
        pefs.per_example_fisher_lvrm(model, x, max_classes=9, min_prob=0.1)
    with pytest.raises(UserInputError, match="mode"):
        pefs.dataset_fisher_diag(model, x, mode="mc")
    with pytest.raises(UserInputError, match="k="):
        pefs.topk_sparsify_diag(torch.ones(2, 3), 4)
    with pytest.raises(UserInputError, match="layerwise"):
        pefs.per_example_fisher_diag(*_case("groupnorm")[:2], backend="layerwise")
    with pytest.raises(UserInputError, match="called more than once"):
        pefs.per_example_fisher_diag(*_case("tied")[:2], backend="layerwise")
    with pytest.raises(UserInputError, match="example axis"):
        pefs.per_example_fisher_diag(*_case("reshaped")[:2], backend="layerwise")
    with pytest.raises(UserInputError, match="logits"):
        pefs.per_example_fisher_diag(nn.Sequential(nn.Linear(5, 3), nn.Flatten(0)), x)


@requires_backpack
@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_matches_backpack_batch_diag_ggn_exact(name):
    from backpack import backpack, extend
    from backpack.extensions import BatchDiagGGNExact

    model, x, _, _ = _case(name)
    f = pefs.per_example_fisher_diag(model, x, dtype=DTYPE)
    bp_model = extend(copy.deepcopy(model).eval())
    # The exact GGN of softmax cross-entropy does not depend on the label.
    y = torch.zeros(x.shape[0], dtype=torch.long)
    for reduction, scale in (("sum", 1.0), ("mean", 1.0 / x.shape[0])):
        loss_fn = extend(nn.CrossEntropyLoss(reduction=reduction))
        bp_model.zero_grad()
        loss = loss_fn(bp_model(x), y)
        with backpack(BatchDiagGGNExact()):
            loss.backward()
        got = torch.cat(
            [p.diag_ggn_exact_batch.reshape(x.shape[0], -1) for p in bp_model.parameters()], 1
        )
        # reduction="sum": per-sample diag GGN = Σ_c p_c (∇ log p_c)² = D-PEF exactly;
        # reduction="mean" scales every per-sample term by 1/n.
        torch.testing.assert_close(got, scale * f, atol=1e-13, rtol=1e-10)


def test_square_root_rows_factor_the_logit_fisher():
    torch.manual_seed(3)
    p = torch.softmax(torch.randn(6, 5, dtype=DTYPE) * 3, -1)
    p[0] = torch.tensor([1 - 4e-20, 1e-20, 1e-20, 1e-20, 1e-20], dtype=DTYPE)  # near one-hot
    w = p.sqrt()
    g = w.unsqueeze(-1) * (torch.eye(5, dtype=DTYPE) - p.unsqueeze(1))  # all classes
    rows = pefs._square_root_rows(g, w)
    assert rows.shape == (6, 4, 5)  # C - 1 rows: one backward pass saved
    fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(1)
    torch.testing.assert_close(rows.transpose(1, 2) @ rows, fisher, rtol=1e-12, atol=1e-15)
    # the tiny classes keep their (tiny) share exactly: nothing is truncated
    torch.testing.assert_close(
        (rows.transpose(1, 2) @ rows)[0].diagonal()[1:], fisher[0].diagonal()[1:], rtol=1e-9, atol=0
    )
    dropped = w.clone()
    dropped[:, -1] = 0  # a class dropped (min_prob): the rows stay as they are
    assert pefs._square_root_rows(g, dropped) is g
    assert pefs._square_root_rows(g[:, :3], w[:, :3]).shape == (6, 3, 5)  # fewer rows: kept
