"""Parameter grids: one spec expands into the Cartesian product of its list values.

Rules (``expand_grid``):

- A scalar value is one choice; a list value is a list of choices. Keys vary in the spec's
  order, the first key slowest (``itertools.product`` order), so expansion is deterministic.
- A mapping value (e.g. ``model_params``) is expanded the same way inside, and its expansions
  enter the outer product as one key. A list of mappings is a list of choices, each expanded.
- List-valued keys (whose single value is itself a list, e.g. ``save_epochs`` or the mlp's
  ``widths``): a flat list is ONE value; a list whose elements are all lists is a list of
  choices. So ``widths: [64, 64]`` is one MLP and ``widths: [[64], [64, 64]]`` two.
- A spec may also be a list of specs: the expansions are concatenated (like scikit-learn's
  ``ParameterGrid``), e.g. to pair each model with its own parameters.
- Unknown keys are rejected with the allowed ones listed.

``load_grid(path)`` reads a spec from YAML (``.yaml``/``.yml``) or JSON (``.json``);
``expand_train_grid(spec)`` expands and validates training configs.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from curvlake.errors import UserInputError
from curvlake.nn.models import MODEL_NAMES, model_params
from curvlake.nn.training import TrainConfig

GridSpec = Mapping[str, Any] | list[Mapping[str, Any]]

#: training options whose one value is a list
TRAIN_LIST_KEYS = ("save_epochs",)
#: model parameters whose one value is a list (any model whose default is a list)
MODEL_LIST_PARAMS = tuple(
    sorted(
        {
            key
            for name in MODEL_NAMES
            for key, default in model_params(name).items()
            if isinstance(default, (list, tuple))
        }
    )
)


def expand_grid(
    spec: GridSpec,
    allowed_keys: Iterable[str],
    *,
    list_valued_keys: Iterable[str] = (),
    nested_list_valued_keys: Mapping[str, Iterable[str]] | None = None,
) -> list[dict[str, Any]]:
    """Expand a grid spec into the list of its points (plain dicts).

    Args:
        spec: a mapping of key -> value or list of values, or a list of such mappings.
        allowed_keys: the valid top-level keys.
        list_valued_keys: top-level keys whose single value is a list (see module rules).
        nested_list_valued_keys: for a mapping-valued key (e.g. ``"model_params"``), the inner
            keys whose single value is a list.

    Raises:
        UserInputError: an unknown key, an empty list of choices, or a malformed spec.
    """
    allowed = tuple(allowed_keys)
    list_keys = frozenset(list_valued_keys)
    nested = {k: frozenset(v) for k, v in (nested_list_valued_keys or {}).items()}
    if isinstance(spec, list):
        if not spec:
            raise UserInputError("a grid given as a list needs at least one spec")
        return [
            point
            for sub in spec
            for point in expand_grid(
                sub, allowed, list_valued_keys=list_keys, nested_list_valued_keys=nested
            )
        ]
    if not isinstance(spec, Mapping):
        raise UserInputError(
            f"a grid spec must be a mapping (or a list of mappings), got {type(spec).__name__}"
        )
    unknown = [k for k in spec if k not in allowed]
    if unknown:
        raise UserInputError(
            f"unknown grid key(s) {', '.join(map(repr, unknown))}; allowed keys: "
            + ", ".join(allowed)
        )
    axes = []
    for key, value in spec.items():
        axes.append(_choices(key, value, key in list_keys, nested.get(key, frozenset())))
    return [dict(zip(spec.keys(), combo, strict=True)) for combo in itertools.product(*axes)]


def _choices(key: str, value: Any, list_valued: bool, inner_list_keys: frozenset) -> list[Any]:
    if isinstance(value, Mapping):
        return _expand_mapping(key, value, inner_list_keys)
    if isinstance(value, (list, tuple)):
        value = list(value)
        if list_valued and not (value and all(isinstance(v, (list, tuple)) for v in value)):
            return [value]
        if not value:
            raise UserInputError(f"grid key {key!r} has an empty list of choices")
        out: list[Any] = []
        for v in value:
            if isinstance(v, Mapping):
                out.extend(_expand_mapping(key, v, inner_list_keys))
            else:
                out.append(list(v) if isinstance(v, tuple) else v)
        return out
    return [value]


def _expand_mapping(key: str, value: Mapping[str, Any], inner_list_keys: frozenset) -> list:
    axes = [_choices(f"{key}.{k}", v, k in inner_list_keys, frozenset()) for k, v in value.items()]
    return [dict(zip(value.keys(), combo, strict=True)) for combo in itertools.product(*axes)]


def load_grid(path: str | os.PathLike) -> GridSpec:
    """Read a grid spec from a ``.yaml`` / ``.yml`` or ``.json`` file.

    Raises:
        UserInputError: a missing file, another extension, a parse error, or a top level that
            is not a mapping or list of mappings.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no such grid file: {path}")
    suffix = path.suffix.lower()
    text = path.read_text()
    try:
        if suffix in (".yaml", ".yml"):
            from curvlake._yaml import load_yaml

            spec = load_yaml(text)
        elif suffix == ".json":
            spec = json.loads(text)
        else:
            raise UserInputError(f"grid file {path} must end in .yaml, .yml or .json")
    except UserInputError:
        raise
    except Exception as exc:  # YAML/JSON parse errors come in many types
        raise UserInputError(f"cannot parse grid file {path}: {exc}") from exc
    ok = isinstance(spec, Mapping) or (
        isinstance(spec, list) and spec and all(isinstance(s, Mapping) for s in spec)
    )
    if not ok:
        raise UserInputError(
            f"grid file {path} must hold a mapping of options (or a list of mappings), got "
            f"{type(spec).__name__}"
        )
    return spec


def expand_train_grid(spec: GridSpec) -> list[TrainConfig]:
    """Expand a training grid into validated ``TrainConfig`` objects.

    Keys are ``TrainConfig`` options; ``save_epochs`` and list-valued model parameters
    (``MODEL_LIST_PARAMS``, e.g. ``widths``) follow the list-of-lists rule.

    Raises:
        UserInputError: an unknown option, or a point that is not a valid config (the message
            names the point's index).
    """
    points = expand_grid(
        spec,
        TrainConfig.keys(),
        list_valued_keys=TRAIN_LIST_KEYS,
        nested_list_valued_keys={"model_params": MODEL_LIST_PARAMS},
    )
    configs = []
    for i, point in enumerate(points):
        try:
            configs.append(TrainConfig.from_dict(point))
        except UserInputError as exc:
            raise UserInputError(f"grid point {i} ({point}): {exc}") from exc
    return configs
