"""Open one image file safely: an RGB image turned upright (EXIF), or an `ImageRejected` that says why not; and the
EXIF orientation of a JPEG that torchvision's decoder takes (pipeline.data.decoding turns its tensor the same way)."""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# Transparent pixels are composited on this colour so the same file always gives the same pixels.
BACKGROUND = (255, 255, 255)

# What Pillow 13 raises on broken files, found by truncating and corrupting files of each format it writes
# (tests/test_images.py repeats a small seeded sample of that): OSError (truncated data, bad streams;
# UnidentifiedImageError is one), ValueError (bad headers: PPM, QOI, DDS, SGI, ...), SyntaxError (bad
# ICNS/PNG data at load time, unreadable EXIF), NotImplementedError (DDS pixel formats it cannot decode),
# EOFError (missing frames, per Pillow's source) and struct.error (short EXIF blocks). Image.open already turns
# IndexError, TypeError and KeyError from its plugins into "cannot identify". Older Pillows, which
# pyproject allows, leak two more at load time: IndexError (the QOI decoder of Pillow 11 and 12 reads past
# the end of truncated data, python-pillow/Pillow#9812) and ZeroDivisionError (Pillow 11's DDS decoder on a
# zeroed bit mask). Anything else is a bug in this code or in Pillow, and is left to surface. The
# decompression-bomb error is handled on its own.
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    NotImplementedError,
    EOFError,
    struct.error,
    IndexError,
    ZeroDivisionError,
)
# What ImageOps.exif_transpose raises on a malformed EXIF block: the pixels are fine, the orientation unknown.
EXIF_ERRORS = (SyntaxError, struct.error)


# Every reason a file can be quarantined for, so metrics always carry the same keys.
REASONS = (
    "unreadable",
    "empty_file",
    "not_a_file",  # a FIFO, device or socket: rejected by type, never opened
    "too_large",  # more bytes than any image within the pixel limit can take: rejected by size, never read
    "outside_root",  # a path or link that leads out of the data root
    "bad_name",  # a file name that is not valid UTF-8
    "duplicate_across_splits",  # a later copy of a file in an earlier split (on_cross_split_duplicate)
    "not_an_image",
    "too_many_pixels",
    "corrupt",
)
# torchvision's interpolation names (what weights' transforms, timm configs and `Preprocessing` use) -> Pillow's.
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# No image Pillow decodes within its pixel limit (twice MAX_IMAGE_PIXELS is its hard stop) is larger than
# that many pixels of 16-bit RGBA stored raw, plus room for metadata: 1.5 GB. A larger file is not read.
MAX_FILE_BYTES = 2 * Image.MAX_IMAGE_PIXELS * 8 + 64 * 2**20


class ImageRejected(Exception):
    """A file that cannot be used as an image; `reason` is a short code, `detail` the specifics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_bytes(path: Path) -> bytes:
    """Read a regular file of a plausible size, turning I/O failures (permissions, vanished files) into
    `ImageRejected`. Special files are refused by type before they are opened (a FIFO would block forever,
    /dev/zero never end), files larger than `MAX_FILE_BYTES` by size before they are read."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not_a_file", f"a {_file_type(info.st_mode)}, not a regular file; not opened")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageRejected("too_large", f"{info.st_size:,} bytes, more than any image takes; not read")
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageRejected("unreadable", f"{type(err).__name__}: {err.strerror or err}") from err
    if not data:
        raise ImageRejected("empty_file", "the file has 0 bytes")
    return data


def _file_type(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device"}
    kinds |= {stat.S_ISSOCK: "socket", stat.S_ISDIR: "folder"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def confined(root: Path, rel: str) -> Path:
    """`root / rel`, or `ImageRejected("outside_root")` when `rel` is absolute, climbs out with `..`, or is
    (or passes through) a link that resolves outside `root`."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ImageRejected("outside_root", f"{rel} is not a path inside the data root")
    path = Path(root) / rel
    target, base = path.resolve(), Path(root).resolve()
    if not target.is_relative_to(base):
        raise ImageRejected("outside_root", f"a link to {target}, outside the data root {base}")
    return path


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
            return to_rgb(_upright(img))
        except UnidentifiedImageError as err:
            raise ImageRejected("not_an_image", "Pillow does not recognise this file's format") from err
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageRejected("too_many_pixels", str(err)) from err
        except DECODE_ERRORS as err:
            raise ImageRejected("corrupt", f"{type(err).__name__}: {err}") from err


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a file whose EXIF block is unreadable is kept as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the (usually upright) pixels
    except EXIF_ERRORS as err:
        log.warning("unreadable EXIF block (%s: %s); orientation not applied", type(err).__name__, err)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any Pillow mode to RGB deliberately (rescale, composite, convert)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _rescale_to_8bit(img)
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # a transparent palette index or colour key becomes alpha
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


EXIF_ORIENTATION = 0x0112


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation (1-8) of a JPEG that torchvision's decoder takes (8-bit RGB or greyscale); None for any
    other file, which Pillow then decodes (`decode_rgb`) or rejects. Reads the headers only."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return None
                orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        except (*DECODE_ERRORS, Image.DecompressionBombError, Image.DecompressionBombWarning):
            return None
    return orientation if orientation in range(1, 9) else 1
