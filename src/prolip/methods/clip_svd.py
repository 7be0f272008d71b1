"""CLIP-SVD (Koleilat, Rivaz & Xiao, 2025, "Singular Value Few-shot Adaptation of Vision-Language Models", arXiv
2509.03740; github.com/HealthX-Lab/CLIP-SVD, ``main.py``, ``train.py``, ``run_utils.py``,
``svf_utils/svf_torch.py``, ``svf_utils/utils.py``, ``svf_utils/PlainHeadAttention.py``,
``configs/few_shot/*.yaml``): every weight matrix of the transformer blocks of both encoders is written as its
singular value decomposition ``W = U diag(s) Vᵀ``, U and V frozen, and only the singular values s train, on the
support images, through the one image-level path of :mod:`prolip.image_training`.

What is decomposed (train.py:86-103): the attention of every block is first rebuilt with separate q, k, v and
output projections (``PlainMultiHeadAttention.set_parameters``, PlainHeadAttention.py:141-174: q, k, v are the
three row blocks of ``in_proj_weight``), then every ``nn.Linear`` of the model becomes ``SVD_Linear``
(``resolver`` / ``DatafreeSVD``, svf_torch.py:165-293: ``registered_param_op = [nn.Linear]``, nothing skipped),
i.e. ``x → x Vᵀ → · s → · Uᵀ + b`` (``SVD_Linear.forward``, svf_torch.py:73-77) with U, S, V from ``torch.svd``
of W (``d_nsvd``, svf_torch.py:11-36). In a CLIP ViT those are, per block of each tower, q, k, v, the output
projection and the MLP's two layers (c_fc, c_proj); the patch embedding (a Conv2d) and the two final projections
(plain parameters) stay as they are. The rank kept is ``round_to_nearest(min(out, in), ratio)`` =
⌊⌊n·ratio⌋ / 4⌋ · 4 (svf_torch.py:268-273) with ratio 1 (main.py:30 ``--rank 1.0``): the full rank for CLIP's
widths, so at initialisation every logit is zero-shot CLIP's, to float32 rounding. Only the singular-value
vectors train (``set_clip_trainable_parameters``, svf_utils/utils.py:24-69: ``vector_S`` of the chosen blocks,
towers and matrices; everything else ``requires_grad=False``): 55,296 numbers in ViT-B/16's image tower and 36,864
in its text tower, 92,160 of its 149.6M parameters (0.06%; the README says 0.04%). After training, U diag(s) Vᵀ is
a plain matrix of W's shape, so ``prolip export`` merges it into a plain open_clip / Hugging Face checkpoint.

Training (train.py:55-195, the few-shot path of main.py:91-93): AdamW over the model's parameters (only s has
gradients; betas 0.9/0.999, eps 1e-8, weight decay 1e-2 from configs/few_shot/*.yaml, applied to s itself, train.py:
125-128) at lr 5e-4 (configs/few_shot/*.yaml, every one of the 11 natural datasets) under CosineAnnealingLR to 1e-6
over ``n_iters × shots`` iterations (main.py:33 ``--n_iters 200``; train.py:121, 129-131), stepped per iteration;
batches of 32 (configs/few_shot/*.yaml) of RandomResizedCrop(0.08-1, bicubic) + flip views (main.py:82-89),
reshuffled as a loader's epochs, the last batch partial; cross-entropy on ``100 · normalize(image) ·
normalize(text)ᵀ`` (main.py:62, train.py:149-158), the text side one prompt per class (the config's ``template``,
train.py:142-145) re-encoded through the adapted text encoder at every step. Predictions use the same one-prompt
classifier through the adapted text encoder (``evaluate_model``, train.py:16-52). Nothing is selected on validation
(train.py:57 ``VALIDATION = False``): the last iteration is kept. The template is the dataset's first (the configs'
templates are CoOp's, except ImageNet's "a photo of a {}." and Food101's "a photo of a {}, a type of food.",
configs/few_shot/imagenet.yaml:15 and food101.yaml:15, per-dataset defaults here).

Departures: training runs in float32 (the original under float16 autocast, train.py:149); the SVD is taken in
float64 on the backbone's device and U, V kept in the weight's dtype, so U diag(s) Vᵀ reproduces W to float32
rounding. A fit, and the reload of a saved run, decompose again: 144 SVDs for ViT-B/16, which took 9 minutes on two
busy CPU cores here (not yet timed on a GPU, where the original runs it). Matrices that do not train are not
decomposed at all (the original decomposes every Linear and freezes the unused s: the same model up to rounding);
with only the image tower training, the one-prompt classifier is computed once (the original re-encodes the same
frozen prompts every step); the rest of the model stays in eval mode (the original calls ``model.train()``,
train.py:136: CLIP has no dropout, and its attention's dropout is 0, PlainHeadAttention.py:11).
Positions: "all" is every block of any tower (the original's "all" is blocks 0-11, svf_utils/utils.py:25-26,
matched against the first number of the parameter's name, so a 24-block ViT-L/14 image tower would train its first
12 only); the others are the original's block indices for 12-block towers. The original rebuilds the attention of
ViT towers only (train.py:86-95), so a ResNet's image tower is refused as CLIP-LoRA's is (``encoder: text``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prolip.backbones.base import Backbone
from prolip.constraints import (
    LEARNING_RATE,
    NON_NEGATIVE,
    POSITIVE_INT,
    Choice,
    Number,
    Subset,
    Template,
)
from prolip.image_training import (
    train_image_encoder,
    training_steps,
)
from prolip.methods import register
from prolip.methods.base import Support, Task, Validation
from prolip.methods.encoder_training import InstalledAdapters
from prolip.methods.lora import HF_PROJECTIONS, chosen_blocks, one_prompt_classifier

ENCODERS = ("both", "vision", "text")  # run_utils.py:31-32 --train_image_encoder / --train_text_encoder
# svf_utils/utils.py:25-38 include_train_layers: blocks of a 12-block tower; "all" is every block of any tower.
POSITIONS = {
    "all": (),
    "top": (8, 9, 10, 11),
    "bottom": (0, 1, 2, 3),
    "middle": (4, 5, 6, 7),
    "top_middle": (4, 5, 6, 7, 8, 9, 10, 11),
    "bottom_middle": (0, 1, 2, 3, 4, 5, 6, 7),
    "top_bottom": (0, 1, 2, 3, 8, 9, 10, 11),
}
# run_utils.py:33-38 --train_mlp, --train_q, --train_k, --train_v and the configs' train_o_proj.
MATRICES = ("q", "k", "v", "o", "mlp")
RANK_BASE = 4  # svf_torch.py:179 rank_base


def kept_rank(full_rank: int, ratio: float) -> int:
    """``round_to_nearest(n, ratio, base_number=4, allow_rank_eq1=True)`` (svf_torch.py:268-273)."""
    rank = math.floor(math.floor(full_rank * ratio) / RANK_BASE) * RANK_BASE
    return min(max(rank, 1), full_rank)


# ----------------------------------------------------------------------------------------------- the parametrisation


class SingularValues(nn.Module):
    """The parametrisation of one weight W [out, in] cut into ``len(decompose)`` equal row blocks (3 for an
    attention's fused q/k/v ``in_proj_weight``, else 1): each block marked True is ``U diag(s) Vᵀ`` with U [out', r]
    and Vᵀ [r, in] frozen buffers, s [r] its row of the trained tensor [blocks, r]; a block marked False is kept as
    it was (a frozen buffer)."""

    U: Tensor
    Vh: Tensor
    kept: Tensor

    def __init__(self, weight: Tensor, decompose: Sequence[bool], ratio: float):
        super().__init__()
        pieces = weight.detach().chunk(len(decompose))
        self.decompose = tuple(decompose)
        U, Vh = [], []
        for piece, chosen in zip(pieces, self.decompose, strict=True):
            if chosen:
                u, _, vh = torch.linalg.svd(piece.double(), full_matrices=False)  # svf_torch.py:27 torch.svd
                rank = kept_rank(min(piece.shape), ratio)
                U.append(u[:, :rank].to(weight.dtype))
                Vh.append(vh[:rank].to(weight.dtype))
        self.register_buffer("U", torch.stack(U))  # [blocks, out', r]
        self.register_buffer("Vh", torch.stack(Vh))  # [blocks, r, in]
        kept = [p.clone() for p, chosen in zip(pieces, self.decompose, strict=True) if not chosen]
        self.register_buffer("kept", torch.stack(kept) if kept else weight.new_zeros(0, *pieces[0].shape))

    def forward(self, s: Tensor) -> Tensor:
        merged = iter((self.U * s[:, None, :]) @ self.Vh)
        kept = iter(self.kept)
        return torch.cat([next(merged) if chosen else next(kept) for chosen in self.decompose])

    def right_inverse(self, weight: Tensor) -> Tensor:
        """The singular values of W's decomposed blocks in the frozen bases: diag(Uᵀ W V) (W's own at init)."""
        pieces = weight.detach().chunk(len(self.decompose))
        chosen = torch.stack([p for p, c in zip(pieces, self.decompose, strict=True) if c]).double()
        s = torch.einsum("bmr,bmn,brn->br", self.U.double(), chosen, self.Vh.double())
        return s.to(weight.dtype)


@dataclass(frozen=True)
class Site:
    """One decomposed weight: the module holding it (by path), the tensor's name, and which row blocks train."""

    path: str
    tensor: str
    decompose: tuple[bool, ...]

    @property
    def trained(self) -> str:
        """The name of its singular values among the model's parameters."""
        return f"{self.path}.parametrizations.{self.tensor}.original"

    @property
    def merged(self) -> str:
        """The name of the weight in the plain checkpoint."""
        return f"{self.path}.{self.tensor}"


def _block_sites(prefix: str, block: nn.Module, attribute: str, matrices: Sequence[str]) -> Iterator[Site]:
    """The weights CLIP-SVD decomposes in one transformer block: q, k, v and the output projection of its attention
    (an open_clip nn.MultiheadAttention's fused ``in_proj_weight`` in three row blocks, or a Hugging Face
    attention's own Linears), and every other nn.Linear of the block (its MLP)."""
    attention = getattr(block, attribute)
    path = f"{prefix}.{attribute}"
    if isinstance(getattr(attention, "in_proj_weight", None), Tensor):
        qkv = tuple(m in matrices for m in ("q", "k", "v"))
        if any(qkv):
            yield Site(path, "in_proj_weight", qkv)
        if "o" in matrices:
            yield Site(f"{path}.out_proj", "weight", (True,))
    else:
        for m in ("q", "k", "v", "o"):
            if m in matrices:
                yield Site(f"{path}.{HF_PROJECTIONS[m]}", "weight", (True,))
    if "mlp" in matrices:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and name.split(".")[0] != attribute:
                yield Site(f"{prefix}.{name}", "weight", (True,))


def svd_sites(backbone: Backbone, encoder: str, position: str, matrices: Sequence[str]) -> list[Site]:
    """Every weight CLIP-SVD decomposes (svf_utils/utils.py:24-69), text tower first; the towers are those the
    backbone's family lets CLIP-LoRA adapt (the original rebuilds the attention of ViT towers only, train.py:86-95),
    or the reason a tower cannot be decomposed."""
    refusal = "clip-svd decomposes the towers CLIP-LoRA adapts, and {}"
    return [
        site
        for path, block, attribute in chosen_blocks(backbone, encoder, position, POSITIONS, refusal)
        for site in _block_sites(path, block, attribute, matrices)
    ]


def site_shape(model: nn.Module, site: Site, ratio: float) -> tuple[int, int]:
    """The shape [blocks, r] of a site's singular values, read without decomposing anything."""
    weight = getattr(model.get_submodule(site.path), site.tensor)
    rows = weight.shape[0] // len(site.decompose)
    return sum(site.decompose), kept_rank(min(rows, weight.shape[1]), ratio)


class SVDInstaller:
    """The ``adapt`` hook of the image-level path: decomposes the chosen weights of a trainable copy and names the
    singular values that train."""

    def __init__(self, encoder: str, position: str, matrices: Sequence[str], rank_ratio: float):
        self.encoder, self.position, self.matrices, self.rank_ratio = encoder, position, tuple(matrices), rank_ratio

    def sites(self, backbone: Backbone) -> list[Site]:
        return svd_sites(backbone, self.encoder, self.position, self.matrices)

    def __call__(self, backbone: Backbone) -> list[str]:
        sites = self.sites(backbone)
        for site in sites:
            module = backbone.model.get_submodule(site.path)
            weight = getattr(module, site.tensor).detach()
            # A Parameter of the copy's own over the frozen tensor's storage: registering the parametrisation
            # re-points it (Tensor.set_) at the singular values, never the backbone's shared tensor.
            setattr(module, site.tensor, nn.Parameter(weight, requires_grad=False))
            parametrize.register_parametrization(
                module, site.tensor, SingularValues(weight, site.decompose, self.rank_ratio)
            )
            getattr(module.parametrizations, site.tensor).original.requires_grad_(True)
        return [site.trained for site in sites]


def merged_tensors(encoder: Backbone) -> dict[str, Tensor]:
    """Every decomposed weight as the plain matrix U diag(s) Vᵀ, by its checkpoint name."""
    out = {}
    with torch.no_grad():
        for path, module in encoder.model.named_modules():
            if parametrize.is_parametrized(module):
                for tensor in module.parametrizations:  # type: ignore[union-attr]
                    out[f"{path}.{tensor}"] = getattr(module, tensor).detach().float().cpu()
    return out


# ----------------------------------------------------------------------------------------------- the Method


@register
class CLIPSVD(InstalledAdapters):
    """Singular-value fine-tuning of both CLIP encoders (see the module docstring).

    encoder ("both" | "vision" | "text"), position ("all", or a block range of svf_utils/utils.py), matrices (q, k,
    v, o, mlp: all), rank_ratio (1: full rank), lr (5e-4), batch_size (32), steps (200 iterations per shot),
    weight_decay (1e-2), min_lr (1e-6), template (None: the dataset's first), aug_seed (seeds the augmented views).
    """

    name = "clip-svd"
    dataset_defaults = {
        "ImageNet": {"template": "a photo of a {}."},  # configs/few_shot/imagenet.yaml:15
        "Food101": {"template": "a photo of a {}, a type of food."},  # configs/few_shot/food101.yaml:15
    }
    constraints = {
        "encoder": Choice(ENCODERS),
        "position": Choice(tuple(POSITIONS)),
        "matrices": Subset(MATRICES),
        "rank_ratio": Number(low=0, open_low=True, high=1),
        "lr": LEARNING_RATE,
        "batch_size": POSITIVE_INT,
        "steps": POSITIVE_INT,
        "weight_decay": NON_NEGATIVE,
        "min_lr": NON_NEGATIVE,
        "template": Template(optional=True),
        "aug_seed": Number(integer=True),
    }

    def __init__(
        self,
        encoder: str = "both",  # configs/few_shot/*.yaml train_image_encoder, train_text_encoder: True
        position: str = "all",  # configs/few_shot/*.yaml include_train_layers: "all"
        matrices: Sequence[str] = MATRICES,  # configs/few_shot/*.yaml train_mlp, train_q/k/v, train_o_proj: True
        rank_ratio: float = 1.0,  # main.py:30 --rank (svf_torch.py:268 round_to_nearest)
        lr: float = 5e-4,  # configs/few_shot/*.yaml lr: 0.0005
        batch_size: int = 32,  # configs/few_shot/*.yaml batch_size
        steps: int = 200,  # main.py:33 --n_iters, per shot (train.py:121)
        weight_decay: float = 1e-2,  # configs/few_shot/*.yaml weight_decay (AdamW, train.py:125-128)
        min_lr: float = 1e-6,  # train.py:129-131 CosineAnnealingLR eta_min
        template: str | None = None,  # configs/few_shot/*.yaml template (train.py:142)
        aug_seed: int = 0,
    ):
        self.encoder, self.position, self.matrices, self.rank_ratio = encoder, position, matrices, rank_ratio
        self.lr, self.batch_size, self.steps, self.weight_decay = lr, batch_size, steps, weight_decay
        self.min_lr, self.template, self.aug_seed = min_lr, template, aug_seed
        self.adapted: Backbone | None = None
        self.text_classifier: Tensor | None = None

    def installer(self, seed: int = 0) -> SVDInstaller:  # nothing random to seed: the SVD is W's own
        return SVDInstaller(self.encoder, self.position, list(self.matrices), self.rank_ratio)

    def is_installed(self, name: str) -> bool:
        return name.endswith(".original")

    def predicting(self) -> contextlib.AbstractContextManager:
        return parametrize.cached()  # U diag(s) Vᵀ once per call, not once per batch

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        backbone, images = self.frozen_backbone(task), self.training_images(support)
        self.installer().sites(backbone)  # a tower it cannot decompose is refused before any work
        classnames, template = list(images.classnames), self.prompt(images)
        text_trains = self.encoder in ("both", "text")

        def text_of(encoder: Backbone) -> Tensor:
            return one_prompt_classifier(encoder, classnames, template)

        classifier: Tensor | Callable[[Backbone], Tensor]
        if text_trains:
            classifier = text_of
        else:
            with torch.no_grad():
                classifier = text_of(backbone)
        settings = self.adamw_settings(backbone, seed, self.steps * task.shots)  # train.py:121, 125-131
        paths = [it.path for it in images.items]
        installer = self.installer()
        self.adapted = train_image_encoder(
            backbone, lambda b: [], paths, support.labels, classifier, task.logit_scale, settings, adapt=installer
        )
        with torch.no_grad(), parametrize.cached():
            self.text_classifier = text_of(self.adapted).cpu() if text_trains else classifier.cpu()  # type: ignore[union-attr]
        steps = training_steps(len(paths), settings)
        self._forward_passes = sum(len(i) for _, i in steps) + len(classnames) * (len(steps) * text_trains + 1)
        self.selected_ = {
            "how": "rule",
            "iterations": len(steps),
            "template": template,
            "decomposed_weights": len(installer.sites(backbone)),
            "shuffle_seed": seed,
            "train_augmentation": "RandomResizedCrop 0.08-1 + flip, on the fly",
        }

    def checkpoint_tensors(self, backbone: Backbone) -> dict[str, Tensor] | None:
        """The decomposed weights merged back (U diag(s) Vᵀ): a plain checkpoint of the same architecture."""
        return None if self.adapted is None else merged_tensors(self.adapted)

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        backbone = self.frozen_backbone(task)
        shapes = {s.trained: site_shape(backbone.model, s, self.rank_ratio) for s in self.installer().sites(backbone)}
        return {**shapes, "text_classifier": (task.num_classes, task.W0.shape[1])}
