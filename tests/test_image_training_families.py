"""Issue 22: every image-level method (full-ft, last-layer-ft, CLIP-LoRA, CLIP-SVD) on every family and site kind
(open_clip ViT, ModifiedResNet, a timm tower ending in a linear, a timm MAP-head tower, Hugging Face CLIP, the
output site) either trains, through a trainable copy that is exactly the frozen backbone at step 0, or refuses in
one line before any copy or image is made. Generated over methods × tiny random-init family configs."""

from __future__ import annotations

import warnings

import pytest
import torch

import prolip.image_training as image_training
from prolip.backbones import load_backbone
from prolip.data.types import ImageItem, LabeledImages
from prolip.episode import task_for
from prolip.errors import ProlipError
from prolip.image_training import (
    adapted_copy,
    encode_pre_with_grad,
    encoder_logits,
    image_encoder_parameters,
    last_layer_parameters,
    projection_parameters,
)
from prolip.methods import create
from prolip.methods.base import Support, TensorViews

CLASSES = ["red", "green", "blue", "yellow"]
TEMPLATE = "a photo of a {}."

# model, site: a tiny random-init model of each family and site kind (src/prolip/model_configs; tiny_hf: conftest)
FAMILIES = {
    "vit": ("test-vit-tiny", "native"),
    "resnet": ("test-rn-tiny", "native"),
    "timm-linear": ("test-timm-convnext-tiny", "native"),
    "timm-map": ("test-maphead-tiny", "native"),
    "hf": ("hf", "native"),
    "output": ("test-vit-tiny", "output"),
}

# name, hyperparameters: 1 shot × 4 classes, 2 optimiser steps each
STEPS = {"epochs": 2, "batch_size": 2, "lr": 1e-2}
ITERATIONS = {"steps": 2, "batch_size": 2, "lr": 1e-2}
METHODS = {
    "full-ft": ("full-ft", STEPS),
    "last-layer-ft": ("last-layer-ft", STEPS),
    "clip-lora": ("clip-lora", ITERATIONS),
    "clip-lora-text": ("clip-lora", {**ITERATIONS, "encoder": "text"}),
    "clip-svd": ("clip-svd", ITERATIONS),
    "clip-svd-text": ("clip-svd", {**ITERATIONS, "encoder": "text"}),
}

OUTPUT = "the output site is no parameter of the model"
LORA_VIT_ONLY = "clip-lora adapts ViT image encoders only.*use encoder: text"
SVD_VIT_ONLY = "clip-svd decomposes the towers CLIP-LoRA adapts.*ViT image encoders only"
# What each method does on each family: None, it trains; else the one line it refuses with.
REFUSED: dict[tuple[str, str], str] = {
    **{(m, "output"): OUTPUT for m in METHODS},
    **{("clip-lora", f): LORA_VIT_ONLY for f in ("resnet", "timm-linear", "timm-map")},
    **{("clip-svd", f): SVD_VIT_ONLY for f in ("resnet", "timm-linear", "timm-map")},
}
CELLS = [(m, f) for m in METHODS for f in FAMILIES]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_LOADED: dict[str, object] = {}


@pytest.fixture
def backbone(request):
    family = request.param
    if family not in _LOADED:
        arch, site = FAMILIES[family]
        if arch == "hf":
            _LOADED[family] = request.getfixturevalue("tiny_hf")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _LOADED[family] = load_backbone(arch, "none", site=site)
    return _LOADED[family]


def episode(backbone, folder):
    items = [ImageItem(folder / name / "0.jpg", c) for c, name in enumerate(CLASSES)]
    images = LabeledImages(items, CLASSES, [TEMPLATE])
    task = task_for(backbone, backbone.encode_text(CLASSES, [TEMPLATE]).float(), 1)
    labels = torch.tensor(images.labels)
    views = TensorViews(torch.zeros(1, len(labels), backbone.dim_pre))
    return task, Support(views=views, labels=labels, center=views.view(0), images=images)


def method_copy(method: str, backbone):
    """The trainable copy the method trains (its parameters chosen, its adapters installed), before any step."""
    name, hp = METHODS[method]
    m = create(name, **hp)
    if method == "full-ft":
        return adapted_copy(backbone, image_encoder_parameters(backbone))
    if method == "last-layer-ft":
        return adapted_copy(backbone, last_layer_parameters(backbone))
    return adapted_copy(backbone, [], m.installer(0) if name == "clip-lora" else m.installer())


def images_of(backbone, n: int = 2) -> torch.Tensor:
    size = backbone.preprocessing.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(("method", "backbone"), [c for c in CELLS if c not in REFUSED], indirect=["backbone"])
def test_the_trainable_copy_is_the_frozen_backbone_at_step_0_and_its_own(method, backbone):
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    encoder, names = method_copy(method, backbone)
    assert names
    # The root cause of the bug: every module any attribute of the copy references is the copied model's own.
    own = {id(m) for m in encoder.model.modules()}
    for obj in (encoder, getattr(encoder, "inner", encoder)):
        for attribute, value in vars(obj).items():
            assert not isinstance(value, torch.nn.Module) or id(value) in own, attribute
    x = images_of(backbone)
    z = encode_pre_with_grad(encoder, x)
    W, bias = projection_parameters(encoder)
    out = z @ W if bias is None else z @ W + bias
    torch.testing.assert_close(out.detach(), backbone.encode_image(x), rtol=1e-5, atol=1e-5)
    trained = {n: p for n, p in image_training.model_parameters(encoder).items() if n in set(names)}
    assert all(p.requires_grad for p in trained.values())
    in_tower = [p for n, p in trained.items() if n.startswith(backbone.family.image_prefixes)]
    if in_tower:  # the image tower trains: the features carry its gradient
        grads = torch.autograd.grad(out.square().sum(), in_tower, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(v, before[k]) for k, v in backbone.model.state_dict().items())


@pytest.mark.parametrize(("method", "backbone"), [c for c in CELLS if c not in REFUSED], indirect=["backbone"])
def test_it_trains(method, backbone, tiny_image_folder):
    name, hp = METHODS[method]
    task, support = episode(backbone, tiny_image_folder)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    m = create(name, **hp).fit(task, support, seed=1)
    assert all(torch.equal(v, before[k]) for k, v in backbone.model.state_dict().items())  # the frozen one stays
    paths = [it.path for it in support.images.items]
    logits = m.image_logits(paths)
    zero_shot = encoder_logits(backbone, paths, task.classifier, task.logit_scale)
    assert logits.shape == zero_shot.shape and torch.isfinite(logits).all()
    assert not torch.allclose(logits, zero_shot, atol=1e-4)  # what it trained changed its logits


@pytest.mark.parametrize(("method", "backbone"), list(REFUSED), indirect=["backbone"])
def test_it_refuses_in_one_line_before_any_work(method, backbone, tiny_image_folder, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("image-level training started before refusing")

    monkeypatch.setattr(image_training, "trainable_copy", no_work)
    monkeypatch.setattr(image_training, "AugmentedSupport", no_work)
    name, hp = METHODS[method]
    task, support = episode(backbone, tiny_image_folder)
    with pytest.raises(ProlipError, match=REFUSED[(method, backbone_name(backbone))]) as e:
        create(name, **hp).fit(task, support)
    assert "\n" not in str(e.value)


def backbone_name(backbone) -> str:
    return next(f for f, b in _LOADED.items() if b is backbone)
