"""Which open_clip architectures prolip adapts, and where: every one of ``open_clip.list_models()`` with its family,
its site ("native: <param name>" or "output only") and the weight tags open_clip knows for it.

Each image tower is built on the meta device (no memory, no weights, no text tower: a Hugging Face text tower would
need its config from the Hub), and its site is found by the same inspection ``load_backbone`` uses
(:func:`prolip.backbones.sites.native_site`). ``python -m prolip.backbones.coverage`` prints the table and totals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import open_clip
import torch
from open_clip.model import _build_vision_tower

from prolip.backbones.openclip import MODEL_CONFIG_DIR  # importing it registers prolip's tiny configs
from prolip.backbones.sites import native_site, tower_kind


@dataclass(frozen=True)
class Coverage:
    """One architecture: how prolip adapts it."""

    arch: str
    family: str  # the registered backbone family ("open_clip")
    model_class: str  # what open_clip builds: CLIP, CustomTextCLIP or CoCa
    tower: str
    site: str  # "native: <param name>" or "output only"
    tags: tuple[str, ...]  # open_clip's pretrained weight tags for it
    bundled: bool = False  # one of prolip's own tiny test configs, not open_clip's

    @property
    def native(self) -> bool:
        return self.site.startswith("native")


def _model_class(cfg: dict) -> str:
    # open_clip.create_model decides the same way
    if "multimodal_cfg" in cfg:
        return "CoCa"
    return "CustomTextCLIP" if cfg.get("custom_text") else "CLIP"


def coverage_of(arch: str) -> Coverage:
    """How prolip adapts ``arch`` (built on the meta device: no weights, no memory)."""
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    logging.disable(logging.WARNING)
    try:
        with torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
    finally:
        logging.disable(logging.NOTSET)
    site = native_site(visual)
    return Coverage(
        arch=arch,
        family="open_clip",
        model_class=_model_class(cfg),
        tower=tower_kind(visual),
        site="output only" if site is None else f"native: {site.param_name}",
        tags=tuple(open_clip.list_pretrained_tags_by_model(arch)),
        bundled=(MODEL_CONFIG_DIR / f"{arch}.json").is_file(),
    )


@cache
def coverage() -> tuple[Coverage, ...]:
    """Every architecture of ``open_clip.list_models()`` (prolip's tiny test configs included), sorted as there."""
    return tuple(coverage_of(arch) for arch in open_clip.list_models())


def summary(rows: tuple[Coverage, ...] | None = None) -> dict[str, int]:
    """open_clip's architectures and weight tags (prolip's tiny configs left out), in all and at a native site (the
    rest are adapted at the output site)."""
    rows = tuple(r for r in (coverage() if rows is None else rows) if not r.bundled)
    return {
        "architectures": len(rows),
        "architectures_native": sum(r.native for r in rows),
        "tags": sum(len(r.tags) for r in rows),
        "tags_native": sum(len(r.tags) for r in rows if r.native),
    }


def report(rows: Sequence[Coverage] | None = None) -> str:
    """The table and totals ``python -m prolip.backbones.coverage`` and ``prolip models`` print (every
    architecture, or ``rows``)."""
    rows = coverage() if rows is None else rows
    lines = [f"{r.arch:34} {r.model_class:15} {r.tower:28} {r.site:46} {', '.join(r.tags)}" for r in rows]
    s = summary(tuple(rows))
    lines.append(
        f"open_clip {open_clip.__version__}: {s['architectures']} architectures: "
        f"{s['architectures_native']} at a native site, "
        f"{s['architectures'] - s['architectures_native']} at the output site only; {s['tags']} weight tags: "
        f"{s['tags_native']} at a native site ({100 * s['tags_native'] / max(s['tags'], 1):.0f}%), "
        f"{s['tags'] - s['tags_native']} at the output site only; every one adaptable"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
