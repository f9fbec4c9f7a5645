"""Saturation of any checkpoint as a Dask pipeline: ``run_saturation``.

Tasks are (checkpoint, example block): each loads the checkpoint (cached per worker), runs its
block through the model in eval mode with a :class:`~.tracking.SaturationRecorder` attached,
and stores the float64 moments (count, mean, centred scatter) of every tracked layer's
observations in the staging work area, then marks its block done. The moments of a
checkpoint's blocks are then merged as a balanced tree in block order
(:class:`~.tracking.MomentsTree`, the grouping of ``merge_moments``), so the result does not
depend on the worker count, and with blocks equal to the training's evaluation batches
(``eval_batch_size``, the default) it is bit-identical to the ``eval`` phase that
``curvlake train --track saturation`` recorded at the same epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from curvlake.constants import CONV_METHODS, SATURATION_RULES
from curvlake.engine import run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.lake.checkpoints import build_run_model
from curvlake.nn.hooks import attach, feature_layers
from curvlake.pipelines.saturation.moments import Moments
from curvlake.pipelines.saturation.tracking import (
    MomentsTree,
    SaturationRecorder,
    SaturationTable,
    layer_observations,
    layer_statistics,
    require_work_array,
)
from curvlake.pipelines.skeleton import (
    DTYPE,
    POSITIVE_INT,
    SPLIT,
    RunInput,
    as_lake,
    block_slices,
    load_block,
    resolve_run,
)
from curvlake.validation import Interval, Options, validate_params

#: Default block size when the run does not say (TrainConfig's ``eval_batch_size`` default).
DEFAULT_BLOCK = 1024

DELTA = [Interval(float, 0, None, closed="neither")]
RULE = [Options(*SATURATION_RULES)]
CONV_METHOD = [Options(*CONV_METHODS)]
DDOF = [Interval(int, 0, None)]
LAYERS = [None, str]


def run_block_size(lake: Lake, run_id: str, block_size: int | None) -> int:
    """``block_size``, or the run's ``eval_batch_size`` (so blocks are its eval batches)."""
    if block_size is not None:
        return block_size
    return int(lake.info(run_id).config.get("eval_batch_size", DEFAULT_BLOCK))


def observation_widths(
    model: torch.nn.Module, names: Sequence[str], conv_method: str, run: RunInput, split: str
) -> list[int]:
    """The observation dimension ``d`` of each named layer, from one forward of the first
    example of the run's ``split``."""
    x = torch.as_tensor(run.split(split).x[:1], dtype=torch.float32)
    modules = dict(model.named_modules())
    widths: dict[str, int] = {}

    def hook(name: str):
        def record(module, inputs, output):
            features = output[0] if isinstance(output, tuple) else output
            features = getattr(features, "data", features)  # a PackedSequence
            widths[name] = int(layer_observations(features, module, conv_method).shape[1])

        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [name for name in names if name not in widths]
    if missing:
        raise UserInputError(f"layer(s) {', '.join(missing)} are not called by the forward")
    return [widths[name] for name in names]


def selected_layers(lake: Lake, run_id: str, layers: str | None) -> tuple[torch.nn.Module, list]:
    """The run's architecture and the names of the feature layers ``layers`` selects
    (refused with the known names when it selects none)."""
    model = build_run_model(lake, run_id)
    return model, [name for name, _ in feature_layers(model, layers)]


def block_moments_task(
    lake_url: str,
    run_id: str,
    checkpoint: int,
    c: int,
    rows: slice,
    b: int,
    options: dict,
    arrays: dict,
    done,
    task_index: int,
) -> int:
    block = load_block(lake_url, run_id, checkpoint, options["split"], rows, options["dtype"])
    model = copy.deepcopy(block.model)  # hooks on a private copy: tasks may share the cache
    recorder = SaturationRecorder(
        model, layers=options["layers"], conv_method=options["conv_method"]
    )
    with attach(model, [recorder], "eval"), torch.no_grad():
        model(block.x)
    recorder.end_epoch(0)
    parts = [recorder.moments[("eval", name)] for name in options["names"]]
    arrays["count"][c, b] = np.array([m.count for m in parts], dtype=np.int64)
    arrays["mean"][c, b] = np.concatenate([m.mean for m in parts])
    arrays["m2"][c, b] = np.concatenate([m.m2.ravel() for m in parts])
    done[task_index] = 1
    return task_index


def moment_arrays(work, n_checkpoints: int, n_blocks: int, widths: Sequence[int]) -> dict:
    """The staged per-(checkpoint, block) moments of every layer (one chunk per task)."""
    shapes = {
        "count": (len(widths), "int64"),
        "mean": (int(sum(widths)), "float64"),
        "m2": (int(np.sum(np.square(widths))), "float64"),
    }
    return {
        name: require_work_array(
            work, name, (n_checkpoints, n_blocks, width), dtype, (1, 1, max(1, width))
        )
        for name, (width, dtype) in shapes.items()
    }


def merged_moments(arrays: dict, c: int, n_blocks: int, widths: list[int]) -> list[Moments]:
    """The moments of each layer over the blocks of checkpoint ``c``, merged in block order."""
    trees = [MomentsTree() for _ in widths]
    mean_at = np.concatenate([[0], np.cumsum(widths)])
    m2_at = np.concatenate([[0], np.cumsum(np.square(widths))])
    for b in range(n_blocks):
        count, mean, m2 = (np.asarray(arrays[name][c, b]) for name in ("count", "mean", "m2"))
        for layer, (tree, d) in enumerate(zip(trees, widths, strict=True)):
            tree.push(
                Moments.from_arrays(
                    count[layer],
                    mean[mean_at[layer] : mean_at[layer + 1]],
                    m2[m2_at[layer] : m2_at[layer + 1]].reshape(d, d),
                )
            )
    return [tree.result() for tree in trees]


@validate_params(
    {
        "split": SPLIT,
        "delta": DELTA,
        "rule": RULE,
        "ddof": DDOF,
        "conv_method": CONV_METHOD,
        "n_examples": [None, *POSITIVE_INT],
        "block_size": [None, *POSITIVE_INT],
        "dtype": DTYPE,
    }
)
def run_saturation(
    lake: Lake | str,
    run_id: str,
    *,
    checkpoints: str | Sequence[int] = "all",
    split: str = "test",
    delta: float = 0.99,
    rule: str = "textbook",
    ddof: int = 0,
    conv_method: str = "channelwise",
    layers: str | None = None,
    n_examples: int | None = None,
    block_size: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> str:
    """Saturation of the feature layers of ``run_id`` at its checkpoints, over a split.

    Args:
        lake: the lake (or its URL).
        run_id: a complete run.
        checkpoints: ``"all"`` or checkpoint indices.
        split: the examples (``train`` in eval mode without augmentation, ``val``, ``test``).
        delta: explained-variance threshold, > 0 (>= 1 keeps every dimension).
        rule: ``textbook`` (min k with p_k >= delta) or ``delve`` (delve 0.1.50's numbers).
        ddof: the covariance divides the centred scatter by ``n - ddof`` (delve: 0).
        conv_method: ``channelwise``, ``mean``, ``max`` or ``flatten``.
        layers: regular expression selecting the feature layers (None: all).
        n_examples: the first N examples of the split (None: all).
        block_size: examples per task (None: the run's ``eval_batch_size``, which makes the
            numbers those of the training's eval passes).
        dtype: ``float32`` (as trained) or ``float64`` forwards.

    Returns:
        The ``saturation`` artifact id (source ``checkpoints``; phase ``eval``).
    """
    lake = as_lake(lake)
    run = resolve_run(lake, run_id)
    chosen = run.checkpoint_indices(checkpoints)
    n = run.n_rows(split, n_examples)
    block_size = run_block_size(lake, run_id, block_size)
    blocks = block_slices(n, block_size)
    model, names = selected_layers(lake, run_id, layers)
    widths = observation_widths(model, names, conv_method, run, split)
    if n <= ddof:
        raise UserInputError(f"ddof={ddof} needs more than {ddof} examples, got {n}")

    options = {
        "split": split,
        "conv_method": conv_method,
        "layers": layers,
        "names": names,
        "dtype": dtype,
    }
    config = {
        "source": "checkpoints",
        "checkpoints": checkpoints if isinstance(checkpoints, str) else [int(c) for c in chosen],
        "split": split,
        "delta": float(delta),
        "rule": rule,
        "ddof": int(ddof),
        "conv_method": conv_method,
        "layers": layers,
        "n_examples": n,
        "block_size": block_size,
        "dtype": dtype,
    }
    writer = lake.begin("saturation", config, [run_id])
    if writer.complete:
        return writer.id
    with writer:
        arrays = moment_arrays(writer.work_group("moments"), len(chosen), len(blocks), widths)
        done = writer.progress("blocks", len(chosen) * len(blocks))
        pending = set(done.pending())
        tasks = [
            (lake.url, run_id, checkpoint, c, rows, b, options, arrays, done.array, t)
            for t, (c, checkpoint, b, rows) in enumerate(
                (c, checkpoint, b, rows)
                for c, checkpoint in enumerate(chosen)
                for b, rows in enumerate(blocks)
            )
            if t in pending
        ]
        run_tasks(block_moments_task, tasks, description="saturation", progress=progress)
        rows = [
            [
                layer_statistics(
                    merged_moments(arrays, c, len(blocks), widths),
                    delta=delta,
                    rule=rule,
                    ddof=ddof,
                )
            ]
            for c in range(len(chosen))
        ]
        epochs = np.asarray(run.checkpoint_epochs)[chosen]
        table = SaturationTable.from_rows(epochs, ("eval",), names, rows)
        writer.write_many({**table.arrays(), "checkpoint": np.asarray(chosen, dtype=np.int64)})
        writer.set_attrs(
            source="checkpoints",
            delta=float(delta),
            rule=rule,
            ddof=int(ddof),
            conv_method=conv_method,
            eval_split=split,
            layers_pattern=layers,
            n_examples=n,
            block_size=block_size,
            dtype=dtype,
        )
    return writer.commit()
