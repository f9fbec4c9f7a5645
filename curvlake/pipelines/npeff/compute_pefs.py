"""Per-example Fishers of a checkpoint into the lake: ``run_pefs``, ``run_dsf``, ``run_filter``.

Tasks are blocks of examples. Each loads the checkpoint once per worker process, computes the
PEFs of its block with the kernels of :mod:`curvlake.pipelines.npeff.pefs`, and writes its own
chunk rows (values, indices, norms, logits), then marks its block done, so a killed computation
resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from curvlake.constants import DSF_MODES, PEF_KINDS, PEF_STORAGES
from curvlake.engine import run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import Lake, create_work_array
from curvlake.pipelines.npeff import pefs as kernels
from curvlake.pipelines.skeleton import (
    DTYPE,
    POSITIVE_INT,
    SEED,
    SPLIT,
    as_lake,
    block_slices,
    load_block,
    require_artifact,
    resolve_run,
)
from curvlake.validation import Interval, IntList, Options, check, refuse_unused, validate_params

_PROB = [None, Interval(float, 0, 1)]
#: Entries kept per example with top-k storage, when ``k`` is not given.
DEFAULT_TOP_K = 4096


def _pef_block(
    lake_url: str,
    run_id: str,
    checkpoint: int,
    split: str,
    rows: slice,
    outputs: dict,
    done,
    block_index: int,
    options: dict,
) -> int:
    block = load_block(lake_url, run_id, checkpoint, split, rows, options["dtype"])
    model, x = block.model, block.x
    common = {"dtype": getattr(torch, options["dtype"]), "device": block.device}
    kind, k = options["pef_kind"], options["k"]
    outputs["logits"][rows] = kernels.predict_logits(model, x, **common).cpu().numpy()
    if kind == "diag":
        f = kernels.per_example_fisher_diag(model, x, min_prob=options["min_prob"], **common)
        if options["storage"] == "dense":
            values, norm = kernels.dense_diag(f, dtype=common["dtype"])
            outputs["dense"][rows] = values.cpu().numpy()
        else:
            values, indices, norm = kernels.topk_sparsify_diag(f, k, dtype=common["dtype"])
            outputs["values"][rows] = values.cpu().numpy()
            outputs["indices"][rows] = indices.cpu().numpy()
    else:
        if kind == "lowrank":
            a = kernels.per_example_fisher_lowrank(
                model, x, top_k_classes=options["top_k_classes"], **common
            )
        else:
            a, rank, _ = kernels.per_example_fisher_lvrm(
                model, x, max_classes=options["max_classes"], min_prob=options["min_prob"], **common
            )
            outputs["rank"][rows] = rank.cpu().numpy()
        if options["storage"] == "dense":
            factors, norm = kernels.dense_lowrank(a, dtype=common["dtype"])
            outputs["factors"][rows] = factors.cpu().numpy()
        else:
            values, class_index, indices, norm = kernels.topk_sparsify_lowrank(
                a, k, dtype=common["dtype"]
            )
            outputs["values"][rows] = values.cpu().numpy()
            outputs["indices"][rows] = indices.cpu().numpy()
            outputs["class_index"][rows] = class_index.cpu().numpy()
    outputs["dense_norm"][rows] = norm.cpu().numpy()
    done[block_index] = 1
    return block_index


@validate_params(
    {
        "split": SPLIT,
        "n_examples": [None, *POSITIVE_INT],
        "pef_kind": [Options(*PEF_KINDS)],
        "k": [None, *POSITIVE_INT],
        "storage": [Options(*PEF_STORAGES)],
        "min_prob": _PROB,
        "top_k_classes": [None, *POSITIVE_INT],
        "max_classes": [None, *POSITIVE_INT],
        "block_size": POSITIVE_INT,
        "dtype": DTYPE,
    }
)
def run_pefs(
    lake: Lake | str,
    run_id: str,
    *,
    checkpoint: int = -1,
    split: str = "train",
    n_examples: int | None = None,
    pef_kind: str = "diag",
    k: int | None = None,
    storage: str = "topk",
    min_prob: float | None = None,
    top_k_classes: int | None = None,
    max_classes: int | None = None,
    block_size: int = 256,
    dtype: str = "float32",
    progress: bool = True,
) -> str:
    """Per-example Fishers of a run's checkpoint on the first ``n_examples`` of a split.

    Args:
        lake: the lake (or its URL).
        run_id: a run trained in the lake.
        checkpoint: checkpoint index (negative from the end).
        split: train (labels as trained), val or test.
        n_examples: how many examples (default: the whole split).
        pef_kind: ``diag`` (D-PEF), ``lowrank`` (LRM-PEF) or ``lvrm`` (variable rank).
        k: entries kept per example (``storage=topk``, default ``DEFAULT_TOP_K``; clipped to
            the number of entries); refused with ``storage=dense``.
        storage: ``topk`` (sparse) or ``dense`` (small models).
        min_prob: diag: drop classes with p < min_prob; lvrm: keep classes with p >= min_prob.
        top_k_classes: lowrank: keep the classes of the largest logits.
        max_classes: lvrm: at most this many classes per example.
        block_size: examples per task and per stored chunk row.
        dtype: ``float32`` or ``float64`` computation and storage.

    Returns:
        The ``pefs`` artifact id.
    """
    lake = as_lake(lake)
    run = resolve_run(lake, run_id)
    checkpoint = run.checkpoint_index(checkpoint)
    if pef_kind == "diag":
        refuse_unused(
            "to diag PEFs (they take --min-prob)",
            max_classes=max_classes,
            top_k_classes=top_k_classes,
        )
    if pef_kind == "lowrank":
        refuse_unused(
            "to lowrank PEFs (they take --top-k-classes)",
            min_prob=min_prob,
            max_classes=max_classes,
        )
    if pef_kind == "lvrm":
        refuse_unused(
            "to lvrm PEFs (they take --max-classes and --min-prob)", top_k_classes=top_k_classes
        )
        if max_classes is None or min_prob is None:
            raise UserInputError(
                "lvrm PEFs need both --max-classes M and --min-prob P: each example keeps its "
                "classes with p >= P, at most M of them"
            )
    if storage == "dense":
        refuse_unused("to --storage dense (it keeps every entry)", k=k)
    elif k is None:
        k = DEFAULT_TOP_K
    n_classes, n_params = run.num_classes, run.n_params
    for name, value in (("top_k_classes", top_k_classes), ("max_classes", max_classes)):
        check(name, value, None, Interval(int, 1, n_classes), context=f"{n_classes} classes")
    n = run.n_rows(split, n_examples)
    data = run.split(split)
    rows_per_example = 1 if pef_kind == "diag" else (top_k_classes or max_classes or n_classes)
    if storage == "topk":
        k = min(int(k), n_params * rows_per_example)
    config = {
        "checkpoint": checkpoint,
        "split": split,
        "n_examples": n,
        "pef_kind": pef_kind,
        "k": k if storage == "topk" else None,
        "storage": storage,
        "min_prob": min_prob,
        "top_k_classes": top_k_classes,
        "max_classes": max_classes,
        "block_size": block_size,
        **({"dtype": dtype} if dtype != "float32" else {}),
    }
    writer = lake.begin("pefs", config, [run_id])
    if writer.complete:
        return writer.id
    with writer:
        rows = (block_size,)
        outputs = {
            "logits": writer.create_array(
                "logits", (n, n_classes), dtype, chunks=(block_size, n_classes)
            ),
            "dense_norm": writer.create_array("dense_norm", (n,), dtype, chunks=rows),
        }
        if storage == "topk":
            index_dtype = "int32" if n_params < 2**31 else "int64"
            outputs["values"] = writer.create_array("values", (n, k), dtype, chunks=(block_size, k))
            outputs["indices"] = writer.create_array(
                "indices", (n, k), index_dtype, chunks=(block_size, k)
            )
            if pef_kind != "diag":
                outputs["class_index"] = writer.create_array(
                    "class_index", (n, k), "int32", chunks=(block_size, k)
                )
        elif pef_kind == "diag":
            outputs["dense"] = writer.create_array(
                "dense", (n, n_params), dtype, chunks=(block_size, n_params)
            )
        else:
            shape = (n, rows_per_example, n_params)
            outputs["factors"] = writer.create_array(
                "factors", shape, dtype, chunks=(block_size, *shape[1:])
            )
        if pef_kind == "lvrm":
            outputs["rank"] = writer.create_array("rank", (n,), "int64", chunks=rows)
        done = writer.progress("blocks", len(block_slices(n, block_size)))
        options = {
            "pef_kind": pef_kind,
            "k": k,
            "storage": storage,
            "min_prob": min_prob,
            "top_k_classes": top_k_classes,
            "max_classes": max_classes,
            "dtype": dtype,
        }
        blocks = block_slices(n, block_size)
        tasks = [
            (lake.url, run_id, checkpoint, split, blocks[b], outputs, done.array, b, options)
            for b in done.pending()
        ]
        run_tasks(_pef_block, tasks, description=f"{pef_kind} PEFs", progress=progress)
        writer.write("label", data.y[:n])
        writer.write("sample_id", data.sample_id[:n])
        writer.set_attrs(
            pef_kind=pef_kind,
            storage=storage if (storage == "topk" or pef_kind == "diag") else "dense_factors",
            n_parameters=n_params,
            num_classes=n_classes,
            run=run_id,
            checkpoint=checkpoint,
            split=split,
        )
    return writer.commit()


def _dsf_block(lake_url, run_id, checkpoint, split, rows, mode, seed, dtype, out, done, b) -> int:
    block = load_block(lake_url, run_id, checkpoint, split, rows, dtype)
    total, count = kernels.dataset_fisher_diag_sum(
        block.model,
        block.x,
        mode=mode,
        seed=seed,
        example_offset=rows.start,
        dtype=torch.float64,
        device=block.device,
    )
    out["sums"][b] = total.cpu().numpy()
    out["counts"][b] = count
    done[b] = 1
    return b


@validate_params(
    {
        "split": SPLIT,
        "n_examples": [None, *POSITIVE_INT],
        "mode": [Options(*DSF_MODES)],
        "seed": SEED,
        "block_size": POSITIVE_INT,
        "dtype": DTYPE,
    }
)
def run_dsf(
    lake: Lake | str,
    run_id: str,
    *,
    checkpoint: int = -1,
    split: str = "train",
    n_examples: int | None = None,
    mode: str = "expectation",
    seed: int = 0,
    block_size: int = 256,
    dtype: str = "float32",
    progress: bool = True,
) -> str:
    """Dataset-level diagonal Fisher (mean D-PEF, or sampled-label Fisher) as a ``dsf`` artifact.

    Block sums are computed as tasks and added in float64 in block order, so the result does
    not depend on the cluster; sampled labels are drawn per example from ``(seed, example)``.
    The model runs in ``dtype``; the sums are float64.
    """
    lake = as_lake(lake)
    run = resolve_run(lake, run_id)
    checkpoint = run.checkpoint_index(checkpoint)
    n = run.n_rows(split, n_examples)
    config = {
        "checkpoint": checkpoint,
        "split": split,
        "n_examples": n,
        "mode": mode,
        "seed": seed if mode == "sampling" else None,
        **({"dtype": dtype} if dtype != "float32" else {}),
    }
    writer = lake.begin("dsf", config, [run_id])
    if writer.complete:
        return writer.id
    blocks = block_slices(n, block_size)
    with writer:
        # Block sums are kept in the work area (resume) and added in block order (determinism).
        work = writer.work_group("sums")
        out = {
            "sums": create_work_array(
                work, "sums", (len(blocks), run.n_params), "float64", chunks=(1, run.n_params)
            )
            if "sums" not in work.array_keys()
            else work["sums"],
            "counts": create_work_array(work, "counts", (len(blocks),), "int64", chunks=(1,))
            if "counts" not in work.array_keys()
            else work["counts"],
        }
        done = writer.progress("blocks", len(blocks))
        tasks = [
            (lake.url, run_id, checkpoint, split, blocks[b], mode, seed, dtype, out, done.array, b)
            for b in done.pending()
        ]
        run_tasks(_dsf_block, tasks, description="DSF", progress=progress)
        total = np.zeros(run.n_params)
        for b in range(len(blocks)):
            total += out["sums"][b]
        count = int(np.asarray(out["counts"][:]).sum())
        fisher = total / count
        writer.write("fisher", fisher.astype(dtype))
        writer.set_attrs(
            mode=mode,
            n_examples=count,
            run=run_id,
            checkpoint=checkpoint,
            n_parameters=int(fisher.size),
        )
    return writer.commit()


def run_filter(
    lake: Lake | str,
    pefs_id: str,
    *,
    incorrect_only: bool = False,
    labels: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
) -> str:
    """A new ``pefs`` artifact with only the selected examples of ``pefs_id``."""
    lake = as_lake(lake)
    require_artifact(lake, pefs_id, "pefs", role="PEF artifact")
    if not (incorrect_only or labels is not None or indices is not None):
        raise UserInputError(
            "give at least one filter: --incorrect-only, --labels L1,L2 or --indices I1,I2"
        )
    source = lake.open(pefs_id)
    n = source.sizes["example"]
    check("labels", labels, None, IntList(Interval(int, 0, None)), context="--labels L1,L2")
    check(
        "indices",
        indices,
        None,
        IntList(Interval(int, 0, n - 1)),
        context=f"--indices: positions among the {n} examples of {pefs_id}",
    )
    keep = kernels.filter_examples(
        source["logits"].values,
        source["label"].values,
        incorrect_only=incorrect_only,
        labels_in=labels,
        indices=indices,
    )
    if keep.size == 0:
        given = [
            flag
            for flag, value in (
                ("--incorrect-only", incorrect_only or None),
                (f"--labels {','.join(map(str, labels or []))}", labels),
                (f"--indices {','.join(map(str, indices or []))}", indices),
            )
            if value is not None
        ]
        raise UserInputError(f"{' '.join(given)} keeps no example of {pefs_id}; nothing was stored")
    config = {
        "incorrect_only": bool(incorrect_only),
        "labels": None if labels is None else sorted(int(v) for v in labels),
        "indices": None if indices is None else sorted(int(v) for v in indices),
    }
    writer = lake.begin("pefs", config, [pefs_id])
    if writer.complete:
        return writer.id
    for name, variable in source.variables.items():
        if "example" in variable.dims:
            writer.write(name, variable.values[keep])
    writer.set_attrs(
        **{
            k: v
            for k, v in source.attrs.items()
            if not k.startswith("curvlake:") and k != "coordinates"
        },
        filtered_from=pefs_id,
    )
    return writer.commit()
