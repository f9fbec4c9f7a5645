r"""Gradient windows into the lake: ``run_grad_window`` writes one ``grad_window`` artifact.

Gradient ``i`` of a window is the gradient of the mean cross-entropy over ``b`` examples of a
split at one checkpoint (eval mode, as the M-FAC pruner takes it),

    g_i = (1/b) Σ_{e ∈ B_i} ∇_θ ℓ(f(x_e; θ), y_e),

the mean of ``b`` per-example gradients (:func:`curvlake.autodiff.per_example_loss_grads`);
``b = 1`` gives per-example gradients. The batches ``B_i`` come from a stream of epochs over the
split: in order (``sequential``, each example at most once), or one permutation of the split
per epoch drawn from ``numpy.random.default_rng([seed, epoch])`` (``shuffled``, as many epochs
as ``m`` batches need); each epoch contributes ``⌊n / b⌋`` batches. So the window does not
depend on how it is cut into tasks or on the number of workers.

The window is read by column chunks holding all ``m`` rows (the M-FAC kernels contract over the
gradients), while it is computed by blocks of gradients. So it is written in two resumable
phases: tasks compute blocks of gradients into a scratch array of the staged artifact (chunks:
a block of rows × a column range), then tasks copy each column range, all rows, into ``gradient``.
Each task owns its chunks and marks its own progress block.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from curvlake.constants import GRAD_ORDERS
from curvlake.engine import run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import Lake, create_work_array, open_lake
from curvlake.nn.params import table_arrays
from curvlake.pipelines.skeleton import (
    DTYPE,
    POSITIVE_INT,
    SEED,
    SPLIT,
    RunInput,
    as_lake,
    block_slices,
    load_block,
    require_artifact,
    resolve_run,
)
from curvlake.validation import Interval, Options, check, refuse_unused, validate_params

__all__ = ["batch_positions", "check_window_batches", "loss_gradient_rows", "run_grad_window"]

#: Bytes of per-example gradients a task holds at once before averaging them into batches.
_PER_EXAMPLE_BYTES = 256 * 2**20


def batch_positions(
    n_examples: int,
    n_grads: int,
    batch_size: int,
    order: str,
    seed: int | None = None,
    *,
    start: int = 0,
) -> np.ndarray:
    """Positions in the split of the examples of gradients ``start .. start + n_grads - 1``.

    Gradient ``i`` is batch ``i mod k`` of epoch ``i // k`` (``k = ⌊n / b⌋`` batches per
    epoch): positions ``[jb, (j+1)b)`` of the split (``sequential``) or of the permutation
    ``default_rng([seed, epoch]).permutation(n)`` (``shuffled``).

    Returns:
        int64 (n_grads, batch_size).
    """
    per_epoch = n_examples // batch_size
    index = np.arange(start, start + n_grads, dtype=np.int64)
    epochs, batches = np.divmod(index, per_epoch)
    offsets = batches[:, None] * batch_size + np.arange(batch_size, dtype=np.int64)[None, :]
    if order == "sequential":
        return epochs[:, None] * n_examples + offsets
    out = np.empty((n_grads, batch_size), dtype=np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        permutation = np.random.default_rng([int(seed), int(epoch)]).permutation(n_examples)
        out[here] = permutation[offsets[here]]
    return out


def check_window_batches(
    run: RunInput, split: str, n_grads: int, batch_size: int, order: str, *, start: int = 0
) -> int:
    """Check that the split has the examples ``n_grads`` batches of ``batch_size`` need (from
    gradient ``start`` of the stream on); return the split's size.

    Raises:
        UserInputError: a batch larger than the split, or a sequential window that needs more
            than one pass over it.
    """
    n = run.n_rows(split, None)
    check(
        "batch_size",
        batch_size,
        Interval(int, 1, n),
        context=f"the {split} split of run {run.run_id} has {n} examples",
    )
    per_epoch = n // batch_size
    if order == "sequential" and start + n_grads > per_epoch:
        raise UserInputError(
            f"n_grads={n_grads} batches of {batch_size} need {(start + n_grads) * batch_size} "
            f"examples in sequential order, the {split} split has {n}: use order='shuffled' "
            "(a new permutation per pass) or fewer or smaller batches"
        )
    return n


def loss_gradient_rows(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    columns: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    r"""Mean-loss gradients of consecutive batches of ``batch_size`` examples.

    Row ``i`` is ``(1/b) Σ_{e<b} ∇_θ ℓ(x_{ib+e}, y_{ib+e})`` restricted to ``columns`` (θ
    coordinates; ``None``: all of θ). Per-example gradients are taken in pieces of at most
    about 256 MiB and averaged at once, so memory stays bounded.

    Returns:
        (len(x) / b, d) in ``dtype``, on the compute device.
    """
    from curvlake.autodiff import per_example_loss_grads

    n_rows = len(x) // batch_size
    n_params = sum(p.numel() for p in model.parameters())
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_piece = max(1, _PER_EXAMPLE_BYTES // (batch_size * n_params * itemsize))
    index = None if columns is None else torch.tensor(columns, device=device or x.device)
    parts = []
    for start in range(0, n_rows, per_piece):
        rows = slice(start * batch_size, min(n_rows, start + per_piece) * batch_size)
        grads = per_example_loss_grads(model, x[rows], y[rows], dtype=dtype, device=device)
        if index is not None:
            grads = grads[:, index]
        parts.append(grads.view(-1, batch_size, grads.shape[1]).mean(dim=1))
    return torch.cat(parts)


@functools.lru_cache(maxsize=4)
def _mask_columns(lake_url: str, mask_id: str) -> np.ndarray:
    from curvlake.pipelines.masks import load_mask

    return np.asarray(load_mask(open_lake(lake_url), mask_id).indices)


def _gradient_block(
    lake_url: str,
    run_id: str,
    checkpoint: int,
    split: str,
    positions: np.ndarray,
    mask_id: str | None,
    dtype: str,
    rows: slice,
    scratch,
    done,
    block_index: int,
) -> int:
    batch_size = positions.shape[1]
    block = load_block(lake_url, run_id, checkpoint, split, positions.reshape(-1), dtype)
    columns = None if mask_id is None else _mask_columns(lake_url, mask_id)
    grads = loss_gradient_rows(
        block.model,
        block.x,
        block.y,
        batch_size,
        columns=columns,
        dtype=getattr(torch, dtype),
        device=block.device,
    )
    scratch[rows] = grads.cpu().numpy()
    done[block_index] = 1
    return block_index


def _copy_columns(scratch, grad, columns: slice, done, chunk_index: int) -> int:
    grad[:, columns] = scratch[:, columns]
    done[chunk_index] = 1
    return chunk_index


def _checked_mask(lake: Lake, mask_id: str, run: RunInput) -> np.ndarray:
    from curvlake.pipelines.masks import load_mask

    require_artifact(lake, mask_id, "mask", role="mask")
    mask_run = lake.group(mask_id).attrs.get("run")
    if mask_run != run.run_id:
        raise UserInputError(
            f"mask {mask_id} indexes the parameters of run {mask_run}, not of run {run.run_id}: "
            f"make a mask of {run.run_id} (`curvlake mask magnitude|import --run {run.run_id}`)"
        )
    mask = load_mask(lake, mask_id)
    if mask.table.fingerprint != run.layer_table().fingerprint:
        raise UserInputError(f"mask {mask_id} does not index the parameters of run {run.run_id}")
    if len(mask) == 0:
        raise UserInputError(f"mask {mask_id} holds no coordinate: the window would be empty")
    return np.asarray(mask.indices)


@validate_params(
    {
        "n_grads": POSITIVE_INT,
        "batch_size": POSITIVE_INT,
        "split": SPLIT,
        "order": [Options(*GRAD_ORDERS)],
        "seed": [None, *SEED],
        "block_size": POSITIVE_INT,
        "param_chunk": [None, *POSITIVE_INT],
        "dtype": DTYPE,
    }
)
def run_grad_window(
    lake: Lake | str,
    run_id: str,
    *,
    n_grads: int,
    batch_size: int = 1,
    checkpoint: int = -1,
    split: str = "train",
    order: str = "sequential",
    seed: int | None = None,
    mask: str | None = None,
    block_size: int = 64,
    param_chunk: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> str:
    """A window of ``n_grads`` loss gradients of a run's checkpoint as a ``grad_window``.

    Args:
        lake: the lake (or its URL).
        run_id: a run of the lake (with its data).
        n_grads: m >= 1, the number of gradients.
        batch_size: b, examples averaged per gradient (1: per-example gradients), at most the
            split's size.
        checkpoint: checkpoint index (negative from the end).
        split: train (labels as trained), val or test.
        order: ``sequential`` (the split in order, m·b examples at most) or ``shuffled``
            (a permutation per pass from ``seed``).
        seed: seed of the shuffled order (default 0); refused with ``sequential``.
        mask: a ``mask`` artifact of the run: only its coordinates become columns.
        block_size: gradients per task (and per scratch chunk row).
        param_chunk: columns per stored chunk (default: about the lake's chunk size).
        dtype: ``float32`` or ``float64`` computation and storage.

    Returns:
        The ``grad_window`` artifact id (the same inputs return the same, complete, artifact;
        a killed computation resumes by blocks).

    Raises:
        UserInputError: bad values, a batch larger than the split, a sequential window
            needing more examples than the split has, a mask of another run.
    """
    lake = as_lake(lake)
    run = resolve_run(lake, run_id)
    checkpoint = run.checkpoint_index(checkpoint)
    if order == "sequential":
        refuse_unused("to order='sequential' (the examples are taken in order)", seed=seed)
    else:
        seed = 0 if seed is None else seed
    n = check_window_batches(run, split, n_grads, batch_size, order)
    columns = None if mask is None else _checked_mask(lake, mask, run)
    width = run.n_params if columns is None else int(columns.size)
    config = {
        "checkpoint": checkpoint,
        "split": split,
        "n_grads": n_grads,
        "batch_size": batch_size,
        "order": order,
        "seed": seed,
        "mask": mask,
        "block_size": block_size,
        "param_chunk": param_chunk,
        "dtype": dtype,
    }
    writer = lake.begin("grad_window", config, [run_id] + ([mask] if mask else []))
    if writer.complete:
        return writer.id
    positions = batch_positions(n, n_grads, batch_size, order, seed)
    with writer:
        chunks = (
            writer.spec.chunks_for("gradient", (n_grads, width), dtype, lake.chunk_bytes)
            if param_chunk is None
            else (n_grads, min(param_chunk, width))
        )
        grad = writer.create_array("gradient", (n_grads, width), dtype, chunks=chunks)
        work = writer.work_group("rows")
        scratch = (
            work["grad"]
            if "grad" in work.array_keys()
            else create_work_array(
                work, "grad", (n_grads, width), dtype, chunks=(block_size, chunks[1])
            )
        )
        blocks = block_slices(n_grads, block_size)
        done = writer.progress("gradient_blocks", len(blocks))
        tasks = [
            (lake.url, run_id, checkpoint, split, positions[blocks[b]], mask, dtype,
             blocks[b], scratch, done.array, b)
            for b in done.pending()
        ]  # fmt: skip
        run_tasks(_gradient_block, tasks, description="gradients", progress=progress)
        column_chunks = block_slices(width, chunks[1])
        copied = writer.progress("column_chunks", len(column_chunks))
        tasks = [(scratch, grad, column_chunks[c], copied.array, c) for c in copied.pending()]
        run_tasks(_copy_columns, tasks, description="window columns", progress=progress)
        data = run.split(split)
        small: dict[str, Any] = {
            "sample_id": np.asarray(data.sample_id)[positions],
            **table_arrays(run.layer_table()),
        }
        if columns is not None:
            small["param_index"] = columns
        writer.write_many(small)
        writer.set_attrs(
            selection="all" if columns is None else "mask",
            run=run_id,
            checkpoint=checkpoint,
            split=split,
            n_grads=n_grads,
            batch_size=batch_size,
            order=order,
            seed=seed,
            mask=mask,
            n_params=run.n_params,
            parameter_fingerprint=run.layer_table().fingerprint,
        )
    return writer.commit()
