"""``curvlake compare``: cross-method analyses, each writing an artifact and its figure."""

from __future__ import annotations

import click

from curvlake._cli.common import CurvlakeGroup, Settings, int_list, pass_settings
from curvlake._cli.report import comma_list


@click.group(cls=CurvlakeGroup)
def compare():
    """Questions that join methods: masks vs eigenspaces, eigenspace drift, NPEFF components vs
    per-example statistics, per-layer saturation / probes / receptive fields."""


def figures_option():
    return click.option(
        "--figures",
        "figures_dir",
        type=click.Path(file_okay=False),
        default=".",
        show_default=True,
        help="Folder the figure (PNG and SVG) is written to.",
    )


def _finish(settings: Settings, artifact: str, figures_dir: str) -> None:
    """Print the artifact id and write its figures."""
    from curvlake.report import RENDERERS

    lake = settings.lake()
    info = lake.info(artifact)
    click.echo(artifact)
    for figure in RENDERERS[info.kind](lake, info):
        for path in figure.save(figures_dir):
            click.echo(f"figure: {path}")


@compare.command("masks-eigenspace")
@click.argument("eigs_id")
@click.option("--mask", "masks", multiple=True, help="A mask artifact (repeatable).")
@click.option(
    "--pruning", multiple=True, help="A pruning artifact: its masks at every sparsity (repeatable)."
)
@click.option("--npeff", multiple=True, help="An npeff artifact: each component's top parameters.")
@click.option(
    "--n-top-params",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Top parameters per NPEFF component.",
)
@figures_option()
@pass_settings
def compare_masks(settings: Settings, eigs_id, masks, pruning, npeff, n_top_params, figures_dir):
    """Overlap of masks with the top-k eigenspace of EIGS_ID (a hessian_eigs artifact), against
    the random baseline. Without --mask/--pruning/--npeff: every mask and npeff artifact of the
    eigenspace's run and checkpoint."""
    from curvlake.pipelines.compare import run_masks_eigenspace

    artifact = run_masks_eigenspace(
        settings.lake(),
        eigs_id,
        masks=comma_list(masks),
        pruning=comma_list(pruning),
        npeff=comma_list(npeff),
        n_top_params=n_top_params,
    )
    _finish(settings, artifact, figures_dir)


@compare.command("drift")
@click.argument("eigs_ids", nargs=-1)
@click.option("--run", "run_id", help="Every hessian_eigs artifact of this run, by checkpoint.")
@click.option(
    "--mode",
    type=click.Choice(("consecutive", "reference")),
    default="consecutive",
    show_default=True,
    help="Pairs: each with the next, or each with the first.",
)
@click.option("--k", type=click.IntRange(min=1), help="Leading eigenvectors compared.")
@figures_option()
@pass_settings
def compare_drift(settings: Settings, eigs_ids, run_id, mode, k, figures_dir):
    """Principal angles between the top-k eigenspaces of EIGS_IDS (in training order), or of
    every hessian_eigs artifact of --run."""
    from curvlake.errors import UserInputError
    from curvlake.pipelines.compare import run_drift, run_eigs_of

    if bool(eigs_ids) == bool(run_id):
        raise UserInputError("give hessian_eigs ids or --run, not both and not neither")
    lake = settings.lake()
    ids = list(eigs_ids) if eigs_ids else run_eigs_of(lake, run_id)
    _finish(settings, run_drift(lake, ids, mode=mode, k=k), figures_dir)


@compare.command("examples")
@click.argument("npeff_id")
@click.option("--stats", "stats_id", help="A jacobian_stats artifact of the same examples.")
@click.option(
    "--n-top",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Top examples per component shown side by side.",
)
@click.option("--components", help="Comma-separated component indices (default: all).")
@figures_option()
@pass_settings
def compare_examples(settings: Settings, npeff_id, stats_id, n_top, components, figures_dir):
    """Rank correlations of NPEFF_ID's coefficients with the loss, confidence, PEF norm and
    (with --stats) input-Jacobian norms of the same examples; top examples side by side."""
    from curvlake.pipelines.compare import run_examples

    artifact = run_examples(
        settings.lake(),
        npeff_id,
        stats=stats_id,
        n_top=n_top,
        components=int_list(components, "--components"),
    )
    _finish(settings, artifact, figures_dir)


@compare.command("layers")
@click.option("--saturation", "saturation_id", help="A saturation artifact.")
@click.option("--probes", "probes_ids", multiple=True, help="A probes artifact (repeatable).")
@click.option("--receptive-field", "receptive_field_id", help="A receptive_field artifact.")
@click.option(
    "--phase",
    type=click.Choice(("eval", "train")),
    default="eval",
    show_default=True,
    help="Saturation phase.",
)
@click.option(
    "--probe-split",
    type=click.Choice(("train", "val", "test")),
    default="test",
    show_default=True,
    help="Split of the probe accuracy.",
)
@figures_option()
@pass_settings
def compare_layers(
    settings: Settings,
    saturation_id,
    probes_ids,
    receptive_field_id,
    phase,
    probe_split,
    figures_dir,
):
    """Saturation, probe accuracy and receptive field per layer of one run on one axis, over
    epochs, with the border layer."""
    from curvlake.pipelines.compare import run_layers

    artifact = run_layers(
        settings.lake(),
        saturation=saturation_id,
        probes=comma_list(probes_ids) or (),
        receptive_field=receptive_field_id,
        phase=phase,
        probe_split=probe_split,
    )
    _finish(settings, artifact, figures_dir)
