"""Declarative checks of user input, in the one message format of curvlake.

Public functions declare what each parameter accepts, as scikit-learn's parameter constraints
do, and are checked at the boundary (before any artifact is staged)::

    @validate_params({"k": [Interval(int, 1, None)], "storage": [Options("topk", "dense")],
                      "min_prob": [None, Interval(float, 0, 1)]})
    def run_pefs(lake, run_id, *, k=4096, storage="topk", min_prob=None): ...

A bad value raises :class:`~curvlake.errors.UserInputError` with one line naming the parameter,
the value and what is allowed: ``k=0 is not valid: must be an int >= 1``. Constraints that
depend on the data (``top_k_classes`` at most the number of classes) use :func:`check` with the
same constraints once the data is known.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from curvlake.errors import UserInputError


class Constraint:
    """A set of allowed values with a description for messages."""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def __str__(self) -> str:
        raise NotImplementedError


class Interval(Constraint):
    """Numbers of a type (``int`` or ``float``) in an interval; ``None`` bounds are open ends.

    ``int`` accepts integers only (not bools, not 2.0); ``float`` accepts any real number, so
    ``Interval(float, 0, 1)`` takes ``1`` too. NaN is never accepted.
    """

    def __init__(
        self,
        kind: type,
        low: float | None,
        high: float | None,
        closed: str = "both",
    ):
        if kind not in (int, float):
            raise TypeError("Interval kind must be int or float")
        if closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"closed={closed!r}")
        self.kind, self.low, self.high, self.closed = kind, low, high, closed

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if math.isnan(float(value)):
            return False
        low_ok = self.low is None or (
            value >= self.low if self.closed in ("both", "left") else value > self.low
        )
        high_ok = self.high is None or (
            value <= self.high if self.closed in ("both", "right") else value < self.high
        )
        return low_ok and high_ok

    def __str__(self) -> str:
        what = "an int" if self.kind is int else "a number"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        if self.low is not None and self.high is not None:
            return f"{what} in {left}{self.low}, {self.high}{right}"
        if self.low is not None:
            return f"{what} {'>=' if left == '[' else '>'} {self.low}"
        if self.high is not None:
            return f"{what} {'<=' if right == ']' else '<'} {self.high}"
        return what


class Options(Constraint):
    """One of a fixed set of values."""

    def __init__(self, *values: Any):
        self.values = values

    def accepts(self, value: Any) -> bool:
        try:
            return value in self.values
        except TypeError:  # unhashable or incomparable
            return False

    def __str__(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


class InstanceOf(Constraint):
    """An instance of a type (bools are not ints here)."""

    def __init__(self, kind: type | tuple[type, ...], description: str):
        self.kind, self.description = kind, description

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) and bool not in _as_tuple(self.kind):
            return False
        return isinstance(value, self.kind)

    def __str__(self) -> str:
        return self.description


class IntList(Constraint):
    """A sequence of ints (each in an optional interval)."""

    def __init__(self, each: Interval | None = None, nonempty: bool = True):
        self.each, self.nonempty = each, nonempty

    def accepts(self, value: Any) -> bool:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return False
        if self.nonempty and not value:
            return False
        check = self.each or Interval(int, None, None)
        return all(check.accepts(v) for v in value)

    def __str__(self) -> str:
        each = " of ints"
        if self.each is not None:
            each = " of " + str(self.each).replace("an int", "ints", 1)
        return ("a non-empty list" if self.nonempty else "a list") + each


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _describe(constraints: Sequence[Constraint | None]) -> str:
    parts = ["None" if c is None else str(c) for c in constraints]
    return " or ".join(parts)


def check(name: str, value: Any, *constraints: Constraint | None, context: str = "") -> None:
    """Raise a one-line ``UserInputError`` unless ``value`` meets one of ``constraints``
    (``None`` among them allows ``None``); ``context`` ends the message (e.g. the data's
    size)."""
    for constraint in constraints:
        if constraint is None:
            if value is None:
                return
        elif constraint.accepts(value):
            return
    where = f" ({context})" if context else ""
    raise UserInputError(f"{name}={value!r} is not valid: must be {_describe(constraints)}{where}")


def check_exclusive(**named: Any) -> None:
    """Exactly one of the named values must be given (not None)."""
    given = [k for k, v in named.items() if v is not None]
    if len(given) != 1:
        names = ", ".join(named)
        raise UserInputError(
            f"give exactly one of {names}" + (f" (got {', '.join(given)})" if given else "")
        )


def refuse_unused(reason: str, **named: Any) -> None:
    """Options that do not apply are refused, not ignored: each of ``named`` must be None."""
    given = [k for k, v in named.items() if v is not None]
    if given:
        raise UserInputError(f"{', '.join(given)} does not apply {reason}")


def validate_params(
    constraints: Mapping[str, Sequence[Constraint | None]],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: check the named parameters of every call against their constraints."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(function)
        unknown = set(constraints) - set(signature.parameters)
        if unknown:
            raise TypeError(f"{function.__name__} has no parameter(s) {sorted(unknown)}")

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as error:
                raise UserInputError(f"{function.__name__}: {error}") from None
            bound.apply_defaults()
            for name, allowed in constraints.items():
                check(name, bound.arguments[name], *allowed)
            return function(*args, **kwargs)

        wrapper.__wrapped_constraints__ = dict(constraints)  # type: ignore[attr-defined]
        return wrapper

    return decorate
