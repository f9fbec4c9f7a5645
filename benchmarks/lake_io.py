"""Write then read a per-example float32 matrix through Dask into the lake vs numpy.save/load.

    python benchmarks/lake_io.py              # 2 GiB matrix (16384 x 32768 float32)
    python benchmarks/lake_io.py --small      # 256 MiB, for a quick check

Both paths store the same bytes. The lake path runs on a LocalCluster of 2 single-threaded
worker processes with a 1 GiB memory limit each, so the matrix is larger than any worker's
memory: each task builds one example block and writes its own chunks. Peak memory is sampled
(RSS of this process plus all worker processes). Page caches are dropped before each read when
the OS allows it (root on Linux), else reads may come from the page cache for both paths alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import psutil

from curvlake.engine import client_session
from curvlake.lake import open_lake


class PeakRSS:
    """Samples the summed RSS of this process and its children every 20 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _baseline_rss() -> int:
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def block(rows: int, cols: int, index: int) -> np.ndarray:
    """Example block ``index``: cheap to build, different per block (not all zeros)."""
    return np.full((rows, cols), index, dtype=np.float32) + np.arange(cols, dtype=np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (I/O overlap)")
    args = parser.parse_args()
    n, p = (2048, 32768) if args.small else (16384, 32768)
    nbytes = n * p * 4
    scratch = Path(tempfile.mkdtemp(dir=args.dir, prefix="curvlake-lake-io-"))
    rows = 256  # 32 MiB chunks
    print(
        f"matrix {n} x {p} float32 = {nbytes / 2**30:.2f} GiB, chunks of {rows} rows "
        f"({rows * p * 4 / 2**20:.0f} MiB), 2 workers x {args.threads} thread(s)"
    )
    results = {}
    try:
        # numpy: build in memory, save, load.
        with PeakRSS() as raw_peak:
            base = _baseline_rss()
            matrix = np.empty((n, p), np.float32)
            for i in range(n // rows):
                matrix[i * rows : (i + 1) * rows] = block(rows, p, i)
            start = time.perf_counter()
            np.save(scratch / "raw.npy", matrix)
            os.sync()
            results["numpy write"] = time.perf_counter() - start
            del matrix
            cached = not drop_caches()
            start = time.perf_counter()
            row_sums_raw = np.load(scratch / "raw.npy").sum(axis=1)
            results["numpy read"] = time.perf_counter() - start
        raw_peak_bytes = raw_peak.peak - base

        with client_session(
            cluster="local", n_workers=2, threads_per_worker=args.threads, memory_limit="1GiB"
        ) as client:
            client.run(lambda: __import__("curvlake.lake"))  # one-time imports, not I/O
            lake = open_lake(scratch / "lake", create=True)
            with PeakRSS() as lake_peak:
                base = _baseline_rss()
                writer = lake.begin("pefs", {"benchmark": "lake_io", "n": n, "p": p})
                target = writer.create_array("dense", (n, p), chunks=(rows, p))
                source = da.map_blocks(
                    lambda b, block_id=None: block(b.shape[0], p, block_id[0]),
                    da.empty((n, p), chunks=(rows, p), dtype=np.float32),
                    dtype=np.float32,
                )
                start = time.perf_counter()
                da.store(source, target, lock=False)
                os.sync()
                results["lake write"] = time.perf_counter() - start
                writer.write("dense_norm", np.ones(n, np.float32))
                writer.write("logits", np.zeros((n, 2), np.float32))
                writer.write("label", np.zeros(n, np.int64))
                writer.write("sample_id", np.arange(n))
                writer.set_attrs(pef_kind="diag", storage="dense", n_parameters=p, num_classes=2)
                art = writer.commit()
                drop_caches()
                start = time.perf_counter()
                row_sums_lake = lake.open(art)["dense"].data.sum(axis=1).compute()
                results["lake read"] = time.perf_counter() - start
            lake_peak_bytes = lake_peak.peak - base
        np.testing.assert_array_equal(row_sums_raw, row_sums_lake)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    gib = nbytes / 2**30
    print(f"\n{'path':<12}{'seconds':>10}{'GiB/s':>10}")
    for name, seconds in results.items():
        print(f"{name:<12}{seconds:>10.2f}{gib / seconds:>10.2f}")
    write_ratio = results["numpy write"] / results["lake write"]
    read_ratio = results["numpy read"] / results["lake read"]
    print(f"\nwrite throughput ratio lake/numpy: {write_ratio:.2f}x")
    print(f"read throughput ratio  lake/numpy: {read_ratio:.2f}x")
    print(
        f"peak memory above baseline: numpy {raw_peak_bytes / 2**30:.2f} GiB, "
        f"lake {lake_peak_bytes / 2**30:.2f} GiB (matrix {gib:.2f} GiB)"
    )
    if cached:
        print("note: page caches could not be dropped; reads may be served from memory")


if __name__ == "__main__":
    main()
