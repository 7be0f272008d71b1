"""Backbone families: what each kind of model can do, declared once by the family and looked up by the name every
backbone's info carries (and every run manifest records), so that nothing outside ``backbones/`` tests a family's
name. A new family is one module that builds its backbones and calls :func:`register_family`.

What a family declares:

- which ``model`` strings it builds (``prefix``: "hf:" for Hugging Face CLIPModels; "" for open_clip, the default)
  and how (``load(rest of the model string, pretrained, device)``), so a saved run names its model again as
  ``prefix + arch``; a family whose models read a tokenizer from disk takes it as ``load(..., tokenizer=path)``
  (``takes_tokenizer``), records it in ``info.tokenizer`` and builds it again from there;
- which parameters image-level training may touch: everything the image embedding depends on (``image_prefixes``,
  full fine-tuning) and the last image block (``last_image_block``, last-layer fine-tuning);
- where CLIP-LoRA may install adapters (``attention_towers``: per tower, the blocks and their attention attribute,
  or the reason it cannot);
- which checkpoint format ``prolip export`` writes for it (``export_format``).

This module imports nothing heavy: the CLI reads families without loading torch models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# A tower CLIP-LoRA can adapt: (module path of its blocks, the blocks, the name of each block's attention module).
AttentionTower = tuple[str, Sequence[Any], str]


@dataclass(frozen=True)
class Family:
    """The capabilities of one backbone family (see the module docstring)."""

    name: str
    prefix: str
    load: Callable[..., Any]  # (rest of the model string, pretrained, device[, tokenizer=folder]) -> a Backbone
    image_prefixes: tuple[str, ...]
    last_image_block: Callable[[Any], str]
    attention_towers: Callable[[Any, str], dict[str, AttentionTower | str]]
    export_format: str
    takes_tokenizer: bool = False  # whether ``load`` accepts ``tokenizer=`` (a local tokenizer folder)

    def model_for(self, arch: str) -> str:
        """The ``model`` argument of ``load_backbone`` that builds ``arch`` of this family again."""
        return self.prefix + arch


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry; a second family of the same name is refused (it would shadow the first)."""
    if family.name in _FAMILIES:
        raise ValueError(f"a backbone family named {family.name!r} is already registered")
    clash = [f.name for f in _FAMILIES.values() if f.prefix == family.prefix]
    if clash:
        raise ValueError(f"family {family.name!r}: models prefixed {family.prefix!r} are already {clash[0]}'s")
    _FAMILIES[family.name] = family
    return family


def family_named(name: str) -> Family:
    """The registered family ``name`` (a backbone's ``info.family``, a manifest's ``backbone.family``)."""
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise ValueError(f"unknown backbone family {name!r} (registered: {known})") from None


def family_for_model(model: str) -> Family:
    """The family whose prefix ``model`` starts with (the longest such prefix)."""
    matching = [f for f in _FAMILIES.values() if model.startswith(f.prefix)]
    if not matching:
        raise ValueError(f"no backbone family builds {model!r} (registered: {', '.join(families()) or 'none'})")
    return max(matching, key=lambda f: len(f.prefix))


def families() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted(_FAMILIES)
