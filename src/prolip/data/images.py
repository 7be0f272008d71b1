"""Decoding images from disk into RGB PIL images, with errors that name the file at fault.

An image may also be a member of a container file (a WebDataset tar shard, a row of a Hugging Face dataset file,
``prolip.data.types.Member``): it is decoded from the container's bytes, never extracted to disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prolip.data.types import Member, member_of, member_reader
from prolip.errors import ProlipError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_names(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that are images': visible, with a suffix (as ``Path.suffix`` reads it) that is an
    image extension. On names, not paths, a folder at once: listing a million files builds no Path and makes no
    call per name."""
    # n[n.rfind("."):] is the suffix whenever it could match: without a dot it is the last character, with a
    # trailing dot just ".", neither an extension; a leading dot (a hidden file) is refused on its own.
    exts = IMAGE_EXTENSIONS
    return [n for n in names if n[n.rfind(".") :].lower() in exts and n[:1] != "."]


def is_image_name(name: str) -> bool:
    return bool(image_names((name,)))


_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error)


class BadImageError(ProlipError, ValueError):
    """An image file that cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: high bit depths rescaled (not clipped), transparency composited on white."""
    if im.mode.startswith("I") or im.mode == "F":
        # convert("L") clips 16-bit values at 255, turning most of a 16-bit image white.
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for messages."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path):
    """``path`` opened for reading if it is a regular file; BadImageError before any read otherwise.

    A FIFO with an image name would block the decoder forever and a device could stream without end, so the
    file type is checked before opening; O_NONBLOCK and a second check on the open descriptor close the window
    in which the file could be swapped for a FIFO between the two.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise BadImageError(path, "file not found") from None
    except (OSError, ValueError) as e:
        raise BadImageError(path, str(e)) from None
    if stat.S_ISREG(mode):
        try:
            f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NONBLOCK", 0)))
        except OSError as e:
            raise BadImageError(path, e.strerror or str(e)) from None
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISREG(mode):
            return f
        f.close()
    raise BadImageError(path, f"{file_kind(mode)}, not a regular file")


def stored_member(path: Path | str) -> Member | None:
    """The container member ``path`` names, or None for an image file (a real file always wins, so a folder
    image whose name happens to look like a member reads as it always did)."""
    member = member_of(path)
    if member is None or os.path.lexists(path):
        return None
    return member


def member_bytes(member: Member) -> bytes:
    """The encoded image a member holds; BadImageError naming the member when it cannot be read."""
    return member_reader(member)(member)


def content_digest(path: Path | str) -> str:
    """Identity of an image: BLAKE2b-128 of its encoded bytes, in hex (``b2sum -l 128 <file>`` prints the same for a
    file), whether it is a file, a tar member or a dataset row. Wherever the bytes are copied, they keep it; a
    changed byte makes a new image.

    An image with no bytes (0-byte file or member) raises its BadImageError here: every such image would otherwise
    share one identity, and decoding would refuse it anyway.
    """
    path = Path(path)
    member = stored_member(path)
    h = hashlib.blake2b(digest_size=16)
    if member is not None:
        data = member_bytes(member)
        if not data:
            raise BadImageError(path, "empty member (0 bytes)")
        h.update(data)
        return h.hexdigest()
    size = 0
    with _open_regular(path) as f:
        try:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        except OSError as e:
            raise BadImageError(path, e.strerror or str(e)) from None
    if size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    return h.hexdigest()


def _source(path: Path, member: Member | None):
    """An open binary file object holding the encoded image (the file itself, or the member's bytes)."""
    if member is None:
        return _open_regular(path)
    data = member_bytes(member)
    if not data:
        raise BadImageError(path, "empty member (0 bytes)")
    return io.BytesIO(data)


def load_image(path: Path | str) -> Image.Image:
    """Decode ``path`` to an RGB image: EXIF orientation applied, first frame of animations, alpha on white.

    Anything undecodable (missing, empty, corrupt, truncated, not an image, over PIL's decompression-bomb pixel
    limit, not a regular file) raises ``BadImageError`` naming the file (or the container member).
    """
    path = Path(path)
    member = stored_member(path)
    try:
        with warnings.catch_warnings():
            # Over PIL's pixel limit PIL only warns (up to 2x) before decoding gigapixels; refuse instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _source(path, member) as f, Image.open(f) as im:
                im.seek(0)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except BadImageError:  # a ValueError too: it must not be wrapped a second time below
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"{e} (raise PIL.Image.MAX_IMAGE_PIXELS if the image is trusted)") from None
    except _DECODE_ERRORS as e:
        if member is None and path.is_file() and path.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)") from None
        if isinstance(e, UnidentifiedImageError):  # its own text shows the file object, not the file
            raise BadImageError(path, "not an image PIL can identify") from None
        raise BadImageError(path, str(e) or type(e).__name__) from None
