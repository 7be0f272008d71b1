"""Issue 22, the MAP-head site: a SigLIP-style tower (timm ViT, ``AttentionPoolLatent`` head, no projection) is
adapted at its head's last linear ``attn_pool.mlp.fc2``, the residual that linear's output is added to carried as a
frozen per-image term: z = [h, r], W0 = [fc2.weight^T; I], so ``z W0 + b`` is the tower's output. Built from the
tiny random-init ``test-maphead-tiny`` config (src/prolip/model_configs/)."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

import prolip
from prolip.backbones import SiteExportError, load_backbone
from prolip.backbones.base import SiteTrainingError
from prolip.backbones.openclip import OpenClipBackbone
from prolip.backbones.sites import native_site
from prolip.errors import RunError
from prolip.export import export_open_clip
from prolip.functional import clip_logits, project

ARCH = "test-maphead-tiny"
FC2 = "visual.trunk.attn_pool.mlp.fc2"


@pytest.fixture(scope="module")
def maphead():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(ARCH, "none")


def _images(b, n: int = 3, seed: int = 0) -> torch.Tensor:
    size = b.preprocessing.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_the_site_is_fc2_with_the_residual_as_identity_rows(maphead):
    site, fc2 = maphead.projection(), maphead.model.get_submodule(FC2)
    d_h, d = fc2.in_features, fc2.out_features
    assert (site.param_name, site.kind, site.residual_rows) == (f"{FC2}.weight", "native", d)
    assert maphead.dim_pre == d_h + d and maphead.dim_embed == d
    torch.testing.assert_close(site.weight[:d_h], fc2.weight.t(), rtol=0, atol=0)
    torch.testing.assert_close(site.weight[d_h:], torch.eye(d), rtol=0, atol=0)
    torch.testing.assert_close(site.bias, fc2.bias, rtol=0, atol=0)


def test_z_through_the_site_at_w0_is_the_towers_own_output(maphead):
    x = _images(maphead)
    z, site = maphead.encode_pre(x), maphead.projection()
    with torch.no_grad():
        own = maphead.model.encode_image(x)
    torch.testing.assert_close(project(z, site.weight, site.bias), own, rtol=1e-6, atol=1e-7)
    fc2 = maphead.model.get_submodule(FC2)
    d_h = fc2.in_features
    with torch.no_grad():  # z's two parts are fc2's input and the residual fc2's output is added to
        torch.testing.assert_close(fc2(z[:, :d_h]) + z[:, d_h:], own, rtol=1e-6, atol=1e-7)


def test_a_norm_after_the_map_head_leaves_only_the_output_site(maphead):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(ARCH, pretrained=None)
    model.visual.trunk.fc_norm = torch.nn.LayerNorm(maphead.dim_embed)  # fc2 is then no linear site
    assert native_site(model.visual) is None
    other = OpenClipBackbone.for_model(model, maphead.info)
    with pytest.raises(prolip.backbones.BackboneLoadError, match="no native projection site.*output site"):
        other.projection()


def test_image_level_training_at_the_map_head_site_is_refused_in_one_line(maphead):
    from prolip.finetune import encode_pre_with_grad

    with pytest.raises(SiteTrainingError, match="MAP-head site is not supported") as e:
        encode_pre_with_grad(maphead, _images(maphead, 1))
    assert isinstance(e.value, RunError) and "\n" not in str(e.value)


def test_prolip_fits_saves_and_predicts_and_export_refuses_moved_residual_rows(maphead, tiny_image_folder, tmp_path):
    result = prolip.fit(
        tiny_image_folder, maphead, cache_dir=tmp_path / "cache", shots=2, views=1, hyperparameters={"steps": 3}
    )
    W = result.method.projection()
    assert W is not None and W.shape == maphead.projection().weight.shape
    assert result.run.manifest["backbone"]["site"] == "native"
    run = prolip.load_run(result.run.save(tmp_path / "run"))
    images = sorted(tiny_image_folder.rglob("*.jpg"))[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.predict(images) == result.run.predict(images, backbone=maphead)
    # ProLIP trains all of W, the residual's rows too: no checkpoint holds a map on the residual.
    with pytest.raises(SiteExportError, match="rows of W, which carry the frozen residual") as e:
        export_open_clip(maphead, W, tmp_path / "refused.safetensors")
    assert "\n" not in str(e.value) and not (tmp_path / "refused.safetensors").exists()


def test_an_adapted_fc2_exports_into_the_checkpoint_exactly(maphead, tmp_path):
    site = maphead.projection()
    d_h = site.weight.shape[0] - site.residual_rows
    W = site.weight.clone()
    W[:d_h] += 0.05 * torch.randn(d_h, W.shape[1], generator=torch.Generator().manual_seed(1))
    path = export_open_clip(maphead, W, tmp_path / "adapted.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = open_clip.create_model(ARCH, pretrained=str(path)).eval()
    state = exported.state_dict()
    torch.testing.assert_close(state[f"{FC2}.weight"], W[:d_h].t(), rtol=0, atol=0)
    changed = [k for k, v in maphead.model.state_dict().items() if not torch.equal(v, state[k])]
    assert changed == [f"{FC2}.weight"]
    x = _images(maphead, 4, seed=2)
    z = maphead.encode_pre(x)
    with torch.no_grad():
        own = exported.encode_image(x)
    torch.testing.assert_close(project(z, W, site.bias), own, rtol=1e-6, atol=1e-7)
    classifier = maphead.encode_text(["cat", "dog", "red car"], ["a photo of a {}."])
    ours = clip_logits(z, W, site.bias, classifier, maphead.logit_scale)
    theirs = maphead.logit_scale * F.normalize(own, dim=-1) @ classifier.t()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
