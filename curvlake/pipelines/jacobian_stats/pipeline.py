"""Dataset statistics over checkpoints as a Dask pipeline: ``run_stats``.

Tasks are (run, checkpoint, example block): each loads the checkpoint (cached per worker
process), computes every requested statistic for its block of examples, writes its own chunks
of the output arrays and marks its progress block. Every example is computed exactly once; a
killed computation, rerun, computes only the missing tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from curvlake.constants import INPUT_SPACES, NORM_METHODS, NORMALIZATIONS, STATS_METRICS
from curvlake.engine import run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.nn.datasets import per_channel
from curvlake.pipelines.jacobian_stats.metrics import JACOBIAN_METRICS, compute_metric
from curvlake.pipelines.skeleton import (
    DTYPE,
    POSITIVE_INT,
    SEED,
    SPLIT,
    as_lake,
    block_slices,
    load_block,
    resolve_run,
)
from curvlake.pipelines.train import cached_run_splits
from curvlake.validation import Interval, Options, check, refuse_unused, validate_params


def _stats_task(
    lake_url: str,
    run_id: str,
    run_index: int,
    checkpoint: int,
    checkpoint_index: int,
    rows: slice,
    outputs: dict,
    done,
    task_index: int,
    options: dict,
) -> int:
    data = load_block(lake_url, run_id, checkpoint, options["split"], rows, options["dtype"])
    model, x, y = data.model, data.x, data.y
    transform = None
    if options["input_space"] == "raw":
        splits = cached_run_splits(lake_url, run_id)
        mean, std = (
            torch.as_tensor(per_channel(v, x.ndim), dtype=x.dtype, device=x.device)
            for v in (splits.mean, splits.std)
        )
        x = x * std + mean

        def transform(raw, mean=mean, std=std):
            return (raw - mean) / std

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
            sample_ids=torch.as_tensor(data.sample_id),
            input_transform=transform,
        )
        outputs[metric][run_index, checkpoint_index, rows] = values.detach().cpu().numpy()
    done[task_index] = 1
    return task_index


@validate_params(
    {
        "split": SPLIT,
        "normalization": [Options(*NORMALIZATIONS)],
        "input_space": [Options(*INPUT_SPACES)],
        "method": [Options(*NORM_METHODS)],
        "rtol": [Interval(float, 0, 1, closed="neither")],
        "max_iter": POSITIVE_INT,
        "seed": SEED,
        "dtype": DTYPE,
        "block_size": POSITIVE_INT,
    }
)
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
        metrics: statistics from ``curvlake.constants.STATS_METRICS``.
        split: ``train`` (noisy labels, as trained), ``val`` or ``test``.
        checkpoints: ``"all"`` or checkpoint indices (the same for every run).
        normalization, target_only, method, rtol, max_iter, seed: see ``compute_metric``.
        input_space: ``standardized`` (the model's inputs) or ``raw`` (pixels in [0, 1]).
        dtype: ``float32`` or ``float64`` computation.
        block_size: examples per task (and per stored chunk).

    Returns:
        The ``jacobian_stats`` artifact id.
    """
    lake = as_lake(lake)
    runs = list(runs)
    if not runs:
        raise UserInputError("give at least one run id (--run RUN_ID, repeatable)")
    if len(set(runs)) != len(runs):
        raise UserInputError("a run id is given twice")
    metrics = list(metrics)
    if not metrics:
        raise UserInputError("give at least one metric")
    for metric in metrics:
        check("metric", metric, Options(*STATS_METRICS))
    if not any(m in JACOBIAN_METRICS for m in metrics):
        reason = "without a Jacobian metric (jacobian_frobenius, jacobian_operator)"
        refuse_unused(
            reason,
            normalization=None if normalization == "none" else normalization,
            target_only=target_only or None,
            method=None if method == "exact" else method,
            input_space=None if input_space == "standardized" else input_space,
        )
    if target_only and normalization == "crossentropy":
        raise UserInputError("target_only has no meaning with normalization='crossentropy'")

    selections, epochs, labels = [], [], []
    reference = None
    for run_id in runs:
        run = resolve_run(lake, run_id)
        chosen = run.checkpoint_indices(checkpoints)
        selections.append(chosen)
        epochs.append(np.asarray(run.checkpoint_epochs)[chosen])
        part = run.split(split)
        labels.append(part.y)
        if reference is None:
            reference = (part.sample_id, run_id, run)
        elif not np.array_equal(reference[0], part.sample_id):
            raise UserInputError(
                f"runs {reference[1]} and {run_id} do not have the same {split} "
                "examples (different dataset or split seed)"
            )
    if len({len(s) for s in selections}) != 1:
        raise UserInputError(
            "the runs have different numbers of checkpoints; pass explicit checkpoint indices"
        )
    sample_id, _, first = reference
    n, n_checkpoints = len(sample_id), len(selections[0])
    if n == 0:
        raise UserInputError(f"the {split} split of run {first.run_id} has no examples")
    block_slices(n, block_size)
    group = lake.group(first.run_id)
    if split == "train" and "train_clean_label" in group.array_keys():
        clean = np.asarray(group["train_clean_label"][:])
    else:  # val / test labels are clean; imported runs carry no label noise
        clean = labels[0]

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
        blocks = block_slices(n, block_size)
        tasks_meta = [
            (r, c, b)
            for r in range(len(runs))
            for c in range(n_checkpoints)
            for b in range(len(blocks))
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
                blocks[b],
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
