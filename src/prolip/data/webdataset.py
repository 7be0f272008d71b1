"""WebDataset tar shards (open_clip's and CLIP_benchmark's format), read member by member, never extracted.

A shard holds samples: members sharing a key (``sample01.jpg``, ``sample01.cls``; the key is the name up to the
first dot of its base name, as webdataset groups them). Each sample with an image becomes one ``ImageItem`` whose
path is ``<shard>::<image member>`` (``prolip.data.types.Member``); its label is the integer text of the label
member (``cls`` by default). Class names come from ``--classnames`` or from the shards' own ``classnames.txt``
(beside the shards or one folder up, CLIP_benchmark's layout), prompt templates likewise from
``zeroshot_classification_templates.txt``.

Shards are indexed with the standard library's tarfile (headers only: the image bytes are read when an image is
decoded, with one seek), which lets the feature cache read exactly the images it needs in any order; webdataset's
own reader streams whole shards, which suits training loops, not a cache that wants 16 images of a shard.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from prolip.data.folder import (
    DEFAULT_TEMPLATES,
    DataError,
    check_classnames,
    class_index,
    is_image_file,
    read_classnames,
    read_json,
    read_templates,
    read_text,
    regular_file,
)
from prolip.data.images import BadImageError
from prolip.data.types import DatasetSplits, ImageItem, LabeledImages, Member, register_container

LABEL_KEY = "cls"
# Image members in the order a sample's image is chosen when it has several (CLIP_benchmark's order first).
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff")
NAMES_FILE, TEMPLATES_FILE = "classnames.txt", "zeroshot_classification_templates.txt"
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
MAX_SHARDS = 100_000  # what one pattern may expand to: a typo such as {0..99999999} must not hang
_BLOCK = tarfile.BLOCKSIZE


# ---- which --data values are shards --------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion as webdataset's shard lists use it: ``{000..009}`` (zero-padded numeric ranges)
    and ``{a,b}`` (alternatives), nested or repeated; anything else between braces stays as written."""
    out, seen = [], set()
    for text in _expand(pattern, 0):
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _expand(pattern: str, count: int) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    choices = _choices(match.group(1))
    if choices is None:  # not a range or a list: literal braces, then what follows them
        head = pattern[: match.end()]
        return [head + rest for rest in _expand(pattern[match.end() :], count)]
    if count + len(choices) > MAX_SHARDS:
        raise DataError(f"shard pattern {pattern!r} expands to more than {MAX_SHARDS} shards")
    out: list[str] = []
    for choice in choices:
        out += _expand(pattern[: match.start()] + choice + pattern[match.end() :], count + len(out))
        if len(out) > MAX_SHARDS:
            raise DataError(f"shard pattern {pattern!r} expands to more than {MAX_SHARDS} shards")
    return out


def _choices(body: str) -> list[str] | None:
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        lo, hi = numbers.groups()
        padded = (lo.startswith("0") and len(lo) > 1) or (hi.startswith("0") and len(hi) > 1)
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        if abs(int(hi) - int(lo)) >= MAX_SHARDS:
            raise DataError(f"shard range {{{body}}} holds more than {MAX_SHARDS} shards")
        return [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    return body.split(",") if "," in body else None


def is_shard_spec(spec: str) -> bool:
    """Whether ``--data`` names tar shards: a ``.tar`` file or pattern, or a folder of shards."""
    if spec.lower().endswith((".tar", ".tar.gz", ".tgz")):
        return True
    path = Path(spec)
    return path.is_dir() and bool(_shard_folders(path))


def _shard_folders(root: Path) -> dict[str, list[Path]]:
    """A folder's shards by split: ``*.tar`` directly inside a folder without sub-folders (one split), or in split
    sub-folders without images (``train/``, ``test/``, ... CLIP_benchmark's layout). An image folder that happens to
    hold a tar file (an archive beside its class folders) stays an image folder."""
    subfolders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    direct = sorted(root.glob("*.tar"), key=_shard_order)
    if direct and not subfolders:
        return {"train": direct}
    found = {}
    for name, split in SPLIT_FOLDERS.items():
        sub = root / name
        shards = sorted(sub.glob("*.tar"), key=_shard_order) if sub.is_dir() else []
        if shards and split not in found and not any(is_image_file(f) for f in sub.iterdir()):
            found[split] = shards
    return found


def _shard_order(path: Path) -> tuple:
    """0.tar, 1.tar, ..., 10.tar in numeric order (CLIP_benchmark numbers shards without padding)."""
    return (0, int(path.stem), "") if path.stem.isdecimal() else (1, 0, path.name)


def shard_paths(spec: str) -> list[Path]:
    """The shard files a pattern names, each checked to be an uncompressed tar file, in the pattern's order."""
    paths = [Path(p).expanduser() for p in expand_braces(spec)]
    for p in paths:
        if p.name.lower().endswith((".tar.gz", ".tgz")):
            raise DataError(
                f"shard {p} is compressed: members cannot be read one by one from a compressed tar; "
                f"decompress it (gunzip) and pass the .tar"
            )
        if not p.name.lower().endswith(".tar"):
            raise DataError(f"shard {p} is not a .tar file")
        regular_file(p, "shard")
    return paths


# ---- the index of one shard ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    offset: int  # of the member's data in the shard
    size: int


def shard_index(path: Path) -> dict[str, Entry]:
    """Regular-file members of a shard by name, read once per process and version of the file.

    A truncated shard (a copy cut short) or one with a damaged header is a DataError naming it: tarfile would
    otherwise stop at the damage and silently drop the samples after it.
    """
    regular_file(path, "shard")
    st = os.stat(path)
    return _index(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _index(path: str, size: int, mtime_ns: int) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    last = None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                last = info.name
                if not info.isreg():
                    continue
                if info.offset_data + info.size > size:
                    raise DataError(
                        f"shard {path} is truncated: member {info.name} is cut short (the file ends at "
                        f"byte {size}); copy the shard again"
                    )
                if info.name in entries:
                    raise DataError(f"shard {path} holds two members named {info.name}; rebuild the shard")
                entries[info.name] = Entry(info.offset_data, info.size)
            end = tar.offset
            f.seek(end)
            trailer = f.read(_BLOCK)
    except tarfile.TarError as e:
        raise DataError(f"shard {path} is not a readable tar file ({e})") from None
    after = f"after member {last}" if last else "at its start"
    if len(trailer) < _BLOCK:
        raise DataError(
            f"shard {path} is truncated {after} (no end-of-archive marker): the file was cut short; "
            "copy the shard again"
        )
    if trailer.strip(b"\0"):
        raise DataError(
            f"shard {path} has a damaged header at byte {end} ({after}); the samples from there on "
            "cannot be read; rebuild or copy the shard again"
        )
    return entries


def read_member(path: Path, entry: Entry) -> bytes:
    with open(path, "rb") as f:
        f.seek(entry.offset)
        data = f.read(entry.size)
    if len(data) != entry.size:
        raise OSError(f"{path} ended after {len(data)} of the member's {entry.size} bytes")
    return data


def member_bytes(member: Member) -> bytes:
    """The bytes of a shard's member (what ``load_image`` decodes); BadImageError naming it otherwise."""
    try:
        entry = shard_index(member.container).get(member.name)
        if entry is None:
            raise BadImageError(member.path, f"shard {member.container} has no member {member.name}")
        return read_member(member.container, entry)
    except DataError as e:
        raise BadImageError(member.path, str(e)) from None
    except OSError as e:
        raise BadImageError(member.path, str(e)) from None


register_container([".tar"], member_bytes)


# ---- samples -------------------------------------------------------------------------------------------------


def sample_parts(name: str) -> tuple[str, str]:
    """(key, extension) of a member name as webdataset splits it: ``a/b.seg.png`` → (``a/b``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def samples(index: dict[str, Entry]) -> dict[str, dict[str, str]]:
    """Members grouped by sample key, in shard order: key → {extension: member name}."""
    out: dict[str, dict[str, str]] = {}
    for name in index:
        key, ext = sample_parts(name)
        out.setdefault(key, {})[ext.lower()] = name
    return out


def _label(read, where: str, members: dict[str, str], label_key: str, num_classes: int, names_from: str) -> int:
    if label_key not in members:
        raise DataError(
            f"{where} has no '{label_key}' member (it has: {', '.join(sorted(members))}); pass "
            f"--label-key with the member that holds the class index"
        )
    try:
        text = read(members[label_key]).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{where}: its '{label_key}' member is not text") from None
    label = class_index(text, where)
    if label >= num_classes:
        raise DataError(
            f"{where}: label {label} is outside 0..{num_classes - 1} ({num_classes} classes in {names_from})"
        )
    return label


def _image_member(members: dict[str, str], where: str, image_key: str | None) -> str | None:
    """The sample's image member: the ``image_key`` extension, or its only image (two are a guess: the user picks;
    a sample with none holds metadata or captions, not a sample to classify)."""
    if image_key is not None:
        if image_key not in members:
            raise DataError(
                f"{where} has no '{image_key}' member (it has: {', '.join(sorted(members))}); pass the --image-key "
                "its images have",
                option="--image-key",
            )
        return members[image_key]
    images = [ext for ext in IMAGE_EXTENSIONS if ext in members]
    if len(images) > 1:
        raise DataError(
            f"{where} holds {len(images)} images ({', '.join(members[e] for e in images)}), so which one is the "
            "sample's is ambiguous; pass " + " or ".join(f"--image-key {e}" for e in images),
            option="--image-key",
        )
    return members[images[0]] if images else None


def _shard_items(
    shard: Path, label_key: str, num_classes: int, names_from: str, image_key: str | None = None
) -> tuple[list[ImageItem], list[Path]]:
    index = shard_index(shard)
    items, ignored = [], []
    with open(shard, "rb") as f:  # one handle for the labels of the whole shard

        def read(name: str) -> bytes:
            f.seek(index[name].offset)
            return f.read(index[name].size)

        for key, members in samples(index).items():
            image = _image_member(members, f"shard {shard}, sample {key}", image_key)
            if image is None:  # metadata or captions without an image: not a sample to classify
                ignored += [Member(shard, name).path for name in members.values()]
                continue
            label = _label(read, f"shard {shard}, sample {key}", members, label_key, num_classes, names_from)
            items.append(ImageItem(Member(shard, image).path, label))
    return items, ignored


# ---- class names and templates --------------------------------------------------------------------------------


def _dataset_file(shards: list[Path], name: str) -> Path | None:
    """A metadata file beside the first shard or one folder up (CLIP_benchmark keeps it above the split folders)."""
    folder = shards[0].parent
    for candidate in (folder / name, folder.parent / name):
        if candidate.is_file():
            return candidate
    return None


def names_list(path: Path) -> list[str]:
    """Class names in label order: one per line, or a JSON list."""
    if path.suffix.lower() == ".json":
        names = read_json(path, "class names file")
    else:
        names = [line.strip() for line in read_text(path, "class names file").splitlines() if line.strip()]
    if not names:
        raise DataError(f"class names file {path} is empty")
    return check_classnames(names, f"class names file {path}")


def shard_classnames(shards: list[Path], classnames_file) -> tuple[list[str], list[str] | None, str]:
    """(names shown and prompted, what the shards' own metadata calls the classes when renamed, where from)."""
    own = _dataset_file(shards, NAMES_FILE)
    if own is None and classnames_file is None:
        raise DataError(
            f"shards {shards[0]}...: no class names: pass --classnames FILE (one name per line, in label "
            f"order) or put {NAMES_FILE} beside the shards"
        )
    if own is None:
        return names_list(Path(classnames_file)), None, str(classnames_file)
    ids = names_list(own)
    if classnames_file is None:
        return ids, None, str(own)
    names = read_classnames(classnames_file, ids)
    return names, (ids if names != ids else None), str(own)


def read_shards(
    shards: list[Path],
    *,
    label_key: str = LABEL_KEY,
    image_key: str | None = None,
    classnames_file=None,
    templates_file=None,
    name: str | None = None,
) -> LabeledImages:
    """The labelled images of some shards (one split), in shard order then sample order."""
    names, ids, names_from = shard_classnames(shards, classnames_file)
    items: list[ImageItem] = []
    ignored: list[Path] = []
    for shard in shards:
        found, skipped = _shard_items(shard, label_key, len(names), names_from, image_key)
        items += found
        ignored += skipped
    if not items:
        raise DataError(
            f"shards {shards[0]}...: no sample holds an image (looked for members ending in "
            f"{', '.join(IMAGE_EXTENSIONS)})"
        )
    own_templates = _dataset_file(shards, TEMPLATES_FILE)
    template_file = templates_file or own_templates
    templates = read_templates(template_file) if template_file else list(DEFAULT_TEMPLATES)
    return LabeledImages(items, names, templates, name or shards[0].parent.name, ignored, class_ids=ids)


def load_shards(
    spec: str, *, label_key: str | None = None, image_key: str | None = None, classnames_file=None, templates_file=None
) -> DatasetSplits:
    """``--data`` naming shards: a pattern (``train-{000000..000009}.tar``, one split) or a folder of shards
    (``*.tar`` in it, one split, or in ``train/``, ``val/``, ``test/`` sub-folders)."""
    label_key = label_key or LABEL_KEY
    path = Path(spec).expanduser()
    by_split = _shard_folders(path) if path.is_dir() else {"train": shard_paths(spec)}
    name = path.name if path.is_dir() else None
    parts = {
        split: read_shards(
            shards,
            label_key=label_key,
            image_key=image_key,
            classnames_file=classnames_file,
            templates_file=templates_file,
            name=name,
        )
        for split, shards in by_split.items()
    }
    first = next(iter(parts.values()))
    if "train" not in parts and len(parts) == 1:  # only test (or val) shards: read as the data's one split
        parts = {"train": first}
    return DatasetSplits(first.name, first.classnames, first.templates, **parts)


def shards_read(spec: str) -> list[Path]:
    """The shard files and metadata files a shard spec reads (what no output may overwrite)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return [path]
    try:
        shards = [Path(p).expanduser() for p in expand_braces(spec)]
    except DataError:
        return []
    found = [_dataset_file(shards, n) for n in (NAMES_FILE, TEMPLATES_FILE)] if shards else []
    return shards + [p for p in found if p is not None]
