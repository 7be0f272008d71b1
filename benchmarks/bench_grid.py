"""The 49-point (lr, λ) validation grid through ``ProLIP(grid=True).fit`` vs the same 49 configurations fitted one by
one through the same API, vs the reference code's structure (one ``torch.optim.Adam`` + autograd per configuration).

Each shape is a synthetic problem (``tests/synthetic.make_problem``, 768 → 512, 8 cached views, an N-shot validation
set). Per round, the grid and the 49 single fits run back to back on identical inputs, so their ratio is taken in
one run whatever else the machine is doing; the winner must be the same (the single fits' validation accuracies are
computed after the clock stops: "ratio" sets the grid, which also scores every configuration on the validation
set, against the 49 trainings alone; "ratio_with_scoring" adds the scoring one by one needs to pick its winner).
``--chunks`` also times the grid at fixed chunk sizes (configurations per batched
computation), the measurement behind ``prolip.methods.prolip.grid_chunk_size``. The reference structure runs in
float16, as the reference code does (its CLIP is half precision), and in float32 (``--reference-dtypes``).

    python benchmarks/bench_grid.py [--shapes 4x10:300,16x47:100,16x1000:3] [--rounds 2] [--chunks 1,2,4,7]
                                    [--reference-shape 4x10] [--reference-dtypes float16,float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prolip.methods import create
from prolip.methods.prolip import GRID_LAMS, GRID_LRS, grid_accuracies, select_config
from prolip.optim import REFERENCE_EPS, view_for_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic problem lives with the tests
from synthetic import make_problem  # noqa: E402

LRS = [lr for lr in GRID_LRS for _ in GRID_LAMS]
LAMS = [lam for _ in GRID_LRS for lam in GRID_LAMS]


def problem_for(shape: str):
    shots, classes = (int(x) for x in shape.split("x"))
    return make_problem(num_classes=classes, shots=shots, d_pre=768, d=512, views=8, test_per_class=1, noise=3.0)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def grid_fit(p, steps: int, chunk: int | None = None):
    return create("prolip", grid=True, steps=steps, grid_chunk=chunk).fit(p.task, p.support, p.val)


def single_fits(p, steps: int) -> list:
    return [
        create("prolip", lr=lr, lam=lam, steps=steps).fit(p.task, p.support) for lr, lam in zip(LRS, LAMS, strict=True)
    ]


def winner_of_singles(p, fitted) -> int:
    t = p.task
    W = torch.stack([m.W for m in fitted])
    return select_config(grid_accuracies(W, t.bias, t.classifier, t.logit_scale, p.val), LRS, LAMS)


def reference_fit(p, lr: float, lam: float, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """One configuration as the reference trains it: autograd through the forward pass, torch.optim.Adam (eps 1e-4),
    CosineAnnealingLR, one cached view per step in the reference's order."""
    t, s = p.task, p.support
    W0, T = t.W0.to(dtype), t.classifier.to(dtype)
    bias = None if t.bias is None else t.bias.to(dtype)
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr, eps=REFERENCE_EPS)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for step in range(steps):
        z = s.views.view(view_for_step(step, s.views.num_views)).to(dtype)
        e = z @ W if bias is None else z @ W + bias
        logits = t.logit_scale * F.normalize(e, dim=-1) @ T.T
        loss = F.cross_entropy(logits, s.labels) + lam * (W - W0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return W.detach().float()


def compare_shape(shape: str, steps: int, rounds: int) -> dict:
    """Grid vs one by one, ``rounds`` times back to back; the ratio of each round and their median."""
    p = problem_for(shape)
    grid_fit(p, 2)  # warm-up: thread pools, allocator
    rows = []
    for _ in range(rounds):
        grid_s, grid = timed(lambda: grid_fit(p, steps))
        singles_s, fitted = timed(lambda: single_fits(p, steps))
        select_s, best = timed(lambda: winner_of_singles(p, fitted))
        same = (grid.selected_["lr"], grid.selected_["lam"]) == (LRS[best], LAMS[best])
        rows.append(
            {
                "grid_s": round(grid_s, 2),
                "singles_s": round(singles_s, 2),
                "singles_scoring_s": round(select_s, 2),
                "ratio": round(grid_s / singles_s, 3),
                "ratio_with_scoring": round(grid_s / (singles_s + select_s), 3),
                "same_winner": same,
            }
        )
    ratios = [r["ratio"] for r in rows]
    with_scoring = [r["ratio_with_scoring"] for r in rows]
    return {
        "shape": f"{shape} (N={p.support.views.num_images}), 768->512, {steps} steps, 49 configs",
        "rounds": rows,
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "ratio_with_scoring_median": statistics.median(with_scoring),
        "winner": {"lr": grid.selected_["lr"], "lam": grid.selected_["lam"]},
    }


def chunk_sweep(shape: str, steps: int, chunks: list[int], rounds: int) -> dict:
    """Seconds per configuration of the grid at fixed chunk sizes (each chunk size timed ``rounds`` times,
    interleaved), on the shape's first 14 configurations (two chunks of 7) to keep it short."""
    p = problem_for(shape)
    grid = [[lr, lam] for lr, lam in zip(LRS[:14], LAMS[:14], strict=True)]
    fit = lambda k: create("prolip", grid=grid, steps=steps, grid_chunk=k).fit(p.task, p.support, p.val)
    fit(1)
    times: dict[int, list[float]] = {k: [] for k in chunks}
    for _ in range(rounds):
        for k in chunks:
            times[k].append(timed(lambda: fit(k))[0] / len(grid))
    return {
        "shape": shape,
        "steps": steps,
        "s_per_config": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "vs_chunk_1": {
            k: round(statistics.median(v) / statistics.median(times[chunks[0]]), 3) for k, v in times.items()
        },
    }


def reference_comparison(shape: str, steps: int, dtypes: list[str], configs: int) -> dict:
    """The reference structure on ``configs`` of the 49 configurations (evenly spread), scaled to 49, vs our grid."""
    p = problem_for(shape)
    grid_s, grid = timed(lambda: grid_fit(p, steps))
    picked = list(range(0, 49, max(1, 49 // configs)))[:configs]
    out = {"shape": shape, "steps": steps, "grid_s": round(grid_s, 2), "reference_configs_timed": len(picked)}
    for name in dtypes:
        dtype = getattr(torch, name)
        reference_fit(p, LRS[0], LAMS[0], 2, dtype)  # warm-up
        seconds, _ = timed(lambda: [reference_fit(p, LRS[g], LAMS[g], steps, dtype) for g in picked])
        total = seconds / len(picked) * 49
        out[f"reference_{name}_s (49 configs)"] = round(total, 1)
        out[f"speedup_vs_reference_{name}"] = round(total / grid_s, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4x10:300,16x47:100,16x1000:3", help="shots x classes : steps, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunks", default="", help="also time the grid at these chunk sizes, e.g. 1,2,4,7")
    ap.add_argument(
        "--reference-shape", default="4x10:300", help="shape:steps for the reference structure ('' to skip)"
    )
    ap.add_argument("--reference-dtypes", default="float16,float32")
    ap.add_argument("--reference-configs", type=int, default=7, help="configurations of the reference loop timed")
    args = ap.parse_args()
    print(f"{torch.get_num_threads()} torch threads", flush=True)
    for item in args.shapes.split(","):
        shape, steps = item.split(":")
        print(json.dumps({"grid_vs_one_by_one": compare_shape(shape, int(steps), args.rounds)}), flush=True)
        if args.chunks:
            chunks = [int(k) for k in args.chunks.split(",")]
            print(json.dumps({"chunk_sweep": chunk_sweep(shape, int(steps), chunks, args.rounds)}), flush=True)
    if args.reference_shape:
        shape, steps = args.reference_shape.split(":")
        print(
            json.dumps(
                {
                    "vs_reference_structure": reference_comparison(
                        shape, int(steps), args.reference_dtypes.split(","), args.reference_configs
                    )
                }
            ),
            flush=True,
        )
    print(
        "targets: grid <= 1.0x the 49 single fits on every shape, same winner; >= 10x the reference structure at 4x10"
    )


if __name__ == "__main__":
    main()
