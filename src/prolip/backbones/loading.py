"""Reading weights safely and telling, within seconds, whether the Hugging Face Hub can serve them."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from prolip.backbones.base import BackboneInfo
from prolip.errors import ProlipError

HOW_TO_PASS_LOCAL = (
    "pass a local file instead, e.g. `--pretrained /path/to/weights.safetensors` "
    "(Python: load_backbone(model, pretrained='/path/to/weights.safetensors')), "
    "or for Hugging Face models a local save_pretrained directory (`--model hf:/path/to/dir`)"
)

HOW_TO_PASS_TOKENIZER = (
    "pass a local tokenizer folder instead (a save_pretrained folder or one holding tokenizer.json), e.g. "
    "`--tokenizer /path/to/tokenizer` (Python: load_backbone(model, pretrained, tokenizer='/path/to/tokenizer')), "
    "or put it next to the weights (the checkpoint's folder, or the hf: model's own folder)"
)
# What a tokenizer folder holds, one of these at least (fast tokenizers, BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# A real tokenizer has tens of thousands of tokens (CLIP's BPE 49k, SigLIP's SentencePiece 32k, Gemma's 256k);
# transformers offline can hand back a stub of a few special tokens instead of failing.
MIN_VOCAB = 1000

# Keys OpenAI's original checkpoints carry next to the weights; open_clip models have no such parameters.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


class BackboneLoadError(ProlipError, RuntimeError):
    """A backbone could not be built: unknown architecture, unreachable or unreadable weights, bad tokenizer."""


def refused_pickle(what: str | Path, e: pickle.UnpicklingError) -> BackboneLoadError:
    """The error for a checkpoint that torch.load(weights_only=True) would not unpickle: it is never executed."""
    # torch's message opens with a generic paragraph; the line naming the refused global is the useful one.
    lines = str(e).splitlines() or [""]
    first = next((line for line in lines if "GLOBAL" in line), lines[0]).strip().rstrip(".")
    return BackboneLoadError(
        f"refusing to load {what}: it is not a plain tensor state dict (unpickling it would run code or build "
        f"arbitrary Python objects; torch said: {first}). Convert it to .safetensors in a trusted "
        f"environment, or save only model.state_dict()"
    )


def tokenizer_unavailable(what: str, source: str, e: Exception | None = None) -> BackboneLoadError:
    """The error for a tokenizer that is neither on disk nor reachable: the same as for missing weights."""
    why = f" ({str(e).splitlines()[0]})" if e is not None and str(e) else ""
    return BackboneLoadError(
        f"cannot get {what}'s tokenizer {source!r}{why}: the Hugging Face Hub is offline (HF_HUB_OFFLINE) or "
        f"unreachable and it is not in the local cache; {HOW_TO_PASS_TOKENIZER}",
        option="--tokenizer",
    )


def holds_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer's files (:data:`TOKENIZER_FILES`)."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def check_vocab(n_tokens: int, model_vocab: int, where: str) -> None:
    """Refuse a tokenizer too small to be the model's: fewer than ``MIN_VOCAB`` tokens (or than the model's own
    embedding table holds, for a tiny model), as the stub transformers builds offline from missing vocab files."""
    if n_tokens < min(MIN_VOCAB, model_vocab):
        raise BackboneLoadError(
            f"the tokenizer of {where} has only {n_tokens} tokens while the model embeds {model_vocab}: its vocabulary "
            f"files (tokenizer.json, vocab.json/merges.txt or the SentencePiece model) are missing or were not found "
            f"offline; {HOW_TO_PASS_TOKENIZER}",
            option="--tokenizer",
        )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a local checkpoint: .safetensors, or a .pt/.bin/.pth state dict read with weights_only=True.

    Accepts ``{"state_dict": ...}`` wrappers and strips DataParallel's ``module.`` prefixes. A pickle that
    would run code on load is refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneLoadError(f"checkpoint {path} does not exist (or is not a file)")
    checkpoint: object  # whatever the file holds, until checked below
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            checkpoint = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise BackboneLoadError(f"cannot read safetensors checkpoint {path}: {e}") from None
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise refused_pickle(path, e) from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise BackboneLoadError(f"cannot read checkpoint {path}: {e}") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise BackboneLoadError(
            f"checkpoint {path} does not hold a state dict of tensors (got {type(checkpoint).__name__})"
        )
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if k not in _NON_WEIGHT_KEYS}
    if not state:
        raise BackboneLoadError(f"checkpoint {path} holds no tensors")
    return state


def load_into(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a message that names the source and the keys at fault."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        raise BackboneLoadError(
            f"weights in {source} do not match the architecture: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong_shape)} with the wrong shape "
            f"(e.g. {wrong_shape[:3]}); check that --model names the architecture the checkpoint was trained with"
        )
    model.load_state_dict(state, strict=True)


def fingerprint(config: dict, state: dict[str, Tensor]) -> str:
    """Stable content hash of an architecture config and its weights (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within ``timeout`` (a download would hang otherwise)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_available() -> bool:
    return not hub_offline() and hub_reachable()


# A safetensors file may say what its weights are in this metadata entry (prolip's in-house tiny CLIP does), so that
# every description of the backbone, run manifest and report carries it next to the file's path.
PROVENANCE_KEY = "prolip.provenance"


@dataclass
class LabelledBackboneInfo(BackboneInfo):
    """BackboneInfo for weights whose file declares its provenance; ``describe()`` says it beside the path."""

    provenance: str = ""

    def describe(self) -> str:
        site = "" if self.site == "native" else f" @{self.site} site"
        return f"{self.family}:{self.arch} [{self.provenance}: {self.weights}]{site}"


def declared_provenance(path: Path) -> str:
    """The provenance a .safetensors checkpoint declares in its metadata ("" when none or not safetensors)."""
    if path.suffix != ".safetensors":
        return ""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(PROVENANCE_KEY, "")


class RandomWeightsWarning(UserWarning):
    """A backbone was built with random weights: its features and accuracies mean nothing.

    A warning class of its own, so a caller that reports random weights itself (the CLI does, on every command)
    can silence this one and the user reads the message once.
    """
