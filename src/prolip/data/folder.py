"""Image folders (``<root>/<class>/<image>``) and image lists (CSV / JSON), with errors that name the culprit."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from prolip.data.images import IMAGE_EXTENSIONS
from prolip.data.types import ImageItem, LabeledImages

DEFAULT_TEMPLATES = ["a photo of a {}."]
# Numbered classes a list may imply without naming them: a stray huge label must be an error, not a huge list.
MAX_CLASSES = 100_000


class DataError(ValueError):
    """Bad dataset input: the message names the file, folder, row or option at fault."""


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file; other encodings are a DataError naming the file, not a UnicodeDecodeError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def read_json(path: Path, what: str):
    try:
        return json.loads(read_text(path, what))
    except (json.JSONDecodeError, RecursionError) as e:
        reason = e if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise DataError(f"{path}: not valid JSON ({reason})") from None


def class_index(value, where: str) -> int:
    """A class label from a list or split file: a non-negative integer (or its decimal string), nothing else.

    A float such as 1.7 or a boolean is refused rather than truncated: that would silently move an image to
    another class.
    """
    if isinstance(value, str) and value.strip().lstrip("-").isdecimal():
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not an integer class index")
    if not 0 <= value < MAX_CLASSES:
        raise DataError(f"{where}: label {value} is outside 0..{MAX_CLASSES - 1}")
    return value


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_templates(path: Path | str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"templates file {path} does not exist")
    templates = [line.strip() for line in read_text(path, "templates file").splitlines() if line.strip()]
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
    if path.suffix.lower() == ".json":
        obj = read_json(path, "class names file")
        if not isinstance(obj, (list, dict)):
            raise DataError(f"class names file {path}: expected a JSON list of names or a {{folder: name}} object, "
                            f"got a {type(obj).__name__}")
        if isinstance(obj, dict):
            missing = [f for f in folders if f not in obj]
            if missing:
                raise DataError(f"class names file {path} has no entry for class folder(s) {missing[:5]}")
            return [str(obj[f]) for f in folders]
        names = [str(x) for x in obj]
    else:
        names = [line.strip() for line in read_text(path, "class names file").splitlines() if line.strip()]
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


def inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` resolved; a DataError naming ``where`` if it escapes ``root`` or is no usable file name."""
    try:
        path = (root / rel).resolve()
    except (ValueError, OSError) as e:  # a NUL byte, an unencodable character, a name too long
        raise DataError(f"{where}: path {rel!r} is not a usable file name ({e})") from None
    if not path.is_relative_to(root.resolve()):
        raise DataError(f"{where}: path {rel!r} escapes the dataset root {root}")
    return path


def _row(path: Path, i: int, rel, label, classname) -> tuple[str, int | None, str | None]:
    where = f"{path}, row {i}"
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{where}: missing image path")
    if label in (None, "") and classname in (None, ""):
        raise DataError(f"{where}: needs a 'label' or a 'classname'")
    label = class_index(label, where) if label not in (None, "") else None
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
        reader = csv.DictReader(io.StringIO(read_text(path, "image list"), newline=""))
        try:
            cols = set(reader.fieldnames or [])
            if "path" not in cols or not ({"label", "classname"} & cols):
                raise DataError(f"{path}: needs a header with a 'path' column and a 'label' or 'classname' column, "
                                f"found {sorted(cols)}")
            for i, row in enumerate(reader, 1):
                rows.append(_row(path, i, row.get("path"), row.get("label"), row.get("classname")))
        except csv.Error as e:  # a NUL byte, an over-long field
            raise DataError(f"{path}: not a readable CSV file near line {reader.line_num + 1} ({e})") from None
    elif path.suffix.lower() == ".json":
        data = read_json(path, "image list")
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
        p = inside(root, rel, where)
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
