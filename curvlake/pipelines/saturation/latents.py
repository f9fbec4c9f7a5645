"""Latent representations of a checkpoint as a Dask pipeline: ``run_latents``.

Unlike phd-lab, which extracts the train split in train mode (BatchNorm batch statistics,
dropout) with augmentation and shuffling, every split is run in eval mode, unaugmented, in its
stored order, so the latents are a function of the checkpoint and the example alone. Tasks are
(split, example block): each runs its block through the model with forward hooks on the
selected feature layers, pools each output (:func:`pooled_features`), writes its rows of the
split's ``features`` array (one chunk) and marks its block done. Layers sit side by side in
module order, so one read of a block serves every layer's probe.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curvlake.engine import run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.nn.hooks import Recorder, attach
from curvlake.pipelines.saturation.compute import selected_layers
from curvlake.pipelines.skeleton import (
    DTYPE,
    POSITIVE_INT,
    as_lake,
    block_slices,
    load_block,
    resolve_run,
)
from curvlake.storage_schema.latents import LATENT_SPLITS
from curvlake.validation import Options, check, refuse_unused, validate_params

#: Default output size of the average pooling per spatial axis (phd-lab's ``extract_4``).
DEFAULT_POOL = 4
#: Rows run through the model in the driver to learn the layers' shapes and the compression.
_SAMPLE_ROWS = 64
#: Below this compressed / raw size ratio (zstd level 1 on a sample), features are compressed.
COMPRESSION_PAYS = 0.85


def pooled_features(output: Any, module: nn.Module | None, pool: int | None) -> torch.Tensor:
    """One layer's output per example, conv maps average-pooled to ``pool`` per spatial axis.

    A conv output ``(N, C, *spatial)`` goes through ``adaptive_avg_pool{1,2,3}d`` to
    ``(N, C, pool, ...)`` (phd-lab's extraction; ``pool=None`` keeps the full map, the
    pixelwise mode); a recurrent output sequence gives its last time step; anything else is
    returned as it is. Flattened per example (``reshape(N, -1)``), the order is
    ``(C, *spatial)``, as phd-lab's.
    """
    if isinstance(module, nn.RNNBase) and output.ndim == 3:
        batch_first = output if module.batch_first else output.transpose(0, 1)
        return batch_first[:, -1, :]
    if output.ndim >= 3 and pool is not None:
        spatial = output.ndim - 2
        if spatial > 3:
            raise UserInputError(f"cannot pool a {spatial}-d feature map")
        pooling = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
        output = pooling[spatial - 1](output, (pool,) * spatial)
    return output


class LatentRecorder(Recorder):
    """Keeps each selected layer's pooled, flattened float32 features of one forward."""

    def __init__(self, model: nn.Module, layers: str | None, pool: int | None) -> None:
        self.layers = layers
        self.pool = pool
        self.modules = dict(model.named_modules())
        self.features: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.calls: dict[str, int] = {}

    def record(self, layer: str, features: torch.Tensor, phase: str) -> None:
        self.calls[layer] = self.calls.get(layer, 0) + 1
        pooled = pooled_features(features, self.modules.get(layer), self.pool)
        self.shapes[layer] = tuple(int(s) for s in pooled.shape[1:])
        self.features[layer] = pooled.reshape(pooled.shape[0], -1).to(torch.float32)


def _forward(model: nn.Module, recorder: LatentRecorder, x: torch.Tensor) -> None:
    with attach(model, [recorder], "eval"), torch.no_grad():
        model(x)


def _zstd_pays(sample: np.ndarray) -> bool:
    """Whether zstd (level 1, as the lake's codec) shrinks a sample of features enough."""
    from numcodecs import Zstd

    raw = np.ascontiguousarray(sample).tobytes()
    if not raw:
        return False
    return len(Zstd(level=1).encode(raw)) < COMPRESSION_PAYS * len(raw)


def _extract_task(
    lake_url: str,
    run_id: str,
    checkpoint: int,
    split: str,
    rows: slice,
    options: dict,
    out,
    done,
    task_index: int,
) -> int:
    block = load_block(lake_url, run_id, checkpoint, split, rows, options["dtype"])
    model = copy.deepcopy(block.model)  # hooks on a private copy: tasks may share the cache
    recorder = LatentRecorder(model, options["layers"], options["pool"])
    _forward(model, recorder, block.x)
    features = torch.cat([recorder.features[name] for name in options["names"]], dim=1)
    out[rows] = features.cpu().numpy()
    done[task_index] = 1
    return task_index


@validate_params(
    {
        "pool": [None, *POSITIVE_INT],
        "n_examples": [None, *POSITIVE_INT],
        "block_size": [None, *POSITIVE_INT],
        "dtype": DTYPE,
        "compress": [Options(True, False, "auto")],
    }
)
def run_latents(
    lake: Lake | str,
    run_id: str,
    *,
    checkpoint: int = -1,
    splits: Sequence[str] = ("train", "test"),
    pool: int | None = None,
    pixelwise: bool = False,
    layers: str | None = None,
    n_examples: int | None = None,
    block_size: int | None = None,
    dtype: str = "float32",
    compress: bool | str = "auto",
    progress: bool = True,
) -> str:
    """Extract the latents of ``run_id`` at ``checkpoint`` for whole splits.

    Args:
        lake: the lake (or its URL).
        run_id: a complete run.
        checkpoint: checkpoint index (negative from the end).
        splits: split names, e.g. ``("train", "test")``.
        pool: output size per spatial axis of the adaptive average pooling of conv maps
            (default 4, phd-lab's); not with ``pixelwise``.
        pixelwise: keep conv maps unpooled (every position's channels).
        layers: regular expression selecting the feature layers (None: all).
        n_examples: the first N examples of each split (None: all).
        block_size: examples per task and per stored chunk (None: as many as fit the lake's
            chunk size).
        dtype: forward dtype (stored features are float32).
        compress: zstd-compress the features: True, False or ``"auto"`` (when a sample
            compresses below 85 %).

    Returns:
        The ``latents`` artifact id.
    """
    lake = as_lake(lake)
    if pixelwise:
        refuse_unused("with pixelwise (conv maps are kept whole)", pool=pool)
    elif pool is None:
        pool = DEFAULT_POOL
    if isinstance(splits, str) or not splits:
        raise UserInputError(f"splits={splits!r} is not valid: must be a list of split names")
    for split in splits:
        check("split", split, Options(*LATENT_SPLITS))
    if len(set(splits)) != len(splits):
        raise UserInputError(f"splits={list(splits)} names a split twice")
    run = resolve_run(lake, run_id)
    index = run.checkpoint_index(checkpoint)
    sizes = {split: run.n_rows(split, n_examples) for split in splits}
    model, names = selected_layers(lake, run_id, layers)
    sample_x = run.split(splits[0]).x[: min(_SAMPLE_ROWS, sizes[splits[0]])]
    recorder = LatentRecorder(model, layers, None if pixelwise else pool)
    _forward(model.eval(), recorder, torch.as_tensor(sample_x, dtype=torch.float32))
    repeated = [name for name in names if recorder.calls.get(name, 0) > 1]
    if repeated:
        raise UserInputError(
            f"layer(s) {', '.join(repeated)} run more than once per forward; leave them out "
            "with --layers"
        )
    missing = [name for name in names if name not in recorder.features]
    if missing:
        raise UserInputError(f"layer(s) {', '.join(missing)} are not called by the forward")
    widths = [int(recorder.features[name].shape[1]) for name in names]
    width = sum(widths)
    if block_size is None:
        block_size = max(1, min(max(sizes.values()), lake.chunk_bytes // (4 * width)))
    for split in splits:
        block_slices(sizes[split], block_size)
    if compress == "auto":
        sample = torch.cat([recorder.features[name] for name in names], dim=1).numpy()
        compress = _zstd_pays(sample)

    options = {
        "layers": layers,
        "names": names,
        "pool": None if pixelwise else pool,
        "dtype": dtype,
    }
    config = {
        "checkpoint": index,
        "splits": list(splits),
        "pool": None if pixelwise else int(pool),
        "pixelwise": bool(pixelwise),
        "layers": layers,
        "n_examples": n_examples,
        "block_size": block_size,
        "dtype": dtype,
        "compress": bool(compress),
    }
    writer = lake.begin("latents", config, [run_id])
    if writer.complete:
        return writer.id
    with writer:
        outputs = {
            split: writer.create_array(
                f"{split}_features",
                (sizes[split], width),
                "float32",
                chunks=(min(block_size, sizes[split]), width),  # no padded edge chunk
                compress=bool(compress),
            )
            for split in splits
        }
        work = [
            (split, rows) for split in splits for rows in block_slices(sizes[split], block_size)
        ]
        done = writer.progress("blocks", len(work))
        pending = set(done.pending())
        tasks = [
            (lake.url, run_id, index, split, rows, options, outputs[split], done.array, t)
            for t, (split, rows) in enumerate(work)
            if t in pending
        ]
        run_tasks(_extract_task, tasks, description="latents", progress=progress)
        offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
        small = {
            "layer": np.array(names, dtype=object),
            "feature_offset": offsets,
            "n_features": np.asarray(widths, dtype=np.int64),
            "layer_shape": np.array(
                [",".join(map(str, recorder.shapes[name])) for name in names], dtype=object
            ),
        }
        for split in splits:
            data = run.split(split)
            small[f"{split}_label"] = np.asarray(data.y[: sizes[split]], dtype=np.int64)
            small[f"{split}_sample_id"] = np.asarray(data.sample_id[: sizes[split]], dtype=np.int64)
        writer.write_many(small)
        writer.set_attrs(
            source="run",
            splits=list(splits),
            pool=None if pixelwise else int(pool),
            pixelwise=bool(pixelwise),
            num_classes=run.num_classes,
            checkpoint=index,
            checkpoint_epoch=run.checkpoint_epochs[index],
            layers_pattern=layers,
            compressed=bool(compress),
        )
    return writer.commit()
