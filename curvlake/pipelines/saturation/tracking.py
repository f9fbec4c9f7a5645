"""Saturation tracked during training, and the ``saturation`` artifact it is written into.

:class:`SaturationRecorder` is a layer recorder (:mod:`curvlake.nn.hooks`): every forward of a
tracked layer hands its output to it; it turns the output into observations
(:func:`layer_observations`), takes their float64 moments and merges them into one
:class:`MomentsTree` per (phase, layer). The tree merges the batches of an epoch in exactly the
grouping of :func:`~curvlake.pipelines.saturation.moments.merge_moments` over the batches in
order, so ``curvlake saturation compute`` (block moments merged by ``merge_moments``) gives
bit-identical numbers on the same batches.

During ``curvlake train --track saturation`` (:class:`TrainingTracker`), phase ``train`` is the
training forwards of an epoch (train mode, augmented, weights changing, as delve and phd-lab
record them) and phase ``eval`` the pass over the test split after it. At the end of each epoch
the statistics (spectrum, intrinsic dimension, saturation, trace) go into the run's staging work
area, one row per epoch, before that epoch's checkpoint is marked done; a killed run resumes
from its last checkpoint and rewrites the rows of the epochs it repeats, so every epoch is
stored exactly once. When the run is committed they become a ``saturation`` artifact whose
input is the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from curvlake.errors import LakeError, UserInputError
from curvlake.lake import Lake, artifact_id, create_work_array, write_regions
from curvlake.nn.hooks import Recorder, feature_layers
from curvlake.pipelines.saturation.moments import Moments, conv_features, sequence_features
from curvlake.pipelines.saturation.spectrum import saturation_statistics

if TYPE_CHECKING:
    import zarr

    from curvlake.nn.datasets import Splits
    from curvlake.nn.training import TrainConfig

#: phases of a tracked training run, as stored.
TRAINING_PHASES = ("train", "eval")
#: the split of the eval phase of a tracked training run (phd-lab: the test set).
TRAINING_EVAL_SPLIT = "test"


class MomentsTree:
    """Merges a stream of moments in the grouping of ``merge_moments`` over the whole stream.

    ``merge_moments`` pairs neighbours level by level, carrying an odd last element up. The
    same tree arises from a binary counter: a pushed part merges with the stack's top while
    both hold equally many parts, and :meth:`result` folds what is left from the right. Memory
    is ``O(log n)`` moments, so an epoch of batches (or a split of blocks) is reduced exactly
    as ``merge_moments(list_of_all_parts)`` would, without keeping the list.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, Moments]] = []

    def push(self, part: Moments) -> None:
        size = 1
        while self._stack and self._stack[-1][0] == size:
            _, left = self._stack.pop()
            part = left.merge(part)
            size *= 2
        self._stack.append((size, part))

    def __len__(self) -> int:
        return sum(size for size, _ in self._stack)

    def result(self) -> Moments:
        """The merged moments (the stack is kept, so more parts may follow)."""
        if not self._stack:
            raise UserInputError("no moments were recorded")
        merged = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            merged = left.merge(merged)
        return merged


def layer_observations(features: Any, module: nn.Module | None, conv_method: str) -> Any:
    """The ``(n, d)`` observation matrix of a layer's output, as delve records it.

    Linear outputs stay as they are, conv outputs are reshaped by ``conv_method``
    (:func:`~curvlake.pipelines.saturation.moments.conv_features`), and a recurrent layer's
    output sequence gives its last time step (sequence-first outputs are transposed first; a
    packed sequence arrives as its 2-D ``data``).
    """
    if isinstance(module, nn.RNNBase) and features.ndim == 3:
        batch_first = features if module.batch_first else features.transpose(0, 1)
        return sequence_features(batch_first, "last_timestep")
    if isinstance(features, torch.Tensor) and features.ndim == 4 and conv_method == "channelwise":
        # the float64 cast and the channels-last layout in one copy: the reshape is then free
        features = features.to(dtype=torch.float64, memory_format=torch.channels_last)
    return conv_features(features, conv_method)


class SaturationRecorder(Recorder):
    """Accumulates float64 moments of the tracked layers' outputs per (phase, layer).

    Args:
        model: the model whose layers are recorded (to know which are recurrent).
        layers: regular expression selecting the feature layers (``None``: all).
        conv_method: how conv outputs become observations.
        phases: recorder phase -> stored phase name; other phases (e.g. ``eval:val``) are
            ignored.

    ``moments`` holds the merged moments of the last finished epoch after ``end_epoch``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: str | None = None,
        conv_method: str = "channelwise",
        phases: Mapping[str, str] | None = None,
    ) -> None:
        self.layers = layers
        self.conv_method = conv_method
        self.phases = dict(phases or {"train": "train", "eval": "eval"})
        self.modules = dict(feature_layers(model, layers))
        self.names = list(self.modules)
        self._trees: dict[tuple[str, str], MomentsTree] = {}
        self.moments: dict[tuple[str, str], Moments] = {}

    def start_epoch(self, epoch: int) -> None:
        self._trees = {}

    def record(self, layer: str, features: torch.Tensor, phase: str) -> None:
        stored = self.phases.get(phase)
        if stored is None:
            return
        observations = layer_observations(features, self.modules.get(layer), self.conv_method)
        # a reshaped or cast copy in storage of its own is ours to centre in place
        scratch = (
            isinstance(observations, torch.Tensor)
            and observations.dtype == torch.float64
            and observations.untyped_storage().data_ptr() != features.untyped_storage().data_ptr()
        )
        self._trees.setdefault((stored, layer), MomentsTree()).push(
            Moments.from_batch(observations, scratch=scratch)
        )

    def end_epoch(self, epoch: int) -> None:
        self.moments = {key: tree.result() for key, tree in self._trees.items()}

    def reset(self) -> None:
        """Forget what was recorded (a fresh accumulation, e.g. for the next checkpoint)."""
        self._trees = {}
        self.moments = {}


def require_work_array(
    group: zarr.Group, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]
) -> zarr.Array:
    """Work array ``name`` of a staged artifact: created, or found (same shape) on resume."""
    shape = tuple(int(s) for s in shape)
    if name in group.array_keys():
        array = group[name]
        if tuple(array.shape) != shape:
            raise LakeError(
                f"staged work array {name!r} has shape {tuple(array.shape)}, this run needs "
                f"{shape}; remove the stale staging with `curvlake lake gc`"
            )
        return array
    return create_work_array(group, name, shape, dtype, chunks=chunks)


# ---------------------------------------------------------------------------------------------
# statistics tables


@dataclass(frozen=True)
class LayerStatistics:
    """The statistics of every layer for one (epoch, phase), as stored (layers in order)."""

    eigenvalue: np.ndarray  # (sum d,)
    intrinsic_dimension: np.ndarray  # (L,)
    saturation: np.ndarray
    trace: np.ndarray
    n_samples: np.ndarray
    n_features: np.ndarray


def layer_statistics(
    moments: Sequence[Moments], *, delta: float, rule: str, ddof: int
) -> LayerStatistics:
    """Spectrum statistics of each layer's moments (one entry per layer, in order)."""
    stats = [saturation_statistics(m, delta=delta, rule=rule, ddof=ddof) for m in moments]
    return LayerStatistics(
        eigenvalue=np.concatenate([s.eigenvalues for s in stats]),
        intrinsic_dimension=np.array([s.intrinsic_dimension for s in stats], dtype=np.int64),
        saturation=np.array([s.saturation for s in stats], dtype=np.float64),
        trace=np.array([s.trace for s in stats], dtype=np.float64),
        n_samples=np.array([s.n_samples for s in stats], dtype=np.int64),
        n_features=np.array([s.n_features for s in stats], dtype=np.int64),
    )


_STAT_ARRAYS = ("intrinsic_dimension", "saturation", "trace", "n_samples")


@dataclass
class SaturationTable:
    """Statistics over (epoch, phase, layer), ready to be written as a ``saturation`` artifact."""

    epochs: np.ndarray
    phases: tuple[str, ...]
    layers: list[str]
    n_features: np.ndarray
    eigenvalue: np.ndarray  # (epoch, phase, sum d)
    intrinsic_dimension: np.ndarray  # (epoch, phase, layer)
    saturation: np.ndarray
    trace: np.ndarray
    n_samples: np.ndarray

    @classmethod
    def from_rows(
        cls,
        epochs: Sequence[int],
        phases: Sequence[str],
        layers: Sequence[str],
        rows: Sequence[Sequence[LayerStatistics]],
    ) -> SaturationTable:
        """From ``rows[epoch][phase]``."""
        first = rows[0][0]

        def stack(name: str) -> np.ndarray:
            return np.stack([np.stack([getattr(s, name) for s in row]) for row in rows])

        return cls(
            epochs=np.asarray(epochs, dtype=np.int64),
            phases=tuple(phases),
            layers=list(layers),
            n_features=first.n_features,
            eigenvalue=stack("eigenvalue"),
            **{name: stack(name) for name in _STAT_ARRAYS},
        )

    def arrays(self) -> dict[str, np.ndarray]:
        offsets = np.concatenate([[0], np.cumsum(self.n_features)[:-1]]).astype(np.int64)
        return {
            "epoch": self.epochs,
            "phase": np.array(self.phases, dtype=object),
            "layer": np.array(self.layers, dtype=object),
            "n_features": np.asarray(self.n_features, dtype=np.int64),
            "eigen_offset": offsets,
            "eigenvalue": self.eigenvalue,
            **{name: getattr(self, name) for name in _STAT_ARRAYS},
        }


# ---------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class TrackingOptions:
    """The saturation options of a training config."""

    delta: float
    rule: str
    ddof: int
    conv_method: str
    layers: str | None

    @classmethod
    def of(cls, config: TrainConfig) -> TrackingOptions:
        return cls(
            delta=float(config.saturation_delta),
            rule=config.saturation_rule,
            ddof=int(config.saturation_ddof),
            conv_method=config.conv_method,
            layers=config.track_layers,
        )

    def artifact_config(self) -> dict[str, Any]:
        """The config of the run's ``saturation`` artifact."""
        return {
            "source": "training",
            "delta": self.delta,
            "rule": self.rule,
            "ddof": self.ddof,
            "conv_method": self.conv_method,
            "layers": self.layers,
            "eval_split": TRAINING_EVAL_SPLIT,
        }

    def attrs(self) -> dict[str, Any]:
        return {
            "source": "training",
            "delta": self.delta,
            "rule": self.rule,
            "ddof": self.ddof,
            "conv_method": self.conv_method,
            "eval_split": TRAINING_EVAL_SPLIT,
            "layers_pattern": self.layers,
        }


def tracked_saturation_id(run_id: str, config: TrainConfig) -> str:
    """The id of the ``saturation`` artifact a tracked run writes."""
    return artifact_id("saturation", TrackingOptions.of(config).artifact_config(), [run_id])


def check_tracked_layers(config: TrainConfig, model: nn.Module) -> None:
    """Refuse a ``track_layers`` pattern that selects no feature layer (before staging)."""
    if "saturation" in config.track:
        feature_layers(model, config.track_layers)


class TrainingTracker:
    """Saturation during training: the recorder, and the per-epoch rows in a work group.

    Args:
        config: the run's config (``track`` includes ``"saturation"``).
        model: the model being trained.
        store: the run's staging work group (``ArtifactWriter.work_group``) or None (kept in
            memory: a replay).
    """

    def __init__(self, config: TrainConfig, model: nn.Module, store: zarr.Group | None) -> None:
        self.options = TrackingOptions.of(config)
        self.n_epochs = int(config.epochs)
        self.recorder = SaturationRecorder(
            model,
            layers=self.options.layers,
            conv_method=self.options.conv_method,
            phases={"train": "train", f"eval:{TRAINING_EVAL_SPLIT}": "eval"},
        )
        self.store = store
        self._memory: dict[int, list[LayerStatistics]] = {}
        self._work: dict[str, zarr.Array] | None = None  # the work arrays, once opened

    @property
    def recorders(self) -> list[Recorder]:
        return [self.recorder]

    def _statistics(self) -> list[LayerStatistics]:
        rows = []
        for phase in TRAINING_PHASES:
            missing = [n for n in self.recorder.names if (phase, n) not in self.recorder.moments]
            if missing:
                raise LakeError(
                    f"saturation tracking: layer(s) {', '.join(missing)} produced no output in "
                    f"the {phase} phase of the epoch"
                )
            moments = [self.recorder.moments[(phase, n)] for n in self.recorder.names]
            rows.append(
                layer_statistics(
                    moments,
                    delta=self.options.delta,
                    rule=self.options.rule,
                    ddof=self.options.ddof,
                )
            )
        return rows

    def save_epoch(self, epoch: int) -> None:
        """Store the statistics of the epoch ending at checkpoint ``epoch`` (1-based)."""
        rows = self._statistics()
        if self.store is None:
            self._memory[epoch] = rows
            return
        if self._work is None:
            self._work = self._arrays(rows)
        arrays = self._work
        row = epoch - 1
        write_regions(
            [
                (arrays[name], row, np.stack([getattr(r, name) for r in rows]))
                for name in ("eigenvalue", *_STAT_ARRAYS)
            ]
        )
        arrays["epoch_done"][row] = 1  # last: the row counts once all of it is stored

    def _arrays(self, rows: list[LayerStatistics]) -> dict[str, zarr.Array]:
        store = self.store
        n_phases, n_layers = len(TRAINING_PHASES), len(self.recorder.names)
        total = int(rows[0].n_features.sum())
        shapes = {
            "eigenvalue": ((self.n_epochs, n_phases, total), "float64"),
            "intrinsic_dimension": ((self.n_epochs, n_phases, n_layers), "int64"),
            "saturation": ((self.n_epochs, n_phases, n_layers), "float64"),
            "trace": ((self.n_epochs, n_phases, n_layers), "float64"),
            "n_samples": ((self.n_epochs, n_phases, n_layers), "int64"),
            "epoch_done": ((self.n_epochs,), "uint8"),
            "n_features": ((n_layers,), "int64"),
        }
        fresh = "epoch_done" not in store.array_keys()
        arrays = {
            name: require_work_array(
                store, name, shape, dtype, shape if name == "n_features" else (1, *shape[1:])
            )
            for name, (shape, dtype) in shapes.items()
        }
        if fresh:
            arrays["n_features"][:] = rows[0].n_features
            arrays["epoch_done"][:] = 0
        return arrays

    def collect(self) -> SaturationTable:
        """Every epoch's statistics (all epochs must be done)."""
        epochs = list(range(1, self.n_epochs + 1))
        if self.store is None:
            rows = [self._memory[e] for e in epochs]
            return SaturationTable.from_rows(epochs, TRAINING_PHASES, self.recorder.names, rows)
        store = self.store
        done = np.asarray(store["epoch_done"][:]).astype(bool)
        if not done.all():
            missing = [e for e, ok in zip(epochs, done, strict=True) if not ok]
            raise LakeError(f"saturation tracking: epochs {missing} were not stored")
        return SaturationTable(
            epochs=np.asarray(epochs, dtype=np.int64),
            phases=TRAINING_PHASES,
            layers=list(self.recorder.names),
            n_features=np.asarray(store["n_features"][:]),
            eigenvalue=np.asarray(store["eigenvalue"][:]),
            **{name: np.asarray(store[name][:]) for name in _STAT_ARRAYS},
        )

    def write(self, lake: Lake, run_id: str, table: SaturationTable) -> str:
        """Write the run's ``saturation`` artifact (input: the complete run)."""
        writer = lake.begin("saturation", self.options.artifact_config(), [run_id])
        if writer.complete:
            return writer.id
        with writer:
            writer.write_many(table.arrays())
            writer.set_attrs(**self.options.attrs())
        return writer.commit()


def ensure_tracked_saturation(lake: Lake, run_id: str, config: TrainConfig, splits: Splits) -> str:
    """The tracked run's ``saturation`` artifact, written by replaying the training if missing.

    It is missing only when a run was killed between its own commit and the artifact's (a few
    milliseconds); training is deterministic, so replaying it in memory from the initial model
    gives the same statistics (bit-identical on CPU).
    """
    from curvlake.nn.training import make_model, make_optimizer, resolve_device, train_epochs

    target = tracked_saturation_id(run_id, config)
    try:
        if lake.info(target).status == "complete":
            return target
    except LakeError:
        pass
    device = resolve_device(config.device)
    model = make_model(config, num_classes=splits.num_classes, input_shape=splits.input_shape)
    model.to(device)
    optimizer = make_optimizer(model, config)
    tracker = TrainingTracker(config, model, None)
    train_epochs(
        model,
        optimizer,
        splits.train,
        config,
        device=device,
        eval_splits={TRAINING_EVAL_SPLIT: splits.split(TRAINING_EVAL_SPLIT)},
        pad_value=splits.pad_value,
        on_epoch_end=lambda epoch, metrics: tracker.save_epoch(epoch),
        recorders=tracker.recorders,
    )
    return tracker.write(lake, run_id, tracker.collect())


def training_saturation_id(lake: Lake, run_id: str) -> str:
    """The ``saturation`` artifact ``curvlake train --track saturation`` wrote for ``run_id``.

    Raises:
        UserInputError: the run was not trained with saturation tracking.
    """
    from curvlake.pipelines.skeleton import require_artifact
    from curvlake.pipelines.train import as_train_config

    stored = require_artifact(lake, run_id, "run", role="run").config
    config = as_train_config(stored) if "track" in stored else None
    if config is None or "saturation" not in config.track:
        raise UserInputError(
            f"run {run_id} was trained without --track saturation; compute the saturation of "
            f"its checkpoints with `curvlake saturation compute --run {run_id}`"
        )
    return tracked_saturation_id(run_id, config)
