"""``curvlake npeff``: NPEFF components (fit, sparsify, coefficients, top examples, perturb)."""

from __future__ import annotations

import click

from curvlake._cli._given import given
from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    block_size_option,
    dtype_option,
    int_list,
    parse_assignments,
    pass_settings,
    seed_option,
)
from curvlake.constants import COEFF_METHODS, NMF_SOLVERS, NPEFF_KINDS
from curvlake.validation import refuse_unused


@click.group(cls=CurvlakeGroup)
def npeff():
    """NPEFF components: fit, sparsify, coefficients, top examples, perturbations."""


@npeff.command("fit")
@click.option("--pefs", "pefs_id", required=True, help="PEF artifact id.")
@click.option(
    "--components",
    type=click.IntRange(min=1),
    required=True,
    help="Number of components r (at most the number of examples).",
)
@click.option(
    "--kind",
    type=click.Choice(NPEFF_KINDS),
    default="diag",
    show_default=True,
    help="diag: D-NPEFF of diag PEFs; lowrank: LRM-NPEFF of lowrank/lvrm PEFs.",
)
@click.option(
    "--solver",
    type=click.Choice(NMF_SOLVERS),
    default="hals",
    show_default=True,
    help="D-NPEFF (--kind diag) solver: hals, or mu (the seed's multiplicative updates).",
)
@click.option(
    "--max-iter",
    type=click.IntRange(min=0),
    default=200,
    show_default=True,
    help="Iterations at most.",
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0),
    default=1e-4,
    show_default=True,
    help="Stop when the relative loss improves by less than this.",
)
@seed_option(what="initial factors")
@block_size_option(4096, "Parameters per column block.")
@click.option(
    "--lrm",
    "lrm_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="LRM-NPEFF option, e.g. --lrm n_iters_g_only=50 --lrm optimizer=adam.",
)
@pass_settings
def npeff_fit(
    settings: Settings,
    pefs_id,
    components,
    kind,
    solver,
    max_iter,
    tol,
    seed,
    block_size,
    lrm_items,
):
    """Factorize PEFs into non-negative components (resumable, out of core)."""
    from curvlake.pipelines.npeff.fit import run_npeff_fit

    if kind == "lowrank":
        refuse_unused(
            "to --kind lowrank (LRM-NPEFF options are --lrm KEY=VALUE)", **given("solver")
        )
    lake_ = settings.lake()
    with settings.cluster_session():
        npeff_id = run_npeff_fit(
            lake_,
            pefs_id,
            n_components=components,
            kind=kind,
            solver=solver,
            max_iter=max_iter,
            tol=tol,
            seed=seed,
            block_size=block_size,
            lrm_options=parse_assignments(lrm_items, "--lrm"),
        )
    ds = lake_.open(npeff_id)
    loss = float(ds["loss"][-1])
    click.echo(
        f"{npeff_id}  {int(ds.attrs['iterations'])} iterations, final relative loss "
        f"{loss:.5g}, converged: {ds.attrs['converged']}"
    )
    if loss > 0.999:
        hint = "more G-only steps (--lrm n_iters_g_only=...)" if kind == "lowrank" else "a new seed"
        click.echo(
            f"warning: relative loss {loss:.4f}: the components explain almost none of the "
            f"PEFs (W ≈ 0); try {hint}",
            err=True,
        )


@npeff.command("sparsify")
@click.argument("npeff_id")
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    required=True,
    help="Drop entries of the unit-norm rows of H below this.",
)
@pass_settings
def npeff_sparsify(settings: Settings, npeff_id, threshold):
    """Row-normalize H, move the scale into W, threshold: a sparse (CSR) copy."""
    from curvlake.pipelines.npeff.fit import run_npeff_sparsify

    click.echo(run_npeff_sparsify(settings.lake(), npeff_id, threshold=threshold))


@npeff.command("coeffs")
@click.argument("npeff_id")
@click.option("--pefs", "pefs_id", required=True, help="New PEFs (same model).")
@click.option(
    "--method",
    type=click.Choice(COEFF_METHODS),
    default="hals",
    show_default=True,
    help="Per-example NNLS solver.",
)
@pass_settings
def npeff_coeffs(settings: Settings, npeff_id, pefs_id, method):
    """Fit W for new PEFs with the components fixed (per-example NNLS, streamed)."""
    from curvlake.pipelines.npeff.fit import run_npeff_coeffs

    lake_ = settings.lake()
    with settings.cluster_session():
        click.echo(run_npeff_coeffs(lake_, npeff_id, pefs_id, method=method))


@npeff.command("top")
@click.argument("npeff_id")
@click.option("--components", help="Component indices, comma-separated (default: all).")
@click.option(
    "--n-top",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Top examples (largest W) per component.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write a collage of the top examples' images here (.png, .pdf or .svg) instead of "
    "a table.",
)
@pass_settings
def npeff_top(settings: Settings, npeff_id, components, n_top, out):
    """Top examples of each component (largest W): a table, or an image collage with --out."""
    from curvlake.pipelines.npeff.downstream import top_examples_collage, top_examples_table

    lake_ = settings.lake()
    selected = int_list(components, "--components")
    if out:
        path = top_examples_collage(lake_, npeff_id, out, components=selected, n_top=n_top)
        click.echo(f"wrote {path}")
        return
    rows = top_examples_table(lake_, npeff_id, components=selected, n_top=n_top)
    click.echo(
        f"{'component':>9} {'rank':>4} {'example':>7} {'sample_id':>9} {'label':>5} {'W':>12}"
    )
    for row in rows:
        click.echo(
            f"{row.component:>9} {row.rank:>4} {row.example:>7} {row.sample_id:>9} "
            f"{row.label:>5} {row.w:>12.5g}"
        )


@npeff.command("perturb")
@click.argument("npeff_id")
@click.option("--components", help="Component indices, comma-separated (default: all).")
@click.option(
    "--epsilon",
    type=click.FloatRange(min=0, min_open=True),
    default=0.1,
    show_default=True,
    help="L2 norm (> 0) of the parameter move along each unit component direction.",
)
@click.option(
    "--n-top",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Top examples (largest W) whose KL is compared with the baseline's.",
)
@click.option(
    "--n-baseline",
    type=click.IntRange(min=1),
    help="Random baseline examples (default: min(128, n - n_top)).",
)
@seed_option(what="random baseline examples")
@dtype_option("float64")
@click.option(
    "--max-abs-cos",
    type=click.FloatRange(0, 1),
    help="Isolate each component: move along the part of its direction orthogonal to every "
    "other component whose |cosine| with it is <= this (default: the plain direction).",
)
@pass_settings
def npeff_perturb(
    settings: Settings, npeff_id, components, epsilon, n_top, n_baseline, seed, dtype, max_abs_cos
):
    """Perturbation test: KL on the top examples vs a random baseline along each component."""
    import numpy as np

    from curvlake.pipelines.npeff.downstream import run_perturbation

    lake_ = settings.lake()
    with settings.cluster_session():
        perturbation_id = run_perturbation(
            lake_,
            npeff_id,
            components=int_list(components, "--components"),
            epsilon=epsilon,
            n_top=n_top,
            n_baseline=n_baseline,
            seed=seed,
            dtype=dtype,
            max_abs_cos=max_abs_cos,
        )
    ds = lake_.open(perturbation_id)
    click.echo(
        f"{'component':>9} {'KL top +':>10} {'KL top -':>10} {'KL base +':>10} "
        f"{'KL base -':>10} {'ratio +':>10} {'ratio -':>10}"
    )
    for i, j in enumerate(ds["component"].values):
        values = [float(v) for n in ("kl_top", "kl_baseline", "kl_ratio") for v in ds[n].values[i]]
        click.echo(f"{int(j):>9} " + " ".join(f"{v:>10.4g}" for v in values))
    if not np.isfinite(ds["kl_ratio"].values).all():
        click.echo(
            f"ratio nan or inf: the baseline KL is 0 (in {dtype} at epsilon {epsilon:g}); "
            "a larger --epsilon (or --dtype float64) resolves it",
            err=True,
        )
    click.echo(perturbation_id)


@npeff.command("import-hdf5")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--pefs", "pefs_id", help="The PEF artifact it was fitted on (labels, run).")
@pass_settings
def npeff_import_hdf5(settings: Settings, path, pefs_id):
    """Import a D-NPEFF (dense or sparse) or LRM-NPEFF HDF5 file of the reference code."""
    from curvlake.pipelines.npeff.hdf5_import import import_npeff_hdf5

    click.echo(import_npeff_hdf5(settings.lake(create=True), path, pefs_id=pefs_id))
