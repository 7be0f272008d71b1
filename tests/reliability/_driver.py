"""Extraction driver for the fault tests, run as ``python _driver.py SPEC_JSON``.

It imports torch and builds the backbone once, then forks one child per extraction attempt, so many kill -9s cost
milliseconds instead of a fresh interpreter each. A child is killed either by this parent after a seeded random
delay, or by itself (SIGKILL, no cleanup of any kind) at a seeded random I/O or forward-pass event of the cache
code: between creating and filling a lock, mid unit write, after the rename but before the unlock, mid-batch.
Results go to stdout as one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)  # no OpenMP pool in the parent, so forked children never inherit a dead one

import prolip.features.storage as storage_mod  # noqa: E402
from prolip.backbones import load_backbone  # noqa: E402
from prolip.features import FeatureCache  # noqa: E402

SPEC = json.loads(sys.argv[1])
PATHS = sorted(Path(SPEC["images"]).glob("*.png"))
BACKBONE = load_backbone("test-vit-tiny", "none")
VIEWS, UNIT, BATCH = SPEC.get("views", 3), SPEC.get("unit_images", 2), SPEC.get("batch_size", 4)


def _instrument(kill_at: int | None, counter: list[int]) -> None:
    def hook(fn):
        def wrapped(*a, **k):
            if not counter[1]:  # not armed yet: the images are being identified
                return fn(*a, **k)
            counter[0] += 1
            if kill_at is not None and counter[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)

        return wrapped

    for name in ("open", "write", "close", "fsync", "replace", "unlink"):
        setattr(os, name, hook(getattr(os, name)))
    storage_mod.open = hook(open)  # the unit's temporary file
    BACKBONE.encode_pre = hook(BACKBONE.encode_pre)


def _child(cache_dir: str, kill_at: int | None, result: str | None) -> None:
    counter = [0, False]
    originals = {n: getattr(os, n) for n in ("open", "write", "close", "fsync", "replace", "unlink")}
    _instrument(kill_at, counter)
    cache = FeatureCache(cache_dir, BACKBONE, progress=False, unit_images=UNIT, batch_size=BATCH)
    keys = cache.identity.keys

    def keys_then_arm(paths):
        # Events count from the units on: hashing the images (and remembering their hashes, which the first
        # attempts may or may not do) opens files too, and would move every kill point into it.
        found = keys(paths)
        counter[1] = True
        return found

    cache.identity.keys = keys_then_arm  # type: ignore[method-assign]
    features = cache.views(PATHS, VIEWS).to_tensor()
    for n, f in originals.items():
        setattr(os, n, f)
    if result:
        torch.save(features, result + ".pt")
        Path(result + ".json").write_text(json.dumps({"forward": cache.stats.forward_passes, "events": counter[0]}))


def fork(cache_dir, kill_at=None, kill_after=None, result=None) -> int:
    """Run one extraction in a forked child; returns its wait status (signal number if killed, else -exit code)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _child(str(cache_dir), kill_at, result)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


def snapshot(cache_dir) -> dict[str, list]:
    """Complete unit files → [content digest, number of images]; a file that fails its checksum is reported."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(cache_dir).rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
            data = h.get_tensor("features").contiguous().numpy().tobytes()
        ok = meta.get("checksum") == hashlib.blake2b(data, digest_size=16).hexdigest()
        out[str(f.relative_to(cache_dir))] = [
            hashlib.sha256(json.dumps(meta, sort_keys=True).encode() + data).hexdigest() if ok else "CORRUPT",
            len(json.loads(meta["keys"])),
        ]
    return out


def main() -> None:
    work = Path(SPEC["work"])
    mode = SPEC["mode"]
    report: dict = {}
    if mode == "kill":
        started = time.perf_counter()
        assert fork(work / "ref_cache", result=str(work / "ref")) == 0
        duration = time.perf_counter() - started
        events = json.loads((work / "ref.json").read_text())["events"]
        rng = np.random.default_rng(SPEC["seed"])
        attempts = []
        for i in range(SPEC["kills"]):
            # Kills at seeded events go to one cache, timed kills to another: how far a timed kill gets depends on
            # the machine's load, and could finish the extraction before the event kills are done with it.
            if i % 3 == 2:  # every third kill from outside, at a random moment
                cache = work / "cache_timed"
                before = snapshot(cache)
                how, status = "delay", fork(cache, kill_after=float(rng.uniform(0.0, duration * 0.6)))
            else:  # the others at a random event, early enough that each attempt gets only a unit or two done
                cache = work / "cache"
                before = snapshot(cache)
                at = int(rng.integers(1, min(events, 3 + 7 * UNIT)))
                how, status = f"event {at}", fork(cache, kill_at=at)
            after = snapshot(cache)
            lost = [u for u, v in before.items() if after.get(u) != v]
            corrupt = [u for u, v in after.items() if v[0] == "CORRUPT"]
            attempts.append(
                {
                    "how": how,
                    "cache": cache.name,
                    "signal": status,
                    "lost": lost,
                    "corrupt": corrupt,
                    "units_done": len(after),
                }
            )
        report["attempts"] = attempts
        for name in ("cache", "cache_timed"):
            report[name] = {
                "images_cached_before_resume": sum(n for _, n in snapshot(work / name).values()),
                "resume_status": fork(work / name, result=str(work / f"out_{name}")),
            }
        report["reference_events"] = events
    elif mode == "concurrent":
        pids = []
        for name in ("a", "b"):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _child(str(work / "cache"), None, str(work / name))
                except BaseException:
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            pids.append(pid)
        report["statuses"] = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
