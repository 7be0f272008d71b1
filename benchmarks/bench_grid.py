"""The 49-point (lr, λ) validation grid: one batched computation vs the reference code's structure.

Reference structure: for each of the 49 configs, re-extract the validation features (a backbone forward over
every val image) and train that config alone. Ours: val features extracted once (cached), all 49 configs
trained as one batched computation (W: [49, D_pre, D]), selection on the cached val features.

Extraction is *counted*, not run 49 times: the per-image cost of a ViT-B/16 forward (open_clip architecture,
random weights — the cost does not depend on the values) is measured here on a small batch and multiplied by
the number of val images extracted. Training is run for real on both sides, and both must pick the same winner.

    python benchmarks/bench_grid.py [--classes 47] [--shots 16] [--steps 100] [--arch ViT-B-16]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
import time

import torch

from prolip.methods.prolip import GRID_LAMS, GRID_LRS, grid_accuracies, select_config, train_projection
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic problem lives with the tests
from synthetic import make_problem  # noqa: E402


def per_image_extraction_s(arch: str, batch: int = 8) -> float:
    import open_clip

    model = open_clip.create_model(arch, pretrained=None).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        model.encode_image(images[:1])
        t = time.perf_counter()
        model.encode_image(images)
    return (time.perf_counter() - t) / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=47)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--d-pre", type=int, default=768)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--arch", default="ViT-B-16")
    args = ap.parse_args()

    p = make_problem(num_classes=args.classes, shots=args.shots, d_pre=args.d_pre, d=args.d, views=args.views,
                     test_per_class=1, noise=3.0)
    t, s = p.task, p.support
    lrs = [lr for lr in GRID_LRS for _ in GRID_LAMS]
    lams = [lam for _ in GRID_LRS for lam in GRID_LAMS]
    n_val = len(p.val.labels)
    per_image = per_image_extraction_s(args.arch)

    start = time.perf_counter()
    W = train_projection(t.W0, t.bias, t.classifier, t.logit_scale, s.views, s.labels, lrs, lams, args.steps)
    accs = grid_accuracies(W, t.bias, t.classifier, t.logit_scale, p.val)
    ours_train = time.perf_counter() - start
    ours_best = select_config(accs, lrs, lams)

    start = time.perf_counter()
    ref_accs = []
    for lr, lam in zip(lrs, lams):
        W1 = train_projection(t.W0, t.bias, t.classifier, t.logit_scale, s.views, s.labels, [lr], [lam], args.steps)
        ref_accs.append(grid_accuracies(W1, t.bias, t.classifier, t.logit_scale, p.val)[0])
    ref_train = time.perf_counter() - start
    ref_best = select_config(torch.stack(ref_accs), lrs, lams)

    ours_extract, ref_extract = per_image * n_val, per_image * n_val * len(lrs)
    ours, ref = ours_train + ours_extract, ref_train + ref_extract
    print(json.dumps({
        "problem": f"{args.shots}-shot x {args.classes}-class, {args.d_pre}->{args.d}, {args.steps} steps, "
                   f"{n_val} val images, {len(lrs)} configs",
        "per_image_extraction_s": round(per_image, 4), "extraction_arch": args.arch,
        "ours": {"train_s": round(ours_train, 2), "val_extraction_s (counted)": round(ours_extract, 2),
                 "total_s": round(ours, 2)},
        "reference_structure": {"train_s": round(ref_train, 2), "val_extraction_s (counted)": round(ref_extract, 2),
                                "total_s": round(ref, 2)},
        "speedup": round(ref / ours, 1), "training_only_speedup": round(ref_train / ours_train, 2),
        "winner_ours": {"lr": lrs[ours_best], "lam": lams[ours_best], "val_acc": round(accs[ours_best].item(), 2)},
        "winner_reference": {"lr": lrs[ref_best], "lam": lams[ref_best]},
        "same_winner": ours_best == ref_best,
        "max_val_acc_difference": round((accs - torch.stack(ref_accs)).abs().max().item(), 4),
    }, indent=2))


if __name__ == "__main__":
    main()
