"""Why validation-free LP++ falls below zero-shot on prolip-tiny's noisy digits (issue 26): its test accuracy by
epoch, against zero-shot, on the demo's split (16-per-class pool, 30 test images per class, 4 views, 16 shots).

    HF_HUB_OFFLINE=1 python benchmarks/lpp_epochs.py [--seeds 1 2 3]

Measured (seeds 1-3): noisy zero-shot 64.2; LP++ 65.0 / 67.3 / 68.4 / 68.8 / 63.8 / 68.6 / 56.9 / 55.1 / 52.0 at
0 / 1 / 2 / 5 / 10 / 20 / 50 / 100 / 300 epochs; inverted zero-shot 11.2, LP++ 14.1 … 49.3 (still climbing at 300).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from statistics import mean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_behaviour import DigitsBench  # noqa: E402  (the behavioural tests' own bench: the same split and views)

EPOCHS = (0, 1, 2, 5, 10, 20, 50, 100, 300)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        bench = DigitsBench(Path(tmp))
        for domain in ("noisy", "inverted"):
            zero_shot = mean(bench.zero_shot(domain, s) for s in args.seeds)
            curve = {e: mean(bench.accuracy(domain, s, 16, "lp++", epochs=e) for s in args.seeds) for e in EPOCHS}
            print(
                f"{domain}: zero-shot {zero_shot:.1f}; LP++ by epochs "
                + ", ".join(f"{e}: {a:.1f}" for e, a in curve.items())
            )


if __name__ == "__main__":
    main()
