"""Every method side by side on cached features: fit time per (dataset, shots, seed) and synthetic accuracy.

Problem: 16-shot × 100-class, ViT-B/16 shapes (768 → 512), ``--views`` cached augmented views (300 as ProLIP
uses), a few-shot validation set (16 per class) for the methods that select on it; features are the synthetic
Gaussian-cluster problem of ``prolip.methods.synthetic`` (zero-shot is imperfect by construction). Each method is
fitted with its defaults, once without and once with the validation set.

    python benchmarks/bench_methods.py [--classes 100] [--shots 16] [--views 300] [--markdown]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from prolip.functional import accuracy
from prolip.methods import available, create

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic problem lives with the tests
from synthetic import make_problem  # noqa: E402


def with_text_side(p, seed: int = 0) -> None:
    """A text side whose projection P0 reproduces (noisily) the classifier, so prolip-text can run."""
    g = torch.Generator().manual_seed(seed)
    d = p.task.classifier.shape[1]
    P0 = torch.randn(d, d, generator=g) * 0.03
    targets = p.task.classifier[:, None, :] + 0.02 * torch.randn(p.task.num_classes, 2, d, generator=g)
    p.task = dataclasses.replace(p.task, text_proj=P0, text_pre=targets @ torch.linalg.pinv(P0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--views", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    p = make_problem(
        num_classes=args.classes,
        shots=args.shots,
        d_pre=768,
        d=512,
        views=args.views,
        test_per_class=10,
        text_offset=12.0,
        noise=3.0,
        seed=args.seed,
    )
    with_text_side(p)
    rows = []
    for name in args.methods or available():
        row = {"method": name}
        for mode, val in (("no_val", None), ("val", p.val)):
            start = time.perf_counter()
            m = create(name).fit(p.task, p.support, val, seed=args.seed)
            row[f"fit_s_{mode}"] = round(time.perf_counter() - start, 2)
            row[f"acc_{mode}"] = round(accuracy(m.logits(p.test.features), p.test.labels), 1)
            row[f"how_{mode}"] = (
                m.selected_.get("how", "-")
                if "prolip" not in m.selected_
                else f"{m.selected_['prolip']['how']}+{m.selected_['head'].get('how', '-')}"
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.methods is None or "prolip" in args.methods:  # ProLIP's few-shot validation mode: the 49-point grid
        start = time.perf_counter()
        m = create("prolip", grid=True).fit(p.task, p.support, p.val, seed=args.seed)
        row = {
            "method": "prolip grid=True",
            "fit_s_no_val": "-",
            "acc_no_val": "-",
            "how_no_val": "-",
            "fit_s_val": round(time.perf_counter() - start, 2),
            "acc_val": round(accuracy(m.logits(p.test.features), p.test.labels), 1),
            "how_val": f"validation (lr {m.selected_['lr']:g}, λ {m.selected_['lam']:g})",
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.markdown:
        print("\n| method | fit s (no val) | acc % (no val) | fit s (val) | acc % (val) | val used |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['method']} | {r['fit_s_no_val']} | {r['acc_no_val']} | {r['fit_s_val']} | {r['acc_val']} "
                f"| {r['how_val']} |"
            )


if __name__ == "__main__":
    main()
