"""Experiment files: a small YAML that names datasets × shots × seeds × methods × backbone for one protocol.

Validation is strict (unknown keys, wrong types, unknown methods or hyperparameters fail before any work starts, and
the message names the file and the key), because a typo in a sweep that runs for hours should cost seconds.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prolip.errors import ProlipError

PROTOCOLS = ("fewshot", "fewshot-val", "sensitivity", "base2new", "cross-dataset", "domain-generalisation", "tta")
DOMAIN_TARGETS = ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
SINGLE_TEMPLATE = ["a photo of a {}."]


class ExperimentError(ProlipError, ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str):
    """YAML as experiment files, ``--set`` and ``--hp`` values are read: safe, with ``1e-5`` a number."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class MethodSpec:
    name: str
    label: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    group: str | None = None  # entries sharing a group also get an averaged row in the report (e.g. over lr)


@dataclass
class Sensitivity:
    """The lr × λ sweep of the paper's sensitivity figure, trained batched (one computation per support set); steps
    and precision come from each prolip entry of ``methods``."""

    lrs: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    lams: list[float] = field(default_factory=lambda: [0.0, 1e-2, 1e-1, 1.0])


@dataclass
class TTA:
    """Test-time ProLIP (paper §4.6): views per image, confident ratio, AdamW steps/lr; optional TPT and view-ensemble
    rows on the same views; ``max_images`` evaluates a class-balanced subset of the test set (CPU budgets)."""

    views: int = 64
    ratio: float = 0.1
    steps: int = 1
    lr: float = 1e-4
    seed: int = 0
    max_images: int | None = None
    tpt: bool = False
    ensemble: bool = False
    train_on: str | None = None  # where a prolip start W is fitted (e.g. imagenet for its variants); default: itself
    zeroshot: bool = False  # a plain zero-shot row (view 0, W0: no adaptation) beside the adapted ones
    zero: bool = False  # ZERO's row: the confident views' argmax vote (prolip.tta_methods)
    zero_gamma: float = 0.3  # ZERO's share of confident views (ttas/zero.py:23)
    tda: bool = False  # TDA's row: dynamic caches over a test stream, per-dataset settings
    tda_orders: list[int] = field(default_factory=lambda: [1, 2, 3])  # seeds of the stream orders TDA runs

    def setting(self) -> dict[str, Any]:
        """What a TTA record says about its setting: every key, except those of the zero-shot, ZERO and TDA rows
        while those rows are off (so records written before they existed keep their cell ids)."""
        out = asdict(self)
        optional_rows = (("zeroshot", ("zeroshot",)), ("zero", ("zero", "zero_gamma")), ("tda", ("tda", "tda_orders")))
        for row, keys in optional_rows:
            if not out[row]:
                for key in keys:
                    out.pop(key)
        return out


@dataclass
class Experiment:
    datasets: list[str]
    methods: list[MethodSpec]
    protocol: str = "fewshot"
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    device: str = "cpu"
    data_root: str | None = None
    targets: list[str] | None = None  # cross-dataset / domain generalisation: where the adapted model is evaluated
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    views: int = 300
    aug_seed: int = 0
    sampler: str = "lpp"
    validation: bool = False
    templates: str | list[str] = "dataset"  # "dataset" (per-dataset templates), "single" ("a photo of a {}.") or a list
    allow_fewer: bool = False
    cache_dir: str | None = None
    batch_size: int = 64
    workers: int = 0
    on_bad_image: str = "error"
    out: str = "results"
    description: str = ""
    sensitivity: Sensitivity = field(default_factory=Sensitivity)
    tta: TTA = field(default_factory=TTA)

    def templates_for(self, dataset_templates: list[str]) -> tuple[str, list[str]]:
        """(name recorded with results, template list) for a dataset."""
        if self.templates == "dataset":
            return "dataset", list(dataset_templates)
        if self.templates == "single":
            return "single", list(SINGLE_TEMPLATE)
        return "custom", list(self.templates)


# key -> (accepted types, description for the message)
_NUM = (int, float)
_TOP = {
    "datasets": ("list[str]", "a list of dataset names or folders"),
    "methods": (list, "a list of methods"),
    "protocol": (str, "a string"),
    "model": (str, "a string"),
    "pretrained": (str, "a string"),
    "device": (str, "a string"),
    "data_root": (str, "a path"),
    "targets": ("list[str]", "a list of dataset names"),
    "shots": ("list[int]", "a list of positive integers"),
    "seeds": ("list[int]", "a list of integers"),
    "views": (int, "an integer"),
    "aug_seed": (int, "an integer"),
    "sampler": (str, "'lpp' or 'coop'"),
    "validation": (bool, "true or false"),
    "templates": ("templates", "'dataset', 'single' or a list of templates"),
    "allow_fewer": (bool, "true or false"),
    "cache_dir": (str, "a path"),
    "batch_size": (int, "an integer"),
    "workers": (int, "an integer"),
    "on_bad_image": (str, "'error' or 'skip'"),
    "out": (str, "a path"),
    "description": (str, "a string"),
    "sensitivity": (dict, "a mapping"),
    "tta": (dict, "a mapping"),
}
_SENSITIVITY = {"lrs": ("list[num]", "a list of numbers"), "lams": ("list[num]", "a list of numbers")}
_TTA = {
    "views": (int, "an integer"),
    "ratio": (_NUM, "a number"),
    "steps": (int, "an integer"),
    "lr": (_NUM, "a number"),
    "seed": (int, "an integer"),
    "max_images": (int, "an integer"),
    "tpt": (bool, "true or false"),
    "ensemble": (bool, "true or false"),
    "train_on": (str, "a dataset name"),
    "zeroshot": (bool, "true or false"),
    "zero": (bool, "true or false"),
    "zero_gamma": (_NUM, "a number"),
    "tda": (bool, "true or false"),
    "tda_orders": ("list[int]", "a list of integer seeds"),
}


def _type_ok(value: Any, kind: Any) -> bool:
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "list[int]":
        return isinstance(value, list) and all(is_int(v) for v in value)
    if kind == "list[num]":
        return isinstance(value, list) and all(is_num(v) for v in value)
    if kind == "templates":
        return value in ("dataset", "single") or (
            isinstance(value, list) and bool(value) and all(isinstance(v, str) and "{}" in v for v in value)
        )
    if kind is int:
        return is_int(value)
    if kind is _NUM:
        return is_num(value)
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, kind)


def _check_section(raw: dict, schema: dict, where: str) -> None:
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(schema)}")
    for key, value in raw.items():
        kind, what = schema[key]
        if value is not None and not _type_ok(value, kind):
            raise ExperimentError(f"{where}: '{key}' must be {what}, got {value!r}")


def _method(entry: Any, where: str) -> MethodSpec:
    if isinstance(entry, str):
        return MethodSpec(entry, entry)
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        hp = {k: v for k, v in entry.items() if k not in ("name", "label", "group")}
        group = entry.get("group")
        if group is not None and not isinstance(group, str):
            raise ExperimentError(f"{where}: 'group' must be a string, got {group!r}")
        return MethodSpec(entry["name"], str(entry.get("label", entry["name"])), hp, group)
    raise ExperimentError(
        f"{where}: each method is a name or a mapping with 'name' (and hyperparameters), got {entry!r}"
    )


def _apply_overrides(raw: dict, overrides: dict, source: str) -> dict:
    """``--set`` values; a dotted key (``tta.views``) sets a key of a section."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in overrides.items():
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in ("sensitivity", "tta"):
                raise ExperimentError(f"{source}: --set {key}: only the 'sensitivity' and 'tta' sections have sub-keys")
            current = raw.get(section) or {}
            if not isinstance(current, dict):
                raise ExperimentError(f"{source}: '{section}' must be a mapping, got {current!r}")
            raw[section] = {**current, sub: value}
        else:
            raw[key] = value
    return raw


def parse_experiment(raw: dict, source: str = "<experiment>", overrides: dict | None = None) -> Experiment:
    from prolip.methods import available, create

    if raw is not None and not isinstance(raw, dict):
        raise ExperimentError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    raw = _apply_overrides(raw or {}, overrides or {}, source)
    _check_section(raw, _TOP, source)
    _check_section(raw.get("sensitivity") or {}, _SENSITIVITY, f"{source}: sensitivity")
    _check_section(raw.get("tta") or {}, _TTA, f"{source}: tta")
    for key in ("datasets", "methods"):
        if not raw.get(key):
            raise ExperimentError(f"{source}: '{key}' is required and must not be empty")
    raw = {k: v for k, v in raw.items() if v is not None or k in ("data_root", "cache_dir", "targets")}
    methods = [_method(m, f"{source}: methods[{i}]") for i, m in enumerate(raw.pop("methods"))]
    known = set(available())
    for i, m in enumerate(methods):
        if m.name not in known:
            raise ExperimentError(f"{source}: methods[{i}]: unknown method {m.name!r}; choose from {sorted(known)}")
        try:
            create(m.name, **m.hyperparameters)
        except ValueError as e:
            raise ExperimentError(f"{source}: methods[{i}] ({m.label}): bad hyperparameters: {e}") from None
    labels = [m.label for m in methods]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ExperimentError(
            f"{source}: method label(s) {duplicates} appear twice; give each variant a distinct 'label'"
        )
    sensitivity = Sensitivity(**(raw.pop("sensitivity", None) or {}))
    tta = TTA(**(raw.pop("tta", None) or {}))
    exp = Experiment(methods=methods, sensitivity=sensitivity, tta=tta, **raw)
    _check_values(exp, source)
    return exp


def _check_values(exp: Experiment, source: str) -> None:
    from prolip.methods import method_class

    if exp.protocol not in PROTOCOLS:
        raise ExperimentError(f"{source}: 'protocol' must be one of {', '.join(PROTOCOLS)}, got {exp.protocol!r}")
    if any(s <= 0 for s in exp.shots) or not exp.shots:
        raise ExperimentError(f"{source}: 'shots' must be positive integers, got {exp.shots}")
    if not exp.seeds:
        raise ExperimentError(f"{source}: 'seeds' must not be empty")
    if exp.sampler not in ("lpp", "coop"):
        raise ExperimentError(f"{source}: 'sampler' must be 'lpp' or 'coop', got {exp.sampler!r}")
    if exp.on_bad_image not in ("error", "skip"):
        raise ExperimentError(f"{source}: 'on_bad_image' must be 'error' or 'skip', got {exp.on_bad_image!r}")
    for key in ("views", "batch_size"):
        if getattr(exp, key) <= 0:
            raise ExperimentError(f"{source}: '{key}' must be positive, got {getattr(exp, key)}")
    if exp.protocol == "cross-dataset" and not exp.targets:
        raise ExperimentError(f"{source}: protocol cross-dataset needs 'targets' (the datasets to evaluate on)")
    if exp.protocol in ("cross-dataset", "domain-generalisation") and len(exp.datasets) != 1:
        raise ExperimentError(
            f"{source}: protocol {exp.protocol} trains on one source dataset; 'datasets' has {len(exp.datasets)}"
        )
    if exp.protocol == "sensitivity":
        if not exp.sensitivity.lrs or not exp.sensitivity.lams:
            raise ExperimentError(f"{source}: sensitivity: 'lrs' and 'lams' must not be empty")
        for i, m in enumerate(exp.methods):
            swept = {"lr", "lam"}
            if not swept <= set(method_class(m.name).param_names()) or (swept | {"grid"}) & set(m.hyperparameters):
                raise ExperimentError(
                    f"{source}: methods[{i}] ({m.label}): the sensitivity protocol sweeps a "
                    f"method's lr and lam (set them under 'sensitivity'): list methods that have "
                    f"both, without setting them or a grid"
                )
    if exp.protocol == "tta":
        if exp.tta.views < 1 or not 0 < exp.tta.ratio <= 1:
            raise ExperimentError(f"{source}: tta: 'views' must be ≥ 1 and 'ratio' in (0, 1]")
        if not 0 < exp.tta.zero_gamma <= 1 or (exp.tta.tda and not exp.tta.tda_orders):
            raise ExperimentError(
                f"{source}: tta: 'zero_gamma' must be in (0, 1] and 'tda_orders' must list at least one seed"
            )
        for i, m in enumerate(exp.methods):
            if not method_class(m.name).exposes_projection:
                raise ExperimentError(
                    f"{source}: methods[{i}]: the tta protocol adapts a projection W, so it starts "
                    f"from a method that exposes one (zeroshot's W0, prolip's W), not {m.name!r}"
                )


def load_experiment(path: Path | str, overrides: dict | None = None) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of keys at the top level")
    return parse_experiment(raw, str(path), overrides)
