"""Open one image file safely: an RGB image, or an `ImageRejected` that says why not."""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Transparent pixels are composited on this colour so the same file always gives the same pixels.
BACKGROUND = (255, 255, 255)

# What Pillow actually raises on broken files: OSError (truncated data, unknown format), SyntaxError
# (malformed PNG/GIF chunks), ValueError and struct.error (bad headers), EOFError, zlib.error (corrupt
# deflate streams), IndexError/TypeError from some plugins, and its own decompression-bomb error.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class ImageRejected(Exception):
    """A file that cannot be used as an image; `reason` is a short code, `detail` the specifics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_bytes(path: Path) -> bytes:
    """Read a file, turning I/O failures (permissions, vanished files) into `ImageRejected`."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageRejected("unreadable", f"{type(err).__name__}: {err.strerror or err}") from err
    if not data:
        raise ImageRejected("empty_file", "the file has 0 bytes")
    return data


def decode_rgb(data: bytes, draft_short_side: int | None = None) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB image.

    `draft_short_side` lets the JPEG decoder scale down by a power of two while keeping the shorter
    side at or above that many pixels: much faster for large photos, and the resize that follows
    needs no more pixels than that.
    """
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; a bomb is a bomb either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            if draft_short_side and img.format == "JPEG" and img.mode in ("RGB", "L"):
                w, h = img.size
                scale = draft_short_side / min(w, h)
                if scale < 1:
                    img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
        except UnidentifiedImageError as err:
            raise ImageRejected("not_an_image", "Pillow does not recognise this file's format") from err
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageRejected("too_many_pixels", str(err)) from err
        except DECODE_ERRORS as err:
            raise ImageRejected("corrupt", f"{type(err).__name__}: {err}") from err


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any Pillow mode to RGB deliberately (rescale, composite, convert)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _rescale_to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(canvas, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _rescale_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer images span 0..65535: scale to 0..255 rather than clamp."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = (0.0, 1.0) if arr.min() >= 0 and arr.max() <= 1 else (arr.min(), arr.max())
    else:
        lo, hi = 0.0, 65535.0
    span = hi - lo or 1.0
    scaled = np.clip((arr - lo) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8 -> mode "L"
