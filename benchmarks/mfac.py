"""M-FAC benchmarks: inverse-Fisher products and window updates vs the seed's algorithm and dense
inversion, optimizer step cost and training curves, out-of-core products, one-shot pruning.

Sections (all ratios are measured in the same process and run):

1. ``ihvp``: for a window of m float32 gradients of d parameters, the seed's dynamic algorithm
   (``HInvFastUpMulti`` of IST-DASLab/M-FAC, re-implemented below on its CPU path, float32 as
   the seed: the m × m LU without pivoting, the row recursion of the coefficients, the forward
   substitution of ``mul``; the LU itself is done by LAPACK, through the Cholesky factor of the
   SPD matrix, which only makes the anchor faster) against ``InverseFisher`` (Woodbury /
   Cholesky, float64 m × m algebra) and a dense float64 Cholesky solve of the d × d Fisher:
   setup, one IHVP, and one window update (replace a gradient and apply F⁻¹ to it: the seed's
   ``update_mul`` against one ``MFAC.step``), with the error of each against the dense solve.
2. ``optimizer``: one step of SGD, Adam and MFAC on the same CNN and batch, with the time of two
   passes over the window (``G g`` and ``Gᵀ c``) that an M-FAC step needs at least.
3. ``curves``: SGD vs Adam vs MFAC training the digits CNN (test accuracy and training loss per
   epoch, PNG next to this file).
4. ``ooc``: a window stored in Zarr that is at least 3x the memory limit of the Dask workers
   together; ``InverseFisher`` over the Dask array: an IHVP and the diagonal, with the workers'
   peak RSS and the time per m·d.
5. ``prune``: one-shot pruning of a trained digits CNN at 50/70/90 %, M-FAC vs magnitude.

    python benchmarks/mfac.py            # the sizes of benchmarks/RESULTS.md
    python benchmarks/mfac.py --small    # a quick pass (about a minute)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import scipy.linalg

from curvlake.pipelines.mfac import InverseFisher

if TYPE_CHECKING:
    import torch

    from curvlake.pipelines.mfac import MFAC

# torch is imported where it is used: the out-of-core section's Dask worker processes re-import
# this script, and must stay within their memory limit (torch alone takes about 200 MiB).

MiB = 2**20
HERE = Path(__file__).resolve().parent


def timed(function, *args, repeat: int = 1):
    """(result, median seconds over ``repeat`` calls)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def interleaved(first, second, repeat: int):
    """Median seconds of ``first()`` and ``second()`` called alternately ``repeat`` times each
    (on a shared machine both then see the same load), and their last results."""
    times: tuple[list[float], list[float]] = ([], [])
    results = [None, None]
    for _ in range(repeat):
        for k, function in enumerate((first, second)):
            start = time.perf_counter()
            results[k] = function()
            times[k].append(time.perf_counter() - start)
    return results[0], float(np.median(times[0])), results[1], float(np.median(times[1]))


def relative(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- 1. the seed's dynamic algorithm (anchor) ----------------------------------------------------


class SeedDynamicInverse:
    """The seed's ``HInvFastUpMulti`` on its CPU path (float32, as the seed keeps its m × m
    matrices in the gradients' dtype), from research/mfac.md §1:

    * ``setup``: ``giHig`` = U of the LU without pivoting of ``K' = GGᵀ/λ + mI``, minus m on
      the diagonal (= D, ``D_ij = g_iᵀ F_{i-1}⁻¹ g_j``); ``denom = m + diag(D)``;
      ``coef`` = B by the row recursion ``B_i = Σ_{k<i} T_ik B_k`` (+ λ⁻¹ on the diagonal),
      ``T_ik = −D_ki / denom_k``, recomputed from row ``last`` on (earlier rows do not change);
    * ``mul``: ``q = λ⁻¹ G x``, forward substitution ``q_i -= D_{i-1,i:} q_{i-1}/denom_{i-1}``
      row by row, ``F⁻¹x = λ⁻¹ x − Gᵀ((q / denom) B)``;
    * ``update_mul(g)``: overwrite slot ``last``, refresh row and column ``last`` of GGᵀ, redo
      the setup, multiply g (reusing ``G g``), advance ``last``.
    """

    def __init__(self, grads: torch.Tensor, damp: float):
        import torch

        self.torch = torch
        self.grads = grads
        self.m = grads.shape[0]
        self.lambd = 1.0 / damp
        self.dots = grads @ grads.T
        self.last = 0
        self.setup(start=1)

    def setup(self, start: int) -> None:
        torch, m = self.torch, self.m
        kernel = self.lambd * self.dots + m * torch.eye(m, dtype=self.dots.dtype)
        # LU without pivoting of an SPD matrix: U = diag(C) Cᵀ from its Cholesky factor C.
        factor = torch.linalg.cholesky(kernel)
        upper = torch.diagonal(factor)[:, None] * factor.T
        self.giHig = torch.triu(upper - m * torch.eye(m, dtype=upper.dtype))
        self.denom = m + torch.diagonal(self.giHig)
        tmp = -self.giHig.T.contiguous() / self.denom.reshape((1, -1))
        if not hasattr(self, "coef"):
            self.coef = self.lambd * torch.eye(m, dtype=self.dots.dtype)
        for i in range(max(start, 1), m):
            self.coef[i, :i] = tmp[i, :i] @ self.coef[:i, :i]

    def mul(self, x: torch.Tensor, dots: torch.Tensor | None = None) -> torch.Tensor:
        gihix = self.lambd * (self.grads @ x if dots is None else dots)
        for i in range(1, self.m):
            gihix[i:] -= self.giHig[i - 1, i:] * (gihix[i - 1] / self.denom[i - 1])
        return self.lambd * x - self.grads.T @ ((gihix / self.denom) @ self.coef)

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        last = self.last
        self.grads[last] = g
        row = self.grads @ g
        self.dots[last, :] = row
        self.dots[:, last] = row
        self.setup(start=last)
        self.last = (last + 1) % self.m
        return self.mul(g, dots=row.clone())


def _dense_solve(grads: np.ndarray, damp: float, rhs: np.ndarray) -> np.ndarray:
    """F⁻¹ rhs by a dense float64 Cholesky solve of F = λI + GᵀG/m (d × d)."""
    fisher = grads.T @ grads / grads.shape[0]
    fisher[np.diag_indices(grads.shape[1])] += damp
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(fisher), rhs)


def _fill_window(opt: MFAC, window: np.ndarray) -> None:
    """Make the optimizer's window ``window`` (full, next slot 0) through its state_dict:
    filling it step by step would factor a growing c × c matrix at every step."""
    import torch

    state = opt.state_dict()
    g = torch.from_numpy(window)
    counters = {"count": len(window), "slot": 0, "since_refresh": 0}
    gram = g.double() @ g.double().T
    state["mfac"] = {
        **state["mfac"],
        "window": g.clone(),
        "gram": gram,
        "inverse": None,
        **counters,
    }
    opt.load_state_dict(state)


def _full_mfac(window: np.ndarray, damp: float) -> tuple[MFAC, torch.nn.Parameter]:
    """An MFAC optimizer (lr 1) over one flat parameter θ = 0 with a full window."""
    import torch

    from curvlake.pipelines.mfac import MFAC

    param = torch.nn.Parameter(torch.zeros(window.shape[1]))
    opt = MFAC([param], lr=1.0, ngrads=window.shape[0], damp=damp)
    _fill_window(opt, window)
    return opt, param


def bench_ihvp(sizes: list[int], d: int, damp: float) -> list[dict]:
    import torch

    rows = []
    for m in sizes:
        rng = np.random.default_rng([0, m, d])
        window = (rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)
        x = rng.standard_normal(d)
        g_new = (rng.standard_normal(d) / np.sqrt(d)).astype(np.float32)
        g64 = window.astype(np.float64)
        exact, t_dense = timed(_dense_solve, g64, damp, x)
        window_t, x32 = torch.from_numpy(window.copy()), torch.from_numpy(x.astype(np.float32))
        inv, t_setup, anchor, t_seed_setup = interleaved(
            lambda: InverseFisher(window, damp),  # noqa: B023 (called at once)
            lambda: SeedDynamicInverse(window_t, damp),  # noqa: B023
            repeat=3 if m < 4096 else 1,
        )
        ours, t_ihvp, seed, t_seed_ihvp = interleaved(
            lambda: inv @ x,  # noqa: B023
            lambda: anchor.mul(x32),  # noqa: B023
            repeat=7,
        )
        # window update: g_new replaces slot 0, then F⁻¹ g_new of the new window
        replaced = g64.copy()
        replaced[0] = g_new
        exact_update = _dense_solve(replaced, damp, g_new.astype(np.float64))
        seed_update, t_seed_update = timed(anchor.update_mul, torch.from_numpy(g_new))
        opt, param = _full_mfac(window, damp)  # its next slot is 0
        param.grad = torch.from_numpy(g_new)
        start = time.perf_counter()
        opt.step()  # the first step after loading also refreshes K⁻¹ (once every m steps)
        t_refresh_step = time.perf_counter() - start
        ours_update = -param.detach().double().numpy()  # lr 1 from θ = 0: θ = −F⁻¹ g_new
        steps = []
        for k in range(1, 6):  # slots 1..5: rank-one updates of K⁻¹, no refresh due
            param.grad = torch.from_numpy(window[k].copy())
            start = time.perf_counter()
            opt.step()
            steps.append(time.perf_counter() - start)
        rows.append(
            {
                "m": m,
                "d": d,
                "dense_s": t_dense,
                "setup_s": t_setup,
                "seed_setup_s": t_seed_setup,
                "ihvp_s": t_ihvp,
                "seed_ihvp_s": t_seed_ihvp,
                "update_s": float(np.median(steps)),
                "refresh_s": t_refresh_step,
                "seed_update_s": t_seed_update,
                "ihvp_err": relative(ours, exact),
                "seed_ihvp_err": relative(seed.double().numpy(), exact),
                "update_err": relative(ours_update, exact_update),
                "seed_update_err": relative(seed_update.double().numpy(), exact_update),
            }
        )
        print(_ihvp_row(rows[-1]), flush=True)
    return rows


IHVP_HEADER = (
    f"{'m':>5s} {'d':>6s} | {'setup s':>8s} {'seed':>8s} {'ratio':>6s} | {'IHVP ms':>8s} "
    f"{'seed':>8s} {'ratio':>6s} | {'update ms':>9s} {'seed':>9s} {'ratio':>7s} "
    f"{'+refresh ms':>11s} | {'dense s':>7s} | {'err IHVP':>8s} {'seed':>8s} "
    f"{'err upd':>8s} {'seed':>8s}"
)


def _ihvp_row(r: dict) -> str:
    return (
        f"{r['m']:5d} {r['d']:6d} | {r['setup_s']:8.3f} {r['seed_setup_s']:8.3f} "
        f"{r['seed_setup_s'] / r['setup_s']:5.1f}x | {1e3 * r['ihvp_s']:8.2f} "
        f"{1e3 * r['seed_ihvp_s']:8.2f} {r['seed_ihvp_s'] / r['ihvp_s']:5.1f}x | "
        f"{1e3 * r['update_s']:9.2f} {1e3 * r['seed_update_s']:9.1f} "
        f"{r['seed_update_s'] / r['update_s']:6.0f}x {1e3 * r['refresh_s']:11.1f} | "
        f"{r['dense_s']:7.2f} | {r['ihvp_err']:8.1e} {r['seed_ihvp_err']:8.1e} "
        f"{r['update_err']:8.1e} {r['seed_update_err']:8.1e}"
    )


# -- 2. optimizer step cost ----------------------------------------------------------------------


def bench_optimizer(k: int, m: int, steps: int) -> dict:
    import torch

    from curvlake.nn.datasets import load_splits
    from curvlake.nn.models import build_model
    from curvlake.pipelines.mfac import MFAC

    splits = load_splits("digits")
    x = torch.as_tensor(splits.train.x[:64], dtype=torch.float32)
    y = torch.as_tensor(splits.train.y[:64])
    out = {"k": k, "m": m}

    def model_and(opt_factory):
        torch.manual_seed(0)
        model = build_model("cnn5_k", num_classes=10, input_shape=splits.input_shape, k=k)
        return model, opt_factory(list(model.parameters()))

    def backward(model):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    factories = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "mfac": lambda p: MFAC(p, lr=1e-3, ngrads=m, damp=1e-4),
    }
    for name, factory in factories.items():
        model, opt = model_and(factory)
        if name == "mfac":
            d = sum(p.numel() for p in model.parameters())
            out["d"] = d
            rng = np.random.default_rng(1)
            _fill_window(opt, (rng.standard_normal((m, d)) * 1e-2).astype(np.float32))
            backward(model)
            opt.step()  # refreshes K⁻¹ after loading
        t_back, t_step = [], []
        for _ in range(steps):
            start = time.perf_counter()
            backward(model)
            middle = time.perf_counter()
            opt.step()
            t_back.append(middle - start)
            t_step.append(time.perf_counter() - middle)
        out[f"{name}_backward_s"] = float(np.median(t_back))
        out[f"{name}_step_s"] = float(np.median(t_step))
    window = torch.randn(m, out["d"])
    vector, coefficients = torch.randn(out["d"]), torch.randn(m)

    def two_passes():
        return window @ vector, window.T @ coefficients

    _, out["two_passes_s"] = timed(two_passes, repeat=steps)
    return out


def print_optimizer(r: dict) -> None:
    print(
        f"cnn5_k k={r['k']} ({r['d']} parameters), batch 64, MFAC window m={r['m']} "
        f"({r['m'] * r['d'] * 4 / MiB:.0f} MiB float32); medians over steps"
    )
    print(f"{'optimizer':>9s} {'fwd+bwd ms':>10s} {'step ms':>8s} {'total ms':>9s} {'vs SGD':>7s}")
    base = r["sgd_backward_s"] + r["sgd_step_s"]
    for name in ("sgd", "adam", "mfac"):
        total = r[f"{name}_backward_s"] + r[f"{name}_step_s"]
        print(
            f"{name:>9s} {1e3 * r[f'{name}_backward_s']:10.2f} {1e3 * r[f'{name}_step_s']:8.2f} "
            f"{1e3 * total:9.2f} {total / base:6.2f}x"
        )
    print(
        f"two passes over the window (G g, Gᵀ c): {1e3 * r['two_passes_s']:.2f} ms; MFAC step / "
        f"two passes = {r['mfac_step_s'] / r['two_passes_s']:.2f}; MFAC step overhead vs SGD "
        f"step {1e3 * (r['mfac_step_s'] - r['sgd_step_s']):.2f} ms, vs Adam step "
        f"{1e3 * (r['mfac_step_s'] - r['adam_step_s']):.2f} ms per step"
    )


# -- 3. training curves --------------------------------------------------------------------------

CURVES = {
    "SGD (lr 0.2, momentum 0.9)": {"optimizer": "sgd", "lr": 0.2, "momentum": 0.9},
    "Adam (lr 3e-3)": {"optimizer": "adam", "lr": 0.003},
    "M-FAC (lr 0.03, m 128, damp 1e-2, momentum 0.5)": {
        "optimizer": "mfac",
        "lr": 0.03,
        "mfac": {"n_grads": 128, "damp": 1e-2, "momentum": 0.5},
    },
}


def bench_curves(lake, k: int, epochs: int) -> tuple[dict, dict]:
    from curvlake.pipelines.train import run_train

    base = {"model": "cnn5_k", "model_params": {"k": k}, "dataset": "digits", "epochs": epochs,
            "batch_size": 64, "device": "cpu", "seed": 0}  # fmt: skip
    runs, seconds = {}, {}
    for name, options in CURVES.items():
        start = time.perf_counter()
        runs[name] = run_train(lake, {**base, **options}, progress=False)
        seconds[name] = time.perf_counter() - start
    return runs, seconds


def print_and_plot_curves(lake, runs: dict, seconds: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    print(f"{'optimizer':>48s} {'s':>6s}  test accuracy by epoch (0, 2, 4, ...)   final loss")
    for name, run_id in runs.items():
        ds = lake.open(run_id)
        epochs = ds["epoch"].values
        accuracy = ds["test_accuracy"].values
        left.plot(epochs, accuracy, marker="o", label=name)
        right.plot(epochs[1:], ds["train_loss"].values[1:], marker="o", label=name)
        shown = " ".join(f"{v:.3f}" for v in accuracy[::2])
        print(f"{name:>48s} {seconds[name]:6.1f}  {shown}   {ds['train_loss'].values[-1]:.3f}")
    left.set_xlabel("epoch")
    left.set_ylabel("test accuracy")
    right.set_xlabel("epoch")
    right.set_ylabel("training loss")
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle("digits CNN (cnn5_k): SGD vs Adam vs M-FAC")
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


# -- 4. out of core ------------------------------------------------------------------------------


class PeakRss:
    """The largest RSS of some processes, sampled every 50 ms in a background thread."""

    def __init__(self, pids):
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for proc in self.procs:
                try:
                    self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _random_block(block, block_info=None):
    """Gradient-like random columns, counter-based per chunk (independent of the workers)."""
    index = block_info[None]["chunk-location"][-1]
    rng = np.random.default_rng([7, index])
    return (rng.standard_normal(block.shape, dtype=np.float32) * 1e-3).astype(block.dtype)


def _unit_columns(block, probes=(), block_info=None):
    """Columns e_j (j in ``probes``) of the identity, the rows of this block."""
    start, stop = block_info[None]["array-location"][0]
    block = np.zeros(block.shape, dtype=block.dtype)  # da.zeros blocks are read-only views
    for column, j in enumerate(probes):
        if start <= j < stop:
            block[j - start, column] = 1.0
    return block


def bench_out_of_core(tmp: str, sizes: list[tuple[int, int]], limit: str, chunk_mib: int):
    import dask.array as da
    import zarr
    from dask.utils import parse_bytes
    from distributed import Client, LocalCluster
    from zarr.codecs import Crc32cCodec

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=limit,
                           dashboard_address=None, silence_logs=logging.ERROR)  # fmt: skip
    client = Client(cluster)
    rows = []
    try:
        pids = list(client.run(os.getpid).values())
        client.run(_import_kernels)
        idle = max(psutil.Process(p).memory_info().rss for p in pids)
        total_limit = 2 * parse_bytes(limit)
        print(
            f"LocalCluster: 2 worker processes x 1 thread, memory_limit={limit} each "
            f"({total_limit / MiB:.0f} MiB together); idle worker RSS {idle / MiB:.0f} MiB "
            f"after importing the kernels; load average {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} CPUs"
        )
        for m, d in sizes:
            columns = max(1, chunk_mib * MiB // (4 * m))
            path = os.path.join(tmp, f"window_{m}_{d}.zarr")
            # stored as the lake stores gradients: uncompressed, crc32c-checksummed chunks
            store = zarr.create_array(path, shape=(m, d), chunks=(m, columns), dtype="float32",
                                      compressors=(Crc32cCodec(),), overwrite=True)  # fmt: skip
            template = da.zeros((m, d), chunks=(m, columns), dtype=np.float32)
            start = time.perf_counter()
            da.store(template.map_blocks(_random_block, dtype=np.float32), store, lock=False)
            t_write = time.perf_counter() - start
            window = da.from_zarr(path)
            # x (d,) generated on the workers, results written back to Zarr: nothing of size d
            # passes through the client
            x = da.zeros((d,), chunks=(columns,)).map_blocks(_random_block, dtype=np.float64)
            damp = 1e-4
            with PeakRss(pids) as monitor:
                start = time.perf_counter()
                inv = InverseFisher(window, damp)
                t_factor = time.perf_counter() - start
                start = time.perf_counter()
                da.to_zarr(inv @ x, os.path.join(tmp, "product.zarr"), overwrite=True)
                t_ihvp = time.perf_counter() - start
                start = time.perf_counter()
                da.to_zarr(inv.diagonal(), os.path.join(tmp, "diagonal.zarr"), overwrite=True)
                t_diag = time.perf_counter() - start
                # checks: F (F⁻¹x) = x with F v = λv + Gᵀ(Gv)/m applied matrix-free, and
                # the diagonal against F⁻¹ e_j (products, not the diagonal's own formula)
                product = da.from_zarr(os.path.join(tmp, "product.zarr"))
                back = damp * product + window.T @ (window @ product) / m
                residual = float(da.linalg.norm(back - x) / da.linalg.norm(x))
                probes = (0, d // 3, d - 1)
                units = da.zeros((d, len(probes)), chunks=(columns, -1)).map_blocks(
                    _unit_columns, probes=probes, dtype=np.float64
                )
                expected = np.diag((inv @ units)[list(probes)].compute())  # [F⁻¹]_jj
                diagonal = da.from_zarr(os.path.join(tmp, "diagonal.zarr"))[list(probes)]
            rows.append(
                {
                    "m": m,
                    "d": d,
                    "bytes": m * d * 4,
                    "x_limit": m * d * 4 / total_limit,
                    "chunk": columns,
                    "write_s": t_write,
                    "gram_s": t_factor,
                    "ihvp_s": t_ihvp,
                    "diag_s": t_diag,
                    "peak": monitor.peak,
                    "residual": residual,
                    # the low-rank part λ⁻¹ − [F⁻¹]_jj (the diagonal itself is ≈ λ⁻¹ when d ≫ m)
                    "diag_err": relative(1 / damp - diagonal.compute(), 1 / damp - expected),
                }
            )
            print(_ooc_row(rows[-1]), flush=True)
            shutil.rmtree(path)
    finally:
        client.close()
        cluster.close()
    return rows


def _import_kernels() -> None:
    import curvlake.pipelines.mfac.inverse_fisher  # noqa: F401


OOC_HEADER = (
    f"{'m':>4s} {'d':>9s} {'window':>8s} {'x limit':>7s} {'chunk cols':>10s} {'write s':>7s} "
    f"{'Gram+chol s':>11s} {'IHVP s':>6s} {'diag s':>6s} {'IHVP ns/(m·d)':>13s} "
    f"{'diag ns/(m·d)':>13s} {'peak worker RSS':>15s} {'F·F⁻¹x−x':>8s} {'diag err':>8s}"
)


def _ooc_row(r: dict) -> str:
    md = r["m"] * r["d"]
    return (
        f"{r['m']:4d} {r['d']:9d} {r['bytes'] / MiB:6.0f}Mi {r['x_limit']:7.1f} {r['chunk']:10d} "
        f"{r['write_s']:7.1f} {r['gram_s']:11.1f} {r['ihvp_s']:6.1f} {r['diag_s']:6.1f} "
        f"{1e9 * r['ihvp_s'] / md:13.2f} {1e9 * r['diag_s'] / md:13.2f} "
        f"{r['peak'] / MiB:12.0f} Mi {r['residual']:8.1e} {r['diag_err']:8.1e}"
    )


# -- 5. pruning ----------------------------------------------------------------------------------


def bench_prune(lake, run_id: str) -> None:
    from curvlake.pipelines.mfac.plot import pruning_table
    from curvlake.pipelines.mfac.prune import run_prune_oneshot

    variants = {
        "m=256 b=8 damp=1e-5 (defaults)": {},
        "m=256 b=8 damp=1e-4": {"damp": 1e-4},
        "m=256 b=8 damp=1e-3": {"damp": 1e-3},
        "m=256 b=8, 4 recomputations": {"recompute": 4},
        "m=256 b=8 damp=1e-3, 4 recomputations": {"damp": 1e-3, "recompute": 4},
        "m=1024 b=1 (per-example)": {"n_grads": 1024, "batch_size": 1},
        "blocked (B=512)": {"block_size": 512},
    }
    print(
        f"{'M-FAC variant':>38s} {'s':>5s} | test accuracy at 50 / 70 / 90 % (magnitude) | "
        "test loss (magnitude)"
    )
    dense = None
    for name, options in variants.items():
        start = time.perf_counter()
        pruning_id = run_prune_oneshot(lake, run_id, sparsities=(0.5, 0.7, 0.9), progress=False,
                                       **options)  # fmt: skip
        seconds = time.perf_counter() - start
        table = pruning_table(lake, pruning_id)
        dense = table["dense_accuracy"]
        cells = "  ".join(
            f"{row['accuracy']:.3f} ({row['baseline_accuracy']:.3f})" for row in table["rows"]
        )
        losses = "  ".join(
            f"{row['loss']:.3f} ({row['baseline_loss']:.3f})" for row in table["rows"]
        )
        better = all(row["accuracy"] >= row["baseline_accuracy"] for row in table["rows"])
        print(f"{name:>38s} {seconds:5.1f} | {cells} {'>=' if better else '< '} | {losses}")
    print(f"dense test accuracy {dense:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument(
        "--only", default="ihvp,optimizer,curves,ooc,prune", help="comma-separated sections"
    )
    args = parser.parse_args()
    sections = set(args.only.split(","))
    small = args.small
    import torch
    from threadpoolctl import threadpool_limits

    # One BLAS / torch thread on every side: on a shared machine, fewer threads than cores
    # keep the same-run ratios stable (the Dask workers of section 4 have one thread each).
    torch.set_num_threads(1)
    threadpool_limits(1)
    print(
        f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; {'--small' if small else 'full sizes'}\n"
    )
    tmp = tempfile.mkdtemp(prefix="mfac_bench_")
    try:
        from curvlake.lake import open_lake

        lake = open_lake(os.path.join(tmp, "lake"), create=True)
        if "ihvp" in sections:
            sizes, d = ([64, 256, 1024], 1024) if small else ([256, 1024, 4096], 4096)
            print(f"## 1. IHVP and window update (float32 window, damp 1e-4, d={d})")
            print(IHVP_HEADER)
            bench_ihvp(sizes, d, 1e-4)
            print()
        if "optimizer" in sections:
            print("## 2. optimizer step time")
            print_optimizer(bench_optimizer(8 if small else 16, 128 if small else 512, 10))
            print()
        runs = {}
        if "curves" in sections or ("prune" in sections and not small):
            print("## 3. training curves of the digits CNN")
            runs, seconds = bench_curves(lake, 4 if small else 8, 3 if small else 10)
            if "curves" in sections:
                print_and_plot_curves(lake, runs, seconds, HERE / "mfac_training_curves.png")
            print()
        if "ooc" in sections:
            print("## 4. out of core: IHVP and diagonal of a Zarr window through Dask")
            if small:
                sizes = [(32, 1 << 20), (32, 2 << 20), (64, 1 << 20)]
                limit, chunk = "256MiB", 4
            else:
                sizes = [(64, 3 << 20), (64, 6 << 20), (128, 3 << 20)]
                limit, chunk = "256MiB", 8
            print(OOC_HEADER)
            bench_out_of_core(tmp, sizes, limit, chunk)
            print()
        if "prune" in sections:
            if small:  # the quickstart CNN: the small curves are too short to train one
                from curvlake.pipelines.quickstart import CNN_CONFIG
                from curvlake.pipelines.train import run_train

                trained = run_train(lake, CNN_CONFIG, progress=False)
                what = "the quickstart CNN (cnn5_k k=4, Adam, 8 epochs)"
            else:
                trained = runs[next(name for name in CURVES if name.startswith("Adam"))]
                what = "the Adam-trained CNN of section 3 (cnn5_k k=8, 10 epochs)"
            print(f"## 5. one-shot pruning of {what}: {trained}")
            bench_prune(lake, trained)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
