"""Adaptation methods behind one interface: ProLIP, the paper's complements and the baselines it is compared against.

A new method is one module here: a :class:`Method` subclass decorated with :func:`register`.
"""

from __future__ import annotations

from typing import Any

from prolip.methods.base import FitError, Method, Support, Task, TensorViews, Validation, ViewSource
from prolip.methods.params import HyperparameterError, check_known

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    _import_all()
    if name not in _REGISTRY:
        raise HyperparameterError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create(name: str, **hyperparameters: Any) -> Method:
    """A method with the given hyperparameters (the others at their defaults), checked before any work starts."""
    cls = method_class(name)
    check_known(name, list(hyperparameters), cls.param_names())
    method = cls(**hyperparameters)
    method.check_params()
    return method


def _import_all() -> None:
    # Importing the modules runs their @register decorators; kept lazy so `import prolip` stays fast.
    import importlib
    import pkgutil

    import prolip.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name not in ("base", "params"):
            importlib.import_module(f"prolip.methods.{mod.name}")


__all__ = [
    "FitError",
    "HyperparameterError",
    "Method",
    "Support",
    "Task",
    "TensorViews",
    "Validation",
    "ViewSource",
    "available",
    "create",
    "method_class",
    "register",
]
