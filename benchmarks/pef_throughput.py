"""D-PEF throughput: curvlake's kernel vs BackPACK ``BatchDiagGGNExact`` vs a per-example loop.

Usage: ``python benchmarks/pef_throughput.py [--small] [--threads N]``

All three compute the same thing, the diagonal per-example Fisher
``f(x) = Σ_c p_c (∇_θ log p_c)²`` in float32 on CPU, for every example of a batch:

* ``curvlake``: :func:`curvlake.pipelines.npeff.pefs.per_example_fisher_diag` (``backend="auto"``,
  i.e. the layerwise closed forms for these Linear/Conv models), one batch of ``n`` examples;
* ``backpack``: BackPACK's per-sample exact diagonal GGN of ``CrossEntropyLoss(reduction="sum")``
  (equal to the D-PEF) on the same batch, if ``backpack-for-pytorch`` is installed;
* ``loop``: one autograd backward per class per example (the reference implementation's scheme
  without vectorisation), and ``func``: curvlake's generic ``torch.func`` back-end (the fallback
  for models with other parameterised layers), both timed once on the first ``n_loop`` examples.

Models: an MLP and a small CNN on digits-sized (1x8x8) and CIFAR-shaped (3x32x32) inputs, 10
classes, random weights and inputs. Throughput is examples per second (best of ``repeats``,
curvlake and BackPACK interleaved so that load spikes on a shared machine hit both); ratios are
curvlake's throughput over the anchor's. ``max rel err`` is the largest deviation of BackPACK and
the loop from curvlake, relative to max |D-PEF|.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from curvlake.pipelines.npeff.pefs import per_example_fisher_diag

try:
    from backpack import backpack, extend
    from backpack.extensions import BatchDiagGGNExact

    HAS_BACKPACK = True
except ImportError:  # optional anchor
    HAS_BACKPACK = False

N_CLASSES = 10


def make_mlp(shape: tuple[int, int, int]) -> nn.Module:
    d = shape[0] * shape[1] * shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, N_CLASSES),
    )


def make_cnn(shape: tuple[int, int, int]) -> nn.Module:
    c, h, w = shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), N_CLASSES),
    )


def best_times(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` wall time of each function, interleaved so load spikes hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def backpack_dpef(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample diag GGN of the summed cross-entropy; the label does not enter the exact GGN."""
    bp_model = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    y = torch.zeros(x.shape[0], dtype=torch.long)

    def run() -> torch.Tensor:
        bp_model.zero_grad()
        loss = loss_fn(bp_model(x), y)
        with backpack(BatchDiagGGNExact()):
            loss.backward()
        return torch.cat(
            [p.diag_ggn_exact_batch.reshape(x.shape[0], -1) for p in bp_model.parameters()], 1
        )

    return run


def loop_dpef(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        log_p = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0]
        p = log_p.detach().exp()
        row = torch.zeros(sum(q.numel() for q in params))
        for c in range(log_p.shape[0]):
            grads = torch.autograd.grad(log_p[c], params, retain_graph=c + 1 < log_p.shape[0])
            row += p[c] * torch.cat([g.reshape(-1) for g in grads]).square()
        rows.append(row)
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer examples and repeats")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n, n_loop, repeats = (64, 8, 3) if args.small else (256, 32, 5)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, n={n}, loop n={n_loop}")
    header = (
        f"{'model':<14}{'P':>9} {'curvlake/s':>11} {'func/s':>9} {'backpack/s':>11} "
        f"{'loop/s':>9} {'x backpack':>11} {'x loop':>8} {'max rel err':>12}"
    )
    print(header)
    print("-" * len(header))
    for shape_name, shape in (("digits", (1, 8, 8)), ("cifar", (3, 32, 32))):
        for arch, make in (("mlp", make_mlp), ("cnn", make_cnn)):
            model = make(shape).eval()
            n_params = sum(p.numel() for p in model.parameters())
            x = torch.randn(n, *shape)
            ours = per_example_fisher_diag(model, x, batch_size=n)
            fns = {"ours": lambda model=model, x=x: per_example_fisher_diag(model, x, batch_size=n)}
            errs = []
            if HAS_BACKPACK:
                fns["backpack"] = run_bp = backpack_dpef(model, x)
                errs.append(((run_bp() - ours).abs().max() / ours.abs().max()).item())
            t = best_times(fns, repeats)
            t_ours = t["ours"]
            if HAS_BACKPACK:
                bp_rate = f"{n / t['backpack']:11.0f}"
                x_bp = f"{t['backpack'] / t_ours:10.2f}x"
            else:
                bp_rate, x_bp = f"{'n/a':>11}", f"{'n/a':>11}"
            # The slow anchors (loop, generic torch.func back-end) run once on fewer examples.
            xl = x[:n_loop]
            t_slow = best_times(
                {
                    "loop": lambda xl=xl, model=model: loop_dpef(model, xl),
                    "func": lambda xl=xl, model=model: per_example_fisher_diag(
                        model, xl, batch_size=n_loop, backend="func"
                    ),
                },
                1,
            )
            errs.append(
                ((loop_dpef(model, xl) - ours[:n_loop]).abs().max() / ours.abs().max()).item()
            )
            loop_rate, func_rate = n_loop / t_slow["loop"], n_loop / t_slow["func"]
            print(
                f"{arch + '-' + shape_name:<14}{n_params:>9} {n / t_ours:11.0f} {func_rate:9.0f} "
                f"{bp_rate} {loop_rate:9.1f} {x_bp} {(n / t_ours) / loop_rate:7.1f}x "
                f"{max(errs):12.1e}"
            )


if __name__ == "__main__":
    main()
