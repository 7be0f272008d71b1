"""The test-time methods by name: each module of ``prolip.tta`` registers its class; a name is taken once."""

from __future__ import annotations

from typing import Any

from prolip.constraints import HyperparameterError, check_declared, check_known
from prolip.registry import Registry
from prolip.tta.base import SECTION_SETTINGS, TestTimeMethod

_REGISTRY: Registry[type[TestTimeMethod]] = Registry("test-time method", HyperparameterError)


def register(cls: type[TestTimeMethod]) -> type[TestTimeMethod]:
    """Add a test-time method under its ``name`` (refused when taken by another class, or when a setting has no
    constraint)."""
    _check_declared(cls)
    return _REGISTRY.add(cls.name, cls)


def _check_declared(cls: type[TestTimeMethod]) -> None:
    """One constraint per setting, as for few-shot methods, and the settings it shares with the ``tta`` section or
    always records are its own."""
    params = cls.param_names()
    check_declared(cls.name, params, cls.constraints)
    unknown = [k for k in (*cls.shared, *cls.recorded) if k not in params]
    not_section = [k for k in cls.shared if k not in SECTION_SETTINGS]
    if unknown or not_section:
        raise TypeError(
            f"test-time method {cls.name!r}: 'shared' and 'recorded' name its own settings (not {unknown}), and "
            f"'shared' only the tta section's {list(SECTION_SETTINGS)} (not {not_section})"
        )


def available() -> list[str]:
    """Every registered name, in the order registered (the order an experiment's flags list their rows)."""
    return _REGISTRY.names()


def method_class(name: str) -> type[TestTimeMethod]:
    return _REGISTRY.get(name)


def create(name: str, **settings: Any) -> TestTimeMethod:
    """A test-time method with the given settings (the others at their defaults), checked before any work."""
    cls = method_class(name)
    check_known(name, list(settings), cls.param_names())
    method = cls(**settings)
    method.check_params()
    return method
