"""Symmetric label noise that always changes the class (Gamba et al. 2023, Nakkiran et al. 2019).

Exactly ``round(fraction * n)`` labels are changed. The positions are the first ones of a
random permutation of ``0..n-1``; each chosen label ``y`` becomes ``(y + o) mod K`` with ``o``
uniform in ``{1, ..., K-1}``, so a noisy label is never the clean one and is uniform over the
``K - 1`` other classes. Randomness: ``numpy.random.default_rng(seed)``, the permutation first,
then the offsets. Unlike the seed codebase (whose label seed defaulted to ``None``) the seed is
mandatory, so a run's labels can always be rebuilt.

Apply it to the train split only, e.g.
``dataclasses.replace(splits.train, y=apply_label_noise(splits.train.y, K, 0.2, seed))``;
keep the clean labels to report which examples were flipped (``noisy != clean``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from curvlake.errors import UserInputError


def num_noisy_labels(n: int, fraction: float) -> int:
    """How many of ``n`` labels ``apply_label_noise`` changes: ``round(fraction * n)``."""
    return round(fraction * n)


def apply_label_noise(
    labels: np.ndarray, num_classes: int, fraction: float, seed: int
) -> np.ndarray:
    """Return a copy of ``labels`` with ``round(fraction * n)`` of them changed to another class.

    Args:
        labels: int class indices in ``0..num_classes-1``, shape (n,).
        num_classes: K, at least 2 when anything is to be changed.
        fraction: share of labels to change, in [0, 1].
        seed: non-negative int seed of ``numpy.random.default_rng``.

    Returns:
        int64 array of shape (n,); ``fraction = 0`` returns an unchanged copy.

    Raises:
        UserInputError: a fraction outside [0, 1], a bad seed, labels out of range, or K < 2.
    """
    _check_fraction(fraction)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise UserInputError(f"label noise seed must be a non-negative int, got {seed!r}")
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool):
        raise UserInputError(f"num_classes must be an int, got {num_classes!r}")
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise UserInputError(f"labels must be a 1-D int array, got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserInputError(
            f"labels must lie in 0..{num_classes - 1}, got range {y.min()}..{y.max()}"
        )
    n_changed = num_noisy_labels(len(y), fraction)
    if n_changed == 0:
        return y.copy()
    if num_classes < 2:
        raise UserInputError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    rng = np.random.default_rng(seed)
    positions = rng.permutation(len(y))[:n_changed]
    offsets = rng.integers(1, num_classes, size=n_changed)
    noisy = y.copy()
    noisy[positions] = (y[positions] + offsets) % num_classes
    return noisy


def _check_fraction(fraction: Any) -> None:
    if (
        not isinstance(fraction, (int, float, np.integer, np.floating))
        or isinstance(fraction, bool)
        or not 0.0 <= float(fraction) <= 1.0
    ):
        raise UserInputError(f"label noise fraction must be a number in [0, 1], got {fraction!r}")
