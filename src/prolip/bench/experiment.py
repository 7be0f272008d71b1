"""Experiment files: a small YAML that names datasets × shots × seeds × methods × backbone for one protocol.

Validation is strict (unknown keys, wrong types, unknown methods or hyperparameters fail before any work starts, and
the message names the file and the key), because a typo in a sweep that runs for hours should cost seconds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from prolip.bench.spec import (  # the experiment's classes, read here and imported from here
    DOMAIN_TARGETS,
    SINGLE_TEMPLATE,
    TTA,
    Experiment,
    ExperimentError,
    MethodSpec,
    Sensitivity,
    TestTimeSpec,
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
    "train_on": (str, "a dataset name"),
    "methods": (list, "a list of test-time methods"),
}


# The sections of an experiment file (mappings of their own keys, which ``--set section.key=...`` reaches).
_SECTIONS = {k for k, (kind, _) in _TOP.items() if kind is dict}


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


def _tta_section(raw: dict, where: str) -> TTA:
    """The tta section: its own keys, ``methods`` (each a name or a one-key mapping name → settings), and the
    older flags, read as the same list: ``<name>: true`` runs a method and ``<name>_<setting>: value`` sets one of
    its settings (``tpt: true``, ``zero: true``, ``zero_gamma: 0.5``, ``tda_orders: [1, 2]``)."""
    own = {k: v for k, v in raw.items() if k in _TTA}
    _check_section(own, _TTA, where)
    entries = own.pop("methods", None) or []
    methods = [_test_time_entry(e, f"{where}: methods[{i}]") for i, e in enumerate(entries)]
    flat = {k: v for k, v in raw.items() if k not in _TTA}
    if flat:
        methods += _flagged(flat, {m.name for m in methods}, where)
    if methods:
        _check_listed(methods, where)
    return TTA(**own, methods=methods)


def _test_time_entry(entry: Any, where: str) -> TestTimeSpec:
    if isinstance(entry, str):
        return TestTimeSpec(entry)
    if isinstance(entry, dict) and len(entry) == 1:
        ((name, settings),) = entry.items()
        if isinstance(name, str) and (settings is None or isinstance(settings, dict)):
            return TestTimeSpec(name, dict(settings or {}))
    raise ExperimentError(
        f"{where}: each test-time method is a name or a one-key mapping name → settings (e.g. "
        f"{{tda: {{orders: [1, 2, 3]}}}}), got {entry!r}"
    )


def _flagged(flat: dict, listed: set[str], where: str) -> list[TestTimeSpec]:
    """The methods the older flags switch on, in the order registered, with their ``<name>_<setting>`` settings.
    Settings of a method left off are checked, then unused (as ``zero_gamma`` was without ``zero: true``)."""
    from prolip.tta import PROTOCOL_METHOD, available, create, method_class

    names = [n for n in available() if n != PROTOCOL_METHOD]
    flat_keys = {f"{n}_{p}": (n, p) for n in names for p in method_class(n).param_names()}
    unknown = sorted(k for k in flat if k not in names and k not in flat_keys)
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {unknown}; known keys: {sorted([*_TTA, *names, *flat_keys])}")
    settings: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in names and not isinstance(value, bool):
            raise ExperimentError(f"{where}: '{key}' must be true or false, got {value!r}")
        if key in flat_keys:
            name, param = flat_keys[key]
            if name in listed:
                raise ExperimentError(f"{where}: '{key}': set {name}'s {param} in its methods entry instead")
            settings.setdefault(name, {})[param] = value
    for name, given in settings.items():
        try:
            create(name, **given)
        except ValueError as e:
            raise ExperimentError(f"{where}: bad settings: {e}") from None
    return [TestTimeSpec(n, settings.get(n, {})) for n in names if flat.get(n) is True]


def _check_listed(methods: list[TestTimeSpec], where: str) -> None:
    from prolip.tta import PROTOCOL_METHOD, available

    known = [n for n in available() if n != PROTOCOL_METHOD]
    names = [m.name for m in methods]
    for i, name in enumerate(names):
        if name == PROTOCOL_METHOD:
            raise ExperimentError(
                f"{where}: methods[{i}]: {name!r} always runs, from every method's W; set its views, ratio, steps "
                "and lr in the tta section itself"
            )
        if name not in known:
            raise ExperimentError(
                f"{where}: methods[{i}]: unknown test-time method {name!r}; choose from {', '.join(known)}"
            )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ExperimentError(f"{where}: test-time method(s) {twice} listed twice (once in methods, or as a flag)")


def _apply_overrides(raw: dict, overrides: dict, source: str) -> dict:
    """``--set`` values; a dotted key (``tta.views``) sets a key of a section."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in overrides.items():
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in _SECTIONS:
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
    tta = _tta_section(raw.pop("tta", None) or {}, f"{source}: tta")
    exp = Experiment(methods=methods, sensitivity=sensitivity, tta=tta, **raw)
    return _check_values(exp, source)


def _check_values(exp: Experiment, source: str) -> Experiment:
    """The checks every experiment passes, then its protocol's own (:meth:`Protocol.check`); returns the experiment
    as its protocol runs it (:meth:`Protocol.settle`)."""
    from prolip.bench.protocols import available, protocol_class

    if exp.protocol not in available():
        raise ExperimentError(f"{source}: 'protocol' must be one of {', '.join(available())}, got {exp.protocol!r}")
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
    protocol = protocol_class(exp.protocol)
    protocol.check(exp, source)
    return protocol.settle(exp)


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
    "TTA",
    "Experiment",
    "ExperimentError",
    "MethodSpec",
    "Sensitivity",
    "TestTimeSpec",
    "load_experiment",
    "load_yaml",
    "parse_experiment",
]
