"""What every command group shares: the error-to-one-line group, global settings, and the
options used by several commands (defined once here, so they read and behave the same)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from curvlake.constants import DTYPES, SPLITS
from curvlake.engine import client_session, slurm_cluster_kwargs
from curvlake.errors import CurvlakeError
from curvlake.lake import Lake, open_lake

DEFAULT_LAKE = "curvlake-lake"


class CurvlakeGroup(click.Group):
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
    #: ``--cluster slurm`` job settings (:func:`curvlake.engine.slurm_cluster_kwargs`).
    slurm: dict[str, Any] = field(default_factory=dict)
    slurm_job_timeout: float | None = None

    def lake(self, create: bool = False) -> Lake:
        return open_lake(self.lake_url, create=create)

    def cluster_session(self):
        """The Dask cluster of a pipeline, started when the pipeline first submits work."""
        slurm: dict[str, Any] = {}
        if self.cluster == "slurm" and not (self.scheduler or self.scheduler_file):
            slurm_cluster_kwargs(**self.slurm)  # missing job settings: refused before any work
            slurm = dict(self.slurm)
            if self.slurm_job_timeout is not None:
                slurm["job_timeout"] = self.slurm_job_timeout
        return client_session(
            lazy=True,
            address=self.scheduler,
            scheduler_file=self.scheduler_file,
            cluster=self.cluster,
            n_workers=self.workers,
            **slurm,
        )


pass_settings = click.make_pass_decorator(Settings)

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


# -- options used by several commands ----------------------------------------------------------


def run_option(required: bool = True) -> Decorator:
    return click.option("--run", "run_id", required=required, help="Run id (curvlake lake ls).")


def checkpoint_option(default: int = -1) -> Decorator:
    return click.option(
        "--checkpoint",
        type=int,
        default=default,
        show_default=True,
        help="Checkpoint index of the run (negative counts from the end: -1 is the last).",
    )


def checkpoints_option() -> Decorator:
    return click.option(
        "--checkpoints",
        default="all",
        show_default=True,
        help="'all' or comma-separated checkpoint indices (negative from the end).",
    )


def split_option(default: str = "train") -> Decorator:
    return click.option(
        "--split",
        "--data",
        "split",
        type=click.Choice(SPLITS),
        default=default,
        show_default=True,
        help="Split of the run's dataset (train labels as trained, i.e. noisy if noise > 0).",
    )


def n_examples_option() -> Decorator:
    return click.option(
        "--n-examples",
        type=click.IntRange(min=1),
        help="Use the first N examples of the split (default: all).",
    )


def seed_option(default: int = 0, what: str = "random draws") -> Decorator:
    return click.option(
        "--seed",
        type=click.IntRange(min=0),
        default=default,
        show_default=True,
        help=f"Seed of the {what}.",
    )


def dtype_option(default: str = "float32") -> Decorator:
    return click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default=default,
        show_default=True,
        help="Floating dtype of the computation (float64 for exact checks).",
    )


def block_size_option(
    default: int, what: str = "Examples per task and per stored chunk."
) -> Decorator:
    return click.option(
        "--block-size", type=click.IntRange(min=1), default=default, show_default=True, help=what
    )


def out_option(help_text: str) -> Decorator:
    return click.option("--out", type=click.Path(dir_okay=False), help=help_text)


# -- parsing helpers -----------------------------------------------------------------------------


def parse_assignments(items: tuple[str, ...], what: str) -> dict:
    """``KEY=VALUE`` pairs, values parsed as YAML scalars/lists (``k=8``, ``widths=[64,32]``)."""
    from curvlake._yaml import load_yaml

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        try:
            parsed[key.strip()] = load_yaml(value)
        except CurvlakeError as error:
            raise click.BadParameter(f"{item!r}: {error}", param_hint=what) from None
    return parsed


def int_list(text: str | None, what: str) -> list[int] | None:
    """A comma-separated list of integers (None stays None)."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of integers", param_hint=what
        ) from None


def checkpoint_list(text: str) -> str | list[int]:
    """``all`` or a comma-separated list of checkpoint indices."""
    if text == "all":
        return text
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: use 'all' or indices like 0,-1", param_hint="--checkpoints"
        ) from None


def load_options(path: str, what: str = "--config") -> dict:
    """A YAML/JSON file holding a mapping of options."""
    from curvlake._yaml import load_yaml

    try:
        options = load_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise click.BadParameter(f"no such file: {path}", param_hint=what) from None
    except IsADirectoryError:
        raise click.BadParameter(f"{path} is a directory, not a file", param_hint=what) from None
    except CurvlakeError as error:
        raise click.BadParameter(f"{path}: {error}", param_hint=what) from None
    if not isinstance(options, dict):
        raise click.BadParameter(f"{path} must hold a mapping of options", param_hint=what)
    return options
