"""Reference numbers, shown beside ours only where the setting matches exactly: the paper's (its tables) and the
originals' (the README or paper of each method prolip reimplements), each carrying its source and the protocol it was
measured under.

A reference matches an aggregated report row only when every one of these agrees: backbone, its pretrained weights
(OpenAI's for the paper; never random ones), protocol, sampler, the support-set seeds (exactly the reference's
seeds), the number of cached views, whether a validation set was used, the templates of every dataset (compared string
by string with the reference's templates rule), the method and its complete effective hyperparameters (ProLIP's
``precision`` included: the paper ran float16, so only ``precision: reference`` can match), what a grouped row
averages over (e.g. lr 1e-5…1e-2), the test-time settings where there are any, shots, and the set of datasets.
:func:`mismatches` says which of these differ and, where a reference records why prolip's runs differ from the
original's protocol on that point (``Reference.why``), why. Matching is never relaxed to make a number show: an
original measured on its own sampler, templates or recipe stays in :data:`REFERENCES`, with its source, and matches no
prolip row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PAPER = "Fahes et al., arXiv 2410.05270 (ProLIP)"
ELEVEN = frozenset(
    {
        "Caltech101",
        "OxfordPets",
        "StanfordCars",
        "OxfordFlowers",
        "Food101",
        "FGVCAircraft",
        "SUN397",
        "DescribableTextures",
        "EuroSAT",
        "UCF101",
        "ImageNet",
    }
)
OOD = frozenset({"ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"})
# Dataset sets the report also averages over when a table holds them among other datasets (e.g. the test-time
# table: ImageNet and its four variants; the paper quotes the average over the variants alone).
NAMED_SETS = {"ImageNet variants": OOD}
PAPER_SEEDS = tuple(range(1, 11))  # the reference's scripts: for i in {1..10}
PAPER_VIEWS = 300  # aug_views: 300 cached augmented views, one per step

# The reference's templates (its datasets/<name>.py), kept here apart from the data readers so a change there
# cannot silently keep a paper number beside results computed with other templates.
_IMAGENET = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
PAPER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Caltech101": ("a photo of a {}.",),
    "SUN397": ("a photo of a {}.",),
    "StanfordCars": ("a photo of a {}.",),
    "OxfordPets": ("a photo of a {}, a type of pet.",),
    "DescribableTextures": ("{} texture.",),
    "EuroSAT": ("a centered satellite photo of {}.",),
    "FGVCAircraft": ("a photo of a {}, a type of aircraft.",),
    "Food101": ("a photo of {}, a type of food.",),
    "OxfordFlowers": ("a photo of a {}, a type of flower.",),
    "UCF101": ("a photo of a person doing {}.",),
    **{name: _IMAGENET for name in ("ImageNet", *sorted(OOD))},
}
SINGLE_TEMPLATE = ("a photo of a {}.",)
# Templates rules a reference names (``Reference.templates``): per dataset, the exact templates its numbers used.
# "single" is SINGLE_TEMPLATE for every dataset; a rule not here (an original's own prompts) matches nothing.
TEMPLATE_RULES: dict[str, dict[str, tuple[str, ...]]] = {
    "dataset": PAPER_TEMPLATES,
    # HealthX-Lab/CLIP-SVD configs/few_shot/<dataset>.yaml, line 15 ``template``: one prompt per dataset, the paper's
    # per-dataset ones except ImageNet's single "a photo of a {}." (configs/few_shot/imagenet.yaml).
    "clip-svd": {**{d: t for d, t in PAPER_TEMPLATES.items() if d in ELEVEN}, "ImageNet": SINGLE_TEMPLATE},
}

# Hyperparameters that change how a computation is batched, never its result.
IGNORED_HYPERPARAMETERS = frozenset({"grid_chunk"})
MIXED = "<mixed>"  # a row field whose records disagree; it never matches anything


@dataclass(frozen=True)
class Reference:
    model: str
    protocol: str  # as in experiment files; a protocol we never run (e.g. "quoted") never matches
    method: str
    value: float
    shots: int | None  # None: any shot count (zero-shot does not depend on it)
    datasets: frozenset | str  # the averaged dataset set, or one dataset name
    metric: str = "accuracy"
    hyperparameters: tuple = ()  # the method's complete effective hyperparameters, as (key, value) pairs
    over: tuple = ()  # a grouped row: (key, values) it averages over, e.g. (("lr", (1e-5, 1e-4)),)
    label: str | None = None  # protocols that name their rows (test-time: "tta+zeroshot", "tpt")
    templates: str = "dataset"  # "dataset": PAPER_TEMPLATES; "single": SINGLE_TEMPLATE for every dataset
    sampler: str = "lpp"
    seeds: tuple = PAPER_SEEDS  # () for rows without a support set (test-time from W0)
    views: int | None = PAPER_VIEWS  # None: the cached views play no part
    validation: bool = False
    setting: tuple = ()  # protocol settings as ("section.key", value) pairs, e.g. ("tta.views", 64)
    source: str = PAPER  # the citation: paper, or repository + file + table
    protocol_note: str = "LP++ sampler, seeds 1–10, 300 full-batch Adam steps on 300 cached views, float16"
    weights: str = "openai"  # the pretrained weights' tag the row must name
    short: str = "paper"  # the report's label beside the number: "(paper 64.28)", "(CLIP-SVD README 73.20)"
    # (check, reason) pairs: where the original's protocol is one prolip does not run, why (shown by `mismatches`).
    why: tuple = ()


def prolip_hyperparameters(lr: float | None, lam: str | float, precision: str = "reference") -> tuple:
    """ProLIP's effective hyperparameters as the reference ran them (300 steps, no grid); lr None: left out (a row
    averaged over lr)."""
    hp = {"lr": lr, "lam": lam, "steps": 300, "precision": precision, "grid": False, "tie_rule": "first"}
    return tuple((k, v) for k, v in hp.items() if v is not None)


def _series(model, protocol, method, values, shots=(1, 2, 4, 8, 16), **kw) -> list[Reference]:
    return [Reference(model, protocol, method, v, s, **kw) for s, v in zip(shots, values, strict=False)]


_LR_1E5_1_N = prolip_hyperparameters(1e-5, "1/N")
_TTA = (("tta.views", 64), ("tta.ratio", 0.1), ("tta.steps", 1), ("tta.lr", 1e-4), ("tta.max_images", None))
_TTA_NOTE = "64 views, 10% most confident, one AdamW step lr 1e-4 on W, reset per image, full test sets"
REFERENCES: list[Reference] = [
    *_series(
        "RN50", "fewshot", "prolip", (64.28, 67.07, 69.68, 72.57, 75.20), datasets=ELEVEN, hyperparameters=_LR_1E5_1_N
    ),
    Reference(
        "RN50", "fewshot", "zeroshot", 58.89, None, ELEVEN, protocol_note="zero-shot CLIP, per-dataset templates"
    ),
    Reference("RN50", "fewshot", "prolip", 64.48, 16, "ImageNet", hyperparameters=_LR_1E5_1_N),
    Reference(
        "RN50",
        "sensitivity",
        "prolip",
        19.98,
        1,
        ELEVEN,
        hyperparameters=prolip_hyperparameters(1e-2, 0.0),
        protocol_note="λ = 0, lr 1e-2: accuracy collapses without the pull toward W0",
    ),
    # The paper's average over lr 1e-5…1e-2 with λ = 1/N: only a report row grouping exactly those four runs.
    *_series(
        "RN50",
        "fewshot",
        "prolip",
        (64.33, 67.19, 69.94, 72.82, 75.46),
        datasets=ELEVEN,
        hyperparameters=prolip_hyperparameters(None, "1/N"),
        over=(("lr", (1e-5, 1e-4, 1e-3, 1e-2)),),
        protocol_note="mean over the four validation-free runs lr 1e-5, 1e-4, 1e-3, 1e-2 with λ = 1/N",
    ),
    *[
        Reference(
            "ViT-B-16",
            "base2new",
            "prolip",
            v,
            16,
            ELEVEN,
            metric=k,
            hyperparameters=_LR_1E5_1_N,
            protocol_note="CoOp base-to-new: first ⌈C/2⌉ classes, 16 shots, HM of the averaged base and new",
        )
        for k, v in (("base", 84.01), ("new", 73.86), ("hm", 78.61))
    ],
    Reference(
        "ViT-B-16",
        "base2new",
        "prolip",
        79.08,
        16,
        ELEVEN,
        metric="hm",
        hyperparameters=_LR_1E5_1_N,
        templates="single",
        protocol_note="base-to-new with the single template 'a photo of a {}.'",
    ),
    Reference(
        "RN50",
        "tta",
        "zeroshot",
        62.00,
        0,
        "ImageNet",
        label="tta+zeroshot",
        seeds=(),
        views=None,
        setting=_TTA,
        protocol_note=_TTA_NOTE + ", from W0",
    ),
    Reference(
        "RN50",
        "tta",
        "zeroshot",
        47.44,
        0,
        OOD,
        label="tta+zeroshot",
        seeds=(),
        views=None,
        setting=_TTA,
        protocol_note="average over ImageNet-V2/-Sketch/-A/-R; " + _TTA_NOTE,
    ),
    Reference(
        "RN50",
        "tta",
        "zeroshot",
        60.74,
        0,
        "ImageNet",
        label="tpt",
        seeds=(),
        views=None,
        setting=_TTA,
        source=f"{PAPER}, quoting TPT (Shu et al. 2022)",
        protocol_note="TPT as run by the paper",
    ),
    Reference(
        "RN50",
        "tta",
        "zeroshot",
        43.89,
        0,
        OOD,
        label="tpt",
        seeds=(),
        views=None,
        setting=_TTA,
        source=f"{PAPER}, quoting TPT (Shu et al. 2022)",
        protocol_note="average over ImageNet-V2/-Sketch/-A/-R",
    ),
    # Numbers the paper quotes from other papers, each under its own protocol (hyperparameters selected on the test
    # set, or the baseline's own sampler and seeds): kept for the record under a protocol the bench never runs.
    *_series(
        "RN50",
        "quoted",
        "tip-adapter-f",
        (64.60, 75.83),
        shots=(1, 16),
        datasets=ELEVEN,
        protocol_note="Tip-Adapter-F with hyperparameters selected on the test set",
    ),
    *_series(
        "ViT-B-16",
        "quoted",
        "lp++",
        (70.35, 80.32),
        shots=(1, 16),
        datasets=ELEVEN,
        source=f"{PAPER}, quoting LP++ (Huang et al. 2024)",
        protocol_note="LP++'s own protocol",
    ),
    *_series(
        "ViT-B-16",
        "quoted",
        "tip-adapter-f",
        (70.62, 81.15),
        shots=(1, 16),
        datasets=ELEVEN,
        source=f"{PAPER}, quoting Tip-Adapter (Zhang et al. 2022)",
        protocol_note="Tip-Adapter-F's own protocol",
    ),
]


# ----------------------------------------------------------------------------------------------- the originals
# Each original's headline numbers, read from its README or paper (the source names file and table), under the
# protocol it was measured on. Where that protocol is one prolip does not run, the setting that differs says why
# (``why``): the number stays beside no prolip row until prolip runs exactly that protocol.

CLIP_SVD = "HealthX-Lab/CLIP-SVD README.md"
_CLIP_SVD_SAMPLER = (
    "sampler",
    "CLIP-SVD's datasets/ (from CLIP-LoRA) seed random with the task index 1–3 (main.py:53-55) and draw the min(K, 4) "
    "validation images per class before the K support images (datasets/dtd.py:19-21, random.sample, random.choices "
    "for a short class: datasets/utils.py:236-242); prolip's coop sampler draws the support first, so other images",
)
_CLIP_SVD_RECIPE = (
    "hyperparameters",
    "the original trains under float16 autocast (train.py:149) for n_iters 200 × K iterations; prolip's clip-svd "
    "trains in float32 (methods/clip_svd.py, Departures) and records no precision",
)
# prolip's clip-svd hyperparameters at the original's values (configs/few_shot/*.yaml, main.py, train.py), and the
# precision it ran at, which prolip's clip-svd does not offer.
_CLIP_SVD_HP = (
    ("encoder", "both"),
    ("position", "all"),
    ("matrices", ["q", "k", "v", "o", "mlp"]),
    ("rank_ratio", 1.0),
    ("lr", 5e-4),
    ("batch_size", 32),
    ("steps", 200),
    ("weight_decay", 1e-2),
    ("min_lr", 1e-6),
    ("template", None),
    ("precision", "float16 autocast"),
)
_CLIP_SVD_COMMON: dict[str, Any] = dict(
    sampler="clip-lora",
    seeds=(1, 2, 3),
    views=None,  # trained on the support images with fresh augmentations, not on cached views
    templates="clip-svd",
    hyperparameters=_CLIP_SVD_HP,
    why=(_CLIP_SVD_SAMPLER, _CLIP_SVD_RECIPE),
    short="CLIP-SVD README",
)

TASK_TEXT = "xyycyc/task-text-coordinates-resources README.md"
_STUDY_DATASETS = ("DescribableTextures", "EuroSAT", "OxfordPets", "SUN397")
_STUDY_SAMPLER = (
    "sampler",
    "the study's own split manifests (data/splits/*.json: random.Random(support_seed) in class order, Pets an 80/20 "
    "split of trainval with seed 1729, shared validation identities): neither prolip sampler draws them",
)
# How the study fits and selects each method (README: Optimization and validation selection; LP++; ProKeR), none in
# the hyperparameters prolip's methods record. On SigLIP 2, P0 and ProLIP adapt a residual on the tower's complete
# output (h = z0, identity base map: README, P0 implementation), i.e. prolip's output site, not the MAP head's fc2.
_STUDY_RECIPES = {
    "p0": "its 9 (lr, λ) candidates (lr 1e-3 with λ ∈ {1/K, 0, 0.01, 0.1, 1, 10, 100}, lr 1e-4 and 1e-2 with 1/K; "
    "FP32 Adam, 300 steps, one of 32 views per step) and its tie rule",
    "lp++": "FP32 SGD with momentum 0.9 for 300 epochs, its data-derived learning rates, the epoch selected on "
    "validation (ties: the later)",
    "proker": "ten views per image, FP64 kernel solves over its own (β, λ) grid (2,000 / 800 / 200 candidates), ties "
    "to the first",
}
_STUDY_RECIPES["prolip"] = _STUDY_RECIPES["p0"]


def _study(model: str, weights: str, table: str, method: str, values: tuple) -> list[Reference]:
    """One method's row of the study's accuracy table: per dataset at 4 and 16 shots (None: not reported)."""
    recipe = _STUDY_RECIPES[method]
    cells = zip([(d, k) for d in _STUDY_DATASETS for k in (4, 16)], values, strict=True)
    return [
        Reference(
            model,
            "fewshot-val",
            method,
            v,
            k,
            d,
            weights=weights,
            sampler="task-text splits",
            seeds=(1, 2, 3),
            views=32,
            validation=True,
            templates="dataset",  # the README's four templates are the paper's for these datasets
            hyperparameters=(("study recipe", recipe),),
            why=(_STUDY_SAMPLER, ("hyperparameters", f"the study's recipe: {recipe}")),
            source=f"{TASK_TEXT}, Accuracy comparisons, {table} table",
            short="task-text study",
            protocol_note="the study's splits, seeds 1–3, 32 cached views, selected on its validation set",
        )
        for (d, k), v in cells
        if v is not None
    ]


DPE = "Zhang et al., arXiv 2410.12790 (DPE, github zhangce01/DPE-CLIP), Table 1"
_DPE_WHY = (
    (
        "templates",
        "DPE's hand-crafted prompts (its Appendix C.2), not a template set prolip's references hold",
    ),
)


def _dpe(model: str, imagenet: float, variants: dict, average: float, ood: float) -> list[Reference]:
    """DPE's Table 1 line for one backbone: ImageNet, each variant, the five-dataset and the OOD averages."""
    cells = [("ImageNet", imagenet), *variants.items(), (frozenset({"ImageNet"}) | OOD, average), (OOD, ood)]
    return [
        Reference(
            model,
            "tta",
            "zeroshot",
            v,
            0,
            d,
            label="dpe",
            seeds=(),
            views=None,
            setting=(("tta.max_images", None),),
            templates="dpe",
            why=_DPE_WHY,
            source=DPE,
            short="DPE paper",
            protocol_note="full test sets, the mean of three runs with different initialisation seeds",
        )
        for d, v in cells
    ]


ORIGINALS: list[Reference] = [
    # "Natural Few-shot Evaluation" table (11 datasets, ViT-B/16 — run_utils.py:21 --backbone — 3 seeds).
    *_series(
        "ViT-B-16",
        "fewshot",
        "clip-svd",
        (73.20, 76.06, 78.18, 80.55, 82.97),
        datasets=ELEVEN,
        source=f"{CLIP_SVD}, Natural Few-shot Evaluation table",
        protocol_note="CLIP-SVD's own sampler and recipe, seeds 1–3, the last iteration (no validation)",
        **_CLIP_SVD_COMMON,
    ),
    # "Base-to-Novel Generalization (Natural Domain)" table (16 shots: scripts/base2new_reproduce.sh SHOTS=16).
    *[
        Reference(
            "ViT-B-16",
            "base2new",
            "clip-svd",
            v,
            16,
            ELEVEN,
            metric=k,
            source=f"{CLIP_SVD}, Base-to-Novel Generalization (Natural Domain) table",
            protocol_note="CLIP-SVD's own sampler and recipe (configs/base2new), 16 shots, seeds 1–3",
            **_CLIP_SVD_COMMON,
        )
        for k, v in (("base", 84.38), ("new", 76.29), ("hm", 80.13))
    ],
    # The same README table quotes CLIP-LoRA and ProKeR from their papers, each under its own protocol.
    *_series(
        "ViT-B-16",
        "quoted",
        "clip-lora",
        (72.20, 75.41, 77.32, 80.10, 82.89),
        datasets=ELEVEN,
        seeds=(1, 2, 3),
        source=f"{CLIP_SVD}, Natural Few-shot Evaluation table, quoting CLIP-LoRA (Zanella & Ben Ayed 2024)",
        short="CLIP-SVD README",
        protocol_note="CLIP-LoRA's own protocol",
        why=(("protocol", "quoted by the CLIP-SVD README from CLIP-LoRA's paper, under CLIP-LoRA's own protocol"),),
    ),
    *_series(
        "ViT-B-16",
        "quoted",
        "proker",
        (71.32, 73.74, 76.23, 79.84, 82.01),
        datasets=ELEVEN,
        seeds=(1, 2, 3),
        source=f"{CLIP_SVD}, Natural Few-shot Evaluation table, quoting ProKeR (Bendou et al. 2025)",
        short="CLIP-SVD README",
        protocol_note="ProKeR's own protocol",
        why=(("protocol", "quoted by the CLIP-SVD README from ProKeR's paper, under ProKeR's own protocol"),),
    ),
    # The task-text study (P0): DTD 4, DTD 16, EuroSAT 4, EuroSAT 16, Pets 4, Pets 16, SUN397 4, SUN397 16.
    *_study(
        "ViT-B-16",
        "openai",
        "CLIP ViT-B/16",
        "p0",
        (63.91, 72.91, 81.29, 88.93, 92.23, 93.33, 72.78, 76.28),
    ),
    *_study(
        "ViT-B-16",
        "openai",
        "CLIP ViT-B/16",
        "prolip",
        (63.53, 72.58, 81.70, 88.12, 92.15, 92.70, 72.16, 75.84),
    ),
    # SigLIP 2 Base/16 (google/siglip2-base-patch16-224; open_clip's ViT-B-16-SigLIP2, weights webli); P0 and ProLIP
    # on a residual of the tower's complete output (see _STUDY_RECIPES).
    *[
        ref
        for method, values in (
            ("p0", (74.82, 80.79, 76.36, 87.71, 94.97, 95.08, 77.27, 79.95)),
            ("prolip", (73.48, 80.24, 78.45, 88.28, 94.96, 95.13, 76.94, 79.58)),
            ("lp++", (73.03, 78.72, 67.46, 84.43, 94.88, 94.80, 77.43, 80.05)),
            ("proker", (73.17, 80.22, 78.58, 88.96, 94.90, 95.23, 74.32, None)),
        )
        for ref in _study("ViT-B-16-SigLIP2", "webli", "SigLIP 2 Base/16", method, values)
    ],
    *_dpe(
        "RN50",
        63.41,
        {"ImageNetA": 30.15, "ImageNetV2": 56.72, "ImageNetR": 63.72, "ImageNetSketch": 40.03},
        50.81,
        47.66,
    ),
    *_dpe(
        "ViT-B-16",
        71.91,
        {"ImageNetA": 59.63, "ImageNetV2": 65.44, "ImageNetR": 80.40, "ImageNetSketch": 52.26},
        65.93,
        64.43,
    ),
]
REFERENCES += ORIGINALS


def same_value(a: Any, b: Any) -> bool:
    """Numbers equal up to rounding; anything else by its text (case and spaces ignored: "1/N" == "1/n")."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    return str(a).replace(" ", "").upper() == str(b).replace(" ", "").upper()


def _same_hyperparameters(measured: dict, expected: tuple) -> bool:
    keys = set(measured) - IGNORED_HYPERPARAMETERS
    expected_dict = dict(expected)
    return keys == set(expected_dict) and all(same_value(measured[k], v) for k, v in expected_dict.items())


def _same_over(varying: dict, expected: tuple) -> bool:
    expected_dict = {k: sorted(v) for k, v in expected}
    if set(varying) != set(expected_dict):
        return False
    return all(
        len(varying[k]) == len(v) and all(map(same_value, sorted(varying[k]), v)) for k, v in expected_dict.items()
    )


def _setting_value(setting: Any, dotted: str) -> Any:
    value = setting
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return MIXED
        value = value[part]
    return value


def _paper_templates(kind: str, dataset: str) -> tuple[str, ...] | None:
    return SINGLE_TEMPLATE if kind == "single" else TEMPLATE_RULES.get(kind, {}).get(dataset)


def _same_templates(templates: Any, kind: str, datasets: frozenset | str) -> bool:
    names = [datasets] if isinstance(datasets, str) else sorted(datasets)
    if not isinstance(templates, dict):
        return False
    return all(
        d in templates
        and templates[d] is not None
        and _paper_templates(kind, d) is not None
        and tuple(templates[d]) == _paper_templates(kind, d)
        for d in names
    )


def _seeds(row: dict) -> tuple | str:
    if row.get("seeds") == MIXED:
        return MIXED
    return tuple(sorted(s for s in row.get("seeds") or () if s is not None))


def _checks(ref: Reference, row: dict, datasets: frozenset | str, metric: str) -> dict[str, bool]:
    hp = row.get("hyperparameters")
    return {
        "weights": row.get("weights") == ref.weights and row.get("random_weights") is False,
        "model": ref.model == row.get("model"),
        "protocol": ref.protocol == row.get("protocol"),
        "metric": ref.metric == metric,
        "method": ref.method == row.get("method"),
        "label": ref.label is None or ref.label == row.get("label"),
        "shots": ref.shots is None or ref.shots == row.get("shots"),
        "datasets": ref.datasets == datasets,
        "sampler": ref.sampler == row.get("sampler"),
        "seeds": ref.seeds == _seeds(row),
        "views": ref.views is None or ref.views == row.get("views"),
        "validation": ref.validation is row.get("validation"),
        "templates": _same_templates(row.get("templates"), ref.templates, datasets),
        "hyperparameters": isinstance(hp, dict) and _same_hyperparameters(hp, ref.hyperparameters),
        "over": _same_over(row.get("varying") or {}, ref.over),
        "setting": all(same_value(_setting_value(row.get("setting"), k), v) for k, v in ref.setting),
        "source dataset": row.get("source") is None,
    }


def mismatches(ref: Reference, row: dict[str, Any], datasets: frozenset | str, metric: str = "accuracy") -> list[str]:
    """What differs between a reference and an aggregated row (empty: the reference's number applies); a setting the
    reference explains (``Reference.why``) comes as "setting: why"."""
    reasons = dict(ref.why)
    return [
        f"{what}: {reasons[what]}" if what in reasons else what
        for what, ok in _checks(ref, row, datasets, metric).items()
        if not ok
    ]


def reference_for(row: dict[str, Any], datasets: frozenset | str, metric: str = "accuracy") -> Reference | None:
    """The first reference (the paper's first, then the originals') for an aggregated row over ``datasets`` (a set
    for averages, a name for one dataset)."""
    return next((ref for ref in REFERENCES if not mismatches(ref, row, datasets, metric)), None)
