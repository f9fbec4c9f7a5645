"""Scaling of the dataset-statistics pipeline with Dask workers.

    python benchmarks/stats_scaling.py            # cnn5_k (k=16) on digits, exact operator norm
    python benchmarks/stats_scaling.py --small

Trains one small run (2 epochs, 3 checkpoints) into a temporary lake, then computes the exact
input-Jacobian operator norm of every training example at every checkpoint on a LocalCluster
of 1 and of 2 single-threaded worker processes, and prints examples per second and the speedup.
The result arrays of the two runs are compared (they must agree to float32 rounding).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from curvlake.engine import client_session
from curvlake.lake import open_lake
from curvlake.pipelines.jacobian_stats.pipeline import run_stats
from curvlake.pipelines.train import run_train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    k = 4 if args.small else 16
    with tempfile.TemporaryDirectory() as scratch:
        lake = open_lake(scratch, create=True)
        run_id = run_train(
            lake,
            {
                "model": "cnn5_k",
                "model_params": {"k": k},
                "epochs": 2,
                "save_every": 1,
                "device": "cpu",
            },
            progress=False,
        )
        results = {}
        for workers in (1, 2):
            with client_session(cluster="local", n_workers=workers, threads_per_worker=1) as c:
                c.run(lambda: __import__("curvlake.pipelines.jacobian_stats.pipeline"))
                start = time.perf_counter()
                # A different block size per run: a new artifact, not a reuse of the last one.
                stats_id = run_stats(
                    lake,
                    [run_id],
                    block_size=126 + workers,
                    progress=False,
                    metrics=["jacobian_operator"],
                )
                seconds = time.perf_counter() - start
            ds = lake.open(stats_id)
            results[workers] = (seconds, ds.jacobian_operator.values)
        n = results[1][1].size
        print(f"cnn5_k k={k}, {n} (checkpoint, example) pairs, exact operator norm")
        for workers, (seconds, _) in results.items():
            print(
                f"  {workers} worker(s): {seconds:7.2f} s  {n / seconds:8.1f} examples/s  "
                f"speedup {results[1][0] / seconds:4.2f}x"
            )
        np.testing.assert_allclose(results[2][1], results[1][1], rtol=1e-5)
        print("  results identical across worker counts (rtol 1e-5)")


if __name__ == "__main__":
    main()
