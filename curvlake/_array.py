"""NumPy / CuPy dispatch: one code path for host and device arrays."""

from types import ModuleType

import numpy as np


def get_namespace(*arrays: object) -> ModuleType:
    """Return ``cupy`` if any of ``arrays`` is a CuPy array, else ``numpy``."""
    for array in arrays:
        if type(array).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def to_numpy(array: object) -> np.ndarray:
    """Copy a NumPy or CuPy array to a host NumPy array (no copy for NumPy input)."""
    if type(array).__module__.startswith("cupy"):
        return array.get()  # type: ignore[attr-defined]
    return np.asarray(array)
