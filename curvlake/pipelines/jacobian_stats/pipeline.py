"""Dataset statistics over checkpoints as a Dask pipeline: ``run_stats``.

Tasks are (run, checkpoint, example block): each loads the checkpoint (cached per worker
process), computes every requested statistic for its block of examples, writes its own chunks
of the output arrays and marks its progress block. Every example is computed exactly once; a
killed computation, rerun, computes only the missing tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from curvlake.engine import run_tasks, torch_device
from curvlake.errors import UserInputError
from curvlake.lake import Lake, open_lake
from curvlake.lake.checkpoints import cached_model
from curvlake.pipelines.jacobian_stats.metrics import (
    JACOBIAN_METRICS,
    METHODS,
    METRICS,
    NORMALIZATIONS,
    compute_metric,
)
from curvlake.pipelines.train import as_train_config, cached_run_splits

INPUT_SPACES = ("standardized", "raw")
SPLITS = ("train", "val", "test")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserInputError(f"{name}={value!r} is not one of: {', '.join(allowed)}")


def _run_config(lake: Lake, run_id: str):
    info = lake.info(run_id)
    if info.kind != "run":
        raise UserInputError(
            f"{run_id} is a {info.kind} artifact; give run ids (curvlake lake ls --kind run)"
        )
    if "imported_from" in info.config:
        raise UserInputError(
            f"{run_id} was imported without its training data; statistics need "
            "a run trained in the lake"
        )
    return as_train_config(info.config)


def select_checkpoints(n_checkpoints: int, checkpoints: str | Sequence[int], run_id: str):
    """Checkpoint indices: ``"all"`` or a list of indices (negative counts from the end)."""
    if isinstance(checkpoints, str):
        if checkpoints != "all":
            raise UserInputError(
                f"checkpoints must be 'all' or a list of indices, got {checkpoints!r}"
            )
        return list(range(n_checkpoints))
    selected = []
    for c in checkpoints:
        if not -n_checkpoints <= int(c) < n_checkpoints:
            raise UserInputError(f"run {run_id} has checkpoints 0..{n_checkpoints - 1}; got {c}")
        selected.append(int(c) % n_checkpoints)
    if len(set(selected)) != len(selected):
        raise UserInputError(f"checkpoint list {list(checkpoints)} names a checkpoint twice")
    return selected


def _stats_task(
    lake_url: str,
    run_id: str,
    run_index: int,
    checkpoint: int,
    checkpoint_index: int,
    block: int,
    block_size: int,
    outputs: dict,
    done,
    task_index: int,
    options: dict,
) -> int:
    device = torch_device()
    splits = cached_run_splits(lake_url, run_id)
    split = splits.split(options["split"])
    rows = slice(block * block_size, min((block + 1) * block_size, len(split)))
    dtype = DTYPES[options["dtype"]]
    x = torch.as_tensor(split.x[rows], dtype=dtype, device=device)
    y = torch.as_tensor(split.y[rows], device=device)
    transform = None
    if options["input_space"] == "raw":
        mean = torch.as_tensor(splits.mean, dtype=dtype, device=device).view(1, -1, 1, 1)
        std = torch.as_tensor(splits.std, dtype=dtype, device=device).view(1, -1, 1, 1)
        x = x * std + mean

        def transform(raw, mean=mean, std=std):
            return (raw - mean) / std

    model = cached_model(lake_url, run_id, checkpoint, options["dtype"], device)
    for metric in options["metrics"]:
        jacobian = metric in JACOBIAN_METRICS
        values = compute_metric(
            model,
            x,
            y,
            metric=metric,
            normalization=options["normalization"] if jacobian else "none",
            target_only=options["target_only"] and jacobian,
            method=options["method"] if metric == "jacobian_operator" else "exact",
            rtol=options["rtol"],
            max_iter=options["max_iter"],
            seed=options["seed"],
            sample_ids=torch.as_tensor(split.sample_id[rows]),
            input_transform=transform,
        )
        outputs[metric][run_index, checkpoint_index, rows] = values.detach().cpu().numpy()
    done[task_index] = 1
    return task_index


def run_stats(
    lake: Lake | str,
    runs: Sequence[str],
    *,
    metrics: Sequence[str] = ("jacobian_operator",),
    split: str = "train",
    checkpoints: str | Sequence[int] = "all",
    normalization: str = "none",
    target_only: bool = False,
    input_space: str = "standardized",
    method: str = "exact",
    rtol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    dtype: str = "float32",
    block_size: int = 256,
    progress: bool = True,
) -> str:
    """Per-example statistics of ``runs`` at their checkpoints over a whole split.

    Args:
        lake: the lake (or its URL).
        runs: run artifact ids (one, or several, e.g. a width sweep on the same data).
        metrics: statistics from ``METRICS``.
        split: ``train`` (noisy labels, as trained), ``val`` or ``test``.
        checkpoints: ``"all"`` or checkpoint indices (the same for every run).
        normalization, target_only, method, rtol, max_iter, seed: see ``compute_metric``.
        input_space: ``standardized`` (the model's inputs) or ``raw`` (pixels in [0, 1]).
        dtype: ``float32`` or ``float64`` computation.
        block_size: examples per task (and per stored chunk).

    Returns:
        The ``jacobian_stats`` artifact id.
    """
    lake = open_lake(lake) if isinstance(lake, str) else lake
    runs = list(runs)
    if not runs:
        raise UserInputError("give at least one run id")
    if len(set(runs)) != len(runs):
        raise UserInputError("a run id is given twice")
    metrics = list(metrics)
    if not metrics:
        raise UserInputError("give at least one metric")
    for metric in metrics:
        _choice("metric", metric, METRICS)
    _choice("split", split, SPLITS)
    _choice("normalization", normalization, NORMALIZATIONS)
    _choice("input_space", input_space, INPUT_SPACES)
    _choice("method", method, METHODS)
    _choice("dtype", dtype, tuple(DTYPES))
    if target_only and normalization == "crossentropy":
        raise UserInputError("target_only has no meaning with normalization='crossentropy'")
    if not isinstance(block_size, int) or block_size < 1:
        raise UserInputError(f"block_size must be a positive integer, got {block_size!r}")

    selections, epochs, labels = [], [], []
    reference = None
    for run_id in runs:
        _run_config(lake, run_id)
        group = lake.group(run_id)
        chosen = select_checkpoints(group["theta"].shape[0], checkpoints, run_id)
        selections.append(chosen)
        epochs.append(np.asarray(group["checkpoint_epoch"][:])[chosen])
        splits = cached_run_splits(lake.url, run_id)
        part = splits.split(split)
        labels.append(part.y)
        if reference is None:
            reference = (part.sample_id, run_id, splits)
        elif not np.array_equal(reference[0], part.sample_id):
            raise UserInputError(
                f"runs {reference[1]} and {run_id} do not have the same {split} "
                "examples (different dataset or split seed)"
            )
    if len({len(s) for s in selections}) != 1:
        raise UserInputError(
            "the runs have different numbers of checkpoints; pass explicit checkpoint indices"
        )
    sample_id, _, splits = reference
    n, n_checkpoints = len(sample_id), len(selections[0])
    if split == "train":
        clean = np.asarray(lake.group(runs[0])["train_clean_label"][:])
    else:
        clean = splits.split(split).y

    options = {
        "metrics": metrics,
        "split": split,
        "normalization": normalization,
        "target_only": bool(target_only),
        "input_space": input_space,
        "method": method,
        "rtol": float(rtol),
        "max_iter": int(max_iter),
        "seed": int(seed),
        "dtype": dtype,
    }
    config = {
        **options,
        "checkpoints": checkpoints
        if isinstance(checkpoints, str)
        else [int(c) for c in checkpoints],
        "block_size": block_size,
    }
    writer = lake.begin("jacobian_stats", config, runs)
    if writer.complete:
        return writer.id
    with writer:
        shape = (len(runs), n_checkpoints, n)
        outputs = {
            m: writer.create_array(m, shape, dtype, chunks=(1, 1, block_size)) for m in metrics
        }
        n_blocks = -(-n // block_size)
        tasks_meta = [
            (r, c, b)
            for r in range(len(runs))
            for c in range(n_checkpoints)
            for b in range(n_blocks)
        ]
        done = writer.progress("tasks", len(tasks_meta))
        pending = set(done.pending())
        tasks = [
            (
                lake.url,
                runs[r],
                r,
                selections[r][c],
                c,
                b,
                block_size,
                outputs,
                done.array,
                t,
                options,
            )
            for t, (r, c, b) in enumerate(tasks_meta)
            if t in pending
        ]
        run_tasks(_stats_task, tasks, description="stats", progress=progress)
        writer.write("run", np.array(runs, dtype=object))
        writer.write("checkpoint_epoch", np.stack(epochs).astype(np.int64))
        writer.write("sample_id", sample_id.astype(np.int64))
        writer.write("label", np.stack(labels).astype(np.int64))
        writer.write("clean_label", np.asarray(clean, dtype=np.int64))
        writer.set_attrs(
            split=split,
            normalization=normalization,
            input_space=input_space,
            metrics=metrics,
            target_only=bool(target_only),
            method=method,
            dtype=dtype,
        )
    return writer.commit()
