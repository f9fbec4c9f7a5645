"""Cost of tracking saturation during training: ours vs plain training vs delve's approach.

    python benchmarks/saturation.py            # cnn5_k k=16 and resnet18_k k=8 on digits
    python benchmarks/saturation.py --small    # cnn5_k k=8, 2 epochs, 1 repeat
    python benchmarks/saturation.py --model cnn5_k --repeats 6

Four trainings of the same model, data and optimizer, in one process, alternating, best of
``repeats``:

- ``plain``: ``train_epochs`` with the test split evaluated after every epoch (what tracking
  needs), no recorder;
- ``curvlake``: the same with :class:`SaturationRecorder` (float64 moments per batch merged
  exactly, train forwards and the test pass) and the epoch's spectra, as ``--track saturation``;
- ``delve``: the same with delve 0.1.50's ``SaturationTracker`` on the same layers (its per-batch
  float64 ``TorchCovarianceMatrix`` updates in its own forward hooks, ``add_saturations`` per
  epoch, no writer output) -- the anchor;
- ``lake, untracked`` / ``lake, tracked``: ``run_train`` into a fresh lake without / with
  ``track=["saturation"]`` (checkpoints, the per-epoch rows, the saturation artifact).

Goal: tracking overhead <= 5% over plain training.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from curvlake.lake import open_lake
from curvlake.nn.training import (
    TrainConfig,
    load_training_data,
    make_model,
    make_optimizer,
    train_epochs,
)
from curvlake.pipelines.saturation.tracking import TrainingTracker
from curvlake.pipelines.train import run_train


def _loop(config: TrainConfig, mode: str) -> float:
    splits, _ = load_training_data(config)
    model = make_model(config, num_classes=splits.num_classes, input_shape=splits.input_shape)
    optimizer = make_optimizer(model, config)
    recorders, on_epoch_end, tracker = (), None, None
    if mode == "curvlake":
        tracker = TrainingTracker(config.replace(track=["saturation"]), model, None)
        recorders = tracker.recorders
        on_epoch_end = lambda epoch, metrics: tracker.save_epoch(epoch)  # noqa: E731
    elif mode == "delve":
        from delve import SaturationTracker

        scratch = tempfile.mkdtemp()
        tracker = SaturationTracker(
            f"{scratch}/delve",
            save_to="csv",
            modules=model,
            stats=["lsat", "idim", "trc"],
            device="cpu",
            conv_method="channelwise",
        )
        on_epoch_end = lambda epoch, metrics: tracker.add_saturations(save=False)  # noqa: E731
    start = time.perf_counter()
    train_epochs(
        model,
        optimizer,
        splits.train,
        config,
        eval_splits={"test": splits.test},
        on_epoch_end=on_epoch_end,
        recorders=recorders,
    )
    seconds = time.perf_counter() - start
    if mode == "delve":
        tracker.close()
    return seconds


def _lake(config: TrainConfig, tracked: bool) -> float:
    options = config.to_dict()
    if tracked:
        options["track"] = ["saturation"]
    with tempfile.TemporaryDirectory() as scratch:
        lake = open_lake(scratch, create=True)
        start = time.perf_counter()
        run_train(lake, options, progress=False)
        return time.perf_counter() - start


def measure(options: dict, repeats: int) -> None:
    config = TrainConfig.from_dict(
        {"dataset": "digits", "device": "cpu", "batch_size": 64, "lr": 0.01, **options}
    )
    paths = {
        "plain (train + test pass)": lambda: _loop(config, "plain"),
        "curvlake recorder": lambda: _loop(config, "curvlake"),
        "delve 0.1.50 tracker": lambda: _loop(config, "delve"),
        "lake, untracked run_train": lambda: _lake(config, False),
        "lake, tracked run_train": lambda: _lake(config, True),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):  # alternate so drift hits every path alike
        for name, path in paths.items():
            times[name].append(path())
    best = {name: min(values) for name, values in times.items()}
    print(
        f"{config.model} {dict(config.model_params)} on digits, {config.epochs} epochs, "
        f"batch {config.batch_size}, best of {repeats}"
    )
    base = best["plain (train + test pass)"]
    for name, seconds in best.items():
        print(f"  {name:<28} {seconds:7.2f} s   {seconds / base:5.3f}x plain")
    ours = best["curvlake recorder"] / base - 1
    delve = best["delve 0.1.50 tracker"] / base - 1
    lake = best["lake, tracked run_train"] / best["lake, untracked run_train"] - 1
    print(f"  tracking overhead, loop: curvlake {100 * ours:+.1f}%  delve {100 * delve:+.1f}%")
    print(f"  tracking overhead, run_train tracked vs untracked: {100 * lake:+.1f}% (goal <= 5%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument(
        "--model", choices=["cnn5_k", "resnet18_k"], help="only this workload (default: both)"
    )
    parser.add_argument("--repeats", type=int, help="best of this many (default: 3 / 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("delve").setLevel(logging.WARNING)
    if args.small:
        workloads = [({"model": "cnn5_k", "model_params": {"k": 8}, "epochs": 2}, 1)]
    else:
        workloads = [
            ({"model": "cnn5_k", "model_params": {"k": 16}, "epochs": 3}, 3),
            ({"model": "resnet18_k", "model_params": {"k": 8}, "epochs": 2}, 2),
        ]
    for options, repeats in workloads:
        if args.model in (None, options["model"]):
            measure(options, args.repeats or repeats)


if __name__ == "__main__":
    main()
