"""Test-time ProLIP: batched = one at a time = torch.optim.AdamW per image; reset; selection; lr 0; TPT; end to end."""

import pytest
import torch
import torch.nn.functional as F

from prolip.functional import clip_logits, entropy
from prolip.tta import (
    TTAConfig,
    adapt_projection,
    marginal_entropy,
    select_confident,
    tpt_logits,
    tta_logits,
    view_ensemble_logits,
    view_features,
)


def problem(B=5, V=20, D_pre=24, D=12, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, V, D_pre, generator=g)
    W0 = torch.randn(D_pre, D, generator=g) * 0.2
    T = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    return z, W0, T


def reference_one_image(z, W0, T, scale, cfg, bias=None):
    """The plain way: torch.optim.AdamW on one image's own copy of W."""
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([W], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
    with torch.no_grad():
        ent = entropy(clip_logits(z, W, bias, T, scale))
    keep = ent.argsort()[: max(1, int(len(z) * cfg.ratio))]
    for _ in range(cfg.steps):
        loss = marginal_entropy(clip_logits(z[keep], W, bias, T, scale)[None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clip_logits(z[:1], W.detach(), bias, T, scale)[0], W.detach()


@pytest.mark.parametrize("with_bias", [False, True])  # RN50's attention-pool projection has a (frozen) bias
def test_batched_equals_sequential_and_torch_adamw(with_bias):
    z, W0, T = problem()
    bias = torch.randn(W0.shape[1], generator=torch.Generator().manual_seed(9)) * 0.1 if with_bias else None
    cfg = TTAConfig(views=20, ratio=0.25, steps=3, lr=1e-2)
    logits, W = adapt_projection(z, W0, bias, T, 30.0, cfg)
    for b in range(z.shape[0]):
        one_logits, one_W = adapt_projection(z[b : b + 1], W0, bias, T, 30.0, cfg)
        assert torch.allclose(one_W[0], W[b], atol=1e-6) and torch.allclose(one_logits[0], logits[b], atol=1e-5)
        ref_logits, ref_W = reference_one_image(z[b], W0, T, 30.0, cfg, bias)
        assert torch.allclose(ref_W, W[b], atol=1e-6) and torch.allclose(ref_logits, logits[b], atol=1e-4)
    assert not torch.allclose(W[0], W0)  # it did adapt


def test_reset_prediction_does_not_depend_on_other_images():
    z, W0, T = problem(B=6)
    W0_before = W0.clone()
    cfg = TTAConfig(ratio=0.2, lr=1e-2)
    a, _ = adapt_projection(z, W0, None, T, 30.0, cfg)
    assert torch.equal(W0, W0_before)  # the starting W is never written: every image starts from it
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b, _ = adapt_projection(z[perm], W0, None, T, 30.0, cfg)
    assert torch.allclose(a[perm], b, atol=1e-5)


def test_selection_picks_lowest_entropy_views():
    logits = torch.zeros(1, 10, 4)
    logits[0, 7] = torch.tensor([9.0, 0, 0, 0])  # most confident
    logits[0, 2] = torch.tensor([5.0, 0, 0, 0])
    assert select_confident(logits, 0.2)[0].tolist() == [7, 2]
    assert select_confident(logits, 0.01).shape == (1, 1)  # at least one view


def test_lr_zero_equals_no_adaptation():
    z, W0, T = problem()
    logits, W = adapt_projection(z, W0, None, T, 30.0, TTAConfig(lr=0.0))
    assert torch.equal(W, W0.expand_as(W))
    assert torch.allclose(logits, clip_logits(z[:, 0], W0, None, T, 30.0), atol=1e-5)


def test_view_ensemble_is_a_distribution():
    z, W0, T = problem()
    logp = view_ensemble_logits(z, W0, None, T, 30.0, ratio=0.5)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(z.shape[0]), atol=1e-5)


def test_view_ensemble_over_all_views_is_the_mean_probability():
    z, W0, T = problem()
    probs = clip_logits(z, W0, None, T, 30.0).softmax(-1).mean(1)
    assert torch.allclose(view_ensemble_logits(z, W0, None, T, 30.0, ratio=1.0).exp(), probs, atol=1e-6)
    # the confident subset is a different average
    assert not torch.allclose(view_ensemble_logits(z, W0, None, T, 30.0, ratio=0.1).exp(), probs, atol=1e-3)


def test_view_features_are_seeded_per_image_and_view_zero_is_the_center_crop(tiny_vit, tiny_image_folder):
    from PIL import Image

    from prolip.transforms import center_transform

    paths = sorted(tiny_image_folder.glob("*/*.jpg"))[:3]
    z = view_features(tiny_vit, paths, views=5, seed=1)
    assert z.shape == (3, 5, tiny_vit.dim_pre)
    assert torch.equal(view_features(tiny_vit, paths[2:], views=5, seed=1)[0], z[2])  # batch does not matter
    center = center_transform(tiny_vit.preprocessing)(Image.open(paths[0]).convert("RGB"))
    with torch.no_grad():
        assert torch.allclose(tiny_vit.encode_pre(center[None]).float()[0], z[0, 0], atol=1e-5)
    other = view_features(tiny_vit, paths[:1], views=5, seed=2)[0]
    assert torch.equal(other[0], z[0, 0]) and not torch.allclose(other[1:], z[0, 1:])
    assert len({tuple(v[:4].tolist()) for v in z[0]}) == 5  # every view differs


def test_tpt_lr_zero_is_zero_shot_and_lr_changes_it(tiny_vit):
    names = ["red", "green", "blue"]
    z = torch.randn(2, 8, tiny_vit.dim_pre, generator=torch.Generator().manual_seed(0))
    W0 = tiny_vit.projection().weight
    T = tiny_vit.encode_text(names, ["a photo of a {}."])
    s = tiny_vit.logit_scale
    zero = tpt_logits(tiny_vit, z, W0, None, names, s, lr=0.0)
    assert torch.allclose(zero, clip_logits(z[:, 0], W0, None, T, s), atol=1e-4)
    moved = tpt_logits(tiny_vit, z, W0, None, names, s, lr=1.0, ratio=0.5)
    assert not torch.allclose(moved, zero, atol=1e-4)


def test_end_to_end_on_dtd10(tiny_vit, shared_data):
    from prolip.data import resolve_data

    splits = resolve_data("dtd", root=shared_data / "dtd10")
    paths = [it.path for it in splits.test.items[::60]]
    W0 = tiny_vit.projection().weight
    T = tiny_vit.encode_text(splits.classnames, splits.templates)
    z = view_features(tiny_vit, paths, views=8)
    assert z.shape == (len(paths), 8, tiny_vit.dim_pre)
    logits = tta_logits(tiny_vit, W0, None, T, tiny_vit.logit_scale, paths, views=8, ratio=0.25, batch_size=4)
    assert logits.shape == (len(paths), 10)
    same = tta_logits(tiny_vit, W0, None, T, tiny_vit.logit_scale, paths, views=8, ratio=0.25, batch_size=3)
    assert torch.allclose(logits, same, atol=1e-5)  # batching does not change results


def test_tpt_on_a_hugging_face_backbone(tiny_hf):
    """HF pads with the end token, so the context length must come from the EOT index, not non-zero ids."""
    names = ["cat", "dog"]
    z = torch.randn(1, 8, tiny_hf.dim_pre, generator=torch.Generator().manual_seed(1))
    W0 = tiny_hf.projection().weight
    T = tiny_hf.encode_text(names, ["a photo of a {}."])
    zero = tpt_logits(tiny_hf, z, W0, None, names, tiny_hf.logit_scale, lr=0.0)
    assert torch.allclose(zero, clip_logits(z[:, 0], W0, None, T, tiny_hf.logit_scale), atol=1e-4)
    moved = tpt_logits(tiny_hf, z, W0, None, names, tiny_hf.logit_scale, lr=1.0, ratio=0.5)
    assert not torch.allclose(moved, zero, atol=1e-4)
