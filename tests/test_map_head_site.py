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
from prolip.backbones import load_backbone
from prolip.backbones.openclip import OpenClipBackbone
from prolip.backbones.sites import native_site
from prolip.episode import task_for
from prolip.export import export_open_clip
from prolip.functional import clip_logits, project, proximal_penalty
from prolip.methods import Support, TensorViews, Validation
from prolip.methods._common import join_rows, split_rows
from prolip.methods.prolip import train_projection
from prolip.optim import train_full_batch, view_for_step
from prolip.tta.functional import batched_logits
from prolip.tta.prolip import TTAConfig, adapt_projection, frozen_rows

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


def test_image_level_training_at_the_map_head_site_trains_fc2_through_the_towers_output(maphead):
    from prolip.image_training import (
        encode_pre_with_grad,
        image_encoder_parameters,
        projection_parameters,
        trainable_copy,
    )

    x = _images(maphead, 2)
    encoder = trainable_copy(maphead, image_encoder_parameters(maphead))
    z = encode_pre_with_grad(encoder, x)
    W, bias = projection_parameters(encoder)
    out = project(z, W, bias)
    torch.testing.assert_close(out.detach(), maphead.encode_image(x), rtol=1e-6, atol=1e-6)
    fc2 = encoder.model.get_submodule(FC2)
    (grad,) = torch.autograd.grad(out.square().sum(), fc2.weight)
    assert grad.abs().sum() > 0  # the copy's own fc2 (not the frozen model's) is what the hooks and W read


def test_prolip_fits_saves_predicts_and_exports_what_the_run_predicts(maphead, tiny_image_folder, tmp_path):
    from prolip import inference

    result = prolip.fit(
        tiny_image_folder,
        maphead,
        cache_dir=tmp_path / "cache",
        shots=2,
        views=1,
        hyperparameters={"steps": 3, "lr": 1e-3},
    )
    W, W0, k = result.method.projection(), maphead.projection().weight, maphead.projection().residual_rows
    assert W is not None and W.shape == W0.shape
    assert result.run.manifest["backbone"]["site"] == "native"
    # ProLIP at the MAP-head site trains fc2 alone: the residual's rows are the identity still, fc2's moved.
    assert torch.equal(W[-k:], torch.eye(k)) and not torch.equal(W[:-k], W0[:-k])
    run = prolip.load_run(result.run.save(tmp_path / "run"))
    images = sorted(tiny_image_folder.rglob("*.jpg"))[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.predict(images) == result.run.predict(images, backbone=maphead)
    method = inference.method_from_run(maphead, run)
    path = export_open_clip(maphead, inference.checkpoint_tensors(method, run, maphead), tmp_path / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = open_clip.create_model(ARCH, pretrained=str(path)).eval()
    x = _images(maphead, 4, seed=3)
    expected = method.logits(maphead.encode_pre(x))  # the run's own predictions, from its saved W
    with torch.no_grad():
        got = maphead.logit_scale * F.normalize(exported.encode_image(x), dim=-1) @ run.classifier.t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.fixture(scope="module")
def map_problem(maphead):
    """A task at the MAP-head site (``task_for``, as every episode builds it) and two views of six images."""
    classifier = F.normalize(maphead.encode_text(["cat", "dog", "red car"], ["a photo of a {}."]), dim=-1)
    task = task_for(maphead, classifier, shots=2, text_mean=classifier)
    views = torch.stack([maphead.encode_pre(_images(maphead, 6, seed=s)) for s in (4, 5)])
    return task, Support(TensorViews(views), torch.tensor([0, 0, 1, 1, 2, 2]), center=views[0])


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("prolip", {}),
        ("prolip", {"precision": "reference"}),
        ("prolip", {"grid": [[1e-2, 0.5], [1e-3, 0.0]]}),  # packed: both configs at once
        ("p0", {}),
        ("prolip+tip-adapter-f", {}),  # AdamW: its weight decay reaches the trained rows only
        ("prolip+taskres", {}),
    ],
)
def test_methods_training_w_keep_the_residual_rows_frozen(map_problem, name, hp):
    task, support = map_problem
    k = task.frozen_rows
    assert k == task.W0.shape[1] and torch.equal(task.W0[-k:], torch.eye(k))
    hp = {"steps": 4, "lr": 1e-2, **hp}
    val = Validation(support.views.view(1), support.labels) if "grid" in hp else None
    method = prolip.methods.create(name, **hp).fit(task, support, val)
    W = method.state_dict()["W"] if name.startswith("prolip+") else method.projection()
    assert W is not None and W.shape == task.W0.shape
    assert torch.equal(W[-k:], task.W0[-k:])
    assert not torch.equal(W[:-k], task.W0[:-k])
    if name in ("prolip", "p0"):  # what they count as learned: fc2's rows (P0: A, over them)
        rows = task.W0.shape[0] - k
        assert method.trainable_parameters() == rows * (k if name == "prolip" else method.Q.shape[1])


def test_prolips_packed_and_single_trainers_agree_with_frozen_rows(map_problem):
    task, support = map_problem
    args = (task.W0, task.bias, task.classifier, task.logit_scale, support.views, support.labels)
    one = train_projection(*args, [1e-3], [0.5], 4, frozen_rows=task.frozen_rows)
    packed = train_projection(*args, [1e-3, 1e-2], [0.5, 0.0], 4, frozen_rows=task.frozen_rows)
    torch.testing.assert_close(packed[0], one[0], rtol=1e-5, atol=1e-6)
    # The same training by autograd through W = [W_t; frozen rows], only W_t an Adam parameter, the pull on W_t:
    W0t, frozen = split_rows(task.W0, task.frozen_rows)
    Wt = W0t.clone()

    def loss_at(t: int) -> torch.Tensor:
        z = support.views.view(view_for_step(t, support.views.num_views))
        logits = clip_logits(z, join_rows(Wt, frozen), task.bias, task.classifier, task.logit_scale)
        return F.cross_entropy(logits, support.labels) + 0.5 * proximal_penalty(Wt, W0t)

    train_full_batch([Wt], loss_at, steps=4, lr=1e-3)
    torch.testing.assert_close(one[0], join_rows(Wt, frozen), rtol=1e-4, atol=1e-5)


def test_test_time_prolip_keeps_the_residual_rows_frozen(maphead, map_problem):
    task, support = map_problem
    k = frozen_rows(maphead)
    assert k == task.frozen_rows and frozen_rows(None) == 0
    z = torch.stack([support.views.view(0), support.views.view(1)], dim=1)  # [B, V, D_pre]
    cfg = TTAConfig(ratio=1.0, steps=3, lr=1e-2)
    logits, W = adapt_projection(z, task.W0, task.bias, task.classifier, task.logit_scale, cfg, k)
    assert W.shape == (z.shape[0], *task.W0.shape) and torch.equal(W[:, -k:], task.W0[-k:].expand(z.shape[0], -1, -1))
    assert not torch.equal(W[:, :-k], task.W0[:-k].expand(z.shape[0], -1, -1))
    torch.testing.assert_close(logits, batched_logits(z[:, :1], W, task.bias, task.classifier, task.logit_scale)[:, 0])


def test_image_level_trainings_projection_appends_the_residual_rows(maphead):
    from prolip.image_training import projection_parameters, trainable_copy

    site = maphead.projection()
    encoder = trainable_copy(maphead, [f"{FC2}.weight"])
    W, bias = projection_parameters(encoder)
    assert torch.equal(W, site.weight) and bias is not None and torch.equal(bias, site.bias)
    (grad,) = torch.autograd.grad(W.sum(), encoder.model.get_submodule(FC2).weight)
    assert torch.equal(grad, torch.ones_like(grad))  # fc2's rows are the parameter, the residual's constants


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
