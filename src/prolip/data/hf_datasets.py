"""Hugging Face datasets on disk (``--data hf:<path>``), read with pyarrow, memory-mapped; nothing is downloaded.

``<path>`` is a ``save_to_disk`` folder (of a DatasetDict: one sub-folder per split; or of a Dataset), a folder of
parquet / arrow files named by split (``data/train-00000-of-00002.parquet``, the Hub's layout), one ``.parquet``
or ``.arrow`` file, or a Hub name whose copy is already in the local Hugging Face cache. Each row becomes an
``ImageItem`` at ``<data file>::<row>`` (``prolip.data.types.Member``), decoded from the row's image bytes; its
label comes from the ``ClassLabel`` column and the class names from that feature.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prolip.data.folder import DEFAULT_TEMPLATES, DataError, read_classnames, read_json, read_templates
from prolip.data.images import BadImageError, _open_regular
from prolip.data.types import DatasetSplits, ImageItem, LabeledImages, Member, register_container

PREFIX = "hf:"
# How the Hub names splits → the three parts prolip knows (fit trains on train and evaluates on test).
SPLIT_ROLES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
DATA_SUFFIXES = (".parquet", ".arrow")
INSTALL = "reading Hugging Face datasets needs pyarrow: pip install 'prolip[hfdata]' (or pip install datasets)"


def is_hf_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule is what reads parquet files)
    except ImportError:
        raise DataError(INSTALL) from None
    return pyarrow


# ---- where the data files are ----------------------------------------------------------------------------------


def local_root(name: str) -> Path:
    """The dataset's folder or file: the path itself, or a Hub name's copy in the local Hugging Face cache.

    Nothing is ever downloaded: a name without a local copy fails at once, saying how to pass one.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
        except Exception:  # not cached (LocalEntryNotFoundError), or no huggingface_hub: the same answer
            pass
    raise DataError(
        f"cannot get dataset {name}: it is neither a local folder or file nor in the local Hugging Face "
        "cache, and prolip never downloads data (it reads the Hub offline, as it does weights); pass a "
        "local copy instead, e.g. `--data hf:/path/to/dir` saved with datasets' save_to_disk, or a "
        "folder of its parquet files"
    )


def split_files(root: Path) -> dict[str, list[Path]]:
    """The data files of each split, by the split's own name, in row order."""
    if root.is_file():
        if root.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"hf:{root} is not a .parquet or .arrow file")
        return {_split_of(root): [root]}
    if (root / "dataset_dict.json").is_file():
        splits = read_json(root / "dataset_dict.json", "dataset dict file").get("splits")
        if not isinstance(splits, list) or not splits:
            raise DataError(f"{root / 'dataset_dict.json'} lists no splits")
        return {str(s): _saved_files(root / str(s)) for s in splits}
    if (root / "state.json").is_file():
        return {"train": _saved_files(root)}
    found: dict[str, list[Path]] = {}
    for f in sorted(p for p in root.rglob("*") if p.suffix.lower() in DATA_SUFFIXES and p.is_file()):
        found.setdefault(_split_of(f), []).append(f)
    if not found:
        raise DataError(
            f"hf:{root} holds no Hugging Face dataset: no dataset_dict.json or state.json "
            f"(save_to_disk), and no .parquet or .arrow files"
        )
    return found


def _saved_files(folder: Path) -> list[Path]:
    state = read_json(folder / "state.json", "dataset state file")
    files = [folder / d["filename"] for d in state.get("_data_files", []) if isinstance(d, dict) and "filename" in d]
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        raise DataError(
            f"{folder / 'state.json'} names data files that are missing ({missing[:3] or 'none listed'}); "
            "save the dataset again"
        )
    return files


def _split_of(file: Path) -> str:
    """The split a data file belongs to by the Hub's naming: ``[<name>-]train[-00000-of-00002].parquet``, or the
    folder's name for files numbered ``0000.parquet`` (``<config>/train/0000.parquet``)."""
    stem = re.sub(r"-\d+-of-\d+$", "", file.stem)
    if stem.isdecimal():
        return file.parent.name
    return stem.rsplit("-", 1)[-1]


def _roles(found: dict[str, list[Path]], split: str | None, spec: str) -> dict[str, str]:
    """train / val / test → the split name that plays it. ``split`` (``--split``) names the training split."""
    names = ", ".join(found)
    if split is not None and split not in found:
        raise DataError(f"--split {split}: {spec} has no split {split!r} (its splits: {names})")
    roles: dict[str, str] = {}
    for name in found:
        role = SPLIT_ROLES.get(name.lower())
        if role is not None and name != split:
            roles.setdefault(role, name)
    if split is not None:
        roles["train"] = split
    elif "train" not in roles:
        if len(found) > 1:
            raise DataError(f"{spec}: none of its splits ({names}) is named train; pass --split NAME to train on one")
        roles = {"train": next(iter(found))}
    return roles


# ---- what the columns are ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    image: str
    label: str
    names: list[str] | None  # the ClassLabel's names; None for a plain integer column
    chosen: bool = False  # the image column was named (--image-key): each row's path says which column it reads


def _features(schema) -> dict:
    """The dataset's features as datasets stores them in the schema metadata (empty when it is not there)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw).get("info", {}).get("features") if raw else None
    except (ValueError, AttributeError):
        features = None
    return features if isinstance(features, dict) else {}


def _kind(feature) -> str | None:
    return feature.get("_type") if isinstance(feature, dict) else None


def image_column(schema, where: str, image_key: str | None = None) -> str:
    """The Image column (a struct of encoded bytes without the metadata): ``image_key``, or the only one. Two
    image columns (a photo and its mask, say) are a guess even when one is named ``image``: the user picks."""
    features = _features(schema)
    images = [c for c, f in features.items() if _kind(f) == "Image"]
    if not images:
        images = [f.name for f in schema if getattr(f.type, "num_fields", 0) and f.type.get_field_index("bytes") >= 0]
    if image_key is not None:
        if image_key not in images:
            found = f"its image columns: {', '.join(images)}" if images else f"columns: {', '.join(schema.names)}"
            raise DataError(f"{where}: --image-key {image_key}: not an image column ({found})", option="--image-key")
        return image_key
    if not images:
        raise DataError(f"{where}: no image column (columns: {', '.join(schema.names)})")
    if len(images) > 1:
        raise DataError(
            f"{where}: {len(images)} image columns ({', '.join(images)}), so which one holds the images is "
            f"ambiguous; pass " + " or ".join(f"--image-key {c}" for c in images),
            option="--image-key",
        )
    return images[0]


def columns(schema, label_key: str | None, where: str, image_key: str | None = None) -> Columns:
    features = _features(schema)
    labels = [c for c, f in features.items() if _kind(f) == "ClassLabel"]
    if label_key is not None:
        if label_key not in schema.names:
            raise DataError(f"{where}: --label-key {label_key}: no such column (columns: {', '.join(schema.names)})")
        label = label_key
    elif len(labels) == 1:
        label = labels[0]
    elif labels:
        # Even a column named "label" beside another ClassLabel is a guess (coarse vs fine labels): the user picks.
        raise DataError(
            f"{where}: {len(labels)} ClassLabel columns ({', '.join(labels)}), so which one holds the classes is "
            f"ambiguous; pass " + " or ".join(f"--label-key {c}" for c in labels),
            option="--label-key",
        )
    else:
        raise DataError(
            f"{where}: no ClassLabel column (columns: {', '.join(schema.names)}); pass --label-key "
            "with the column of class indices, and --classnames with their names"
        )
    names = features.get(label, {}).get("names") if _kind(features.get(label)) == "ClassLabel" else None
    return Columns(image_column(schema, where, image_key), label, list(names) if names is not None else None)


# ---- reading -----------------------------------------------------------------------------------------------------


def _schema(file: Path):
    pa = _pyarrow()
    if file.suffix.lower() == ".parquet":
        return pa.parquet.ParquetFile(file).schema_arrow
    return _arrow_table(file).schema


def _arrow_table(file: Path):
    """An arrow file memory-mapped (datasets writes the IPC stream format; the file format is read too)."""
    pa = _pyarrow()
    source = pa.memory_map(str(file))
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(file))).read_all()


def _label_values(file: Path, column: str) -> list:
    pa = _pyarrow()
    if file.suffix.lower() == ".parquet":
        return pa.parquet.read_table(file, columns=[column]).column(0).to_pylist()
    return _arrow_table(file).column(column).to_pylist()


def _checked_label(value, where: str, num_classes: int) -> int:
    if value is None:
        raise DataError(f"{where} has no label")
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: label {value!r} is not an integer class index")
    if value == -1:
        raise DataError(
            f"{where} has label -1, datasets' 'no label': this split is unlabelled, so it can be neither "
            "trained nor scored on; use a labelled split (--split)"
        )
    if not 0 <= value < num_classes:
        raise DataError(f"{where}: label {value} is outside 0..{num_classes - 1}")
    return value


def _file_items(file: Path, cols: Columns, num_classes: int) -> list[ImageItem]:
    try:
        values = _label_values(file, cols.label)
    except (OSError, ValueError) as e:  # a damaged file: pyarrow's errors are both
        raise DataError(f"{file} cannot be read ({e})") from None
    # A row's path names the column it is read from only when the user chose one, so the paths (and whatever was
    # recorded with them) of a dataset with one image column stay as they always were.
    column = f"{cols.image}/" if cols.chosen else ""
    return [
        ImageItem(Member(file, f"{column}{row}").path, _checked_label(v, f"{file}, row {row}", num_classes))
        for row, v in enumerate(values)
    ]


def _read_split(
    files: list[Path], label_key: str | None, where: str, image_key: str | None = None
) -> tuple[Columns, list[Path]]:
    """The columns of a split (the same in each of its files)."""
    try:
        found = {
            f: dataclasses.replace(columns(_schema(f), label_key, str(f), image_key), chosen=bool(image_key))
            for f in files
        }
    except DataError:
        raise
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (a damaged file) is a ValueError
        raise DataError(f"{where}: {', '.join(map(str, files))} cannot be read ({e})") from None
    first = found[files[0]]
    other = next((f for f, c in found.items() if c != first), None)
    if other is not None:
        raise DataError(f"{where}: {other} has other columns or class names than {files[0]}")
    return first, files


def _class_names(cols: Columns, classnames_file, where: str) -> tuple[list[str], list[str] | None]:
    """(names shown and prompted, the dataset's own names when --classnames renamed them)."""
    from prolip.data.webdataset import names_list

    if cols.names is None:
        if classnames_file is None:
            raise DataError(
                f"{where}: label column {cols.label!r} is not a ClassLabel, so it names no classes; pass "
                "--classnames FILE (one name per line, in label order)"
            )
        return names_list(Path(classnames_file)), None
    if classnames_file is None:
        return cols.names, None
    names = read_classnames(classnames_file, cols.names)
    return names, (cols.names if names != cols.names else None)


def load_hf(
    spec: str,
    *,
    split: str | None = None,
    label_key: str | None = None,
    image_key: str | None = None,
    classnames_file=None,
    templates_file=None,
) -> DatasetSplits:
    """``--data hf:<path>``: its train / validation / test splits (``split``: the one to train on)."""
    _pyarrow()
    root = local_root(spec[len(PREFIX) :])
    found = split_files(root)
    parts: dict[str, LabeledImages] = {}
    names = ids = None
    for role, name in _roles(found, split, spec).items():
        cols, files = _read_split(found[name], label_key, f"{spec} split {name}", image_key)
        split_names, split_ids = _class_names(cols, classnames_file, f"{spec} split {name}")
        if names is not None and split_names != names:
            raise DataError(f"{spec}: split {name} has other classes than the others ({split_names[:5]}...)")
        names, ids = split_names, split_ids
        items = [it for f in files for it in _file_items(f, cols, len(names))]
        parts[role] = LabeledImages(items, names, [], root.stem if root.is_file() else root.name, class_ids=ids)
    templates = read_templates(templates_file) if templates_file else list(DEFAULT_TEMPLATES)
    for part in parts.values():
        part.templates = templates
    first = parts["train"]
    return DatasetSplits(first.name, first.classnames, templates, **parts)


def hf_read(spec: str) -> list[Path]:
    """What ``--data hf:...`` reads (no output may overwrite it): the local folder or file."""
    path = Path(spec[len(PREFIX) :]).expanduser()
    return [path] if path.exists() else []


# ---- one row's image (what load_image decodes) --------------------------------------------------------------------


class _Rows:
    """The image column of one data file: an arrow file memory-mapped, a parquet file one row group at a time."""

    def __init__(self, file: Path, column: str | None = None):
        self.file = file
        self.parquet = file.suffix.lower() == ".parquet"
        self._lock = threading.Lock()  # a ParquetFile is not safe to read from several threads at once
        if self.parquet:
            self.reader = _pyarrow().parquet.ParquetFile(file)
            schema = self.reader.schema_arrow
            sizes = [self.reader.metadata.row_group(i).num_rows for i in range(self.reader.num_row_groups)]
            self.starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        else:
            self.table = _arrow_table(file)
            schema = self.table.schema
        self.column = image_column(schema, str(file), column)
        self._group: tuple[int, Any] | None = None  # (row group, its pyarrow column: untyped)

    def __len__(self) -> int:
        return self.starts[-1] if self.parquet else self.table.num_rows

    def cell(self, row: int):
        if not self.parquet:
            return self.table.column(self.column)[row].as_py()
        group = bisect.bisect_right(self.starts, row) - 1
        with self._lock:  # the cache reads rows in order, so the last row group read is usually the one wanted
            if self._group is None or self._group[0] != group:
                self._group = (group, self.reader.read_row_group(group, columns=[self.column]).column(0))
            return self._group[1][row - self.starts[group]].as_py()


@functools.lru_cache(maxsize=64)
def _rows(path: str, size: int, mtime_ns: int, column: str | None = None) -> _Rows:
    return _Rows(Path(path), column)


def row_bytes(member: Member) -> bytes:
    """The encoded image of a dataset row; BadImageError naming the row when it cannot be read."""
    try:
        st = os.stat(member.container)
        column, _, name = member.name.rpartition("/")  # "<column>/<row>" where the user chose the column
        rows = _rows(str(member.container.resolve()), st.st_size, st.st_mtime_ns, column or None)
        row = int(name)
        if not 0 <= row < len(rows):
            raise BadImageError(member.path, f"{member.container} has {len(rows)} rows")
        cell = rows.cell(row)
    except (OSError, ValueError, DataError) as e:  # ArrowInvalid is a ValueError
        if isinstance(e, BadImageError):
            raise
        raise BadImageError(member.path, str(e)) from None
    return _cell_bytes(member, cell)


register_container([".parquet", ".arrow"], row_bytes)


def _cell_bytes(member: Member, cell) -> bytes:
    if isinstance(cell, bytes):
        return cell
    data, file = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (None, None)
    if data:
        return data
    if file and Path(file).is_absolute():  # an image kept as a file name only: read the file itself
        with _open_regular(Path(file)) as f:
            return f.read()
    raise BadImageError(member.path, "the row holds no image bytes" + (f", only the file name {file}" if file else ""))
