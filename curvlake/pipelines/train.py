"""Training runs into the lake: ``run_train`` writes (and resumes) one ``run`` artifact.

Checkpoint ``c`` of a run is written as one chunk row of ``theta``, ``opt_state`` and
``buffers``, then marked done in the ``checkpoints`` progress record. A killed run, restarted
with the same config, restores the last finished checkpoint (parameters, buffers, optimizer
state) and continues; since every epoch's randomness is derived from ``(seed, epoch)``, it ends
with exactly the weights of an uninterrupted run (on CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from curvlake.engine import current_client, run_tasks
from curvlake.errors import UserInputError
from curvlake.lake import ArtifactWriter, Lake, artifact_id, open_lake
from curvlake.lake.checkpoints import (
    LayerTable,
    assign_buffers,
    assign_parameters,
    buffer_table,
    flatten_buffers,
    flatten_optimizer_state,
    flatten_optimizer_window,
    flatten_parameters,
    optimizer_slots,
    optimizer_window_arrays,
    parameter_table,
    restore_optimizer_state,
    restore_optimizer_window,
)
from curvlake.nn.datasets import Splits
from curvlake.nn.params import table_arrays
from curvlake.nn.training import (
    TrainConfig,
    checkpoint_epochs,
    evaluate,
    load_training_data,
    make_model,
    make_optimizer,
    resolve_device,
    train_epochs,
    with_label_noise,
)
from curvlake.pipelines.data import is_dataset_id, load_dataset_artifact

if TYPE_CHECKING:
    from curvlake.pipelines.saturation.tracking import TrainingTracker

METRICS = (
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
)


#: Options of a run that say which data it is analysed on (trained and imported runs alike).
DATA_KEYS = (
    "dataset",
    "data_dir",
    "split_seed",
    "val_size",
    "standardize",
    "label_noise",
    "label_seed",
)
#: Entries of a run's stored config beyond its TrainConfig: the content hash of a data file.
DATA_HASH = "dataset_sha256"


def as_train_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """A validated ``TrainConfig`` from a config or a mapping of options (a run's stored config
    too: its data hash is not a training option)."""
    if isinstance(config, TrainConfig):
        return config
    return TrainConfig.from_dict({k: v for k, v in config.items() if k != DATA_HASH})


def stored_run_config(config: TrainConfig) -> dict[str, Any]:
    """The config a run is identified by: the training options, plus the sha256 of the data
    file when the dataset is an ``.npz`` path (so changed contents give a new run id)."""
    options = config.to_dict()
    if not options["mfac"]:
        del options["mfac"]  # runs of other optimizers keep the ids they had before M-FAC
    if config.dataset.endswith(".npz"):
        options[DATA_HASH] = _data_file_sha256(config.dataset)
    return options


def run_id_of(config: TrainConfig | Mapping[str, Any]) -> str:
    """The id of the run :func:`run_train` makes of ``config`` (to find it without training)."""
    config = as_train_config(config)
    inputs = [config.dataset] if is_dataset_id(config.dataset) else []
    return artifact_id("run", stored_run_config(config), inputs)


def _data_file_sha256(path: str) -> str:
    from curvlake.pipelines.data import file_sha256

    if not Path(path).is_file():
        raise UserInputError(f"dataset file {path} does not exist")
    return file_sha256(Path(path))


def training_data(
    lake: Lake, config: TrainConfig, data_sha256: str | None = None
) -> tuple[Splits, np.ndarray, list[str]]:
    """Splits with label noise applied, clean train labels, and the input artifact ids.

    ``data_sha256``: the content hash a run recorded for its ``.npz`` dataset; a file whose
    contents changed since is refused, never read as the run's data.
    """
    if is_dataset_id(config.dataset):
        splits = load_dataset_artifact(
            lake,
            config.dataset,
            split_seed=config.split_seed,
            val_size=config.val_size,
            standardize=config.standardize,
        )
        return with_label_noise(splits, config), splits.train.y, [config.dataset]
    if data_sha256 is not None and _data_file_sha256(config.dataset) != data_sha256:
        raise UserInputError(
            f"dataset file {config.dataset} has changed since the run was made (its sha256 is "
            f"not the recorded {data_sha256[:12]}...); restore the file, or train a new run on "
            "the new contents"
        )
    splits, clean = load_training_data(config)
    return splits, clean, []


def run_data(lake: Lake, config: Mapping[str, Any]) -> Splits:
    """The splits a run (trained or imported) is analysed on, from its stored config."""
    options = {k: config[k] for k in DATA_KEYS if k in config}
    splits, _, _ = training_data(lake, as_train_config(options), config.get(DATA_HASH))
    return splits


@functools.lru_cache(maxsize=4)
def cached_run_splits(lake_url: str, run_id: str) -> Splits:
    """The data splits of a run (noisy train labels), cached per process.

    Tasks of every pipeline read their example blocks from here, so a worker loads a dataset
    once.
    """
    lake = open_lake(lake_url)
    return run_data(lake, lake.info(run_id).config)


def model_tables(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The layer table (and buffer table, when the model has buffers) of a run, by array name."""
    arrays = table_arrays(parameter_table(model))
    buffers = buffer_table(model)
    if buffers.names:
        arrays["buffer"] = np.array(buffers.names, dtype=object)
        arrays["buffer_shape"] = buffers.shape_strings()
        arrays["buffer_dtype"] = np.array(buffers.dtypes, dtype=object)
    return arrays


def run_train(
    lake: Lake | str,
    config: TrainConfig | Mapping[str, Any],
    *,
    progress: bool = True,
    sources: Mapping[str, str] | None = None,
    echo: Callable[[str], None] | None = None,
) -> str:
    """Train one model, checkpointing into the lake; return the ``run`` artifact id.

    Rerunning with the same config returns the complete run, or resumes a killed one from its
    last finished checkpoint (``echo``, when given, is told ``resuming <id> at epoch E of N``).
    ``sources``: files the config came from (``{role: "path sha256:<hex>"}``, e.g. the
    ``--config`` file), recorded in the provenance; an ``.npz`` dataset is recorded there too,
    and its content hash is part of the id.
    """
    lake = open_lake(lake) if isinstance(lake, str) else lake
    config = as_train_config(config)
    resolve_device(config.device)  # a device this machine lacks is refused before staging
    stored = stored_run_config(config)
    splits, clean_labels, inputs = training_data(lake, config, stored.get(DATA_HASH))
    sources = dict(sources or {})
    if DATA_HASH in stored:
        sources["dataset"] = f"{config.dataset} sha256:{stored[DATA_HASH]}"
    if config.track:  # a layer pattern that selects nothing is refused before staging
        from curvlake.pipelines.saturation.tracking import check_tracked_layers

        shape = {"num_classes": splits.num_classes, "input_shape": splits.input_shape}
        check_tracked_layers(config, make_model(config, **shape))
    writer = lake.begin("run", stored, inputs, sources=sources)
    if writer.complete:
        if config.track:
            from curvlake.pipelines.saturation.tracking import ensure_tracked_saturation

            ensure_tracked_saturation(lake, writer.id, config, splits)
        return writer.id
    with writer:
        tracker = _train_into(writer, config, splits, clean_labels, progress, echo)
        tracked = tracker.collect() if tracker is not None else None
    run_id = writer.commit()
    if tracker is not None:  # its input, the run, must be complete first
        tracker.write(lake, run_id, tracked)
    return run_id


def _train_into(
    writer: ArtifactWriter,
    config: TrainConfig,
    splits: Splits,
    clean_labels: np.ndarray,
    progress: bool,
    echo: Callable[[str], None] | None = None,
) -> TrainingTracker | None:
    device = resolve_device(config.device)
    model = make_model(config, num_classes=splits.num_classes, input_shape=splits.input_shape)
    model.to(device)
    optimizer = make_optimizer(model, config)
    tracker = None
    if config.track:
        from curvlake.pipelines.saturation.tracking import TrainingTracker

        tracker = TrainingTracker(config, model, writer.work_group("saturation"))
    epochs = checkpoint_epochs(config)
    n_params = parameter_table(model).total
    n_buffers = buffer_table(model).total
    slots = optimizer_slots(optimizer)
    steps_per_epoch = -(-len(splits.train) // config.batch_size)

    theta = writer.create_array("theta", (len(epochs), n_params))
    opt_state = writer.create_array("opt_state", (len(epochs), len(slots), n_params))
    buffers = writer.create_array("buffers", (len(epochs), n_buffers)) if n_buffers else None
    # State that is not per parameter (M-FAC's gradient window), one chunk row per checkpoint.
    opt_window = {
        name: writer.create_array(name, (len(epochs), *shape), dtype)
        for name, (shape, dtype) in optimizer_window_arrays(optimizer).items()
    }
    done = writer.progress("checkpoints", len(epochs))
    # Metrics so far ride along as one attribute of the progress record (one small write per
    # checkpoint instead of one per metric); they become arrays when the run completes.
    saved = done.array.attrs.get("history", {})
    history = {
        m: np.array([np.nan if v is None else v for v in saved[m]])
        if m in saved
        else np.full(config.epochs + 1, np.nan)
        for m in METRICS
    }

    finished = int(np.argmin(np.append(done.done(), False)))  # contiguous finished prefix
    if finished:
        index = finished - 1
        assign_parameters(model, theta[index])
        if buffers is not None:
            assign_buffers(model, buffers[index])
        restore_optimizer_state(optimizer, opt_state[index], epochs[index] * steps_per_epoch)
        restore_optimizer_window(optimizer, {k: v[index] for k, v in opt_window.items()})
        start_epoch = epochs[index]
        if echo is not None:
            echo(f"resuming {writer.id} at epoch {start_epoch} of {config.epochs}")
    else:
        start_epoch = 0
        for split in ("val", "test"):
            result = evaluate(
                model, splits.split(split).x, splits.split(split).y, config.eval_batch_size, device
            )
            history[f"{split}_loss"][0] = result["loss"]
            history[f"{split}_accuracy"][0] = result["accuracy"]

    def save(epoch: int) -> None:
        index = epochs.index(epoch)
        theta[index] = flatten_parameters(model)
        if buffers is not None:
            buffers[index] = flatten_buffers(model)
        opt_state[index] = flatten_optimizer_state(optimizer)
        for name, values in flatten_optimizer_window(optimizer).items():
            opt_window[name][index] = values
        done.array.attrs["history"] = {
            name: [None if np.isnan(v) else float(v) for v in values]
            for name, values in history.items()
        }
        done.mark_done(index)  # last: a checkpoint counts only once all of it is stored

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        for name in METRICS:
            history[name][epoch] = metrics.get(name, np.nan)
        if tracker is not None:  # before the checkpoint: a done checkpoint has its epochs' rows
            tracker.save_epoch(epoch)
        if epoch in epochs:
            save(epoch)

    if not finished:
        save(0)
    train_epochs(
        model,
        optimizer,
        splits.train,
        config,
        start_epoch=start_epoch,
        device=device,
        eval_splits={"val": splits.val, "test": splits.test},
        pad_value=splits.pad_value,
        on_epoch_end=on_epoch_end,
        progress=progress,
        recorders=tracker.recorders if tracker is not None else (),
    )
    writer.write_many(
        {
            "opt_slot": np.array(slots, dtype=object),
            "opt_step": np.array(epochs, dtype=np.int64) * steps_per_epoch,
            "checkpoint_epoch": np.array(epochs, dtype=np.int64),
            "epoch": np.arange(config.epochs + 1, dtype=np.int64),
            **history,
            **model_tables(model),
            "train_label": splits.train.y,
            "train_clean_label": clean_labels,
            "train_sample_id": splits.train.sample_id,
        }
    )
    writer.set_attrs(
        model=config.model,
        model_params=dict(config.model_params),
        dataset=config.dataset,
        num_classes=int(splits.num_classes),
        input_shape=[int(s) for s in splits.input_shape],
        optimizer=config.optimizer,
        standardize_mean=[float(v) for v in np.ravel(splits.mean)],
        standardize_std=[float(v) for v in np.ravel(splits.std)],
    )
    return tracker


def _train_task(lake_url: str, options: dict[str, Any]) -> str:
    torch.set_num_threads(1)  # one run per worker thread; parallelism comes from the cluster
    return run_train(lake_url, options, progress=False)


def run_grid(
    lake: Lake | str, configs: Sequence[TrainConfig | Mapping[str, Any]], *, progress: bool = True
) -> list[str]:
    """Train every config of a grid as one task each on the current Dask cluster.

    Complete runs are skipped (their ids are returned at once); killed ones resume.
    """
    lake = open_lake(lake) if isinstance(lake, str) else lake
    configs = [as_train_config(c) for c in configs]
    ids: dict[int, str] = {}
    if current_client() is None:
        return [run_train(lake, c, progress=progress) for c in configs]
    tasks = [(i, lake.url, c.to_dict()) for i, c in enumerate(configs)]

    def record(args, result):
        ids[args[0]] = result

    run_tasks(
        lambda i, url, options: _train_task(url, options),
        tasks,
        description="runs",
        on_result=record,
        progress=progress,
    )
    return [ids[i] for i in range(len(configs))]


__all__ = [
    "LayerTable",
    "as_train_config",
    "run_grid",
    "run_id_of",
    "run_train",
    "training_data",
]
