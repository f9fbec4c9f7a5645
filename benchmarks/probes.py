"""Linear probes: curvlake's out-of-core L-BFGS vs scikit-learn saga (phd-lab) and lbfgs, the
out-of-core memory bound, and latent storage vs phd-lab's pickle streams.

    python benchmarks/probes.py            # 12000 x (64, 256, 1024) latents; 2 GB out of core
    python benchmarks/probes.py --small    # 3000 examples; 0.3 GB out of core

1. **Probes, same latents.** Synthetic latents of three layers (10 classes, class signal
   growing with depth, a per-feature offset and scale as real activations have) written as
   phd-lab pickle streams and imported into the lake. Per layer: ``run_probes`` (L-BFGS on
   standardized features, one data pass per evaluation, here in-process), scikit-learn
   ``LogisticRegression(solver="saga")`` on the raw features as phd-lab fits it (C=1,
   max_iter=100, tol=1e-4, no scaling), and ``solver="saga"`` and ``solver="lbfgs"`` on the
   standardized features (our objective: the same optimum, so the accuracy comparison is of
   solvers, not of problems). Time and peak traced memory (tracemalloc: NumPy buffers
   included) of each, loading the latents included; test accuracy side by side.
2. **Out of core.** One layer of float32 latents about 3.3 times a Dask worker's memory limit
   (LocalCluster, 1 worker process, 1 thread), probed with ``max_iter=1``; the worker's resident
   memory is sampled throughout (the nanny would kill it at 95 % of the limit).
3. **Storage.** Bytes on disk of the pickle streams vs the lake's latents (raw and zstd), for
   the synthetic latents and for real ones (a cnn5_k's layers on digits, 4x4 pooling).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

from curvlake.lake import open_lake
from curvlake.pipelines.saturation.import_phdlab import import_phdlab_latents, pickle_stream
from curvlake.pipelines.saturation.probes_pipeline import run_probes


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def synthetic_latents(n_train: int, n_test: int, widths, seed: int = 0) -> dict:
    """``{split: {layer: (n, d) float32, "labels": (n,)}}``, phd-lab's split names."""
    rng = np.random.default_rng(seed)
    classes = 10
    out: dict = {"train": {}, "eval": {}}
    labels = {"train": rng.integers(0, classes, n_train), "eval": rng.integers(0, classes, n_test)}
    for depth, width in enumerate(widths):
        means = rng.standard_normal((classes, width)) * (0.08 + 0.05 * depth)
        offset = rng.uniform(-3, 3, width)
        scale = rng.uniform(0.2, 5.0, width)
        for split, y in labels.items():
            noise = rng.standard_normal((len(y), width))
            out[split][f"layer{depth + 1}"] = ((means[y] + noise) * scale + offset).astype(
                np.float32
            )
    for split, y in labels.items():
        out[split]["labels"] = y
    return out


def write_streams(folder: Path, data: dict, batch: int = 128) -> None:
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    for split, arrays in data.items():
        for name, values in arrays.items():
            with open(folder / f"{split}-{name}.p", "wb") as handle:
                for start in range(0, len(values), batch):
                    pickle.dump(values[start : start + batch], handle)


def traced(function):
    tracemalloc.start()
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def compare_probes(n_train: int, n_test: int, widths) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = synthetic_latents(n_train, n_test, widths)
        streams = scratch / "latent_datasets" / "Synthetic_10_32"
        write_streams(streams, data)
        lake = open_lake(scratch / "lake", create=True)
        latents = import_phdlab_latents(lake, streams, compress=False)
        compressed = import_phdlab_latents(lake, streams, compress=True)
        storage("synthetic", streams, lake, latents, compressed)
        layers = [f"layer{i + 1}" for i in range(len(widths))]

        def load(split: str, name: str) -> np.ndarray:
            return np.concatenate(list(pickle_stream(streams / f"{split}-{name}.p")))

        def fit_sklearn(solver: str, standardize: bool) -> list[float]:
            y_train, y_test = load("train", "labels"), load("eval", "labels")
            accuracies = []
            for name in layers:
                x_train, x_test = load("train", name), load("eval", name)
                if standardize:  # our objective: standardized, float64
                    scaler = StandardScaler().fit(x_train.astype(np.float64))
                    x_train = scaler.transform(x_train.astype(np.float64))
                    x_test = scaler.transform(x_test.astype(np.float64))
                model = LogisticRegression(solver=solver, C=1.0, max_iter=100, tol=1e-4)
                model.fit(x_train, y_train)
                accuracies.append(model.score(x_test, y_test))
            return accuracies

        def fit_ours() -> list[float]:
            probes = run_probes(lake, latents, val_fraction=0, progress=False)
            return list(lake.open(probes).test_accuracy.values)

        import warnings

        from sklearn.exceptions import ConvergenceWarning

        results = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            # warm up (imports, the Dask machinery) outside the timings
            run_probes(lake, latents, C=0.5, max_iter=2, val_fraction=0, progress=False)
            LogisticRegression(max_iter=2).fit(np.eye(3), [0, 1, 2])
            for name, function in (
                ("curvlake run_probes (L-BFGS, out of core)", fit_ours),
                ("sklearn lbfgs, standardized", lambda: fit_sklearn("lbfgs", True)),
                ("sklearn saga, standardized", lambda: fit_sklearn("saga", True)),
                ("sklearn saga, raw (phd-lab)", lambda: fit_sklearn("saga", False)),
            ):
                results[name] = traced(function)
        print(
            f"probes on {n_train} train / {n_test} test examples, 10 classes, layer widths "
            f"{list(widths)}; C=1, max_iter=100, tol=1e-4"
        )
        head = "  ".join(f"{name:>8}" for name in layers)
        print(f"  {'method':<42} {'seconds':>8} {'peak MiB':>9}  test accuracy: {head}")
        ours = results["curvlake run_probes (L-BFGS, out of core)"]
        for name, (accuracy, seconds, peak) in results.items():
            row = "  ".join(f"{a:8.4f}" for a in accuracy)
            print(f"  {name:<42} {seconds:8.2f} {peak / 2**20:9.1f}                 {row}")
        for name, (accuracy, seconds, peak) in results.items():
            if name is not next(iter(results)):
                gap = 100 * np.max(np.abs(np.subtract(ours[0], accuracy)))
                print(
                    f"  vs {name}: {seconds / ours[1]:.2f}x the time of curvlake, "
                    f"{peak / ours[2]:.2f}x its peak memory, max accuracy gap {gap:.2f} points"
                )


def storage(what: str, streams: Path, lake, raw: str, compressed: str) -> None:
    pickles = folder_bytes(streams)
    lake_raw = folder_bytes(Path(lake.url) / "latents" / raw)
    lake_zstd = folder_bytes(Path(lake.url) / "latents" / compressed)
    print(
        f"storage ({what}): pickle streams {pickles / 2**20:.2f} MiB, lake raw "
        f"{lake_raw / 2**20:.2f} MiB ({lake_raw / pickles:.3f}x), lake zstd "
        f"{lake_zstd / 2**20:.2f} MiB ({lake_zstd / pickles:.3f}x)"
    )


def real_latents_storage() -> None:
    """Latents of a trained cnn5_k (digits, 4x4 pooling) as pickle streams vs the lake."""
    from curvlake.pipelines.saturation.latents import run_latents
    from curvlake.pipelines.train import run_train

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        lake = open_lake(scratch / "lake", create=True)
        config = {
            "model": "cnn5_k",
            "model_params": {"k": 16},
            "dataset": "digits",
            "epochs": 3,
            "optimizer": "adam",
            "lr": 0.003,
            "device": "cpu",
        }
        run_id = run_train(lake, config, progress=False)
        ids = [run_latents(lake, run_id, pool=4, compress=c, progress=False) for c in (False, True)]
        ds = lake.open(ids[0])
        data: dict = {"train": {}, "eval": {}}
        for ours, theirs in (("train", "train"), ("test", "eval")):
            features = ds[f"{ours}_features"].values
            for i, name in enumerate(ds.layer.values):
                start, width = int(ds.feature_offset[i]), int(ds.n_features[i])
                data[theirs][str(name)] = features[:, start : start + width]
            data[theirs]["labels"] = ds[f"{ours}_label"].values
        streams = scratch / "streams"
        write_streams(streams, data)
        storage("cnn5_k k=16 on digits, 4x4 pooled", streams, lake, *ids)


def out_of_core(n: int, width: int, memory_limit: str) -> None:
    import psutil
    from dask.utils import parse_bytes

    from curvlake.engine import client_session

    limit = parse_bytes(memory_limit)
    with tempfile.TemporaryDirectory() as scratch:
        lake = open_lake(Path(scratch) / "lake", create=True)
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 10, n)
        means = rng.standard_normal((10, width)).astype(np.float32) * 0.05
        rows = 2048
        writer = lake.begin("latents", {"benchmark": "out of core", "n": n, "width": width})
        with writer:
            out = writer.create_array("train_features", (n, width), "float32", chunks=(rows, width))
            for start in range(0, n, rows):
                y = labels[start : start + rows]
                noise = rng.standard_normal((len(y), width), dtype=np.float32)
                out[start : start + len(y)] = means[y] + noise
            writer.write_many(
                {
                    "layer": np.array(["wide"], dtype=object),
                    "feature_offset": np.array([0], dtype=np.int64),
                    "n_features": np.array([width], dtype=np.int64),
                    "layer_shape": np.array([str(width)], dtype=object),
                    "train_label": labels.astype(np.int64),
                    "train_sample_id": np.arange(n, dtype=np.int64),
                }
            )
            writer.set_attrs(splits=["train"], pool=None, pixelwise=False, num_classes=10)
        latents = writer.commit()
        size = n * width * 4
        peaks = {"worker": 0, "driver": 0}
        stop = threading.Event()
        driver = psutil.Process()
        driver_base = driver.memory_info().rss
        with client_session(
            cluster="local",
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
        ) as client:
            import os

            pid = next(iter(client.run(os.getpid).values()))
            worker = psutil.Process(pid)
            worker_base = worker.memory_info().rss

            def sample() -> None:
                while not stop.is_set():
                    peaks["worker"] = max(peaks["worker"], worker.memory_info().rss)
                    peaks["driver"] = max(peaks["driver"], driver.memory_info().rss)
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            start = time.perf_counter()
            probes = run_probes(lake, latents, max_iter=1, val_fraction=0.1, progress=False)
            seconds = time.perf_counter() - start
            stop.set()
            sampler.join()
        ds = lake.open(probes)
        print(
            f"out of core: one layer of {n} x {width} float32 = {size / 2**30:.2f} GiB, "
            f"{size / limit:.1f}x the worker memory limit ({memory_limit}); max_iter=1, "
            f"{int(ds.n_evaluations[0])} loss passes + moments + accuracy in {seconds:.1f} s"
        )
        print(
            f"  worker peak RSS {peaks['worker'] / 2**20:.0f} MiB (after imports "
            f"{worker_base / 2**20:.0f} MiB; limit {limit / 2**20:.0f} MiB); driver peak "
            f"{peaks['driver'] / 2**20:.0f} MiB (before {driver_base / 2**20:.0f} MiB); "
            f"train accuracy {float(ds.train_accuracy[0]):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    if args.small:
        compare_probes(3000, 1000, (32, 128, 256))
        out_of_core(40_000, 2048, "600MB")
    else:
        compare_probes(12_000, 3000, (64, 256, 1024))
        real_latents_storage()
        out_of_core(240_000, 2048, "600MB")


if __name__ == "__main__":
    main()
