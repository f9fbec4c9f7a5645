"""Figures of the Hessian kinds: ``hessian_eigs``, ``hessian_overlap``.

The spectrum panel is the one of ``curvlake hessian plot``
(:mod:`curvlake.pipelines.hessian.plot`): |λ| by index with the scree bounds on a second axis.
"""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import MaxNLocator

from curvlake.lake import ArtifactInfo, Lake
from curvlake.pipelines.hessian.plot import _spectrum
from curvlake.report.figures import Figure, new_figure
from curvlake.report.renderers._registry import caption, renderer


@renderer("hessian_eigs")
def spectrum_figure(lake: Lake, info: ArtifactInfo):
    """|λ| by index (sign by marker) and the a-posteriori scree bounds."""
    attrs = lake.group(info.id).attrs
    fig = new_figure(5.5, 3.4)
    ax = fig.subplots()
    _spectrum(ax, lake, info.id)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    yield Figure(
        f"{info.id}-spectrum",
        caption(
            info,
            f"Top-{attrs['k']} Hessian spectrum of run {attrs['run']} at checkpoint "
            f"{attrs['checkpoint']}, with the scree bounds (grey: the share of ||H||²_F outside "
            "the top r, between its a-posteriori bounds)",
        ),
        fig,
    )


@renderer("hessian_overlap")
def overlap_figure(lake: Lake, info: ArtifactInfo):
    """The eigenspace's spectrum; the mask's overlap against k' with the random baseline."""
    ds = lake.open(info.id)
    attrs = ds.attrs
    k = ds["k_prime"].values
    fig = new_figure(10, 3.4)
    spectrum_ax, curve_ax, angle_ax = fig.subplots(1, 3)
    _spectrum(spectrum_ax, lake, attrs["eigs"])
    curve_ax.plot(k, ds["overlap"].values, marker=".", label="overlap")
    curve_ax.axhline(attrs["baseline"], color="k", linestyle=":", label="random mask (m / D)")
    if "nested_overlap" in ds:
        curve_ax.plot(k, ds["nested_overlap"].values, marker=".", label="nested (top-k' |θ|)")
        curve_ax.plot(k, ds["nested_baseline"].values, "k--", label="nested baseline (k' / D)")
    curve_ax.set_xlabel("k' (top eigenvectors)")
    curve_ax.set_ylabel("||U[M, :k']||² / k'")
    curve_ax.set_ylim(0, 1.02)
    curve_ax.legend()
    curve_ax.set_title(f"mask {attrs['mask']}, m = {attrs['mask_size']}")
    angles = ds["principal_angles"].values
    angle_ax.plot(np.arange(1, angles.size + 1), np.degrees(angles), marker=".")
    angle_ax.set_xlabel("principal angle index")
    angle_ax.set_ylabel("degrees")
    angle_ax.set_ylim(0, 91)
    angle_ax.set_title(f"mask vs eigenspace: mean cos² = {attrs['mean_cos2']:.3g}")
    for ax in (spectrum_ax, curve_ax, angle_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    yield Figure(
        f"{info.id}-overlap",
        caption(
            info,
            f"Overlap of mask {attrs['mask']} with the Hessian eigenspace {attrs['eigs']} "
            "against k', with the random baseline; the spectrum; the principal angles",
        ),
        fig,
    )
