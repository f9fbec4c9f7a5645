"""The quickstart's Hessian step: top eigenpairs of the quickstart MLP and their mask overlap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from curvlake.lake import Lake
from curvlake.pipelines.hessian.overlap_pipeline import run_hessian_overlap
from curvlake.pipelines.hessian.plot import plot_hessian
from curvlake.pipelines.hessian.solve import run_hessian_eig

#: The sketch of the quickstart: the seed's recycled SSRFT sketch on 500 training examples.
QUICKSTART_SKETCH = {"n_examples": 500, "k": 20, "recovery": "recycled", "probes": 30}


def quickstart_hessian(
    lake: Lake, mlp_run_id: str, echo: Callable[[str], None] = print
) -> dict[str, str]:
    """Sketch the top-20 Hessian eigenpairs of the MLP's last checkpoint (a second of CPU),
    their overlap with its top-20 magnitude mask, and a figure next to the lake.

    Returns:
        ``{role: artifact id or figure path}``.
    """
    echo("top-20 Hessian eigenpairs of the MLP (recycled SSRFT sketch, 500 training examples)")
    eigs_id = run_hessian_eig(lake, mlp_run_id, progress=False, **QUICKSTART_SKETCH)
    overlap_id = run_hessian_overlap(lake, eigs_id, mask="magnitude")
    eigs, overlap = lake.open(eigs_id), lake.open(overlap_id)
    lam = eigs["eigenvalues"].values
    echo(
        f"  lambda_1..3 = {lam[0]:.3f}, {lam[1]:.3f}, {lam[2]:.3f}; estimated relative error "
        f"{eigs.attrs['rel_err']:.2f} ({eigs.attrs['n_hvps']} HVPs in one data pass)"
    )
    echo(
        f"  overlap of the top-20 |theta| mask with the top-20 eigenspace: "
        f"{overlap['overlap'].values[-1]:.4f} (random mask: {overlap.attrs['baseline']:.4f})"
    )
    figure = Path(lake.url).parent / "quickstart-hessian-overlap.png"
    if not lake.local:
        figure = Path("quickstart-hessian-overlap.png")
    plot_hessian(lake, [overlap_id], figure)
    return {
        "hessian_eigs": eigs_id,
        "hessian_overlap": overlap_id,
        "Hessian spectrum and mask overlap": str(figure),
    }
