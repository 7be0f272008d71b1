"""What an experiment file says, once read: the datasets, methods, protocol and the protocols' sections
(:mod:`experiment` reads and checks the file; protocols and the harness read only these classes, so they never
import the parser; a section's own class is its protocol's)."""

from __future__ import annotations

import dataclasses
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
    # Where W sits in the image tower (prolip.backbones.SITES); a list runs the whole experiment once per site.
    site: str | list[str] = "native"
    # Each protocol's own section as it reads it, by the section's name (:attr:`Protocol.section`): every registered
    # protocol's, the file's or its defaults.
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """A protocol's section, read as an attribute (``exp.tta``); only called for names the class lacks."""
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r} (nor a section of that name)")

    @property
    def sites(self) -> list[str]:
        return [self.site] if isinstance(self.site, str) else list(self.site)

    def per_site(self) -> list[Experiment]:
        """The experiment once per site it names, each at one site (what one backbone, one Bench, runs)."""
        return [dataclasses.replace(self, site=site) for site in self.sites]

    def templates_for(self, dataset_templates: list[str]) -> tuple[str, list[str]]:
        """(name recorded with results, template list) for a dataset."""
        if self.templates == "dataset":
            return "dataset", list(dataset_templates)
        if self.templates == "single":
            return "single", list(SINGLE_TEMPLATE)
        return "custom", list(self.templates)
