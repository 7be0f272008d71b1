"""CLIP-SVD on the tiny random models and real JPEGs: at initialisation every logit is zero-shot CLIP's and merging
gives back every weight; only singular values train, as many as the method reports; a short fit moves them, reloads,
and exports as a plain open_clip checkpoint with the run's predictions; the Method contract holds."""

from __future__ import annotations

import copy

import pytest
import torch

from prolip.constraints import HyperparameterError
from prolip.image_training import adapted_copy, encoder_logits, model_parameters
from prolip.methods import check_method, configure, create, method_class
from prolip.methods.clip_svd import SVDInstaller, kept_rank, merged_tensors
from prolip.methods.lora import one_prompt_classifier
from test_lora import CLASSES, episode, image_and_text

FAST = {"steps": 2, "batch_size": 3, "lr": 1e-2}  # 2 shots: 4 iterations over 8 images, the last batch partial
ALL = SVDInstaller("both", "all", ("q", "k", "v", "o", "mlp"), 1.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits_of(backbone):
    f, t = image_and_text(backbone)
    return 100 * f @ t.T


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_hf"])
def test_at_initialisation_every_logit_is_zero_shot_and_merging_gives_back_w(fixture, request):
    backbone = request.getfixturevalue(fixture)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    encoder, names = adapted_copy(backbone, [], ALL)
    assert all(torch.equal(v, before[k]) for k, v in backbone.model.state_dict().items())  # the frozen one is intact
    torch.testing.assert_close(logits_of(encoder), logits_of(backbone), atol=1e-4, rtol=1e-5)
    merged = merged_tensors(encoder)
    # Every attention projection and MLP layer of both towers, nothing else.
    linears = [
        k
        for k, v in before.items()
        if v.dim() == 2 and (".attn" in k or "self_attn" in k or ".mlp." in k) and "bias" not in k
    ]
    assert sorted(merged) == sorted(linears)
    for k, W in merged.items():
        torch.testing.assert_close(W, before[k].float(), atol=1e-6, rtol=1e-5)


def test_the_singular_values_are_w_s_own(tiny_vit):
    encoder, names = adapted_copy(tiny_vit, [], ALL)
    params = model_parameters(encoder)
    name = "visual.transformer.resblocks.0.attn.parametrizations.in_proj_weight.original"
    W = tiny_vit.model.visual.transformer.resblocks[0].attn.in_proj_weight.detach().double()
    s = params[name].detach().double()
    assert s.shape == (3, 64)  # q, k, v: three 64×64 blocks, full rank
    for i, block in enumerate(W.chunk(3)):
        torch.testing.assert_close(s[i], torch.linalg.svdvals(block), atol=1e-5, rtol=1e-5)
    assert kept_rank(768, 1.0) == 768 and kept_rank(3072 // 4 * 4 + 3, 1.0) == 3072 and kept_rank(10, 0.5) == 4


def test_only_singular_values_train_and_their_count_is_reported(tiny_vit, tiny_image_folder):
    task, support = episode(tiny_vit, tiny_image_folder)
    m = create("clip-svd", **FAST, matrices=["q", "o", "mlp"], encoder="vision")
    encoder, names = adapted_copy(tiny_vit, [], m.installer())
    trainable = [n for n, p in encoder.model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(names) and all(n.endswith(".original") for n in names)
    assert not any(n.startswith("transformer.") for n in names)  # vision only
    width, blocks = 64, len(tiny_vit.model.visual.transformer.resblocks)
    # per block: q (k, v left whole), the output projection, c_fc [256, 64] and c_proj [64, 256], rank 64 each
    assert sum(model_parameters(encoder)[n].numel() for n in names) == blocks * 4 * width
    m.fit(task, support, seed=1)
    assert m.trainable_parameters() == blocks * 4 * width == sum(v.numel() for v in m.state_dict().values()) - 4 * 32


def test_fit_moves_the_singular_values_reloads_and_exports(tiny_vit, tiny_image_folder, tmp_path):
    import open_clip

    from prolip.export import export_open_clip

    before = {k: v.clone() for k, v in tiny_vit.model.state_dict().items()}
    task, support = episode(tiny_vit, tiny_image_folder)
    m = create("clip-svd", **FAST).fit(task, support, seed=1)
    assert all(torch.equal(v, before[k]) for k, v in tiny_vit.model.state_dict().items())
    state = m.state_dict()
    start, names = adapted_copy(tiny_vit, [], m.installer())
    initial = model_parameters(start)
    assert set(state) == {*names, "text_classifier"}
    assert all(not torch.allclose(state[n], initial[n].detach()) for n in names)  # every s moved
    assert m.selected_["iterations"] == 4 and m.forward_passes() == 3 + 3 + 2 + 3 + 4 * (4 + 1)
    paths = sorted(tiny_image_folder.rglob("*.jpg"))
    logits = m.image_logits(paths)
    again = create("clip-svd", **FAST).load_state_dict(task, state)
    torch.testing.assert_close(again.image_logits(paths), logits)

    path = export_open_clip(tiny_vit, m.checkpoint_tensors(tiny_vit), tmp_path / "export.safetensors")
    reloaded = open_clip.create_model(tiny_vit.info.arch, pretrained=str(path)).eval()
    plain = type(tiny_vit)(reloaded, tiny_vit.info)
    text = one_prompt_classifier(plain, CLASSES, "a photo of a {}.")
    torch.testing.assert_close(encoder_logits(plain, paths, text, task.logit_scale), logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits, encoder_logits(tiny_vit, paths, task.classifier, task.logit_scale), atol=1e-3)


def test_merged_weights_load_into_a_plain_hf_model(tiny_hf):
    encoder, names = adapted_copy(tiny_hf, [], ALL)
    g = torch.Generator().manual_seed(0)
    params = model_parameters(encoder)
    with torch.no_grad():
        for n in names:
            params[n].mul_(1 + 0.2 * torch.randn(params[n].shape, generator=g))
    plain = copy.copy(tiny_hf)
    plain.model = copy.deepcopy(tiny_hf.model)
    plain.model.load_state_dict({**plain.model.state_dict(), **merged_tensors(encoder)})
    torch.testing.assert_close(logits_of(plain), logits_of(encoder), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits_of(encoder), logits_of(tiny_hf), atol=1e-3)


def test_a_resnet_decomposes_its_text_encoder_only(tiny_rn, tiny_image_folder):
    task, support = episode(tiny_rn, tiny_image_folder)
    with pytest.raises(HyperparameterError, match="encoder: text"):
        create("clip-svd", **FAST).fit(task, support)
    m = create("clip-svd", **{**FAST, "steps": 1}, encoder="text").fit(task, support)
    assert all(k.startswith("transformer.") or k == "text_classifier" for k in m.state_dict())


def test_defaults_are_the_originals_and_the_contract_holds():
    m = create("clip-svd")
    assert (m.encoder, m.position, tuple(m.matrices), m.rank_ratio) == ("both", "all", ("q", "k", "v", "o", "mlp"), 1)
    assert (m.lr, m.batch_size, m.steps, m.weight_decay, m.min_lr) == (5e-4, 32, 200, 1e-2, 1e-6)
    assert m.capabilities.encodes_images and not m.capabilities.selects and not m.capabilities.accepts_classifier
    assert configure("clip-svd", {}, dataset="ImageNet").template == "a photo of a {}."
    assert configure("clip-svd", {}, dataset="Food101").template == "a photo of a {}, a type of food."
    assert check_method(method_class("clip-svd")) == ["declaration"]
    with pytest.raises(HyperparameterError):
        create("clip-svd", matrices=["w"])
