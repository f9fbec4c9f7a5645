"""Parameter masks in the lake: magnitude masks, imported masks, and masks other pipelines write.

Every ``mask`` artifact indexes the parameter space of one run (its layer table is stored with
the mask and its fingerprint checked against the run's), so a mask read back combines only with
quantities of the same θ. Inputs are checked before anything is staged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curvlake.errors import UserInputError
from curvlake.lake import ArtifactWriter, Lake, kind_of
from curvlake.nn.masks import ParameterMask, magnitude_counts
from curvlake.nn.params import LayerTable, table_arrays, table_from_arrays
from curvlake.pipelines.data import file_sha256
from curvlake.pipelines.skeleton import as_lake, require_artifact, resolve_run


def run_table(lake: Lake, run_id: str) -> LayerTable:
    """The layer table of a run's θ."""
    return resolve_run(lake, run_id, needs_data=False).layer_table()


def _fill(writer: ArtifactWriter, mask: ParameterMask, attrs: Mapping[str, Any]) -> None:
    """Write the arrays and attributes of a mask artifact."""
    writer.write_many(
        {"index": mask.indices, **table_arrays(mask.table), "layer_count": mask.count_per_layer()}
    )
    writer.set_attrs(
        n_params=mask.table.total, parameter_fingerprint=mask.table.fingerprint, **attrs
    )


def run_magnitude_mask(
    lake: Lake | str,
    run_id: str,
    *,
    checkpoint: int = -1,
    size: int | None = None,
    fraction: float | None = None,
    scope: str = "global",
    layers: str | None = None,
) -> str:
    """The largest-magnitude coordinates of a run's checkpoint as a ``mask`` artifact.

    See :meth:`curvlake.nn.masks.ParameterMask.magnitude` for the definition (global top-m, or
    per tensor with a proportional split of ``size``; ties to the lower index).

    Args:
        lake: the lake (or its URL).
        run_id: a run artifact.
        checkpoint: checkpoint index (negative: from the end).
        size: number of coordinates kept.
        fraction: share of the selected coordinates kept, in [0, 1].
        scope: ``global`` or ``layer``.
        layers: regular expression selecting tensors by name (default: all).

    Returns:
        The mask id, a function of the run, the checkpoint and the options: the same inputs
        return the same (existing) artifact.

    Raises:
        UserInputError: an unknown run, another kind of artifact, a bad checkpoint, or bad
            options (exactly one of ``size`` / ``fraction``, ranges, scope, pattern).
    """
    lake = as_lake(lake)
    run = resolve_run(lake, run_id, needs_data=False)
    index = run.checkpoint_index(checkpoint)
    table = run.layer_table()
    magnitude_counts(table, size=size, fraction=fraction, scope=scope, layers=layers)
    config = {
        "source": "magnitude",
        "checkpoint": index,
        "size": None if size is None else int(size),
        "fraction": None if fraction is None else float(fraction),
        "scope": scope,
        "layers": layers,
    }
    writer = lake.begin("mask", config, [run_id])
    if writer.complete:
        return writer.id
    with writer:
        theta = lake.group(run_id)["theta"][index]
        mask = ParameterMask.magnitude(
            theta, table, size=size, fraction=fraction, scope=scope, layers=layers
        )
        _fill(
            writer,
            mask,
            {"source": "magnitude", "scope": scope, "run": run_id, "checkpoint": index},
        )
    return writer.commit()


def import_mask(lake: Lake | str, path: str | Path, run_id: str) -> str:
    """Store a mask file (see :meth:`ParameterMask.from_file`) for a run's parameter space.

    The id derives from the file's content (sha256) and the run, not from its path.

    Raises:
        UserInputError: an unknown run, another kind of artifact, or a file that is not a
            valid mask of the run's parameters.
    """
    lake = as_lake(lake)
    table = run_table(lake, run_id)
    path = Path(path)
    mask = ParameterMask.from_file(path, table)
    config = {"source": "file", "file_sha256": file_sha256(path), "format": path.suffix[1:]}
    writer = lake.begin("mask", config, [run_id])
    if writer.complete:
        return writer.id
    attrs = {"source": "file", "scope": None, "run": run_id, "checkpoint": None, "file": str(path)}
    with writer:
        _fill(writer, mask, attrs)
    return writer.commit()


def write_mask(
    lake: Lake | str,
    mask: ParameterMask,
    *,
    source: str,
    config: Mapping[str, Any],
    inputs: Sequence[str],
    run: str | None = None,
    checkpoint: int | None = None,
    scope: str | None = None,
) -> str:
    """Store a mask computed by a pipeline (e.g. a pruner); return its id.

    The id derives from ``source``, ``config`` and ``inputs`` as for every artifact, so the
    pipeline's config must determine the mask; a complete artifact with that id is returned
    as is.

    Args:
        lake: the lake (or its URL).
        mask: the mask; its layer table must be the run's.
        source: the producing pipeline's name (the ``source`` attribute).
        config: the pipeline's config (JSON-able).
        inputs: the ids of the input artifacts.
        run: the run whose parameter space the mask indexes (default: the first run among
            ``inputs``).
        checkpoint: the checkpoint index it was computed from, if any.
        scope: ``global`` / ``layer`` when meaningful for the source.

    Raises:
        UserInputError: no run, an unknown run or input, a mask of another parameter space,
            a config whose ``source`` differs.
    """
    lake = as_lake(lake)
    if not isinstance(mask, ParameterMask):
        raise UserInputError(f"write_mask needs a ParameterMask, got {type(mask).__name__}")
    if not isinstance(source, str) or not source:
        raise UserInputError(f"source={source!r} must be a non-empty pipeline name")
    if config.get("source", source) != source:
        raise UserInputError(f"config has source={config['source']!r} but source={source!r}")
    inputs = list(inputs)
    if run is None:
        run = next((i for i in inputs if kind_of(i) == "run"), None)
        if run is None:
            raise UserInputError("write_mask needs run= or a run among inputs")
    run_input = resolve_run(lake, run, needs_data=False)
    for artifact in inputs:
        lake.info(artifact)  # a clear error for an unknown input
    table = run_input.layer_table()
    if mask.table.fingerprint != table.fingerprint:
        raise UserInputError(
            f"the mask indexes parameters {mask.table.fingerprint} ({mask.table.total}), "
            f"run {run} has {table.fingerprint} ({table.total})"
        )
    if checkpoint is not None:
        checkpoint = run_input.checkpoint_index(checkpoint)
    writer = lake.begin("mask", {**config, "source": source}, inputs)
    if writer.complete:
        return writer.id
    attrs = {"source": source, "scope": scope, "run": run, "checkpoint": checkpoint}
    with writer:
        _fill(writer, mask, attrs)
    return writer.commit()


def load_mask(lake: Lake | str, mask_id: str) -> ParameterMask:
    """The :class:`ParameterMask` of a ``mask`` artifact."""
    lake = as_lake(lake)
    require_artifact(lake, mask_id, "mask", role="mask")
    group = lake.group(mask_id)
    table = table_from_arrays({name: group[name][:] for name in ("layer", "layer_shape")})
    return ParameterMask(table, np.asarray(group["index"][:], dtype=np.int64))
