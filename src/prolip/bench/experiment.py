"""Experiment files: a small YAML that names datasets × shots × seeds × methods × backbone for one protocol."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PROTOCOLS = ("fewshot", "base2new")


class ExperimentError(ValueError):
    pass


@dataclass
class MethodSpec:
    name: str
    label: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Experiment:
    datasets: list[str]
    methods: list[MethodSpec]
    protocol: str = "fewshot"
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    data_root: str | None = None
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    views: int = 300
    sampler: str = "lpp"
    validation: bool = False
    cache_dir: str | None = None
    out: str = "results"


_TYPES = {"datasets": list, "methods": list, "protocol": str, "model": str, "pretrained": str, "data_root": str,
          "shots": list, "seeds": list, "views": int, "sampler": str, "validation": bool, "cache_dir": str,
          "out": str}


def _method(entry: Any, where: str) -> MethodSpec:
    if isinstance(entry, str):
        return MethodSpec(entry, entry)
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        hp = {k: v for k, v in entry.items() if k not in ("name", "label")}
        return MethodSpec(entry["name"], str(entry.get("label", entry["name"])), hp)
    raise ExperimentError(f"{where}: each method is a name or a mapping with 'name' (and hyperparameters)")


def parse_experiment(raw: dict, source: str = "<experiment>", overrides: dict | None = None) -> Experiment:
    from prolip.methods import available

    raw = {**(raw or {}), **(overrides or {})}
    unknown = sorted(set(raw) - set(_TYPES))
    if unknown:
        raise ExperimentError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(_TYPES)}")
    for key, value in raw.items():
        expected = _TYPES[key]
        if value is not None and not (isinstance(value, expected) and not (expected is int and isinstance(value, bool))):
            raise ExperimentError(f"{source}: '{key}' must be a {expected.__name__}, got {value!r}")
    for key in ("datasets", "methods"):
        if not raw.get(key):
            raise ExperimentError(f"{source}: '{key}' is required and must not be empty")
    methods = [_method(m, f"{source}: methods[{i}]") for i, m in enumerate(raw.pop("methods"))]
    known = set(available())
    for m in methods:
        if m.name not in known:
            raise ExperimentError(f"{source}: unknown method {m.name!r}; choose from {sorted(known)}")
    exp = Experiment(methods=methods, **raw)
    if exp.protocol not in PROTOCOLS:
        raise ExperimentError(f"{source}: protocol must be one of {PROTOCOLS}, got {exp.protocol!r}")
    if any(not isinstance(s, int) or s <= 0 for s in exp.shots):
        raise ExperimentError(f"{source}: 'shots' must be positive integers, got {exp.shots}")
    if exp.sampler not in ("lpp", "coop"):
        raise ExperimentError(f"{source}: 'sampler' must be 'lpp' or 'coop', got {exp.sampler!r}")
    return exp


def load_experiment(path: Path | str, overrides: dict | None = None) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of keys at the top level")
    return parse_experiment(raw, str(path), overrides)
