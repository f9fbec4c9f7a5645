r"""Examples: NPEFF coefficients against per-example statistics of the same examples.

Component j of an NPEFF factorization gives each example a coefficient :math:`W_{ij} \ge 0`.
Which examples does a component pick: the hard ones (high loss, low confidence), those where
the model is sensitive to its input (large input-Jacobian norms), those with large Fishers?
For each component and statistic, Spearman's rank correlation over the examples
(``scipy.stats.spearmanr``) answers it, and the component's top examples are listed beside
their statistics.

Statistics: from the npeff artifact's PEFs (always), ``loss`` = −log softmax(z)_y of the stored
logits z and label y, ``max_probability`` = max_c softmax(z)_c, ``pef_norm`` = the PEF's
Frobenius norm; from a ``jacobian_stats`` artifact of the same run, checkpoint (by epoch) and
split, each statistic it stores, matched by sample id.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats
from scipy.special import log_softmax

from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.pipelines.compare._inputs import check_equal, checkpoint_epoch
from curvlake.pipelines.skeleton import POSITIVE_INT, as_lake, require_artifact
from curvlake.validation import Interval, IntList, validate_params

#: Statistics computed from the PEFs themselves.
PEF_STATISTICS = ("loss", "max_probability", "pef_norm")


def pef_statistics(logits: np.ndarray, label: np.ndarray, norm: np.ndarray) -> dict:
    """``loss``, ``max_probability`` and ``pef_norm`` of examples from their stored PEFs."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    return {
        "loss": -log_p[np.arange(len(label)), np.asarray(label, dtype=np.int64)],
        "max_probability": np.exp(log_p.max(axis=1)),
        "pef_norm": np.asarray(norm, dtype=np.float64),
    }


def rank_correlations(w: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman's rho and its two-sided p-value of every column of ``w`` (n, r) with every
    column of ``values`` (n, s): two (r, s) arrays, NaN where a column is constant."""
    rho = np.full((w.shape[1], values.shape[1]), np.nan)
    pvalue = np.full_like(rho, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy_stats.ConstantInputWarning)
        for j in range(w.shape[1]):
            for s in range(values.shape[1]):
                result = scipy_stats.spearmanr(w[:, j], values[:, s])
                rho[j, s], pvalue[j, s] = result.statistic, result.pvalue
    return rho, pvalue


def _positions(sample_ids: np.ndarray, wanted: np.ndarray, owner: str, other: str) -> np.ndarray:
    """Position in ``sample_ids`` of each of ``wanted``; an error naming how many are absent."""
    order = np.argsort(sample_ids, kind="stable")
    found = np.searchsorted(sample_ids[order], wanted)
    found = np.minimum(found, len(order) - 1)
    present = sample_ids[order][found] == wanted if len(order) else np.zeros(len(wanted), bool)
    if not present.all():
        missing = wanted[~present]
        raise UserInputError(
            f"{missing.size} of the {wanted.size} examples of {owner} are not in {other} "
            f"(e.g. sample ids {missing[:5].tolist()}): not the same examples"
        )
    return order[found]


def _jacobian_statistics(lake: Lake, stats_id: str, source: dict, sample_ids: np.ndarray):
    """The statistics of a jacobian_stats artifact for the PEFs' run, epoch and examples."""
    require_artifact(lake, stats_id, "jacobian_stats", role="jacobian_stats")
    ds = lake.open(stats_id)
    runs = [str(r) for r in ds["run"].values]
    if source["run"] not in runs:
        raise UserInputError(
            f"{stats_id} has the runs {runs}, not {source['run']} of {source['pefs']}: "
            "not the same run"
        )
    r = runs.index(source["run"])
    check_equal("split", (stats_id, ds.attrs["split"]), (source["pefs"], source["split"]))
    epoch = checkpoint_epoch(lake, source["run"], source["checkpoint"])
    epochs = [int(e) for e in ds["checkpoint_epoch"].values[r]]
    if epoch not in epochs:
        raise UserInputError(
            f"{stats_id} has run {source['run']} at epochs {epochs}, not epoch {epoch} "
            f"(checkpoint {source['checkpoint']}) of {source['pefs']}: not the same checkpoint"
        )
    rows = _positions(np.asarray(ds["sample_id"].values), sample_ids, source["pefs"], stats_id)
    c = epochs.index(epoch)
    names = [str(m) for m in ds.attrs["metrics"] if m in ds]
    return {name: np.asarray(ds[name].values[r, c, rows], dtype=np.float64) for name in names}


@validate_params({"n_top": POSITIVE_INT, "components": [None, IntList(Interval(int, 0, None))]})
def run_examples(
    lake: Lake | str,
    npeff_id: str,
    *,
    stats: str | None = None,
    n_top: int = 8,
    components: Sequence[int] | None = None,
) -> str:
    """Rank correlations of NPEFF coefficients with per-example statistics; top examples.

    Args:
        lake: the lake (or its URL).
        npeff_id: an ``npeff`` artifact whose PEFs are in the lake.
        stats: a ``jacobian_stats`` artifact of the same run, checkpoint and split holding
            the npeff artifact's examples (None: the PEF statistics only).
        n_top: top examples listed per component.
        components: component indices (default: all).

    Returns:
        The ``comparison_examples`` artifact id.

    Raises:
        UserInputError: inputs of another kind, run, checkpoint, split, or examples (naming
            both artifacts and what differs), components out of range.
    """
    lake = as_lake(lake)
    require_artifact(lake, npeff_id, "npeff", role="npeff")
    group = lake.group(npeff_id)
    pefs_id = group.attrs.get("pefs")
    if not pefs_id:
        raise UserInputError(f"{npeff_id} names no pefs artifact, so its examples are unknown")
    require_artifact(lake, pefs_id, "pefs", role="pefs")
    pefs = lake.group(pefs_id)
    source = {
        "pefs": pefs_id,
        "run": pefs.attrs.get("run"),
        "checkpoint": pefs.attrs.get("checkpoint"),
        "split": pefs.attrs.get("split"),
    }
    W = np.asarray(group["W"][:], dtype=np.float64)
    r = W.shape[1]
    chosen = list(range(r)) if components is None else list(dict.fromkeys(components))
    bad = [c for c in chosen if c >= r]
    if bad:
        raise UserInputError(f"components {bad} out of range: {npeff_id} has 0..{r - 1}")
    sample_ids = np.asarray(group["sample_id"][:], dtype=np.int64)
    rows = _positions(np.asarray(pefs["sample_id"][:]), sample_ids, npeff_id, pefs_id)
    statistics = pef_statistics(
        np.asarray(pefs["logits"][:])[rows],
        np.asarray(pefs["label"][:])[rows],
        np.asarray(pefs["dense_norm"][:])[rows],
    )
    if stats is not None:
        if source["run"] is None:
            raise UserInputError(f"the PEFs {pefs_id} name no run to match {stats} with")
        statistics.update(_jacobian_statistics(lake, stats, source, sample_ids))
    config = {"n_top": n_top, "components": chosen}
    writer = lake.begin(
        "comparison_examples", config, [npeff_id, pefs_id, *([stats] if stats else [])]
    )
    if writer.complete:
        return writer.id
    with writer:
        values = np.stack(list(statistics.values()), axis=1)
        rho, pvalue = rank_correlations(W[:, chosen], values)
        n_top = min(n_top, len(W))
        # largest W first, ties to the smaller example position
        top = np.stack([np.lexsort((np.arange(len(W)), -W[:, j]))[:n_top] for j in chosen])
        writer.write_many(
            {
                "spearman": rho,
                "pvalue": pvalue,
                "statistic": np.array(list(statistics), dtype=object),
                "component": np.array(chosen, dtype=np.int64),
                "top_example": top.astype(np.int64),
                "top_sample_id": sample_ids[top],
                "top_w": np.take_along_axis(W[:, chosen].T, top, axis=1),
                "top_value": values[top],
                "mean_value": values.mean(axis=0),
            }
        )
        writer.set_attrs(
            npeff=npeff_id,
            pefs=pefs_id,
            jacobian_stats=stats,
            run=source["run"],
            checkpoint=source["checkpoint"],
            split=source["split"],
            n_examples=len(W),
        )
    return writer.commit()
