"""Issue 22, first slice: timm image towers and CustomTextCLIP at their native site, and the output site that every
model has. One tiny random-init config per new kind of tower (src/prolip/model_configs/): a ConvNeXt trunk under
open_clip's linear head (``visual.head.proj``), a ViT trunk whose timm classifier is the projection
(``visual.trunk.head``, as EVA / MobileCLIP-B; CustomTextCLIP text tower) and a MAP-head tower with no projection
(SigLIP-like: its head's fc2 with the residual as a frozen per-image term, tests/test_map_head_site.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import prolip
from prolip.backbones import (
    OutputSiteBackbone,
    SiteExportError,
    load_backbone,
)
from prolip.errors import RunError
from prolip.functional import clip_logits, project

NATIVE = {
    "test-timm-convnext-tiny": "visual.head.proj.weight",
    "test-timm-vit-tiny": "visual.trunk.head.weight",
    "test-vit-tiny": "visual.proj",
    "test-rn-tiny": "visual.attnpool.c_proj.weight",
    "test-maphead-tiny": "visual.trunk.attn_pool.mlp.fc2.weight",
}
CASES = [
    ("test-timm-convnext-tiny", "native"),
    ("test-timm-vit-tiny", "native"),
    ("test-timm-convnext-tiny", "output"),
    ("test-maphead-tiny", "native"),
    ("test-maphead-tiny", "output"),
    ("test-attnpool-tiny", "output"),
    ("test-vit-tiny", "output"),
]
CLASSES = ["cat", "dog", "red car"]
TEMPLATE = "a photo of a {}."
_BUILT: dict[tuple[str, str], object] = {}


def backbone(arch: str, site: str):
    if (arch, site) not in _BUILT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BUILT[arch, site] = load_backbone(arch, "none", site=site)
    return _BUILT[arch, site]


def _images(b, n: int = 3) -> torch.Tensor:
    size = b.preprocessing.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", sorted(NATIVE))
def test_the_native_site_is_found_by_inspecting_the_tower(arch):
    b = backbone(arch, "native")
    site = b.projection()
    assert (site.param_name, site.kind, b.info.site) == (NATIVE[arch], "native", "native")
    assert site.param_name in b.model.state_dict()
    assert site.weight.shape == (b.dim_pre, b.dim_embed)


@pytest.mark.parametrize(("arch", "site"), CASES)
def test_z_through_the_site_at_w0_is_the_models_own_embedding_and_zero_shot_logits(arch, site):
    b = backbone(arch, site)
    x = _images(b)
    z, s = b.encode_pre(x), b.projection()
    with torch.no_grad():
        own = b.model.encode_image(x, normalize=True)
        tokens = b.tokenize([TEMPLATE.format(c) for c in CLASSES])
        own_logits, _ = b.model.get_logits(x, tokens)
    # SigLIP-style models add a logit bias, one constant for every class: probabilities over classes ignore it.
    bias = getattr(b.model, "logit_bias", None)
    own_logits = own_logits - (0.0 if bias is None else float(bias))
    torch.testing.assert_close(F.normalize(project(z, s.weight, s.bias), dim=-1), own, rtol=0, atol=2e-6)
    classifier = b.encode_text(CLASSES, [TEMPLATE])
    logits = clip_logits(z, s.weight, s.bias, classifier, b.logit_scale)
    torch.testing.assert_close(logits, own_logits, rtol=1e-5, atol=1e-4)


def test_the_output_site_is_the_identity_on_the_embedding_recorded_in_the_info():
    native, output = backbone("test-timm-convnext-tiny", "native"), backbone("test-timm-convnext-tiny", "output")
    assert isinstance(output, OutputSiteBackbone)
    site = output.projection()
    assert site.kind == "output" and output.info.site == "output"
    torch.testing.assert_close(site.weight, torch.eye(native.dim_embed))
    assert output.dim_pre == output.dim_embed == native.dim_embed
    # another z than the native site's: a feature cache must file it apart
    assert output.info.fingerprint != native.info.fingerprint
    assert "@output site" in output.info.describe()
    assert output.tokenize(["a"]).shape == native.tokenize(["a"]).shape


def test_exporting_the_output_site_is_refused_in_one_line():
    from prolip.export import checkpoint_changes

    b = backbone("test-maphead-tiny", "output")
    with pytest.raises(SiteExportError, match="output site.*no tensor of the model's checkpoint") as e:
        checkpoint_changes(b, b.projection().weight)
    assert isinstance(e.value, RunError) and "\n" not in str(e.value)


def test_the_family_finds_last_blocks_and_lora_towers_by_structure():
    convnext, vit = backbone("test-timm-convnext-tiny", "native"), backbone("test-timm-vit-tiny", "native")
    for b in (convnext, vit):
        block = b.family.last_image_block(b.model)
        assert any(n.startswith(block) for n in b.model.state_dict()), block
    assert convnext.family.last_image_block(convnext.model).startswith("visual.trunk.stages.")
    towers = vit.family.attention_towers(vit.model, vit.info.arch)
    assert isinstance(towers["vision"], str) and "encoder: text" in towers["vision"]
    assert towers["text"][0] == "text.transformer.resblocks"  # CustomTextCLIP's own text transformer


@pytest.mark.parametrize(
    ("arch", "site"),
    [
        ("test-timm-convnext-tiny", "native"),
        ("test-timm-vit-tiny", "native"),
        ("test-maphead-tiny", "native"),
        ("test-maphead-tiny", "output"),
    ],
)
def test_prolip_trains_saves_and_predicts(arch, site, tiny_image_folder, tmp_path):
    b = backbone(arch, site)
    result = prolip.fit(
        tiny_image_folder, b, cache_dir=tmp_path / "cache", shots=2, views=1, hyperparameters={"steps": 3}
    )
    W = result.method.projection()
    assert W is not None and W.shape == b.projection().weight.shape
    assert result.run.manifest["backbone"]["site"] == site
    run = prolip.load_run(result.run.save(tmp_path / "run"))
    images = sorted(tiny_image_folder.rglob("*.jpg"))[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = run.predict(images)  # the backbone rebuilt from the manifest, at its site
    assert again == result.run.predict(images, backbone=b)


@pytest.mark.parametrize("arch", ["test-timm-vit-tiny", "test-maphead-tiny"])
def test_custom_text_towers_run_from_prompt_embeddings_as_from_tokens(arch):
    b = backbone(arch, "output" if arch == "test-maphead-tiny" else "native")
    texts = [TEMPLATE.format(c) for c in CLASSES]
    with torch.no_grad():
        own = b.model.encode_text(b.tokenize(texts))
        via_embeddings = b.encode_text_embeddings(*b.prompt_embeddings(texts))  # what TPT and CLIP-LoRA use
    torch.testing.assert_close(via_embeddings, own, rtol=0, atol=2e-6)


def test_the_cli_fits_at_the_output_site_and_the_run_remembers_it(tmp_path, tiny_image_folder):
    import json

    from click.testing import CliRunner

    from prolip.cli import main

    run = tmp_path / "run"
    args = ["fit", "--data", tiny_image_folder, "--shots", 2, "--views", 2, "--steps", 3, "--site", "output"]
    args += ["--model", "test-vit-tiny", "--pretrained", "none", "--cache-dir", tmp_path / "c", "--out", run]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "manifest.json").read_text())["backbone"]["site"] == "output"
    image = str(next(tiny_image_folder.rglob("*.jpg")))
    r = CliRunner().invoke(main, ["predict", str(run), image, "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["fit", "--site", "sideways", "--data", str(tiny_image_folder)])
    assert r.exit_code == 2 and "--site" in r.output


def test_image_level_training_refuses_the_output_site_in_one_line(tiny_image_folder):
    import pytest

    from prolip.backbones import load_backbone
    from prolip.constraints import HyperparameterError
    from prolip.image_training import projection_parameters

    backbone = load_backbone("test-vit-tiny", "none", site="output")
    with pytest.raises(HyperparameterError, match="output site is no parameter of the model") as e:
        projection_parameters(backbone)
    assert e.value.option == "--site"


def test_prolip_models_lists_the_matching_architectures_and_their_sites():
    from click.testing import CliRunner

    from prolip.cli import main

    r = CliRunner().invoke(main, ["models", "RN50"])
    assert r.exit_code == 0, r.output
    assert "native: visual.attnpool.c_proj.weight" in r.output and "every one adaptable" in r.output
    assert all(line.startswith("RN50") for line in r.output.strip().splitlines()[:-1])
    r = CliRunner().invoke(main, ["models", "no-such-model"])
    assert r.exit_code == 2 and "no open_clip architecture contains" in r.output
