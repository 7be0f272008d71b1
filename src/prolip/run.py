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
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
                # Move the old run aside first so a crash here still leaves one complete run on disk.
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
            raise RunError(f"run directory {path} does not exist (create one with `prolip fit ... --out {path}`)")
        manifest_file = path / "manifest.json"
        for needed in ("manifest.json", "method.safetensors", "classifier.safetensors", "classnames.json",
                       "templates.json"):
            if not (path / needed).is_file():
                raise RunError(f"{path} is not a complete prolip run: {needed} is missing")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != FORMAT:
            raise RunError(f"{manifest_file}: unknown run format {manifest.get('format')!r} (expected {FORMAT})")
        return cls(
            manifest=manifest,
            method_state=load_file(str(path / "method.safetensors")),
            classifier=load_file(str(path / "classifier.safetensors"))["classifier"],
            classnames=json.loads((path / "classnames.json").read_text()),
            templates=json.loads((path / "templates.json").read_text()),
            path=path,
        )


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
