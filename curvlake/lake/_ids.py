"""Stable artifact ids: a hash of kind, config and input ids."""

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

from curvlake.errors import UserInputError


def canonical_config(value: Any) -> Any:
    """A JSON-ready copy of ``value`` with a canonical form (tuples -> lists, numpy -> python).

    Raises:
        UserInputError: a value that has no JSON form (e.g. a torch module).
    """
    if isinstance(value, Mapping):
        return {
            str(k): canonical_config(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        }
    if isinstance(value, (list, tuple)):
        return [canonical_config(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserInputError(f"config value {value!r} of type {type(value).__name__} is not JSON-able")


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of ``config``."""
    text = json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def artifact_id(kind: str, config: Mapping[str, Any], inputs: Sequence[str] = ()) -> str:
    """``<kind>-<16 hex>`` from kind, config and the ids of the input artifacts.

    The inputs keep their order: they play different roles (e.g. run, then dataset).
    """
    digest = config_hash({"kind": kind, "config": canonical_config(config), "inputs": list(inputs)})
    return f"{kind}-{digest[:16]}"


#: ``<kind>-<16 hex digits>``, as :func:`artifact_id` makes them: no path separators, dots or
#: other characters, so an id can never name a path outside its kind's folder.
_ID = re.compile(r"[a-z][a-z0-9_]*-[0-9a-f]{16}")


def kind_of(artifact_id_: str) -> str:
    """The kind encoded in an artifact id.

    Raises:
        UserInputError: not of the form ``<kind>-<16 hex digits>`` (e.g. a path).
    """
    if not isinstance(artifact_id_, str) or not _ID.fullmatch(artifact_id_):
        raise UserInputError(
            f"{artifact_id_!r} is not an artifact id (expected <kind>-<16 hex digits>, "
            "see `curvlake lake ls`)"
        )
    return artifact_id_.rpartition("-")[0]
