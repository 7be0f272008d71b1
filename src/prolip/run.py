"""A saved run: a small directory holding everything needed to predict with, and reproduce, an adaptation.

Layout::

    run/
      manifest.json          # provenance + hyperparameters + metrics (see Run.manifest)
      method.safetensors     # the fitted method's tensors (ProLIP: adapted W, W0, bias)
      classifier.safetensors # the frozen text classifier T [C, D]
      classnames.json, templates.json

Writes are atomic: the directory is assembled under a temporary name beside the target and renamed into
place, so an interrupted ``fit`` never leaves a half-written run.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "prolip-run/1"


class RunError(ValueError):
    """A run directory that is missing, incomplete or of an unknown format."""


@dataclass
class Run:
    manifest: dict[str, Any]
    method_state: dict[str, torch.Tensor]
    classifier: torch.Tensor
    classnames: list[str]
    templates: list[str]
    path: Path | None = None
    extra_json: dict[str, Any] = field(default_factory=dict)

    @property
    def method_name(self) -> str:
        return self.manifest["method"]["method"]

    def save(self, out: Path | str, *, force: bool = False) -> Path:
        out = Path(out)
        if out.exists() and not force:
            raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
        out.parent.mkdir(parents=True, exist_ok=True)
        _sweep_dead_temporaries(out)
        # The pid in the name lets a later save tell a dead writer's leftovers from a live one's work in progress.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            _write_json(tmp / "manifest.json", {"format": FORMAT, **self.manifest})
            save_file({k: v.detach().contiguous().cpu() for k, v in self.method_state.items()},
                      str(tmp / "method.safetensors"))
            save_file({"classifier": self.classifier.detach().contiguous().cpu()}, str(tmp / "classifier.safetensors"))
            _write_json(tmp / "classnames.json", self.classnames)
            _write_json(tmp / "templates.json", self.templates)
            for name, obj in self.extra_json.items():
                _write_json(tmp / name, obj)
            if out.exists():
                if _exchange(tmp, out):  # one atomic step: `out` is always the old or the new complete run
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    # No atomic swap here: move the old run aside first, so a crash between the two renames
                    # still leaves it complete on disk (Run.load points at it).
                    old = out.with_name(f".{out.name}.old-{os.getpid()}")
                    os.replace(out, old)
                    os.replace(tmp, out)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = out
        return out

    @classmethod
    def load(cls, path: Path | str) -> "Run":
        path = Path(path)
        if not path.is_dir():
            aside = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
            if aside:
                raise RunError(f"run directory {path} does not exist, but an interrupted overwrite left the previous "
                               f"run at {aside[-1]}: rename it to {path} to use it")
            raise RunError(f"run directory {path} does not exist (create one with `prolip fit ... --out {path}`)")
        manifest_file = path / "manifest.json"
        for needed in ("manifest.json", "method.safetensors", "classifier.safetensors", "classnames.json",
                       "templates.json"):
            if not (path / needed).is_file():
                raise RunError(f"{path} is not a complete prolip run: {needed} is missing")
        manifest = _read_json(manifest_file)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise RunError(f"{manifest_file}: unknown run format {found!r} (expected {FORMAT})")
        classifier = _read_tensors(path / "classifier.safetensors")
        if "classifier" not in classifier:
            raise RunError(f"{path / 'classifier.safetensors'} has no 'classifier' tensor")
        return cls(
            manifest=manifest,
            method_state=_read_tensors(path / "method.safetensors"),
            classifier=classifier["classifier"],
            classnames=_read_json(path / "classnames.json"),
            templates=_read_json(path / "templates.json"),
            path=path,
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}); the run is damaged: fit it again") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    # safetensors only: a run file is never unpickled, so a tampered run cannot execute code.
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError for foreign or cut files
        raise RunError(f"{path} is not a valid safetensors file ({e}); the run is damaged: fit it again") from None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _sweep_dead_temporaries(out: Path) -> None:
    """Remove temporaries of earlier saves of ``out`` whose writer died (kill -9, power loss)."""
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):
        pid = leftover.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
