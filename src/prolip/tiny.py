"""prolip-tiny: a small CLIP of our own, pretrained contrastively in-house on scikit-learn's digits.

No pretrained CLIP weights can be had offline, and random weights show nothing. This module renders the 8×8 digit
scans that ship inside scikit-learn exactly as the demo writes its image folder, pretrains an open_clip ``CLIP`` (the
``prolip-tiny-vit`` config: a 3-layer, width-128 ViT on 32-px images with 8-px patches and a 2-layer, width-32 text
tower on open_clip's tokenizer) on image–caption pairs, and saves the weights as safetensors whose metadata says what
they are. They then load like any checkpoint (``--model prolip-tiny-vit --pretrained <file>``) and every description of
the backbone reads "prolip-tiny (trained in-house on digits, not OpenAI CLIP)". The projection site is the real one
(``visual.proj``), so ProLIP, the baselines, export and test-time adaptation run on it unchanged.

Fifty digits per class are held out of pretraining (a fixed split); the demo and the behavioural tests use only those.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TINY_MODEL = "prolip-tiny-vit"
TINY_LABEL = "prolip-tiny (trained in-house on digits, not OpenAI CLIP)"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / f"{TINY_MODEL}.safetensors"
SHIPPED_SEED = 0

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# The zero-shot classifier's templates (the demo's); pretraining captions add two more phrasings, so the text tower
# learns the class names rather than one sentence.
DIGIT_TEMPLATES = ['a photo of the number "{}".', "a photo of the digit {}."]
CAPTION_TEMPLATES = [*DIGIT_TEMPLATES, "a handwritten {}.", "the digit {}, written by hand."]

RENDER_SIZE = 64  # pixels of the rendered digits (the backbone resizes them to 32)
HELD_OUT_PER_CLASS = 50
SPLIT_SEED = 0  # fixed for good: the held-out digits must never change, or the demo would test on training images


# -- the digits ---------------------------------------------------------------------------------------------------
def render_digit(pixels: np.ndarray, size: int = RENDER_SIZE):
    """One 8×8 scan (levels 0–16) as a size×size RGB image: dark ink on white paper, bicubic upsampling."""
    from PIL import Image

    ink = (255 - pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(ink, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def load_digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digit scans [N, 8, 8] and their labels [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def held_out_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pretraining indices, held-out indices): HELD_OUT_PER_CLASS digits of each class never seen in pretraining."""
    rng = np.random.default_rng(SPLIT_SEED)
    held = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:HELD_OUT_PER_CLASS] for c in range(len(DIGIT_NAMES))]
    )
    return np.setdiff1d(np.arange(len(labels)), held), np.sort(held)


# Shifted domains: what the model never saw in pretraining. Each takes a rendered digit (RGB, 0–255) and a generator
# seeded per image, so a domain's images are the same on every machine.
def _inverted(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255.0 - image


def _rotated(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.rot90(image, k=1, axes=(0, 1))


def _noisy(sigma: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def add_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image + 255.0 * sigma * rng.standard_normal(image.shape[:2])[..., None]

    return add_noise


DOMAINS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "clean": lambda image, rng: image,
    "inverted": _inverted,  # white ink on black
    "rotated": _rotated,  # turned 90° counter-clockwise
    "noisy": _noisy(0.5),  # Gaussian pixel noise, σ = half the full range, before the backbone's resize
}


def render_in_domain(pixels: np.ndarray, domain: str, seed: int):
    """A digit rendered as the demo writes it, then moved into ``domain``."""
    from PIL import Image

    image = np.asarray(render_digit(pixels), dtype=np.float64)
    shifted = DOMAINS[domain](image, np.random.default_rng(seed))
    return Image.fromarray(np.ascontiguousarray(shifted).clip(0, 255).round().astype(np.uint8))


def write_digit_folder(root: Path, domain: str = "clean", indices: np.ndarray | None = None) -> Path:
    """Write digits (default: the held-out ones) in ``domain`` as ``root/<name>/<index>.png``; idempotent."""
    done = root / ".complete"
    if done.exists():
        return root
    scans, labels = load_digit_scans()
    indices = held_out_split(labels)[1] if indices is None else indices
    for name in DIGIT_NAMES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in indices:
        render_in_domain(scans[i], domain, seed=int(i)).save(root / DIGIT_NAMES[labels[i]] / f"{i:04d}.png")
    done.touch()
    return root


# -- pretraining ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainConfig:
    """How the shipped weights were made (written into the file's metadata)."""

    seed: int = SHIPPED_SEED
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 30
    max_shift: float = 0.15  # random translations, as a fraction of the image side
    scale_range: tuple[float, float] = (0.85, 1.2)  # random zoom, so crops of a digit look like digits too
    # One thread: the file's bytes then do not depend on the machine's core count (two threads gave other bytes).
    threads: int = 1


def pretraining_images(preprocess, indices: np.ndarray) -> tuple[Tensor, Tensor]:
    """The digits at ``indices`` through the backbone's own center transform [N, 3, S, S], and their labels."""
    scans, labels = load_digit_scans()
    images = torch.stack([preprocess(render_digit(scans[i])) for i in indices])
    return images, torch.as_tensor(labels[indices], dtype=torch.long)


def augment(images: Tensor, config: PretrainConfig, generator: torch.Generator) -> Tensor:
    """Random zoom and shift of each image (edges replicated: the background is white everywhere)."""
    n = images.shape[0]
    scale = torch.empty(n).uniform_(*config.scale_range, generator=generator)
    shift = torch.empty(n, 2).uniform_(-2 * config.max_shift, 2 * config.max_shift, generator=generator)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def caption_tokens(tokenizer) -> tuple[Tensor, Tensor]:
    """Tokens of every (class, template) caption [C·T, L] and each caption's class [C·T]."""
    captions = [t.format(name) for name in DIGIT_NAMES for t in CAPTION_TEMPLATES]
    classes = torch.arange(len(DIGIT_NAMES)).repeat_interleave(len(CAPTION_TEMPLATES))
    return tokenizer(captions), classes


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, labels: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric image–text loss over a batch of pairs, where every caption of the same digit is a positive
    (a batch of 128 holds each digit about 13 times: calling those captions negatives would teach nonsense)."""
    logits = logit_scale.exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t()
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warmup, then cosine to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def new_model(seed: int):
    """The prolip-tiny-vit architecture, initialised from ``seed``."""
    import open_clip

    import prolip.backbones  # noqa: F401  (registers prolip's model configs with open_clip)

    torch.manual_seed(seed)
    logging.disable(logging.WARNING)  # open_clip says "initialized randomly", which is the point here
    try:
        return open_clip.create_model(TINY_MODEL, pretrained=None, device="cpu")
    finally:
        logging.disable(logging.NOTSET)


def pretrain(config: PretrainConfig = PretrainConfig(), echo: Callable[[str], None] | None = None) -> dict[str, Tensor]:
    """Pretrain prolip-tiny-vit on the non-held-out digits; returns its state dict. Deterministic for a config."""
    import open_clip

    from prolip.transforms import center_transform

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            model = new_model(config.seed)
            train_idx, _ = held_out_split(load_digit_scans()[1])
            prep = open_clip.get_model_preprocess_cfg(model)
            images, labels = pretraining_images(center_transform(_preprocessing(prep)), train_idx)
            tokens, _ = caption_tokens(open_clip.get_tokenizer(TINY_MODEL))
            _train(model, images, labels, tokens, config, echo)
    finally:
        torch.set_num_threads(previous_threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _preprocessing(cfg: dict):
    from prolip.backbones.base import Preprocessing

    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return Preprocessing(int(size), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))


def _train(
    model, images: Tensor, labels: Tensor, tokens: Tensor, config: PretrainConfig, echo: Callable[[str], None] | None
) -> None:
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    per_class = len(CAPTION_TEMPLATES)
    model.train()
    started = time.perf_counter()
    for step in range(config.steps):
        batch = torch.randint(0, len(labels), (config.batch_size,), generator=generator)
        template = torch.randint(0, per_class, (config.batch_size,), generator=generator)
        x = augment(images[batch], config, generator)
        # Each image gets one of its digit's captions; the 40 captions are encoded once per step and indexed.
        text_emb = model.encode_text(tokens)[labels[batch] * per_class + template]
        loss = contrastive_loss(model.encode_image(x), text_emb, labels[batch], model.logit_scale)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        if echo is not None and (step % 50 == 0 or step == config.steps - 1):
            echo(f"  step {step:3d}/{config.steps}: loss {loss.item():.3f}  ({time.perf_counter() - started:.0f} s)")
    model.eval()


# -- the weights file -----------------------------------------------------------------------------------------------
def used_token_ids(tokenizer) -> Tensor:
    """Token ids that occur in any pretraining caption (special tokens included)."""
    tokens, _ = caption_tokens(tokenizer)
    return torch.unique(tokens)


def shipping_state(state: dict[str, Tensor], tokenizer) -> dict[str, Tensor]:
    """The state dict as shipped: float16, and the rows of the 49,408-token embedding that no caption uses set to zero
    (they were never trained, so they carry nothing; zeros keep the file small in git and in wheels)."""
    out = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    keep = torch.zeros(out["token_embedding.weight"].shape[0], dtype=torch.bool)
    keep[used_token_ids(tokenizer)] = True
    out["token_embedding.weight"][~keep] = 0
    return out


def write_safetensors(
    tensors: dict[str, Tensor],
    path: Path,
    metadata: dict[str, str],
    *,
    force: bool = False,
    is_ours: Callable[[Path], bool] = lambda path: False,
) -> Path:
    """A safetensors file written byte for byte the same for the same inputs (keys sorted, metadata included;
    ``safetensors.torch.save_file`` orders metadata differently from one process to the next), atomically, by
    :func:`prolip.outputs.write_file`'s rules (``force`` replaces a file only if ``is_ours``)."""
    from prolip.outputs import write_file

    dtypes = {torch.float16: "F16", torch.float32: "F32"}
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    blob = struct.pack("<Q", len(text)) + text + b"".join(blobs)

    def fill(tmp: Path) -> None:
        tmp.write_bytes(blob)

    return write_file(path, fill, force=force, is_ours=is_ours)


def is_tiny_weights(path: Path) -> bool:
    """A weights file ``pretrain-tiny`` wrote (its header names the model): one ``--force`` may replace."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # anything that is not a readable safetensors file is not ours
        return False
    return metadata.get("prolip.model") == TINY_MODEL and metadata.get("prolip.regenerate", "").startswith(
        "prolip pretrain-tiny"
    )


def save_tiny_weights(state: dict[str, Tensor], path: Path, config: PretrainConfig, *, force: bool = False) -> Path:
    """Write the weights with their provenance label and the settings that regenerate them, through
    :mod:`prolip.outputs`: a file there is replaced only with ``force``, and only one this wrote."""
    import open_clip

    from prolip.backbones import PROVENANCE_KEY

    metadata = {
        PROVENANCE_KEY: TINY_LABEL,
        "prolip.model": TINY_MODEL,
        "prolip.pretrain": json.dumps(asdict(config), sort_keys=True),
        "prolip.regenerate": f"prolip pretrain-tiny --out DIR --seed {config.seed}",
    }
    tensors = shipping_state(state, open_clip.get_tokenizer(TINY_MODEL))
    return write_safetensors(tensors, path, metadata, force=force, is_ours=is_tiny_weights)


# -- using it -------------------------------------------------------------------------------------------------------
def load_tiny(weights: Path | str = SHIPPED_WEIGHTS, device: str = "cpu"):
    """The prolip-tiny backbone (the shipped weights unless told otherwise)."""
    from prolip.backbones import load_backbone

    return load_backbone(TINY_MODEL, str(weights), device=device)


def held_out_zero_shot(backbone) -> float:
    """Zero-shot top-1 (%) on the held-out digits, clean, through the backbone's own preprocessing."""
    from prolip.functional import accuracy, clip_logits
    from prolip.transforms import center_transform

    _, labels = load_digit_scans()
    _, held = held_out_split(labels)
    images, y = pretraining_images(center_transform(backbone.preprocessing), held)
    with torch.no_grad():
        z = backbone.encode_pre(images)
        site = backbone.projection()
        logits = clip_logits(
            z, site.weight, site.bias, backbone.encode_text(DIGIT_NAMES, DIGIT_TEMPLATES), backbone.logit_scale
        )
    return float(accuracy(logits, y))
