"""Throughput of per-example input-Jacobian operator norms on CIFAR-shaped resnet18_k.

Usage::

    python benchmarks/jacobian.py [--small] [--examples N] [--batch-size B] [--k 16]

Methods, all on the same eval-mode float32 model and the same inputs, in one process:

* ``ours exact``: :func:`curvlake.pipelines.jacobian_stats.metrics.compute_metric` with
  ``metric='jacobian_operator'``: one forward, one vmapped input-only backward pass with the K
  one-hot cotangents, then sigma_max from the K x K Gram matrix (float64 eigvalsh). Also run with
  ``channels_last=False`` to show what the NHWC layout contributes, without the input-gradient
  conv2d (``stock conv backward``: vmap's own rule, which copies an expanded dummy input), and
  with ``method='lanczos'``.
* ``seed (anchor)``: the reference code's default path (magamba/overparameterization,
  ``core/metric_helpers.py``), reimplemented here: the input and all parameters require grad,
  one forward, then K separate ``backward(retain_graph=True)`` calls seeded with a rolled one-hot
  mask (parameter gradients are computed and accumulated every time), the rows copied into an
  (N, C, H, W, K) tensor, then its batched power iteration (10 steps, absolute tolerance 1e-2,
  the same reshape ``J.view(N, -1, J.shape[2])``). The reshape is wrong (it is the research
  notes' bug 1) but costs the same as a correct one; its error column shows the consequence.
* ``autograd.functional.jacobian``: ``torch.autograd.functional.jacobian`` on one example at a
  time plus ``torch.linalg.matrix_norm(ord=2)``; also the accuracy oracle.

Throughput is the best of ``--repeats`` interleaved runs (wall clock; CPU time is printed too,
as other processes may share the cores). The error column is the largest relative deviation
from the oracle over the oracle's examples.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as torch_f
from torch import Tensor, nn

from curvlake.pipelines.jacobian_stats import metrics
from curvlake.pipelines.jacobian_stats.metrics import compute_metric

NUM_CLASSES = 10
INPUT_SHAPE = (3, 32, 32)


# --------------------------------------------------------------------------------------------
# model


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.downsample = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(torch_f.relu(self.conv1(x)))
        return torch_f.relu(out + (x if self.downsample is None else self.downsample(x)))


class _LocalResNet18K(nn.Module):
    """CIFAR ResNet18 of width k without BatchNorm (Nakkiran et al. 2019; the seed's model)."""

    def __init__(self, k: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, k, 3, 1, 1)
        blocks, cin = [], k
        for stage, width in enumerate((k, 2 * k, 4 * k, 8 * k)):
            for i in range(2):
                blocks.append(_Block(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(8 * k, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(torch_f.relu(self.conv1(x)))
        return self.fc(torch_f.adaptive_avg_pool2d(x, 1).flatten(1))


def build(k: int) -> tuple[nn.Module, str]:
    try:
        from curvlake.nn.models import build_model

        model = build_model("resnet18_k", num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE, k=k)
        source = "curvlake.nn.models.build_model('resnet18_k')"
    except ImportError:
        model, source = _LocalResNet18K(k), "local definition in benchmarks/jacobian.py"
    return model.eval(), source


# --------------------------------------------------------------------------------------------
# the seed's method (anchor)


def _seed_low_mem_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    k = logits.shape[1]
    jac = torch.zeros((*x.shape, k), dtype=x.dtype)
    mask = torch.zeros_like(logits)
    mask[:, 0] = 1.0
    for dim in range(k):
        logits.backward(gradient=mask, retain_graph=True)
        jac[..., -dim] = x.grad
        x.grad.zero_()
        mask = torch.roll(mask, shifts=1, dims=1)
    return jac


def _seed_spectral_norm(jac: Tensor, num_steps: int, atol: float, gen: torch.Generator) -> Tensor:
    jac = jac.view(jac.shape[0], -1, jac.shape[2])  # the seed's reshape (wrong for 5-D J)
    n, k = jac.shape[0], jac.shape[2]
    idx = torch.arange(n)
    v = torch.randn(n, k, 1, generator=gen, dtype=jac.dtype)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    sigma_prev = torch.zeros(n, dtype=jac.dtype)
    for _ in range(num_steps):
        u = torch.bmm(jac, v)
        u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
        v = jac.transpose(1, 2) @ u
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
        sigma = torch.bmm(torch.bmm(jac, v).transpose(1, 2), u).reshape(-1)
        moving = (sigma - sigma_prev[idx]).abs() >= atol
        if not bool(moving.any()):
            break
        sigma_prev[idx[moving]] = sigma[moving]
        u, v, jac, idx = u[moving], v[moving], jac[moving], idx[moving]
    return sigma_prev


def seed_operator_norm(model: nn.Module, x: Tensor, gen: torch.Generator) -> Tensor:
    for p in model.parameters():  # the seed never turns parameter gradients off
        p.requires_grad_(True)
    return _seed_spectral_norm(_seed_low_mem_jacobian(model, x), 10, 1e-2, gen)


def functional_operator_norm(model: nn.Module, x: Tensor) -> Tensor:
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], xi)
        out.append(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# timing


def _run(fn: Callable[[Tensor], Tensor], batches: list[Tensor]) -> tuple[Tensor, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    values = torch.cat([fn(b).detach().double() for b in batches])
    return values, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a quick run (16 examples)")
    ap.add_argument("--examples", type=int, default=None, help="examples per method")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--oracle-examples", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--k", type=int, default=16, help="resnet18_k width")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--logit-scale",
        type=float,
        default=2000.0,
        help="multiply the last linear layer by this (default 2000: sigma ~ 10 as after training; "
        "1 keeps the init, sigma ~ 0.006, where the seed returns 0)",
    )
    ap.add_argument("--lanczos-examples", type=int, default=None, help="0 skips the Lanczos row")
    args = ap.parse_args()
    n = args.examples or (16 if args.small else 64)
    batch = args.batch_size or (8 if args.small else 32)
    n_oracle = args.oracle_examples or (4 if args.small else 8)
    repeats = args.repeats or (1 if args.small else 3)
    n_lanczos = (
        min(n, 8 if args.small else 16) if args.lanczos_examples is None else args.lanczos_examples
    )
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, source = build(args.k)
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last_linear.weight.mul_(args.logit_scale)
        if last_linear.bias is not None:
            last_linear.bias.mul_(args.logit_scale)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((n, *INPUT_SHAPE), generator=gen)  # standardized-scale inputs
    batches = list(x.split(batch))
    seed_gen = torch.Generator()

    def seed_fn(b: Tensor) -> Tensor:
        return seed_operator_norm(model, b, seed_gen)

    def stock_conv_backward(b: Tensor) -> Tensor:
        # Ablation: without the input-gradient-only conv2d (vmap's own conv backward rule).
        real = metrics.input_gradient_convolutions
        metrics.input_gradient_convolutions = contextlib.nullcontext
        try:
            return compute_metric(model, b, metric="jacobian_operator")
        finally:
            metrics.input_gradient_convolutions = real

    methods: dict[str, tuple[Callable[[Tensor], Tensor], list[Tensor], int]] = {
        "ours exact (vmap VJP + Gram)": (
            lambda b: compute_metric(model, b, metric="jacobian_operator"),
            batches,
            n,
        ),
        "ours exact, NCHW layout": (
            lambda b: compute_metric(model, b, metric="jacobian_operator", channels_last=False),
            batches,
            n,
        ),
        "ours exact, stock conv backward": (stock_conv_backward, batches, n),
        "seed (anchor): K backward + power it.": (seed_fn, batches, n),
        "autograd.functional.jacobian / ex.": (
            lambda b: functional_operator_norm(model, b),
            [x[:n_oracle]],
            n_oracle,
        ),
    }
    if n_lanczos > 0:
        methods["ours Lanczos (rtol 1e-6)"] = (
            lambda b: compute_metric(model, b, metric="jacobian_operator", method="lanczos"),
            list(x[:n_lanczos].split(batch)),
            n_lanczos,
        )

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()}"
    )
    print(
        f"model: resnet18_{args.k} ({source}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, float32, eval; "
        f"last layer x{args.logit_scale:g}; {n} examples in batches of {batch} "
        f"(Lanczos {n_lanczos}, oracle {n_oracle}), best of {repeats}"
    )
    for fn, bs, _ in methods.values():  # warm-up (allocator, oneDNN primitives)
        fn(bs[0][:2])

    best: dict[str, tuple[float, float]] = {}
    values: dict[str, Tensor] = {}
    for _ in range(repeats):
        seed_gen.manual_seed(2)
        for name, (fn, bs, _) in methods.items():
            vals, wall, cpu = _run(fn, bs)
            values[name] = vals
            w0, c0 = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(w0, wall), min(c0, cpu))
    for p in model.parameters():
        p.grad = None

    oracle = values["autograd.functional.jacobian / ex."][:n_oracle]
    print(f"operator norms (oracle): median {float(oracle.median()):.4g}")
    anchor = "seed (anchor): K backward + power it."
    anchor_wall, anchor_cpu = (best[anchor][i] / n for i in range(2))
    header = (
        f"{'method':40s} {'ex/s':>8s} {'ms/ex':>8s} {'CPU ms/ex':>10s} "
        f"{'vs seed':>8s} {'(CPU)':>7s} {'max rel err':>12s}"
    )
    print(header)
    print("-" * len(header))
    for name, (_, _, count) in methods.items():
        wall, cpu = (t / count for t in best[name])
        err = float(((values[name][:n_oracle] - oracle).abs() / oracle).max())
        print(
            f"{name:40s} {1 / wall:8.1f} {wall * 1e3:8.2f} {cpu * 1e3:10.2f} "
            f"{anchor_wall / wall:7.2f}x {anchor_cpu / cpu:6.2f}x {err:12.2e}"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
