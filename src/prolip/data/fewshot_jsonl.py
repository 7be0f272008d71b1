"""The few-shot splits 2SFS publishes (github.com/FarinaMatteo/rethinking_fewshot_vlms, README "An Effort for
Reproducibility"; ``scripts/download_splits.sh``): 165 exact splits (11 datasets × seeds 1-3 × 1/2/4/8/16 shots) as
JSON Lines files, read onto prolip's own readers so a fit trains on the very images the original used.

Layout and format (``datasets/dtd.py:34-39`` and every other dataset module; ``datasets/utils.py:17-30``):
``<dataset folder>/split_fewshot/shot_{K}-seed_{S}_train.jsonl`` and ``…_val.jsonl`` (ImageNet has the train file
only, datasets/imagenet.py:228-231), one JSON object per line, a Dassl ``Datum``'s fields::

    {"_impath": "dtd/images/banded/banded_0002.jpg", "_label": 0, "_domain": -1, "_classname": "banded"}

``_impath`` is joined to the datasets root by the original's loader (``osp.join(data_root, item.impath)``,
datasets/utils.py:372), so it is relative to it (or absolute, which the join keeps). Here each line is matched to
an image of the dataset as prolip reads it (``load_benchmark`` / ``resolve_data``) by the longest tail of path
components they share (the file name at least), and its label must be the one prolip reads for that image: the
result is an ordinary :class:`~prolip.data.sampling.FewShotSplit` (indices into the train split and, for the
``_val`` file, the val split), so it travels and is saved like a sampled one.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path, PurePath

from prolip.data.folder import DataError, class_index, read_text
from prolip.data.sampling import FewShotSplit
from prolip.data.types import DatasetSplits, LabeledImages

CONVENTION = "2sfs"
FILE_NAME = re.compile(r"shot_(\d+)-seed_(-?\d+)_(train|val)\.jsonl$")


def split_files(dataset_dir: Path | str, shots: int, seed: int) -> tuple[Path, Path | None]:
    """Where the original keeps the split of ``shots`` and ``seed`` for one dataset folder (datasets/dtd.py:36-38):
    the train file, and the val file when there is one (ImageNet's split has none)."""
    folder = Path(dataset_dir) / "split_fewshot"
    train, val = (folder / f"shot_{shots}-seed_{seed}_{part}.jsonl" for part in ("train", "val"))
    return train, (val if val.is_file() else None)


def read_jsonl(path: Path | str) -> list[tuple[str, int, str | None]]:
    """The (image path, label, class name) of every line of a 2SFS split file (``load_jsonl`` + ``dict2datum``,
    datasets/utils.py:17-30); blank lines are skipped, anything else malformed is a DataError naming the line."""
    path = Path(path)
    rows = []
    for n, line in enumerate(read_text(path, "2SFS split file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(item, dict) or not isinstance(item.get("_impath"), str) or not item["_impath"]:
            raise DataError(f"{where}: expected an object with '_impath', '_label' and '_classname'")
        name = item.get("_classname")
        rows.append((item["_impath"], class_index(item.get("_label"), where), name if isinstance(name, str) else None))
    if not rows:
        raise DataError(f"2SFS split file {path} is empty")
    return rows


def _tail_match(images: LabeledImages, rows: list[tuple[str, int, str | None]], path: Path) -> list[int]:
    """The index in ``images`` of each row's image: the one sharing the longest tail of path components."""
    by_name: dict[str, list[int]] = {}
    for i, item in enumerate(images.items):
        by_name.setdefault(PurePath(item.path).name, []).append(i)
    out = []
    for n, (rel, label, classname) in enumerate(rows, 1):
        where = f"{path}, entry {n} ({rel})"
        parts = PurePath(rel.replace("\\", "/")).parts
        candidates = by_name.get(parts[-1], [])
        if not candidates:
            raise DataError(f"{where}: no image of {images.name!r} of that name; is it the same dataset?")
        shared = [(_shared_tail(PurePath(images.items[i].path).parts, parts), i) for i in candidates]
        best = max(s for s, _ in shared)
        chosen = [i for s, i in shared if s == best]
        if len(chosen) > 1:
            raise DataError(f"{where}: matches {len(chosen)} images equally well ({images.items[chosen[0]].path}, …)")
        i = chosen[0]
        if images.items[i].label != label:
            ours = images.classnames[images.items[i].label]
            raise DataError(
                f"{where}: label {label} ({classname!r}) here, but prolip reads {images.items[i].path} as label "
                f"{images.items[i].label} ({ours!r}); the split belongs to another class list"
            )
        out.append(i)
    return out


def _shared_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    return k


def read_split(
    splits: DatasetSplits,
    train_file: Path | str,
    val_file: Path | str | None = None,
    *,
    shots: int | None = None,
    seed: int | None = None,
) -> FewShotSplit:
    """The 2SFS split in ``train_file`` (and ``val_file``) as a :class:`FewShotSplit` of ``splits``: train indices
    into ``splits.train``, validation indices into ``splits.val`` (none without ``val_file``).

    ``shots`` and ``seed`` default to those in the file name (``shot_{K}-seed_{S}_train.jsonl``); otherwise shots is
    the largest class's count and seed 0. Use it as ``episode.draw_images`` uses a sampled split:
    ``splits.train.subset(split.train_indices)`` is the support set.
    """
    train_file = Path(train_file)
    if splits.train is None or not len(splits.train):
        raise DataError(f"dataset {splits.name!r} has no train split for {train_file} to index")
    rows = read_jsonl(train_file)
    train = _tail_match(splits.train, rows, train_file)
    val: list[int] = []
    if val_file is not None:
        if splits.val is None or not len(splits.val):
            raise DataError(f"dataset {splits.name!r} has no val split for {val_file} to index")
        val = _tail_match(splits.val, read_jsonl(val_file), Path(val_file))
    named = FILE_NAME.search(train_file.name)
    if shots is None:
        shots = int(named.group(1)) if named else max(Counter(splits.train.items[i].label for i in train).values())
    if seed is None:
        seed = int(named.group(2)) if named else 0
    return FewShotSplit(train, val, CONVENTION, seed, shots, "val")


def support_images(splits: DatasetSplits, split: FewShotSplit) -> tuple[LabeledImages, LabeledImages | None]:
    """The support images of a split read by :func:`read_split`, and its validation images (None when it has
    none), as prolip's readers describe them (class names and templates of ``splits``)."""
    assert splits.train is not None
    val = splits.val.subset(split.val_indices) if splits.val is not None and split.val_indices else None
    return splits.train.subset(split.train_indices), val
