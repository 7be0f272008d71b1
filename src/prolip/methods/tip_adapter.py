"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022; github.com/gaopengcuhk/Tip-Adapter, ``main.py``,
``utils.py``, ``configs/*.yaml``): a key-value cache of the support set.

logits = s·f·Tᵀ + α · exp(−β(1 − f·Kᵀ)) · onehot(y), f and K L2-normalised embeddings. The keys are the
normalised mean over ``augment_views`` (10, ``augment_epoch``) augmented views of the unnormalised features, as
``build_cache_model`` does. α, β are searched as ``search_hp`` does: β_i = 0.1 + i·(scale_β − 0.1)/steps_β,
α_j likewise, β-major, the first strictly better pair wins — but on the few-shot validation set (the original
also searches on its val split; the selection never sees test labels). The original tunes the grid, the initial α
and the epochs per dataset (``configs/``, table ``TIP_CONFIGS`` below, applied by the harness for the benchmark
datasets); the class defaults are ImageNet's. Without validation α0, β0 are kept.

Tip-Adapter-F also trains the keys (the linear layer initialised at K, never renormalised) with the initial
α0, β0: AdamW lr 1e-3, eps 1e-4, PyTorch's default weight decay 0.01, batch 256, 20 epochs, cosine to 0 per
iteration, every epoch re-augmented (here: cached view e mod V), then searches α, β again with the trained
keys. The original keeps the epoch with the best *test* accuracy; here the epoch with the best validation
accuracy (ties → earliest, as its strict ">") when a validation set is given, otherwise the last epoch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.constraints import (
    LEARNING_RATE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Flag,
    Number,
    Pair,
)
from prolip.functional import accuracy, chunk_rows, cosine_logits, map_rows, row_slices
from prolip.methods import register
from prolip.methods._common import embed, fresh_view_per_epoch, mean_view_embedding, train_minibatch
from prolip.methods.base import Capabilities, Method, Support, Task, Validation


def search_grid(scale: float, steps: int) -> tuple[float, ...]:
    """``search_hp``'s list: steps values from 0.1 toward ``scale`` (excluded)."""
    return tuple(i * (scale - 0.1) / steps + 0.1 for i in range(steps))


def cache_logits(f_norm: Tensor, keys: Tensor, values: Tensor, beta: float | Tensor) -> Tensor:
    """Tip-Adapter's cache term exp(−β(1 − f·Kᵀ))·V for normalised f [N, D], keys [M, D], values [M, C], built a
    few rows of f at a time (``prolip.functional.map_rows``): never more than one [rows, M] block of affinities."""
    return map_rows(lambda rows: torch.exp(-beta * (1 - rows @ keys.T)) @ values, f_norm, keys.shape[0])


def search_alpha_beta(
    zs_logits: Tensor,
    f_norm: Tensor,
    keys: Tensor,
    values: Tensor,
    labels: Tensor,
    betas: tuple[float, ...],
    alphas: tuple[float, ...],
) -> tuple[float, float, float]:
    """Grid search of (α, β) by accuracy, vectorised over α; returns (alpha, beta, accuracy %). The affinities
    f·Kᵀ of the normalised validation embeddings f are built a block of rows at a time and every (β, α) counts its
    correct predictions there, so the search holds one [rows, M] block, not [N, M]."""
    alpha_t = torch.tensor(alphas)
    correct = torch.zeros(len(betas), len(alphas), dtype=torch.long)
    width = max(keys.shape[0], len(alphas) * values.shape[1])  # the affinity block, or the α-batched logits
    for rows in row_slices(f_norm.shape[0], chunk_rows(width)):
        affinity, zs, truth = f_norm[rows] @ keys.T, zs_logits[rows], labels[rows]
        for b, beta in enumerate(betas):
            cache = torch.exp(-beta * (1 - affinity)) @ values
            correct[b] += ((zs + alpha_t[:, None, None] * cache).argmax(-1) == truth).sum(-1)
    best = (-1.0, alphas[0], betas[0])
    for b, beta in enumerate(betas):
        accs = correct[b].float() / f_norm.shape[0] * 100  # = the mean of the float correctness, as unchunked
        i = int(accs.argmax())  # first maximum = smallest α, as the original's strict ">" keeps the first
        if accs[i] > best[0]:
            best = (accs[i].item(), alphas[i], beta)
    return best[1], best[2], best[0]


def _tip_configs() -> dict[str, dict[str, Any]]:
    """Tip-Adapter's ``configs/<dataset>.yaml`` (gaopengcuhk/Tip-Adapter, lines 17-31): init_alpha, search_scale
    [β, α] and train_epoch per dataset; init_beta 1, search_step [200, 20], lr 1e-3, augment_epoch 10 everywhere."""
    table = {  # dataset: (init_alpha, search_scale, train_epoch)
        "Caltech101": (3.0, (12.0, 5.0), 20),
        "DescribableTextures": (2.0, (13.0, 13.0), 20),
        "EuroSAT": (2.0, (12.0, 10.0), 100),
        "FGVCAircraft": (5.0, (30.0, 30.0), 20),
        "Food101": (1.17, (10.0, 10.0), 20),
        "ImageNet": (1.17, (7.0, 3.0), 20),
        "OxfordFlowers": (10.0, (50.0, 50.0), 20),
        "OxfordPets": (1.17, (7.0, 3.0), 20),
        "StanfordCars": (3.0, (20.0, 10.0), 20),
        "SUN397": (1.17, (12.0, 10.0), 20),
        "UCF101": (3.0, (7.0, 3.0), 20),
    }
    return {
        name: {"alpha": alpha, "search_scale": scale, "epochs": epochs}
        for name, (alpha, scale, epochs) in table.items()
    }


TIP_CONFIGS = _tip_configs()


@register
class TipAdapter(Method):
    name = "tip-adapter"
    capabilities = Capabilities(selects="α and β (search_hp's grid)")
    dataset_defaults = {name: {k: v for k, v in c.items() if k != "epochs"} for name, c in TIP_CONFIGS.items()}
    constraints = {
        "alpha": NON_NEGATIVE,
        "beta": NON_NEGATIVE,
        "search": Flag(),
        "search_scale": Pair(POSITIVE),
        "search_step": Pair(POSITIVE_INT),
        "augment_views": POSITIVE_INT,
    }

    def __init__(
        self,
        alpha: float = 1.17,  # configs/imagenet.yaml init_alpha
        beta: float = 1.0,  # configs/*.yaml init_beta
        search: bool = True,  # configs/*.yaml search_hp
        search_scale: tuple[float, float] = (7.0, 3.0),  # configs/imagenet.yaml search_scale (β, α)
        search_step: tuple[int, int] = (200, 20),  # configs/*.yaml search_step (β, α)
        augment_views: int = 10,
    ):  # configs/*.yaml augment_epoch
        self.alpha, self.beta, self.search, self.augment_views = alpha, beta, search, augment_views
        self.search_scale, self.search_step = search_scale, search_step
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def _blend(self, e: Tensor, keys: Tensor, alpha: float, beta: float, classifier: Tensor | None = None) -> Tensor:
        assert self.task is not None and self.values is not None
        T = self.task.classifier if classifier is None else classifier
        zs = cosine_logits(e, T, self.task.logit_scale)
        return zs + alpha * cache_logits(F.normalize(e, dim=-1), keys, self.values, beta)

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        self.keys = F.normalize(mean_view_embedding(task, support, self.augment_views), dim=-1)
        self.values = F.one_hot(support.labels, task.num_classes).float()
        self.selected_ = {"alpha": self.alpha, "beta": self.beta, "how": "rule"}
        self._train_keys(support, val, seed)
        if val is not None and self.search:
            e = embed(task, val.features)
            zs = cosine_logits(e, task.classifier, task.logit_scale)
            betas = search_grid(self.search_scale[0], self.search_step[0])
            alphas = search_grid(self.search_scale[1], self.search_step[1])
            f_norm = F.normalize(e, dim=-1)
            alpha, beta, acc = search_alpha_beta(zs, f_norm, self.keys, self.values, val.labels, betas, alphas)
            self.selected_.update(alpha=alpha, beta=beta, how="validation", val_accuracy=acc)

    def _train_keys(self, support: Support, val: Validation | None, seed: int) -> None:
        """Tip-Adapter keeps its keys; Tip-Adapter-F trains them."""

    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.keys is not None
        alpha, beta, keys = self.selected_["alpha"], self.selected_["beta"], self.keys
        return map_rows(lambda e: self._blend(e, keys, alpha, beta), embed(self.task, z), keys.shape[0])

    def state_dict(self) -> dict[str, Tensor]:
        if self.keys is None or self.values is None:
            return {}
        return {
            "keys": self.keys,
            "values": self.values,
            "alpha_beta": torch.tensor([self.selected_["alpha"], self.selected_["beta"]]),
        }

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        # The cache holds one key per support image, a number only the saved state knows: checked for consistency.
        return {"keys": (-1, task.W0.shape[1]), "values": (-1, task.num_classes), "alpha_beta": (2,)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.keys, self.values = state["keys"], state["values"]
        if self.keys.shape[0] != self.values.shape[0]:
            raise ValueError(f"{self.name} state: {self.keys.shape[0]} keys but {self.values.shape[0]} values")
        alpha, beta = state["alpha_beta"].tolist()
        self.selected_ = {"alpha": alpha, "beta": beta, "how": "loaded"}


@register
class TipAdapterF(TipAdapter):
    name = "tip-adapter-f"
    capabilities = Capabilities(selects="α and β (search_hp's grid) and the training epoch")
    dataset_defaults = TIP_CONFIGS
    constraints = {
        **TipAdapter.constraints,
        "lr": LEARNING_RATE,
        "epochs": NON_NEGATIVE_INT,
        "batch_size": POSITIVE_INT,
        "views": Number(low=1, integer=True, optional=True),
    }

    def __init__(
        self,
        alpha: float = 1.17,
        beta: float = 1.0,
        search: bool = True,
        search_scale: tuple[float, float] = (7.0, 3.0),
        search_step: tuple[int, int] = (200, 20),
        augment_views: int = 10,
        lr: float = 1e-3,  # configs/*.yaml lr
        epochs: int = 20,  # configs/*.yaml train_epoch (EuroSAT: 100)
        batch_size: int = 256,  # main.py train_loader_F batch_size
        views: int | None = None,
    ):
        super().__init__(alpha, beta, search, search_scale, search_step, augment_views)
        self.lr, self.epochs, self.batch_size, self.views = lr, epochs, batch_size, views

    def _train_keys(self, support: Support, val: Validation | None, seed: int) -> None:
        assert self.task is not None and self.keys is not None
        keys = self.keys.clone().requires_grad_(True)
        best: dict[str, Any] = {"acc": -1.0, "keys": keys.detach().clone(), "epoch": -1}
        val_e = None if val is None else embed(self.task, val.features)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(self._blend(x, keys, self.alpha, self.beta), y)

        def keep_best(epoch: int) -> None:
            if val_e is not None and val is not None:
                with torch.no_grad():
                    logits = map_rows(lambda e: self._blend(e, keys, self.alpha, self.beta), val_e, keys.shape[0])
                    acc = accuracy(logits, val.labels)
                if acc > best["acc"]:
                    best.update(acc=acc, keys=keys.detach().clone(), epoch=epoch)

        # main.py run_tip_adapter_F: AdamW(lr, eps=1e-4) with PyTorch's default weight decay (0.01), cosine over
        # train_epoch × len(train_loader_F) iterations; the loader keeps its last partial batch.
        train_minibatch(
            [keys],
            loss_fn,
            fresh_view_per_epoch(self.task, support, self.views),
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="adamw",
            lr=self.lr,
            seed=seed,
            schedule="iteration",
            eps=1e-4,
            weight_decay=0.01,
            on_epoch_end=keep_best,
        )
        if val_e is None:
            self.keys = keys.detach()
            self.selected_["epoch"] = {"value": self.epochs - 1, "how": "last"}
        else:
            self.keys = best["keys"]
            self.selected_["epoch"] = {"value": best["epoch"], "how": "validation"}
