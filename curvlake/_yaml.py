"""YAML as users write it: ``1e-3`` is a number (PyYAML's YAML 1.1 reads it as a string)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from curvlake.errors import UserInputError


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2's float pattern: the exponent form needs no dot (``1e-3``, ``5E4``).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats.

    Raises:
        UserInputError: the text is not valid YAML (the message gives line and column).
    """
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserInputError(f"not valid YAML{where}: {problem}") from None
