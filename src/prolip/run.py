"""A saved run: a small directory holding everything needed to predict with, and reproduce, an adaptation.

Layout::

    run/
      manifest.json          # provenance + hyperparameters + metrics (see Run.manifest and MANIFEST_SCHEMA)
      method.safetensors     # the fitted method's tensors (ProLIP: adapted W, W0, bias)
      classifier.safetensors # the frozen text classifier T [C, D]
      classnames.json, templates.json
      README.md              # the run card (prolip.runcard): optional, runs written before it have none

Writes go through :mod:`prolip.outputs`: atomic (assembled under a temporary name beside the target and renamed
into place, so an interrupted ``fit`` never leaves a half-written run), never over anything but an empty folder
or an earlier run, and one writer at a time. Loads validate everything in one place (:func:`validate_run`), so a
damaged or tampered run is a RunError naming the file and key, never a crash further on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prolip.constraints import INTEGER, TEXT, Constraint, Number, Schema
from prolip.data.folder import DataError, check_classnames, check_template
from prolip.errors import RunError
from prolip.outputs import RUN_CARD, RUN_FORMAT, write_directory

FORMAT = RUN_FORMAT
RUN_FILES = ("manifest.json", "method.safetensors", "classifier.safetensors", "classnames.json", "templates.json")


# The manifest keys every run has, with their constraints (:mod:`prolip.constraints`, the language hyperparameters
# and experiment files are checked in): what predict, eval, export and the pipeline read back. Other keys (data,
# metrics, skipped images, versions, the site) are provenance that varies between versions, so every level is open.
def _object(fields: dict[str, Constraint]) -> Schema:
    """A manifest object: every field it names required, other keys (provenance) allowed."""
    damaged = "is missing; the run is damaged or not a prolip run"
    return Schema(fields, required=tuple(fields), open=True, noun="an object", missing=damaged)


MANIFEST_SCHEMA = _object(
    {
        "format": TEXT,
        "backbone": _object({"family": TEXT, "arch": TEXT, "weights": TEXT, "fingerprint": TEXT}),
        "method": _object({"method": TEXT, "hyperparameters": _object({})}),
        "fit": _object({"shots": INTEGER}),
        "logit_scale": Number(low=0, open_low=True),
    }
)


@dataclass
class Run:
    manifest: dict[str, Any]
    method_state: dict[str, torch.Tensor]
    classifier: torch.Tensor
    classnames: list[str]
    templates: list[str]
    path: Path | None = None
    extra_json: dict[str, Any] = field(default_factory=dict)
    card: str | None = None  # README.md: the run card, for people (nothing is ever read back from it)
    _backbones: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # per device, once loaded

    @property
    def method_name(self) -> str:
        return self.manifest["method"]["method"]

    def backbone(self, device: str = "cpu"):
        """The backbone this run was fitted on, rebuilt from the manifest (once per device); other weights than the
        run's are a RunError."""
        if device not in self._backbones:
            from prolip.inference import backbone_for_run  # inference builds on Run, so it is imported on use

            self._backbones[device] = backbone_for_run(self, device)
        return self._backbones[device]

    def predict(self, paths: Iterable[Path | str], *, top_k: int = 5, tta=None, backbone=None, device: str = "cpu"):
        """The ``top_k`` classes of each image file with their probabilities (``prolip predict``); ``tta`` (a
        :class:`prolip.tta.TTAConfig`) adapts the run's W per image first. ``backbone`` defaults to the run's own."""
        from prolip.inference import predict

        backbone = self.backbone(device) if backbone is None else backbone
        return predict(self, list(paths), top_k=top_k, tta=tta, backbone=backbone)

    def save(self, out: Path | str, *, force: bool = False, data_paths: Iterable[Path | str] = ()) -> Path:
        """Write the run to ``out``; RunError (a ValueError) naming the tensor or key if it could not be loaded.

        ``force`` replaces an existing run (or empty folder) there, nothing else; ``data_paths`` are the data
        this run was fitted on, which ``out`` may not be, be inside or contain.
        """
        out = Path(out)
        validate_run(self, out, manifest={"format": FORMAT, **self.manifest})
        for name in self.extra_json:
            if name in RUN_FILES or "/" in name or not name.endswith(".json"):
                raise ValueError(f"extra run file {name!r} must be a plain *.json name other than {RUN_FILES}")
        write_directory(out, self._write_files, force=force, data_paths=data_paths, kind="run")
        self.path = out
        return out

    def _write_files(self, folder: Path) -> None:
        _write_json(folder / "manifest.json", {"format": FORMAT, **self.manifest})
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.method_state.items()}, str(folder / "method.safetensors")
        )
        save_file({"classifier": self.classifier.detach().contiguous().cpu()}, str(folder / "classifier.safetensors"))
        _write_json(folder / "classnames.json", self.classnames)
        _write_json(folder / "templates.json", self.templates)
        for name, obj in self.extra_json.items():
            _write_json(folder / name, obj)
        if self.card is not None:
            (folder / RUN_CARD).write_text(self.card, encoding="utf-8")

    @classmethod
    def load(cls, path: Path | str) -> Run:
        path = Path(path)
        _require_complete(path)
        classifier = _read_tensors(path / "classifier.safetensors")
        if "classifier" not in classifier:
            raise RunError(f"{path / 'classifier.safetensors'} has no 'classifier' tensor")
        run = cls(
            manifest=_read_json(path / "manifest.json"),
            method_state=_read_tensors(path / "method.safetensors"),
            classifier=classifier["classifier"],
            classnames=_read_json(path / "classnames.json"),
            templates=_read_json(path / "templates.json"),
            path=path,
            card=_read_card(path),
        )
        validate_run(run, path)
        return run


# ---- validation: the one place that decides what a run may hold -----------------------------------------------


def validate_run(run: Run, where: Path, *, manifest: dict | None = None) -> None:
    """Raise RunError naming the file and key at fault, for a run as loaded from (or about to be saved to) ``where``.

    Checks the manifest schema, class names (distinct strings), templates (one ``{}`` each), the classifier's
    shape [C, D] against the class names, and that no tensor holds NaN or Inf. Per-method tensor shapes are the
    methods' own business (``load_state_dict``).
    """
    manifest = run.manifest if manifest is None else manifest
    _check_manifest(manifest, where / "manifest.json")
    try:
        check_classnames(run.classnames, str(where / "classnames.json"))
        _check_templates(run.templates, str(where / "templates.json"))
    except DataError as e:
        raise RunError(str(e)) from None
    _check_classifier(run.classifier, len(run.classnames), where / "classifier.safetensors")
    _check_finite(run.method_state, where / "method.safetensors")


def _check_manifest(manifest: Any, file: Path) -> None:
    if not isinstance(manifest, dict):
        raise RunError(f"{file}: expected a JSON object, got a {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise RunError(f"{file}: unknown run format {manifest.get('format')!r} (expected {FORMAT})")
    found = MANIFEST_SCHEMA.find(manifest)
    if found is not None:
        path, problem = found  # never the keys of an object: every one is open
        raise RunError(f"{file}: key '{'.'.join(path)}' {problem}")


def _check_templates(templates: Any, where: str) -> None:
    if not isinstance(templates, list) or not templates:
        raise DataError(f"{where}: templates must be a non-empty list of strings, got {templates!r:.80}")
    for i, t in enumerate(templates):
        check_template(t, f"{where}, template {i}")


def _check_classifier(classifier: Any, num_classes: int, file: Path) -> None:
    if not isinstance(classifier, torch.Tensor) or classifier.dim() != 2:
        shape = tuple(classifier.shape) if isinstance(classifier, torch.Tensor) else type(classifier).__name__
        raise RunError(f"{file}: tensor 'classifier' must be 2-D [classes, dim], got {shape}")
    if classifier.shape[0] != num_classes:
        raise RunError(
            f"{file}: tensor 'classifier' has {classifier.shape[0]} rows but there are {num_classes} class names"
        )
    _check_finite({"classifier": classifier}, file)


def _check_finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise RunError(f"{file}: '{name}' is a {type(t).__name__}, not a tensor")
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise RunError(
                f"{file}: tensor '{name}' holds NaN or Inf values; a run must hold finite numbers "
                f"(a diverged fit? lower the learning rate)"
            )


# ---- files -------------------------------------------------------------------------------------------------------


def _require_complete(path: Path) -> None:
    if not path.is_dir():
        aside = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if aside:
            raise RunError(
                f"run directory {path} does not exist, but an interrupted overwrite left the previous "
                f"run at {aside[-1]}: rename it to {path} to use it"
            )
        raise RunError(f"run directory {path} does not exist (create one with `prolip fit ... --out {path}`)")
    for needed in RUN_FILES:
        if not (path / needed).is_file():  # is_file(): a FIFO in its place is missing too, never opened
            raise RunError(f"{path} is not a complete prolip run: {needed} is missing")


def _read_card(path: Path) -> str | None:
    card = path / RUN_CARD
    if not card.is_file():  # is_file(): a FIFO in its place is no card, never opened
        return None
    return card.read_text(encoding="utf-8", errors="replace")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RunError(f"{path} is not valid JSON ({e}); the run is damaged: fit it again") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    # safetensors only: a run file is never unpickled, so a tampered run cannot execute code.
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError for foreign or cut files
        raise RunError(f"{path} is not a valid safetensors file ({e}); the run is damaged: fit it again") from None


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
