"""Layers: saturation, probe accuracy and receptive field of one run's layers, over epochs.

PHD-LAB's thesis (Richter et al. 2021, "Size Matters", "Should You Go Deeper?") joins three
per-layer quantities: layers after the *border layer* (the first whose minimum receptive field
covers the input) form a tail of low saturation where linear-probe accuracy stops rising. Here
they are put on one layer axis: the saturation of a ``saturation`` artifact (one phase), the
probe accuracy of ``probes`` artifacts (one per checkpoint, placed at the checkpoint's epoch
through their ``latents``), and the receptive fields and border layer of a
``receptive_field`` artifact. Layers are matched by name, in module order; a layer or epoch an
input does not cover is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from curvlake.constants import SPLITS
from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.pipelines.compare._inputs import check_equal, checkpoint_epoch, lineage_run
from curvlake.pipelines.skeleton import as_lake, require_artifact
from curvlake.validation import Options, validate_params


def _run_of(lake: Lake, artifact: str, run: str | None) -> str | None:
    """The run an input was computed from, checked against the run of the inputs before."""
    found = lineage_run(lake, artifact)
    if run is not None and found is not None:
        check_equal("run", (artifact, found), ("the other inputs", run))
    return found or run


def _saturation(
    lake: Lake, saturation_id: str, phase: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    require_artifact(lake, saturation_id, "saturation", role="saturation")
    ds = lake.open(saturation_id)
    phases = [str(p) for p in ds["phase"].values]
    if phase not in phases:
        raise UserInputError(f"{saturation_id} has the phases {phases}, not {phase!r}")
    values = ds["saturation"].values[:, phases.index(phase), :]
    return [str(n) for n in ds["layer"].values], np.asarray(ds["epoch"].values), values


def _probe_epoch(lake: Lake, probes_id: str, run: str | None) -> int:
    """The epoch of the checkpoint whose latents a probes artifact was fitted on."""
    latents = [i for i in lake.info(probes_id).inputs if lake.info(i).kind == "latents"]
    if not latents or run is None:
        raise UserInputError(
            f"{probes_id} was not fitted on latents of a run in the lake, so its epoch is unknown"
        )
    info = lake.info(latents[0])
    checkpoint = info.config.get("checkpoint", lake.group(latents[0]).attrs.get("checkpoint"))
    if checkpoint is None:
        raise UserInputError(f"{latents[0]} (the latents of {probes_id}) names no checkpoint")
    return checkpoint_epoch(lake, run, int(checkpoint))


def _check_shared_layers(sources: dict[str, list[str]]) -> None:
    names = list(sources)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            if not set(sources[first]) & set(sources[second]):
                raise UserInputError(
                    f"{first} and {second} have no layer in common (layers {sources[first][:6]} "
                    f"vs {sources[second][:6]}): not the same model"
                )


def _check_model(lake: Lake, rf_id: str, run: str) -> None:
    """A receptive field computed without a run must describe the run's model and input."""
    config, run_config = lake.info(rf_id).config, lake.info(run).config
    for key in ("model", "model_params"):
        if key in config and key in run_config:
            check_equal(key, (rf_id, config[key]), (run, run_config[key]))
    size = [int(s) for s in lake.group(rf_id).attrs["input_size"]]
    shape = [int(s) for s in lake.group(run).attrs["input_shape"]][1:]
    check_equal("input size", (rf_id, size), (run, shape))


@validate_params({"phase": [Options("train", "eval")], "probe_split": [Options(*SPLITS)]})
def run_layers(
    lake: Lake | str,
    *,
    saturation: str | None = None,
    probes: Sequence[str] = (),
    receptive_field: str | None = None,
    phase: str = "eval",
    probe_split: str = "test",
) -> str:
    """Saturation, probe accuracy and receptive field per layer of one run, over epochs.

    Args:
        lake: the lake (or its URL).
        saturation: a ``saturation`` artifact.
        probes: ``probes`` artifacts, each fitted on the latents of one checkpoint of the run.
        receptive_field: a ``receptive_field`` artifact of the run's model and input size.
        phase: saturation phase (``eval``: the pass over the eval split; ``train``).
        probe_split: the split of the probe accuracy.

    Returns:
        The ``comparison_layers`` artifact id.

    Raises:
        UserInputError: no input, an input of another kind, of another run or model (naming
            both and what differs), inputs without a layer in common, probes of one epoch
            twice.
    """
    lake = as_lake(lake)
    probes = list(probes)
    if saturation is None and not probes and receptive_field is None:
        raise UserInputError("give a saturation, probes or receptive_field artifact (or several)")
    run = None
    layers: dict[str, list[str]] = {}
    if receptive_field is not None:
        require_artifact(lake, receptive_field, "receptive_field", role="receptive_field")
        rf = lake.open(receptive_field)
        layers[receptive_field] = [str(n) for n in rf["layer"].values]
        run = _run_of(lake, receptive_field, run)
    sat = None
    if saturation is not None:
        sat = _saturation(lake, saturation, phase)
        layers[saturation] = sat[0]
        run = _run_of(lake, saturation, run)
    probe_rows: dict[int, tuple[str, dict[str, float]]] = {}
    for probes_id in probes:
        require_artifact(lake, probes_id, "probes", role="probes")
        run = _run_of(lake, probes_id, run)
        group = lake.group(probes_id)
        names = [str(n) for n in group["layer"][:]]
        layers[probes_id] = names
        epoch = _probe_epoch(lake, probes_id, run)
        if epoch in probe_rows:
            raise UserInputError(
                f"{probe_rows[epoch][0]} and {probes_id} are both probes of epoch {epoch}"
            )
        accuracy = np.asarray(group[f"{probe_split}_accuracy"][:], dtype=np.float64)
        probe_rows[epoch] = (probes_id, dict(zip(names, accuracy, strict=True)))
    if (
        receptive_field is not None
        and run is not None
        and lineage_run(lake, receptive_field) is None
    ):
        _check_model(lake, receptive_field, run)
    _check_shared_layers(layers)
    order = list(dict.fromkeys(name for names in layers.values() for name in names))
    epochs = sorted(set(sat[1].tolist() if sat else []) | set(probe_rows))
    column = {name: i for i, name in enumerate(order)}
    saturation_grid = np.full((len(epochs), len(order)), np.nan)
    if sat is not None:
        for e, epoch in enumerate(sat[1]):
            saturation_grid[epochs.index(int(epoch)), [column[n] for n in sat[0]]] = sat[2][e]
    probe_grid = np.full((len(epochs), len(order)), np.nan)
    for epoch, (_, accuracy) in probe_rows.items():
        for name, value in accuracy.items():
            probe_grid[epochs.index(epoch), column[name]] = value
    if receptive_field is not None:
        input_size = np.asarray(rf.attrs["input_size"], dtype=np.int64)
    else:
        shape = lake.group(run).attrs["input_shape"] if run is not None else []
        input_size = np.asarray(shape[1:], dtype=np.int64)
    fields = {}
    for name in ("r_min", "r_max"):
        grid = np.full((len(order), input_size.size), np.nan)
        if receptive_field is not None:
            grid[[column[n] for n in layers[receptive_field]]] = rf[name].values
        fields[name] = grid
    inputs = [a for a in (saturation, *probes, receptive_field) if a is not None]
    config = {"phase": phase, "probe_split": probe_split}
    writer = lake.begin("comparison_layers", config, inputs)
    if writer.complete:
        return writer.id
    with writer:
        writer.write_many(
            {
                "layer": np.array(order, dtype=object),
                "epoch": np.array(epochs, dtype=np.int64),
                "saturation": saturation_grid,
                "probe_accuracy": probe_grid,
                "receptive_field_min": fields["r_min"],
                "receptive_field_max": fields["r_max"],
                "input_size": input_size,
            }
        )
        writer.set_attrs(
            run=run,
            saturation=saturation,
            probes=probes,
            receptive_field=receptive_field,
            border_layer=rf.attrs.get("border_layer") if receptive_field is not None else None,
        )
    return writer.commit()
