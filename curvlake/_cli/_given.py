"""Which options of the running command the user gave, for refusing those that do not apply.

An option with a default (``--seed 0``, ``--solver hals``) reaches the pipeline with a value
whether or not it was typed, so only the command line knows that ``--seed 3`` was given with
``--mode expectation``, where it means nothing.
"""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource


def given(*names: str) -> dict[str, Any]:
    """``{"--option-name": value}`` of the named parameters of the running command: the value
    when the user gave it, None when it is the default (to pass to
    :func:`curvlake.validation.refuse_unused`)."""
    ctx = click.get_current_context()
    defaults = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
    return {
        "--" + name.replace("_", "-"): None
        if ctx.get_parameter_source(name) in defaults
        else ctx.params[name]
        for name in names
    }
