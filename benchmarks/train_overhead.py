"""Overhead of lake checkpointing: the same training with a checkpoint into the lake every
epoch vs a plain torch loop (same data, model, optimizer and evaluation), in one process.

    python benchmarks/train_overhead.py            # cnn5_k (k=16) and resnet18_k (k=16) on digits
    python benchmarks/train_overhead.py --small    # mlp, 3 epochs, 1 repeat

Both paths call the same training functions (``curvlake.nn.training``); the lake path is
``run_train`` with ``save_every=1`` into a fresh lake (so it also writes parameters, optimizer
state and metrics at every epoch, validates and commits). Goal: overhead <= 5%.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from curvlake.lake import open_lake
from curvlake.nn.training import (
    TrainConfig,
    load_training_data,
    make_model,
    make_optimizer,
    train_epochs,
)
from curvlake.pipelines.train import run_train


def plain(config: TrainConfig) -> float:
    start = time.perf_counter()
    splits, _ = load_training_data(config)
    model = make_model(config, num_classes=splits.num_classes, input_shape=splits.input_shape)
    optimizer = make_optimizer(model, config)
    train_epochs(
        model, optimizer, splits.train, config, eval_splits={"val": splits.val, "test": splits.test}
    )
    return time.perf_counter() - start


def with_lake(config: TrainConfig) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        lake = open_lake(scratch, create=True)
        start = time.perf_counter()
        run_train(lake, config, progress=False)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    if args.small:
        workloads = [({"model": "mlp", "model_params": {"widths": [64]}, "epochs": 3}, 1)]
    else:
        workloads = [
            ({"model": "cnn5_k", "model_params": {"k": 16}, "epochs": 10}, 7),
            ({"model": "resnet18_k", "model_params": {"k": 16}, "epochs": 4}, 4),
        ]
    for options, repeats in workloads:
        measure(options, repeats)


def measure(options: dict, repeats: int) -> None:
    config = TrainConfig.from_dict(
        {
            **options,
            "dataset": "digits",
            "save_every": 1,
            "device": "cpu",
            "batch_size": 64,
            "lr": 0.01,
        }
    )
    times = {"plain torch loop": [], "lake, checkpoint every epoch": []}
    for _ in range(repeats):  # alternate so drift hits both alike
        times["plain torch loop"].append(plain(config))
        times["lake, checkpoint every epoch"].append(with_lake(config))
    best = {name: min(values) for name, values in times.items()}
    print(
        f"{options['model']} {options.get('model_params')} on digits, {config.epochs} epochs, "
        f"best of {repeats}"
    )
    for name, seconds in best.items():
        print(f"  {name:<30} {seconds:8.2f} s  ({seconds / config.epochs:.3f} s/epoch)")
    overhead = best["lake, checkpoint every epoch"] / best["plain torch loop"] - 1
    print(f"  overhead of lake checkpointing: {100 * overhead:+.1f}%  (goal <= 5%)")


if __name__ == "__main__":
    main()
