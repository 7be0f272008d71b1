"""ProKeR (Bendou et al., CVPR 2025, "A Kernel Perspective on Training-Free Few-Shot Adaptation of Large
Vision-Language Models"): proximal kernel ridge regression anchored on the zero-shot classifier. The authors' code
is read from its copy in github.com/omarnust/BReg-Adapter (``trainers/proker.py``, ``main.py``, ``utils.py``,
``configs/RN50/configs_proker/``); github.com/ybendou/ProKeR itself holds only the project page here.

The support set is M = N·V vectors f, the L2-normalised embeddings of V augmented views of the N images stacked
(main.py:36-44; V = ``augment_views``, ``--augment-epoch``, default 10, utils.py:35; with V = 1 the original uses
the center crop, ``train_tranform_clean``, main.py:102). With the RBF kernel on the sphere
``k(x, y) = exp(−β (1 − x·y))`` (proker.py:9-10), Y the one-hot labels and T the text classifier, the dual
coefficients solve

    (K_SS / λ + I) α = Y − F_S Tᵀ                                    (proker.py:44, 56)

and the logits are ``f·Tᵀ + k(f, S) α`` (proker.py:60-61): the zero-shot cosine scores (not multiplied by the
logit scale, as the original) plus a kernel regression of what zero-shot gets wrong. λ → 0 gives back zero-shot.

Hyperparameters. With a validation set, (β, λ) is searched on ``torch.linspace`` grids per dataset
(configs/RN50/configs_proker/<dataset>.yaml, table ``PROKER_GRIDS``; β-major, the first strict improvement kept,
proker.py:39-49); the class default is the grid most of those configs use. Without one, the values its
``hp_selection == "imagenet"`` mode transfers to every dataset, per shot count (configs/RN50/configs_proker/
hyperparameters.json; ``how: "rule"``) — selected by the authors on ImageNet, whose validation set is its test
set in their main.py (:146-149), which ``selected_["source"]`` says. Only RN50 configs exist; they are used for
every backbone. One quirk left behind: proker.py:24 checks for a saved ``seed_{seed}_shots{shots}.json`` but
loads ``seed{seed}_shots{shots}.json``, so it re-searches every time; here the search always runs too.

Memory and time (ProKeR issue #2: 16-shot ImageNet with more than one view runs out of memory on a 32 GB GPU).
Every λ is one Cholesky solve of the symmetric positive definite system (the original calls ``torch.linalg.solve``,
an LU, per (β, λ)); in float64, on the backbone's device when the task has one (a GPU solves 16-shot ImageNet's
system in seconds), else where the features are. One M × M float64 matrix is held, whatever the grid: the kernel is
built into it in row blocks, scaled and factorised in place (the Cholesky factor overwrites the system; the two
triangular solves read it where it is, where ``cholesky_solve`` would copy it), and built again for the next λ
(M²·D work, small beside the M³/3 of the factorisation). Kernel blocks against validation or test images are built
a few rows at a time (at most ``prolip.functional.BLOCK_ELEMENTS`` elements and ``ROW_CHUNK`` rows), so scoring
never holds more than one block. The dense M × M system is what must fit: before building it, the memory it needs
(``DENSE_COPIES`` matrices of M² float64) is compared with what the device has free, and a too-large M is refused
naming ``augment_views``. The ImageNet configs' active grids are the ones marked "#epoch 1"
(configs/RN50/configs_proker/imagenet.yaml), so ImageNet defaults to one view: 16-shot ImageNet is then
M = 16,000, about 2 GB.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from prolip.constraints import POSITIVE_INT, Flag, Linspace, Number
from prolip.functional import chunk_rows, row_slices
from prolip.methods import register
from prolip.methods._common import embed
from prolip.methods.base import Capabilities, FitError, Method, Support, Task, Validation

ROW_CHUNK = 4096  # at most this many rows of a kernel block against validation or test images built at once
# M × M float64 matrices alive at the peak of one (β, λ): the kernel, which becomes K/λ + I and then its Cholesky
# factor in place (the blocks beside it are bounded by prolip.functional.BLOCK_ELEMENTS).
DENSE_COPIES = 1


def _grids() -> dict[str, dict[str, tuple[float, float, int]]]:
    """configs/RN50/configs_proker/<dataset>.yaml: β and λ as ``torch.linspace(start, stop, num)``."""
    table = {  # dataset: (beta, lmbda)
        "Caltech101": ((0.5, 3.0, 20), (0.001, 1.0, 10)),
        "DescribableTextures": ((0.1, 10.0, 20), (0.001, 10.0, 100)),
        "EuroSAT": ((0.5, 3.0, 20), (0.001, 1.0, 100)),
        "FGVCAircraft": ((0.5, 3.0, 20), (0.001, 1.0, 10)),
        "Food101": ((0.5, 3.0, 20), (0.001, 1.0, 10)),
        "ImageNet": ((1.5, 3.0, 10), (0.05, 0.25, 10)),
        "OxfordFlowers": ((0.1, 10.0, 20), (0.001, 10.0, 100)),
        "OxfordPets": ((0.01, 5.0, 40), (0.01, 0.3, 20)),
        "StanfordCars": ((0.1, 10.0, 5), (0.01, 1.0, 5)),
        "SUN397": ((0.1, 10.0, 20), (0.01, 10.0, 10)),
        "UCF101": ((0.5, 3.0, 20), (0.001, 1.0, 10)),
    }
    return {name: {"beta_grid": beta, "lam_grid": lam} for name, (beta, lam) in table.items()}


PROKER_GRIDS = _grids()
# configs/RN50/configs_proker/hyperparameters.json: (β, λ) per shot count, transferred from ImageNet.
TRANSFERRED = {1: (3.0, 0.05), 2: (2.6, 0.05), 4: (1.5, 0.05), 8: (1.66, 0.07), 16: (1.7, 0.1)}
TRANSFER_SOURCE = (
    "configs/RN50/configs_proker/hyperparameters.json: selected by ProKeR's authors on ImageNet, "
    "whose validation set is its test set in their main.py"
)


# ----------------------------------------------------------------------------------------------- pure maths


def rbf_kernel(x: Tensor, y: Tensor, beta: float) -> Tensor:
    """``exp(−β (1 − x·yᵀ))`` for L2-normalised rows (proker.py:9-10), in place on the product: β·(a − 1) is
    exactly −β·(1 − a) (negation is exact), so no second block is allocated."""
    return (x @ y.T).sub_(1).mul_(beta).exp_()


def transferred_hyperparameters(shots: int) -> tuple[float, float]:
    """(β, λ) of hyperparameters.json for the listed shot count nearest to ``shots`` (ties: the smaller one)."""
    nearest = min(TRANSFERRED, key=lambda listed: (abs(listed - shots), listed))
    return TRANSFERRED[nearest]


def kernel_rows(x: Tensor, y: Tensor) -> list[slice]:
    """The row blocks of x in which a kernel against y is built: at most ``ROW_CHUNK`` rows and
    ``prolip.functional.BLOCK_ELEMENTS`` elements each (both read at call time)."""
    return list(row_slices(x.shape[0], min(ROW_CHUNK, chunk_rows(y.shape[0]))))


def build_kernel(out: Tensor, x: Tensor, y: Tensor, beta: float) -> Tensor:
    """``rbf_kernel(x, y, β)`` written into ``out`` [len(x), len(y)] one row block at a time (the same values:
    each row is the same product), so only one block of temporaries is alive beside it."""
    for rows in kernel_rows(x, y):
        out[rows] = rbf_kernel(x[rows], y, beta)
    return out


def kernel_times(x: Tensor, y: Tensor, beta: float, coefficients: Tensor) -> Tensor:
    """``rbf_kernel(x, y, β) @ coefficients`` without holding the whole [len(x), len(y)] kernel."""
    out = coefficients.new_empty((x.shape[0], coefficients.shape[1]))
    for rows in kernel_rows(x, y):
        out[rows] = rbf_kernel(x[rows], y, beta) @ coefficients
    return out


def solve_dual(kernel: Tensor, residual: Tensor, lam: float, overwrite: bool = False) -> Tensor:
    """α solving ``(K/λ + I) α = R`` (proker.py:44, 56) by Cholesky: K is positive semi-definite, so the system is
    symmetric positive definite. ``overwrite``: the system, then its factor, are computed in ``kernel``'s memory
    (it holds neither K nor K/λ + I afterwards), so no second M × M matrix is allocated."""
    system = kernel.div_(lam) if overwrite else kernel / lam
    system.diagonal().add_(1)
    # The factor of the symmetric system read as its (column-major) transpose: LAPACK factorises that memory in
    # place, with the very values a copy would give (a row-major ``out`` would be copied to column-major first).
    factor = torch.linalg.cholesky(system.mT, out=system.mT)
    del system
    # cholesky_solve's two triangular solves, without the copy of the factor it makes first.
    half = torch.linalg.solve_triangular(factor, residual, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


def free_memory_bytes(device: torch.device) -> int | None:
    """What the device has free now (None when it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_dense_fits(samples: int, views: int, device: torch.device) -> None:
    """Refuse, before building it, a kernel system the machine cannot hold."""
    need = DENSE_COPIES * samples**2 * 8
    free = free_memory_bytes(device)
    if free is not None and need > free:
        raise FitError(
            f"proker: its kernel system has M = {samples:,} support vectors ({views} views per image), "
            f"whose dense solve needs about {need / 1e9:.1f} GB but {free / 1e9:.1f} GB are free; lower "
            f"augment_views (ProKeR's ImageNet settings use 1)"
        )


def views_used(augment_views: int, views: int) -> int:
    """The support views ProKeR stacks: up to ``augment_views`` of the ``views`` cached; one means the center crop."""
    return max(1, min(augment_views, views))


# ----------------------------------------------------------------------------------------------- the Method


@register
class ProKeR(Method):
    """Proximal kernel ridge regression of the zero-shot classifier's residuals (training-free).

    beta, lam (None: hyperparameters.json's ImageNet-transferred values for the shot count), search (True: (β, λ)
    searched on the validation set over beta_grid × lam_grid), beta_grid and lam_grid ([start, stop, num] of
    ``torch.linspace``; per dataset from configs/RN50/configs_proker/), augment_views (10: main.py's
    --augment-epoch default; ImageNet 1, the "#epoch 1" grids of configs/RN50/configs_proker/imagenet.yaml).
    """

    name = "proker"
    capabilities = Capabilities(
        selects="β and λ on its per-dataset linspace grids (configs/RN50/configs_proker/)",
        # one view used is the center crop (main.py:102's train_tranform_clean), so the rule is _support's own
        reads_center=lambda hp, views: views_used(hp["augment_views"], views) == 1,
    )
    dataset_defaults = {
        **{name: dict(grids) for name, grids in PROKER_GRIDS.items()},
        "ImageNet": {**PROKER_GRIDS["ImageNet"], "augment_views": 1},
    }
    constraints = {
        "beta": Number(low=0, open_low=True, optional=True),
        "lam": Number(low=0, open_low=True, optional=True),
        "search": Flag(),
        "beta_grid": Linspace(),
        "lam_grid": Linspace(),
        "augment_views": POSITIVE_INT,
    }

    def __init__(
        self,
        beta: float | None = None,  # None: hyperparameters.json, per shot count
        lam: float | None = None,  # None: hyperparameters.json, per shot count
        search: bool = True,  # proker.py:31-49 searches whenever a validation set is given
        beta_grid: tuple[float, float, int] = (0.5, 3.0, 20),  # caltech101/fgvc/food101/ucf101.yaml beta
        lam_grid: tuple[float, float, int] = (0.001, 1.0, 10),  # caltech101/fgvc/food101/ucf101.yaml lmbda
        augment_views: int = 10,
    ):  # main.py --augment-epoch (utils.py:35)
        self.beta, self.lam, self.search = beta, lam, search
        self.beta_grid, self.lam_grid, self.augment_views = beta_grid, lam_grid, augment_views
        self.support_embeddings: Tensor | None = None
        self.dual: Tensor | None = None

    # -- fitting -------------------------------------------------------------------------------------------
    def _support(self, task: Task, support: Support) -> tuple[Tensor, Tensor, int]:
        """(normalised embeddings [M, D], labels [M], views used): V views stacked view-major, or the center crops."""
        count = views_used(self.augment_views, support.views.num_views)
        if count == 1:
            return F.normalize(embed(task, support.center_features()), dim=-1), support.labels, 1
        views = [F.normalize(embed(task, support.views.view(t)), dim=-1) for t in range(count)]
        return torch.cat(views), support.labels.repeat(count), count

    def _fit(self, task: Task, support: Support, val: Validation | None, seed: int) -> None:
        # Closed form on fixed views: ``seed`` changes nothing.
        device = torch.device(getattr(task.backbone, "device", None) or task.W0.device)
        S, labels, views = self._support(task, support)
        check_dense_fits(S.shape[0], views, device)
        S64 = S.to(device, torch.float64)
        residual = F.one_hot(labels, task.num_classes).to(device, torch.float64) - S64 @ _classifier(task, device).T
        dense = S64.new_empty((S64.shape[0], S64.shape[0]))  # the one M × M matrix: kernel, system, factor
        if val is not None and self.search:
            beta, lam, acc = self._search(task, S64, residual, val, dense)
            self.selected_ = {"beta": beta, "lam": lam, "how": "validation", "val_accuracy": acc}
        else:
            beta, lam = self._given(task.shots)
        self.support_embeddings = S.float()
        dual = solve_dual(build_kernel(dense, S64, S64, beta), residual, lam, overwrite=True)
        del dense
        self.dual = dual.float().to(S.device)
        self.selected_.update(beta=beta, lam=lam, views=views, support_vectors=S.shape[0], solved_on=device.type)

    def _given(self, shots: int) -> tuple[float, float]:
        beta, lam = transferred_hyperparameters(shots)
        rule = self.beta is None or self.lam is None
        beta = beta if self.beta is None else float(self.beta)
        lam = lam if self.lam is None else float(self.lam)
        self.selected_ = {"how": "rule", "source": TRANSFER_SOURCE} if rule else {"how": "given"}
        return beta, lam

    def _search(
        self, task: Task, S: Tensor, residual: Tensor, val: Validation, dense: Tensor
    ) -> tuple[float, float, float]:
        """(β, λ, validation accuracy %): β-major over the grids, the first strict improvement kept. ``dense`` [M, M]
        holds each (β, λ)'s kernel, then its system and factor, in turn."""
        betas = torch.linspace(*self.beta_grid[:2], int(self.beta_grid[2]), dtype=torch.float64).tolist()
        lams = torch.linspace(*self.lam_grid[:2], int(self.lam_grid[2]), dtype=torch.float64).tolist()
        f = F.normalize(embed(task, val.features.float()), dim=-1).to(S.device, torch.float64)
        zero_shot, labels = f @ _classifier(task, S.device).T, val.labels.to(S.device)
        best = (-1.0, betas[0], lams[0])
        for beta in betas:
            for lam in lams:
                dual = solve_dual(build_kernel(dense, S, S, beta), residual, lam, overwrite=True)
                logits = kernel_times(f, S, beta, dual).add_(zero_shot)  # = zero_shot + …, in place
                acc = (logits.argmax(-1) == labels).double().mean().item() * 100
                if acc > best[0]:
                    best = (acc, beta, lam)
        return best[1], best[2], best[0]

    # -- predicting ----------------------------------------------------------------------------------------
    def _logits(self, z: Tensor, classifier: Tensor) -> Tensor:
        assert self.task is not None and self.support_embeddings is not None and self.dual is not None
        beta, S, dual = self.selected_["beta"], self.support_embeddings, self.dual
        f = F.normalize(embed(self.task, z), dim=-1)
        out = f.new_empty((f.shape[0], dual.shape[1]))
        for rows in kernel_rows(f, S):  # one [rows, M] kernel block at a time
            out[rows] = f[rows] @ self.task.classifier.T + rbf_kernel(f[rows], S, beta) @ dual
        return out

    def trainable_parameters(self) -> int:
        """What the fit solves for: the dual coefficients (nothing is trained by gradient)."""
        return 0 if self.dual is None else self.dual.numel()

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        if self.support_embeddings is None or self.dual is None:
            return {}
        return {
            "support_embeddings": self.support_embeddings,
            "dual": self.dual,
            "beta_lam": torch.tensor([self.selected_["beta"], self.selected_["lam"]]),
        }

    def state_shapes(self, task: Task) -> dict[str, tuple[int, ...]]:
        # One support vector per image and view: a number only the saved state knows, checked for consistency.
        return {"support_embeddings": (-1, task.W0.shape[1]), "dual": (-1, task.num_classes), "beta_lam": (2,)}

    def _load(self, task: Task, state: dict[str, Tensor]) -> None:
        self.support_embeddings, self.dual = state["support_embeddings"], state["dual"]
        if self.support_embeddings.shape[0] != self.dual.shape[0]:
            raise ValueError(
                f"{self.name} state: {self.support_embeddings.shape[0]} support vectors but "
                f"{self.dual.shape[0]} dual coefficients"
            )
        beta, lam = state["beta_lam"].tolist()
        self.selected_ = {"beta": beta, "lam": lam, "how": "loaded"}


def _classifier(task: Task, device: torch.device) -> Tensor:
    return task.classifier.to(device, torch.float64)
