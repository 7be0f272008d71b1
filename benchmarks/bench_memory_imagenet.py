"""Bounded memory at ImageNet size: every feature method's peak resident memory on an ImageNet-shaped problem.

Shape (issue 24): 1,000 classes × 16 shots = 16,000 support images with 2 cached views, 50,000 test images, the
tiny model's dimensions (128-d pre-projection features, 64-d joint space). Features are synthetic, at the cache
level (``tests/synthetic.py``'s Gaussian-cluster problem: Task, Support, test features in memory, no images and no
backbone): the memory a method needs depends on these shapes, not on the values. Each method is configured as
``prolip fit`` configures it for ImageNet (``configure(name, {}, dataset="ImageNet")``: ProKeR one view, M =
16,000), fitted and evaluated with ``pipeline.evaluate`` (zero-shot and adapted logits, diagnostics, ECE) in a
fresh child process, whose ``ru_maxrss`` is its peak. Iterative methods run fewer steps/epochs than their defaults
(``SHORT``): their memory does not depend on the number of steps. ``--validation`` also gives each method a
16-shot validation set (16,000 images) and runs the searches it then does (on smaller grids, ``SHORT_SEARCH``:
the grid's size does not change what one grid point holds).

"features" is what the child holds before any method runs (support views, center crops, test and validation
features); "base" is the child's peak RSS after building them and importing prolip, with no method fitted (Python,
torch, the features); the ratio is peak / base.

    nice -n 10 python benchmarks/bench_memory_imagenet.py [--methods gda proker ...] [--validation]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "tests"))  # the synthetic problem lives with the tests
sys.path.insert(0, str(HERE.parent))

SHORT = {  # fewer optimiser steps than the defaults: what is held at once does not depend on how many
    "prolip": dict(steps=10),
    "prolip-text": dict(steps=10),
    "prolip+taskres": dict(steps=10),
    "prolip+tip-adapter-f": dict(steps=3),
    "p0": dict(steps=10),
    "linear-adapter": dict(steps=10),
    "clip-adapter-prolip": dict(steps=10),
    "clip-adapter": dict(epochs=1),
    "taskres": dict(epochs=1),
    "clap": dict(epochs=2),
    "zs-lp": dict(epochs=2),
    "lp++": dict(epochs=2),
    "tip-adapter-f": dict(epochs=2),
    "linear-probe": dict(max_iter=20, search_steps=2),
}
SHORT_SEARCH = {  # with --validation: smaller grids than the originals' (one grid point holds the same)
    "tip-adapter": dict(search_step=(8, 4)),
    "tip-adapter-f": dict(search_step=(8, 4)),
    "proker": dict(beta_grid=(1.5, 3.0, 1), lam_grid=(0.05, 0.25, 2)),
    "prolip": dict(grid=False),
}


def problem(args):
    from bench_methods import with_text_side
    from synthetic import make_problem

    p = make_problem(
        num_classes=args.classes,
        shots=args.shots,
        d_pre=args.dim,
        d=args.dim // 2,
        views=args.views,
        test_per_class=args.test // args.classes,
    )
    with_text_side(p)
    return p


def held_bytes(p, validation: bool) -> int:
    parts = [p.support.views.views, p.support.center_features(), p.test.features]
    parts += [p.val.features] if validation else []
    return sum(t.numel() * t.element_size() for t in parts)


def evaluate(method, p) -> dict:
    """``pipeline.evaluate`` on the synthetic test set (an episode with only what evaluation reads)."""
    from prolip.pipeline import evaluate as pipeline_evaluate

    class Evaluation:
        features, labels = p.test.features, p.test.labels
        images = SimpleNamespace(classnames=[f"class{i}" for i in range(p.task.num_classes)])

        def __len__(self) -> int:
            return len(self.labels)

    episode = SimpleNamespace(evaluation=Evaluation(), task=p.task, images=SimpleNamespace(eval_set="test"))
    return pipeline_evaluate(method, episode)


def child(args) -> None:
    """Runs in a fresh process so ru_maxrss measures one method alone."""
    import prolip.pipeline  # noqa: F401 (imported by every child, so the base holds the same modules)
    from prolip.methods import configure

    p = problem(args)
    started = time.perf_counter()
    out = {"features_bytes": held_bytes(p, args.validation)}
    if args.method != "none":
        extra = {**SHORT.get(args.method, {}), **(SHORT_SEARCH.get(args.method, {}) if args.validation else {})}
        method = configure(args.method, extra, validate=args.validation, dataset="ImageNet")
        method.fit(p.task, p.support, p.val if args.validation else None, seed=1)
        metrics = evaluate(method, p)
        out |= {"accuracy": metrics["accuracy"], "selected": method.selected_}
    out |= {
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": time.perf_counter() - started,
    }
    print("RESULT " + json.dumps(out, default=str))


def run_child(args, method: str) -> dict:
    cmd = [sys.executable, str(HERE), "--child", f"--method={method}"]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("classes", "shots", "views", "test", "dim")]
    cmd += ["--validation"] if args.validation else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1][len("RESULT ") :])


def feature_methods() -> list[str]:
    from prolip.methods import available, method_class

    return [name for name in available() if not method_class(name).capabilities.encodes_images]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--test", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--validation", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    base = run_child(args, "none")
    gb = 1e9
    print(
        f"{args.classes} classes x {args.shots} shots x {args.views} views support, {args.test} test, "
        f"{args.dim}-d features{' + validation' if args.validation else ''}: "
        f"features {base['features_bytes'] / gb:.3f} GB, "
        f"base RSS (imports + features, no method) {base['peak_bytes'] / gb:.2f} GB"
    )
    print("| method | peak RSS (GB) | peak / base | above base (GB) | fit + evaluate (s) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.methods or feature_methods():
        r = run_child(args, name)
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | |", flush=True)
            continue
        peak = r["peak_bytes"]
        print(
            f"| {name} | {peak / gb:.2f} | {peak / base['peak_bytes']:.2f} | {(peak - base['peak_bytes']) / gb:.2f} "
            f"| {r['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
