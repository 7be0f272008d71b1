"""Run every benchmark in turn and print its figures (each script also runs on its own; see benchmarks/README.md)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "bench_forward_passes.py",
    "bench_plan.py",
    "bench_training.py",
    "bench_grid.py",
    "bench_methods.py",
    "bench_extraction.py",
    "bench_memory.py",
    "bench_tta.py",
]

if __name__ == "__main__":
    failed = []
    for name in SCRIPTS:
        if not (HERE / name).exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0:
            failed.append(name)
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
