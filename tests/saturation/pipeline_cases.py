"""Tiny runs, latents and phd-lab files for the saturation pipeline tests."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from curvlake.lake import Lake
from curvlake.pipelines.train import run_train

#: cnn5_k with 2, 4, 8, 16 channels on the 8x8 digits: four conv layers and the classifier.
TINY_CNN = {
    "model": "cnn5_k",
    "model_params": {"k": 2},
    "dataset": "digits",
    "epochs": 1,
    "batch_size": 128,
    "eval_batch_size": 100,
    "optimizer": "adam",
    "lr": 0.01,
    "device": "cpu",
}


def train_tiny_cnn(lake: Lake, **changes: Any) -> str:
    """A cnn5_k (k=2) on digits, one epoch by default (about a second)."""
    return run_train(lake, {**TINY_CNN, **changes}, progress=False)


def write_stream(path: Path, batches: list[np.ndarray]) -> None:
    """A phd-lab pickle stream: one ``pickle.dump`` per batch."""
    with open(path, "wb") as handle:
        for batch in batches:
            pickle.dump(batch, handle)


def planted_latents(
    n_train: int = 90, n_test: int = 40, classes: int = 3, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Per-split features of two layers (``conv1`` 6 wide, ``fc`` 4 wide) that predict the
    labels linearly but not perfectly, and labels."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("eval", n_test)):
        y = rng.integers(0, classes, n)
        conv = 2.0 * np.eye(classes, 6)[y] + rng.standard_normal((n, 6)) + 5.0
        fc = conv[:, :4] @ rng.standard_normal((4, 4)) + 0.5 * rng.standard_normal((n, 4))
        out[split] = {
            "conv1": conv.astype(np.float32),
            "fc": fc.astype(np.float32),
            "labels": y.astype(np.int64),
        }
    return out


def write_phdlab_latents(folder: Path, data: dict, batch: int = 16) -> Path:
    """phd-lab's latent folder layout for ``data[split][layer]`` (labels under ``labels``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, arrays in data.items():
        for name, values in arrays.items():
            batches = [values[i : i + batch] for i in range(0, len(values), batch)]
            write_stream(folder / f"{split}-{name}.p", batches)
    (folder / "model_pointer.txt").write_text("./logs/TinyNet/Planted_8/run0\n")
    return folder


def write_phdlab_log(path: Path, layers: list[str], epochs: int, seed: int = 0) -> pd.DataFrame:
    """A delve / phd-lab per-epoch CSV log (delve's CSVWriter format)."""
    rng = np.random.default_rng(seed)
    columns: dict[str, list[float]] = {}
    for phase in ("train", "eval"):
        for layer in layers:
            k = rng.integers(1, 16, epochs)
            columns[f"{phase}-saturation_{layer}"] = list(k / 16)
            columns[f"{phase}-intrinsic-dimensionality_{layer}"] = list(k.astype(float))
    columns["training_accuracy"] = list(rng.random(epochs))
    columns["test_loss"] = list(rng.random(epochs))
    table = pd.DataFrame.from_dict(columns)
    table.to_csv(path, sep=";")
    return table
