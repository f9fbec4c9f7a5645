"""``curvlake runs``: models trained elsewhere in, checkpoints out."""

from __future__ import annotations

import click

from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    checkpoint_option,
    parse_assignments,
    pass_settings,
)


@click.group(cls=CurvlakeGroup)
def runs():
    """Import models trained elsewhere, export checkpoints."""


@runs.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--model", help="Zoo name when PATH is a state_dict; omit for TorchScript/pickle.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Model parameter.")
@click.option("--num-classes", type=click.IntRange(min=1), required=True)
@click.option("--input-shape", required=True, help="Shape of one input, e.g. 3,32,32.")
@click.option("--dataset", default="unknown", show_default=True)
@pass_settings
def runs_import(settings: Settings, path, model, params, num_classes, input_shape, dataset):
    """Store a torch state_dict (zoo model) or a TorchScript/pickled module as a run."""
    from curvlake.pipelines.runs import import_run

    try:
        shape = [int(v) for v in input_shape.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{input_shape!r} is not like 3,32,32", param_hint="--input-shape"
        ) from None
    run_id = import_run(
        settings.lake(create=True),
        path,
        model=model,
        model_params=parse_assignments(params, "--param"),
        num_classes=num_classes,
        input_shape=shape,
        dataset=dataset,
    )
    click.echo(run_id)


@runs.command("export")
@click.argument("run_id")
@click.argument("path", type=click.Path(dir_okay=False))
@checkpoint_option()
@pass_settings
def runs_export(settings: Settings, run_id, path, checkpoint):
    """Write a checkpoint's state_dict to PATH (torch.save)."""
    from curvlake.pipelines.runs import export_state_dict

    click.echo(f"wrote {export_state_dict(settings.lake(), run_id, path, checkpoint)}")
