"""CLIP-LoRA on the tiny random models and real JPEGs: at initialisation every logit is zero-shot CLIP's; adapters
merge exactly into a plain checkpoint; dropout acts on the adapter's input only, while training; training moves the
adapters and nothing else, on the original's schedule; runs reload, and export reloads as plain open_clip."""

from __future__ import annotations

import pytest
import torch

from prolip.data.types import ImageItem, LabeledImages
from prolip.episode import task_for
from prolip.image_training import FinetuneSettings, adapted_copy, model_parameters, step_lr, training_steps
from prolip.methods import configure, create
from prolip.methods.base import Support, TensorViews
from prolip.methods.lora import LoRAInstaller, merged_tensors, one_prompt_classifier

CLASSES = ["red", "green", "blue", "yellow"]
FAST = {"steps": 2, "batch_size": 3, "lr": 1e-2}  # 2 shots: 4 iterations over 8 images, the last batch partial


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images_of(backbone, batch=3):
    g = torch.Generator().manual_seed(5)
    size = backbone.preprocessing.image_size
    return torch.randn(batch, 3, size, size, generator=g)


def image_and_text(backbone):
    """Image features (normalised, after the projection) and the one-prompt classifier of a backbone."""
    site = backbone.projection()
    bias = 0 if site.bias is None else site.bias
    with torch.no_grad():
        z = backbone.encode_pre(images_of(backbone)) @ site.weight.float() + bias
        return torch.nn.functional.normalize(z, dim=-1), one_prompt_classifier(backbone, CLASSES, "a photo of a {}.")


def randomise_adapters(encoder, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = model_parameters(encoder)
    with torch.no_grad():
        for n in names:
            params[n].copy_(torch.randn(params[n].shape, generator=g) * 0.05)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_hf"])
def test_adapters_at_initialisation_change_no_logit(fixture, request):
    backbone = request.getfixturevalue(fixture)
    encoder, names = adapted_copy(backbone, [], LoRAInstaller("both", "all", "qkv", 2, 1, 0.25, seed=3))
    assert names and all(".lora." in n for n in names)
    (f0, t0), (f1, t1) = image_and_text(backbone), image_and_text(encoder)
    torch.testing.assert_close(f1, f0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t1, t0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_hf"])
def test_adapters_merge_exactly_into_a_plain_checkpoint(fixture, request):
    import copy

    backbone = request.getfixturevalue(fixture)
    encoder, names = adapted_copy(backbone, [], LoRAInstaller("both", "all", "qkvo", 2, 1, 0.25, seed=3))
    randomise_adapters(encoder, names)
    merged = merged_tensors(encoder)
    plain = copy.copy(backbone)
    plain.model = copy.deepcopy(backbone.model)
    state = plain.model.state_dict()
    assert set(merged) <= set(state) and any("out_proj" in k for k in merged)
    plain.model.load_state_dict({**state, **merged})
    (f_lora, t_lora), (f_plain, t_plain), (f0, _) = (
        image_and_text(encoder),
        image_and_text(plain),
        image_and_text(backbone),
    )
    torch.testing.assert_close(f_plain, f_lora, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_plain, t_lora, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(f_lora, f0, atol=1e-3)  # the adapters did change the model


def test_dropout_acts_on_the_adapter_input_only_while_training(tiny_vit):
    encoder, names = adapted_copy(tiny_vit, [], LoRAInstaller("vision", "all", "qkv", 2, 1, 0.5, seed=1))
    adapters = [m for n, m in encoder.model.named_modules() if n.endswith(".lora.q")]
    x = images_of(tiny_vit)
    eval_features = image_and_text(encoder)[0]
    for m in adapters:
        m.train()
    torch.manual_seed(0)
    torch.testing.assert_close(image_and_text(encoder)[0], eval_features)  # B = 0: the dropped branch adds nothing
    randomise_adapters(encoder, names)
    for m in adapters:
        m.eval()
    merged_eval = image_and_text(encoder)[0]
    for m in adapters:
        m.train()
    assert not torch.allclose(image_and_text(encoder)[0], merged_eval)
    assert x.shape[0] == 3


def test_schedule_is_cosine_to_its_floor_over_steps_times_shots():
    settings = FinetuneSettings(lr=2e-4, epochs=0, batch_size=3, min_lr=1e-6, iterations=7)
    steps = training_steps(8, settings)
    assert len(steps) == 7 and [e for e, _ in steps] == [0, 0, 0, 1, 1, 1, 2] and len(steps[2][1]) == 2
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=2e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 7, eta_min=1e-6)
    for step in range(7):
        assert step_lr(settings, step, 7) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_defaults_are_the_originals():
    m = create("clip-lora")
    assert (m.rank, m.alpha, m.dropout, m.encoder, m.position, tuple(m.matrices)) == (
        2,
        1,
        0.25,
        "both",
        "all",
        ("q", "k", "v"),
    )
    assert (m.lr, m.batch_size, m.steps, m.weight_decay, m.min_lr) == (2e-4, 32, 500, 1e-2, 1e-6)
    assert m.capabilities.encodes_images and not m.capabilities.selects and not m.capabilities.accepts_classifier
    assert configure("clip-lora", {}, dataset="ImageNet").template == "a photo of a {}."


# ----------------------------------------------------------------------------------------------- fitting


def episode(backbone, folder, shots=2):
    items = [ImageItem(folder / name / f"{i}.jpg", c) for c, name in enumerate(CLASSES) for i in range(shots)]
    images = LabeledImages(items, CLASSES, ["a photo of a {}."])
    task = task_for(backbone, backbone.encode_text(CLASSES, ["a photo of a {}."]).float(), shots)
    labels = torch.tensor(images.labels)
    views = TensorViews(torch.zeros(1, len(labels), backbone.dim_pre))
    return task, Support(views=views, labels=labels, center=views.view(0), images=images)


def test_fit_moves_only_the_adapters_reloads_and_exports(tiny_vit, tiny_image_folder, tmp_path):
    import open_clip

    from prolip.export import export_open_clip

    before = {k: v.clone() for k, v in tiny_vit.model.state_dict().items()}
    task, support = episode(tiny_vit, tiny_image_folder)
    m = create("clip-lora", **FAST).fit(task, support, seed=1)
    assert all(torch.equal(v, before[k]) for k, v in tiny_vit.model.state_dict().items())
    state = m.state_dict()
    assert any(state[k].abs().sum() > 0 for k in state if k.endswith(".B"))  # B left zero: it trained
    # 4 iterations: batches of 3, 3, 2 images (epoch 0), then 3; the 4 prompts at each step and once at the end
    assert m.selected_["iterations"] == 4 and m.forward_passes() == 3 + 3 + 2 + 3 + 4 * (4 + 1)
    paths = sorted(tiny_image_folder.rglob("*.jpg"))
    logits = m.image_logits(paths)
    again = create("clip-lora", **FAST).load_state_dict(task, state)
    torch.testing.assert_close(again.image_logits(paths), logits)
    assert m.trainable_parameters() == sum(v.numel() for k, v in state.items() if k != "text_classifier")

    path = export_open_clip(tiny_vit, m.checkpoint_tensors(tiny_vit), tmp_path / "export.safetensors")
    reloaded = open_clip.create_model(tiny_vit.info.arch, pretrained=str(path)).eval()
    plain = type(tiny_vit)(reloaded, tiny_vit.info)
    from prolip.image_training import encoder_logits

    text = one_prompt_classifier(plain, CLASSES, "a photo of a {}.")
    torch.testing.assert_close(encoder_logits(plain, paths, text, task.logit_scale), logits, atol=1e-4, rtol=1e-4)


def test_same_seed_same_adapters(tiny_vit, tiny_image_folder):
    task, support = episode(tiny_vit, tiny_image_folder)
    a = create("clip-lora", **FAST, encoder="vision").fit(task, support, seed=4).state_dict()
    b = create("clip-lora", **FAST, encoder="vision").fit(task, support, seed=4).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("transformer.") for k in a)  # vision only: the text tower has no adapters


def test_a_resnet_adapts_its_text_encoder_only(tiny_rn, tiny_image_folder):
    from prolip.constraints import HyperparameterError

    task, support = episode(tiny_rn, tiny_image_folder)
    with pytest.raises(HyperparameterError, match="encoder: text"):
        create("clip-lora", **FAST).fit(task, support)
    m = create("clip-lora", **FAST, encoder="text").fit(task, support)
    assert all(k.startswith("transformer.") or k == "text_classifier" for k in m.state_dict())
