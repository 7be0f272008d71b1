"""prolip: few-shot CLIP adaptation by fine-tuning the last visual projection (ProLIP).

The front door (:mod:`prolip.api`) is imported on first use, so ``import prolip`` (and the CLI's ``--help``, and
:mod:`prolip.errors`) never pay for torch::

    import prolip

    result = prolip.fit("path/to/folder", shots=16)
    result.run.save("runs/mine")
    prolip.load_run("runs/mine").predict(["photo.jpg"])
"""

from __future__ import annotations

from typing import Any

from prolip.version import __version__

__all__ = ["__version__", "TTAConfig", "evaluate", "fit", "load_backbone", "load_run"]
_FRONT_DOOR = ("TTAConfig", "evaluate", "fit", "load_backbone", "load_run")


def __getattr__(name: str) -> Any:
    if name in _FRONT_DOOR:
        from prolip import api

        return getattr(api, name)
    raise AttributeError(f"module 'prolip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FRONT_DOOR])
