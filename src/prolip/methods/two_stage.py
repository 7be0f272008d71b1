"""2SFS (Farina, Mancini, Iacca & Ricci, CVPR 2025, "Rethinking Few-Shot Adaptation of Vision-Language Models in
Two Stages", arXiv 2503.11609; github.com/FarinaMatteo/rethinking_fewshot_vlms, ``main.py``, ``fs/twostage.py``,
``fs/utils/model_utils.py``, ``fs/utils/eval_utils.py``, ``datasets/*.py``): one budget of ``steps × shots``
iterations split in two, both stages through the one image-level path of :mod:`prolip.image_training`.

Stage 1 (``run_twostage``, twostage.py:251-286): the LayerNorm affine parameters (weight and bias) of both encoders
train, everything else frozen (``prepare_for_first_stage`` with ``--peft ln``, twostage.py:12-21), for the first
``int(steps × shots × stage1_fraction)`` iterations (twostage.py:261-262: M = 300, α = 0.6, main.py:63-66), with
cross-entropy on ``s · normalize(image) · normalize(text)ᵀ`` (s CLIP's own ``logit_scale.exp()``, twostage.py:219),
the text side one prompt per class through the tuned text encoder at every step (twostage.py:209-210, 270).
Which LayerNorms: ``trainable_norm_params`` (model_utils.py:26-38) walks ``named_modules_with_index``
(model_utils.py:6-23), which yields ``ln_pre``, ``ln_post`` and ``ln_final`` twice, the second time with block
index -1, and that second visit freezes them again (``module.requires_grad_(False)``): what trains is every
LayerNorm inside the transformer blocks (ln_1 and ln_2 of each block, from block ``vision_start`` / ``text_start``
on, main.py:73-77, default 0) of both towers (``--ln_modality both``, main.py:71) — for ViT-B/16 12 × 2 × 2 × 768 =
36,864 numbers in the image tower and 12 × 2 × 2 × 512 = 24,576 in the text tower, 61,440 of its 149.6M (0.04%;
the original's ``trainable_norm_params`` run on open_clip's ViT-B-16 and on the tiny test ViT leaves exactly these
trainable, checked). Those are the parameters here, found through the family's towers (open_clip and Hugging Face
alike).

Stage 2 (twostage.py:288-310, ``SingleStreamClassifier``, twostage.py:39-76): a linear classifier [C, D]
initialised with the normalised one-prompt text embeddings of the stage-1 text encoder (``_init_classifier``,
twostage.py:59-65), trained alone for the remaining iterations on ``s · normalize(image) ·
normalize(classifier)ᵀ`` with the stage-1 image encoder frozen (``no_grad_backbone=True``, twostage.py:158). Its
loader starts a fresh epoch (the stage-1 loop breaks mid-epoch, twostage.py:236-237): here stage 2 is the same
run's next epochs (``FinetuneSettings.first_epoch``), so its shuffles and augmented views go on from stage 1's.

Both stages: AdamW (betas 0.9/0.999, twostage.py:258 and 291) at lr 2e-4 with weight decay 1e-2 (main.py:49-50),
each under its own CosineAnnealingLR to 1e-6 over its own iterations (twostage.py:263 and 297), stepped per
iteration; batches of 32 (main.py:41) RandomResizedCrop(224, 0.08-1, bicubic) + flip views
(datasets/__init__.py:62-67), reshuffled each epoch, the last batch partial (datasets/utils.py:432). The same
hyperparameters for every dataset (the paper's point): the prompt is "a photo of a {}." everywhere (each dataset
module sets ``template = ['a photo of a {}.']``, e.g. datasets/dtd.py:10, datasets/imagenet.py:194; CoOp's are
commented out). Nothing is selected on validation (``run_twostage`` never reads ``val_loader``): the last
iteration is kept. Predictions (``infer``, twostage.py:80-113, all-to-all): images through the stage-1 image
encoder against the normalised stage-2 classifier. The original's published few-shot splits are read by
:mod:`prolip.data.fewshot_jsonl`.

Departures: training runs in float32 (the original under float16 autocast with a GradScaler, whose skipped steps
do not count, twostage.py:225-228); the rest of the model stays in eval mode (the original calls ``train()``: CLIP
has no dropout); ``--peft lora`` / ``bitfit`` (other first stages) are not offered, only the LayerNorm one its
results use; a ResNet image tower is refused as the original's assertion does (model_utils.py:7-8), ``encoder:
text`` runs. Selective inference on new classes (twostage.py:88-105: a class the classifier lacks is embedded by the
tuned text encoder) needs class names, not a text classifier, so another class set is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prolip.backbones.base import Backbone
from prolip.constraints import (
    FRACTION,
    LEARNING_RATE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    Choice,
    HyperparameterError,
    Number,
    Template,
)
from prolip.image_training import (
    FinetuneSettings,
    encoder_with,
    model_parameters,
    train_image_encoder,
    training_steps,
)
from prolip.methods import register
from prolip.methods.base import Support, Task, Validation
from prolip.methods.encoder_training import EncoderTraining
from prolip.methods.lora import one_prompt_classifier

ENCODERS = ("both", "vision", "text")  # main.py:71 --ln_modality
TEMPLATE = "a photo of a {}."  # datasets/*.py: template = ['a photo of a {}.'] for every dataset
HEAD = "two_stage_head"  # the module stage 2 installs on its (throw-away) copy to hold the classifier
CLASSIFIER = "classifier"  # the stage-2 classifier's name in the state dict


def layer_norm_parameters(backbone: Backbone, encoder: str, vision_start: int = 0, text_start: int = 0) -> list[str]:
    """The parameters stage 1 tunes (model_utils.py:26-38): the affine weight and bias of every LayerNorm inside
    the transformer blocks of the chosen towers, from block ``*_start`` on (the LayerNorms outside the blocks stay
    frozen, as the original's double visit leaves them); text tower first."""
    available = backbone.family.attention_towers(backbone.model, backbone.info.arch)
    names = []
    for tower, start in (("text", text_start), ("vision", vision_start)):
        if encoder not in ("both", tower):
            continue
        found = available[tower]
        if isinstance(found, str):
            raise HyperparameterError(
                f"2sfs tunes the LayerNorms of transformer blocks (the original asserts a ViT, "
                f"fs/utils/model_utils.py:7-8), and {found}"
            )
        prefix, blocks, _ = found
        for i in range(start, len(blocks)):
            for path, module in blocks[i].named_modules():
                if isinstance(module, nn.LayerNorm):
                    where = f"{prefix}.{i}.{path}" if path else f"{prefix}.{i}"
                    names += [f"{where}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return names


class LinearHead(nn.Module):
    """Stage 2's classifier [C, D] (``SingleStreamClassifier.classifier``, twostage.py:65), normalised when used."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())

    def normalised(self) -> Tensor:
        return F.normalize(self.weight, dim=-1)


def stage_iterations(steps: int, shots: int, fraction: float) -> tuple[int, int]:
    """(stage-1, stage-2) iterations: ``int(M·K·α)`` and the rest of M·K (twostage.py:261-262, 296)."""
    total = steps * shots
    first = int(total * fraction)
    return first, total - first


@register
class TwoStage(EncoderTraining):
    """2SFS: LayerNorm tuning of both encoders, then a linear classifier from the tuned text embeddings (see the
    module docstring).

    encoder ("both" | "vision" | "text": whose LayerNorms tune), vision_start / text_start (first block whose
    LayerNorms tune: 0), lr (2e-4), weight_decay (1e-2), batch_size (32), steps (300 iterations per shot, both
    stages together), stage1_fraction (0.6 of them for stage 1), min_lr (1e-6), template ("a photo of a {}."; None:
    the dataset's first), aug_seed (seeds the augmented views).
    """

    name = "2sfs"
    predicts_with = "its stage-2 classifier (another class set needs class names, for the tuned text encoder)"
    default_template = TEMPLATE
    constraints = {
        "encoder": Choice(ENCODERS),
        "vision_start": NON_NEGATIVE_INT,
        "text_start": NON_NEGATIVE_INT,
        "lr": LEARNING_RATE,
        "weight_decay": NON_NEGATIVE,
        "batch_size": POSITIVE_INT,
        "steps": POSITIVE_INT,
        "stage1_fraction": FRACTION,
        "min_lr": NON_NEGATIVE,
        "template": Template(optional=True),
        "aug_seed": Number(integer=True),
    }

    def __init__(
        self,
        encoder: str = "both",  # main.py:71 --ln_modality
        vision_start: int = 0,  # main.py:73 --ln_vision_start
        text_start: int = 0,  # main.py:76 --ln_text_start
        lr: float = 2e-4,  # main.py:49 --lr (both stages, twostage.py:258, 291)
        weight_decay: float = 1e-2,  # main.py:50 --wd (AdamW, both stages)
        batch_size: int = 32,  # main.py:41 --batch_size
        steps: int = 300,  # main.py:63 --n_iters (M), per shot (twostage.py:261)
        stage1_fraction: float = 0.6,  # main.py:65 --n_iters_frac (α), twostage.py:262
        min_lr: float = 1e-6,  # twostage.py:263, 297 CosineAnnealingLR eta_min
        template: str | None = TEMPLATE,  # datasets/*.py template[0] (twostage.py:270, 289)
        aug_seed: int = 0,
    ):
        self.encoder, self.vision_start, self.text_start = encoder, vision_start, text_start
        self.lr, self.weight_decay, self.batch_size, self.steps = lr, weight_decay, batch_size, steps
        self.stage1_fraction, self.min_lr, self.template, self.aug_seed = stage1_fraction, min_lr, template, aug_seed
        self.adapted: Backbone | None = None  # the stage-1 encoder
        self.classifier: Tensor | None = None  # the stage-2 classifier [C, D], as trained (unnormalised)

    def tuned(self, backbone: Backbone) -> list[str]:
        """The names of the parameters stage 1 tunes on ``backbone``."""
        return layer_norm_parameters(backbone, self.encoder, self.vision_start, self.text_start)

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        backbone, images = self.frozen_backbone(task), self.training_images(support)
        classnames, template = list(images.classnames), self.prompt(images)
        text_trains = self.encoder in ("both", "text")
        paths = [it.path for it in images.items]
        first, second = stage_iterations(self.steps, task.shots, self.stage1_fraction)

        def text_of(encoder: Backbone) -> Tensor:
            return one_prompt_classifier(encoder, classnames, template)

        stage1 = self.adamw_settings(backbone, seed, first)  # main.py:49-50, twostage.py:258, 263
        classifier: Tensor | Callable[[Backbone], Tensor]
        if text_trains:
            classifier = text_of
        else:
            with torch.no_grad():
                classifier = text_of(backbone)
        tuned = self.tuned(backbone)
        self.adapted = train_image_encoder(
            backbone, lambda b: tuned, paths, support.labels, classifier, task.logit_scale, stage1
        )
        with torch.no_grad():  # twostage.py:59-65 (the text encoder unchanged: the stage-1 classifier itself)
            init = classifier if isinstance(classifier, Tensor) else text_of(self.adapted)
        steps1 = training_steps(len(paths), stage1)
        stage2 = self.adamw_settings(backbone, seed, second, first_epoch=steps1[-1][0] + 1 if steps1 else 0)
        self.classifier = self._second_stage(init, paths, support.labels, task.logit_scale, stage2)
        steps2 = training_steps(len(paths), stage2)
        seen = sum(len(i) for _, i in steps1 + steps2)
        self._forward_passes = seen + len(classnames) * (len(steps1) * text_trains + 1)
        self.selected_ = {
            "how": "rule",
            "stage1_iterations": len(steps1),
            "stage2_iterations": len(steps2),
            "template": template,
            "tuned_layer_norm_tensors": len(tuned),
            "shuffle_seed": seed,
            "train_augmentation": "RandomResizedCrop 0.08-1 + flip, on the fly",
        }

    def _second_stage(
        self, init: Tensor, paths: Sequence[Any], labels: Tensor, logit_scale: float, settings: FinetuneSettings
    ) -> Tensor:
        """The classifier trained on the stage-1 encoder, which stays frozen: the image-level path with nothing of
        the model chosen and the head installed on its copy (dropped afterwards)."""
        assert self.adapted is not None

        def install(encoder: Backbone) -> list[str]:
            encoder.model.add_module(HEAD, LinearHead(init).to(init.device))
            return [f"{HEAD}.weight"]

        def head_of(encoder: Backbone) -> Tensor:
            head = encoder.model.get_submodule(HEAD)
            assert isinstance(head, LinearHead)
            return head.normalised()

        trained = train_image_encoder(
            self.adapted, lambda b: [], paths, labels, head_of, logit_scale, settings, adapt=install
        )
        return model_parameters(trained)[f"{HEAD}.weight"].detach().float().cpu()

    def classifier_head(self) -> Tensor | None:
        """The stage-2 classifier, normalised [C, D]: the head that goes with the exported checkpoint."""
        return None if self.classifier is None else F.normalize(self.classifier, dim=-1)

    def trainable_parameters(self) -> int:
        """Stage 1's LayerNorm numbers and stage 2's classifier."""
        return sum(t.numel() for t in self.state_dict().values())

    def state_dict(self) -> dict[str, Tensor]:
        if self.adapted is None or self.classifier is None:
            return {}
        params = model_parameters(self.adapted)
        assert self.task is not None
        state = {n: params[n].detach().float().cpu() for n in self.tuned(self.frozen_backbone(self.task))}
        return {**state, CLASSIFIER: self.classifier}

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        backbone = self.frozen_backbone(task)
        params = model_parameters(backbone)
        shapes = {n: tuple(params[n].shape) for n in self.tuned(backbone)}
        return {**shapes, CLASSIFIER: (task.num_classes, task.W0.shape[1])}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        tensors = {k: v for k, v in state.items() if k != CLASSIFIER}
        self.adapted, self.classifier = encoder_with(self.frozen_backbone(task), tensors), state[CLASSIFIER]

    def checkpoint_tensors(self, backbone: Backbone) -> dict[str, Tensor] | None:
        """The tuned LayerNorm weights and biases, by their checkpoint names: a plain checkpoint of the same
        architecture (the stage-2 classifier is the head, :meth:`classifier_head`)."""
        if self.adapted is None:
            return None
        params = model_parameters(self.adapted)
        return {n: params[n].detach().float().cpu() for n in self.tuned(backbone)}
