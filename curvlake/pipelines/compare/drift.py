r"""Eigenspace drift: principal angles between top-k Hessian eigenspaces over training.

For two ``hessian_eigs`` artifacts of one parameter space (two checkpoints of a run, or two
runs of one architecture) with orthonormal top-k eigenvectors :math:`U_1, U_2`, the cosines of
the principal angles :math:`0 \le \theta_1 \le \dots \le \theta_k \le \pi/2` between their spans
are the singular values of :math:`U_1^\top U_2` (a k x k sum over row blocks of both bases,
:func:`curvlake.pipelines.hessian.overlap.principal_angles_from_gram`), and the Grassmannian
distances follow from them (:func:`~curvlake.pipelines.hessian.overlap.grassmann_metrics`). A
uniformly random k-dimensional subspace has expected mean :math:`\cos^2\theta = k / P`.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np

from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.pipelines.compare._inputs import checkpoint_epoch, eigenspace
from curvlake.pipelines.hessian.overlap import grassmann_metrics, principal_angles_from_gram
from curvlake.pipelines.skeleton import as_lake
from curvlake.storage_schema.comparison_drift import METRICS
from curvlake.validation import Interval, Options, check, validate_params

#: How the pairs are formed: neighbours in the given order, or everything against the first.
MODES = ("consecutive", "reference")


def run_eigs_of(lake: Lake, run_id: str) -> list[str]:
    """The complete ``hessian_eigs`` artifacts of a run, by checkpoint (then id)."""
    found = []
    for info in lake.list("hessian_eigs"):
        if info.status == "complete":
            attrs = lake.group(info.id).attrs
            if attrs["run"] == run_id:
                found.append((int(attrs["checkpoint"]), info.id))
    return [artifact for _, artifact in sorted(found)]


@validate_params({"mode": [Options(*MODES)], "k": [None, Interval(int, 1, None)]})
def run_drift(
    lake: Lake | str,
    eigs_ids: Sequence[str],
    *,
    mode: str = "consecutive",
    k: int | None = None,
) -> str:
    """Principal angles and Grassmannian distances between eigenspaces, pair by pair.

    Args:
        lake: the lake (or its URL).
        eigs_ids: two or more ``hessian_eigs`` artifacts of one parameter space, in training
            order (e.g. :func:`run_eigs_of`).
        mode: ``consecutive`` (each with the next) or ``reference`` (each with the first).
        k: compare the leading k eigenvectors of each (default: the smallest k among them).

    Returns:
        The ``comparison_drift`` artifact id.

    Raises:
        UserInputError: fewer than two distinct artifacts, another kind, different parameter
            spaces (naming the two artifacts and the first differing tensor), k too large.
    """
    lake = as_lake(lake)
    eigs_ids = list(eigs_ids)
    if len(eigs_ids) < 2 or len(set(eigs_ids)) != len(eigs_ids):
        raise UserInputError(
            f"drift needs two or more distinct hessian_eigs artifacts, got {eigs_ids}"
        )
    spaces = [eigenspace(lake, e, role="eigenspace") for e in eigs_ids]
    for other in spaces[1:]:
        spaces[0].space.check_same(other.space)
    smallest = min(s.k for s in spaces)
    if k is None:
        k = smallest
    check("k", k, Interval(int, 1, smallest), context=f"the smallest eigenspace has k={smallest}")
    pairs = (
        [(i, i + 1) for i in range(len(spaces) - 1)]
        if mode == "consecutive"
        else [(0, i) for i in range(1, len(spaces))]
    )
    writer = lake.begin("comparison_drift", {"mode": mode, "k": k}, eigs_ids)
    if writer.complete:
        return writer.id
    with writer:
        grams = da.compute(
            *[
                da.dot(
                    spaces[a].vectors[:, :k].T.astype(np.float64),
                    spaces[b].vectors[:, :k].astype(np.float64),
                )
                for a, b in pairs
            ]
        )
        angles = np.stack([principal_angles_from_gram(g) for g in grams])
        epochs = [checkpoint_epoch(lake, s.run, s.checkpoint) for s in spaces]
        n_params = spaces[0].space.n_params
        writer.write_many(
            {
                "angle": angles,
                "distance": np.array([list(grassmann_metrics(a)) for a in angles]),
                "metric": np.array(METRICS, dtype=object),
                "baseline_mean_cos2": np.full(len(pairs), k / n_params),
                "first": np.array([spaces[a].id for a, _ in pairs], dtype=object),
                "second": np.array([spaces[b].id for _, b in pairs], dtype=object),
                "first_run": np.array([spaces[a].run for a, _ in pairs], dtype=object),
                "second_run": np.array([spaces[b].run for _, b in pairs], dtype=object),
                "first_epoch": np.array([epochs[a] for a, _ in pairs], dtype=np.int64),
                "second_epoch": np.array([epochs[b] for _, b in pairs], dtype=np.int64),
                "pair": np.arange(len(pairs), dtype=np.int64),
            }
        )
        writer.set_attrs(
            mode=mode,
            k=k,
            n_params=n_params,
            parameter_fingerprint=lake.group(eigs_ids[0]).attrs.get("parameter_fingerprint"),
        )
    return writer.commit()
