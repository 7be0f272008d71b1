"""Backbones reproduce their model's own CLIP logits at W = W0, on ViT, ResNet and HF CLIPModel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prolip.backbones import load_backbone
from prolip.functional import clip_logits

CLASSES = ["tabby_cat", "golden retriever", "sports car"]
TEMPLATES = ["a photo of a {}.", "art of the {}."]


def _images(backbone, n=2, seed=0):
    s = backbone.preprocessing.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _open_clip_reference_logits(backbone, images):
    """Zero-shot logits the way open_clip computes them (encode_image / encode_text, template ensemble)."""
    m = backbone.model
    names = [c.replace("_", " ") for c in CLASSES]
    tokens = backbone.tokenizer([t.format(c) for c in names for t in TEMPLATES])
    with torch.no_grad():
        text = F.normalize(m.encode_text(tokens), dim=-1).reshape(len(names), len(TEMPLATES), -1)
        text = F.normalize(text.mean(dim=1), dim=-1)
        return m.logit_scale.exp() * m.encode_image(images, normalize=True) @ text.T


def _hf_reference_logits(backbone, images):
    m, tok = backbone.model, backbone.tokenizer
    names = [c.replace("_", " ") for c in CLASSES]
    enc = tok([t.format(c) for c in names for t in TEMPLATES], padding=True, return_tensors="pt")
    with torch.no_grad():
        text = m.get_text_features(**enc)
        text = getattr(text, "pooler_output", text)  # transformers 5 returns a ModelOutput
        text = F.normalize(F.normalize(text, dim=-1).reshape(len(names), len(TEMPLATES), -1).mean(dim=1), dim=-1)
        image = m.get_image_features(pixel_values=images)
        image = getattr(image, "pooler_output", image)
        return m.logit_scale.exp() * F.normalize(image, dim=-1) @ text.T


def _assert_zero_shot_matches(backbone, reference):
    images = _images(backbone)
    site = backbone.projection()
    z = backbone.encode_pre(images)
    assert z.dtype == torch.float32 and z.shape == (2, site.weight.shape[0])
    ours = clip_logits(z, site.weight, site.bias, backbone.encode_text(CLASSES, TEMPLATES), backbone.logit_scale)
    theirs = reference(backbone, images)
    scale = theirs.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4 * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn"])
def test_tiny_open_clip_zero_shot_matches_open_clip(fixture, request):
    _assert_zero_shot_matches(request.getfixturevalue(fixture), _open_clip_reference_logits)


def test_hf_zero_shot_matches_get_image_and_text_features(tiny_hf):
    _assert_zero_shot_matches(tiny_hf, _hf_reference_logits)


@pytest.mark.slow
@pytest.mark.parametrize("arch,fixture", [("ViT-B-16", "vit_b16_file"), ("RN50", "rn50_file")])
def test_real_architecture_zero_shot_matches_open_clip(arch, fixture, request):
    backbone = load_backbone(arch, str(request.getfixturevalue(fixture)))
    assert not backbone.info.random_weights
    D_pre, D = {"ViT-B-16": (768, 512), "RN50": (2048, 1024)}[arch]
    assert backbone.projection().weight.shape == (D_pre, D)
    _assert_zero_shot_matches(backbone, _open_clip_reference_logits)


def test_resnet_projection_is_c_proj_with_frozen_bias(tiny_rn):
    site = tiny_rn.projection()
    c_proj = tiny_rn.model.visual.attnpool.c_proj
    assert site.native_layout == "linear" and site.param_name == "visual.attnpool.c_proj.weight"
    torch.testing.assert_close(site.weight, c_proj.weight.t())
    torch.testing.assert_close(site.bias, c_proj.bias)
    images = _images(tiny_rn)
    # z W + b is exactly what the model's own attention pool outputs
    with torch.no_grad():
        full = tiny_rn.model.encode_image(images)
    torch.testing.assert_close(tiny_rn.encode_pre(images) @ site.weight + site.bias, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn", "tiny_hf"])
def test_projection_site_native_round_trip(fixture, request):
    backbone = request.getfixturevalue(fixture)
    site = backbone.projection()
    native = backbone.model.state_dict()[site.param_name]
    torch.testing.assert_close(site.to_native(site.weight), native)
    torch.testing.assert_close(site.from_native(native, site.native_layout), site.weight)
    assert site.weight.shape == (backbone.dim_pre, backbone.dim_embed)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_hf"])
def test_text_side_reproduces_classifier(fixture, request):
    backbone = request.getfixturevalue(fixture)
    text_pre, text_proj = backbone.text_side(CLASSES, TEMPLATES)
    assert text_pre.shape[:2] == (len(CLASSES), len(TEMPLATES)) and text_proj.shape[1] == backbone.dim_embed
    from prolip.functional import ensemble_classifier

    torch.testing.assert_close(
        ensemble_classifier(text_pre @ text_proj), backbone.encode_text(CLASSES, TEMPLATES), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_hf"])
def test_prompt_embeddings_are_differentiable_and_match_text_encoder(fixture, request):
    backbone = request.getfixturevalue(fixture)
    texts = ["a photo of a cat.", "a blurry photo of a big dog."]
    embeds, eot = backbone.prompt_embeddings(texts)
    assert embeds.dim() == 3 and embeds.shape[0] == 2 and eot.shape == (2,) and eot[1] > eot[0]
    embeds = embeds.clone().requires_grad_(True)
    out = backbone.encode_text_embeddings(embeds, eot)
    expected = backbone.encode_text_templates(texts, ["{}"])[:, 0]
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    assert embeds.grad is not None and embeds.grad[0, : eot[0] + 1].abs().sum() > 0
    # causal attention: tokens after the EOT cannot influence the pooled feature
    assert embeds.grad[0, eot[0] + 1 :].abs().sum() == 0


def test_random_init_is_reproducible_and_loud():
    from prolip.backbones import RandomWeightsWarning

    torch.manual_seed(123)
    before = torch.rand(1)
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):  # a warning the CLI can silence: it says so itself
        a = load_backbone("test-vit-tiny", "none")
    b = load_backbone("test-vit-tiny", "none")
    torch.manual_seed(123)
    assert torch.rand(1) == before  # the seeded init leaves the caller's RNG alone
    assert a.info.random_weights and a.info.fingerprint == b.info.fingerprint
    torch.testing.assert_close(a.projection().weight, b.projection().weight)


def test_fingerprint_tracks_weights(tiny_vit_file, tmp_path):
    from safetensors.torch import load_file, save_file

    a = load_backbone("test-vit-tiny", str(tiny_vit_file))
    assert a.info.fingerprint == load_backbone("test-vit-tiny", str(tiny_vit_file)).info.fingerprint
    state = load_file(str(tiny_vit_file))
    state["transformer.resblocks.0.mlp.c_fc.weight"][0, 0] += 1e-3
    changed = tmp_path / "changed.safetensors"
    save_file(state, str(changed))
    assert load_backbone("test-vit-tiny", str(changed)).info.fingerprint != a.info.fingerprint


def test_preprocessing_comes_from_model_config(tiny_vit, tiny_rn, tiny_hf):
    assert tiny_vit.preprocessing.image_size == 32 and tiny_rn.preprocessing.image_size == 64
    assert tiny_hf.preprocessing.image_size == 32
    assert tiny_vit.preprocessing.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_encode_pre_is_batch_independent_and_float32(tiny_vit):
    images = _images(tiny_vit, n=3)
    together = tiny_vit.encode_pre(images)
    alone = torch.cat([tiny_vit.encode_pre(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not together.requires_grad


def test_tiny_image_folder_fixture_has_class_dependent_colours(tiny_image_folder):
    import numpy as np
    from PIL import Image

    classes = sorted(p.name for p in tiny_image_folder.iterdir())
    assert classes == sorted(["red", "green", "blue", "yellow"])
    means = {
        c: np.mean(
            [
                np.asarray(Image.open(f).convert("RGB"), dtype=float).mean(axis=(0, 1))
                for f in sorted((tiny_image_folder / c).glob("*.jpg"))
            ],
            axis=0,
        )
        for c in classes
    }
    assert all(len(list((tiny_image_folder / c).glob("*.jpg"))) == 6 for c in classes)
    assert means["red"].argmax() == 0 and means["green"].argmax() == 1 and means["blue"].argmax() == 2
