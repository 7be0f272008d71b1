"""Native site against output site: ProLIP's accuracy at each, per backbone family, on the same images and seeds.

The native site adapts the tower's own last linear map (W0 the checkpoint's, [D_pre, D]); the output site adapts an
identity-initialised square map on the final embedding (W0 = I, [D, D]). At W = W0 both give the model's own
zero-shot predictions, so the comparison is what training each one buys.

Two kinds of backbone, labelled in the output:

- ``prolip-tiny-vit`` with the shipped in-house weights (trained on digits, not OpenAI CLIP), on held-out digits
  (the demo's images): the one backbone here whose features mean something;
- one tiny random-init config per family (``src/prolip/model_configs``), on DTD10 (``../shared/data``): random
  weights, so the numbers measure what each site can fit from random features, not transfer.

    HF_HUB_OFFLINE=1 python benchmarks/bench_sites.py [--shots 1,4,16] [--seeds 1,2,3] [--views 8] [--lrs 1e-2,1e-3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import torch

from prolip import pipeline
from prolip.backbones import load_backbone
from prolip.data import resolve_data
from prolip.demo import DemoConfig, digit_splits
from prolip.features.cache import FeatureCache
from prolip.tiny import SHIPPED_WEIGHTS, TINY_LABEL, TINY_MODEL, write_digit_folder

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RANDOM_FAMILIES = {
    "test-vit-tiny": "open_clip ViT (visual.proj)",
    "test-rn-tiny": "open_clip ModifiedResNet (attnpool.c_proj)",
    "test-timm-convnext-tiny": "timm ConvNeXt, linear head (head.proj)",
    "test-timm-vit-tiny": "timm ViT, classifier as projection (trunk.head)",
    "test-maphead-tiny": "timm MAP head, no projection (attn_pool.mlp.fc2 + frozen residual)",
}


def accuracies(backbone, splits, cache, lr: float, args) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for k in args.shots:
        for seed in args.seeds:
            hp = {"lr": lr}
            config = pipeline.FitConfig(shots=k, seed=seed, views=args.views, method="prolip", hyperparameters=hp)
            result = pipeline.fit(backbone, splits, cache, config)
            out.setdefault(k, []).append(result.metrics["accuracy"])
            out.setdefault(0, []).append(result.metrics["zero_shot_accuracy"])
    return out


def compare(arch: str, pretrained: str, splits, root: Path, args) -> list[str]:
    lines, means = [], {}
    for site in ("native", "output"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = load_backbone(arch, pretrained, site=site)
        cache = FeatureCache(root / f"{arch}-{site}", backbone)
        w = backbone.projection().weight
        for lr in args.lrs:
            accs = accuracies(backbone, splits, cache, lr, args)
            means[site, lr] = {k: statistics.mean(v) for k, v in accs.items()}
            params = f"{w.shape[0]}x{w.shape[1]}"
            cells = "  ".join(f"{k}-shot {means[site, lr][k]:5.1f}" for k in args.shots)
            lines.append(f"  {site:6s} W {params:>8s} lr {lr:g}: zero-shot {means[site, lr][0]:5.1f}  {cells}")
    for lr in args.lrs:
        gap = "  ".join(f"{k}-shot {means['native', lr][k] - means['output', lr][k]:+5.1f}" for k in args.shots)
        lines.append(f"  native - output, lr {lr:g}: {gap}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="1,4,16")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated architectures to run (default: all)")
    parser.add_argument("--lrs", default="1e-2,1e-3", help="ProLIP learning rates, each run at both sites")
    args = parser.parse_args()
    args.shots = [int(s) for s in args.shots.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.lrs = [float(s) for s in args.lrs.split(",")]
    torch.set_num_threads(2)
    print(
        f"ProLIP at each site: mean top-1 (%) over seeds {args.seeds}, {args.views} views, sampler lpp, "
        "lambda = 1/N (the default), 300 steps"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chosen = set(args.only.split(",")) if args.only else {TINY_MODEL, *RANDOM_FAMILIES}
        if TINY_MODEL in chosen:
            digits = digit_splits(write_digit_folder(root / "digits-noisy", "noisy"), DemoConfig())
            print(f"\n{TINY_MODEL} ({TINY_LABEL}), noisy held-out digits")
            print("\n".join(compare(TINY_MODEL, str(SHIPPED_WEIGHTS), digits, root, args)))
        if not (SHARED / "dtd10").is_dir():
            print(f"\n{SHARED / 'dtd10'} is absent: the random-init families are skipped")
            return
        dtd = resolve_data("dtd", root=SHARED / "dtd10")
        for arch, what in RANDOM_FAMILIES.items():
            if arch not in chosen:
                continue
            print(f"\n{arch} (RANDOM weights; {what}), DTD10")
            print("\n".join(compare(arch, "none", dtd, root, args)))


if __name__ == "__main__":
    main()
