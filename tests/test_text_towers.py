"""Issue 22, the two open_clip families whose text tower is not CLIP's: CoCa through its contrastive path
(``test-coca-tiny``: an attentional-pool ViT, a text tower with an appended CLS token, a multimodal decoder prolip
never runs) and CustomTextCLIP with a Hugging Face text tower, as the multilingual CLIPs (XLM-RoBERTa, NLLB, MT5):
a tiny random-init XLM-RoBERTa and its tokenizer written to a local folder here, the open_clip config naming that
folder registered for this module only. Each: features through the site at W = W0 are the model's own
``encode_image`` and its zero-shot logits; ProLIP trains, saves, predicts, and its export loads in open_clip."""

from __future__ import annotations

import json
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

import prolip
from prolip.backbones import load_backbone, load_backbone_for
from prolip.functional import clip_logits, project
from test_siglip import write_tokenizer  # tests/ is on sys.path

COCA = "test-coca-tiny"  # src/prolip/model_configs/
HF_TEXT = "test-hf-text-tiny"  # registered by the hf_text_arch fixture
CLASSES = ["cat", "dog", "red car"]
TEMPLATE = "a photo of a {}."


def _quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return load_backbone(*args, **kwargs)


@pytest.fixture(scope="module")
def hf_text_arch(tmp_path_factory):
    """A tiny XLM-RoBERTa text tower (config only: open_clip builds it at random init, mean-pooled, an MLP
    projection, as xlm-roberta-base-ViT-B-32) with a 64-token tokenizer, and the open_clip config naming it."""
    from transformers import XLMRobertaConfig

    root = tmp_path_factory.mktemp("hf_text")
    tower = write_tokenizer(root / "tower", 64)  # <pad> is 0: HFTextEncoder masks the config's pad_token_id
    XLMRobertaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=24,  # RoBERTa positions start after the pad id: 16 tokens + 2
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    ).save_pretrained(tower)
    text_cfg = {"hf_model_name": str(tower), "hf_tokenizer_name": str(tower), "hf_model_pretrained": False}
    text_cfg |= {"hf_pooler_type": "mean_pooler", "context_length": 16, "vocab_size": 64}
    vision_cfg = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8}
    configs = root / "configs"
    configs.mkdir()
    config = {"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    (configs / f"{HF_TEXT}.json").write_text(json.dumps(config))
    open_clip.add_model_config(configs)
    yield tower
    # Unregistered again: other modules walk open_clip.list_models() (a rescan only adds, so both go by hand).
    open_clip.factory._MODEL_CONFIG_PATHS.remove(configs)
    del open_clip.factory._MODEL_CONFIGS[HF_TEXT]
    assert HF_TEXT not in open_clip.list_models()


@pytest.fixture(scope="module")
def coca():
    return _quiet_load(COCA, "none")


@pytest.fixture(scope="module")
def hf_text(hf_text_arch):
    return _quiet_load(HF_TEXT, "none", tokenizer=str(hf_text_arch))


def _images(b, n: int = 3, seed: int = 0) -> torch.Tensor:
    size = b.preprocessing.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_each_is_its_family_at_the_vits_native_site(coca, hf_text, hf_text_arch):
    from open_clip.hf_model import HFTextEncoder

    assert isinstance(coca.model, open_clip.coca_model.CoCa) and coca.model.text.cls_emb is not None
    assert isinstance(hf_text.model, open_clip.model.CustomTextCLIP) and isinstance(hf_text.model.text, HFTextEncoder)
    for b in (coca, hf_text):
        site = b.projection()
        assert (site.param_name, site.kind, b.info.site) == ("visual.proj", "native", "native")
        assert site.weight.shape == (b.dim_pre, b.dim_embed)
    assert (coca.dim_pre, hf_text.dim_pre) == (32, 64)  # CoCa's attentional pool maps to the embedding's width
    assert hf_text.info.tokenizer == str(hf_text_arch.resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_backbone_for(vars(hf_text.info))  # as a saved run names it: same seeded init, tokenizer
    assert again.info.fingerprint == hf_text.info.fingerprint


@pytest.mark.parametrize("which", ["coca", "hf_text"])
def test_features_through_the_site_at_w0_are_the_models_own_embedding_and_logits(which, request):
    b = request.getfixturevalue(which)
    x = _images(b)
    z, site = b.encode_pre(x), b.projection()
    with torch.no_grad():
        own = b.model.encode_image(x, normalize=False)
        text = b.model.encode_text(b.tokenize([TEMPLATE.format(c) for c in CLASSES]), normalize=True)
    torch.testing.assert_close(project(z, site.weight, site.bias), own, rtol=0, atol=2e-6)
    own_logits = b.model.logit_scale.exp() * F.normalize(own, dim=-1) @ text.T
    logits = clip_logits(z, site.weight, site.bias, b.encode_text(CLASSES, [TEMPLATE]), b.logit_scale)
    torch.testing.assert_close(logits, own_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["coca", "hf_text"])
def test_prolip_trains_saves_predicts_and_exports_what_the_run_predicts(which, request, tiny_image_folder, tmp_path):
    from prolip import inference
    from prolip.export import export_folder

    b = request.getfixturevalue(which)
    result = prolip.fit(
        tiny_image_folder, b, cache_dir=tmp_path / "cache", shots=2, views=1, hyperparameters={"steps": 3, "lr": 1e-2}
    )
    W = result.method.projection()
    assert W is not None and not torch.equal(W, b.projection().weight)
    run = prolip.load_run(result.run.save(tmp_path / "run"))
    images = sorted(tiny_image_folder.rglob("*.jpg"))[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.predict(images) == result.run.predict(images, backbone=b)  # rebuilt from the manifest
    method = inference.method_from_run(b, run)
    head = inference.export_head(method, run)
    adapted = inference.checkpoint_tensors(method, run, b)
    path = export_folder(b, adapted, tmp_path / "export", fmt=b.family.export_format, head=head)
    x = _images(b, 4, seed=3)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = open_clip.create_model(b.info.arch, pretrained=str(path)).eval()
        got = b.logit_scale * F.normalize(exported.encode_image(x), dim=-1) @ run.classifier.t()
    torch.testing.assert_close(got, method.logits(b.encode_pre(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["coca", "hf_text"])
def test_the_text_side_from_token_ids_is_the_models_own_text_embedding_so_prolip_text_runs(which, request):
    import dataclasses

    from prolip.episode import task_for
    from prolip.methods import Support, TensorViews, create

    b = request.getfixturevalue(which)
    assert b._text_tower() is None  # not run from token embeddings: the text side comes from token ids
    pre, proj = b.text_side(CLASSES, [TEMPLATE])
    with torch.no_grad():
        own = b.model.encode_text(b.tokenize([TEMPLATE.format(c) for c in CLASSES]), normalize=True)
    torch.testing.assert_close(F.normalize(pre @ proj, dim=-1)[:, 0], own, rtol=0, atol=2e-6)
    assert not torch.allclose(pre[..., : proj.shape[1]], pre @ proj)  # a real projection, not the identity
    classifier = F.normalize(b.encode_text(CLASSES, [TEMPLATE]), dim=-1)
    task = dataclasses.replace(task_for(b, classifier, 1), text_pre=pre, text_proj=proj)
    views = TensorViews(b.encode_pre(_images(b))[None])
    m = create("prolip-text", steps=2, lr=1e-2).fit(task, Support(views, torch.arange(3), center=views.view(0)))
    assert m.P.shape == proj.shape and not torch.equal(m.P, proj)
    assert m.predict(views.view(0)).shape == (3,)


def test_an_mlp_projections_last_linear_with_its_bias_is_the_text_projection_and_identity_none(hf_text):
    # xlm-roberta-base-ViT-B-32's proj is Sequential(Linear, GELU, Linear): the first two are frozen encoder layers.
    text = hf_text.model.text
    assert isinstance(text.proj, torch.nn.Sequential) and hf_text._projection_module() is text.proj[-1]
    torch.testing.assert_close(hf_text.text_projection(), text.proj[-1].weight.t(), rtol=0, atol=0)
    torch.manual_seed(0)
    with_bias = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 32))
    original = text.proj
    tokens = hf_text.tokenize([TEMPLATE.format(c) for c in CLASSES])
    try:
        for proj_module, width in ((with_bias, 49), (torch.nn.Identity(), 32)):  # the bias row over a 1 feature
            text.proj = proj_module.requires_grad_(False)
            pre, proj = hf_text.text_side(CLASSES, [TEMPLATE])
            with torch.no_grad():
                own = hf_text.model.encode_text(tokens)
            assert pre.shape == (3, 1, width) and proj.shape == (width, 32)
            torch.testing.assert_close((pre @ proj)[:, 0], own, rtol=0, atol=2e-6)
        assert torch.equal(proj, torch.eye(32)) and torch.equal(pre[:, 0], own)  # none: the identity
    finally:
        text.proj = original


def test_tpt_is_refused_in_one_line_on_towers_run_from_token_ids(coca, hf_text):
    # Neither tower is run from prompt embeddings (CoCa's appends a CLS token under a padding mask, the Hugging
    # Face one is a transformers model): prolip encodes prompts through the model's own encode_text, and TPT,
    # which tunes prompt embeddings, says so in one line (a ProlipError: the CLI prints it without a traceback).
    from prolip.errors import ProlipError
    from prolip.tta import tpt_logits

    for b in (coca, hf_text):
        assert b._text_tower() is None
        z = b.encode_pre(_images(b, 1))[None]
        site = b.projection()
        with pytest.raises(ProlipError, match="takes token ids only, so methods that tune prompt embeddings") as e:
            tpt_logits(b, z, site.weight, site.bias, CLASSES, b.logit_scale)
        assert "\n" not in str(e.value) and isinstance(e.value, NotImplementedError)
    towers = hf_text.family.attention_towers(hf_text.model, HF_TEXT)
    assert isinstance(towers["text"], str) and "HFTextEncoder" in towers["text"]
    assert towers["vision"][0] == "visual.transformer.resblocks"


def test_a_random_init_leaves_nothing_uninitialised_so_every_build_is_the_same(coca):
    from prolip.backbones.openclip import _filling_uninitialised_memory

    with _filling_uninitialised_memory():
        assert torch.isnan(torch.empty(4)).all()  # torch.empty no longer hands out whatever memory it got
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's settings are restored
    # open_clip's CoCa never initialises its caption head's projection: it starts at zero, on every build
    assert not coca.model.state_dict()["text_decoder.text_projection"].any()
    assert load_backbone("test-coca-tiny", "none").info.fingerprint == coca.info.fingerprint
