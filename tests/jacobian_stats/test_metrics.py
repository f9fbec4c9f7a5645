"""Per-example statistics kernels against dense float64 oracles.

Oracle: ``torch.autograd.functional.jacobian`` on one example at a time, with the output maps
re-implemented here, and ``torch.linalg.matrix_norm``; plus a linear model whose singular values
are set by construction.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as torch_f
from torch import nn

from curvlake.errors import UserInputError
from curvlake.pipelines.jacobian_stats.metrics import (
    METRICS,
    NORMALIZATIONS,
    compute_metric,
    gram_norms,
    input_jacobian,
    jacobian_norms,
    lanczos_operator_norm,
    output_map,
    start_vectors,
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# models and oracle


def _mlp(k: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(12, 16),
            nn.Tanh(),
            nn.Linear(16, 16),
            nn.GELU(),
            nn.Linear(16, k),
        )
        .to(F64)
        .eval()
    )


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        bn,
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 5),
    ).to(F64)
    # non-trivial running statistics: a BatchNorm that used batch statistics would mix examples
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


MLP_SHAPE = (3, 4)
CNN_SHAPE = (2, 6, 6)


def _data(shape, n, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=F64)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _g(z, y, normalization, target_only):
    """Independent re-implementation of the output maps for one example (z: (K,))."""
    if normalization == "softmax":
        z = torch.exp(z - torch.logsumexp(z, 0))
    elif normalization == "logsoftmax":
        z = z - torch.logsumexp(z, 0)
    elif normalization == "crossentropy":
        return (torch.logsumexp(z, 0) - z[y]).reshape(1)
    return z[y].reshape(1) if target_only else z


def _reference_jacobians(model, x, y, normalization="none", target_only=False, transform=None):
    """(n, K', D) by autograd.functional.jacobian, one example at a time."""
    rows = []
    for i in range(x.shape[0]):

        def fi(xi, i=i):
            xi = xi[None] if transform is None else transform(xi[None])
            return _g(model(xi)[0], y[i], normalization, target_only)

        jac = torch.autograd.functional.jacobian(fi, x[i])
        rows.append(jac.reshape(jac.shape[0], -1))
    return torch.stack(rows)


def _ref_norms(jac):
    return torch.linalg.matrix_norm(jac, ord=2), torch.linalg.matrix_norm(jac, ord="fro")


def _both(model, x, y, **kw):
    op = compute_metric(model, x, y, metric="jacobian_operator", **kw)
    fro = compute_metric(model, x, y, metric="jacobian_frobenius", **kw)
    return op, fro


def _close(a, b, rtol=1e-10, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# linear model: J = W with chosen singular values


def _linear_with_singular_values(s, d=48, seed=0):
    k = len(s)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))
    w = u @ torch.diag(torch.tensor(s, dtype=F64)) @ v.T
    lin = nn.Linear(d, k).to(F64)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.normal_(generator=g)
    return nn.Sequential(nn.Flatten(), lin).eval(), w


SINGULAR_VALUES = {
    "wide_range": [250.0, 3.0, 1.0, 0.5, 1e-3],
    "all_small": [5e-3, 4e-3, 1e-3, 1e-4, 1e-6],
    "tiny": [8e-7, 1e-7, 1e-8],
    "huge": [3e4, 2e4, 1.0],
}


@pytest.mark.parametrize("name", list(SINGULAR_VALUES))
@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_linear_model_norms_equal_singular_values(name, method):
    s = SINGULAR_VALUES[name]
    model, _ = _linear_with_singular_values(s)
    x, y = _data((3, 4, 4), 4, len(s))
    op = compute_metric(model, x, y, metric="jacobian_operator", method=method, rtol=1e-12)
    _close(op, torch.full((4,), max(s), dtype=F64), rtol=1e-10)
    assert bool((op > 0).all())  # the seed returned 0 below 0.01
    if method == "exact":
        fro = compute_metric(model, x, y, metric="jacobian_frobenius")
        _close(fro, torch.full((4,), math.sqrt(sum(v * v for v in s)), dtype=F64), rtol=1e-10)


def test_linear_model_target_only_is_row_norm():
    model, w = _linear_with_singular_values(SINGULAR_VALUES["wide_range"])
    x, y = _data((3, 4, 4), 6, 5)
    op, fro = _both(model, x, y, target_only=True)
    _close(op, torch.linalg.vector_norm(w[y], dim=-1))
    _close(fro, op)


# --------------------------------------------------------------------------------------------
# agreement with the per-example reference Jacobian


@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_reference_per_example(kind, batch):
    model, shape = (_mlp(), MLP_SHAPE) if kind == "mlp" else (_cnn(), CNN_SHAPE)
    x, y = _data(shape, batch, 5)
    ref_op, ref_fro = _ref_norms(_reference_jacobians(model, x, y))
    op, fro = _both(model, x, y)
    _close(op, ref_op)
    _close(fro, ref_fro)
    jac = input_jacobian(model, x, y)
    _close(jac, _reference_jacobians(model, x, y), rtol=1e-10, atol=1e-13)


OUTPUT_MAPS = [(nm, False) for nm in NORMALIZATIONS] + [
    (nm, True) for nm in NORMALIZATIONS if nm != "crossentropy"
]


@pytest.mark.parametrize(("normalization", "target_only"), OUTPUT_MAPS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_normalizations_match_reference(kind, normalization, target_only):
    model, shape = (_mlp(), MLP_SHAPE) if kind == "mlp" else (_cnn(), CNN_SHAPE)
    x, y = _data(shape, 3, 5)
    ref = _reference_jacobians(model, x, y, normalization, target_only)
    ref_op, ref_fro = _ref_norms(ref)
    op, fro = _both(model, x, y, normalization=normalization, target_only=target_only)
    _close(op, ref_op, rtol=1e-9)
    _close(fro, ref_fro, rtol=1e-9)


def test_no_cross_example_mixing_batch_size_and_permutation():
    model = _cnn()
    x, _y = _data(CNN_SHAPE, 7, 5)
    full = jacobian_norms(model, x)
    one_by_one = [jacobian_norms(model, x[i : i + 1]) for i in range(7)]
    _close(full.operator, torch.cat([o.operator for o in one_by_one]))
    _close(full.frobenius, torch.cat([o.frobenius for o in one_by_one]))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    permuted = jacobian_norms(model, x[perm])
    _close(permuted.operator, full.operator[perm])
    _close(permuted.frobenius, full.frobenius[perm])


def test_chunked_vmap_and_channels_last_give_same_jacobian():
    model = _cnn()
    x, _y = _data(CNN_SHAPE, 3, 5)
    base = input_jacobian(model, x, channels_last=False)
    _close(input_jacobian(model, x, chunk_size=2), base)
    _close(input_jacobian(model, x, channels_last=True), base)


def test_float32_fast_path_matches_float64():
    model = _cnn()
    x, y = _data(CNN_SHAPE, 4, 5)
    ref = jacobian_norms(model, x)
    m32 = _cnn().to(torch.float32).eval()
    op32 = compute_metric(m32, x.float(), y, metric="jacobian_operator")
    assert op32.dtype == torch.float32
    _close(op32.double(), ref.operator, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# confident examples: float32 against float64 where 1 - p_max is far below float32's resolution


def _confident(kind, one_minus_p, n=8):
    """Float64 model and inputs, both float32-representable, with 1 - p_0 ~ one_minus_p.

    The last bias puts the median example exactly at ``one_minus_p``; labels are the confident
    class 0 for half of the examples (their target row is O(1 - p_0)) and others for the rest.
    """
    model, shape = (_mlp(k=5), MLP_SHAPE) if kind == "mlp" else (_cnn(), CNN_SHAPE)
    model = model.float().double()
    x, _ = _data(shape, n, 5)
    x = x.float().double()
    with torch.no_grad():
        z = model(x)
        log_odds = torch.logsumexp(z[:, 1:] - z[:, :1], dim=-1)  # log((1 - p_0) / p_0)
        model[-1].bias[0] += float(log_odds.median()) - math.log(one_minus_p)
        p = torch.softmax(model(x), dim=-1)
    rest = p[:, 1:].sum(-1)  # 1 - p_0 without cancellation
    assert bool(((rest > one_minus_p / 3) & (rest < 3 * one_minus_p)).all())
    y = torch.where(torch.arange(n) < n // 2, 0, torch.arange(n) % 4 + 1)
    return model, x, y


def _difference_reference(model, x, y, normalization, target_only):
    """``J = A J_f`` from the dense logit Jacobian, row i of ``(I - 1 p^T) J_f`` formed as
    ``sum_c p_c (J_{f,i} - J_{f,c})``: accurate in float64 whatever ``1 - p_max``."""
    jac = _reference_jacobians(model, x, y)
    z = model(x).detach()
    p = torch.exp(z - torch.logsumexp(z, -1, keepdim=True))
    rows = (p[:, None, :, None] * (jac[:, :, None, :] - jac[:, None, :, :])).sum(2)
    if normalization == "softmax":
        rows = p[..., None] * rows
    elif normalization == "crossentropy":
        rows = -rows
    if target_only or normalization == "crossentropy":
        rows = rows[torch.arange(x.shape[0]), y][:, None]
    return rows


CONFIDENT_MAPS = [
    ("softmax", False),
    ("softmax", True),
    ("logsoftmax", False),
    ("logsoftmax", True),
    ("crossentropy", False),
]


@pytest.mark.parametrize(("normalization", "target_only"), CONFIDENT_MAPS)
def test_difference_reference_matches_autograd_reference(normalization, target_only):
    model, x, y = _confident("mlp", 1e-3)
    ref = _reference_jacobians(model, x, y, normalization, target_only)
    _close(_difference_reference(model, x, y, normalization, target_only), ref, atol=1e-15)


@pytest.mark.parametrize("one_minus_p", [1e-6, 1e-30])
@pytest.mark.parametrize(("normalization", "target_only"), CONFIDENT_MAPS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_confident_float32_norms_match_float64(kind, normalization, target_only, one_minus_p):
    # float32 rounds p_0 to within 6e-8 of 1 (to 1 itself for 1e-30): torch.softmax's backward
    # was off by up to 6% per example at 1e-6; the scale 1e-30 would be subnormal in float32
    model, x, y = _confident(kind, one_minus_p)
    ref_op, ref_fro = _ref_norms(_difference_reference(model, x, y, normalization, target_only))
    kw = dict(normalization=normalization, target_only=target_only)
    for m, xx, rtol in ((copy.deepcopy(model).float(), x.float(), 1e-4), (model, x, 1e-9)):
        op, fro = _both(m, xx, y, **kw)
        lanczos = compute_metric(
            m, xx, y, metric="jacobian_operator", method="lanczos", rtol=1e-12, **kw
        )
        assert op.dtype == fro.dtype == lanczos.dtype == xx.dtype
        _close(op.double(), ref_op, rtol=rtol)
        _close(fro.double(), ref_fro, rtol=rtol)
        _close(lanczos.double(), ref_op, rtol=rtol)
    jac32 = input_jacobian(copy.deepcopy(model).float(), x.float(), y, **kw)
    assert jac32.dtype == torch.float32
    _close(_ref_norms(jac32.double())[1], ref_fro, rtol=1e-4)


@pytest.mark.parametrize(("normalization", "target_only"), CONFIDENT_MAPS)
def test_output_map_derivatives_are_stable_in_float32(normalization, target_only):
    # the public map F, differentiated by autograd in reverse and in forward mode
    model, x, y = _confident("mlp", 1e-6)
    ref = _difference_reference(model, x, y, normalization, target_only)
    fmap = output_map(
        copy.deepcopy(model).float(), normalization=normalization, target_only=target_only
    )
    for jacobian in (torch.func.jacrev, torch.func.jacfwd):
        for i in range(x.shape[0]):
            jac = jacobian(lambda xi, i=i: fmap(xi[None], y[i : i + 1])[0])(x[i].float())
            _close(
                torch.linalg.matrix_norm(jac.reshape(ref.shape[1:]).double()),
                torch.linalg.matrix_norm(ref[i]),
                rtol=1e-4,
            )


@pytest.mark.parametrize("one_minus_p", [1e-6, 1e-30])
def test_confident_forward_metrics_float32(one_minus_p):
    model, x, y = _confident("cnn", one_minus_p)
    z = model(x).detach()
    is_y = torch_f.one_hot(y, 5).bool()
    z_y = z.gather(-1, y[:, None])
    ce = torch.log1p(torch.exp(z - z_y).masked_fill(is_y, 0.0).sum(-1))  # log sum_c e^(z_c - z_y)
    p = torch.exp(z - torch.logsumexp(z, -1, keepdim=True))
    rest = p.masked_fill(is_y, 0.0)
    conf = torch.sqrt((rest**2).sum(-1) + rest.sum(-1) ** 2)  # ||p - e_y||, with 1 - p_y = sum rest
    m32 = copy.deepcopy(model).float()
    _close(compute_metric(m32, x.float(), y, metric="cross_entropy").double(), ce, rtol=1e-4)
    _close(compute_metric(m32, x.float(), y, metric="confidence").double(), conf, rtol=1e-4)
    _close(compute_metric(model, x, y, metric="cross_entropy"), ce, rtol=1e-10)
    _close(compute_metric(model, x, y, metric="confidence"), conf, rtol=1e-10)


def test_float32_lanczos_tiny_operator_norm():
    # J J^T u ~ sigma^2 = 1e-42 is subnormal in float32; the products run on unit vectors
    s = [3e-21, 1e-21, 1e-22]
    model, _ = _linear_with_singular_values(s)
    x, y = _data((3, 4, 4), 4, len(s))
    m32 = model.float()
    lz = compute_metric(m32, x.float(), y, metric="jacobian_operator", method="lanczos")
    _close(lz.double(), torch.full((4,), max(s), dtype=F64), rtol=1e-4)


# --------------------------------------------------------------------------------------------
# invariances and bounds


class _Scaled(nn.Module):
    def __init__(self, model, a):
        super().__init__()
        self.model, self.a = model, a

    def forward(self, x):
        return self.a * self.model(x)


@pytest.mark.parametrize("a", [-3.5, 1e-3, 40.0])
def test_output_scaling_scales_logit_norms(a):
    model = _cnn()
    x, y = _data(CNN_SHAPE, 3, 5)
    op, fro = _both(model, x, y)
    op_a, fro_a = _both(_Scaled(model, a).eval(), x, y)
    _close(op_a, abs(a) * op)
    _close(fro_a, abs(a) * fro)


def test_softmax_norm_at_most_half_logit_norm():
    # d softmax / dz = diag(p) - p p^T is symmetric PSD and row k has absolute sum
    # p_k (1 - p_k) + p_k sum_{j != k} p_j = 2 p_k (1 - p_k) <= 1/2, so by Gershgorin its
    # spectral norm is <= 1/2 and ||J_{softmax o f}|| <= ||J_softmax|| ||J_f|| <= ||J_f|| / 2.
    for kind in ("mlp", "cnn"):
        model, shape = (_mlp(), MLP_SHAPE) if kind == "mlp" else (_cnn(), CNN_SHAPE)
        for scale in (1.0, 30.0):
            m = _Scaled(model, scale).eval()
            x, y = _data(shape, 7, 5, seed=4)
            logit = compute_metric(m, x, y, metric="jacobian_operator")
            soft = compute_metric(m, x, y, metric="jacobian_operator", normalization="softmax")
            assert bool((soft <= 0.5 * logit * (1 + 1e-12)).all())


def test_crossentropy_norm_is_input_gradient_norm():
    model = _cnn()
    x, y = _data(CNN_SHAPE, 5, 5)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch_f.cross_entropy(model(xr), y, reduction="sum"), xr)
    expected = torch.linalg.vector_norm(grad.reshape(5, -1), dim=-1)
    op, fro = _both(model, x, y, normalization="crossentropy")
    _close(op, expected)
    _close(fro, expected)
    lz = compute_metric(
        model, x, y, metric="jacobian_operator", normalization="crossentropy", method="lanczos"
    )
    _close(lz, expected)


def test_target_only_is_norm_of_target_row():
    model = _mlp()
    x, y = _data(MLP_SHAPE, 6, 6)
    full = _reference_jacobians(model, x, y)
    expected = torch.linalg.vector_norm(full[torch.arange(6), y], dim=-1)
    _close(compute_metric(model, x, y, metric="jacobian_operator", target_only=True), expected)


# --------------------------------------------------------------------------------------------
# Lanczos


@pytest.mark.parametrize("rtol", [1e-4, 1e-6, 1e-10])
@pytest.mark.parametrize("normalization", ["none", "softmax", "logsoftmax"])
def test_lanczos_agrees_with_exact_to_rtol(rtol, normalization):
    model = _mlp(k=12)
    x, _y = _data(MLP_SHAPE, 7, 12)
    exact = jacobian_norms(model, x, normalization=normalization).operator
    res = lanczos_operator_norm(model, x, normalization=normalization, rtol=rtol)
    assert bool(res.converged.all())
    assert bool((res.sigma <= exact * (1 + 1e-12)).all())  # Ritz values are lower bounds
    assert bool(((exact - res.sigma).abs() <= rtol * exact).all())
    if rtol >= 1e-6:
        assert int(res.n_iter.max()) < 12  # stopped on the test, not on a full Krylov space


def test_lanczos_on_cnn_matches_exact():
    model = _cnn()
    x, y = _data(CNN_SHAPE, 5, 5)
    exact = jacobian_norms(model, x).operator
    lz = compute_metric(model, x, y, metric="jacobian_operator", method="lanczos", rtol=1e-8)
    _close(lz, exact, rtol=1e-8)


def test_lanczos_independent_of_batching_and_deterministic():
    model = _mlp(k=12)
    x, _y = _data(MLP_SHAPE, 7, 12)
    ids = torch.arange(100, 107)
    full = lanczos_operator_norm(model, x, rtol=1e-3, sample_ids=ids, seed=5)
    again = lanczos_operator_norm(model, x, rtol=1e-3, sample_ids=ids, seed=5)
    _close(again.sigma, full.sigma, rtol=0.0)
    parts = [
        lanczos_operator_norm(model, x[s], rtol=1e-3, sample_ids=ids[s], seed=5)
        for s in (slice(0, 2), slice(2, 7))
    ]
    _close(torch.cat([p.sigma for p in parts]), full.sigma, rtol=1e-12)
    assert torch.equal(torch.cat([p.n_iter for p in parts]), full.n_iter)
    perm = torch.tensor([6, 0, 5, 1, 4, 2, 3])
    shuffled = lanczos_operator_norm(model, x[perm], rtol=1e-3, sample_ids=ids[perm], seed=5)
    _close(shuffled.sigma, full.sigma[perm], rtol=1e-12)


def test_lanczos_max_iter_gives_lower_bound_and_warns():
    model = _mlp(k=12)
    x, _ = _data(MLP_SHAPE, 4, 12)
    exact = jacobian_norms(model, x).operator
    with pytest.warns(RuntimeWarning, match="did not reach"):
        res = lanczos_operator_norm(model, x, rtol=0.0, max_iter=2)
    assert not bool(res.converged.any())
    assert torch.equal(res.n_iter, torch.full((4,), 2))
    assert bool((res.sigma <= exact * (1 + 1e-12)).all())
    assert bool((res.sigma > 0).all())


def test_start_vectors_are_counter_based():
    a = start_vectors(3, [7, 8, 9], 5)
    b = start_vectors(3, [9, 7], 5)
    np.testing.assert_array_equal(a[[2, 0]], b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0)
    assert not np.allclose(start_vectors(4, [7], 5), a[:1])


# --------------------------------------------------------------------------------------------
# input space


def test_input_transform_chain_rule():
    model = _cnn()
    mean = torch.tensor([0.45, 0.5], dtype=F64).reshape(1, 2, 1, 1)
    std = torch.tensor([0.2, 0.25], dtype=F64).reshape(1, 2, 1, 1)

    def standardize(x):
        return (x - mean) / std

    g = torch.Generator().manual_seed(2)
    raw = torch.rand((4, *CNN_SHAPE), generator=g, dtype=F64)
    y = torch.randint(0, 5, (4,), generator=g)
    j_raw = input_jacobian(model, raw, input_transform=standardize)
    j_std = input_jacobian(model, standardize(raw))
    inv_std = (1.0 / std).expand(1, *CNN_SHAPE).reshape(1, 1, -1)
    _close(j_raw, j_std * inv_std)  # J_raw = J_std diag(1/std)
    ref = _reference_jacobians(model, raw, y, transform=standardize)
    op, fro = _both(model, raw, y, input_transform=standardize)
    _close(op, torch.linalg.matrix_norm(ref, ord=2))
    _close(fro, torch.linalg.matrix_norm(ref))
    lz = compute_metric(
        model, raw, y, metric="jacobian_operator", method="lanczos", input_transform=standardize
    )
    _close(lz, op, rtol=1e-6)
    # forward-only metrics see T(x) too
    _close(
        compute_metric(model, raw, y, metric="cross_entropy", input_transform=standardize),
        compute_metric(model, standardize(raw), y, metric="cross_entropy"),
    )


def test_input_transform_on_linear_model():
    model, w = _linear_with_singular_values([4.0, 2.0, 1e-2])
    scale = torch.linspace(0.5, 3.0, 48, dtype=F64)

    def transform(x):
        return x * scale.reshape(3, 4, 4)

    x, y = _data((3, 4, 4), 3, 3)
    op, fro = _both(model, x, y, input_transform=transform)
    expected = w * scale  # J = W diag(scale)
    _close(op, torch.linalg.matrix_norm(expected, ord=2).expand(3))
    _close(fro, torch.linalg.matrix_norm(expected).expand(3))


# --------------------------------------------------------------------------------------------
# forward-only metrics


def test_forward_metrics():
    model = _mlp()
    x, y = _data(MLP_SHAPE, 9, 6)
    z = model(x).detach()
    acc = compute_metric(model, x, y, metric="accuracy")
    assert acc.dtype == F64
    assert set(acc.tolist()) <= {0.0, 1.0}
    _close(acc, (z.argmax(1) == y).double(), rtol=0.0)
    y_hit = z.argmax(1)
    _close(compute_metric(model, x, y_hit, metric="accuracy"), torch.ones(9, dtype=F64))
    ce = compute_metric(model, x, y, metric="cross_entropy")
    _close(ce, torch.logsumexp(z, 1) - z[torch.arange(9), y])
    conf = compute_metric(model, x, y, metric="confidence")
    p = torch.softmax(z, 1)
    expected = torch.sqrt((p**2).sum(1) - 2 * p[torch.arange(9), y] + 1)
    _close(conf, expected)


def test_all_metrics_return_one_value_per_example():
    model = _cnn()
    x, y = _data(CNN_SHAPE, 3, 5)
    for metric in METRICS:
        out = compute_metric(model, x, y, metric=metric)
        assert out.shape == (3,)
        assert out.dtype == F64


# --------------------------------------------------------------------------------------------
# user input errors


def test_user_input_errors():
    model = _mlp()
    x, y = _data(MLP_SHAPE, 3, 6)
    bad = [
        dict(metric="jacobian"),
        dict(metric="jacobian_operator", normalization="jacobian"),
        dict(metric="jacobian_operator", normalization="crossentropy", target_only=True),
        dict(metric="jacobian_frobenius", method="lanczos"),
        dict(metric="jacobian_operator", method="power"),
        dict(metric="accuracy", normalization="softmax"),
    ]
    for kw in bad:
        with pytest.raises(UserInputError):
            compute_metric(model, x, y, **kw)
    with pytest.raises(UserInputError, match="required"):
        compute_metric(model, x, None, metric="accuracy")
    with pytest.raises(UserInputError, match="labels"):
        compute_metric(model, x, y[:2], metric="jacobian_operator", target_only=True)
    with pytest.raises(UserInputError, match=r"\[0, 6\)"):
        compute_metric(model, x, y + 6, metric="cross_entropy")
    with pytest.raises(UserInputError, match="max_iter"):
        lanczos_operator_norm(model, x, max_iter=0)
    model.train()
    with pytest.raises(UserInputError, match="eval"):
        compute_metric(model, x, y, metric="jacobian_operator")


def test_empty_batch_and_bad_model_output():
    model = _cnn()
    x, y = _data(CNN_SHAPE, 0, 5)
    for metric in METRICS:
        assert compute_metric(model, x, y, metric=metric).shape == (0,)
    for normalization, target_only in OUTPUT_MAPS:
        kw = dict(normalization=normalization, target_only=target_only)
        assert input_jacobian(model, x, y, **kw).shape[::2] == (0, 2 * 6 * 6)
        assert jacobian_norms(model, x, y, **kw).operator.shape == (0,)
    flat = nn.Sequential(nn.Flatten(0)).eval()  # returns a vector, not (n, K) logits
    x, y = _data(MLP_SHAPE, 2, 5)
    with pytest.raises(UserInputError, match="logits"):
        compute_metric(flat, x, None, metric="jacobian_operator")


def test_gram_norms_wide_and_tall():
    g = torch.Generator().manual_seed(0)
    for shape in [(4, 3, 8), (4, 8, 3), (2, 1, 5)]:
        m = torch.randn(shape, generator=g, dtype=F64)
        norms = gram_norms(m)
        _close(norms.operator, torch.linalg.matrix_norm(m, ord=2))
        _close(norms.frobenius, torch.linalg.matrix_norm(m))
    _close(gram_norms(torch.zeros(2, 3, 4, dtype=F64)).operator, torch.zeros(2, dtype=F64))
    left = torch.randn(4, 5, 3, generator=g, dtype=F64) * 1e-30  # below float32's range
    jac = torch.randn(4, 3, 8, generator=g, dtype=F64)
    norms = gram_norms(jac.float(), left)
    product = left @ jac.float().double()
    _close(norms.operator, torch.linalg.matrix_norm(product, ord=2))
    _close(norms.frobenius, torch.linalg.matrix_norm(product))
