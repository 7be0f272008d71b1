"""Adaptation methods behind one interface: ProLIP and the baselines it is compared against."""
from __future__ import annotations

from prolip.methods.base import Method, Support, Task, TensorViews, Validation, ViewSource

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def create(name: str, **hyperparameters) -> Method:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**hyperparameters)


def _import_all() -> None:
    # Importing the modules runs their @register decorators; kept lazy so `import prolip` stays fast.
    import importlib
    import pkgutil

    import prolip.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"prolip.methods.{mod.name}")


__all__ = ["Method", "Support", "Task", "TensorViews", "Validation", "ViewSource", "register", "available", "create"]
