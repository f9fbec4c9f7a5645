"""``curvlake train``: training runs (and grids of runs) with checkpoints in the lake."""

from __future__ import annotations

from pathlib import Path

import click

from curvlake._cli._given import given
from curvlake._cli.common import Settings, load_options, parse_assignments, pass_settings
from curvlake.constants import CONV_METHODS, OPTIMIZERS, SATURATION_RULES, TRACKERS
from curvlake.lake import Lake
from curvlake.validation import refuse_unused

#: Datasets read from files under --data-dir (digits is bundled, .npz and dataset-<id> are
#: their own files).
FILE_DATASETS = ("mnist", "cifar10", "cifar100")

# Shown in --help; tests/test_cli.py checks they are TrainConfig's defaults.
DEFAULTS = {"epochs": 10, "lr": 0.01, "batch_size": 128, "optimizer": "sgd", "seed": 0}


@click.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML/JSON file of training options.",
)
@click.option(
    "--grid",
    "grid_file",
    type=click.Path(dir_okay=False),
    help="YAML/JSON grid: list values expand into the Cartesian product of runs.",
)
@click.option("--model", help="Model zoo name: mlp (default), mnist_mini, cnn5_k, resnet18_k, ...")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Model parameter, e.g. --param k=8 (repeatable).",
)
@click.option(
    "--dataset",
    help="digits (default, bundled), mnist, cifar10, cifar100, an .npz file or dataset-<id>.",
)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder of dataset files.")
@click.option(
    "--epochs",
    type=click.IntRange(min=0),
    help=f"Training epochs (default {DEFAULTS['epochs']}).",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help=f"Learning rate after warmup (default {DEFAULTS['lr']}).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help=f"Training batch size (default {DEFAULTS['batch_size']}).",
)
@click.option(
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    help=f"Optimizer (default {DEFAULTS['optimizer']}).",
)
@click.option(
    "--label-noise",
    type=click.FloatRange(0, 1),
    help="Share of training labels changed to another class (default 0).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help=f"Seed of initialisation, shuffling, augmentation, dropout (default {DEFAULTS['seed']}).",
)
@click.option(
    "--save-every",
    type=click.IntRange(min=0),
    help="Also checkpoint every E epochs (default 0: only the first and last).",
)
@click.option("--device", help="auto (default: cuda if available), cpu, cuda, cuda:N.")
@click.option(
    "--track",
    type=click.Choice(TRACKERS),
    help="Record during training: saturation of the feature layers (train forwards and a "
    "test pass per epoch) into a saturation artifact.",
)
@click.option(
    "--delta",
    type=click.FloatRange(min=0, min_open=True),
    help="--track saturation: explained-variance threshold (default 0.99).",
)
@click.option(
    "--conv-method",
    type=click.Choice(CONV_METHODS),
    help="--track saturation: conv outputs as observations (default channelwise).",
)
@click.option("--layers", help="--track saturation: regular expression selecting the layers (all).")
@click.option(
    "--rule",
    type=click.Choice(SATURATION_RULES),
    help="--track saturation: intrinsic-dimension rule (default textbook; delve: delve 0.1.50).",
)
@click.option(
    "--ddof",
    type=click.IntRange(min=0),
    help="--track saturation: covariance divisor n - ddof (default 0, as delve).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other training option, e.g. --set warmup_epochs=5 (repeatable).",
)
@pass_settings
def train(
    settings: Settings,
    config_file,
    grid_file,
    model,
    params,
    dataset,
    data_dir,
    epochs,
    lr,
    batch_size,
    optimizer,
    label_noise,
    seed,
    save_every,
    device,
    track,
    delta,
    conv_method,
    layers,
    rule,
    ddof,
    overrides,
):
    """Train a model (or a grid of models) with checkpoints in the lake; resumable."""
    from curvlake.nn.grids import expand_train_grid, load_grid
    from curvlake.pipelines.train import as_train_config, run_grid, run_train

    options = load_options(config_file) if config_file else {}
    named = {
        "model": model,
        "dataset": dataset,
        "data_dir": data_dir,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "label_noise": label_noise,
        "seed": seed,
        "save_every": save_every,
        "device": device,
    }
    options.update({k: v for k, v in named.items() if v is not None})
    if track is None:
        refuse_unused(
            "without --track saturation", **given("delta", "conv_method", "layers", "rule", "ddof")
        )
    else:
        tracking = {
            "track": [track],
            "saturation_delta": delta,
            "conv_method": conv_method,
            "track_layers": layers,
            "saturation_rule": rule,
            "saturation_ddof": ddof,
        }
        options.update({k: v for k, v in tracking.items() if v is not None})
    options.update(parse_assignments(overrides, "--set"))
    if params:
        options["model_params"] = {
            **options.get("model_params", {}),
            **parse_assignments(params, "--param"),
        }
    if grid_file:
        configs = expand_train_grid(load_grid(grid_file))
        configs = [c.__class__.from_dict({**c.to_dict(), **options}) for c in configs]
        lake_ = settings.lake(create=True)
        click.echo(f"grid of {len(configs)} runs")
        with settings.cluster_session():
            run_ids = run_grid(lake_, configs)
        for run_id, config in zip(run_ids, configs, strict=True):
            click.echo(f"{run_id}  {config.model} {config.model_params}")
        return
    config = as_train_config(options)  # bad options are refused before a lake is created
    if config.dataset not in FILE_DATASETS:
        refuse_unused(
            f"to --dataset {config.dataset} (only {', '.join(FILE_DATASETS)} are read from a "
            "folder)",
            **given("data_dir"),
        )
    lake_ = settings.lake(create=True)
    sources = {}
    if config_file:
        from curvlake.pipelines.data import file_sha256

        sources["config_file"] = f"{config_file} sha256:{file_sha256(Path(config_file))}"
    run_id = run_train(lake_, config, sources=sources, echo=click.echo)
    print_run(lake_, run_id)
    if "saturation" in config.track:
        from curvlake.pipelines.saturation.tracking import tracked_saturation_id

        click.echo(f"{tracked_saturation_id(run_id, config)}  saturation during training")


def print_run(lake_: Lake, run_id: str) -> None:
    ds = lake_.open(run_id)
    last = {name: float(ds[name][-1]) for name in ("train_accuracy", "test_accuracy")}
    click.echo(
        f"{run_id}  {ds.attrs['model']}  {ds.sizes['param']} parameters  "
        f"{ds.sizes['checkpoint']} checkpoints  train acc {last['train_accuracy']:.3f}  "
        f"test acc {last['test_accuracy']:.3f}"
    )
