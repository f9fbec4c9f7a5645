"""``curvlake runs``: models trained elsewhere in, checkpoints out."""

from __future__ import annotations

import click

from curvlake._cli._given import given
from curvlake._cli.common import (
    CurvlakeGroup,
    Settings,
    checkpoint_option,
    load_options,
    parse_assignments,
    pass_settings,
)
from curvlake.constants import STANDARDIZE_MODES
from curvlake.validation import refuse_unused


@click.group(cls=CurvlakeGroup)
def runs():
    """Import models trained elsewhere, export checkpoints."""


@runs.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option(
    "--model", help="Zoo model PATH's state_dict belongs to (mlp, cnn5_k, resnet18_k, ...)."
)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Zoo model parameter.")
@click.option(
    "--module",
    type=click.Path(dir_okay=False),
    help="TorchScript or pickled module PATH's state_dict belongs to (a model not in the zoo).",
)
@click.option(
    "--key-map",
    help="Rename the state_dict's keys: 'order' (match tensors in order, shapes checked) or a "
    "YAML/JSON file of old_key: new_key.",
)
@click.option(
    "--dataset",
    help="Data to analyse the run on: dataset-<id> (curvlake data import), digits, mnist, "
    "cifar10, cifar100 (with --data-dir) or an .npz file. Without it the run holds weights only.",
)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder of dataset files.")
@click.option(
    "--standardize",
    type=click.Choice(STANDARDIZE_MODES),
    default="none",
    show_default=True,
    help="Input standardization (none: the inputs as the model was trained on them).",
)
@click.option(
    "--split-seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the train / val split of --dataset (as `curvlake train`).",
)
@click.option(
    "--num-classes", type=click.IntRange(min=1), help="Classifier outputs (default: the data's)."
)
@click.option("--input-shape", help="Shape of one input, e.g. 3,32,32 or 64 (default: the data's).")
@pass_settings
def runs_import(
    settings: Settings,
    path,
    model,
    params,
    module,
    key_map,
    dataset,
    data_dir,
    standardize,
    split_seed,
    num_classes,
    input_shape,
):
    """Store a model trained elsewhere as a run: a state_dict with --model or --module, or a
    TorchScript / pickled module; with --dataset every pipeline can analyse it."""
    from curvlake.pipelines.runs import import_run

    if dataset is None:
        refuse_unused(
            "without --dataset (a run of weights only has no data)",
            **given("standardize", "split_seed", "data_dir"),
        )
    shape = None
    if input_shape is not None:
        try:
            shape = [int(v) for v in input_shape.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(
                f"{input_shape!r} is not like 3,32,32 or 64", param_hint="--input-shape"
            ) from None
    if key_map not in (None, "order"):
        key_map = load_options(key_map, "--key-map")
    run_id = import_run(
        settings.lake(create=True),
        path,
        model=model,
        model_params=parse_assignments(params, "--param"),
        module=module,
        key_map=key_map,
        num_classes=num_classes,
        input_shape=shape,
        dataset=dataset,
        data_dir=data_dir,
        split_seed=split_seed,
        standardize=standardize,
    )
    click.echo(run_id)
    if dataset is None:
        click.echo(
            "weights only: add --dataset to analyse the run (pefs compute, stats compute, ...)",
            err=True,
        )


@runs.command("export")
@click.argument("run_id")
@click.argument("path", type=click.Path(dir_okay=False))
@checkpoint_option()
@pass_settings
def runs_export(settings: Settings, run_id, path, checkpoint):
    """Write a checkpoint's state_dict to PATH (torch.save)."""
    from curvlake.pipelines.runs import export_state_dict

    click.echo(f"wrote {export_state_dict(settings.lake(), run_id, path, checkpoint)}")
