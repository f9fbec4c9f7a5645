"""Out-of-core D-NPEFF: a Zarr-stored PEF matrix several times larger than worker memory.

The matrix is written with Zarr directly as CSR column blocks (one group per block: ``data``
float32, ``indices`` int32, ``indptr`` int64 — the column-block re-layout of the NPEFF study),
read lazily by :func:`curvlake.pipelines.npeff.nmf.dask_from_block_loader`, and factorized by
the Dask HALS solver on a ``LocalCluster`` of 2 single-threaded worker processes with a small
``memory_limit``. H is double-buffered into Zarr every iteration (the checkpoint path), W stays
on the client. Reported: stored size vs worker memory limit, seconds per iteration, and the
peak RSS of the worker processes (sampled with psutil every 50 ms), for several sizes — the
iteration time should grow linearly with nnz while the worker peak stays flat.

    python benchmarks/npeff_out_of_core.py            # 0.25, 0.5, 1 GiB of CSR, 320 MiB workers
    python benchmarks/npeff_out_of_core.py --small    # 32, 64, 128 MiB
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import psutil
import scipy.sparse as sp
import zarr
from distributed import Client, LocalCluster

from curvlake.pipelines.npeff.nmf import NmfConfig, dask_from_block_loader, iter_nmf_dask

MiB = 2**20


def write_blocks(path: str, n: int, n_blocks: int, width: int, density: float, seed: int):
    """Random non-negative heavy-tailed CSR column blocks, written block by block.

    Each row of a block gets ``density · width`` random columns (``default_rng([seed, b])``;
    the rare duplicate positions are merged) with log-normal values.
    """
    root = zarr.open_group(path, mode="w")
    k = max(1, round(density * width))
    nnz = 0
    for b in range(n_blocks):
        rng = np.random.default_rng([seed, b])
        cols = np.sort(rng.integers(0, width, size=(n, k)), axis=1)
        vals = rng.lognormal(size=(n, k)).astype(np.float32)
        blk = sp.csr_matrix(
            (vals.ravel(), cols.ravel().astype(np.int32), np.arange(0, n * k + 1, k)),
            shape=(n, width),
        )
        blk.sum_duplicates()
        g = root.create_group(f"b{b}")
        for name, arr in (
            ("data", blk.data),
            ("indices", blk.indices.astype(np.int32)),
            ("indptr", blk.indptr.astype(np.int64)),
        ):
            z = g.create_array(name, shape=arr.shape, chunks=arr.shape, dtype=arr.dtype)
            z[:] = arr
        nnz += blk.nnz
    return nnz


def load_block(path: str, n: int, width: int, b: int) -> sp.csr_matrix:
    g = zarr.open_group(path, mode="r")[f"b{b}"]
    return sp.csr_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n, width))


class PeakRss:
    """Sample the RSS of some processes in a background thread; keep the maximum."""

    def __init__(self, pids):
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for p in self.procs:
                try:
                    self.peak = max(self.peak, p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_size(client, pids, tmp, target_bytes, n, width, density, r, iters):
    nnz_target = target_bytes // 8  # float32 value + int32 index
    n_blocks = max(1, round(nnz_target / (n * width * density)))
    path = os.path.join(tmp, f"A_{target_bytes}")
    t = time.perf_counter()
    nnz = write_blocks(path, n, n_blocks, width, density, seed=0)
    t_write = time.perf_counter() - t
    P = n_blocks * width
    A = dask_from_block_loader(
        functools.partial(load_block, path, n, width), n, [width] * n_blocks, np.float32
    )
    hroot = zarr.open_group(os.path.join(tmp, f"H_{target_bytes}"), mode="w")
    for k in range(2):
        hroot.create_array(f"H{k}", shape=(r, P), chunks=(r, width), dtype="f4")
    cfg = NmfConfig(r, solver="hals", max_iter=iters, tol=0)
    with PeakRss(pids) as mon:
        t = time.perf_counter()
        states = []
        for st in iter_nmf_dask(A, cfg, h_target=lambda it: hroot[f"H{it % 2}"]):
            states.append((time.perf_counter() - t, st))
            t = time.perf_counter()
    st = states[-1][1]
    per_iter = [dt for dt, _ in states[1:]] or [states[0][0]]
    on_disk = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
    )
    shutil.rmtree(path)
    return {
        "nnz": nnz,
        "stored": nnz * 8 + n_blocks * (n + 1) * 8,
        "on_disk": on_disk,
        "P": P,
        "blocks": n_blocks,
        "write_s": t_write,
        "first_s": states[0][0],
        "iter_s": float(np.median(per_iter)),
        "peak": mon.peak,
        "losses": st.losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--memory-limit", default="320MiB")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    sizes = [32 * MiB, 64 * MiB, 128 * MiB] if args.small else [256 * MiB, 512 * MiB, 1024 * MiB]
    n, width, density, r = 2000, 4096, 0.05, 16
    tmp = tempfile.mkdtemp(prefix="npeff_ooc_")
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit=args.memory_limit,
        dashboard_address=None,
    )
    client = Client(cluster)
    try:
        pids = list(client.run(os.getpid).values())
        base0 = max(psutil.Process(p).memory_info().rss for p in pids)
        client.run(_import_curvlake)
        base = max(psutil.Process(p).memory_info().rss for p in pids)
        print(
            f"LocalCluster: 2 worker processes x 1 thread, memory_limit={args.memory_limit} "
            f"per worker; idle worker RSS {base0 / MiB:.0f} MiB, {base / MiB:.0f} MiB after "
            f"`import curvlake.pipelines.npeff.nmf`; load avg "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print(
            f"A: n={n} rows, CSR column blocks of {width} columns, density {density:.0%}, "
            f"float32; r={r}; HALS; {args.iters} iterations; H double-buffered to Zarr\n"
        )
        rows = [run_size(client, pids, tmp, s, n, width, density, r, args.iters) for s in sizes]
    finally:
        client.close()
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)
    lim = _parse_bytes(args.memory_limit)
    first = rows[0]
    print(
        f"{'CSR bytes':>11s} {'x limit':>7s} {'on disk':>9s} {'nnz':>12s} {'P':>9s} {'blocks':>6s} "
        f"{'init+1st s':>10s} {'s / iter':>9s} {'s/iter per 1e8 nnz':>18s} "
        f"{'peak worker RSS':>15s} {'loss after':>10s}"
    )
    for row in rows:
        print(
            f"{row['stored'] / MiB:9.0f}Mi {row['stored'] / lim:7.1f} "
            f"{row['on_disk'] / MiB:7.0f}Mi {row['nnz']:12d} "
            f"{row['P']:9d} {row['blocks']:6d} {row['first_s']:10.1f} {row['iter_s']:9.2f} "
            f"{row['iter_s'] / row['nnz'] * 1e8:18.2f} {row['peak'] / MiB:12.0f} Mi "
            f"{row['losses'][-1]:10.4f}"
        )
    print(
        f"\ntime ratio largest/smallest {rows[-1]['iter_s'] / first['iter_s']:.2f} for nnz "
        f"ratio {rows[-1]['nnz'] / first['nnz']:.2f} (linear scaling: equal ratios)"
    )


def _import_curvlake() -> None:
    import curvlake.pipelines.npeff.nmf  # noqa: F401


def _parse_bytes(s: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(s))


if __name__ == "__main__":
    main()
