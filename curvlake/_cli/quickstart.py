"""``curvlake quickstart``: the end-to-end tour on the bundled digits."""

from __future__ import annotations

import click

from curvlake._cli.common import Settings, pass_settings
from curvlake._cli.train import print_run


@click.command()
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
        print_run(lake_, run_id)
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
