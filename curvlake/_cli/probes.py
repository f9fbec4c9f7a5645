"""``curvlake probes``: linear probes per layer of a latents artifact, and their plot."""

from __future__ import annotations

import click

from curvlake._cli._given import given
from curvlake._cli.common import CurvlakeGroup, Settings, out_option, pass_settings
from curvlake.validation import refuse_unused


@click.group(cls=CurvlakeGroup)
def probes():
    """Linear probes (multinomial logistic regression) on every layer's latents."""


@probes.command("fit")
@click.argument("latents_id")
@click.option("--layers", help="Regular expression selecting the layers (default: all).")
@click.option(
    "--C",
    "C",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Inverse L2 strength, as scikit-learn's.",
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-4,
    show_default=True,
    help="L-BFGS gradient tolerance, as scikit-learn's.",
)
@click.option(
    "--max-iter",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="L-BFGS iterations (one pass over the data each, plus line searches).",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    help="Held-out share of train rows when the latents have no val split (default 0.1).",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Held-out rows."
)
@click.option("--block-size", type=click.IntRange(min=1), help="Examples per task.")
@pass_settings
def probes_fit(
    settings: Settings, latents_id, layers, C, tol, max_iter, val_fraction, seed, block_size
):
    """Fit one probe per layer of LATENTS_ID, out of core; print accuracy and convergence."""
    from curvlake.pipelines.saturation.probes_pipeline import run_probes

    lake_ = settings.lake()
    with settings.cluster_session():
        probes_id = run_probes(
            lake_,
            latents_id,
            layers=layers,
            C=C,
            tol=tol,
            max_iter=max_iter,
            val_fraction=val_fraction,
            seed=seed,
            block_size=block_size,
        )
    print_probes(lake_, probes_id)


def print_probes(lake_, probes_id: str) -> None:
    ds = lake_.open(probes_id)
    click.echo(probes_id)
    click.echo(
        f"  {'layer':<24} {'train':>7} {'val':>7} {'test':>7} {'iters':>6} {'passes':>7} converged"
    )
    for i, name in enumerate(ds.layer.values):
        click.echo(
            f"  {str(name)[-24:]:<24} {float(ds.train_accuracy[i]):>7.4f} "
            f"{float(ds.val_accuracy[i]):>7.4f} {float(ds.test_accuracy[i]):>7.4f} "
            f"{int(ds.n_iter[i]):>6} {int(ds.n_evaluations[i]):>7} {bool(ds.converged[i])}"
        )


@probes.command("plot")
@click.argument("probes_id")
@click.option("--receptive-field", help="receptive_field artifact: mark the border layer.")
@click.option("--saturation", help="saturation artifact: draw the layers' saturation beside.")
@click.option(
    "--epoch",
    type=int,
    default=-1,
    show_default=True,
    help="--saturation: index of the epoch drawn (negative from the end).",
)
@out_option("PNG path (default: ID.png).")
@pass_settings
def probes_plot(settings: Settings, probes_id, receptive_field, saturation, epoch, out):
    """Probe accuracy per layer (module order), border layer marked, saturation beside."""
    from curvlake.pipelines.saturation.plot import plot_probes

    if saturation is None:
        refuse_unused("without --saturation", **given("epoch"))
    lake_ = settings.lake()
    path = plot_probes(
        lake_,
        probes_id,
        out or f"{probes_id}.png",
        receptive_field=receptive_field,
        saturation=saturation,
        epoch=epoch,
    )
    click.echo(f"wrote {path}")
