"""Training primitives: one config object, the learning-rate schedule, and resumable epochs.

Epoch numbering: a run of ``epochs`` epochs has checkpoints ``0..epochs``, checkpoint ``k``
being the model after ``k`` epochs (0 = initialisation). ``train_one_epoch(..., epoch=k)`` runs
the epoch that starts at checkpoint ``k`` and ends at checkpoint ``k + 1``, and
``learning_rate(config, k)`` is the learning rate it uses.

Reproducibility: everything random in epoch ``k`` (shuffle order, augmentation, dropout) is drawn
from generators seeded by ``(config.seed, stream, k)`` via ``numpy.random.SeedSequence``, and the
learning rate is a pure function of ``k``. So restoring a checkpoint's model and optimizer state
and continuing at epoch ``k`` gives bit-identical weights to an uninterrupted run (on CPU; on
GPU only with deterministic kernels). Dropout uses torch's global RNG inside
``torch.random.fork_rng``, so the caller's RNG state is left untouched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curvlake.constants import OPTIMIZERS
from curvlake.errors import UserInputError
from curvlake.nn.datasets import (
    DATASET_NAMES,
    STANDARDIZE_MODES,
    Split,
    Splits,
    augment_batch,
    load_npz,
    load_splits,
)
from curvlake.nn.hooks import Recorder, attach
from curvlake.nn.label_noise import apply_label_noise
from curvlake.nn.models import MODEL_NAMES, build_model, resolve_model_params

LR_SCHEDULES = ("constant", "step")

# independent random streams of one run
_STREAM_INIT, _STREAM_DATA, _STREAM_DROPOUT = 0, 1, 2

_DATASET_ID = re.compile(r"^dataset-[0-9a-f]{16}$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run.

    Attributes:
        model: a name from ``MODEL_NAMES``.
        model_params: keyword parameters of the model (see ``models.model_params``).
        dataset: a name from ``DATASET_NAMES``, a path to an ``.npz`` dataset, or a lake
            ``dataset-<16 hex>`` artifact id (resolved by the lake, not here).
        data_dir: folder with the dataset files (built-in file datasets only).
        split_seed: seed of the train / val split.
        val_size: validation examples (None: the dataset's default).
        standardize: ``"train"``, ``"published"`` or ``"none"`` (``True``/``False`` accepted).
        label_noise: share of train labels changed to another class, in [0, 1].
        label_seed: seed of the label noise.
        augment: random crop (zero padding ``augment_padding``) + horizontal flip.
        augment_padding: crop padding in pixels.
        optimizer: ``"sgd"``, ``"adam"`` or ``"mfac"``.
        lr: learning rate after warmup (before step decay).
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: L2 weight decay (coupled, as torch's SGD/Adam; M-FAC: see ``mfac``).
        mfac: options of the M-FAC optimizer (``optimizer="mfac"`` only; defaults filled in,
            ``MFAC_DEFAULTS``): ``n_grads`` (window size m), ``damp`` (λ), ``momentum`` (an
            average of preconditioned steps; SGD's ``momentum`` does not apply),
            ``decoupled_weight_decay`` and ``refresh_every`` (see
            :class:`curvlake.pipelines.mfac.MFAC`). Set one from the command line with
            ``--set mfac.n_grads=64``.
        warmup_epochs: W; linear warmup over epochs 0..W-1 (see ``learning_rate``).
        warmup_start_lr: learning rate of epoch 0 when warming up.
        lr_schedule: ``"constant"`` or ``"step"`` (multiply by ``lr_gamma`` every ``lr_step``
            epochs, counted from epoch 0).
        lr_step: step decay period in epochs.
        lr_gamma: step decay factor.
        batch_size: training batch size (the last batch of an epoch may be smaller).
        eval_batch_size: batch size of ``evaluate``.
        epochs: number of training epochs.
        seed: seed of the initialisation, shuffling, augmentation and dropout.
        device: ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        save_every: also checkpoint every this many epochs (0: only init and final).
        save_epochs: extra explicit checkpoint epochs.
        track: what to record during training: ``("saturation",)`` tracks the saturation of
            the feature layers (:mod:`curvlake.pipelines.saturation.tracking`); empty: nothing.
            The ``saturation_*``, ``conv_method`` and ``track_layers`` options apply only with
            it, and are left out of ``to_dict`` (so of the run id) without it.
        saturation_delta: explained-variance threshold delta of the intrinsic dimension, > 0.
        saturation_rule: ``"textbook"`` (min k with p_k >= delta) or ``"delve"`` (delve
            0.1.50's count, k - 1).
        saturation_ddof: the covariance divides the centred scatter by ``n - ddof``.
        conv_method: how conv outputs become observations (``channelwise``, ``mean``,
            ``max``, ``flatten``).
        track_layers: regular expression selecting the tracked feature layers (None: all).
    """

    model: str = "mlp"
    model_params: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    split_seed: int = 0
    val_size: int | None = None
    standardize: str = "train"
    label_noise: float = 0.0
    label_seed: int = 0
    augment: bool = False
    augment_padding: int = 4
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    mfac: dict[str, Any] = field(default_factory=dict)
    warmup_epochs: int = 0
    warmup_start_lr: float = 0.0
    lr_schedule: str = "constant"
    lr_step: int = 0
    lr_gamma: float = 0.1
    batch_size: int = 128
    eval_batch_size: int = 1024
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    save_every: int = 0
    save_epochs: tuple[int, ...] = ()
    track: tuple[str, ...] = ()
    saturation_delta: float = 0.99
    saturation_rule: str = "textbook"
    saturation_ddof: int = 0
    conv_method: str = "channelwise"
    track_layers: str | None = None

    def __post_init__(self) -> None:
        # canonical forms, so equal configs compare and hash (via to_dict) equal
        if self.standardize is True:
            object.__setattr__(self, "standardize", "train")
        elif self.standardize is False:
            object.__setattr__(self, "standardize", "none")
        if isinstance(self.save_epochs, list):
            object.__setattr__(self, "save_epochs", tuple(self.save_epochs))
        if isinstance(self.track, str):
            object.__setattr__(self, "track", (self.track,))
        elif isinstance(self.track, list):
            object.__setattr__(self, "track", tuple(self.track))
        if self.model_params is None:
            object.__setattr__(self, "model_params", {})
        elif isinstance(self.model_params, Mapping):
            object.__setattr__(self, "model_params", dict(self.model_params))
        if self.mfac is None:
            object.__setattr__(self, "mfac", {})
        elif isinstance(self.mfac, Mapping):
            options = dict(self.mfac)
            if self.optimizer == "mfac":
                options = {**MFAC_DEFAULTS, **options}
            object.__setattr__(self, "mfac", options)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> TrainConfig:
        """Build and validate a config; missing options take their defaults.

        Numeric strings are accepted for float options (YAML reads ``1e-3`` as a string).

        Raises:
            UserInputError: an unknown option (the message lists the valid ones) or a bad value.
        """
        if not isinstance(options, Mapping):
            raise UserInputError(
                f"a training config must be a mapping, got {type(options).__name__}"
            )
        valid = cls.keys()
        unknown = [k for k in _nest_dotted_keys(options) if k not in valid]
        if unknown:
            raise UserInputError(
                f"unknown training option(s) {', '.join(map(repr, unknown))}; valid options: "
                + ", ".join(valid)
            )
        values = _nest_dotted_keys(options)
        for key in (*_FLOAT_KEYS, "saturation_delta"):
            if isinstance(values.get(key), str):
                try:
                    values[key] = float(values[key])
                except ValueError:
                    raise UserInputError(
                        f"training option {key!r} = {values[key]!r} is not a number"
                    ) from None
        if isinstance(values.get("mfac"), Mapping):
            values["mfac"] = dict(values["mfac"])
            for key in _MFAC_FLOAT_KEYS:
                if isinstance(values["mfac"].get(key), str):
                    try:
                        values["mfac"][key] = float(values["mfac"][key])
                    except ValueError:
                        raise UserInputError(
                            f"training option 'mfac.{key}' = {values['mfac'][key]!r} is not a "
                            "number"
                        ) from None
        return cls(**values).validate()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists) that ``from_dict`` turns back into this config."""
        out = dataclasses.asdict(self)
        out["save_epochs"] = list(self.save_epochs)
        if self.track:
            out["track"] = list(self.track)
        else:  # untracked configs keep the ids they had before tracking existed
            for key in _TRACK_KEYS:
                del out[key]
        out["model_params"] = {
            k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self.model_params.items()
        }
        return out

    def resolved_model_params(self) -> dict[str, Any]:
        """``model_params`` with every default filled in."""
        return resolve_model_params(self.model, self.model_params)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> TrainConfig:
        """Check every option; return ``self``.

        Raises:
            UserInputError: listing every bad option with what is allowed.
        """
        problems: list[str] = []

        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                problems.append(f"{key}={getattr(self, key)!r} (allowed: {allowed})")

        need(self.model in MODEL_NAMES, "model", ", ".join(MODEL_NAMES))
        if self.model in MODEL_NAMES:
            if not isinstance(self.model_params, Mapping):
                problems.append(f"model_params={self.model_params!r} (allowed: a mapping)")
            else:
                try:
                    resolve_model_params(self.model, self.model_params)
                except UserInputError as exc:
                    problems.append(str(exc))
        need(
            isinstance(self.dataset, str)
            and (
                self.dataset in DATASET_NAMES
                or self.dataset.endswith(".npz")
                or bool(_DATASET_ID.match(self.dataset))
            ),
            "dataset",
            ", ".join(DATASET_NAMES) + ", a path to an .npz file, or a dataset-<16 hex> id",
        )
        need(self.data_dir is None or isinstance(self.data_dir, str), "data_dir", "a path or null")
        for key in ("split_seed", "label_seed", "seed"):
            need(_is_int(getattr(self, key), 0), key, "an int >= 0")
        need(self.val_size is None or _is_int(self.val_size, 0), "val_size", "null or an int >= 0")
        need(self.standardize in STANDARDIZE_MODES, "standardize", ", ".join(STANDARDIZE_MODES))
        need(_is_real(self.label_noise, 0.0, 1.0), "label_noise", "a number in [0, 1]")
        need(isinstance(self.augment, bool), "augment", "true or false")
        need(_is_int(self.augment_padding, 0), "augment_padding", "an int >= 0")
        need(self.optimizer in OPTIMIZERS, "optimizer", ", ".join(OPTIMIZERS))
        need(_is_real(self.lr, 0.0, math.inf) and self.lr > 0, "lr", "a number > 0")
        need(_is_real(self.momentum, 0.0, 1.0) and self.momentum < 1, "momentum", "in [0, 1)")
        need(isinstance(self.nesterov, bool), "nesterov", "true or false")
        if self.nesterov is True and (self.optimizer != "sgd" or not self.momentum):
            problems.append("nesterov=True needs optimizer='sgd' and momentum > 0")
        need(_is_real(self.weight_decay, 0.0, math.inf), "weight_decay", "a number >= 0")
        problems.extend(_mfac_problems(self.optimizer, self.mfac))
        need(_is_int(self.warmup_epochs, 0), "warmup_epochs", "an int >= 0")
        need(_is_real(self.warmup_start_lr, 0.0, math.inf), "warmup_start_lr", "a number >= 0")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", ", ".join(LR_SCHEDULES))
        need(_is_int(self.lr_step, 0), "lr_step", "an int >= 0")
        if self.lr_schedule == "step" and _is_int(self.lr_step, 0) and self.lr_step < 1:
            problems.append("lr_schedule='step' needs lr_step >= 1")
        need(
            _is_real(self.lr_gamma, 0.0, math.inf) and self.lr_gamma > 0, "lr_gamma", "a number > 0"
        )
        need(_is_int(self.batch_size, 1), "batch_size", "an int >= 1")
        need(_is_int(self.eval_batch_size, 1), "eval_batch_size", "an int >= 1")
        need(_is_int(self.epochs, 0), "epochs", "an int >= 0")
        need(
            isinstance(self.device, str) and bool(_DEVICE.match(self.device)),
            "device",
            "auto, cpu, cuda, cuda:N, mps",
        )
        need(_is_int(self.save_every, 0), "save_every", "an int >= 0")
        epochs_ok = _is_int(self.epochs, 0)
        need(
            isinstance(self.save_epochs, tuple)
            and all(
                _is_int(e, 0) and (not epochs_ok or e <= self.epochs) for e in self.save_epochs
            ),
            "save_epochs",
            f"a list of ints in 0..{self.epochs}",
        )
        problems.extend(_tracking_problems(self))
        if problems:
            raise UserInputError("invalid training config: " + "; ".join(problems))
        return self


_FLOAT_KEYS = ("label_noise", "lr", "momentum", "weight_decay", "warmup_start_lr", "lr_gamma")

#: Options that configure ``track`` (absent from ``to_dict`` when nothing is tracked).
_TRACK_KEYS = (
    "track",
    "saturation_delta",
    "saturation_rule",
    "saturation_ddof",
    "conv_method",
    "track_layers",
)


def _tracking_problems(config: TrainConfig) -> list[str]:
    """What is wrong with the tracking options (empty: nothing)."""
    from curvlake.constants import CONV_METHODS, SATURATION_RULES, TRACKERS

    track = config.track
    if not isinstance(track, tuple) or not all(t in TRACKERS for t in track):
        return [f"track={track!r} (allowed: a list of {', '.join(TRACKERS)})"]
    if len(set(track)) != len(track):
        return [f"track={list(track)!r} names a tracker twice"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    if not track:
        given = [k for k in _TRACK_KEYS[1:] if getattr(config, k) != defaults[k]]
        return [f"{', '.join(given)}: only with track=['saturation']"] if given else []
    problems = []
    delta = config.saturation_delta
    if not _is_real(delta, 0.0, math.inf) or delta <= 0:
        problems.append(f"saturation_delta={delta!r} (allowed: a number > 0)")
    if config.saturation_rule not in SATURATION_RULES:
        problems.append(
            f"saturation_rule={config.saturation_rule!r} (allowed: {', '.join(SATURATION_RULES)})"
        )
    if not _is_int(config.saturation_ddof, 0):
        problems.append(f"saturation_ddof={config.saturation_ddof!r} (allowed: an int >= 0)")
    if config.conv_method not in CONV_METHODS:
        problems.append(f"conv_method={config.conv_method!r} (allowed: {', '.join(CONV_METHODS)})")
    layers = config.track_layers
    if layers is not None and not isinstance(layers, str):
        problems.append(f"track_layers={layers!r} (allowed: a regular expression or null)")
    elif layers is not None:
        try:
            re.compile(layers)
        except re.error as error:
            problems.append(f"track_layers={layers!r} is not a regular expression: {error}")
    if _is_int(config.epochs, 0) and config.epochs < 1:
        problems.append("track needs epochs >= 1")
    return problems


#: Options of the M-FAC optimizer and their defaults (those of the seed: Frantar et al. 2021).
MFAC_DEFAULTS: dict[str, Any] = {
    "n_grads": 1024,
    "damp": 1e-5,
    "momentum": 0.0,
    "decoupled_weight_decay": False,
    "refresh_every": None,
}
_MFAC_FLOAT_KEYS = ("damp", "momentum")
#: Options that hold a mapping; ``"mfac.n_grads": 64`` sets one entry of it.
_NESTED_KEYS = ("model_params", "mfac")


def _nest_dotted_keys(options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"mfac.n_grads": 64}`` as ``{"mfac": {"n_grads": 64}}`` (merged into a given
    ``mfac`` mapping) for the mapping-valued options; other keys unchanged."""
    values = {k: v for k, v in options.items() if str(k).partition(".")[0] not in _NESTED_KEYS
              or "." not in str(k)}  # fmt: skip
    for key, value in options.items():
        head, dot, entry = str(key).partition(".")
        if dot and head in _NESTED_KEYS:
            nested = values.get(head)
            nested = dict(nested) if isinstance(nested, Mapping) else {}
            nested[entry] = value
            values[head] = nested
    return values


def _mfac_problems(optimizer: Any, options: Any) -> list[str]:
    """What is wrong with the ``mfac`` options (empty: nothing)."""
    if not isinstance(options, Mapping):
        return [f"mfac={options!r} (allowed: a mapping of M-FAC options)"]
    if optimizer != "mfac":
        return [f"mfac options {sorted(options)} apply only to optimizer='mfac'"] if options else []
    unknown = sorted(set(options) - set(MFAC_DEFAULTS))
    if unknown:
        return [f"unknown mfac option(s) {unknown} (valid: {', '.join(MFAC_DEFAULTS)})"]
    problems = []
    checks = {
        "n_grads": (_is_int(options["n_grads"], 1), "an int >= 1"),
        "damp": (
            _is_real(options["damp"], 0.0, math.inf) and options["damp"] > 0,
            "a number > 0",
        ),
        "momentum": (
            _is_real(options["momentum"], 0.0, 1.0) and options["momentum"] < 1,
            "in [0, 1)",
        ),
        "decoupled_weight_decay": (
            isinstance(options["decoupled_weight_decay"], bool),
            "true or false",
        ),
        "refresh_every": (
            options["refresh_every"] is None or _is_int(options["refresh_every"], 1),
            "null or an int >= 1",
        ),
    }
    for key, (ok, allowed) in checks.items():
        if not ok:
            problems.append(f"mfac.{key}={options[key]!r} (allowed: {allowed})")
    return problems


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _is_real(value: Any, low: float, high: float) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and low <= float(value) <= high
        and not math.isnan(float(value))
    )


# ---------------------------------------------------------------------------------------------
# schedule, checkpoints, seeds, device


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Learning rate of training epoch ``epoch`` (0-based).

    Scheduled rate: ``lr`` (constant) or ``lr * lr_gamma ** floor(epoch / lr_step)`` (step).
    Warmup over W = ``warmup_epochs`` epochs rises linearly from ``warmup_start_lr`` at epoch 0
    to the scheduled rate at epoch W - 1, endpoints included, as ignite's
    ``create_lr_scheduler_with_warmup`` stepped per epoch in the seed code:

        lr(e) = start + (scheduled(e) - start) * e / (W - 1)    for e < W - 1,

    e.g. start 0.001, lr 0.005, W = 5 gives 0.001, 0.002, 0.003, 0.004, 0.005, 0.005, ...
    (W <= 1 means no warmup). Unlike the seed, warmup and step decay combine.
    """
    if not _is_int(epoch, 0):
        raise UserInputError(f"epoch must be an int >= 0, got {epoch!r}")
    scheduled = float(config.lr)
    if config.lr_schedule == "step":
        if not _is_int(config.lr_step, 1):
            raise UserInputError(f"lr_schedule='step' needs lr_step >= 1, got {config.lr_step!r}")
        scheduled *= float(config.lr_gamma) ** (epoch // config.lr_step)
    warmup = config.warmup_epochs
    if warmup > 1 and epoch < warmup - 1:
        start = float(config.warmup_start_lr)
        return start + (scheduled - start) * epoch / (warmup - 1)
    return scheduled


def checkpoint_epochs(config: TrainConfig) -> list[int]:
    """Sorted checkpoint epochs: 0 (init), ``epochs`` (final), every ``save_every``-th epoch,
    and the explicit ``save_epochs``."""
    epochs = {0, config.epochs, *config.save_epochs}
    if config.save_every:
        epochs.update(range(config.save_every, config.epochs + 1, config.save_every))
    return sorted(e for e in epochs if 0 <= e <= config.epochs)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream ``(seed, *keys)``, independent across keys."""
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def epoch_generator(config: TrainConfig, epoch: int) -> torch.Generator:
    """The CPU generator of epoch ``epoch``'s shuffle order and augmentation."""
    return torch.Generator().manual_seed(derive_seed(config.seed, _STREAM_DATA, epoch))


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; anything else as ``torch.device``.

    Raises:
        UserInputError: a device this machine does not have (``cuda`` without a CUDA GPU or
            build of torch, ``cuda:N`` beyond the GPUs, ``mps`` off Apple silicon).
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UserInputError(f"bad device {device!r}: {exc}") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU"
            raise UserInputError(
                f"device={device!r} is not valid: no CUDA device here ({build}); use --device "
                "cpu or auto"
            )
        if resolved.index is not None and resolved.index >= count:
            raise UserInputError(
                f"device={device!r} is not valid: must be cuda:0..cuda:{count - 1} "
                f"({count} GPU(s) here)"
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"device={device!r} is not valid: MPS is not available here")
    return resolved


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# ---------------------------------------------------------------------------------------------
# model, optimizer, data


def make_model(config: TrainConfig, *, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """Build ``config.model`` with weights drawn from the run's init seed (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, _STREAM_INIT))
        return build_model(
            config.model, num_classes=num_classes, input_shape=input_shape, **config.model_params
        )


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay), Adam or M-FAC (``config.mfac``) over
    ``model``'s trainable parameters, at the learning rate of epoch 0 (``train_one_epoch``
    sets each epoch's rate)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = learning_rate(config, 0)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "mfac":
        from curvlake.pipelines.mfac.optimizer import MFAC

        options = config.mfac
        return MFAC(
            params,
            lr=lr,
            momentum=options["momentum"],
            weight_decay=config.weight_decay,
            ngrads=options["n_grads"],
            damp=options["damp"],
            decoupled_weight_decay=options["decoupled_weight_decay"],
            refresh_every=options["refresh_every"],
        )
    raise UserInputError(f"optimizer={config.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")


def load_training_data(config: TrainConfig) -> tuple[Splits, np.ndarray]:
    """Load ``config.dataset`` and apply the label noise to the train split.

    Returns:
        ``(splits, clean_train_labels)``: ``splits.train.y`` holds the (possibly) noisy labels.

    Raises:
        UserInputError: for a ``dataset-...`` artifact id (load it from the lake and call
            ``with_label_noise``), or any dataset error.
    """
    if _DATASET_ID.match(config.dataset):
        raise UserInputError(
            f"{config.dataset} is a lake artifact: load it through the lake, then apply "
            "with_label_noise"
        )
    if config.dataset.endswith(".npz"):
        splits = load_npz(
            config.dataset,
            split_seed=config.split_seed,
            val_size=config.val_size,
            standardize=config.standardize,
        )
    else:
        splits = load_splits(
            config.dataset,
            data_dir=config.data_dir,
            split_seed=config.split_seed,
            val_size=config.val_size,
            standardize=config.standardize,
        )
    return with_label_noise(splits, config), splits.train.y


def with_label_noise(splits: Splits, config: TrainConfig) -> Splits:
    """``splits`` with ``config.label_noise`` applied to the train labels (val/test stay clean)."""
    if not config.label_noise:
        return splits
    noisy = apply_label_noise(
        splits.train.y, splits.num_classes, config.label_noise, config.label_seed
    )
    return dataclasses.replace(splits, train=dataclasses.replace(splits.train, y=noisy))


def _as_tensor(array: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(dtype)
    return torch.as_tensor(np.asarray(array), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the loop


BatchCallback = Callable[[int, int, float], None]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    config: TrainConfig,
    epoch: int,
    device: str | torch.device | None = None,
    *,
    pad_value: float | Sequence[float] | np.ndarray = 0.0,
    callback: BatchCallback | None = None,
    recorders: Sequence[Recorder] = (),
) -> dict[str, float]:
    """Run training epoch ``epoch`` (0-based) over ``(x, y)`` with mean cross-entropy.

    ``model`` (and the optimizer state) must already live on ``device`` (default: the
    config's). Sets every parameter group's learning rate to ``learning_rate(config, epoch)``,
    shuffles with ``epoch_generator(config, epoch)``, augments (if ``config.augment``) from the
    same generator with ``pad_value`` as the padding (``Splits.pad_value`` pads with raw
    black), and seeds dropout from ``(config.seed, epoch)``.
    ``callback(batch_index, num_batches, loss)`` is called after every optimizer step (e.g. to
    advance a progress bar). ``recorders`` (:mod:`curvlake.nn.hooks`) see every training
    forward's feature layers with phase ``"train"``; they change nothing in the training.

    Returns:
        ``{"loss", "accuracy", "lr"}``: mean loss and accuracy over the epoch's (augmented,
        train-mode) batches, and the learning rate used.
    """
    device = resolve_device(config.device if device is None else device)
    x_all, y_all = _as_tensor(x, torch.float32), _as_tensor(y, torch.int64)
    n = len(x_all)
    if n == 0:
        raise UserInputError("cannot train on an empty training set")
    lr = learning_rate(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    generator = epoch_generator(config, epoch)
    order = torch.randperm(n, generator=generator)
    num_batches = -(-n // config.batch_size)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    model.train()
    with (
        torch.random.fork_rng(devices=_rng_devices(device)),
        attach(model, recorders, "train"),
    ):
        torch.manual_seed(derive_seed(config.seed, _STREAM_DROPOUT, epoch))
        for b in range(num_batches):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            xb = x_all[idx].to(device, non_blocking=True)
            yb = y_all[idx].to(device, non_blocking=True)
            if config.augment:
                xb = augment_batch(xb, generator, config.augment_padding, pad_value=pad_value)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach().double() * len(idx)
            correct += (logits.detach().argmax(dim=1) == yb).sum()
            if callback is not None:
                callback(b, num_batches, float(loss.detach()))
    return {"loss": float(total_loss) / n, "accuracy": int(correct) / n, "lr": lr}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    *,
    recorders: Sequence[Recorder] = (),
    phase: str = "eval",
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode; NaN for an empty set.

    Batches go to ``device`` (default: the device of the model's first parameter). The model's
    train/eval mode is restored afterwards. ``recorders`` see the feature layers of every
    forward with ``phase`` (``"eval:<split>"`` when the caller knows the split's name).
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = resolve_device(device)
    x_all, y_all = _as_tensor(x, torch.float32), _as_tensor(y, torch.int64)
    n = len(x_all)
    if n == 0:
        return {"loss": math.nan, "accuracy": math.nan}
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with attach(model, recorders, phase):
            for start in range(0, n, batch_size):
                xb = x_all[start : start + batch_size].to(device, non_blocking=True)
                yb = y_all[start : start + batch_size].to(device, non_blocking=True)
                logits = model(xb)
                total_loss += F.cross_entropy(logits, yb, reduction="sum").double()
                correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    return {"loss": float(total_loss) / n, "accuracy": int(correct) / n}


EpochCallback = Callable[[int, dict[str, float]], None]


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Split,
    config: TrainConfig,
    *,
    start_epoch: int = 0,
    device: str | torch.device | None = None,
    eval_splits: Mapping[str, Split] | None = None,
    pad_value: float | Sequence[float] | np.ndarray = 0.0,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = False,
    recorders: Sequence[Recorder] = (),
) -> list[dict[str, float]]:
    """Train epochs ``start_epoch..config.epochs - 1``; return one metrics dict per epoch.

    After epoch ``k`` (ending at checkpoint ``k + 1``) the metrics hold ``epoch = k + 1``,
    ``lr``, ``train_loss``, ``train_accuracy`` and ``<name>_loss`` / ``<name>_accuracy`` for
    each of ``eval_splits``; ``on_epoch_end(k + 1, metrics)`` is then called, which is where a
    caller saves checkpoints (``k + 1 in checkpoint_epochs(config)``). ``progress`` shows a
    tqdm bar over epochs.

    ``recorders`` (:mod:`curvlake.nn.hooks`): ``start_epoch(k)`` before epoch ``k``, the
    training forwards recorded with phase ``"train"``, the evaluation of each of
    ``eval_splits`` (the model at checkpoint ``k + 1``) with ``"eval:<name>"``, then
    ``end_epoch(k)``, before ``on_epoch_end``. Recording leaves the trained weights unchanged.
    """
    if not _is_int(start_epoch, 0) or start_epoch > config.epochs:
        raise UserInputError(
            f"start_epoch must be an int in 0..{config.epochs}, got {start_epoch!r}"
        )
    device = resolve_device(config.device if device is None else device)
    history: list[dict[str, float]] = []
    epochs: Any = range(start_epoch, config.epochs)
    if progress:
        from curvlake.progress import progress_bar

        epochs = progress_bar(epochs, desc=f"train {config.model}", unit="epoch")
    for epoch in epochs:
        for recorder in recorders:
            recorder.start_epoch(epoch)
        stats = train_one_epoch(
            model,
            optimizer,
            train.x,
            train.y,
            config,
            epoch,
            device,
            pad_value=pad_value,
            recorders=recorders,
        )
        metrics = {
            "epoch": epoch + 1,
            "lr": stats["lr"],
            "train_loss": stats["loss"],
            "train_accuracy": stats["accuracy"],
        }
        for name, split in (eval_splits or {}).items():
            result = evaluate(
                model,
                split.x,
                split.y,
                config.eval_batch_size,
                device,
                recorders=recorders,
                phase=f"eval:{name}",
            )
            metrics[f"{name}_loss"] = result["loss"]
            metrics[f"{name}_accuracy"] = result["accuracy"]
        for recorder in recorders:
            recorder.end_epoch(epoch)
        history.append(metrics)
        if progress:
            epochs.set_postfix(
                loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.3f}", refresh=False
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    return history
