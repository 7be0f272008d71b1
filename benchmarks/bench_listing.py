"""A dataset listing that is read once (issue 24): ``resolve_data`` on an ImageNet-shaped CoOp tree, run after run.

Builds ImageNet in CoOp's layout (``imagenet/classnames.txt``, ``imagenet/images/{train,val}/<wnid>/*.JPEG``: 1,000
classes, 1.3 M training files, 50,000 test) from hard links, one small JPEG per class, so the tree costs directory
entries, not image bytes. Then each phase runs ``resolve_data("imagenet", root=...)`` in a fresh process (a run
of ``prolip fit`` lists its data once, at the start) and prints its wall time:

* ``rglob`` (with ``--before``): the listing as it was, ``sorted(class_folder.rglob("*"))`` and an ``is_file()``
  per entry (only the scan, no ``resolve_data`` around it);
* ``first``: the listing with nothing remembered (``os.scandir``), which writes the memo;
* ``second``: the next run, reading the memo and checking each folder's identity;
* ``after a change``: one file added to one class folder, which that folder alone is listed again for.

The tree is deleted at the end unless ``--keep``.

    nice -n 10 python benchmarks/bench_listing.py [--classes 1000 --train 1300 --test 50] [--before] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 37 % 256, i * 91 % 256, i * 13 % 256)).save(buf, "JPEG")
    return buf.getvalue()


def build_imagenet_tree(root: Path, classes: int = 1000, train: int = 1300, test: int = 50) -> Path:
    """ImageNet in CoOp's layout under ``root`` (``--data imagenet --data-root root``): ``classes`` classes of
    ``train`` training and ``test`` test files each, every file of a class a hard link to that class's one small
    JPEG (kept in ``root/sources``; a file may have at most ~65,000 links on ext4, so one source per class)."""
    wnids = [f"n{i:08d}" for i in range(classes)]
    imagenet, sources = root / "imagenet", root / "sources"
    sources.mkdir(parents=True)
    imagenet.mkdir()
    (imagenet / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    for i, wnid in enumerate(wnids):
        source = sources / f"{wnid}.JPEG"
        source.write_bytes(_jpeg(i))
        for part, count in (("train", train), ("val", test)):
            folder = imagenet / "images" / part / wnid
            folder.mkdir(parents=True)
            for j in range(count):
                os.link(source, folder / f"{wnid}_{j}.JPEG")
    return root


def rglob_listing(root: Path) -> int:
    """The scan before the listing was remembered (issue 24's 27 s): ``sorted(rglob)`` and ``is_file()``."""
    wnids = [line.split()[0] for line in (root / "imagenet" / "classnames.txt").read_text().splitlines()]
    n = 0
    for part in ("train", "val"):
        for wnid in wnids:
            n += sum(1 for p in sorted((root / "imagenet" / "images" / part / wnid).rglob("*")) if p.is_file())
    return n


def child(args) -> None:
    from prolip.data import resolve_data  # imported before the clock starts: a run imports it anyway

    root, started = Path(args.root), time.perf_counter()
    if args.phase == "rglob":
        n = rglob_listing(root)
    else:
        splits = resolve_data("imagenet", root=root, cache_dir=args.cache)
        assert splits.train is not None and splits.test is not None
        n = len(splits.train) + len(splits.test)
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "files": n}))


def run(args, phase: str, root: Path, cache: Path) -> dict:
    cmd = [sys.executable, str(HERE), "--child", f"--phase={phase}", f"--root={root}", f"--cache={cache}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{phase} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--train", type=int, default=1300, help="training files per class")
    ap.add_argument("--test", type=int, default=50, help="test files per class")
    ap.add_argument("--before", action="store_true", help="also time the rglob listing it replaces")
    ap.add_argument("--tmp", default=None, help="where to build the tree (default: the system's temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the tree")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="first", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="prolip-listing-", dir=args.tmp))
    try:
        started = time.perf_counter()
        root = build_imagenet_tree(work / "data", args.classes, args.train, args.test)
        print(
            f"tree: {args.classes} classes, {args.classes * args.train:,} train + {args.classes * args.test:,} test "
            f"hard links under {root} (built in {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        time.sleep(2.5)  # past the listing's racy window, so the first run's memo trusts every folder
        phases = (["rglob"] if args.before else []) + ["first", "second"]
        for phase in phases:
            r = run(args, phase, root, work / "cache")
            print(f"{phase}: {r['seconds']:.2f} s ({r['files']:,} files)", flush=True)
        wnid = "n00000000"
        (root / "imagenet" / "images" / "train" / wnid / "added.JPEG").write_bytes(_jpeg(0))
        r = run(args, "second", root, work / "cache")
        print(f"after a change: {r['seconds']:.2f} s ({r['files']:,} files)", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
