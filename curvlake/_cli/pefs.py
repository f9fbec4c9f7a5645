"""``curvlake pefs``: per-example Fishers (compute, dataset-level Fisher, filter, import)."""

from __future__ import annotations

import click

from curvlake._cli._given import given
from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    block_size_option,
    checkpoint_option,
    dtype_option,
    int_list,
    n_examples_option,
    pass_settings,
    run_option,
    seed_option,
    split_option,
)
from curvlake.constants import DSF_MODES, PEF_KINDS, PEF_STORAGES
from curvlake.validation import refuse_unused


@click.group(cls=CurvlakeGroup)
def pefs():
    """Per-example Fishers (NPEFF): compute, dataset-level Fisher, filter, import."""


@pefs.command("compute")
@run_option()
@checkpoint_option()
@split_option()
@n_examples_option()
@click.option(
    "--kind",
    "pef_kind",
    type=click.Choice(PEF_KINDS),
    default="diag",
    show_default=True,
    help="diag: D-PEF (diagonal); lowrank: LRM-PEF factors; lvrm: variable-rank factors.",
)
@click.option(
    "--k",
    type=click.IntRange(min=1),
    help="Entries kept per example with --storage topk (default 4096).",
)
@click.option(
    "--storage",
    type=click.Choice(PEF_STORAGES),
    default="topk",
    show_default=True,
    help="topk: the k largest entries per example (sparse); dense: every entry (small models).",
)
@click.option("--min-prob", type=click.FloatRange(0, 1), help="diag/lvrm: class threshold.")
@click.option("--top-k-classes", type=click.IntRange(min=1), help="lowrank: largest logits.")
@click.option("--max-classes", type=click.IntRange(min=1), help="lvrm: classes per example.")
@block_size_option(256)
@dtype_option()
@pass_settings
def pefs_compute(
    settings: Settings,
    run_id,
    checkpoint,
    split,
    n_examples,
    pef_kind,
    k,
    storage,
    min_prob,
    top_k_classes,
    max_classes,
    block_size,
    dtype,
):
    """Compute per-example Fishers of a run's checkpoint (resumable)."""
    from curvlake.pipelines.npeff.compute_pefs import run_pefs

    lake_ = settings.lake()
    with settings.cluster_session():
        pefs_id = run_pefs(
            lake_,
            run_id,
            checkpoint=checkpoint,
            split=split,
            n_examples=n_examples,
            pef_kind=pef_kind,
            k=k,
            storage=storage,
            min_prob=min_prob,
            top_k_classes=top_k_classes,
            max_classes=max_classes,
            block_size=block_size,
            dtype=dtype,
        )
    click.echo(pefs_id)


@pefs.command("dsf")
@run_option()
@checkpoint_option()
@split_option()
@n_examples_option()
@click.option(
    "--mode",
    type=click.Choice(DSF_MODES),
    default="expectation",
    show_default=True,
    help="expectation: the mean D-PEF (every class, weighted by p); sampling: one class drawn "
    "from p per example (the reference's sampled Fisher).",
)
@seed_option(what="sampled classes (--mode sampling)")
@dtype_option()
@pass_settings
def pefs_dsf(settings: Settings, run_id, checkpoint, split, n_examples, mode, seed, dtype):
    """Dataset-level diagonal Fisher (mean D-PEF, or sampled-label Fisher)."""
    from curvlake.pipelines.npeff.compute_pefs import run_dsf

    if mode == "expectation":
        refuse_unused("to --mode expectation (it seeds --mode sampling)", **given("seed"))
    lake_ = settings.lake()
    with settings.cluster_session():
        click.echo(
            run_dsf(
                lake_,
                run_id,
                checkpoint=checkpoint,
                split=split,
                n_examples=n_examples,
                mode=mode,
                seed=seed,
                dtype=dtype,
            )
        )


@pefs.command("filter")
@click.argument("pefs_id")
@click.option("--incorrect-only", is_flag=True, help="Keep misclassified examples.")
@click.option("--labels", help="Keep these labels (comma-separated).")
@click.option("--indices", help="Keep these example positions (comma-separated).")
@pass_settings
def pefs_filter(settings: Settings, pefs_id, incorrect_only, labels, indices):
    """A new PEF artifact with only the selected examples (filters combine: an example is
    kept when it passes every filter given)."""
    from curvlake.pipelines.npeff.compute_pefs import run_filter

    for flag, text in (("--labels", labels), ("--indices", indices)):
        if text is not None and not text.strip(", "):
            raise click.BadParameter("is empty: give comma-separated integers", param_hint=flag)

    click.echo(
        run_filter(
            settings.lake(),
            pefs_id,
            incorrect_only=incorrect_only,
            labels=int_list(labels, "--labels"),
            indices=int_list(indices, "--indices"),
        )
    )


@pefs.command("import-hdf5")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--name", help="A name for the data (default: the file stem).")
@pass_settings
def pefs_import_hdf5(settings: Settings, path, name):
    """Import a D-PEF, LRM-PEF or LVRM-PEF HDF5 file of the NPEFF reference implementation."""
    from curvlake.pipelines.npeff.hdf5_import import import_pefs_hdf5

    click.echo(import_pefs_hdf5(settings.lake(create=True), path, name=name))
