r"""Parameter masks: sets of coordinates of the flat parameter vector θ.

A :class:`ParameterMask` is a set :math:`S \subseteq \{0, \dots, P - 1\}` of coordinates of
θ (:mod:`curvlake.nn.params`), kept as its sorted unique int64 indices together with the
:class:`~curvlake.nn.params.LayerTable` that says which tensor entry each coordinate is. It
restricts an analysis to some coordinates (a Hessian overlap on a subspace) or says which
weights a pruner keeps or removes; what the set *means* is up to its producer (the ``source``
of a ``mask`` artifact). Two masks combine only when their layer tables have the same
fingerprint, i.e. index the same parameter space.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from curvlake.constants import MASK_SCOPES
from curvlake.errors import UserInputError
from curvlake.nn.params import LayerTable
from curvlake.validation import Options, check

#: suffix of the mask buffers that ``torch.nn.utils.prune`` adds next to a pruned parameter.
PRUNE_SUFFIX = "_mask"


class ParameterMask:
    """A set of coordinates of θ: sorted unique int64 ``indices`` into a parameter space.

    Build one with :meth:`from_indices`, :meth:`from_bool`, :meth:`magnitude` or
    :meth:`from_file`; the constructor takes indices that are already sorted and unique.

    Attributes:
        table: the layer table of the parameter space (P = ``table.total`` coordinates).
        indices: the coordinates in the set, sorted ascending, unique, int64, read-only.
    """

    __slots__ = ("indices", "table")

    def __init__(self, table: LayerTable, indices: np.ndarray):
        indices = np.array(indices, dtype=np.int64)
        if indices.ndim != 1:
            raise UserInputError(f"mask indices must be 1-D, got shape {indices.shape}")
        if indices.size:
            if indices[0] < 0 or indices[-1] >= table.total:
                raise UserInputError(
                    f"mask indices must lie in [0, {table.total}), got values in "
                    f"[{int(indices.min())}, {int(indices.max())}]"
                )
            if np.any(np.diff(indices) <= 0):
                raise UserInputError("mask indices must be sorted and unique (use from_indices)")
        indices.flags.writeable = False
        self.table = table
        self.indices = indices

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_indices(cls, table: LayerTable, indices: Any) -> ParameterMask:
        """The set of the given flat coordinates (any order; repeated ones count once).

        Raises:
            UserInputError: non-integer indices, or an index outside ``[0, P)``.
        """
        values = np.asarray(indices)
        if values.dtype == bool or not (
            values.size == 0 or np.issubdtype(values.dtype, np.integer)
        ):
            raise UserInputError(
                f"mask indices must be integers, got dtype {values.dtype} "
                "(a boolean vector goes to ParameterMask.from_bool)"
            )
        return cls(table, _sorted_unique(values.astype(np.int64).reshape(-1)))

    @classmethod
    def from_bool(cls, table: LayerTable, vector: Any) -> ParameterMask:
        r"""The set :math:`\{j : v_j\}` of a boolean vector ``v`` of length P.

        Raises:
            UserInputError: a vector that is not boolean or not of length P.
        """
        if isinstance(vector, torch.Tensor):
            vector = vector.detach().cpu().numpy()
        values = np.asarray(vector)
        if values.dtype != bool:
            raise UserInputError(f"a boolean mask vector must have dtype bool, got {values.dtype}")
        if values.shape != (table.total,):
            raise UserInputError(
                f"a boolean mask vector must have shape ({table.total},) (one entry per "
                f"parameter), got {values.shape}"
            )
        return cls(table, np.flatnonzero(values))

    @classmethod
    def magnitude(
        cls,
        theta: Any,
        table: LayerTable,
        *,
        size: int | None = None,
        fraction: float | None = None,
        scope: Literal["global", "layer"] = "global",
        layers: str | None = None,
    ) -> ParameterMask:
        r"""The coordinates of largest magnitude :math:`|\theta_j|` among the selected tensors.

        Let :math:`T` be the tensors whose name matches ``layers`` (``re.search``; ``None``:
        all), :math:`n_l` the size of tensor :math:`l` and :math:`N = \sum_{l \in T} n_l`.

        - ``scope="global"``: the :math:`m` largest :math:`|\theta_j|` over all coordinates
          of :math:`T`, with :math:`m` = ``size``, or ``round(fraction * N)``.
        - ``scope="layer"``: each tensor :math:`l \in T` keeps its own :math:`m_l` largest.
          With ``fraction``, :math:`m_l` = ``round(fraction * n_l)``. With ``size`` = M, the
          M coordinates are split proportionally to the tensor sizes by largest remainders:
          :math:`m_l = \lfloor M n_l / N \rfloor`, and the :math:`M - \sum_l m_l` left over
          go, one each, to the tensors with the largest remainders :math:`M n_l \bmod N`
          (ties: the earlier tensor), so :math:`\sum_l m_l = M` exactly.

        ``round`` is Python's (halves to even). Ties in :math:`|\theta_j|` go to the lower
        index, so the mask is a deterministic function of θ.

        Args:
            theta: the flat parameter vector (length P; numpy or torch).
            table: its layer table.
            size: number of coordinates kept, in ``[0, N]``.
            fraction: share of the selected coordinates kept, in ``[0, 1]``.
            scope: ``global`` or ``layer``.
            layers: regular expression selecting tensors by name.

        Raises:
            UserInputError: both or neither of ``size`` / ``fraction``, a value out of range,
                an unknown scope, a pattern matching no tensor, a θ of the wrong length or
                with NaN entries.
        """
        counts, selected = magnitude_counts(
            table, size=size, fraction=fraction, scope=scope, layers=layers
        )
        if isinstance(theta, torch.Tensor):
            theta = theta.detach().cpu().numpy()
        theta = np.asarray(theta)
        if theta.shape != (table.total,):
            raise UserInputError(
                f"theta must have shape ({table.total},) to match the layer table, "
                f"got {theta.shape}"
            )
        all_slices = [where for _, where, _ in table.slices()]
        slices = [all_slices[i] for i in selected]
        magnitudes = [np.abs(theta[s].astype(np.float64)) for s in slices]
        if any(np.isnan(m).any() for m in magnitudes):
            raise UserInputError("theta has NaN entries in the selected tensors")
        if scope == "global":
            starts = np.concatenate([[0], np.cumsum([s.stop - s.start for s in slices])])
            positions = _largest(np.concatenate(magnitudes), counts[0])
            # positions index the concatenation of the selected tensors: map back into θ
            which = np.searchsorted(starts, positions, side="right") - 1
            offsets = np.array([s.start for s in slices], dtype=np.int64)
            chosen = [positions - starts[which] + offsets[which]]
        else:
            chosen = [
                s.start + _largest(m, count)
                for s, m, count in zip(slices, magnitudes, counts, strict=True)
            ]
        return cls(table, np.sort(np.concatenate([np.zeros(0, np.int64), *chosen])))

    @classmethod
    def from_file(cls, path: str | Path, table: LayerTable) -> ParameterMask:
        """A mask read from a file.

        Formats:

        - ``.npy``: a boolean vector of length P (:meth:`from_bool`) or an integer vector of
          flat coordinates (:meth:`from_indices`);
        - ``.pt``: a dict ``tensor name -> mask tensor`` (``torch.save``), the mask shaped like
          the tensor, boolean or 0/1-valued; keys ``<name>_mask`` as written by
          ``torch.nn.utils.prune`` are accepted for ``<name>``. Tensors the dict does not name
          contribute no coordinates.

        Raises:
            UserInputError: a missing or unreadable file, another format, an unknown tensor
                name, a wrong shape, or values that are not 0/1.
        """
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"no such mask file: {path}")
        if path.suffix == ".npy":
            try:
                values = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as error:
                raise UserInputError(f"{path} is not a readable .npy array: {error}") from None
            if values.ndim != 1:
                raise UserInputError(
                    f"{path}: a mask .npy must be a 1-D vector, got shape {values.shape}"
                )
            if values.dtype == bool:
                return cls.from_bool(table, values)
            if np.issubdtype(values.dtype, np.integer):
                return cls.from_indices(table, values)
            raise UserInputError(
                f"{path}: a mask .npy must be bool (length {table.total}) or integer indices, "
                f"got dtype {values.dtype}"
            )
        if path.suffix == ".pt":
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # torch raises many types for foreign or corrupt files
                first = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise UserInputError(f"{path} is not a readable torch file: {first}") from None
            if not isinstance(loaded, Mapping):
                raise UserInputError(
                    f"{path}: a mask .pt must hold a dict of tensor name -> mask tensor, "
                    f"got {type(loaded).__name__}"
                )
            return cls.from_tensors(table, loaded, where=str(path))
        raise UserInputError(
            f"{path}: mask files must be .npy (bool vector or indices) or .pt (dict of tensors)"
        )

    @classmethod
    def from_tensors(
        cls, table: LayerTable, masks: Mapping[str, Any], *, where: str = "mask dict"
    ) -> ParameterMask:
        """The mask of a dict ``tensor name -> boolean (or 0/1) tensor`` (see :meth:`from_file`).

        Raises:
            UserInputError: an unknown name, a tensor named twice, a wrong shape, values other
                than 0/1.
        """
        shapes = dict(zip(table.names, table.shapes, strict=True))
        parts, seen = [], {}
        for key, value in masks.items():
            name = key
            if name not in shapes and str(key).endswith(PRUNE_SUFFIX):
                name = str(key)[: -len(PRUNE_SUFFIX)]
            if name not in shapes:
                raise UserInputError(
                    f"{where}: {key!r} is not a parameter tensor of the model; known tensors: "
                    + ", ".join(table.names)
                )
            if name in seen:
                raise UserInputError(f"{where}: tensor {name!r} is given twice ({seen[name]!r})")
            seen[name] = key
            try:
                values = torch.as_tensor(value).detach().cpu()
            except (TypeError, RuntimeError, ValueError):
                raise UserInputError(
                    f"{where}: {key!r} is a {type(value).__name__}, not a mask tensor"
                ) from None
            if tuple(values.shape) != tuple(shapes[name]):
                raise UserInputError(
                    f"{where}: {key!r} has shape {tuple(values.shape)}, tensor {name!r} has "
                    f"shape {tuple(shapes[name])}"
                )
            if values.dtype != torch.bool:
                if values.is_complex() or not bool(((values == 0) | (values == 1)).all()):
                    raise UserInputError(f"{where}: {key!r} must be boolean or hold only 0 and 1")
                values = values != 0
            parts.append(table.slice_of(name).start + np.flatnonzero(values.reshape(-1).numpy()))
        return cls(table, np.sort(np.concatenate([np.zeros(0, np.int64), *parts])))

    # -- views ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.indices.size)

    def __repr__(self) -> str:
        return (
            f"ParameterMask({len(self)} of {self.table.total} coordinates, "
            f"{len(self.table)} tensors, fingerprint {self.table.fingerprint})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParameterMask):
            return NotImplemented
        return self.table.fingerprint == other.table.fingerprint and np.array_equal(
            self.indices, other.indices
        )

    @property
    def density(self) -> float:
        """:math:`|S| / P` (0 for an empty parameter space)."""
        return len(self) / self.table.total if self.table.total else 0.0

    def to_bool(self) -> np.ndarray:
        """The indicator vector :math:`1_S` as a bool array of length P."""
        out = np.zeros(self.table.total, dtype=bool)
        out[self.indices] = True
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``tensor name -> bool tensor`` shaped like the tensor (the ``.pt`` format of
        :meth:`from_file`; ``torch.nn.utils.prune.custom_from_mask`` takes these)."""
        flat = torch.from_numpy(self.to_bool())
        return {name: flat[where].view(shape) for name, where, shape in self.table.slices()}

    def count_per_layer(self) -> np.ndarray:
        """Number of coordinates of the set in each tensor of the table (int64, table order)."""
        return np.bincount(self.table.layer_of(self.indices), minlength=len(self.table)).astype(
            np.int64
        )

    # -- set algebra -------------------------------------------------------------------------

    def check_compatible(self, other: ParameterMask) -> None:
        """Refuse to combine masks of different parameter spaces.

        Raises:
            UserInputError: the layer tables' fingerprints differ (the message names both).
        """
        if not isinstance(other, ParameterMask):
            raise UserInputError(f"expected a ParameterMask, got {type(other).__name__}")
        if self.table.fingerprint != other.table.fingerprint:
            raise UserInputError(
                "parameter masks of different parameter spaces: "
                f"{self.table.fingerprint} ({len(self.table)} tensors, {self.table.total} "
                f"parameters) vs {other.table.fingerprint} ({len(other.table)} tensors, "
                f"{other.table.total} parameters)"
            )

    def __and__(self, other: ParameterMask) -> ParameterMask:
        r""":math:`S \cap S'`."""
        self.check_compatible(other)
        return ParameterMask(
            self.table, np.intersect1d(self.indices, other.indices, assume_unique=True)
        )

    def __or__(self, other: ParameterMask) -> ParameterMask:
        r""":math:`S \cup S'`."""
        self.check_compatible(other)
        return ParameterMask(
            self.table, _sorted_unique(np.concatenate([self.indices, other.indices]))
        )

    def complement(self) -> ParameterMask:
        r""":math:`\{0, \dots, P - 1\} \setminus S`."""
        return ParameterMask(self.table, np.flatnonzero(~self.to_bool()))

    def iou(self, other: ParameterMask) -> float:
        r"""Intersection over union :math:`|S \cap S'| / |S \cup S'|` (1 for two empty sets)."""
        self.check_compatible(other)
        inter = np.intersect1d(self.indices, other.indices, assume_unique=True).size
        union = len(self) + len(other) - inter
        return inter / union if union else 1.0


def magnitude_counts(
    table: LayerTable,
    *,
    size: int | None = None,
    fraction: float | None = None,
    scope: str = "global",
    layers: str | None = None,
) -> tuple[list[int], list[int]]:
    """Check the options of :meth:`ParameterMask.magnitude` and count what it keeps.

    Returns:
        ``(counts, selected)``: ``selected`` the indices of the matched tensors; ``counts``
        ``[m]`` for ``scope="global"``, else one :math:`m_l` per selected tensor.

    Raises:
        UserInputError: as :meth:`ParameterMask.magnitude`.
    """
    check("scope", scope, Options(*MASK_SCOPES))
    if (size is None) == (fraction is None):
        raise UserInputError(
            f"give exactly one of size and fraction (got size={size!r}, fraction={fraction!r})"
        )
    selected = table.select(layers)
    sizes = [int(table.sizes[i]) for i in selected]
    total = sum(sizes)
    if size is not None:
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise UserInputError(f"size={size!r} must be an integer")
        if not 0 <= size <= total:
            raise UserInputError(
                f"size={size} must lie in [0, {total}] (the selected tensors' parameters)"
            )
        if scope == "global":
            return [int(size)], selected
        return _proportional_split(int(size), sizes), selected
    if (
        not isinstance(fraction, (int, float, np.integer, np.floating))
        or isinstance(fraction, bool)
        or math.isnan(float(fraction))
        or not 0.0 <= float(fraction) <= 1.0
    ):
        raise UserInputError(f"fraction={fraction!r} must be a number in [0, 1]")
    fraction = float(fraction)
    if scope == "global":
        return [round(fraction * total)], selected
    return [round(fraction * n) for n in sizes], selected


def _proportional_split(total_kept: int, sizes: list[int]) -> list[int]:
    """Largest-remainder split of ``total_kept`` over tensors of ``sizes`` (exact integers)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    counts = [total_kept * n // total for n in sizes]
    remainders = [total_kept * n % total for n in sizes]
    # stable sort on -remainder: equal remainders keep table order (earlier tensor first)
    order = sorted(range(len(sizes)), key=lambda i: -remainders[i])
    for i in order[: total_kept - sum(counts)]:
        counts[i] += 1
    return counts


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (``np.unique`` hashes and is far slower on millions of ints)."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if values.size else values


def _largest(values: np.ndarray, m: int) -> np.ndarray:
    """Positions of the ``m`` largest ``values``, ties to the lower position, sorted; O(n)."""
    n = values.size
    if m <= 0:
        return np.zeros(0, np.int64)
    if m >= n:
        return np.arange(n, dtype=np.int64)
    kth = np.partition(values, n - m)[n - m]  # the m-th largest value
    above = np.flatnonzero(values > kth)
    ties = np.flatnonzero(values == kth)[: m - above.size]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)
