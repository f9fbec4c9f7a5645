"""``mask``: a parameter mask, a set of coordinates of a run's flat parameter vector θ."""

import numpy as np

from curvlake.storage_schema._spec import ArraySpec, ArtifactSpec, AttrSpec, whole_array


def _example():
    arrays = {
        "index": np.array([1, 2, 5, 8], dtype=np.int64),
        "layer": np.array(["fc.weight", "fc.bias"], dtype=object),
        "layer_offset": np.array([0, 8], dtype=np.int64),
        "layer_size": np.array([8, 2], dtype=np.int64),
        "layer_shape": np.array(["2,4", "2"], dtype=object),
        "layer_count": np.array([3, 1], dtype=np.int64),
    }
    attrs = {
        "n_params": 10,
        "source": "magnitude",
        "scope": "global",
        "run": "run-0123456789abcdef",
        "checkpoint": 1,
        "parameter_fingerprint": "0123456789abcdef",
    }
    return arrays, attrs


def _table_array(name: str, dtype: str, what: str) -> ArraySpec:
    return ArraySpec(name, ("layer",), dtype, what, role="coord", chunking=whole_array)


SPEC = ArtifactSpec(
    kind="mask",
    version="1.0",
    description=(
        "A set of coordinates of the flat parameter vector θ of a run (`theta` of the `run` "
        "kind): `index` holds them sorted ascending and unique, and the layer table says which "
        "tensor entry each one is (`index - layer_offset[l]` is the row-major position inside "
        "tensor `l`). `layer_count[l]` is the number of coordinates in tensor `l`. What the set "
        "means is up to its `source`: `magnitude` (largest |θ_j|, see "
        "`curvlake.nn.masks.ParameterMask.magnitude`), `file` (imported), or the name of the "
        "pipeline that wrote it. Read it with `curvlake.pipelines.masks.load_mask`."
    ),
    arrays=(
        ArraySpec("index", ("coordinate",), "int64", "flat coordinates in the set, sorted"),
        _table_array("layer", "str", "parameter tensor names"),
        _table_array("layer_offset", "int64", "offset of the tensor in θ"),
        _table_array("layer_size", "int64", "number of entries of the tensor"),
        _table_array("layer_shape", "str", "tensor shape, comma separated"),
        ArraySpec(
            "layer_count",
            ("layer",),
            "int64",
            "coordinates of the set in each tensor",
            chunking=whole_array,
        ),
    ),
    attrs=(
        AttrSpec("n_params", "P, the length of θ"),
        AttrSpec("source", "`magnitude`, `file`, or the name of the producing pipeline"),
        AttrSpec("scope", "`global` or `layer` for magnitude masks, else null"),
        AttrSpec("run", "the run whose parameter space the mask indexes"),
        AttrSpec("checkpoint", "checkpoint index the mask was computed from (null: none)"),
        AttrSpec("parameter_fingerprint", "fingerprint of the layer table (names and shapes)"),
        AttrSpec("file", "path of the imported file (`source=file`)", required=False),
    ),
    example=_example,
    summary_keys=("source", "checkpoint", "size", "fraction", "scope", "layers", "file_sha256"),
)
