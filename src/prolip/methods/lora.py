"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024, "Low-Rank Few-Shot Adaptation of Vision-Language Models";
github.com/MaxZanella/CLIP-LoRA, ``main.py``, ``lora.py``, ``run_utils.py``, ``loralib/layers.py``,
``loralib/utils.py``): low-rank adapters on the attention projections of both encoders, trained on the support
images through the one image-level path of :mod:`prolip.image_training`.

Each adapted projection W (the q, k, v slices of an attention's ``in_proj_weight``, or its output projection)
becomes ``x Wᵀ + s · dropout(x) Aᵀ Bᵀ`` with A [r, in] drawn as nn.Linear's default (kaiming uniform, a = √5), B
[out, r] zeros (``init_lora_param``, layers.py:61-67), s = α / √r (layers.py:37, not LoRA's usual α / r), and the
dropout acting on the adapter's input only, while training (``LinearLoRA.forward``, layers.py:154-170). At
initialisation B = 0, so every logit is zero-shot CLIP's; after training the adapters merge into W exactly
(W + s·BA), which is what ``prolip export`` writes: a plain open_clip / Hugging Face checkpoint.

Defaults (run_utils.py:17-34): rank 2, alpha 1, dropout 0.25, q/k/v of every block (position "all") of both
encoders, lr 2e-4, batch 32, ``n_iters`` 500 per shot: ``steps`` × shots iterations in all (lora.py:66), AdamW
(weight decay 1e-2, betas 0.9/0.999, lora.py:68) under CosineAnnealingLR to 1e-6 (lora.py:69), stepped per
iteration, shuffled batches of RandomResizedCrop(0.08-1, bicubic) + flip views (main.py:36-41; the loader keeps
its last partial batch), cross-entropy on ``100 · normalize(image) · normalize(text)ᵀ`` (main.py:19, lora.py:96-114).
The text side is one prompt per class, the dataset's first template (lora.py:94 ``dataset.template[0]``; the
original's ImageNet template is "a photo of a {}.", datasets/imagenet.py:188, a per-dataset default here),
re-encoded through the adapted text encoder at every step; with only the image encoder adapted the training
classifier is the task's template ensemble (``textual_features``, lora.py:85). Predictions use the one-prompt
classifier through the (adapted) text encoder (``evaluate_lora``, lora.py:9-31). Nothing is selected on
validation (lora.py:37, ``VALIDATION = False``): the last iteration is kept.

Departures: training runs in float32 (the original in float16 autocast with a GradScaler); the rest of the model
stays in eval mode while the adapters train (the original calls ``model.train()``, which for a ViT changes nothing
else — CLIP has no other dropout — but would put a ResNet's BatchNorm in training mode); the original adapts
only ViT image encoders (``INDEX_POSITIONS_VISION`` lists ViT-B/16, B/32, L/14), so a ResNet accepts ``encoder:
text`` only. Positions other than "all" are the original's block indices for 12-block towers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prolip.backbones.base import Backbone
from prolip.constraints import (
    LEARNING_RATE,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Choice,
    HyperparameterError,
    Number,
    Subset,
    Template,
)
from prolip.image_training import (
    adapted_copy,
    model_parameters,
    train_image_encoder,
    training_steps,
)
from prolip.methods import register
from prolip.methods.base import Support, Task, Validation
from prolip.methods.encoder_training import InstalledAdapters

ENCODERS = ("both", "vision", "text")
# loralib/utils.py:10-20: blocks of a 12-block tower; "all" is every block of any tower.
POSITIONS = {
    "bottom": (0, 1, 2, 3),
    "mid": (4, 5, 6, 7),
    "up": (8, 9, 10, 11),
    "half-up": (6, 7, 8, 9, 10, 11),
    "half-bottom": (0, 1, 2, 3, 4, 5),
    "top3": (9, 10, 11),
    "all": (),
}
MATRICES = ("q", "k", "v", "o")
HF_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


# ----------------------------------------------------------------------------------------------- adapters


class SeededDropout(nn.Module):
    """nn.Dropout (zero with probability p, scale the rest by 1/(1 − p), only in training) drawing its masks from
    its own seeded generator, so a fit is the same for the same seed whatever else used torch's global one."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p, self.seed = p, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device not in self._generators:
            self._generators[x.device] = torch.Generator(device=x.device).manual_seed(self.seed)
        keep = torch.rand(x.shape, generator=self._generators[x.device], device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


class LowRank(nn.Module):
    """The adapter of one projection: ``s · dropout(x) Aᵀ Bᵀ``, A kaiming-uniform, B zero."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        scaling: float,
        dropout: float,
        generator: torch.Generator,
        like: Tensor,
    ):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=like.dtype, device=like.device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=like.dtype, device=like.device))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        dropout_seed = int(torch.randint(2**62, (1,), generator=generator))
        self.scaling, self.dropout = scaling, SeededDropout(dropout, dropout_seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.scaling * F.linear(F.linear(self.dropout(x), self.A), self.B)

    def delta(self) -> Tensor:
        """What merging adds to the projection's weight: s · B A [out, in]."""
        return self.scaling * self.B @ self.A


class LoRALinear(nn.Module):
    """An nn.Linear (a Hugging Face attention projection) plus an adapter; ``weight`` and ``bias`` stay the frozen
    layer's own tensors under their checkpoint names."""

    def __init__(self, linear: nn.Linear, adapter: LowRank):
        super().__init__()
        self.weight, self.bias, self.lora = linear.weight, linear.bias, adapter

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora(x)

    def merged(self) -> dict[str, Tensor]:
        return {"weight": self.weight + self.lora.delta()}


class LoRAMultiheadAttention(nn.Module):
    """open_clip's nn.MultiheadAttention with adapters on some of q, k, v, o; ``in_proj_weight``,
    ``in_proj_bias`` and ``out_proj`` stay the frozen module's own tensors under their checkpoint names. The
    attention itself is PyTorch's scaled dot product, as ``PlainMultiheadAttentionLoRA`` (layers.py:402-413)."""

    def __init__(self, attention: nn.MultiheadAttention, adapters: dict[str, LowRank]):
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.bias_k is not None:
            raise ValueError("CLIP-LoRA adapts self-attention with one packed in_proj_weight")
        self.embed_dim, self.num_heads, self.batch_first = (
            attention.embed_dim,
            attention.num_heads,
            attention.batch_first,
        )
        self.in_proj_weight, self.in_proj_bias, self.out_proj = (
            attention.in_proj_weight,
            attention.in_proj_bias,
            attention.out_proj,
        )
        self.lora = nn.ModuleDict(adapters)

    def _project(self, x: Tensor, which: str, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = F.linear(x, weight, bias)
        return out + self.lora[which](x) if which in self.lora else out

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        **_: Any,
    ) -> tuple[Tensor, None]:
        if key_padding_mask is not None:
            raise ValueError("CLIP's attention has no key padding mask")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        E, H = self.embed_dim, self.num_heads
        W, b = self.in_proj_weight, self.in_proj_bias
        parts = [
            self._project(x, which, W[i * E : (i + 1) * E], None if b is None else b[i * E : (i + 1) * E])
            for i, (which, x) in enumerate((("q", query), ("k", key), ("v", value)))
        ]
        N, L = query.shape[:2]
        q, k, v = (p.reshape(N, -1, H, E // H).transpose(1, 2) for p in parts)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_float_mask(attn_mask, q, N, H))
        out = self._project(out.transpose(1, 2).reshape(N, L, E), "o", self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _delta(self, which: str) -> Tensor:
        adapter = self.lora[which] if which in self.lora else None
        return adapter.delta() if isinstance(adapter, LowRank) else torch.zeros_like(self.out_proj.weight)

    def merged(self) -> dict[str, Tensor]:
        out = {"in_proj_weight": self.in_proj_weight + torch.cat([self._delta(w) for w in ("q", "k", "v")])}
        if "o" in self.lora:
            out["out_proj.weight"] = self.out_proj.weight + self._delta("o")
        return out


def _float_mask(mask: Tensor | None, q: Tensor, batch: int, heads: int) -> Tensor | None:
    """nn.MultiheadAttention's mask as scaled_dot_product_attention reads it: additive floats ([L, S] or
    [N·H, L, S]); a boolean mask marks what may NOT be attended, the opposite of SDPA's booleans."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
    mask = mask.to(q.dtype)
    return mask.view(batch, heads, *mask.shape[1:]) if mask.dim() == 3 else mask


# ----------------------------------------------------------------------------------------------- installation


def chosen_blocks(
    backbone: Backbone,
    encoder: str,
    position: str,
    positions: Mapping[str, Sequence[int]] | None = None,
    refusal: str = "{}",
) -> list[tuple[str, nn.Module, str]]:
    """(block path, block, its attention's attribute name) of every block chosen by ``position`` (a key of
    ``positions``, default CLIP-LoRA's :data:`POSITIONS`, or "all") in the towers ``encoder`` names, text tower first;
    the backbone's family says where its towers' attention modules are, or why a tower cannot be adapted (raised as
    ``refusal`` formatted with that reason)."""
    positions = POSITIONS if positions is None else positions
    available = backbone.family.attention_towers(backbone.model, backbone.info.arch)
    chosen = []
    for tower in ("text", "vision"):
        if encoder not in ("both", tower):
            continue
        found = available[tower]
        if isinstance(found, str):
            raise HyperparameterError(refusal.format(found))
        prefix, blocks, attribute = found
        which = range(len(blocks)) if position == "all" else [i for i in positions[position] if i < len(blocks)]
        chosen += [(f"{prefix}.{i}", blocks[i], attribute) for i in which]
    return chosen


def attention_sites(backbone: Backbone, encoder: str, position: str) -> list[tuple[str, nn.Module]]:
    """(module path, attention module) of every block CLIP-LoRA adapts (loralib/utils.py:108-135), text tower
    first."""
    return [
        (f"{path}.{attr}", getattr(block, attr)) for path, block, attr in chosen_blocks(backbone, encoder, position)
    ]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


class LoRAInstaller:
    """The ``adapt`` hook of the image-level path: installs CLIP-LoRA's adapters on a trainable copy and names
    their parameters; ``seed`` draws the A matrices."""

    def __init__(
        self, encoder: str, position: str, matrices: Sequence[str], rank: int, alpha: float, dropout: float, seed: int
    ):
        self.encoder, self.position, self.matrices = encoder, position, tuple(matrices)
        self.rank, self.scaling, self.dropout, self.seed = rank, alpha / math.sqrt(rank), dropout, seed

    def __call__(self, backbone: Backbone) -> list[str]:
        generator = torch.Generator().manual_seed(self.seed)
        names = []
        for path, attention in attention_sites(backbone, self.encoder, self.position):
            if isinstance(attention, nn.MultiheadAttention):
                E, like = attention.embed_dim, attention.in_proj_weight
                adapters = {m: self._adapter(E, E, generator, like) for m in self.matrices}
                _set_module(backbone.model, path, LoRAMultiheadAttention(attention, adapters))
                names += [f"{path}.lora.{m}.{p}" for m in self.matrices for p in ("A", "B")]
                continue
            for m in self.matrices:  # a Hugging Face attention: one nn.Linear per projection
                attribute = HF_PROJECTIONS[m]
                linear = getattr(attention, attribute)
                adapter = self._adapter(linear.in_features, linear.out_features, generator, linear.weight)
                setattr(attention, attribute, LoRALinear(linear, adapter))
                names += [f"{path}.{attribute}.lora.{p}" for p in ("A", "B")]
        return names

    def _adapter(self, in_features: int, out_features: int, generator: torch.Generator, like: Tensor) -> LowRank:
        # Drawn on the CPU, so the same seed gives the same adapters on any device.
        adapter = LowRank(
            in_features,
            out_features,
            self.rank,
            self.scaling,
            self.dropout,
            generator,
            torch.empty(0, dtype=like.dtype),
        )
        return adapter.to(like.device).eval()  # the model is in eval mode; training turns the adapters' dropout on


def merged_tensors(encoder: Backbone) -> dict[str, Tensor]:
    """Every adapted projection with its adapter merged in (W + s·BA), by its checkpoint name."""
    out = {}
    for path, module in encoder.model.named_modules():
        if isinstance(module, (LoRAMultiheadAttention, LoRALinear)):
            out.update({f"{path}.{name}": t.detach().float().cpu() for name, t in module.merged().items()})
    return out


# ----------------------------------------------------------------------------------------------- the Method


def one_prompt_classifier(encoder: Backbone, classnames: Sequence[str], template: str) -> Tensor:
    """The normalised text classifier [C, D] of one prompt per class through ``encoder``'s text tower (with
    gradients, when its adapters train)."""
    prompts = [template.format(c.replace("_", " ")) for c in classnames]
    embeddings = encoder.encode_text_embeddings(*encoder.prompt_embeddings(prompts))  # type: ignore[attr-defined]
    return F.normalize(embeddings.float(), dim=-1)


@register
class CLIPLoRA(InstalledAdapters):
    """Low-rank adapters on the attention projections of both CLIP encoders (see the module docstring).

    rank (2), alpha (1; s = α/√r), dropout (0.25), encoder ("both" | "vision" | "text"), position ("all", or a
    block range of loralib/utils.py), matrices (["q", "k", "v"] of q, k, v, o), lr (2e-4), batch_size (32), steps
    (500 iterations per shot), weight_decay (1e-2), min_lr (1e-6), template (None: the dataset's first),
    aug_seed (seeds the augmented views).
    """

    name = "clip-lora"
    dataset_defaults = {"ImageNet": {"template": "a photo of a {}."}}  # CLIP-LoRA datasets/imagenet.py:188
    constraints = {
        "rank": POSITIVE_INT,
        "alpha": POSITIVE,
        "dropout": Number(low=0, high=1),
        "encoder": Choice(ENCODERS),
        "position": Choice(tuple(POSITIONS)),
        "lr": LEARNING_RATE,
        "batch_size": POSITIVE_INT,
        "steps": POSITIVE_INT,
        "weight_decay": NON_NEGATIVE,
        "min_lr": NON_NEGATIVE,
        "matrices": Subset(MATRICES),
        "template": Template(optional=True),
        "aug_seed": Number(integer=True),
    }

    def __init__(
        self,
        rank: int = 2,  # run_utils.py:29 --r
        alpha: float = 1,  # run_utils.py:30 --alpha
        dropout: float = 0.25,  # run_utils.py:31 --dropout_rate
        encoder: str = "both",  # run_utils.py:27 --encoder
        position: str = "all",  # run_utils.py:26 --position
        matrices: Sequence[str] = ("q", "k", "v"),  # run_utils.py:28 --params
        lr: float = 2e-4,  # run_utils.py:22 --lr
        batch_size: int = 32,  # run_utils.py:24 --batch_size
        steps: int = 500,  # run_utils.py:23 --n_iters, per shot (lora.py:66)
        weight_decay: float = 1e-2,  # lora.py:68 AdamW weight_decay
        min_lr: float = 1e-6,  # lora.py:69 CosineAnnealingLR eta_min
        template: str | None = None,  # lora.py:94 dataset.template[0]
        aug_seed: int = 0,
    ):
        self.rank, self.alpha, self.dropout, self.encoder, self.position = rank, alpha, dropout, encoder, position
        self.matrices, self.lr, self.batch_size, self.steps = matrices, lr, batch_size, steps
        self.weight_decay, self.min_lr, self.template, self.aug_seed = weight_decay, min_lr, template, aug_seed
        self.adapted: Backbone | None = None
        self.text_classifier: Tensor | None = None

    def installer(self, seed: int = 0) -> LoRAInstaller:
        return LoRAInstaller(
            self.encoder, self.position, list(self.matrices), self.rank, self.alpha, self.dropout, seed
        )

    def is_installed(self, name: str) -> bool:
        return ".lora." in name

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        backbone, images = self.frozen_backbone(task), self.training_images(support)
        attention_sites(backbone, self.encoder, self.position)  # a tower it cannot adapt is refused before any work
        classnames, template = list(images.classnames), self.prompt(images)
        text_trains = self.encoder in ("both", "text")
        classifier = (lambda enc: one_prompt_classifier(enc, classnames, template)) if text_trains else task.classifier
        settings = self.adamw_settings(backbone, seed, self.steps * task.shots)
        paths = [it.path for it in images.items]
        self.adapted = train_image_encoder(
            backbone,
            lambda b: [],
            paths,
            support.labels,
            classifier,
            task.logit_scale,
            settings,
            adapt=self.installer(seed),
        )
        with torch.no_grad():
            self.text_classifier = one_prompt_classifier(self.adapted, classnames, template).cpu()
        steps = training_steps(len(paths), settings)
        self._forward_passes = sum(len(i) for _, i in steps) + len(classnames) * (len(steps) * text_trains + 1)
        self.selected_ = {
            "how": "rule",
            "iterations": len(steps),
            "template": template,
            "init_seed": seed,
            "train_augmentation": "RandomResizedCrop 0.08-1 + flip, on the fly",
        }

    def checkpoint_tensors(self, backbone: Backbone) -> dict[str, Tensor] | None:
        """The adapted projections with their adapters merged in: a plain checkpoint of the same architecture."""
        return None if self.adapted is None else merged_tensors(self.adapted)

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        encoder, names = adapted_copy(self.frozen_backbone(task), [], self.installer(0))
        params = model_parameters(encoder)
        return {**{n: tuple(params[n].shape) for n in names}, "text_classifier": (task.num_classes, task.W0.shape[1])}
