"""Issue 22, SigLIP: Hugging Face ``SiglipModel`` (hf:<dir>, told apart from a CLIPModel by its config) and open_clip
SigLIP (``test-siglip-tiny``: a timm MAP-head tower and a text tower with a Hugging Face tokenizer), each at its MAP
head's fc2 with the residual as frozen rows, zero-shot logits with the model's logit bias, prompts canonicalised
and padded to the model's fixed length, tokenizers read offline from a local folder. Tiny random-init models and
tokenizers built here in milliseconds (the ``tokenizers`` package), saved to and loaded from local files."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import click
import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import prolip
from prolip.backbones import BackboneLoadError, load_backbone, load_backbone_for

OC_ARCH = "test-siglip-tiny"  # src/prolip/model_configs/: its text tower's vocabulary is 64 tokens
HF_FC2 = "vision_model.head.mlp.fc2.weight"
CLASSES = ["cat", "dog", "red car"]
TEMPLATE = "This is a photo of {}."
WORDS = "this is a photo of an the cat dog red car green blue yellow itap".split()


def write_tokenizer(folder: Path, size: int) -> Path:
    """A WordLevel tokenizer of ``size`` tokens (the prompt words, fillers, <pad> </s> <unk>) that appends </s>, as
    SigLIP's do, saved as a PreTrainedTokenizerFast (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    words = WORDS + [f"w{i}" for i in range(size - len(WORDS) - len(specials))]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    assert len(fast) == size
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random SiglipModel (logit bias and scale away from their init) with its tokenizer and processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    out = tmp_path_factory.mktemp("tiny_siglip")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    config = SiglipConfig(
        text_config=text
        | dict(max_position_embeddings=64, projection_size=48, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    torch.manual_seed(5)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.5)
    model.save_pretrained(out)
    write_tokenizer(out, 64)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(hf_dir):
    return load_backbone(f"hf:{hf_dir}")


@pytest.fixture(scope="module")
def oc_tokenizer(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("siglip_tok"), 64)


@pytest.fixture(scope="module")
def oc(oc_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(OC_ARCH, "none", tokenizer=str(oc_tokenizer))


def _images(b, n: int = 3, seed: int = 0) -> torch.Tensor:
    size = b.preprocessing.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _own_image_embedding(b, x):
    with torch.no_grad():
        if b.info.family == "hf_siglip":
            return b.model.get_image_features(pixel_values=x).pooler_output
        return b.model.encode_image(x)


def _own_logits(b, x, prompts):
    """The model's own forward: logit_scale.exp() · cos + logit_bias, its own tokenisation of ``prompts``."""
    with torch.no_grad():
        if b.info.family == "hf_siglip":
            ids = b.tokenizer([p.lower().rstrip(".") for p in prompts], padding="max_length", max_length=64)
            return b.model(input_ids=torch.tensor(ids["input_ids"]), pixel_values=x).logits_per_image
        image, text, scale, bias = b.model(x, b.tokenizer(prompts))
        return scale * image @ text.T + bias


def test_hf_siglip_is_found_by_its_config_its_site_the_map_heads_fc2(hf, hf_dir):
    site, fc2 = hf.projection(), hf.model.vision_model.head.mlp.fc2
    assert hf.info.family == "hf_siglip" and hf.family.model_for(hf.info.arch) == f"hf-siglip:{hf_dir}"
    assert (site.param_name, site.residual_rows, hf.dim_pre) == (HF_FC2, 48, 96 + 48)
    torch.testing.assert_close(site.weight, torch.cat([fc2.weight.t(), torch.eye(48)]), rtol=0, atol=0)
    assert load_backbone_for(vars(hf.info)).info.fingerprint == hf.info.fingerprint  # saved runs name it again


@pytest.mark.parametrize("which", ["hf", "oc"])
def test_features_through_the_site_at_w0_are_the_models_own_embedding_and_logits(which, request):
    b = request.getfixturevalue(which)
    x = _images(b)
    z, site = b.encode_pre(x), b.projection()
    torch.testing.assert_close(z @ site.weight + site.bias, _own_image_embedding(b, x), rtol=1e-5, atol=1e-6)
    classifier = F.normalize(b.encode_text(CLASSES, [TEMPLATE]), dim=-1)
    prompts = [TEMPLATE.format(c) for c in CLASSES]
    assert b.logit_bias == (-2.5 if which == "hf" else -10.0)
    torch.testing.assert_close(b.zero_shot_logits(z, classifier), _own_logits(b, x, prompts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["hf", "oc"])
def test_the_text_side_carries_the_projections_bias_so_prolip_text_runs(which, request):
    import dataclasses

    from prolip.episode import task_for
    from prolip.methods import Support, TensorViews, create

    b = request.getfixturevalue(which)
    pre, proj = b.text_side(CLASSES, [TEMPLATE])
    assert torch.equal(pre[..., -1], torch.ones(len(CLASSES), 1))  # [u, 1] over [P; b]
    torch.testing.assert_close(pre @ proj, b.encode_text_templates(CLASSES, [TEMPLATE]), rtol=1e-5, atol=1e-5)
    classifier = F.normalize(b.encode_text(CLASSES, [TEMPLATE]), dim=-1)
    task = dataclasses.replace(task_for(b, classifier, 1), text_pre=pre, text_proj=proj)
    views = TensorViews(b.encode_pre(_images(b))[None])
    m = create("prolip-text", steps=2, lr=1e-2).fit(task, Support(views, torch.arange(3), center=views.view(0)))
    assert m.P.shape == proj.shape and not torch.equal(m.P[-1], proj[-1])  # the bias row trains with P


@pytest.mark.parametrize("which", ["hf", "oc"])
def test_prompts_are_canonicalised_and_padded_to_the_fixed_length(which, request):
    b = request.getfixturevalue(which)
    tokens = b.tokenize(["This is a PHOTO of a Red-Car!", "this is a photo of a redcar"])
    assert tokens.shape == (2, 64 if which == "hf" else 16)
    assert torch.equal(tokens[0], tokens[1])  # lower case, punctuation dropped (SigLIP's canonical text)
    assert open_clip.get_tokenizer("PE-Core-B-16").context_length == 32  # open_clip's config carries PE-Core's


@pytest.mark.parametrize("which", ["hf", "oc"])
def test_prolip_trains_saves_predicts_and_exports_what_the_run_predicts(which, request, tiny_image_folder, tmp_path):
    from prolip import inference
    from prolip.export import export_folder

    b = request.getfixturevalue(which)
    result = prolip.fit(
        tiny_image_folder, b, cache_dir=tmp_path / "cache", shots=2, views=1, hyperparameters={"steps": 3, "lr": 1e-2}
    )
    W, k = result.method.projection(), b.projection().residual_rows
    assert torch.equal(W[-k:], torch.eye(k)) and not torch.equal(W[:-k], b.projection().weight[:-k])
    run = prolip.load_run(result.run.save(tmp_path / "run"))
    images = sorted(tiny_image_folder.rglob("*.jpg"))[:3]
    assert run.manifest["backbone"]["tokenizer"] == b.info.tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.predict(images) == result.run.predict(images, backbone=b)  # reloaded, tokenizer included
    method = inference.method_from_run(b, run)
    fmt = b.family.export_format
    head = inference.export_head(method, run)
    path = export_folder(b, inference.checkpoint_tensors(method, run, b), tmp_path / "export", fmt=fmt, head=head)
    x = _images(b, 4, seed=3)
    expected = method.logits(b.encode_pre(x))  # the run's own predictions, from its saved W
    got = b.logit_scale * F.normalize(_exported_embedding(fmt, path, x), dim=-1) @ run.classifier.t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _exported_embedding(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """The image embedding of the exported checkpoint, loaded by transformers or open_clip themselves."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if fmt == "hf":
            from transformers import SiglipModel

            return SiglipModel.from_pretrained(path).eval().get_image_features(pixel_values=x).pooler_output
        return open_clip.create_model(OC_ARCH, pretrained=str(path)).eval().encode_image(x)


def test_a_hub_tokenizer_not_on_disk_fails_at_once_with_the_offline_message():
    with pytest.raises(BackboneLoadError, match="Hub is offline.*not in the local cache.*--tokenizer") as e:
        load_backbone(OC_ARCH, "none")
    assert e.value.option == "--tokenizer"
    with pytest.raises(BackboneLoadError, match="bundled tokenizer.*takes no tokenizer folder"):
        load_backbone("test-maphead-tiny", "none", tokenizer="/nowhere")


def test_the_tokenizer_beside_the_checkpoint_is_found_and_recorded(oc, oc_tokenizer, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "repo"  # as an open_clip hub repo downloaded whole: weights and tokenizer side by side
    shutil.copytree(oc_tokenizer, folder)
    save_file(
        {k: v.contiguous() for k, v in oc.model.state_dict().items()}, str(folder / "open_clip_model.safetensors")
    )
    b = load_backbone(OC_ARCH, str(folder / "open_clip_model.safetensors"))
    assert b.info.tokenizer == str(folder.resolve()) and torch.equal(b.tokenize(["a cat"]), oc.tokenize(["a cat"]))


def test_an_hf_folder_without_its_tokenizer_is_refused_and_takes_one_from_tokenizer(hf, hf_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    with pytest.raises(BackboneLoadError, match=f"tokenizer of local directory {bare} is missing.*--tokenizer"):
        load_backbone(f"hf:{bare}")  # at once, before transformers searches every tokenizer class for seconds
    b = load_backbone(f"hf:{bare}", tokenizer=str(hf_dir))
    assert b.info.tokenizer == str(hf_dir.resolve()) and torch.equal(b.tokenize(["a cat"]), hf.tokenize(["a cat"]))


def test_a_tokenizer_smaller_than_the_models_vocabulary_is_refused(hf_dir, tmp_path):
    with pytest.raises(BackboneLoadError, match="only 20 tokens while the model embeds 64"):
        load_backbone(f"hf:{hf_dir}", tokenizer=str(write_tokenizer(tmp_path / "small", 20)))


def test_siglip2_naflex_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "siglip2"}')
    with pytest.raises(BackboneLoadError, match="'siglip2' model; prolip adapts .*clip, siglip"):
        load_backbone(f"hf:{tmp_path}")


def test_the_tokenizer_option_reaches_the_backbone(oc_tokenizer):
    from prolip.cli.options import backbone_from_options, backbone_options

    @click.command()
    @backbone_options
    def show(model, pretrained, device, site):
        click.echo(backbone_from_options(model, pretrained, device, site).info.tokenizer)

    ok = CliRunner().invoke(show, ["--model", OC_ARCH, "--pretrained", "none", "--tokenizer", str(oc_tokenizer)])
    assert ok.exit_code == 0 and ok.output.strip().endswith(str(oc_tokenizer.resolve()))
    missing = CliRunner().invoke(show, ["--model", OC_ARCH, "--pretrained", "none"])
    assert missing.exit_code != 0 and "--tokenizer" in missing.output


def test_image_level_training_runs_through_hf_siglips_map_head_site(hf, tiny_image_folder):
    # The cells of tests/test_image_training_families.py, on this family, for CLIP-LoRA (it wraps SiglipAttention's
    # q/k/v/out projections as CLIPAttention's): step-0 equality through the MAP-head site with gradients (fc2 the
    # parameter, the residual's rows constants), then training that changes the logits. full-ft, last-layer-ft and
    # CLIP-SVD pass the same cells (left out for the suite's time).
    import test_image_training_families as cells  # tests/ is on sys.path

    cells.test_the_trainable_copy_is_the_frozen_backbone_at_step_0_and_its_own("clip-lora", hf)
    cells.test_it_trains("clip-lora", hf, tiny_image_folder)


@pytest.mark.parametrize("which", ["hf", "oc"])
def test_tpt_tunes_the_context_words_not_the_end_token_or_padding(which, request):
    from prolip.tta.tpt import tpt_logits

    b = request.getfixturevalue(which)
    ctx = b.context_positions("a photo of a")
    assert ctx == slice(0, 4)  # no start token; "</s>" and the padding after it are not context
    clip = load_backbone("test-vit-tiny", "none")
    assert clip.context_positions("a photo of a") == slice(1, 5)  # after CLIP's start token, before its end token
    x = _images(b, n=2)
    z = b.encode_pre(x)[:, None].expand(-1, 3, -1)  # three identical "views" per image
    site = b.projection()
    logits = tpt_logits(b, z, site.weight, site.bias, CLASSES, b.logit_scale, steps=1)
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()
