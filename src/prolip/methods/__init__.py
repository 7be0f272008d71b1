"""Adaptation methods behind one interface: ProLIP, the paper's complements and the baselines it is compared against.

A new method is one module here: a :class:`Method` subclass declaring its :class:`Capabilities`, decorated with
:func:`register` (which refuses a taken name and a hyperparameter without a constraint); :func:`check_method` runs
the interface's contract on it, its declared capabilities included.
"""

from __future__ import annotations

from typing import Any

from prolip.constraints import HyperparameterError, check_declared, check_known
from prolip.methods.base import FitError, Method, Support, Task, TensorViews, Validation, ViewSource
from prolip.methods.capabilities import NO_CACHED_VIEWS, Capabilities
from prolip.methods.checks import check_method
from prolip.registry import Registry

_REGISTRY: Registry[type[Method]] = Registry("method", HyperparameterError)


def register(cls: type[Method]) -> type[Method]:
    """Add a method under its ``name`` (refused when taken by another class, or when a hyperparameter has no
    constraint)."""
    check_declared(cls.name, cls.param_names(), cls.constraints)
    return _REGISTRY.add(cls.name, cls)


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY.names())


def method_class(name: str) -> type[Method]:
    _import_all()
    return _REGISTRY.get(name)


def create(name: str, **hyperparameters: Any) -> Method:
    """A method with the given hyperparameters (the others at their defaults), checked before any work starts."""
    cls = method_class(name)
    check_known(name, list(hyperparameters), cls.param_names())
    method = cls(**hyperparameters)
    method.check_params()
    return method


def configure(
    name: str,
    hyperparameters: dict[str, Any],
    *,
    validate: bool = False,
    dataset: str | None = None,
    refuse_useless_validation: bool = True,
) -> Method:
    """The method as the harness and the CLI run it: its original's settings for ``dataset`` (if any), then, with
    ``validate``, the hyperparameters that switch on what it selects on a validation set, then the caller's.

    A method that selects nothing on validation is refused with ``validate`` (it would change nothing while
    claiming it did), unless ``refuse_useless_validation`` is off (a bench protocol giving every method the set).
    """
    cls = method_class(name)
    if validate and not cls.capabilities.selects:
        if refuse_useless_validation:
            raise HyperparameterError(
                f"{name} selects nothing on a validation set (it is validation-free by design); drop --validate"
            )
        validate = False
    per_dataset = cls.dataset_defaults.get(dataset, {}) if dataset is not None else {}
    return create(name, **{**per_dataset, **(cls.validation_params if validate else {}), **hyperparameters})


def _import_all() -> None:
    # Importing the modules runs their @register decorators; kept lazy so `import prolip` stays fast.
    import importlib
    import pkgutil

    import prolip.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name not in ("base", "capabilities"):
            importlib.import_module(f"prolip.methods.{mod.name}")


__all__ = [
    "NO_CACHED_VIEWS",
    "Capabilities",
    "FitError",
    "HyperparameterError",
    "Method",
    "Support",
    "Task",
    "check_method",
    "TensorViews",
    "Validation",
    "ViewSource",
    "available",
    "configure",
    "create",
    "method_class",
    "register",
]
