"""Shared test fixtures: random (never downloaded) CLIP backbones and checkpoints, and a generated image folder.

Everything is session-scoped and written under pytest's tmp_path_factory, so it is built once per run.
Other engineers: add fixtures at the end, keep them cheap and session-scoped.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_CLASSES = ("red", "green", "blue", "yellow")
TINY_COLOURS = ((220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40))


def _save_random_open_clip(arch: str, path: Path, seed: int) -> Path:
    import open_clip
    from safetensors.torch import save_file

    import prolip.backbones  # noqa: F401  (registers the tiny test configs with open_clip)

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """/work/shared/data (dtd10, cifar10-sample, coop-splits); skips when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture
def dtd10_experiment(tmp_path, shared_data):
    """A raw experiment on dtd10 with the tiny random ViT (1 shot, seed 1, 2 views, zero-shot), cache and results
    under tmp_path; keywords replace its keys."""

    def make(**overrides) -> dict:
        return {
            "model": "test-vit-tiny",
            "pretrained": "none",
            "data_root": str(shared_data / "dtd10"),
            "datasets": ["dtd"],
            "shots": [1],
            "seeds": [1],
            "views": 2,
            "cache_dir": str(tmp_path / "cache"),
            "out": str(tmp_path / "res"),
            "methods": ["zeroshot"],
            **overrides,
        }

    return make


@pytest.fixture(scope="session")
def vit_b16_file(tmp_path_factory) -> Path:
    """A random ViT-B-16 open_clip state dict saved as .safetensors (~600 MB, real architecture)."""
    return _save_random_open_clip("ViT-B-16", tmp_path_factory.mktemp("vit_b16") / "vit_b16.safetensors", 1)


@pytest.fixture(scope="session")
def rn50_file(tmp_path_factory) -> Path:
    """A random RN50 open_clip state dict saved as .safetensors (real architecture)."""
    return _save_random_open_clip("RN50", tmp_path_factory.mktemp("rn50") / "rn50.safetensors", 2)


@pytest.fixture(scope="session")
def tiny_vit_file(tmp_path_factory) -> Path:
    """A random "test-vit-tiny" state dict (.safetensors), different from the seed-0 "none" init."""
    return _save_random_open_clip("test-vit-tiny", tmp_path_factory.mktemp("tiny_vit") / "tiny_vit.safetensors", 3)


@pytest.fixture(scope="session")
def tiny_vit():
    """Random-init tiny ViT backbone (image 32, D_pre 64, D 32)."""
    from prolip.backbones import load_backbone

    return load_backbone("test-vit-tiny", "none")


@pytest.fixture(scope="session")
def tiny_rn():
    """Random-init tiny ModifiedResNet backbone (image 64, D_pre 256, D 32)."""
    from prolip.backbones import load_backbone

    return load_backbone("test-rn-tiny", "none")


def write_clip_tokenizer_files(out_dir: str | Path) -> tuple[Path, Path]:
    """Write HF ``vocab.json`` and ``merges.txt`` for the OpenAI CLIP BPE bundled with open_clip (works offline)."""
    import gzip
    import json

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A tiny random HF CLIPModel saved with save_pretrained, with a real (offline-built) CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from prolip.backbones.hf import OPENAI_MEAN, OPENAI_STD

    out = tmp_path_factory.mktemp("tiny_hf")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(4)
    CLIPModel(config).eval().save_pretrained(out)
    write_clip_tokenizer_files(out / "bpe")
    CLIPTokenizer.from_pretrained(out / "bpe").save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf(tiny_hf_dir):
    from prolip.backbones import load_backbone

    return load_backbone(f"hf:{tiny_hf_dir}")


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> Path:
    """root/<class>/<i>.jpg: 4 classes × 6 noisy JPEGs of varying sizes with a class-dependent colour."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_images")
    rng = np.random.default_rng(0)
    for name, colour in zip(TINY_CLASSES, TINY_COLOURS, strict=True):
        (root / name).mkdir()
        for i in range(6):
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return root
