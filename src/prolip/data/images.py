"""Decoding images from disk into RGB PIL images, with errors that name the file at fault."""
from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error)


class BadImageError(ValueError):
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


def load_image(path: Path | str) -> Image.Image:
    """Decode ``path`` to an RGB image: EXIF orientation applied, first frame of animations, alpha on white.

    Anything undecodable (missing, empty, corrupt, truncated, not an image, over PIL's decompression-bomb pixel
    limit) raises ``BadImageError`` naming the file.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Over PIL's pixel limit PIL only warns (up to 2x) before decoding gigapixels; refuse instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.seek(0)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"{e} (raise PIL.Image.MAX_IMAGE_PIXELS if the image is trusted)") from None
    except _DECODE_ERRORS as e:
        if path.is_file() and path.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)") from None
        raise BadImageError(path, str(e) or type(e).__name__) from None
