"""Input images of a run's examples for figures, and their layout as one mosaic."""

from __future__ import annotations

import functools

import numpy as np

from curvlake.lake import Lake


def is_image(shape: tuple[int, ...]) -> bool:
    """Whether an input shape is an image (C, H, W with H, W > 1)."""
    return len(shape) == 3 and shape[1] > 1 and shape[2] > 1


def raw_images(lake: Lake, npeff_id: str, sample_ids: np.ndarray) -> np.ndarray | None:
    """Raw inputs (m, C, H, W) of examples of an npeff artifact's run, by sample id; None when
    its PEFs name no run (imported without one) or the inputs are not images.

    The embedded digits are read here (``sample_id`` indexes scikit-learn's ``load_digits``,
    pixels / 16), so a lake of digits runs is drawn without torch; other datasets go through
    the run's data loaders (:mod:`curvlake.pipelines.npeff.downstream`, which import torch).
    """
    group = lake.group(npeff_id)
    pefs_id = group.attrs.get("pefs")
    run_id = lake.group(pefs_id).attrs.get("run") if pefs_id else None
    if run_id is None or not is_image(tuple(lake.group(run_id).attrs["input_shape"])):
        return None
    if lake.info(run_id).config.get("dataset") == "digits":
        return _digits()[np.asarray(sample_ids, dtype=np.int64)]
    from curvlake.pipelines.npeff import downstream

    source = downstream._source(lake, group, npeff_id)
    return downstream._raw_images(lake, source, np.asarray(sample_ids, dtype=np.int64))


@functools.cache
def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0)[:, None]


def mosaic(images: np.ndarray, n_cols: int, pad: int = 1) -> np.ndarray:
    """Images (n, C, H, W) tiled row by row into one (rows, cols) or (rows, cols, 3) array in
    [0, 1], ``pad`` white pixels apart (empty tiles white); one ``imshow`` draws them all.

    Pixels in [0, 1] are kept as they are, others min-max scaled over all images; more than
    one channel but not three: the channel mean.
    """
    images = np.asarray(images, dtype=np.float64)
    low, high = float(np.min(images)), float(np.max(images))
    if low < -1e-6 or high > 1 + 1e-6:
        images = (images - low) / (high - low) if high > low else np.zeros_like(images)
    images = np.clip(images, 0, 1)
    if images.shape[1] != 3:
        images = images.mean(axis=1, keepdims=True)
    n, c, h, w = images.shape
    n_rows = -(-n // n_cols)
    canvas = np.ones((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, c))
    for i in range(n):
        row, col = divmod(i, n_cols)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = np.transpose(images[i], (1, 2, 0))
    return canvas[..., 0] if c == 1 else canvas
