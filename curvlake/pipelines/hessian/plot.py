"""``curvlake hessian plot``: the spectrum with its scree bounds, and overlap against k'.

One artifact: two panels, the eigenvalues by index (|λ| on a log axis, the sign by marker) with
the scree bounds on a second axis, and the overlap curve(s) against ``k'`` with the random
baseline. Several ``hessian_overlap`` artifacts of one run (one per checkpoint): a third panel
with the overlap at ``k`` and its baseline against the training epoch, and one overlap curve
per checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from curvlake.errors import UserInputError
from curvlake.lake import Lake, kind_of
from curvlake.pipelines.skeleton import as_lake, output_path, require_artifact

_KINDS = ("hessian_overlap", "hessian_eigs")


def _label(attrs: dict) -> str:
    epoch = attrs.get("epoch")
    where = f"epoch {epoch}" if epoch is not None else f"checkpoint {attrs.get('checkpoint')}"
    return f"{where} ({attrs.get('method') or 'sketch'})"


def _spectrum(ax, lake: Lake, eigs_id: str) -> None:
    ds = lake.open(eigs_id)
    lam = ds["eigenvalues"].values
    index = np.arange(1, lam.size + 1)
    for sign, marker, name in ((1, "o", "λ > 0"), (-1, "v", "λ < 0")):
        chosen = np.sign(lam) == sign
        ax.plot(index[chosen], np.abs(lam[chosen]), marker, ms=4, ls="none", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("eigenpair (by |λ|)")
    ax.set_ylabel("|λ|")
    ax.set_title(f"spectrum, {_label(dict(ds.attrs))}")
    if "scree_upper" in ds:
        scree = ax.twinx()
        ranks = np.arange(ds.sizes["rank"])
        scree.fill_between(
            ranks,
            ds["scree_lower_strict"].values,
            ds["scree_upper"].values,
            alpha=0.2,
            color="gray",
            label="scree bounds",
        )
        scree.plot(ranks, ds["scree_lower"].values, color="gray", lw=1)
        scree.set_ylabel("share of ‖H‖²_F outside the top r")
        scree.set_ylim(0, 1.05)
    ax.legend(loc="upper right")


def plot_hessian(lake: Lake | str, artifact_ids: Sequence[str], path: str | Path) -> Path:
    """Draw ``hessian_overlap`` (or ``hessian_eigs``) artifacts into a PNG/PDF at ``path``.

    Raises:
        UserInputError: no ids, ids of another kind, overlaps of different runs, a path that
            cannot be written.
    """
    lake = as_lake(lake)
    path = output_path(path, (".png", ".pdf", ".svg"))
    if not artifact_ids:
        raise UserInputError("give at least one hessian_overlap or hessian_eigs id")
    kinds = {kind_of(i) for i in artifact_ids}
    if len(kinds) != 1 or not kinds <= set(_KINDS):
        raise UserInputError(
            "give hessian_overlap ids (spectrum and overlap) or hessian_eigs ids (spectrum), "
            f"not {', '.join(sorted(kinds))}"
        )
    (kind,) = kinds
    for artifact in artifact_ids:
        require_artifact(lake, artifact, kind)
    if kind == "hessian_eigs":
        fig = Figure(figsize=(6 * len(artifact_ids), 4), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(artifact_ids)))
        for ax, eigs_id in zip(axes, artifact_ids, strict=True):
            _spectrum(ax, lake, eigs_id)
        fig.savefig(path, dpi=120)
        return path
    overlaps = [lake.open(i) for i in artifact_ids]
    runs = {ds.attrs["run"] for ds in overlaps}
    if len(runs) != 1:
        raise UserInputError(f"the overlaps are of different runs ({', '.join(sorted(runs))})")
    overlaps.sort(key=lambda ds: ds.attrs["checkpoint"])
    several = len(overlaps) > 1
    fig = Figure(figsize=(15 if several else 10, 4), layout="constrained")
    axes = fig.subplots(1, 3 if several else 2)
    _spectrum(axes[0], lake, overlaps[-1].attrs["eigs"])
    curve_ax = axes[1]
    for ds in overlaps:
        k_prime = ds["k_prime"].values
        line = curve_ax.plot(k_prime, ds["overlap"].values, label=_label(dict(ds.attrs)))[0]
        if "nested_overlap" in ds and not several:
            curve_ax.plot(
                k_prime,
                ds["nested_overlap"].values,
                ls="--",
                color=line.get_color(),
                label="nested top-k' |θ| mask",
            )
            curve_ax.plot(k_prime, ds["nested_baseline"].values, ls=":", color="gray", label="k'/D")
    last = overlaps[-1]
    curve_ax.axhline(last.attrs["baseline"], color="black", ls=":", label="random mask m/D")
    curve_ax.set_xlabel("k' (top eigenvectors)")
    curve_ax.set_ylabel("overlap ‖U[M, :k']‖²_F / k'")
    curve_ax.set_yscale("log")
    curve_ax.set_title(
        f"overlap with a {last.attrs['mask_source']} mask, m={last.attrs['mask_size']}"
    )
    curve_ax.legend(fontsize="small")
    if several:
        epochs = [ds.attrs.get("epoch", ds.attrs["checkpoint"]) for ds in overlaps]
        axes[2].plot(
            epochs, [ds["overlap"].values[-1] for ds in overlaps], marker="o", label="overlap at k"
        )
        axes[2].plot(
            epochs,
            [ds.attrs["baseline"] for ds in overlaps],
            ls=":",
            color="black",
            label="random mask m/D",
        )
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("overlap")
        axes[2].set_yscale("log")
        axes[2].set_title("over training")
        axes[2].legend()
    fig.savefig(path, dpi=120)
    return path
