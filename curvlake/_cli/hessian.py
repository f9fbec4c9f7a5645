"""``curvlake hessian``: sketched (or exact) Hessian eigenpairs and their overlap with masks."""

from __future__ import annotations

import click

from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    checkpoint_list,
    dtype_option,
    n_examples_option,
    out_option,
    pass_settings,
    run_option,
    split_option,
)
from curvlake.constants import HESSIAN_METHODS, HESSIAN_NOISES, HESSIAN_RECOVERIES, SPLITS


@click.group(cls=CurvlakeGroup)
def hessian():
    """Hessian eigenspaces: sketch, solve, exact eigenpairs, mask overlap, plots, seed import."""


def _where_options(function):
    """The checkpoint(s) and the data subset of a Hessian."""
    for decorator in reversed(
        [
            run_option(),
            click.option(
                "--checkpoint",
                type=int,
                help="Checkpoint index (negative from the end; default -1, the last).",
            ),
            click.option(
                "--checkpoints",
                help="'all' or comma-separated indices: one artifact per checkpoint.",
            ),
            split_option(),
            n_examples_option(),
            click.option(
                "--balanced",
                is_flag=True,
                help="A class-balanced subset of --n-examples drawn with --seed, instead of "
                "the first N.",
            ),
        ]
    ):
        function = decorator(function)
    return function


def _sketch_options(function):
    """The sizes, mode and test matrices of a sketch."""
    for decorator in reversed(
        [
            click.option(
                "--outer",
                "k",
                type=click.IntRange(min=1),
                default=20,
                show_default=True,
                help="k: eigenpairs recovered (outer sketch size).",
            ),
            click.option(
                "--inner",
                "s",
                type=click.IntRange(min=1),
                help="s: inner sketch size (recycled, oversampled; default 2k).",
            ),
            click.option(
                "--recovery",
                type=click.Choice(HESSIAN_RECOVERIES),
                help="recycled (the seed's SkEIGH, s HVPs; default), oversampled (k + s), hmt "
                "(2k, + 2k per power iteration), krylov (block Krylov: 2k, + k per block; "
                "the most accurate per HVP), nystrom, singlepass (k).",
            ),
            click.option(
                "--noise",
                type=click.Choice(HESSIAN_NOISES),
                help="Test matrices (default ssrft).",
            ),
            click.option(
                "--power-iters",
                type=click.IntRange(min=0),
                help="hmt: subspace iterations q; krylov: Krylov depth q, a basis of q + 1 "
                "blocks of k columns (default 0).",
            ),
            click.option(
                "--probes",
                type=click.IntRange(min=0),
                help="Gaussian probes of the a-posteriori error estimate (default 30).",
            ),
            click.option(
                "--seed",
                type=click.IntRange(min=0),
                help="Seed of the test matrices and of --balanced (default 0).",
            ),
            click.option(
                "--block-size",
                type=click.IntRange(min=1),
                help="Columns per task and per stored chunk (default: by the chunk budget).",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                help="Examples per HVP batch (default min(N, 256)).",
            ),
            dtype_option(),
        ]
    ):
        function = decorator(function)
    return function


_EIGS_OPTION = click.option(
    "--eigs",
    "n_eigs",
    type=click.IntRange(min=1),
    help="Eigenpairs kept (default k). krylov keeps up to (q + 1) k Ritz pairs: e.g. "
    "--outer 5 --power-iters 12 --eigs 20 (blocks of 5 HVPs, like Lanczos); other modes at "
    "most k.",
)


def _checkpoints(checkpoint, checkpoints):
    if checkpoint is not None and checkpoints is not None:
        raise click.UsageError("give --checkpoint or --checkpoints, not both")
    if checkpoints is not None:
        return checkpoint_list(checkpoints)
    return None if checkpoint is None else checkpoint


def _echo_all(lake, ids):
    """One line per artifact: its id and what it holds."""
    for artifact in ids if isinstance(ids, list) else [ids]:
        click.echo(f"{artifact}  {_summary(lake, artifact)}")


def _summary(lake, artifact: str) -> str:
    ds = lake.open(artifact)
    attrs = ds.attrs
    where = f"run {attrs['run']} checkpoint {attrs['checkpoint']}"
    if artifact.startswith("hessian_sketch"):
        return (
            f"{attrs['recovery']} {attrs['noise']} sketch, k={attrs['k']}: {attrs['n_hvps']} HVPs "
            f"in {attrs['n_data_passes']} data pass(es), {attrs['n_examples']} {attrs['split']} "
            f"examples, {where}"
        )
    if artifact.startswith("hessian_eigs"):
        values = ", ".join(f"{v:.4g}" for v in ds["eigenvalues"].values[:3])
        error, how = attrs.get("rel_err"), "" if attrs["method"] == "exact" else "estimated "
        rank = f"rank-{attrs['k']}"
        error = "" if error is None else f", {how}relative error of the {rank} part {error:.2g}"
        return f"{attrs['method']}: top-{attrs['k']} eigenvalues {values}, ...{error}; {where}"
    return (
        f"overlap at k'={attrs['k']}: {ds['overlap'].values[-1]:.4f} (random mask "
        f"{attrs['baseline']:.4f}), {where}"
    )


@hessian.command("sketch")
@_where_options
@_sketch_options
@pass_settings
def hessian_sketch(settings: Settings, run_id, checkpoint, checkpoints, **options):
    """Random Hessian measurements of a checkpoint (resumable: a killed run, rerun, computes
    only the missing columns). Prints each hessian_sketch id with a summary."""
    from curvlake.pipelines.hessian.sketch import run_hessian_sketch
    from curvlake.pipelines.skeleton import resolve_run

    where = _checkpoints(checkpoint, checkpoints)
    options = {name: value for name, value in options.items() if value is not None}
    lake_ = settings.lake()
    with settings.cluster_session():
        if isinstance(where, (str, list)):
            chosen = resolve_run(lake_, run_id).checkpoint_indices(where)
            ids = [run_hessian_sketch(lake_, run_id, checkpoint=c, **options) for c in chosen]
        else:
            ids = run_hessian_sketch(
                lake_, run_id, checkpoint=-1 if where is None else where, **options
            )
    _echo_all(lake_, ids)


@hessian.command("solve")
@click.argument("sketch_ids", nargs=-1, required=True)
@click.option(
    "--rcond",
    type=click.FloatRange(0, 1, max_open=True),
    help="Relative cutoff of the core's least-squares solves (default 1e-6).",
)
@_EIGS_OPTION
@pass_settings
def hessian_solve(settings: Settings, sketch_ids, rcond, n_eigs):
    """Eigenpairs of hessian_sketch artifacts (TSQR, projections, core); prints the
    hessian_eigs id(s), each with its top eigenvalues."""
    from curvlake.pipelines.hessian.recovery import DEFAULT_RCOND
    from curvlake.pipelines.hessian.solve import run_hessian_solve

    lake_ = settings.lake()
    with settings.cluster_session():
        ids = [
            run_hessian_solve(
                lake_,
                sketch_id,
                rcond=DEFAULT_RCOND if rcond is None else rcond,
                n_eigs=n_eigs,
            )
            for sketch_id in sketch_ids
        ]
    _echo_all(lake_, ids)


@hessian.command("eig")
@_where_options
@_sketch_options
@click.option(
    "--method",
    type=click.Choice(HESSIAN_METHODS),
    default="sketch",
    show_default=True,
    help="sketch: sketch + solve; exact: the dense Hessian (small nets).",
)
@click.option(
    "--rcond",
    type=click.FloatRange(0, 1, max_open=True),
    help="Relative cutoff of the core's least-squares solves (default 1e-6).",
)
@_EIGS_OPTION
@pass_settings
def hessian_eig(settings: Settings, run_id, checkpoint, checkpoints, **options):
    """Top-k Hessian eigenpairs of a checkpoint (sketch + solve, or exact); prints the
    hessian_eigs id(s), each with its top eigenvalues."""
    from curvlake.pipelines.hessian.solve import run_hessian_eig, run_hessian_eig_checkpoints

    where = _checkpoints(checkpoint, checkpoints)
    options = {name: value for name, value in options.items() if value is not None}
    lake_ = settings.lake()
    with settings.cluster_session():
        if isinstance(where, (str, list)):
            ids = run_hessian_eig_checkpoints(lake_, run_id, where, **options)
        else:
            ids = run_hessian_eig(
                lake_, run_id, checkpoint=-1 if where is None else where, **options
            )
    _echo_all(lake_, ids)


@hessian.command("overlap")
@click.argument("eigs_ids", nargs=-1, required=True)
@click.option(
    "--mask",
    default="magnitude",
    show_default=True,
    help="magnitude[:global|:layer] (largest |theta| of the eigenpairs' checkpoint) or a mask "
    "id of the same run.",
)
@click.option(
    "--mask-size",
    type=click.IntRange(min=1),
    help="m, coordinates of a magnitude mask (default k).",
)
@pass_settings
def hessian_overlap(settings: Settings, eigs_ids, mask, mask_size):
    """Overlap of a mask with the top-k' eigenspaces, k' = 1..k (one hessian_overlap per
    hessian_eigs); prints each id with its overlap at k' = k."""
    from curvlake.pipelines.hessian.overlap_pipeline import run_hessian_overlap

    lake_ = settings.lake()
    with settings.cluster_session():
        ids = [
            run_hessian_overlap(lake_, eigs_id, mask=mask, mask_size=mask_size)
            for eigs_id in eigs_ids
        ]
    _echo_all(lake_, ids)


@hessian.command("plot")
@click.argument("artifact_ids", nargs=-1, required=True)
@out_option("Figure file (.png, .pdf or .svg).")
@pass_settings
def hessian_plot(settings: Settings, artifact_ids, out):
    """Spectrum with scree bounds and overlap against k' with its baseline (hessian_overlap
    ids; several checkpoints add the curves over training), or spectra (hessian_eigs ids)."""
    from curvlake.pipelines.hessian.plot import plot_hessian

    click.echo(plot_hessian(settings.lake(), list(artifact_ids), out or "hessian.png"))


@hessian.command("import-hdf5")
@click.argument("directory", type=click.Path(file_okay=False))
@run_option()
@click.option("--checkpoint", type=int, default=-1, show_default=True, help="Its checkpoint.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help="The seed's RANDOM_SEED (its SSRFTs are seeded RANDOM_SEED + 1 and + 2).",
)
@click.option("--inner-left-seed", type=click.IntRange(min=0), help="Seed of Φ, instead.")
@click.option("--inner-right-seed", type=click.IntRange(min=0), help="Seed of Ψ, instead.")
@click.option(
    "--source",
    type=click.Choice(("auto", "merged", "subfiles")),
    default="auto",
    show_default=True,
    help="The *_MERGED.h5 files, the per-measurement files, or merged when complete.",
)
@click.option(
    "--ok-flag", default="measured", show_default=True, help="Flag of a finished measurement."
)
@click.option("--split", type=click.Choice(SPLITS), help="Recorded only.")
@click.option("--n-examples", type=click.IntRange(min=1), help="Recorded only.")
@pass_settings
def hessian_import_hdf5(
    settings: Settings,
    directory,
    run_id,
    checkpoint,
    seed,
    inner_left_seed,
    inner_right_seed,
    source,
    ok_flag,
    split,
    n_examples,
):
    """Import the seed's skerch HDF5 measurements (leftouter_*/inner_* or *_MERGED files) as
    a hessian_sketch, to solve here; prints its id."""
    from curvlake.pipelines.hessian.hdf5_import import import_hessian_hdf5

    click.echo(
        import_hessian_hdf5(
            settings.lake(),
            directory,
            run_id,
            checkpoint=checkpoint,
            seed=seed,
            seed_inner_left=inner_left_seed,
            seed_inner_right=inner_right_seed,
            source=source,
            ok_flag=ok_flag,
            split=split,
            n_examples=n_examples,
        )
    )
