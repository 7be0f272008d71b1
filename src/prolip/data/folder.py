"""Image folders (``<root>/<class>/<image>``) and image lists (CSV / JSON), with errors that name the culprit."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from prolip.data.images import IMAGE_EXTENSIONS
from prolip.data.types import ImageItem, LabeledImages

DEFAULT_TEMPLATES = ["a photo of a {}."]


class DataError(ValueError):
    """Bad dataset input: the message names the file, folder, row or option at fault."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_templates(path: Path | str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"templates file {path} does not exist")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not templates:
        raise DataError(f"templates file {path} is empty")
    for i, t in enumerate(templates, 1):
        if "{}" not in t:
            raise DataError(f"templates file {path}, line {i}: {t!r} has no '{{}}' where the class name goes")
    return templates


def read_classnames(path: Path | str, folders: list[str]) -> list[str]:
    """Class names for ``folders``: a text file (one per line, folder order) or a JSON list / {folder: name} dict."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class names file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        obj = json.loads(text)
        if isinstance(obj, dict):
            missing = [f for f in folders if f not in obj]
            if missing:
                raise DataError(f"class names file {path} has no entry for class folder(s) {missing[:5]}")
            return [str(obj[f]) for f in folders]
        names = [str(x) for x in obj]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(folders):
        raise DataError(f"class names file {path} lists {len(names)} names but the data has {len(folders)} classes")
    return names


def read_image_folder(root: Path | str, classnames_file: Path | str | None = None,
                      templates_file: Path | str | None = None) -> LabeledImages:
    """Read ``root/<class>/<image>``: classes in sorted folder order; hidden and non-image files are ignored."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder of class folders")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    items: list[ImageItem] = []
    ignored: list[Path] = []
    for label, folder in enumerate(folders):
        found = []
        # followlinks=False: a symlink loop inside a class folder cannot recurse forever.
        for dirpath, dirnames, filenames in os.walk(root / folder, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if is_image_file(Path(f)) and (Path(dirpath) / f).exists():  # exists(): no dangling symlinks
                    found.append(Path(dirpath) / f)
                elif not f.startswith("."):
                    ignored.append(Path(dirpath) / f)
        if not found:
            raise DataError(f"class folder {root / folder} has no images (supported: "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))}); remove it or add images")
        items.extend(ImageItem(p, label) for p in found)
    classnames = read_classnames(classnames_file, folders) if classnames_file else folders
    templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
    return LabeledImages(items, classnames, templates, root.name, ignored)


def _inside(root: Path, rel: str, where: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DataError(f"{where}: path {rel!r} escapes the dataset root {root}")
    return path


def _row(path: Path, i: int, rel, label, classname) -> tuple[str, int | None, str | None]:
    where = f"{path}, row {i}"
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{where}: missing image path")
    if label in (None, "") and classname in (None, ""):
        raise DataError(f"{where}: needs a 'label' or a 'classname'")
    if label not in (None, ""):
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {label!r} is not an integer class index") from None
    else:
        label = None
    return rel, label, (str(classname) if classname not in (None, "") else None)


def read_image_list(path: Path | str, root: Path | str | None = None, classnames: list[str] | None = None,
                    templates_file: Path | str | None = None) -> LabeledImages:
    """Read a CSV (columns ``path`` and ``label`` or ``classname``) or JSON list of images.

    JSON: a list of ``{"path", "label"|"classname"}`` objects or CoOp-style ``[path, label, classname]`` rows.
    Relative paths resolve against ``root`` (default: the list's folder) and may not escape it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image list {path} does not exist")
    root = Path(root) if root is not None else path.parent
    rows: list[tuple[str, int | None, str | None]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or [])
            if "path" not in cols or not ({"label", "classname"} & cols):
                raise DataError(f"{path}: needs a header with a 'path' column and a 'label' or 'classname' column, "
                                f"found {sorted(cols)}")
            for i, row in enumerate(reader, 1):
                rows.append(_row(path, i, row.get("path"), row.get("label"), row.get("classname")))
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and {"train", "val", "test"} & set(data):
            raise DataError(f"{path} is a CoOp split file, not an image list: pass the dataset folder holding it "
                            f"(or the benchmark name with --data-root)")
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of images, got a {type(data).__name__}")
        for i, row in enumerate(data, 1):
            if isinstance(row, dict):
                rows.append(_row(path, i, row.get("path"), row.get("label"), row.get("classname")))
            elif isinstance(row, list) and 2 <= len(row) <= 3:
                rows.append(_row(path, i, row[0], row[1], row[2] if len(row) > 2 else None))
            else:
                raise DataError(f"{path}, row {i}: expected {{'path', 'label'|'classname'}} or "
                                f"[path, label, classname], got {str(row)[:80]}")
    else:
        raise DataError(f"{path}: unsupported image list format (use .csv or .json)")
    if classnames is None:
        by_label = {l: c for _, l, c in rows if l is not None and c is not None}
        numeric = [int(l) for _, l, _ in rows if l is not None]
        if by_label or (numeric and not any(c for _, _, c in rows)):
            top = max(list(by_label) + numeric)
            classnames = [by_label.get(i, str(i)) for i in range(top + 1)]
        else:
            classnames = sorted({c for _, _, c in rows if c is not None})
    index = {c: i for i, c in enumerate(classnames)}
    items = []
    for i, (rel, label, classname) in enumerate(rows, 1):
        where = f"{path}, row {i}"
        p = _inside(root, rel, where)
        if label is None:
            if classname not in index:
                raise DataError(f"{where}: unknown class {classname!r}")
            label = index[classname]
        if not 0 <= int(label) < len(classnames):
            raise DataError(f"{where}: label {label} is outside 0..{len(classnames) - 1}")
        if classname is not None and classnames[label] != classname:
            raise DataError(f"{where}: label {label} is class {classnames[label]!r} elsewhere, "
                            f"but this row names it {classname!r}")
        if not p.is_file():
            raise DataError(f"{where}: image {p} does not exist")
        items.append(ImageItem(p, int(label)))
    if not items:
        raise DataError(f"image list {path} is empty")
    templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
    return LabeledImages(items, list(classnames), templates, path.stem)
