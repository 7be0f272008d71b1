"""The one validation language: constraints for hyperparameters, experiment files and run manifests.

Each method declares one constraint per hyperparameter and one function applies them (an unconstrained one is an
error); an experiment file's keys and a run manifest's are each one :class:`Schema` of the same constraints.

A constraint is a small frozen object whose ``problem(value)`` returns ``None`` when the value is fine, or what is
wrong with it ("must be > 0"). Non-finite numbers are always refused: a NaN learning rate trains nothing and says
nothing.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from prolip.errors import ProlipError


class HyperparameterError(ProlipError, ValueError):
    """An unknown hyperparameter or a bad value; the message names the method and the key."""


class Constraint(Protocol):
    def problem(self, value: Any) -> str | None: ...


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Number:
    """A finite int or float within [low, high] (``open_low``: strictly above low); ``integer`` refuses floats."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    integer: bool = False
    optional: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.optional else "is required (got None)"
        if not _is_number(value) or (self.integer and not isinstance(value, int)):
            return f"must be {'an integer' if self.integer else 'a number'}, got {type(value).__name__} {value!r}"
        if not math.isfinite(value):
            return f"must be finite, got {value!r}"
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return f"must be {'>' if self.open_low else '>='} {self.low:g}, got {value!r}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high:g}, got {value!r}"
        return None


POSITIVE = Number(low=0, open_low=True)
NON_NEGATIVE = Number(low=0)
POSITIVE_INT = Number(low=1, integer=True)
NON_NEGATIVE_INT = Number(low=0, integer=True)
INTEGER = Number(integer=True)
FRACTION = Number(low=0, high=1)
# Above 10 no optimiser here does anything but blow the weights up (and the update overflows float32 first).
LEARNING_RATE = Number(low=0, open_low=True, high=10.0)


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def problem(self, value: Any) -> str | None:
        return None if value in self.options else f"must be one of {', '.join(map(repr, self.options))}, got {value!r}"


@dataclass(frozen=True)
class Flag:
    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


@dataclass(frozen=True)
class Lambda:
    """A regularisation weight: a non-negative finite number, or the rule "1/N" or "1/N2" (N = shots)."""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str):
            rule = normalise_lambda_rule(value)
            if rule is None:
                return f"must be a number, '1/N' or '1/N2', got {value!r}"
            return None if rule in ("1/N", "1/N2") else NON_NEGATIVE.problem(float(rule))
        return NON_NEGATIVE.problem(value)


@dataclass(frozen=True)
class Pair:
    """A two-element list/tuple whose elements satisfy ``item``."""

    item: Number

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            return f"must be a pair [a, b], got {value!r}"
        return next((p for p in map(self.item.problem, value) if p), None)


@dataclass(frozen=True)
class PointGrid:
    """A validation grid: true (the method's own grid), false (none), or a non-empty list of [lr, lam] pairs."""

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool):
            return None
        if not isinstance(value, (list, tuple)) or not value:
            return f"must be true, false or a list of [lr, lam] pairs, got {value!r}"
        for point in value:
            if not isinstance(point, (list, tuple)) or len(point) != 2:
                return f"point {point!r} is not an [lr, lam] pair"
            problem = LEARNING_RATE.problem(point[0]) or NON_NEGATIVE.problem(point[1])
            if problem:
                return f"point {point!r}: lr must be in (0, 10] and lam >= 0 ({problem})"
        return None


@dataclass(frozen=True)
class Linspace:
    """A searched range [start, stop, num]: start, stop > 0 and num a positive integer."""

    def problem(self, value: Any) -> str | None:
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 3
            and all(_is_number(v) for v in value)
            and not (POSITIVE.problem(value[0]) or POSITIVE.problem(value[1]) or POSITIVE_INT.problem(value[2]))
        )
        return (
            None if ok else f"must be [start, stop, num] with start, stop > 0 and num a positive integer, got {value!r}"
        )


@dataclass(frozen=True)
class Subset:
    """A non-empty list drawn from ``options`` (a string is not a list of its letters)."""

    options: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            return f"must be a non-empty list of {self.options}, got {value!r}"
        bad = [v for v in value if v not in self.options]
        return f"must be a non-empty list of {self.options}, got {value!r}" if bad else None


@dataclass(frozen=True)
class Template:
    """A prompt template holding ``{}`` where the class name goes (``optional``: None too)."""

    optional: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        return None if isinstance(value, str) and "{}" in value else f"must hold '{{}}', got {value!r}"


@dataclass(frozen=True)
class Kind:
    """A value of one of ``types`` (a JSON true/false is never a number), named ``what`` in the message."""

    types: tuple[type, ...]
    what: str
    optional: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        ok = isinstance(value, self.types) and not (isinstance(value, bool) and bool not in self.types)
        return None if ok else f"must be {self.what}, got {value!r:.80}"


TEXT = Kind((str,), "a string")


@dataclass(frozen=True)
class ListOf:
    """A list (never a string) whose every element satisfies ``item``; ``non_empty`` refuses []."""

    item: Constraint
    what: str
    non_empty: bool = False
    optional: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if isinstance(value, list) and self.non_empty and not value:
            return "must not be empty"
        ok = isinstance(value, list) and not any(map(self.item.problem, value))
        return None if ok else f"must be {self.what}, got {value!r:.80}"


@dataclass(frozen=True)
class Either:
    """A value any one of ``options`` accepts, named ``what`` in the message."""

    options: tuple[Constraint, ...]
    what: str

    def problem(self, value: Any) -> str | None:
        ok = any(option.problem(value) is None for option in self.options)
        return None if ok else f"must be {self.what}, got {value!r:.80}"


@dataclass(frozen=True)
class Schema:
    """A mapping of named fields, one constraint each (a nested Schema for a nested mapping): a ``required`` field
    must be there (``missing`` says what its absence means), and a key no field names is refused, unless the
    mapping is ``open`` (a run manifest's provenance, which varies between versions, is kept unchecked)."""

    fields: Mapping[str, Constraint]
    required: tuple[str, ...] = ()
    open: bool = False
    noun: str = "a mapping"
    missing: str = "is required"

    def find(self, value: Any) -> tuple[tuple[str, ...], str] | None:
        """(where the fault is, what is wrong), or None when all is fine. Where: the keys from the top down to the
        value at fault (``()``: ``value`` itself), ending in ``""`` when the fault is the keys of the mapping there
        (one it does not name)."""
        if not isinstance(value, dict):
            return (), f"must be {self.noun}, got {value!r:.80}"
        unknown = [] if self.open else sorted(set(value) - set(self.fields), key=str)
        if unknown:
            return ("",), f"unknown key(s) {unknown}; known keys: {sorted(self.fields)}"
        missing = next((k for k in self.required if k not in value), None)
        if missing is not None:
            return (missing,), self.missing
        for key, constraint in self.fields.items():
            if key not in value:
                continue
            if isinstance(constraint, Schema):
                found = constraint.find(value[key])
                if found is not None:
                    return (key, *found[0]), found[1]
            else:
                problem = constraint.problem(value[key])
                if problem:
                    return (key,), problem
        return None

    def problem(self, value: Any) -> str | None:
        found = self.find(value)
        if found is None:
            return None
        (*within, last), problem = found[0] or ("",), found[1]
        key = ".".join([*within, last] if last else within)
        return f"key '{key}' {problem}" if key else problem


def check_declared(method: str, params: Sequence[str], constraints: Mapping[str, Constraint]) -> None:
    """A method declares exactly one constraint per hyperparameter: an unconstrained one would take any value
    silently, a constraint of no hyperparameter checks nothing. Refused when the method is registered."""
    missing = [p for p in params if p not in constraints]
    extra = [k for k in constraints if k not in params]
    if missing or extra:
        raise TypeError(
            f"method {method!r}: every hyperparameter needs a constraint (none for {missing}) and every constraint "
            f"a hyperparameter (none for {extra})"
        )


def normalise_lambda_rule(rule: str) -> str | None:
    key = rule.replace(" ", "").upper()
    if key == "1/N":
        return "1/N"
    if key in ("1/N2", "1/N^2", "1/N**2"):
        return "1/N2"
    try:
        float(rule)
    except ValueError:
        return None
    return rule


def resolve_lambda(lam: str | float, shots: int) -> float:
    """λ from its rule: "1/N" (the paper's validation-free default), "1/N2" (its variant) or a number."""
    if isinstance(lam, str):
        rule = normalise_lambda_rule(lam)
        if rule == "1/N":
            return 1.0 / shots
        if rule == "1/N2":
            return 1.0 / shots**2
        if rule is None:
            raise HyperparameterError(f"lam={lam!r}: use '1/N', '1/N2' or a number")
        return float(rule)
    return float(lam)


def check(method: str, values: Mapping[str, Any], constraints: Mapping[str, Constraint]) -> None:
    """Raise one HyperparameterError naming ``method`` and the first bad key."""
    for key, value in values.items():
        constraint = constraints.get(key)
        if constraint is None:  # a value nothing checks would pass silently, whatever it is
            raise HyperparameterError(f"{method}: hyperparameter {key} has no constraint; declare one")
        problem = constraint.problem(value)
        if problem:
            raise HyperparameterError(f"{method}: hyperparameter {key} {problem}")


def check_known(method: str, given: Sequence[str], known: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise HyperparameterError(
            f"{method}: unknown hyperparameter(s) {', '.join(unknown)}; its hyperparameters are: "
            f"{', '.join(known) or '(none)'}"
        )


class Configurable:
    """Settings read from ``__init__``: each keyword argument is a setting stored unchanged under its own name, its
    default the argument's, each checked by its entry in ``constraints`` (few-shot methods, test-time methods)."""

    name: ClassVar[str]
    constraints: ClassVar[dict[str, Constraint]] = {}

    @classmethod
    def param_names(cls) -> list[str]:
        return list(cls.defaults())

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        signature = inspect.signature(cls.__init__)
        return {p.name: p.default for p in signature.parameters.values() if p.name != "self"}

    def get_params(self) -> dict[str, Any]:
        """Every setting's effective value, defaults included."""
        return {k: getattr(self, k) for k in self.param_names()}

    def check_params(self) -> None:
        check(self.name, self.get_params(), self.constraints)
