"""The pipeline skeleton: what every method family's entry point and block tasks share.

An entry point ``run_<method>(lake, ...)`` resolves and checks its inputs here, at the
boundary, before anything is staged (:func:`require_artifact`, :func:`resolve_run`,
:meth:`RunInput.checkpoint_index`, :meth:`RunInput.n_rows`, and :func:`output_path` for files
written outside the lake); its Dask tasks start with the same prologue (:func:`load_block`:
the checkpoint's model, cached per worker process, and the rows of the block). So a method
family adds its kernels, its graph and its entry point, and reuses this.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from curvlake.constants import DTYPES, SPLITS
from curvlake.errors import IncompleteArtifactError, UserInputError
from curvlake.lake import ArtifactInfo, Lake, kind_of, open_lake
from curvlake.validation import Interval, Options, check

if TYPE_CHECKING:
    import torch

    from curvlake.nn.datasets import Split, Splits
    from curvlake.nn.params import LayerTable


def as_lake(lake: Lake | str) -> Lake:
    """A :class:`Lake` from a lake or its URL."""
    return open_lake(lake) if isinstance(lake, str) else lake


def require_artifact(lake: Lake, artifact_id: str, kind: str, role: str = "input") -> ArtifactInfo:
    """The catalog entry of a complete artifact of ``kind``; a clear error otherwise.

    Raises:
        UserInputError: not an artifact id, or an artifact of another kind.
        ArtifactNotFoundError, IncompleteArtifactError: missing or not complete.
    """
    if not isinstance(artifact_id, str):
        raise UserInputError(f"{role} must be an artifact id string, got {artifact_id!r}")
    kind_of(artifact_id)  # the id's form (no paths, no stray characters)
    info = lake.info(artifact_id)
    if info.kind != kind:
        raise UserInputError(
            f"{artifact_id} is a {info.kind} artifact, not a {kind} (the {role}; list them "
            f"with `curvlake lake ls --kind {kind}`)"
        )
    if info.status != "complete":
        raise IncompleteArtifactError(
            f"{artifact_id} is not complete (status: {info.status}); rerun the command that "
            "makes it to resume it, or remove it with `curvlake lake rm`"
        )
    return info


def output_path(path: str | Path, suffixes: Sequence[str] = ()) -> Path:
    """A file to write outside the lake, checked before any work: its folder exists and is
    writable, it is not a folder, and (with ``suffixes``, e.g. ``(".png", ".pdf")``) its suffix
    is one of them.

    Raises:
        UserInputError: saying which of these fails.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise UserInputError(f"cannot write {path}: it is a folder; give a file name")
    if not folder.is_dir():
        raise UserInputError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserInputError(f"cannot write {path}: folder {folder} is not writable")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserInputError(
            f"cannot write {path}: the file name must end in {', '.join(suffixes)}"
        )
    return path


@dataclass(frozen=True)
class RunInput:
    """A run of the lake, checked once: what pipelines need to know before staging anything."""

    lake_url: str
    run_id: str
    n_checkpoints: int
    checkpoint_epochs: tuple[int, ...]
    n_params: int
    num_classes: int
    input_shape: tuple[int, ...]
    theta_dtype: str

    def checkpoint_index(self, checkpoint: int) -> int:
        """The non-negative index of ``checkpoint`` (negative counts from the end)."""
        check(
            "checkpoint",
            checkpoint,
            Interval(int, -self.n_checkpoints, self.n_checkpoints - 1),
            context=f"run {self.run_id} has checkpoints 0..{self.n_checkpoints - 1}, "
            "or negative from the end",
        )
        return int(checkpoint) % self.n_checkpoints

    def checkpoint_indices(self, checkpoints: str | Sequence[int]) -> list[int]:
        """``"all"`` or a list of checkpoint indices, as non-negative indices without repeats."""
        if isinstance(checkpoints, str):
            if checkpoints != "all":
                raise UserInputError(
                    f"checkpoints={checkpoints!r} is not valid: must be 'all' or a list of "
                    "checkpoint indices"
                )
            return list(range(self.n_checkpoints))
        chosen = [self.checkpoint_index(c) for c in checkpoints]
        if not chosen:
            raise UserInputError("checkpoints is empty: give 'all' or checkpoint indices")
        if len(set(chosen)) != len(chosen):
            raise UserInputError(f"checkpoints={list(checkpoints)} names a checkpoint twice")
        return chosen

    def layer_table(self) -> LayerTable:
        """The layer table of the run's θ (where each tensor lives in the flat vector)."""
        from curvlake.nn.params import table_from_arrays

        group = open_lake(self.lake_url).group(self.run_id)
        return table_from_arrays({name: group[name][:] for name in ("layer", "layer_shape")})

    def theta(self, checkpoint: int) -> np.ndarray:
        """θ of a checkpoint (index checked), in the stored dtype."""
        index = self.checkpoint_index(checkpoint)
        return np.asarray(open_lake(self.lake_url).group(self.run_id)["theta"][index])

    def splits(self) -> Splits:
        """The data splits the run is analysed on (cached per process)."""
        from curvlake.pipelines.train import cached_run_splits

        return cached_run_splits(self.lake_url, self.run_id)

    def split(self, split: str) -> Split:
        check("split", split, Options(*SPLITS))
        return self.splits().split(split)

    def n_rows(self, split: str, n_examples: int | None) -> int:
        """How many examples of ``split`` an analysis uses: the first ``n_examples`` (all)."""
        available = len(self.split(split))
        if available == 0:
            raise UserInputError(f"the {split} split of run {self.run_id} has no examples")
        if n_examples is None:
            return available
        check(
            "n_examples",
            n_examples,
            Interval(int, 1, available),
            context=f"the {split} split of run {self.run_id} has {available} examples",
        )
        return int(n_examples)


def resolve_run(lake: Lake, run_id: str, *, needs_data: bool = True) -> RunInput:
    """Check that ``run_id`` is a complete run (with a dataset when ``needs_data``).

    Raises:
        UserInputError: not a run, or a run imported without a dataset (the message says how to
            attach one).
    """
    info = require_artifact(lake, run_id, "run", role="run")
    if needs_data and info.config.get("dataset") in (None, "unknown"):
        source = info.config.get("imported_from", "a file")
        raise UserInputError(
            f"run {run_id} was imported from {source} without a dataset, so there are no "
            f"examples to analyse; import it again with its data: `curvlake runs import FILE "
            "... --dataset dataset-<id>` (store arrays with `curvlake data import data.npz`) "
            "or `--dataset digits|mnist|cifar10|cifar100 [--data-dir DIR]`"
        )
    group = lake.group(run_id)
    theta = group["theta"]
    attrs = group.attrs
    return RunInput(
        lake_url=lake.url,
        run_id=run_id,
        n_checkpoints=int(theta.shape[0]),
        checkpoint_epochs=tuple(int(e) for e in group["checkpoint_epoch"][:]),
        n_params=int(theta.shape[1]),
        num_classes=int(attrs["num_classes"]),
        input_shape=tuple(int(s) for s in attrs["input_shape"]),
        theta_dtype=str(np.dtype(theta.dtype)),
    )


#: Constraints shared by the entry points (``validate_params``).
DTYPE = [Options(*DTYPES)]
SPLIT = [Options(*SPLITS)]
POSITIVE_INT = [Interval(int, 1, None)]
SEED = [Interval(int, 0, None)]


def block_slices(n: int, block_size: int) -> list[slice]:
    """Row slices of consecutive blocks of ``block_size`` (the last one may be shorter)."""
    check("block_size", block_size, *POSITIVE_INT)
    return [slice(start, min(n, start + block_size)) for start in range(0, n, block_size)]


@dataclass(frozen=True)
class Block:
    """What a block task works on: the model and the rows of its block, on the task's device."""

    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    sample_id: np.ndarray
    device: str


def load_block(
    lake_url: str, run_id: str, checkpoint: int, split: str, rows: slice, dtype: str
) -> Block:
    """The prologue of every block task: the checkpoint's model in ``dtype`` (loaded once per
    worker process and shared: do not modify it) and the block's inputs and labels."""
    import torch

    from curvlake.engine import torch_device
    from curvlake.lake.checkpoints import cached_model
    from curvlake.pipelines.train import cached_run_splits

    device = torch_device()
    data = cached_run_splits(lake_url, run_id).split(split)
    torch_dtype = getattr(torch, dtype)
    return Block(
        model=cached_model(lake_url, run_id, checkpoint, dtype, device),
        x=torch.as_tensor(data.x[rows], dtype=torch_dtype, device=device),
        y=torch.as_tensor(data.y[rows], device=device),
        sample_id=data.sample_id[rows],
        device=device,
    )
