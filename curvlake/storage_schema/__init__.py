"""Declarative schemas of every artifact kind, their validator and the docs generated from them.

Each kind has one module here defining ``SPEC``; ``SPECS`` maps kind -> spec. Adding a kind means
adding a module and listing it in ``_KIND_MODULES``.
"""

from importlib import import_module

from curvlake.errors import SchemaError
from curvlake.storage_schema._spec import (
    DEFAULT_CHUNK_BYTES,
    ArrayInfo,
    ArraySpec,
    ArtifactSpec,
    AttrSpec,
    one_row_per_chunk,
    rows_within_budget,
    validate_arrays,
    whole_array,
)

_KIND_MODULES = (
    "dataset",
    "run",
    "pefs",
    "dsf",
    "npeff",
    "npeff_perturbation",
    "jacobian_stats",
    "mask",
    "comparison_masks",
    "comparison_drift",
    "comparison_examples",
    "comparison_layers",
    "grad_window",
    "pruning",
    "hessian_sketch",
    "hessian_eigs",
    "hessian_overlap",
    "saturation",
    "saturation_projection",
    "latents",
    "probes",
    "receptive_field",
)

SPECS: dict[str, ArtifactSpec] = {
    spec.kind: spec
    for spec in (import_module(f"curvlake.storage_schema.{m}").SPEC for m in _KIND_MODULES)
}


def get_spec(kind: str) -> ArtifactSpec:
    """The spec of ``kind``; a clear error naming the known kinds otherwise."""
    try:
        return SPECS[kind]
    except KeyError:
        raise SchemaError(
            f"unknown artifact kind {kind!r}; known kinds: {', '.join(sorted(SPECS))}"
        ) from None


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "SPECS",
    "ArrayInfo",
    "ArraySpec",
    "ArtifactSpec",
    "AttrSpec",
    "get_spec",
    "one_row_per_chunk",
    "rows_within_budget",
    "validate_arrays",
    "whole_array",
]
