"""What an experiment file says, once read: the datasets, methods, protocol and its sections (:mod:`experiment`
reads and checks the file; protocols and the harness read only these classes, so they never import the parser)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prolip.errors import ProlipError

DOMAIN_TARGETS = ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
SINGLE_TEMPLATE = ["a photo of a {}."]


class ExperimentError(ProlipError, ValueError):
    pass


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
        from prolip.tta import PROTOCOL_METHOD

        return [TestTimeSpec(PROTOCOL_METHOD), *self.methods]

    def settings_for(self, spec: TestTimeSpec) -> dict[str, Any]:
        """A method's effective settings: the section's for those it shares, then its entry's own."""
        from prolip.tta import method_class

        return {**{k: getattr(self, k) for k in method_class(spec.name).shared}, **spec.settings}

    def setting(self) -> dict[str, Any]:
        """What a TTA record says about its setting: the section's own keys; the flag of each method that is
        ``recorded_when_off`` (TPT, the view ensemble: false while off); each listed method's flag and its
        recorded settings as ``<name>_<setting>`` (ZERO's ``zero_gamma``, TDA's ``tda_orders``), exactly as the
        older flags were written, so records made before the methods list existed keep their cell ids."""
        from prolip.tta import available, method_class

        listed = {spec.name for spec in self.methods}
        out: dict[str, Any] = {k: getattr(self, k) for k in _TTA_OWN}
        out.update({name: name in listed for name in available() if method_class(name).recorded_when_off})
        out["train_on"] = self.train_on
        for spec in self.methods:
            out[spec.name] = True
            out.update({f"{spec.name}_{k}": v for k, v in self._recorded(spec).items()})
        return out

    def _recorded(self, spec: TestTimeSpec) -> dict[str, Any]:
        """Settings the record names: those the method always records, and those its entry changes from what it
        would run with anyway (so an entry that restates a default is the same cell as one that does not)."""
        from prolip.tta import method_class

        cls = method_class(spec.name)
        implied = {k: _plain(v) for k, v in {**cls.defaults(), **self.settings_for(TestTimeSpec(spec.name))}.items()}
        effective = {**implied, **{k: _plain(v) for k, v in spec.settings.items()}}
        return {k: v for k, v in effective.items() if k in cls.recorded or (k in spec.settings and v != implied[k])}


def _plain(value: Any) -> Any:
    """A setting as JSON holds it (tuples are lists), so a default and the same value read from a file agree."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


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
