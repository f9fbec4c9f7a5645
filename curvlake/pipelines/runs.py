"""Models trained elsewhere into the lake (``runs import``) and back out (``runs export``).

An imported run is a one-checkpoint ``run`` artifact that every pipeline accepts like a run
trained in the lake, once it carries its data: a lake dataset (``dataset-<id>``, from
``curvlake data import``) or a built-in dataset read from local files. Its weights keep their
dtype (a float64 model stores float64 ``theta``). Inputs are not standardized unless asked
(``standardize="train"``): a model trained elsewhere expects the inputs as they were given.

Three ways to name the architecture:

- a zoo model (``model="mlp"``, ``model_params``) and a ``state_dict``;
- a TorchScript file or a pickled ``nn.Module`` (``path`` alone), stored in the run;
- a plain module's ``state_dict`` (``path``) with the module given as TorchScript or a pickled
  module (``module=...``): the module's weights are replaced by the state_dict's.

A state_dict whose keys differ from the model's (e.g. a plain ``nn.Sequential``: ``0.weight``
instead of the zoo's ``fc1.weight``) loads with ``key_map="order"`` (tensors matched in order,
every shape checked) or an explicit ``{old_key: new_key}`` mapping.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlake.constants import STANDARDIZE_MODES
from curvlake.errors import UserInputError
from curvlake.lake import Lake
from curvlake.lake.checkpoints import load_model
from curvlake.nn.params import flatten_buffers, flatten_parameters, parameter_table
from curvlake.pipelines.data import is_dataset_id
from curvlake.pipelines.train import DATA_HASH, METRICS, model_tables, run_data
from curvlake.validation import Interval, Options, check

MODULE_FORMATS = ("torchscript", "pickle")


def _read(path: Path, what: str) -> tuple[bytes, str]:
    if not path.is_file():
        raise UserInputError(f"{what} {path} does not exist (or is not a file)")
    blob = path.read_bytes()
    return blob, hashlib.sha256(blob).hexdigest()


def _load_module(blob: bytes, path: Path) -> tuple[torch.nn.Module, str]:
    """A TorchScript or pickled module from file bytes, and which of the two it was."""
    try:
        return torch.jit.load(io.BytesIO(blob), map_location="cpu"), "torchscript"
    except RuntimeError:
        pass
    try:
        module = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, ImportError) as error:
        raise UserInputError(
            f"{path} is neither TorchScript nor a pickled nn.Module ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'})"
        ) from None
    if not isinstance(module, torch.nn.Module):
        raise UserInputError(
            f"{path} holds a {type(module).__name__}, not an nn.Module; for a state_dict give "
            "--model (a zoo model) or --module (the module it belongs to)"
        )
    return module, "pickle"


def _load_state_dict(blob: bytes, path: Path) -> Mapping[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        raise UserInputError(
            f"{path} is not a torch state_dict file ({str(error).splitlines()[0][:120]})"
        ) from None
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]  # a training checkpoint {"state_dict": ..., "epoch": ...}
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise UserInputError(f"{path} does not hold a state_dict (a mapping of name -> tensor)")
    return state


def map_keys(
    state: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    key_map: str | Mapping[str, str] | None,
) -> dict[str, torch.Tensor]:
    """Rename a state_dict's keys to ``model``'s.

    Args:
        key_map: ``None`` (names as they are), ``"order"`` (the i-th tensor of ``state`` is the
            i-th of ``model.state_dict()``; counts and every shape must agree), or a mapping
            ``{key in state: key in model}`` (keys it does not name keep their name).
    """
    if key_map is None:
        return dict(state)
    target = model.state_dict()
    if key_map == "order":
        if len(state) != len(target):
            raise UserInputError(
                f"--key-map order needs as many tensors as the model has: the file has "
                f"{len(state)}, the model {len(target)}"
            )
        renamed = {}
        for (old, tensor), (new, expected) in zip(state.items(), target.items(), strict=True):
            if tuple(tensor.shape) != tuple(expected.shape):
                raise UserInputError(
                    f"--key-map order: tensor {old!r} {tuple(tensor.shape)} does not fit the "
                    f"model's {new!r} {tuple(expected.shape)}"
                )
            renamed[new] = tensor
        return renamed
    if not isinstance(key_map, Mapping):
        raise UserInputError(f"key_map must be None, 'order' or a mapping, got {key_map!r}")
    unknown = [k for k in key_map if k not in state]
    if unknown:
        raise UserInputError(f"key_map names keys the state_dict does not have: {unknown}")
    return {key_map.get(k, k): v for k, v in state.items()}


def _load_into(net: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str):
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        same_shapes = len(state) == len(net.state_dict()) and all(
            tuple(a.shape) == tuple(b.shape)
            for a, b in zip(state.values(), net.state_dict().values(), strict=True)
        )
        hint = " (the shapes agree in order: try --key-map order)" if same_shapes else ""
        raise UserInputError(f"{path} does not fit {what}: {detail}{hint}") from None


def _data_options(
    lake: Lake,
    dataset: str | None,
    data_dir: str | None,
    split_seed: int,
    val_size: int | None,
    standardize: str,
) -> dict[str, Any]:
    if dataset is None:
        return {"dataset": None}
    options = {
        "dataset": dataset,
        "data_dir": data_dir,
        "split_seed": split_seed,
        "val_size": val_size,
        "standardize": standardize,
        "label_noise": 0.0,
        "label_seed": 0,
    }
    if dataset.endswith(".npz"):
        from curvlake.pipelines.data import file_sha256

        if not Path(dataset).is_file():
            raise UserInputError(f"dataset file {dataset} does not exist")
        options["dataset"] = str(Path(dataset).resolve())
        options[DATA_HASH] = file_sha256(Path(dataset))
    elif is_dataset_id(dataset):
        lake.info(dataset)  # a clear error for an id that is not in the lake
    return options


def import_run(
    lake: Lake,
    path: str | Path,
    *,
    model: str | None = None,
    model_params: Mapping[str, Any] | None = None,
    module: str | Path | None = None,
    key_map: str | Mapping[str, str] | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    split_seed: int = 0,
    val_size: int | None = None,
    standardize: str = "none",
) -> str:
    """Store a model trained elsewhere as a one-checkpoint ``run`` artifact; return its id.

    Args:
        path: a ``state_dict`` saved with ``torch.save`` (with ``model`` or ``module``), or a
            TorchScript file / pickled ``nn.Module`` (neither given).
        model, model_params: a zoo model (``curvlake.nn.models``) the state_dict belongs to.
        module: a TorchScript file or pickled module the state_dict belongs to.
        key_map: renaming of the state_dict's keys, see :func:`map_keys`.
        num_classes, input_shape: the classifier's outputs and one input's shape (``(D,)`` for
            tabular data); default: the dataset's.
        dataset: the data the run is analysed on: ``dataset-<id>`` (``curvlake data import``),
            a built-in name (``digits``, ``mnist``, ...; files under ``data_dir``) or an
            ``.npz`` file (identified by its content hash). ``None``: weights only (pipelines
            then refuse the run and say how to attach data).
        split_seed, val_size: how the dataset is split (as ``curvlake train``).
        standardize: ``none`` (default: inputs as given), ``train`` or ``published``.

    Raises:
        UserInputError: a missing or unreadable file, weights that do not fit the model, or a
            model that does not map the dataset's inputs to ``num_classes`` logits. Nothing is
            stored then.
    """
    path = Path(path)
    check("standardize", standardize, Options(*STANDARDIZE_MODES))
    check("split_seed", split_seed, Interval(int, 0, None))
    if model is not None and module is not None:
        raise UserInputError("give either --model (a zoo model) or --module, not both")
    if key_map is not None and model is None and module is None:
        raise UserInputError("--key-map applies to a state_dict, which needs --model or --module")
    if model_params and model is None:
        raise UserInputError("--param applies to a zoo model: give --model too")
    blob, digest = _read(path, "weights file")
    data = _data_options(lake, dataset, data_dir, split_seed, val_size, standardize)
    splits = run_data(lake, data) if dataset is not None else None
    if splits is not None:
        num_classes = splits.num_classes if num_classes is None else num_classes
        input_shape = splits.input_shape if input_shape is None else tuple(input_shape)
        if tuple(input_shape) != tuple(splits.input_shape):
            raise UserInputError(
                f"input_shape {list(input_shape)} differs from the dataset's "
                f"{list(splits.input_shape)}"
            )
        if num_classes < splits.num_classes:
            raise UserInputError(
                f"num_classes={num_classes} but the dataset has {splits.num_classes} classes"
            )
    if num_classes is None or input_shape is None:
        raise UserInputError("give --num-classes and --input-shape (or --dataset to take them)")
    check("num_classes", num_classes, Interval(int, 1, None))
    module_blob, module_format, sources = None, None, {"weights_sha256": digest}
    if model is not None:
        from curvlake.nn.models import build_model

        net = build_model(
            model,
            num_classes=num_classes,
            input_shape=tuple(input_shape),
            **dict(model_params or {}),
        )
        state = map_keys(_load_state_dict(blob, path), net, key_map)
        if any(v.dtype == torch.float64 for v in state.values()):
            net = net.double()  # keep a float64 model's precision
        _load_into(net, state, path, f"model {model!r}")
    elif module is not None:
        module_path = Path(module)
        module_blob, sources["module_sha256"] = _read(module_path, "module file")
        net, module_format = _load_module(module_blob, module_path)
        state = map_keys(_load_state_dict(blob, path), net, key_map)
        _load_into(net, state, path, f"the module of {module_path.name}")
    else:
        net, module_format = _load_module(blob, path)
        module_blob = blob
    net = net.eval()
    _check_forward(net, splits, input_shape, num_classes, path)
    config = {
        "imported_from": path.name,
        **sources,
        "model": model or "custom",
        "model_params": dict(model_params or {}),
        "key_map": key_map,
        "num_classes": int(num_classes),
        "input_shape": [int(s) for s in input_shape],
        **data,
    }
    inputs = [dataset] if dataset is not None and is_dataset_id(dataset) else []
    files = {"weights": f"{path} sha256:{digest}"}
    if module is not None:
        files["module"] = f"{module} sha256:{sources['module_sha256']}"
    writer = lake.begin("run", config, inputs, sources=files)
    if writer.complete:
        return writer.id
    with writer:
        _write_run(writer, net, module_blob, module_format, model, model_params, config)
    return writer.commit()


def _check_forward(net, splits, input_shape, num_classes: int, path: Path) -> None:
    """The model must map inputs of ``input_shape`` to ``(n, num_classes)`` logits."""
    dtype = next(net.parameters(), torch.empty(0)).dtype
    if splits is not None:
        x = torch.as_tensor(splits.train.x[:2] if len(splits.train) else splits.test.x[:2])
    else:
        x = torch.zeros((2, *input_shape))
    try:
        with torch.no_grad():
            out = net(x.to(dtype))
    except Exception as error:  # any failure of user code is a bad input here
        raise UserInputError(
            f"the model of {path.name} fails on inputs of shape {list(input_shape)}: "
            f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserInputError(
            f"the model of {path.name} maps {len(x)} inputs to {shape}, not ({len(x)}, "
            f"{num_classes}) logits: check --num-classes and --input-shape"
        )


def _write_run(writer, net, module_blob, module_format, model, model_params, config) -> None:
    n_params = parameter_table(net).total
    writer.write("theta", flatten_parameters(net)[None])
    writer.create_array("opt_state", (1, 0, n_params))
    buffers = flatten_buffers(net)
    arrays: dict[str, Any] = {
        "opt_slot": np.array([], dtype=object),
        "opt_step": np.zeros(1, np.int64),
        "checkpoint_epoch": np.zeros(1, np.int64),
        "epoch": np.zeros(1, np.int64),
        **{name: np.full(1, np.nan) for name in METRICS},
        **model_tables(net),
    }
    if buffers.size:
        arrays["buffers"] = buffers[None]
    if module_blob is not None:
        arrays["module"] = np.frombuffer(module_blob, dtype=np.uint8)
    writer.write_many(arrays)
    writer.set_attrs(
        model=model or "custom",
        model_params=dict(model_params or {}),
        dataset=config["dataset"] or "none",
        num_classes=config["num_classes"],
        input_shape=config["input_shape"],
        optimizer="none",
        **({"module_format": module_format} if module_format else {}),
    )


def export_state_dict(lake: Lake, run_id: str, path: str | Path, checkpoint: int = -1) -> Path:
    """Write the ``state_dict`` of a run's checkpoint to ``path`` with ``torch.save``.

    The output folder must exist; it is checked before the model is read.
    """
    from curvlake.pipelines.skeleton import output_path, resolve_run

    path = output_path(path)
    run = resolve_run(lake, run_id, needs_data=False)
    model = load_model(lake, run_id, run.checkpoint_index(checkpoint))
    torch.save(model.state_dict(), path)
    return path


__all__ = ["MODULE_FORMATS", "export_state_dict", "import_run", "map_keys"]
