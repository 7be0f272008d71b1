"""A backbone family defined in the test folder alone, as a new family's author would write it: one module that
registers what its models can do. "toy:<arch>" builds an open_clip architecture under another family name, so
everything prolip does with it goes through the family registry, never through a family's name."""

from __future__ import annotations

import dataclasses

from prolip.backbones import OPEN_CLIP, Family, family_named, register_family
from prolip.backbones.openclip import load_open_clip


def load_toy(arch: str, pretrained: str, device):
    backbone = load_open_clip(arch, pretrained, device)
    backbone.info = dataclasses.replace(backbone.info, family="toy")
    return backbone


def _register() -> Family:
    try:
        return family_named("toy")
    except ValueError:
        return register_family(dataclasses.replace(OPEN_CLIP, name="toy", prefix="toy:", load=load_toy))


TOY = _register()
