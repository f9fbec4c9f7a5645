"""``curvlake receptive-field``: receptive fields of a run's or a zoo model's layers."""

from __future__ import annotations

import math

import click

from curvlake._cli._given import given
from curvlake._cli.common import (
    Settings,
    int_list,
    parse_assignments,
    pass_settings,
    run_option,
)
from curvlake.validation import refuse_unused


@click.command("receptive-field")
@run_option(required=False)
@click.option("--model", help="Model zoo name (instead of --run), with --input-size.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="--model: model parameter, e.g. --param k=8 (repeatable).",
)
@click.option("--input-size", help="--model: spatial input size, e.g. 32,32.")
@click.option("--channels", type=click.IntRange(min=1), help="--model: input channels (3).")
@click.option("--num-classes", type=click.IntRange(min=1), help="--model: classes (10).")
@click.option("--layers", help="Regular expression selecting the feature layers (default: all).")
@pass_settings
def receptive_field(
    settings: Settings, run_id, model, params, input_size, channels, num_classes, layers
):
    """Receptive field (min and max over paths), jump and start of every layer, and the
    border layer, into a receptive_field artifact."""
    from curvlake.pipelines.saturation.rf_pipeline import run_receptive_field

    if run_id is not None:
        refuse_unused(
            "with --run (the run's model and input shape are used)",
            **given("input_size", "channels", "num_classes"),
            **{"--param": params or None},
        )
    lake_ = settings.lake(create=model is not None)
    rf_id = run_receptive_field(
        lake_,
        run_id,
        model=model,
        model_params=parse_assignments(params, "--param") if params else None,
        input_size=int_list(input_size, "--input-size"),
        channels=channels,
        num_classes=num_classes,
        layers=layers,
    )
    ds = lake_.open(rf_id)
    click.echo(rf_id)
    click.echo(f"  input size {ds.attrs['input_size']}; border layer {ds.attrs['border_layer']}")
    click.echo(f"  {'layer':<28} {'r_min':>10} {'r_max':>10} {'jump':>8} map")

    def show(values) -> str:
        return "x".join("inf" if math.isinf(v) else f"{v:g}" for v in values)

    for i, name in enumerate(ds.layer.values):
        size = ds.map_size.values[i]
        click.echo(
            f"  {str(name)[-28:]:<28} {show(ds.r_min.values[i]):>10} "
            f"{show(ds.r_max.values[i]):>10} {show(ds.jump.values[i]):>8} "
            f"{'x'.join(map(str, size)) if size[0] >= 0 else 'flat'}"
        )
