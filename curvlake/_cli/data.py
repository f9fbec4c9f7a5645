"""``curvlake data``: bring your own data into the lake."""

from __future__ import annotations

import click

from curvlake._cli.common import CurvlakeGroup, Settings, pass_settings


@click.group(cls=CurvlakeGroup)
def data():
    """Bring your own data into the lake."""


@data.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--labels", type=click.Path(dir_okay=False), help="Labels .npy for an .npy input.")
@click.option("--name", help="Name of the dataset (default: the file name).")
@click.option("--num-classes", type=click.IntRange(min=1), help="Default: largest label + 1.")
@pass_settings
def data_import(settings: Settings, path, labels, name, num_classes):
    """Store inputs and integer labels (.npz with x, y[, x_test, y_test], or .npy + --labels)."""
    from curvlake.pipelines.data import import_dataset

    dataset_id = import_dataset(
        settings.lake(create=True), path, labels=labels, name=name, num_classes=num_classes
    )
    click.echo(dataset_id)
    click.echo(f"train on it with: curvlake train --dataset {dataset_id} ...")
