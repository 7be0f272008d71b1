"""Image folders (``<root>/<class>/<image>``) and image lists (CSV / JSON), with errors that name the culprit."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import string
from pathlib import Path

from prolip.data.images import IMAGE_EXTENSIONS, file_kind, is_image_name
from prolip.data.listing import Found, Listing
from prolip.data.types import ImageItem, LabeledImages
from prolip.errors import ProlipError

DEFAULT_TEMPLATES = ["a photo of a {}."]
# Numbered classes a list may imply without naming them: a stray huge label must be an error, not a huge list.
MAX_CLASSES = 100_000


class DataError(ProlipError, ValueError):
    """Bad dataset input: the message names the file, folder, row or option at fault."""


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (symlinks followed); a DataError naming it otherwise.

    Only regular files are ever opened: reading a FIFO blocks forever, and a device can be endless.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{what} {path} cannot be read ({e})") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{what} {path} is {file_kind(mode)}, not a regular file")
    return path


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped); other encodings are a DataError naming the file."""
    regular_file(path, what)
    try:
        # utf-8-sig: editors on Windows save "UTF-8" with a BOM, which would otherwise glue itself to the first
        # column name or class name.
        return path.read_text(encoding="utf-8-sig")
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
    return is_image_name(path.name)


def check_template(template, where: str) -> str:
    """A prompt template: a string with exactly one ``{}`` (where the class name goes) and no other format field.

    ``template.format(name)`` is how prompts are built, so ``{0}``, ``{name}``, ``{:>9}`` or a stray brace would
    raise there or silently print something else; ``{{`` and ``}}`` are literal braces and are fine.
    """
    if not isinstance(template, str):
        raise DataError(f"{where}: template {template!r} is not a string")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # a single '{' or '}'
        raise DataError(
            f"{where}: template {template!r} is not a valid format string ({e}); write a literal "
            f"brace as '{{{{' or '}}}}'"
        ) from None
    # ``{:}`` parses like ``{}`` (an empty spec): the field must be written ``{}`` itself, braces ``{{ }}`` aside.
    written = re.sub(r"\{\{|\}\}", "", template).count("{}")
    if fields.count(("", "", None)) != 1 or len(fields) != 1 or written != 1:
        others = [
            f"{{{n}{'!' + c if c else ''}{':' + s if s else ''}}}" for n, s, c in fields if (n, s, c) != ("", "", None)
        ]
        others += ["{:}"] * max(0, fields.count(("", "", None)) - written)
        found = f"; found {', '.join(others)}" if others else ""
        raise DataError(
            f"{where}: template {template!r} must contain exactly one '{{}}' where the class name goes "
            f"and no other format field{found}"
        )
    return template


def check_classnames(names, where: str) -> list[str]:
    """Class names: a list of distinct, non-blank strings (two classes with one name cannot be told apart)."""
    if not isinstance(names, list):
        raise DataError(f"{where}: class names must be a list of strings, got a {type(names).__name__}")
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise DataError(f"{where}: class name {i} is {name!r}, not a string")
        if not name.strip():
            raise DataError(f"{where}: class name {i} is blank")
        if name in first:
            raise DataError(
                f"{where}: class name {name!r} is given twice (classes {first[name]} and {i}); "
                f"every class needs its own name"
            )
        first[name] = i
    return names


def read_templates(path: Path | str) -> list[str]:
    path = Path(path)
    templates = [line.strip() for line in read_text(path, "templates file").splitlines() if line.strip()]
    if not templates:
        raise DataError(f"templates file {path} is empty")
    for i, t in enumerate(templates, 1):
        check_template(t, f"templates file {path}, line {i}")
    return templates


def read_classnames(path: Path | str, classes: list[str]) -> list[str]:
    """Display names for ``classes`` (folder names, or a list's classes in label order).

    A text file (one name per line, in class order), a JSON list of names, or a JSON {class: name} object.
    """
    path = Path(path)
    where = f"class names file {path}"
    if path.suffix.lower() == ".json":
        obj = read_json(path, "class names file")
        if not isinstance(obj, (list, dict)):
            raise DataError(
                f"{where}: expected a JSON list of names or a {{class: name}} object, got a {type(obj).__name__}"
            )
        if isinstance(obj, dict):
            missing = [c for c in classes if c not in obj]
            if missing:
                raise DataError(f"{where} has no entry for class(es) {missing[:5]}")
            names = [obj[c] for c in classes]
        else:
            names = obj
    else:
        names = [line.strip() for line in read_text(path, "class names file").splitlines() if line.strip()]
    if len(names) != len(classes):
        raise DataError(f"{where} lists {len(names)} names but the data has {len(classes)} classes")
    return check_classnames(names, where)


def _class_folders(root: Path) -> tuple[list[str], list[Path]]:
    """The visible sub-folders of ``root`` that are classes, in sorted order, and the ones that are not.

    A symlink back to ``root`` or one of its ancestors is not a class: it would hold every other class's images
    under one more label. It is left out and reported. Two class folders that are one folder (through a
    symlink), or one inside the other, are refused: their images would belong to two classes.
    """
    real_root = root.resolve()
    folders: list[str] = []
    ignored: list[Path] = []
    owners: dict[Path, str] = {}  # a class folder's real path → its name
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or not p.is_dir():
            continue
        real = p.resolve()
        if real_root.is_relative_to(real):
            ignored.append(p)
            continue
        if real in owners:
            raise DataError(
                f"class folders {root / owners[real]} and {p} are the same folder (a symlink): its "
                f"images would belong to two classes; remove one of them"
            )
        owners[real] = p.name
        folders.append(p.name)
    for real, name in owners.items():
        outer = next((owners[a] for a in real.parents if a in owners), None)
        if outer is not None:
            raise DataError(
                f"class folder {root / name} is inside class folder {root / outer} (a symlink): its "
                f"images would belong to two classes; remove one of them"
            )
    return folders, ignored


def read_image_folder(
    root: Path | str,
    classnames_file: Path | str | None = None,
    templates_file: Path | str | None = None,
    *,
    cache_dir: Path | str | None = None,
) -> LabeledImages:
    """Read ``root/<class>/<image>``: classes in sorted folder order; hidden and non-image files are ignored.

    Each class folder's images are found recursively, a folder's files (by name) before its sub-folders (by name),
    hidden and symlinked sub-folders not entered; only regular files are images (a FIFO, socket or device with an
    image extension would block or never end when decoded: it is reported with the other files left out). The
    listing is remembered under ``cache_dir`` (:mod:`prolip.data.listing`), so a second run lists only what changed.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder of class folders")
    folders, ignored = _class_folders(root)
    if not folders:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    listing, found = Listing(root, cache_dir), Found()
    for label, folder in enumerate(folders):
        if not listing.collect(folder, label, found, enter_hidden=False, files_first=True):
            raise DataError(
                f"class folder {root / folder} has no images (supported: "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); remove it or add images"
            )
    listing.save()
    items, ignored = found.items(), ignored + found.ignored
    classnames = read_classnames(classnames_file, folders) if classnames_file else folders
    templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
    return LabeledImages(
        items, classnames, templates, root.name, ignored, class_ids=folders if classnames != folders else None
    )


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
    if classname not in (None, "") and not isinstance(classname, str):
        raise DataError(f"{where}: class name {classname!r} is not a string")
    label = class_index(label, where) if label not in (None, "") else None
    return rel, label, (classname if classname not in (None, "") else None)


Row = tuple[str, "int | None", "str | None"]  # (relative path, label, class name) as the list gives them


def _csv_rows(path: Path) -> list[Row]:
    reader = csv.DictReader(io.StringIO(read_text(path, "image list"), newline=""))
    try:
        cols = set(reader.fieldnames or [])
        if "path" not in cols or not ({"label", "classname"} & cols):
            raise DataError(
                f"{path}: needs a header with a 'path' column and a 'label' or 'classname' column, found {sorted(cols)}"
            )
        return [
            _row(path, i, row.get("path"), row.get("label"), row.get("classname")) for i, row in enumerate(reader, 1)
        ]
    except csv.Error as e:  # a NUL byte, an over-long field
        raise DataError(f"{path}: not a readable CSV file near line {reader.line_num + 1} ({e})") from None


def _json_rows(path: Path) -> list[Row]:
    data = read_json(path, "image list")
    if isinstance(data, dict) and {"train", "val", "test"} & set(data):
        raise DataError(
            f"{path} is a CoOp split file, not an image list: pass the dataset folder holding it "
            f"(or the benchmark name with --data-root)"
        )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of images, got a {type(data).__name__}")
    rows = []
    for i, row in enumerate(data, 1):
        if isinstance(row, dict):
            rows.append(_row(path, i, row.get("path"), row.get("label"), row.get("classname")))
        elif isinstance(row, list) and 2 <= len(row) <= 3:
            rows.append(_row(path, i, row[0], row[1], row[2] if len(row) > 2 else None))
        else:
            raise DataError(
                f"{path}, row {i}: expected {{'path', 'label'|'classname'}} or "
                f"[path, label, classname], got {str(row)[:80]}"
            )
    return rows


def _list_classnames(path: Path, rows: list[Row]) -> list[str]:
    """The classes a list implies: labels 0..max (named where a row names them), else the sorted class names."""
    by_label = {label: c for _, label, c in rows if label is not None and c is not None}
    numeric = [int(label) for _, label, _ in rows if label is not None]
    if by_label or (numeric and not any(c for _, _, c in rows)):
        top = max(list(by_label) + numeric)
        return check_classnames([by_label.get(i, str(i)) for i in range(top + 1)], f"image list {path}")
    return sorted({c for _, _, c in rows if c is not None})


def _image_file(path: Path, where: str) -> tuple[int, int]:
    """The (device, inode) of a listed image, which must be a regular file: the identity of the image itself."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        raise DataError(f"{where}: image {path} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{where}: image {path} is {file_kind(info.st_mode)}, not a regular file")
    return info.st_dev, info.st_ino


def _list_items(path: Path, root: Path, rows: list[Row], classnames: list[str]) -> list[ImageItem]:
    index = {c: i for i, c in enumerate(classnames)}
    items: list[ImageItem] = []
    first_seen: dict[tuple[int, int], tuple[int, int, Path]] = {}  # (device, inode) → (row, label, path)
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
            raise DataError(
                f"{where}: label {label} is class {classnames[label]!r} elsewhere, but this row names it {classname!r}"
            )
        # One image under two labels would be trained toward both: refused, naming both rows.
        row0, label0, p0 = first_seen.setdefault(_image_file(p, where), (i, int(label), p))
        if label0 != label:
            same = p0 if p0 == p else f"{p0} (row {i}: {p}, the same file)"
            raise DataError(
                f"{path}: rows {row0} and {i} put the same image {same} in two classes "
                f"({classnames[label0]!r} and {classnames[label]!r}); an image belongs to one class"
            )
        items.append(ImageItem(p, int(label)))
    return items


def read_image_list(
    path: Path | str,
    root: Path | str | None = None,
    classnames: list[str] | None = None,
    templates_file: Path | str | None = None,
    classnames_file: Path | str | None = None,
) -> LabeledImages:
    """Read a CSV (columns ``path`` and ``label`` or ``classname``) or JSON list of images.

    JSON: a list of ``{"path", "label"|"classname"}`` objects or CoOp-style ``[path, label, classname]`` rows.
    Relative paths resolve against ``root`` (default: the list's folder) and may not escape it. ``classnames``
    fixes the class order rows are matched against; ``classnames_file`` maps the list's classes (in label
    order, or a JSON {class: name} object) to the names shown and put into prompts.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        regular_file(path, "image list")
        raise DataError(f"{path}: unsupported image list format (use .csv or .json)")
    rows = _csv_rows(path) if suffix == ".csv" else _json_rows(path)
    classnames = (
        check_classnames(list(classnames), f"image list {path}")
        if classnames is not None
        else _list_classnames(path, rows)
    )
    items = _list_items(path, root, rows, classnames)
    if not items:
        raise DataError(f"image list {path} is empty")
    class_ids = list(classnames)
    if classnames_file:
        classnames = read_classnames(classnames_file, classnames)
    templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
    return LabeledImages(
        items, list(classnames), templates, path.stem, class_ids=class_ids if list(classnames) != class_ids else None
    )
