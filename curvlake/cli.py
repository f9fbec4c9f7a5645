"""The ``curvlake`` command line: parse options, call one library function, print or plot.

Every command reads the global options (lake, cluster) from the click context; a user error
(``CurvlakeError``) prints one line and exits with status 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from curvlake import __version__
from curvlake.engine import CLUSTERS, client_session
from curvlake.errors import CurvlakeError
from curvlake.lake import Lake, open_lake

DEFAULT_LAKE = "curvlake-lake"


class _Group(click.Group):
    """A click group that turns curvlake's own errors into one clear line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CurvlakeError as error:
            raise click.ClickException(str(error)) from None


@dataclass
class Settings:
    """Global options, shared by every command."""

    lake_url: str
    scheduler: str | None
    scheduler_file: str | None
    cluster: str
    workers: int | None

    def lake(self, create: bool = False) -> Lake:
        return open_lake(self.lake_url, create=create)

    def cluster_session(self):
        """The Dask client for a pipeline (started only by commands that compute)."""
        return client_session(
            address=self.scheduler,
            scheduler_file=self.scheduler_file,
            cluster=self.cluster,
            n_workers=self.workers,
        )


pass_settings = click.make_pass_decorator(Settings)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="curvlake")
@click.option(
    "--lake",
    "lake_url",
    envvar="CURVLAKE_LAKE",
    default=DEFAULT_LAKE,
    show_default=True,
    help="Lake directory or fsspec URL (env CURVLAKE_LAKE).",
)
@click.option("--scheduler", help="Address of an existing Dask scheduler (tcp://host:8786).")
@click.option("--scheduler-file", type=click.Path(), help="Scheduler file of an existing cluster.")
@click.option(
    "--cluster",
    type=click.Choice(CLUSTERS),
    default="auto",
    show_default=True,
    help="Cluster to start when no scheduler is given.",
)
@click.option("--workers", type=click.IntRange(min=1), help="Number of workers (or SLURM jobs).")
@click.pass_context
def cli(ctx, lake_url, scheduler, scheduler_file, cluster, workers):
    """curvlake: look inside trained networks, with every artifact in a Zarr lake."""
    ctx.obj = Settings(lake_url, scheduler, scheduler_file, cluster, workers)


# -- lake --------------------------------------------------------------------------------------


@cli.group(cls=_Group)
def lake():
    """Create, list, inspect, validate and clean the lake."""


@lake.command("init")
@pass_settings
def lake_init(settings: Settings):
    """Create an empty lake at --lake (nothing happens if it already is a lake)."""
    created = settings.lake(create=True)
    click.echo(f"lake ready at {created.url}")


@lake.command("ls")
@click.option("--kind", help="Only artifacts of this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@pass_settings
def lake_ls(settings: Settings, kind, as_json):
    """List the artifacts of the lake."""
    infos = settings.lake().list(kind)
    if as_json:
        for info in infos:
            click.echo(
                json.dumps(
                    {
                        "id": info.id,
                        "kind": info.kind,
                        "status": info.status,
                        "created_at": info.created_at,
                        "inputs": info.inputs,
                        "config": info.config,
                    }
                )
            )
        return
    if not infos:
        click.echo("the lake is empty" if kind is None else f"no {kind} artifacts")
        return
    rows = [
        (i.id, i.status, i.created_at, ",".join(i.inputs) or "-", i.config_summary) for i in infos
    ]
    header = ("ID", "STATUS", "CREATED", "INPUTS", "CONFIG")
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(4)]
    for row in [header, *rows]:
        line = "  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths, strict=True))
        click.echo(f"{line}  {row[4]}"[:200])


@lake.command("show")
@click.argument("artifact")
@pass_settings
def lake_show(settings: Settings, artifact):
    """Print an artifact's catalog entry and its xarray structure."""
    the_lake = settings.lake()
    info = the_lake.info(artifact)
    click.echo(f"{info.id}  kind={info.kind}  status={info.status}  created={info.created_at}")
    click.echo(f"inputs: {', '.join(info.inputs) or '-'}")
    click.echo("config: " + json.dumps(info.config, sort_keys=True))
    if info.status == "complete":
        click.echo(str(the_lake.open(artifact)))
        click.echo(f'\nopen it with: xarray.open_zarr("{info.url}")')


@lake.command("validate")
@click.argument("artifact", required=False)
@click.option("--no-chunks", is_flag=True, help="Check schemas only, do not read every chunk.")
@pass_settings
def lake_validate(settings: Settings, artifact, no_chunks):
    """Check one artifact (or all complete ones) against its schema and checksums."""
    the_lake = settings.lake()
    ids = [artifact] if artifact else [i.id for i in the_lake.list() if i.status == "complete"]
    failed = 0
    for art in ids:
        try:
            the_lake.validate(art, check_chunks=not no_chunks)
            click.echo(f"ok      {art}")
        except CurvlakeError as error:
            failed += 1
            click.echo(f"FAILED  {error}")
    if failed:
        raise click.ClickException(f"{failed} of {len(ids)} artifact(s) failed validation")


@lake.command("gc")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@pass_settings
def lake_gc(settings: Settings, dry_run):
    """Remove stale staging and partial files (never complete artifacts)."""
    removed = settings.lake().gc(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for path in removed:
        click.echo(f"{verb} {path}")
    click.echo(f"{verb} {len(removed)} item(s)")


# -- data and runs ------------------------------------------------------------------------------


def _parse_assignments(items: tuple[str, ...], what: str) -> dict:
    """``KEY=VALUE`` pairs, values parsed as YAML scalars/lists (``k=8``, ``widths=[64,32]``)."""
    from curvlake._yaml import load_yaml

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        parsed[key.strip()] = load_yaml(value)
    return parsed


@cli.group(cls=_Group)
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


@cli.command()
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
@click.option("--model", help="Model zoo name (mlp, mnist_mini, cnn5_k, resnet18_k, ...).")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Model parameter, e.g. --param k=8 (repeatable).",
)
@click.option("--dataset", help="digits, mnist, cifar10, cifar100, a .npz file or dataset-<id>.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder of dataset files.")
@click.option("--epochs", type=click.IntRange(min=0))
@click.option("--lr", type=float)
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]))
@click.option("--label-noise", type=click.FloatRange(0, 1))
@click.option("--seed", type=int)
@click.option("--save-every", type=click.IntRange(min=0), help="Checkpoint every E epochs.")
@click.option("--device", help="auto, cpu, cuda, cuda:N.")
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
    overrides,
):
    """Train a model (or a grid of models) with checkpoints in the lake; resumable."""
    from curvlake.nn.grids import expand_train_grid, load_grid
    from curvlake.pipelines.train import run_grid, run_train

    options = _load_options(config_file) if config_file else {}
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
    options.update(_parse_assignments(overrides, "--set"))
    if params:
        options["model_params"] = {
            **options.get("model_params", {}),
            **_parse_assignments(params, "--param"),
        }
    lake_ = settings.lake(create=True)
    if grid_file:
        configs = expand_train_grid(load_grid(grid_file))
        configs = [c.__class__.from_dict({**c.to_dict(), **options}) for c in configs]
        click.echo(f"grid of {len(configs)} runs")
        with settings.cluster_session():
            run_ids = run_grid(lake_, configs)
        for run_id, config in zip(run_ids, configs, strict=True):
            click.echo(f"{run_id}  {config.model} {config.model_params}")
        return
    run_id = run_train(lake_, options)
    _print_run(lake_, run_id)


def _load_options(path: str) -> dict:
    from curvlake._yaml import load_yaml

    try:
        options = load_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise click.BadParameter(f"no such file: {path}", param_hint="--config") from None
    if not isinstance(options, dict):
        raise click.BadParameter(f"{path} must hold a mapping of options", param_hint="--config")
    return options


def _print_run(lake_: Lake, run_id: str) -> None:
    ds = lake_.open(run_id)
    last = {name: float(ds[name][-1]) for name in ("train_accuracy", "test_accuracy")}
    click.echo(
        f"{run_id}  {ds.attrs['model']}  {ds.sizes['param']} parameters  "
        f"{ds.sizes['checkpoint']} checkpoints  train acc {last['train_accuracy']:.3f}  "
        f"test acc {last['test_accuracy']:.3f}"
    )


@cli.group(cls=_Group)
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
        model_params=_parse_assignments(params, "--param"),
        num_classes=num_classes,
        input_shape=shape,
        dataset=dataset,
    )
    click.echo(run_id)


@runs.command("export")
@click.argument("run_id")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option(
    "--checkpoint",
    type=int,
    default=-1,
    show_default=True,
    help="Checkpoint index (negative: from the end).",
)
@pass_settings
def runs_export(settings: Settings, run_id, path, checkpoint):
    """Write a checkpoint's state_dict to PATH (torch.save)."""
    from curvlake.pipelines.runs import export_state_dict

    click.echo(f"wrote {export_state_dict(settings.lake(), run_id, path, checkpoint)}")


# -- NPEFF -------------------------------------------------------------------------------------


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of integers", param_hint=what
        ) from None


@cli.group(cls=_Group)
def pefs():
    """Per-example Fishers (NPEFF): compute, dataset-level Fisher, filter, import."""


@pefs.command("compute")
@click.option("--run", "run_id", required=True, help="Run id.")
@click.option(
    "--checkpoint",
    type=int,
    default=-1,
    show_default=True,
    help="Checkpoint index (negative from the end).",
)
@click.option(
    "--data",
    "split",
    type=click.Choice(["train", "val", "test"]),
    default="train",
    show_default=True,
    help="Split of the run's dataset.",
)
@click.option("--n-examples", type=click.IntRange(min=1), help="First N examples (default all).")
@click.option(
    "--kind",
    "pef_kind",
    type=click.Choice(["diag", "lowrank", "lvrm"]),
    default="diag",
    show_default=True,
)
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Entries kept per example (top-k storage).",
)
@click.option("--storage", type=click.Choice(["topk", "dense"]), default="topk", show_default=True)
@click.option("--min-prob", type=click.FloatRange(0, 1), help="diag/lvrm class threshold.")
@click.option("--top-k-classes", type=click.IntRange(min=1), help="lowrank: largest logits.")
@click.option("--max-classes", type=click.IntRange(min=1), help="lvrm: classes per example.")
@click.option("--block-size", type=click.IntRange(min=1), default=256, show_default=True)
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
        )
    click.echo(pefs_id)


@pefs.command("dsf")
@click.option("--run", "run_id", required=True)
@click.option("--checkpoint", type=int, default=-1, show_default=True)
@click.option(
    "--data",
    "split",
    type=click.Choice(["train", "val", "test"]),
    default="train",
    show_default=True,
)
@click.option("--n-examples", type=click.IntRange(min=1))
@click.option(
    "--mode",
    type=click.Choice(["expectation", "sampling"]),
    default="expectation",
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
@pass_settings
def pefs_dsf(settings: Settings, run_id, checkpoint, split, n_examples, mode, seed):
    """Dataset-level diagonal Fisher (mean D-PEF, or sampled-label Fisher)."""
    from curvlake.pipelines.npeff.compute_pefs import run_dsf

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
            )
        )


@pefs.command("filter")
@click.argument("pefs_id")
@click.option("--incorrect-only", is_flag=True, help="Keep misclassified examples.")
@click.option("--labels", help="Keep these labels (comma-separated).")
@click.option("--indices", help="Keep these example positions (comma-separated).")
@pass_settings
def pefs_filter(settings: Settings, pefs_id, incorrect_only, labels, indices):
    """A new PEF artifact with only the selected examples."""
    from curvlake.pipelines.npeff.compute_pefs import run_filter

    click.echo(
        run_filter(
            settings.lake(),
            pefs_id,
            incorrect_only=incorrect_only,
            labels=_int_list(labels, "--labels"),
            indices=_int_list(indices, "--indices"),
        )
    )


@cli.group(cls=_Group)
def npeff():
    """NPEFF components: fit, sparsify, coefficients, top examples, perturbations."""


@npeff.command("fit")
@click.option("--pefs", "pefs_id", required=True, help="PEF artifact id.")
@click.option("--components", type=click.IntRange(min=1), required=True, help="r.")
@click.option(
    "--kind",
    type=click.Choice(["diag", "lowrank"]),
    default="diag",
    show_default=True,
    help="D-NPEFF or LRM-NPEFF.",
)
@click.option(
    "--solver",
    type=click.Choice(["hals", "mu"]),
    default="hals",
    show_default=True,
    help="D-NPEFF solver (mu = the seed's multiplicative updates).",
)
@click.option("--max-iter", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--tol", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Parameters per column block.",
)
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
            lrm_options=_parse_assignments(lrm_items, "--lrm"),
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
    "--method", type=click.Choice(["hals", "active_set", "mu"]), default="hals", show_default=True
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
@click.option("--n-top", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write a collage of the top examples' images (PNG) here instead of a table.",
)
@pass_settings
def npeff_top(settings: Settings, npeff_id, components, n_top, out):
    """Top examples of each component (largest W): a table, or an image collage with --out."""
    from curvlake.pipelines.npeff.downstream import top_examples_collage, top_examples_table

    lake_ = settings.lake()
    selected = _int_list(components, "--components")
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
    type=click.FloatRange(min=0),
    default=0.1,
    show_default=True,
    help="L2 norm of the parameter move along each unit component direction.",
)
@click.option("--n-top", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--n-baseline",
    type=click.IntRange(min=1),
    help="Random baseline examples (default: min(128, n - n_top)).",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True
)
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
    from curvlake.pipelines.npeff.downstream import run_perturbation

    lake_ = settings.lake()
    with settings.cluster_session():
        perturbation_id = run_perturbation(
            lake_,
            npeff_id,
            components=_int_list(components, "--components"),
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
    click.echo(perturbation_id)


@npeff.command("import-hdf5")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--pefs", "pefs_id", help="The PEF artifact it was fitted on (labels, run).")
@pass_settings
def npeff_import_hdf5(settings: Settings, path, pefs_id):
    """Import a D-NPEFF (dense or sparse) or LRM-NPEFF HDF5 file of the reference code."""
    from curvlake.pipelines.npeff.hdf5_import import import_npeff_hdf5

    click.echo(import_npeff_hdf5(settings.lake(create=True), path, pefs_id=pefs_id))


# -- paste into curvlake/cli.py: after `pefs_filter` (pefs group) --------------------------------


@pefs.command("import-hdf5")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--name", help="A name for the data (default: the file stem).")
@pass_settings
def pefs_import_hdf5(settings: Settings, path, name):
    """Import a D-PEF, LRM-PEF or LVRM-PEF HDF5 file of the NPEFF reference implementation."""
    from curvlake.pipelines.npeff.hdf5_import import import_pefs_hdf5

    click.echo(import_pefs_hdf5(settings.lake(create=True), path, name=name))


# -- dataset statistics -----------------------------------------------------------------------


@cli.group(cls=_Group)
def stats():
    """Per-example statistics (input-Jacobian norms, confidence, loss) over checkpoints."""


def _run_ids(settings: Settings, run_ids: tuple[str, ...], grid_file: str | None) -> list[str]:
    ids = list(run_ids)
    if grid_file:
        from curvlake.lake import artifact_id
        from curvlake.nn.grids import expand_train_grid, load_grid

        lake_ = settings.lake()
        for config in expand_train_grid(load_grid(grid_file)):
            run_id = artifact_id("run", config.to_dict())
            lake_.info(run_id)  # a clear error when that run was not trained
            ids.append(run_id)
    return ids


@stats.command("compute")
@click.option("--run", "run_ids", multiple=True, help="Run id (repeatable).")
@click.option(
    "--grid",
    "grid_file",
    type=click.Path(dir_okay=False),
    help="The runs of a training grid file (as given to `curvlake train --grid`).",
)
@click.option(
    "--checkpoints",
    default="all",
    show_default=True,
    help="'all' or comma-separated checkpoint indices (negative from the end).",
)
@click.option(
    "--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    default=["jacobian_operator"],
    show_default=True,
    help="accuracy, cross_entropy, confidence, jacobian_frobenius, jacobian_operator (repeatable).",
)
@click.option(
    "--normalization",
    default="none",
    show_default=True,
    type=click.Choice(["none", "softmax", "logsoftmax", "crossentropy"]),
)
@click.option("--target-only", is_flag=True, help="Only the Jacobian row of the target class.")
@click.option(
    "--input-space",
    type=click.Choice(["standardized", "raw"]),
    default="standardized",
    show_default=True,
)
@click.option(
    "--method",
    type=click.Choice(["exact", "lanczos"]),
    default="exact",
    show_default=True,
    help="Operator norm: exact Gram or matrix-free Lanczos.",
)
@click.option(
    "--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True
)
@click.option("--block-size", type=click.IntRange(min=1), default=256, show_default=True)
@pass_settings
def stats_compute(
    settings: Settings,
    run_ids,
    grid_file,
    checkpoints,
    split,
    metrics,
    normalization,
    target_only,
    input_space,
    method,
    dtype,
    block_size,
):
    """Compute per-example statistics of runs at checkpoints over a whole split."""
    from curvlake.pipelines.jacobian_stats.pipeline import run_stats

    runs_ = _run_ids(settings, run_ids, grid_file)
    if not runs_:
        raise click.UsageError("give --run RUN_ID (repeatable) or --grid FILE")
    if checkpoints != "all":
        try:
            checkpoints = [int(c) for c in checkpoints.split(",")]
        except ValueError:
            raise click.BadParameter(
                f"{checkpoints!r}: use 'all' or indices like 0,-1", param_hint="--checkpoints"
            ) from None
    lake_ = settings.lake()
    with settings.cluster_session():
        stats_id = run_stats(
            lake_,
            runs_,
            metrics=metrics,
            split=split,
            checkpoints=checkpoints,
            normalization=normalization,
            target_only=target_only,
            input_space=input_space,
            method=method,
            dtype=dtype,
            block_size=block_size,
        )
    ds = lake_.open(stats_id)
    click.echo(stats_id)
    for metric in ds.attrs["metrics"]:
        means = ds[metric].isel(checkpoint=-1).mean("example").values
        click.echo(
            f"  mean {metric} at the last checkpoint, per run: "
            + ", ".join(f"{v:.4g}" for v in means)
        )


@stats.command("plot")
@click.argument("stats_id")
@click.option("--metric", default="jacobian_operator", show_default=True)
@click.option("--checkpoint", type=int, default=-1, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="PNG path (default: ID.png).")
@pass_settings
def stats_plot(settings: Settings, stats_id, metric, checkpoint, out):
    """Draw mean METRIC and train/test error against model width (PNG)."""
    from curvlake.pipelines.jacobian_stats.plot import plot_width_sweep, width_table

    lake_ = settings.lake()
    path = plot_width_sweep(
        lake_, stats_id, out or f"{stats_id}.png", metric=metric, checkpoint=checkpoint
    )
    table = width_table(lake_, stats_id, metric, checkpoint)
    click.echo(f"{'width':>8} {'mean ' + metric:>24} {'train err':>10} {'test err':>10}")
    for i, width in enumerate(table["width"]):
        click.echo(
            f"{width:>8g} {table['mean'][i]:>24.4g} {table['train_error'][i]:>10.3f} "
            f"{table['test_error'][i]:>10.3f}"
        )
    click.echo(f"wrote {path}")


@cli.command()
@pass_settings
def quickstart(settings: Settings):
    """Train a small MLP and CNN on the bundled digits and analyse them, into --lake."""
    import time

    from curvlake.pipelines.quickstart import run_quickstart

    start = time.perf_counter()
    lake_ = settings.lake(create=True)
    with settings.cluster_session():
        result = run_quickstart(lake_, echo=click.echo)
    click.echo(f"\nquickstart done in {time.perf_counter() - start:.0f} s; lake {lake_.url}:")
    for run_id in result.runs.values():
        _print_run(lake_, run_id)
    for role, artifact in result.artifacts.items():
        click.echo(f"{artifact}  {role}")
    for role, figure in result.figures.items():
        click.echo(f"figure ({role}): {figure}")
    some_run = next(iter(result.runs.values()))
    url = lake_.url
    click.echo(
        f"\nlist everything:   curvlake --lake {url} lake ls\n"
        f'open with xarray:  python -c "import xarray as xr; '
        f"print(xr.open_zarr('{url}/run/{some_run}'))\"\n"
        f'or:                python -c "import curvlake; '
        f"print(curvlake.open_lake('{url}').open('{some_run}'))\""
    )


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="curvlake")


if __name__ == "__main__":
    sys.exit(main())
