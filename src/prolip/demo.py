"""`prolip demo`: ProLIP on shifted digits against zero-shot, λ = 0 and two baselines, offline, quickly on a CPU.

The model is real pretrained CLIP when its weights can be had (``--pretrained openai`` cached or downloadable, or a
local file), and otherwise prolip-tiny, the small CLIP this project pretrains on scikit-learn's digits
(:mod:`prolip.tiny`); random weights only when asked for (``--pretrained none``). The data are the digits held out of
prolip-tiny's pretraining, written as ordinary image folders, one per domain: clean (the model's zero-shot sanity
check) and two shifted domains the model never saw, a severe one where zero-shot collapses and a mild one where it
still knows a lot. Each domain runs the path a user's folder takes: image folder → few-shot sampling → feature cache →
training → evaluation (``pipeline.fit``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import numpy as np
import torch

from prolip.outputs import replace_atomically, writing
from prolip.tiny import DIGIT_NAMES, DIGIT_TEMPLATES, TINY_LABEL, load_tiny, write_digit_folder

__all__ = ["DemoConfig", "DIGIT_NAMES", "DIGIT_TEMPLATES", "run_demo", "split_pool_and_test"]

Echo = Callable[[str], None]


@dataclass
class DemoConfig:
    """The demo's budget: prolip-tiny finishes in about 20 s on 2 CPU cores (measured on a busy machine)."""

    model: str = "ViT-B-16"
    pretrained: str = "openai"
    domains: tuple[str, ...] = ("inverted", "noisy")  # a severe shift, then a mild one (prolip.tiny.DOMAINS)
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    pool_per_class: int = 16  # support images are drawn from these, so all shot counts share one cache
    test_per_class: int = 30
    views: int = 8
    seed: int = 1
    lr: float | None = None  # ProLIP's lr; None: the paper's 1e-5 on real CLIP, 1e-2 on prolip-tiny (see _default_lr)
    high_lr: float = 1e-2  # where λ = 0 and λ = 1/N part ways
    baselines: tuple[str, ...] = ("lp++", "linear-probe")


@dataclass(frozen=True)
class Curve:
    """One line of the plot and one column of the table: a method, its hyperparameters and its line style."""

    label: str
    method: str
    hyperparameters: dict
    style: dict


def split_pool_and_test(images, pool_per_class: int, test_per_class: int, seed: int):
    """Deterministically split an image folder into a per-class support pool and a disjoint test set."""
    rng = np.random.default_rng(seed)
    pool, test = [], []
    labels = np.asarray(images.labels)
    for c in range(len(images.classnames)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.extend(idx[:test_per_class].tolist())
        pool.extend(idx[test_per_class : test_per_class + pool_per_class].tolist())
    return images.subset(sorted(pool)), images.subset(sorted(test))


def choose_backbone(config: DemoConfig, echo: Echo):
    """Real pretrained weights when they can be had, else prolip-tiny; random weights only when asked for."""
    from prolip.backbones import BackboneLoadError, load_backbone

    try:
        return load_backbone(config.model, config.pretrained)
    except BackboneLoadError:
        echo(
            f"Pretrained {config.model}/{config.pretrained} weights are not available here; using {TINY_LABEL} "
            f"instead (pass --pretrained /path/to/weights.safetensors to use real CLIP weights)."
        )
        return load_tiny()


def _is_tiny(backbone) -> bool:
    return getattr(backbone.info, "provenance", "") == TINY_LABEL


# Projections up to this many entries (prolip-tiny's is 128×64, ViT-B/16's 768×512) mark a model small enough that
# torch's second thread only adds synchronisation.
SMALL_MODEL_PROJECTION = 256 * 256


@contextmanager
def _threads_for(backbone):
    """One torch thread for a small model: on a busy 2-core machine two made the prolip-tiny demo 8x slower (207 s
    against 27 s, measured). Real CLIP keeps them all."""
    threads = torch.get_num_threads()
    if backbone.dim_pre * backbone.dim_embed <= SMALL_MODEL_PROJECTION:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _default_lr(backbone) -> float:
    # Real CLIP: the paper's default. prolip-tiny's projection is 128×64 with entries ~0.09 (ViT-B/16's is 768×512)
    # and its logit scale is 14 (OpenAI's 100), so 300 Adam steps at 1e-5 barely move its predictions; with λ = 1/N
    # it settles from 1e-3 up and does best at 1e-2 on the severe shift (tests/test_behaviour.py has the numbers).
    # Random weights sit far from any useful projection: 1e-2 as well.
    return 1e-2 if _is_tiny(backbone) or backbone.info.random_weights else 1e-5


def curves(config: DemoConfig, lr: float) -> list[Curve]:
    """ProLIP (λ = 1/N) at the demo's lr, at the high lr if that differs, λ = 0 at the high lr, the baselines."""
    high = config.high_lr
    out = [
        Curve(
            f"ProLIP (lr {lr:g}, λ = 1/N)",
            "prolip",
            {"lr": lr, "lam": "1/N"},
            dict(color="tab:blue", marker="o", linewidth=2.6),
        )
    ]
    if lr != high:
        out.append(
            Curve(
                f"ProLIP (lr {high:g}, λ = 1/N)",
                "prolip",
                {"lr": high, "lam": "1/N"},
                dict(color="tab:cyan", marker="o", linestyle="--"),
            )
        )
    out.append(
        Curve(
            f"ProLIP (lr {high:g}, λ = 0)",
            "prolip",
            {"lr": high, "lam": 0.0},
            dict(color="tab:red", marker="x", linestyle="--"),
        )
    )
    baseline_styles = [
        dict(color="tab:orange", marker="^", linewidth=1.2),
        dict(color="tab:purple", marker="v", linewidth=1.2),
    ]
    out += [
        Curve(f"{_BASELINE_NAMES.get(name, name)} (baseline)", name, {}, baseline_styles[i % 2])
        for i, name in enumerate(config.baselines)
    ]
    return out


_BASELINE_NAMES = {"lp++": "LP++", "linear-probe": "linear probe"}


def digit_splits(folder: Path, config: DemoConfig):
    """The folder read as a user's folder is, split into a support pool and a test set."""
    from prolip.data import read_image_folder
    from prolip.data.types import DatasetSplits

    # The folders are named after the digits, so the folder names (sorted, as read) are the class names.
    images = read_image_folder(folder)
    pool, test = split_pool_and_test(images, config.pool_per_class, config.test_per_class, config.seed)
    return DatasetSplits(folder.name, images.classnames, DIGIT_TEMPLATES, train=pool, test=test)


def run_domain(backbone, cache, folder: Path, config: DemoConfig, lr: float, echo: Echo) -> list[dict]:
    """One row per shot count: zero-shot and every curve's accuracy on the domain's test images; the run of the
    first curve at the most shots is saved next to the folder."""
    from prolip import pipeline

    splits = digit_splits(folder, config)
    rows = []
    for shots in config.shots:
        row: dict = {"shots": shots}
        for i, curve in enumerate(curves(config, lr)):
            fit_config = pipeline.FitConfig(
                shots=shots,
                seed=config.seed,
                views=config.views,
                method=curve.method,
                hyperparameters=curve.hyperparameters,
            )
            result = pipeline.fit(backbone, splits, cache, fit_config, data_spec=str(folder))
            row["zero-shot"] = result.metrics["zero_shot_accuracy"]
            row[curve.label] = result.metrics["accuracy"]
            if shots == max(config.shots) and i == 0:
                result.run.save(folder.with_name(f"run-{folder.name}"), force=True)
        echo(f"  {folder.name} {shots:2d}-shot: " + "  ".join(f"{k} {v:.1f}%" for k, v in row.items() if k != "shots"))
        rows.append(row)
    return rows


def clean_zero_shot(backbone, cache, folder: Path, config: DemoConfig) -> float:
    """Zero-shot top-1 (%) on the clean test digits: does the model know digits at all?"""
    from prolip.episode import EpisodeBuilder
    from prolip.functional import accuracy, clip_logits

    splits = digit_splits(folder, config)
    builder = EpisodeBuilder(backbone, cache)
    test = builder.center(splits.test)
    task = builder.task(splits.classnames, splits.templates, shots=1)
    return accuracy(clip_logits(test.features, task.W0, task.bias, task.classifier, task.logit_scale), test.labels)


def run_demo(
    workdir: Path, config: DemoConfig | None = None, cache_dir: Path | None = None, echo: Echo = print
) -> dict:
    """Run the demo; returns {"domains": {name: rows}, "clean_zero_shot", "table", "caption", "plot", "runs",
    "backbone", "lr"}."""
    from prolip.features import FeatureCache

    config = config if config is not None else DemoConfig()
    with writing(workdir):
        workdir.mkdir(parents=True, exist_ok=True)
    backbone = choose_backbone(config, echo)
    lr = config.lr if config.lr is not None else _default_lr(backbone)
    cache = FeatureCache(cache_dir if cache_dir is not None else workdir / "cache", backbone, progress=False)
    with _threads_for(backbone):
        clean = clean_zero_shot(backbone, cache, _digits(workdir, "clean"), config)
    echo(
        f"Model {backbone.info.describe()}: zero-shot {clean:.1f}% on clean held-out digits. Adapting to "
        f"{' and '.join(config.domains)} digits: {config.pool_per_class} support-pool and {config.test_per_class} "
        f"test images per class, {config.views} augmented views, shots {list(config.shots)}, seed "
        f"{config.seed}, 300 steps, templates {DIGIT_TEMPLATES}."
    )
    domains = {}
    with _threads_for(backbone):
        for domain in config.domains:
            folder = _digits(workdir, domain)
            domains[domain] = run_domain(backbone, cache, folder, config, lr, echo)
    random_note = " (RANDOM weights)" if backbone.info.random_weights else ""
    caption = (
        f"{backbone.info.describe()}{random_note}\nheld-out digits, LP++ sampler seed {config.seed}, "
        f"{config.test_per_class * len(DIGIT_NAMES)} test images per domain, {config.views} augmented views "
        f"per support image, 300 steps"
    )
    plot = workdir / "demo.png"
    replace_atomically(plot, lambda tmp: plot_domains(domains, clean, tmp, caption, curves(config, lr)))
    return {
        "domains": domains,
        "clean_zero_shot": clean,
        "table": tables(domains),
        "caption": caption,
        "plot": plot,
        "runs": [workdir / f"run-digits-{d}" for d in config.domains],
        "backbone": backbone.info.describe(),
        "lr": lr,
    }


def _digits(workdir: Path, domain: str) -> Path:
    """The digit folder of ``domain`` in the workdir, written through the output layer (a failed write is one
    line; a folder left incomplete is written again next time: it is complete only once marked so)."""
    with writing(workdir):
        return write_digit_folder(workdir / f"digits-{domain}", domain)


def tables(domains: dict[str, list[dict]]) -> str:
    """One markdown table per domain: shots down, zero-shot and each curve across."""
    out = []
    for domain, rows in domains.items():
        columns = [k for k in rows[0] if k != "shots"]
        out.append(
            f"{domain} digits, top-1 %\n\n| shots | "
            + " | ".join(columns)
            + " |\n|---:|"
            + "---:|" * len(columns)
            + "\n"
            + "".join(f"| {r['shots']} | " + " | ".join(f"{r[c]:.1f}" for c in columns) + " |\n" for r in rows)
        )
    return "\n".join(out)


def regulariser_verdict(rows: list[dict], lines: list[Curve]) -> str:
    """Which of λ = 1/N and λ = 0 (at the same high lr) did better here, on average over the shot counts."""
    zero = next(c for c in lines if c.hyperparameters.get("lam") == 0.0)
    paired = next(
        c
        for c in lines
        if c.hyperparameters.get("lam") == "1/N" and c.hyperparameters["lr"] == zero.hyperparameters["lr"]
    )
    gap = mean(r[paired.label] - r[zero.label] for r in rows)
    lr = f"lr {zero.hyperparameters['lr']:g}"
    if gap >= 0:
        return f"at {lr}, λ = 1/N beats λ = 0 by {gap:.1f} points (mean over shots)"
    return f"at {lr}, λ = 0 beats λ = 1/N by {-gap:.1f} points (mean over shots)"


def plot_domains(domains: dict[str, list[dict]], clean: float, path: Path, caption: str, lines: list[Curve]) -> None:
    """One panel per domain, zero-shot dashed black, the clean digits' zero-shot as a dotted reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4.8), sharey=True, squeeze=False)
    for ax, (domain, rows) in zip(axes[0], domains.items(), strict=True):
        shots = [r["shots"] for r in rows]
        ax.axhline(clean, color="grey", linewidth=1, linestyle=":")
        ax.text(
            shots[-1],
            clean - 1.5,
            f"zero-shot on clean digits: {clean:.0f}%",
            fontsize=8,
            color="dimgrey",
            ha="right",
            va="top",
        )
        ax.plot(shots, [r["zero-shot"] for r in rows], color="black", linestyle="--", linewidth=1.4, label="zero-shot")
        for curve in lines:
            ax.plot(shots, [r[curve.label] for r in rows], label=curve.label, **curve.style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.set_xlabel("shots per class")
        ax.set_title(
            f"{domain} digits (not seen in pretraining): zero-shot {rows[0]['zero-shot']:.0f}%\n"
            f"{regulariser_verdict(rows, lines)}",
            fontsize=9,
        )
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][0].legend(fontsize=8, loc="upper left", framealpha=0.9)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the path may be a temporary's, with no .png
    plt.close(fig)
