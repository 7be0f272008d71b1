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
    for label, folder in enumerate(folders):
        found = []
        # followlinks=False: a symlink loop inside a class folder cannot recurse forever.
        for dirpath, dirnames, filenames in os.walk(root / folder, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(Path(f)))
        if not found:
            raise DataError(f"class folder {root / folder} has no images (supported: "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))}); remove it or add images")
        items.extend(ImageItem(p, label) for p in found)
    classnames = read_classnames(classnames_file, folders) if classnames_file else folders
    templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
    return LabeledImages(items, classnames, templates, root.name)


def _inside(root: Path, rel: str, where: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise DataError(f"{where}: path {rel!r} escapes the dataset root {root}")
    return path


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
            for row in reader:
                label = row.get("label")
                rows.append((row["path"], int(label) if label not in (None, "") else None, row.get("classname")))
    elif path.suffix.lower() == ".json":
        for i, row in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            if isinstance(row, dict):
                if "path" not in row or not ({"label", "classname"} & set(row)):
                    raise DataError(f"{path}, entry {i}: needs 'path' and 'label' or 'classname'")
                rows.append((row["path"], row.get("label"), row.get("classname")))
            else:
                rows.append((row[0], int(row[1]) if len(row) > 1 else None, row[2] if len(row) > 2 else None))
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
        if not p.is_file():
            raise DataError(f"{where}: image {p} does not exist")
        items.append(ImageItem(p, int(label)))
    if not items:
        raise DataError(f"image list {path} is empty")
    templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
    return LabeledImages(items, list(classnames), templates, path.stem)
