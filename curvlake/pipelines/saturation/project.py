"""Layers projected onto their delta eigenspaces, then evaluated: ``run_saturation_project``.

phd-lab's ``infer_with_altering_delta.py`` inserts PCA layers after every tracked layer, fits
their eigenspaces during training and evaluates the test set at a sweep of thresholds. Here any
checkpoint can be swept:

1. Fit pass: tasks over example blocks of ``fit_split`` (default ``train``, in eval mode)
   store every tracked layer's float64 moments (the tasks of
   :func:`~curvlake.pipelines.saturation.compute.run_saturation`); merged, they give each
   layer's mean and eigenvectors, from the unprojected model as phd-lab's PCA layers see it.
2. For each delta, each layer's projector ``P = V_k V_k^T``
   (:func:`~curvlake.pipelines.saturation.spectrum.delta_projection`; with ``random``, also a
   random orthonormal projector of the same rank) is staged.
3. Evaluation pass: tasks over blocks of ``split`` run the model once per (variant, delta) with
   forward hooks replacing each tracked layer's output by ``mu + (x - mu) P``, all layers at
   once, and store the block's summed loss and correct count. delta >= 1 gives the identity,
   which leaves the output tensor itself in place: the unchanged model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from curvlake.constants import SPLITS
from curvlake.engine import run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.pipelines.saturation.compute import (
    CONV_METHOD,
    RULE,
    block_moments_task,
    merged_moments,
    moment_arrays,
    observation_widths,
    run_block_size,
    selected_layers,
)
from curvlake.pipelines.saturation.spectrum import (
    covariance_spectrum,
    delta_projection,
    project_features,
    random_projection_matrix,
)
from curvlake.pipelines.saturation.tracking import require_work_array
from curvlake.pipelines.skeleton import (
    DTYPE,
    POSITIVE_INT,
    SEED,
    as_lake,
    block_slices,
    load_block,
    resolve_run,
)
from curvlake.validation import Interval, Options, check, refuse_unused, validate_params

#: phd-lab's sweep, shortened: deltas of ``curvlake saturation project`` by default.
DEFAULT_DELTAS = (0.9, 0.95, 0.99, 0.999, 3.0)


def _eval_task(
    lake_url: str,
    run_id: str,
    checkpoint: int,
    rows: slice,
    b: int,
    options: dict,
    projections,
    means,
    sums,
    done,
) -> int:
    block = load_block(lake_url, run_id, checkpoint, options["split"], rows, options["dtype"])
    model = copy.deepcopy(block.model)  # hooks on a private copy: tasks may share the cache
    modules = dict(model.named_modules())
    names, widths = options["names"], options["widths"]
    at = np.concatenate([[0], np.cumsum(np.square(widths))])
    mean_at = np.concatenate([[0], np.cumsum(widths)])
    mean = np.asarray(means[:])
    out = np.zeros((projections.shape[0], 2))
    for row in range(projections.shape[0]):
        flat = np.asarray(projections[row])
        handles = []
        for layer, (name, d) in enumerate(zip(names, widths, strict=True)):
            p = flat[at[layer] : at[layer + 1]].reshape(d, d)
            mu = mean[mean_at[layer] : mean_at[layer + 1]]

            def project(module, inputs, output, p=p, mu=mu):
                return project_features(output, mu, p, options["conv_method"])

            handles.append(modules[name].register_forward_hook(project))
        try:
            with torch.no_grad():
                logits = model(block.x)
        finally:
            for handle in handles:
                handle.remove()
        loss = F.cross_entropy(logits.double(), block.y, reduction="sum")
        out[row] = (float(loss), float((logits.argmax(dim=1) == block.y).sum()))
    sums[b] = out
    done[b] = 1
    return b


@validate_params(
    {
        "split": [Options(*SPLITS)],
        "fit_split": [Options(*SPLITS)],
        "rule": RULE,
        "conv_method": CONV_METHOD,
        "seed": [None, *SEED],
        "n_examples": [None, *POSITIVE_INT],
        "block_size": [None, *POSITIVE_INT],
        "dtype": DTYPE,
    }
)
def run_saturation_project(
    lake: Lake | str,
    run_id: str,
    *,
    checkpoint: int = -1,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    random: bool = False,
    seed: int | None = None,
    fit_split: str = "train",
    split: str = "test",
    rule: str = "textbook",
    conv_method: str = "channelwise",
    layers: str | None = None,
    n_examples: int | None = None,
    block_size: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> str:
    """Loss and accuracy of ``run_id`` at ``checkpoint`` with its layers projected, per delta.

    Args:
        lake: the lake (or its URL).
        run_id: a complete run.
        checkpoint: checkpoint index (negative from the end).
        deltas: thresholds, each > 0 (>= 1: the unchanged layer).
        random: also evaluate random projections of the same ranks (the ablation).
        seed: seed of the random projections (``random`` only; default 0).
        fit_split: split whose outputs give the means and eigenvectors.
        split: split evaluated.
        rule: how delta becomes a rank (``textbook`` or ``delve``).
        conv_method: ``channelwise``/``mean``/``max`` project every position's channels (a
            1x1 convolution, as phd-lab's ``Conv2DPCALayer``), ``flatten`` whole maps.
        layers: regular expression selecting the projected feature layers (None: all).
        n_examples: the first N examples of both splits (None: all).
        block_size: examples per task (None: the run's ``eval_batch_size``).
        dtype: forward dtype.

    Returns:
        The ``saturation_projection`` artifact id.
    """
    lake = as_lake(lake)
    if isinstance(deltas, (str, bytes)) or not isinstance(deltas, Sequence) or not deltas:
        raise UserInputError(f"deltas={deltas!r} is not valid: must be a non-empty list")
    for delta in deltas:
        check("delta", delta, Interval(float, 0, None, closed="neither"))
    if not random:
        refuse_unused("without random (the seed of the random projections)", seed=seed)
    seed = 0 if seed is None else seed
    run = resolve_run(lake, run_id)
    index = run.checkpoint_index(checkpoint)
    n_fit = run.n_rows(fit_split, n_examples)
    n_eval = run.n_rows(split, n_examples)
    block_size = run_block_size(lake, run_id, block_size)
    fit_blocks, eval_blocks = block_slices(n_fit, block_size), block_slices(n_eval, block_size)
    model, names = selected_layers(lake, run_id, layers)
    modules = dict(model.named_modules())
    recurrent = [n for n in names if isinstance(modules[n], torch.nn.RNNBase)]
    if recurrent:
        raise UserInputError(
            f"recurrent layer(s) {', '.join(recurrent)} cannot be projected; leave them out "
            "with --layers"
        )
    widths = observation_widths(model, names, conv_method, run, split)
    deltas = [float(d) for d in deltas]

    config = {
        "checkpoint": index,
        "deltas": deltas,
        "random": bool(random),
        "seed": int(seed) if random else None,
        "fit_split": fit_split,
        "split": split,
        "rule": rule,
        "conv_method": conv_method,
        "layers": layers,
        "n_examples": n_examples,
        "block_size": block_size,
        "dtype": dtype,
    }
    writer = lake.begin("saturation_projection", config, [run_id])
    if writer.complete:
        return writer.id
    with writer:
        moments = moment_arrays(writer.work_group("moments"), 1, len(fit_blocks), widths)
        fit_done = writer.progress("fit_blocks", len(fit_blocks))
        fit_options = {
            "split": fit_split,
            "conv_method": conv_method,
            "layers": layers,
            "names": names,
            "dtype": dtype,
        }
        tasks = [
            (lake.url, run_id, index, 0, fit_blocks[b], b, fit_options, moments, fit_done.array, b)
            for b in fit_done.pending()
        ]
        run_tasks(block_moments_task, tasks, description="projection fit", progress=progress)

        fitted = merged_moments(moments, 0, len(fit_blocks), widths)
        variants = ["pca", "random"] if random else ["pca"]
        ranks = np.zeros((len(deltas), len(names)), dtype=np.int64)
        rows = []
        for variant in variants:
            for i, delta in enumerate(deltas):
                blocks_of_row = []
                for layer, m in enumerate(fitted):
                    spectrum = covariance_spectrum(m.covariance(ddof=0))
                    p, k = delta_projection(spectrum, delta, rule)
                    ranks[i, layer] = k
                    if variant == "random":
                        p = random_projection_matrix(widths[layer], k, [seed, layer, k])
                    blocks_of_row.append(p.ravel())
                rows.append(np.concatenate(blocks_of_row))
        work = writer.work_group("projections")
        total = int(np.sum(np.square(widths)))
        projections = require_work_array(
            work, "projection", (len(rows), total), "float64", (1, total)
        )
        means = require_work_array(work, "mean", (int(sum(widths)),), "float64", None)
        projections[:] = np.stack(rows)
        means[:] = np.concatenate([m.mean for m in fitted])
        sums = require_work_array(
            work, "sums", (len(eval_blocks), len(rows), 2), "float64", (1, len(rows), 2)
        )
        eval_done = writer.progress("eval_blocks", len(eval_blocks))
        eval_options = {
            "split": split,
            "conv_method": conv_method,
            "names": names,
            "widths": widths,
            "dtype": dtype,
        }
        shared = (eval_options, projections, means, sums, eval_done.array)
        tasks = [(lake.url, run_id, index, eval_blocks[b], b, *shared) for b in eval_done.pending()]
        run_tasks(_eval_task, tasks, description="projected evaluation", progress=progress)
        totals = np.asarray(sums[:]).sum(axis=0)  # (variant x delta, 2)
        per_row = totals / n_eval
        arrays = {
            "delta": np.asarray(deltas),
            "layer": np.array(names, dtype=object),
            "n_features": np.asarray(widths, dtype=np.int64),
            "intrinsic_dimension": ranks,
            "saturation": ranks / np.asarray(widths, dtype=np.float64),
            "loss": per_row[: len(deltas), 0],
            "accuracy": per_row[: len(deltas), 1],
        }
        if random:
            arrays["random_loss"] = per_row[len(deltas) :, 0]
            arrays["random_accuracy"] = per_row[len(deltas) :, 1]
        writer.write_many(arrays)
        writer.set_attrs(
            checkpoint=index,
            checkpoint_epoch=run.checkpoint_epochs[index],
            split=split,
            fit_split=fit_split,
            rule=rule,
            conv_method=conv_method,
            random=bool(random),
            seed=int(seed) if random else None,
            layers_pattern=layers,
        )
    return writer.commit()
