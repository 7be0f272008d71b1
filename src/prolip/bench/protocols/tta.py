"""Test-time adaptation (:mod:`prolip.tta`) on the very same views of a class-balanced (optionally capped)
evaluation set; the scoring itself is :mod:`prolip.bench.tta`'s."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prolip.bench.harness import Cell, Group, GroupRequests, episode_requests, fit_requests
from prolip.bench.protocols.base import Protocol
from prolip.bench.spec import Experiment, ExperimentError, MethodSpec
from prolip.bench.tta import ZERO_SHOT, balanced_subset, run_tta_group, starts_from_fit
from prolip.constraints import INTEGER, POSITIVE_INT, Flag, Kind, Number, Schema
from prolip.episode import evaluation_images
from prolip.features.cache import Request
from prolip.methods import method_class
from prolip.tta import PROTOCOL_METHOD, available
from prolip.tta import create as create_test_time
from prolip.tta import method_class as test_time_class


@dataclass
class TestTimeSpec:
    """One test-time method of the tta protocol (:mod:`prolip.tta`) and the settings its entry gives."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)


# The tta section's own keys: test-time ProLIP's views per image (shared by every row), ratio, steps, lr and view
# seed, the evaluation cap, where a start W is fitted, and the other test-time methods to run beside it.
_TTA_OWN = ("views", "ratio", "steps", "lr", "seed", "max_images")


@dataclass
class TTA:
    """Test-time ProLIP (paper §4.6), always run from every method's W: views per image, confident ratio, AdamW
    steps/lr; ``methods`` lists other test-time methods run on the same views (TPT, ZERO, TDA, the view ensemble,
    plain zero-shot; :func:`prolip.tta.available`); ``max_images`` evaluates a class-balanced subset of the test set
    (CPU budgets)."""

    views: int = 64
    ratio: float = 0.1
    steps: int = 1
    lr: float = 1e-4
    seed: int = 0
    max_images: int | None = None
    train_on: str | None = None  # where a prolip start W is fitted (e.g. imagenet for its variants); default: itself
    methods: list[TestTimeSpec] = field(default_factory=list)

    def rows(self) -> list[TestTimeSpec]:
        """Every test-time method the protocol runs: test-time ProLIP first, then the listed ones."""
        return [TestTimeSpec(PROTOCOL_METHOD), *self.methods]

    def settings_for(self, spec: TestTimeSpec) -> dict[str, Any]:
        """A method's effective settings: the section's for those it shares, then its entry's own."""
        return {**{k: getattr(self, k) for k in test_time_class(spec.name).shared}, **spec.settings}

    def setting(self) -> dict[str, Any]:
        """What a TTA record says about its setting: the section's own keys; the flag of each method that is
        ``recorded_when_off`` (TPT, the view ensemble: false while off); each listed method's flag and its
        recorded settings as ``<name>_<setting>`` (ZERO's ``zero_gamma``, TDA's ``tda_orders``), exactly as the
        older flags were written, so records made before the methods list existed keep their cell ids."""
        listed = {spec.name for spec in self.methods}
        out: dict[str, Any] = {k: getattr(self, k) for k in _TTA_OWN}
        out.update({name: name in listed for name in available() if test_time_class(name).recorded_when_off})
        out["train_on"] = self.train_on
        for spec in self.methods:
            out[spec.name] = True
            out.update({f"{spec.name}_{k}": v for k, v in self._recorded(spec).items()})
        return out

    def _recorded(self, spec: TestTimeSpec) -> dict[str, Any]:
        """Settings the record names: those the method always records, and those its entry changes from what it
        would run with anyway (so an entry that restates a default is the same cell as one that does not)."""
        cls = test_time_class(spec.name)
        implied = {k: _plain(v) for k, v in {**cls.defaults(), **self.settings_for(TestTimeSpec(spec.name))}.items()}
        effective = {**implied, **{k: _plain(v) for k, v in spec.settings.items()}}
        return {k: v for k, v in effective.items() if k in cls.recorded or (k in spec.settings and v != implied[k])}


def _plain(value: Any) -> Any:
    """A setting as JSON holds it (tuples are lists), so a default and the same value read from a file agree."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


class TestTime(Protocol):
    """Test-time ProLIP from every method's projection (W0 for methods that learn nothing, zero-shot; a few-shot
    method's adapted W, fitted on ``tta.train_on`` or the dataset itself), and each other test-time method the
    experiment lists (TPT, ZERO, TDA, the no-update view ensemble, plain zero-shot), from W0."""

    name = "tta"
    metrics = ("accuracy", "start_accuracy", "accuracy_worst", "ece")
    section = "tta"

    @classmethod
    def section_schema(cls) -> Schema:
        """The section's own keys (ratio, steps and lr as test-time ProLIP constrains them), and the older flags:
        ``<name>: true`` and ``<name>_<setting>`` for every other registered test-time method."""
        shared = test_time_class(PROTOCOL_METHOD).constraints
        own = {
            "views": POSITIVE_INT,
            **{k: shared[k] for k in ("ratio", "steps", "lr")},
            "seed": INTEGER,
            "max_images": Number(low=1, integer=True, optional=True),
            "train_on": Kind((str,), "a dataset name", optional=True),
            "methods": Kind((list,), "a list of test-time methods"),
        }
        flags: dict[str, Any] = {}
        for name in _listable():
            flags[name] = Flag()
            flags.update({f"{name}_{k}": c for k, c in test_time_class(name).constraints.items()})
        return Schema({**own, **flags})

    @classmethod
    def parse_section(cls, raw: dict[str, Any], where: str) -> TTA:
        return _tta_section(raw, where)

    @classmethod
    def check(cls, exp: Experiment, where: str) -> None:
        if exp.tta.views < 1 or not 0 < exp.tta.ratio <= 1:
            raise ExperimentError(f"{where}: tta: 'views' must be ≥ 1 and 'ratio' in (0, 1]")
        _check_test_time_settings(exp.tta, f"{where}: tta")
        for i, m in enumerate(exp.methods):
            if not method_class(m.name).capabilities.exposes_projection:
                raise ExperimentError(
                    f"{where}: methods[{i}]: the tta protocol adapts a projection W, so it starts "
                    f"from a method that exposes one (zeroshot's W0, prolip's W), not {m.name!r}"
                )

    def groups(self) -> Iterator[Group]:
        t = self.exp.tta
        setting = {"tta": t.setting()}
        for dataset in self.exp.datasets:
            splits = self.b.splits(dataset)
            templates = self.b.templates(splits)
            cells = []
            for row in t.rows():
                from_fit = test_time_class(row.name).starts_from_fit
                for m, shots, seed in self._starts(row, from_fit):
                    spec = MethodSpec(m.name, f"{row.name}+{m.label}" if from_fit else m.label, m.hyperparameters)
                    rec = self.b.record(
                        spec, dataset=splits.name, shots=shots, seed=seed, templates=templates, setting=setting
                    )
                    cells.append(Cell(m, rec, extra={"test_time": row, "shots": shots, "seed": seed}))
            yield Group(dataset, 0, None, cells)

    def _starts(self, row: TestTimeSpec, from_fit: bool) -> list[tuple[MethodSpec, int, int | None]]:
        """Where a row's W comes from: for a method that ``starts_from_fit``, each method's own, per shots and seed
        when it learns (once, at 0 shots, when it does not); for any other, zero-shot CLIP's W0, once."""
        if not from_fit:
            return [(MethodSpec(ZERO_SHOT, row.name), 0, None)]
        return [
            (m, shots, seed)
            for m in self.exp.methods
            for shots, seed in (
                [(s, seed) for s in self.exp.shots for seed in self.exp.seeds]
                if method_class(m.name).capabilities.learns
                else [(0, None)]
            )
        ]

    def requests(self, group: Group, cells: list[Cell]) -> GroupRequests:
        """Cells that start from a fit fit on (``tta.train_on`` or the dataset, shots, seed); the ``tta.views``
        views of each evaluation image are then encoded once, directly, and shared by every cell, of which each
        reads the views its test-time method declares (what each would encode alone)."""
        t = self.exp.tta
        splits = self.b.splits(group.dataset)
        images = balanced_subset(evaluation_images(splits), t.max_images)
        out = GroupRequests(direct=[])
        for cell in cells:
            own: list[Request] = []
            if starts_from_fit(cell):
                train_on = self.b.splits(t.train_on or group.dataset)
                drawn, own = episode_requests(self.b, train_on, cell.extra["shots"], cell.extra["seed"])
                own = own + fit_requests(self.b, cell, drawn, out)
            out.per_cell.append(own)
            method = create_test_time(cell.extra["test_time"].name, **t.settings_for(cell.extra["test_time"]))
            assert out.direct is not None
            out.direct.append(len(images) * method.views_read(t.views, splits.name))
        out.direct_passes = len(images) * t.views
        out.direct_paths = [it.path for it in images.items]
        return out

    def score(self, group: Group, cells: list[Cell]) -> Iterator[tuple[Cell, float]]:
        yield from run_tta_group(self.b, group, cells)


def _check_test_time_settings(tta: TTA, where: str) -> None:
    """Each test-time method's settings (the section's it shares, its entry's own), by its constraints."""
    for spec in tta.rows():
        try:
            create_test_time(spec.name, **tta.settings_for(spec))
        except ValueError as e:
            raise ExperimentError(f"{where}: {spec.name}: bad settings: {e}") from None


# ---- the tta section, as the experiment file writes it ---------------------------------------------------------

# The section's own keys besides ``views`` ... ``max_images`` (_TTA_OWN, which records name): ``train_on`` and the
# ``methods`` list; any other key is an older flag.
_SECTION_KEYS = (*_TTA_OWN, "train_on", "methods")


def _listable() -> list[str]:
    """The test-time methods a file may list (test-time ProLIP always runs, so it is not one of them)."""
    return [n for n in available() if n != PROTOCOL_METHOD]


def _tta_section(raw: dict, where: str) -> TTA:
    """The tta section: its own keys, ``methods`` (each a name or a one-key mapping name → settings), and the
    older flags, read as the same list: ``<name>: true`` runs a method and ``<name>_<setting>: value`` sets one of
    its settings (``tpt: true``, ``zero: true``, ``zero_gamma: 0.5``, ``tda_orders: [1, 2]``)."""
    own = {k: v for k, v in raw.items() if k in _SECTION_KEYS}
    entries = own.pop("methods", None) or []
    methods = [_test_time_entry(e, f"{where}: methods[{i}]") for i, e in enumerate(entries)]
    flat = {k: v for k, v in raw.items() if k not in _SECTION_KEYS}
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
    names = _listable()
    flat_keys = {f"{n}_{p}": (n, p) for n in names for p in test_time_class(n).param_names()}
    settings: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key in flat_keys:
            name, param = flat_keys[key]
            if name in listed:
                raise ExperimentError(f"{where}: '{key}': set {name}'s {param} in its methods entry instead")
            settings.setdefault(name, {})[param] = value
    for name, given in settings.items():
        try:
            create_test_time(name, **given)
        except ValueError as e:
            raise ExperimentError(f"{where}: bad settings: {e}") from None
    return [TestTimeSpec(n, settings.get(n, {})) for n in names if flat.get(n) is True]


def _check_listed(methods: list[TestTimeSpec], where: str) -> None:
    known = _listable()
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
