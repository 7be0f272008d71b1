"""`prolip bench --plan` against the run it plans: forward passes announced vs made, and vs the reference code's
structure for the same experiments.

Two experiments on dtd10 share one cache, as a user's sweep would: a few-shot sweep (shots 1/2/4/8/16 × seeds 1–3 ×
four methods, one of them CLAP with its own augmentation, one the linear probe reading center crops), then
base-to-new on the same shots and seeds. Each is planned (nothing extracted), then run; the plan's count must equal
the cache's ``forward_passes`` after the run, the second plan counting only what the first run did not cache. The
reference count charges every cell everything it uses (its own support views and evaluation set), as the
reference's per-run scripts extract them. Tiny random model (counts do not depend on the model).

    python benchmarks/bench_plan.py [--views 4] [--model test-vit-tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

DTD10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dtd10"


def experiment(protocol: str, root: Path, args):
    from prolip.bench.experiment import parse_experiment

    methods = ["zeroshot", {"name": "prolip", "steps": 50}, "linear-probe", {"name": "clap", "epochs": 5}]
    return parse_experiment(
        {
            "model": args.model,
            "pretrained": "none",
            "data_root": str(DTD10),
            "datasets": ["dtd"],
            "shots": [1, 2, 4, 8, 16],
            "seeds": [1, 2, 3],
            "views": args.views,
            "cache_dir": str(root / "cache"),
            "out": str(root / protocol),
            "protocol": protocol,
            "methods": methods if protocol == "fewshot" else methods[:2],
        }
    )


def run_counting(exp, backbone) -> tuple[int, float]:
    """(forward passes the run's cache made, wall seconds of the run)."""
    from prolip.bench import protocols

    caches = []
    original = protocols.Bench.__init__

    def keep(self, *a, **k):
        original(self, *a, **k)
        caches.append(self.cache)

    protocols.Bench.__init__ = keep
    try:
        start = time.perf_counter()
        protocols.run_experiment(exp, echo=lambda _: None, backbone=backbone)
        return caches[0].stats.forward_passes, time.perf_counter() - start
    finally:
        protocols.Bench.__init__ = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--model", default="test-vit-tiny")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from prolip.backbones import load_backbone
    from prolip.bench.plan import plan_experiment

    backbone = load_backbone(args.model, "none")
    with tempfile.TemporaryDirectory() as tmp:
        for protocol in ("fewshot", "base2new"):
            exp = experiment(protocol, Path(tmp), args)
            start = time.perf_counter()
            plan = plan_experiment(exp, backbone, name=protocol)
            plan_s = time.perf_counter() - start
            actual, run_s = run_counting(exp, backbone)
            s = plan.survey
            print(
                json.dumps(
                    {
                        "experiment": f"dtd10 {protocol}, shots 1-16 x seeds 1-3, {plan.cells} cells, "
                        f"{args.views} views",
                        "plan_forward_passes": s.forward_passes,
                        "run_forward_passes": actual,
                        "equal": s.forward_passes == actual,
                        "already_cached": s.cached_passes,
                        "images": s.images,
                        "reference_structure_passes": plan.reference_passes,
                        "reference_over_plan": round(
                            plan.reference_passes / max(s.forward_passes + s.cached_passes, 1), 1
                        ),
                        "plan_s": round(plan_s, 1),
                        "estimated_extraction_s": round((plan.seconds_per_pass or 0) * s.forward_passes, 1),
                        "run_s (extraction + training)": round(run_s, 1),
                    }
                ),
                flush=True,
            )
    print("target: plan == run (forward passes), after sharing across shots, seeds, protocols and methods")


if __name__ == "__main__":
    main()
