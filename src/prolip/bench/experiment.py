"""Experiment files: a small YAML that names datasets × shots × seeds × methods × backbone for one protocol.

Validation is strict (unknown keys, wrong types, unknown methods or hyperparameters fail before any work starts, and
the message names the file and the key), because a typo in a sweep that runs for hours should cost seconds. The keys
are one :class:`~prolip.constraints.Schema`, in the constraint language hyperparameters are checked in; a
protocol's own section (its name, keys and reading) is the protocol's (:attr:`Protocol.section`), never named here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from prolip.bench.spec import (  # the experiment's classes, read here and imported from here
    DOMAIN_TARGETS,
    SINGLE_TEMPLATE,
    Experiment,
    ExperimentError,
    MethodSpec,
)
from prolip.constraints import (
    INTEGER,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    TEXT,
    Choice,
    Either,
    Flag,
    Kind,
    ListOf,
    Schema,
    Template,
)


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


def experiment_schema() -> Schema:
    """Every key an experiment file may hold, with its constraint (:mod:`prolip.constraints`, the language
    hyperparameters are checked in), and each registered protocol's section under the name the protocol gives it."""
    from prolip.backbones.base import SITES
    from prolip.bench.protocols import available, protocol_class  # the registry, filled by importing it
    from prolip.choices import ON_BAD_IMAGE, SAMPLERS

    sections = (protocol_class(name) for name in available())
    sites = f"{', '.join(SITES)} or a list of them"
    return Schema(
        {
            "datasets": ListOf(TEXT, "a list of dataset names or folders", non_empty=True),
            "methods": ListOf(Kind((object,), "a method"), "a list of methods", non_empty=True),
            "protocol": TEXT,  # one of the registered names, checked once the registry is loaded
            "model": TEXT,
            "pretrained": TEXT,
            "device": TEXT,
            "data_root": Kind((str,), "a path", optional=True),
            "targets": ListOf(TEXT, "a list of dataset names", optional=True),
            "shots": ListOf(POSITIVE_INT, "a list of positive integers", non_empty=True),
            "seeds": ListOf(INTEGER, "a list of integers", non_empty=True),
            "views": POSITIVE_INT,
            "aug_seed": INTEGER,
            "sampler": Choice(SAMPLERS),
            "validation": Flag(),
            "templates": Either(
                (Choice(("dataset", "single")), ListOf(Template(), "templates", non_empty=True)),
                "'dataset', 'single' or a list of templates holding '{}'",
            ),
            "allow_fewer": Flag(),
            "cache_dir": Kind((str,), "a path", optional=True),
            "batch_size": POSITIVE_INT,
            "workers": NON_NEGATIVE_INT,
            "on_bad_image": Choice(ON_BAD_IMAGE),
            "out": Kind((str,), "a path"),
            "description": TEXT,
            "site": Either((Choice(SITES), ListOf(Choice(SITES), "sites", non_empty=True)), f"one of {sites}"),
            **{p.section: p.section_schema() for p in sections if p.section},
        },
        required=("datasets", "methods"),
        missing="is required and must not be empty",
    )


# Keys whose null is a value of their own (no data root, no cache folder, no targets); any other null key means
# "the default", as if it were left out.
_NULLABLE = ("data_root", "cache_dir", "targets")


def _fault(where: str, path: tuple[str, ...], problem: str) -> ExperimentError:
    """One line naming the file, the section and the key at fault (``t.yaml: tta: 'views' must be ...``)."""
    *sections, last = path or ("",)
    where = ": ".join([where, *sections])
    return ExperimentError(f"{where}: '{last}' {problem}" if last else f"{where}: {problem}")


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


def _apply_overrides(raw: dict, overrides: dict, source: str, sections: list[str]) -> dict:
    """``--set`` values; a dotted key (``tta.views``) sets a key of a protocol's section."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in overrides.items():
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in sections:
                named = " and ".join(", ".join(map(repr, sections)).rsplit(", ", 1))
                raise ExperimentError(f"{source}: --set {key}: only the {named} sections have sub-keys")
            current = raw.get(section) or {}
            if not isinstance(current, dict):
                raise ExperimentError(f"{source}: '{section}' must be a mapping, got {current!r}")
            raw[section] = {**current, sub: value}
        else:
            raw[key] = value
    return raw


def _methods(entries: list, source: str) -> list[MethodSpec]:
    """The methods list: each a registered method with hyperparameters it accepts, each label once."""
    from prolip.methods import available, create

    methods = [_method(m, f"{source}: methods[{i}]") for i, m in enumerate(entries)]
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
    return methods


def parse_experiment(raw: dict, source: str = "<experiment>", overrides: dict | None = None) -> Experiment:
    """The experiment a file's mapping says, checked against :func:`experiment_schema`, then by its protocol
    (:meth:`Protocol.check`), as its protocol runs it (:meth:`Protocol.settle`)."""
    from prolip.bench.protocols import available, protocol_class

    if raw is not None and not isinstance(raw, dict):
        raise ExperimentError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    protocols = [protocol_class(name) for name in available()]
    owners = {p.section: p for p in protocols if p.section}
    raw = _apply_overrides(raw or {}, overrides or {}, source, list(owners))
    raw = {k: v for k, v in raw.items() if v is not None or k in _NULLABLE}
    found = experiment_schema().find(raw)
    if found is not None:
        raise _fault(source, *found)
    sites = raw.get("site")
    if isinstance(sites, list) and len(set(sites)) < len(sites):
        raise ExperimentError(f"{source}: 'site' lists a site twice: {sites}")
    protocol = raw.get("protocol", Experiment.protocol)
    if protocol not in available():
        raise ExperimentError(f"{source}: 'protocol' must be one of {', '.join(available())}, got {protocol!r}")
    methods = _methods(raw.pop("methods"), source)
    sections = {name: p.parse_section(raw.pop(name, {}), f"{source}: {name}") for name, p in owners.items()}
    exp = Experiment(methods=methods, sections=sections, **raw)
    chosen = protocol_class(exp.protocol)
    chosen.check(exp, source)
    return chosen.settle(exp)


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


__all__ = [
    "DOMAIN_TARGETS",
    "SINGLE_TEMPLATE",
    "Experiment",
    "ExperimentError",
    "MethodSpec",
    "experiment_schema",
    "load_experiment",
    "load_yaml",
    "parse_experiment",
]
