"""Validation of user input shared by the M-FAC kernels, pruner and optimizer."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from curvlake.errors import UserInputError


def check_damp(damp: Any) -> float:
    """``damp`` (λ) as a float; a :class:`UserInputError` unless it is finite and > 0."""
    try:
        value = float(damp)
    except (TypeError, ValueError):
        raise UserInputError(f"damp must be a positive number, got {damp!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise UserInputError(
            f"damp must be finite and > 0 (F = damp·I + GᵀG/n is singular otherwise), got {damp!r}"
        )
    return value


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UserInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_indices(indices: Any, n_params: int) -> np.ndarray:
    """Flat parameter indices as a 1-D int64 array inside ``[0, n_params)``."""
    values = np.asarray(indices)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise UserInputError(f"parameter indices must be integers, got dtype {values.dtype}")
    values = values.astype(np.int64).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= n_params):
        raise UserInputError(
            f"parameter indices must lie in [0, {n_params}), got values in "
            f"[{int(values.min())}, {int(values.max())}]"
        )
    return values
