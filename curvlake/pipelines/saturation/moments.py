"""Exactly mergeable float64 moments of layer features, and the reshaping of layer outputs.

Saturation [Richter et al. 2021] needs the covariance of a layer's output over a whole epoch.
delve accumulates raw moments, ``Q = (sum A^T A) / n - mu mu^T``, which cancels catastrophically
when the features have a large mean (a constant offset of 1e6 leaves about four correct digits of
a unit variance). Here each batch is centred on its own mean, and batches (or whole shards, in a
Dask tree reduction) are combined with the pairwise update of Chan, Golub & LeVeque (1979):

.. math::

    n = n_a + n_b, \\quad \\delta = \\bar x_b - \\bar x_a, \\quad
    \\bar x = \\bar x_a + \\delta \\, n_b / n, \\quad
    M_2 = M_{2,a} + M_{2,b} + \\delta \\delta^T \\, n_a n_b / n,

where :math:`M_2 = \\sum_i (x_i - \\bar x)(x_i - \\bar x)^T` is the centred scatter matrix. The
result does not depend on how the rows are split or ordered, up to rounding, and adding a
constant to every feature changes only the mean.

References:
    Chan, T. F., Golub, G. H., & LeVeque, R. J. (1979). Updating formulae and a pairwise
    algorithm for computing sample variances. Stanford CS report STAN-CS-79-773.
    Richter, M. L., Shenk, J., Byttner, W., Arpteg, A., & Huss, M. (2021). Feature space
    saturation during training. BMVC 2021 (arXiv 2006.08679).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from curvlake._array import get_namespace, to_numpy
from curvlake.errors import UserInputError

#: how a convolutional output ``(N, C, *spatial)`` becomes a matrix of observations.
ConvMethod = Literal["channelwise", "mean", "max", "flatten"]
CONV_METHODS: tuple[str, ...] = ("channelwise", "mean", "max", "flatten")

#: how a batch-first recurrent output ``(N, T, U)`` becomes a matrix of observations.
SequenceMethod = Literal["last_timestep", "timestepwise"]
SEQUENCE_METHODS: tuple[str, ...] = ("last_timestep", "timestepwise")


@dataclass
class Moments:
    """Count, mean and centred scatter matrix of a set of feature vectors, in float64.

    Attributes:
        count: number of rows seen, ``n``.
        mean: ``(d,)`` mean of the rows (zeros while ``count == 0``).
        m2: ``(d, d)`` centred scatter :math:`\\sum_i (x_i - \\bar x)(x_i - \\bar x)^T`.

    ``update`` adds a batch in place; ``merge`` combines two sets without touching either, so
    partial moments of disjoint row sets (batches, shards, Dask blocks) can be reduced in any
    grouping. ``to_arrays`` / ``from_arrays`` convert to and from plain NumPy arrays for
    storage.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(100, 3))
        >>> m = Moments.from_batch(x[:30]).merge(Moments.from_batch(x[30:]))
        >>> bool(np.allclose(m.covariance(ddof=0), np.cov(x, rowvar=False, ddof=0)))
        True
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, n_features: int) -> Moments:
        """Moments of no rows in ``n_features`` dimensions (the identity of ``merge``)."""
        if not isinstance(n_features, (int, np.integer)) or n_features < 1:
            raise UserInputError(f"n_features must be a positive int, got {n_features!r}")
        d = int(n_features)
        return cls(0, np.zeros(d), np.zeros((d, d)))

    @classmethod
    def from_batch(cls, batch: Any, *, scratch: bool = False) -> Moments:
        """Moments of the rows of one ``(n, d)`` batch (NumPy, CuPy or torch; cast to float64).

        The batch is cast to float64 on its own device and centred on its own mean there; only
        the ``(d,)`` mean and ``(d, d)`` scatter travel to the host.

        Args:
            batch: the ``(n, d)`` rows.
            scratch: the caller hands a float64 torch batch over as a scratch copy (nothing
                else reads it): it is centred in place rather than copied first (the layer
                recorder's channels-last copy; one pass and one allocation fewer per batch).
        """
        count, mean, m2 = _batch_moments(batch, scratch)
        return cls(count, mean, m2)

    @classmethod
    def from_arrays(cls, count: Any, mean: Any, m2: Any) -> Moments:
        """Rebuild moments stored by :meth:`to_arrays` (validates shapes)."""
        mean = np.asarray(mean, dtype=np.float64)
        m2 = np.asarray(m2, dtype=np.float64)
        n = int(np.asarray(count))
        if mean.ndim != 1 or m2.shape != (mean.size, mean.size) or n < 0:
            raise UserInputError(
                f"moments need count >= 0, mean (d,) and m2 (d, d); got count={n}, "
                f"mean {mean.shape}, m2 {m2.shape}"
            )
        return cls(n, mean.copy(), m2.copy())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"count": int64 scalar, "mean": (d,), "m2": (d, d)}`` as float64 NumPy arrays."""
        return {
            "count": np.asarray(self.count, dtype=np.int64),
            "mean": self.mean.copy(),
            "m2": self.m2.copy(),
        }

    @property
    def n_features(self) -> int:
        """The dimension ``d``."""
        return int(self.mean.shape[0])

    def update(self, batch: Any) -> Moments:
        """Add the rows of an ``(n, d)`` batch in place; returns ``self``.

        Args:
            batch: NumPy, CuPy or torch array of shape ``(n, d)``; reshape conv outputs first
                with :func:`conv_features`.
        """
        merged = self.merge(Moments.from_batch(batch))
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of two disjoint row sets (Chan et al. 1979); pure."""
        if other.n_features != self.n_features:
            raise UserInputError(
                f"cannot merge moments of {self.n_features} and {other.n_features} features"
            )
        if other.count == 0:
            return Moments(self.count, self.mean.copy(), self.m2.copy())
        if self.count == 0:
            return Moments(other.count, other.mean.copy(), other.m2.copy())
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (float(self.count) * other.count / n)
        return Moments(n, mean, m2)

    def covariance(self, ddof: int) -> np.ndarray:
        """``M2 / (n - ddof)``, symmetrized: ``ddof=0`` is delve's population covariance.

        Raises:
            UserInputError: ``ddof`` is not a non-negative int, or ``n <= ddof``.
        """
        if not isinstance(ddof, (int, np.integer)) or isinstance(ddof, bool) or ddof < 0:
            raise UserInputError(f"ddof must be a non-negative int, got {ddof!r}")
        if self.count <= ddof:
            raise UserInputError(
                f"covariance with ddof={ddof} needs more than {ddof} rows, got {self.count}"
            )
        cov = self.m2 / (self.count - ddof)
        return (cov + cov.T) / 2

    def variance(self, ddof: int) -> np.ndarray:
        """The ``(d,)`` diagonal of :meth:`covariance`."""
        return np.diagonal(self.covariance(ddof)).copy()


def merge_moments(parts: Iterable[Moments]) -> Moments:
    """Merge moments of disjoint row sets pairwise, as a balanced tree (like a Dask reduction).

    Raises:
        UserInputError: ``parts`` is empty or the parts disagree on ``d``.
    """
    level = list(parts)
    if not level:
        raise UserInputError("merge_moments needs at least one Moments")
    while len(level) > 1:
        merged = [a.merge(b) for a, b in zip(level[::2], level[1::2], strict=False)]
        if len(level) % 2:
            merged.append(level[-1])
        level = merged
    return level[0]


def _batch_moments(batch: Any, scratch: bool = False) -> tuple[int, np.ndarray, np.ndarray]:
    if isinstance(batch, torch.Tensor):
        if batch.ndim != 2:
            raise UserInputError(f"a batch of features must be (n, d), got {tuple(batch.shape)}")
        x = batch.detach().to(torch.float64)
        if x.shape[0] == 0:
            d = int(x.shape[1])
            return 0, np.zeros(d), np.zeros((d, d))
        mean = x.sum(dim=0) / x.shape[0]
        # centre the cast copy (or a scratch batch) in place; otherwise a float64 batch is the
        # caller's, centred out of place
        copied = x.data_ptr() != batch.data_ptr()
        centred = x.sub_(mean) if copied or scratch else x - mean
        if centred.device.type == "cpu":
            # NumPy's matmul recognises ``A.T @ A`` and calls BLAS syrk (half the flops, an
            # exactly symmetric result): 2-3x faster than torch's GEMM on these tall, narrow
            # observation matrices (benchmarks/RESULTS.md, saturation tracking).
            rows = centred.numpy()
            return int(x.shape[0]), mean.numpy(), rows.T @ rows
        m2 = centred.T @ centred
        return int(x.shape[0]), mean.cpu().numpy(), m2.cpu().numpy()
    xp = get_namespace(batch)
    x = xp.asarray(batch, dtype=xp.float64)
    if x.ndim != 2:
        raise UserInputError(f"a batch of features must be (n, d), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        d = x.shape[1]
        return 0, np.zeros(d), np.zeros((d, d))
    mean = x.mean(axis=0)
    centred = x - mean
    return int(x.shape[0]), to_numpy(mean), to_numpy(centred.T @ centred)


def conv_features(output: Any, method: ConvMethod = "channelwise") -> Any:
    """The observation matrix of a layer output, for covariance moments (as delve records).

    A 2-D output ``(N, d)`` (a Linear layer) is returned as it is. A convolutional output
    ``(N, C, *spatial)`` (Conv1d/2d/3d, any number of spatial axes) becomes:

    - ``"channelwise"``: ``(N * prod(spatial), C)``: every position of every example is one
      observation of a ``C``-dimensional vector, rows ordered (example, position). delve's
      ``conv_method="channelwise"`` (its default, and phd-lab's) for 4-D outputs.
    - ``"mean"``: ``(N, C)``, global average pooling over the positions (delve ``"mean"``).
    - ``"max"``: ``(N, C)``, global max pooling over the positions (delve ``"max"``).
    - ``"flatten"``: ``(N, C * prod(spatial))`` in ``(C, *spatial)`` order (delve
      ``"flatten"``).

    delve also offers ``"median"`` pooling and an optional nearest-neighbour resize before the
    reshape; neither is implemented here.

    Args:
        output: torch, NumPy or CuPy array, batch first.
        method: one of ``CONV_METHODS``.

    Returns:
        An array of the same library and dtype as ``output``.

    Raises:
        UserInputError: an unknown method, or an output with fewer than 2 dimensions.
    """
    if method not in CONV_METHODS:
        raise UserInputError(f"conv_method={method!r}; allowed: {', '.join(CONV_METHODS)}")
    if output.ndim < 2:
        raise UserInputError(f"layer output must be (N, d) or (N, C, ...), got {output.shape}")
    if output.ndim == 2:
        return output
    n, c = output.shape[0], output.shape[1]
    if isinstance(output, torch.Tensor):
        if method == "channelwise":
            return output.movedim(1, -1).reshape(-1, c)
        if method == "mean":
            return output.reshape(n, c, -1).mean(dim=2)
        if method == "max":
            return output.reshape(n, c, -1).amax(dim=2)
        return output.reshape(n, -1)
    xp = get_namespace(output)
    if method == "channelwise":
        return xp.moveaxis(output, 1, -1).reshape(-1, c)
    if method == "mean":
        return output.reshape(n, c, -1).mean(axis=2)
    if method == "max":
        return output.reshape(n, c, -1).max(axis=2)
    return output.reshape(n, -1)


def sequence_features(output: Any, method: SequenceMethod = "last_timestep") -> Any:
    """The observation matrix of a batch-first recurrent output ``(N, T, U)`` (delve's LSTM).

    ``"last_timestep"`` keeps ``output[:, -1, :]`` (delve's default), ``"timestepwise"``
    flattens to ``(N, T * U)``. Transpose sequence-first outputs ``(T, N, U)`` before.

    Raises:
        UserInputError: an unknown method or an output that is not 3-D.
    """
    if method not in SEQUENCE_METHODS:
        raise UserInputError(
            f"timeseries method={method!r}; allowed: {', '.join(SEQUENCE_METHODS)}"
        )
    if output.ndim != 3:
        raise UserInputError(f"recurrent output must be (N, T, U), got {output.shape}")
    if method == "last_timestep":
        return output[:, -1, :]
    return output.reshape(output.shape[0], -1)
