"""The layer recorder: forward hooks that hand each feature-holding layer's output to recorders.

A *feature layer* is a leaf module whose output is a representation worth measuring: ``Linear``,
``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` and the recurrent layers ``LSTM`` / ``GRU`` /
``RNN`` (subclasses included, e.g. the zoo's TensorFlow-padded convs). Layers are named by
``model.named_modules()`` and listed in that order, so names and order are deterministic for
an architecture. For a recurrent layer the features are its output sequence, not the final
``(h, c)`` state (a ``PackedSequence`` output gives its packed ``.data`` rows).

A :class:`Recorder` receives ``record(layer, features, phase)`` for every forward call of every
feature layer it selects, with ``phase`` ``"train"`` (training forwards) or
``"eval:<split>"`` (evaluation passes; ``"eval"`` when no split name is known), and
``start_epoch`` / ``end_epoch`` around each epoch of
:func:`curvlake.nn.training.train_epochs`. Features are detached and recorded under
``torch.no_grad()``, so recording changes neither the forward's result nor any gradient.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from curvlake.errors import UserInputError

#: module types whose outputs are recorded (subclasses too).
FEATURE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.RNNBase,
)

_PHASE = re.compile(r"^(train|eval(:.+)?)$")


class Recorder:
    """Base class of everything that consumes layer features; subclasses override the hooks.

    Attributes:
        layers: regular expression (``re.search``) selecting the feature layers by name;
            ``None`` records every feature layer.

    A recorder must not modify ``features`` in place (they are the forward's own tensors),
    should copy what it keeps (``features.clone()``: a later in-place activation may overwrite
    them), and must not draw from torch's global RNG (that would change dropout draws and so
    the trained weights).
    """

    layers: str | None = None

    def start_epoch(self, epoch: int) -> None:
        """Called before training epoch ``epoch`` (0-based, as ``train_one_epoch``)."""

    def record(self, layer: str, features: torch.Tensor, phase: str) -> None:
        """Called with the output of feature layer ``layer`` on each forward call.

        Args:
            layer: the layer's name in ``model.named_modules()``.
            features: its output, detached (batch first, as the layer returns it).
            phase: ``"train"``, ``"eval:<split>"`` or ``"eval"``.
        """

    def end_epoch(self, epoch: int) -> None:
        """Called after training epoch ``epoch`` and the evaluation passes that follow it."""


def _compile(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise UserInputError(
            f"layer pattern {pattern!r} is not a regular expression: {error}"
        ) from None


def feature_layers(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the feature layers of ``model``, in ``named_modules()`` order.

    Args:
        model: the model.
        pattern: regular expression (``re.search``) on the names; ``None`` keeps all.

    Raises:
        UserInputError: a bad pattern, or a pattern matching no feature layer.
    """
    regex = _compile(pattern)
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, FEATURE_TYPES) and (regex is None or regex.search(name))
    ]
    if regex is not None and not layers:
        known = ", ".join(name for name, _ in feature_layers(model)) or "none"
        raise UserInputError(f"layer pattern {pattern!r} matches no feature layer (known: {known})")
    return layers


def _features(output) -> torch.Tensor:
    """The feature tensor of a layer's output (a recurrent layer returns ``(output, state)``)."""
    if isinstance(output, tuple):
        output = output[0]
    if isinstance(output, PackedSequence):
        output = output.data
    return output.detach()


@contextlib.contextmanager
def attach(model: nn.Module, recorders: Sequence[Recorder], phase: str) -> Iterator[list[str]]:
    """Record the feature layers of ``model`` into ``recorders`` while the context is open.

    Registers one forward hook per selected feature layer and removes them all on exit (also
    on error). A module called several times in one forward is recorded at every call. With
    no recorders nothing is registered.

    Args:
        model: the model.
        recorders: the recorders; each gets the layers its ``layers`` pattern selects.
        phase: ``"train"``, ``"eval:<split>"`` or ``"eval"``, passed to every ``record``.

    Yields:
        The names of the hooked layers, in module order.

    Raises:
        UserInputError: a bad phase, or a recorder pattern matching no feature layer.
    """
    if not isinstance(phase, str) or not _PHASE.match(phase):
        raise UserInputError(f"phase={phase!r}; allowed: train, eval, eval:<split name>")
    selections = [
        {name for name, _ in feature_layers(model, recorder.layers)} for recorder in recorders
    ]
    chosen = [
        (name, module, [r for r, names in zip(recorders, selections, strict=True) if name in names])
        for name, module in (feature_layers(model) if recorders else [])
    ]
    chosen = [(name, module, targets) for name, module, targets in chosen if targets]
    handles = []
    try:
        for name, module, targets in chosen:
            handles.append(module.register_forward_hook(_hook(name, targets, phase)))
        yield [name for name, _, _ in chosen]
    finally:
        for handle in handles:
            handle.remove()


def _hook(name: str, recorders: list[Recorder], phase: str):
    def hook(module: nn.Module, inputs, output) -> None:
        features = _features(output)
        with torch.no_grad():
            for recorder in recorders:
                recorder.record(name, features, phase)

    return hook
