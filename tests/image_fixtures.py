"""Generated bad and unusual image files, one function each, and a data root that holds all of them."""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.images import MAX_FILE_BYTES
from tests.conftest import write_image_folder

RED = (255, 0, 0)
BLUE = (0, 0, 255)
# 16-bit samples and what a rescale (not a clamp) to 8 bits makes of them: round(v / 65535 * 255).
GRAY16 = (0, 257, 12345, 32768, 65535)
GRAY16_AS_8BIT = (0, 1, 48, 128, 255)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def truncated_jpeg() -> bytes:
    """A JPEG cut off half way through its pixel data."""
    data = encode(noisy_rgb(64, 64), "JPEG", quality=90)
    return data[: len(data) // 2]


def text_file() -> bytes:
    return b"This is a text file that someone named .jpg\n"


def gif_bytes() -> bytes:
    """A small GIF, solid blue (to be saved under a .png name)."""
    return encode(Image.new("RGB", (6, 4), BLUE), "GIF")


def gray16_png() -> bytes:
    """A 1 x len(GRAY16) 16-bit grayscale PNG whose samples are GRAY16."""
    return encode(Image.fromarray(np.array([GRAY16], dtype=np.uint16)), "PNG")


def cmyk_jpeg() -> bytes:
    """A 16x16 CMYK JPEG that is pure red (no cyan, full magenta and yellow, no black)."""
    return encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)


def palette_png_with_transparency() -> bytes:
    """A 2x1 palette PNG: pixel (0, 0) is opaque red, pixel (1, 0) uses the transparent index (blue)."""
    img = Image.new("P", (2, 1))
    img.putpalette([*RED, *BLUE])
    img.putpixel((1, 0), 1)
    return encode(img, "PNG", transparency=1)


def rgba_png() -> bytes:
    """A 3x1 RGBA PNG: opaque red, fully transparent blue, half-transparent black."""
    pixels = np.array([[(*RED, 255), (*BLUE, 0), (0, 0, 0, 128)]], dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGBA"), "PNG")


def grayscale_png(value: int = 77) -> bytes:
    return encode(Image.new("L", (5, 3), value), "PNG")


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 32x16 JPEG, black with a red 8x8 block in the top-left corner, with an EXIF orientation tag.

    Orientation 6 means "rotate 90 degrees clockwise to display": upright it is 16x32, the block top-right.
    """
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def png_header(width: int, height: int) -> bytes:
    """A PNG made of a signature and an IHDR that claims width x height RGB pixels, and no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def bomb_png() -> bytes:
    """A header that claims more than twice Pillow's pixel limit (Pillow raises its bomb error)."""
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1
    return png_header(side, side)


def one_pixel_png() -> bytes:
    return encode(Image.new("RGB", (1, 1), RED), "PNG")


@dataclass(frozen=True)
class Case:
    """A file written into the bad-input data root, and what prepare must make of it."""

    path: str  # relative to the data root
    status: str  # "ok" or "quarantined"
    reason: str = ""


# Written into class "cats" of `write_bad_input_root`, with the outcome prepare must give each.
CASES = {
    "truncated_jpeg": (Case("cats/truncated.jpg", "quarantined", "corrupt"), truncated_jpeg),
    "zero_byte": (Case("cats/empty.jpg", "quarantined", "empty_file"), lambda: b""),
    "text_named_jpg": (Case("cats/notes.jpg", "quarantined", "not_an_image"), text_file),
    "gif_named_png": (Case("cats/really_a_gif.png", "ok"), gif_bytes),
    "gray16_png": (Case("cats/gray16.png", "ok"), gray16_png),
    "cmyk_jpeg": (Case("cats/cmyk.jpg", "ok"), cmyk_jpeg),
    "palette_transparent_png": (Case("cats/palette.png", "ok"), palette_png_with_transparency),
    "rgba_png": (Case("cats/rgba.png", "ok"), rgba_png),
    "grayscale_png": (Case("cats/gray.png", "ok"), grayscale_png),
    "exif_rotated_jpeg": (Case("cats/rotated.jpg", "ok"), exif_rotated_jpeg),
    "bomb_header_png": (Case("cats/bomb.png", "quarantined", "too_many_pixels"), bomb_png),
    "one_pixel_png": (Case("cats/tiny.png", "ok"), one_pixel_png),
}
# Not an image file at all: a symlink whose target is gone. Reading it fails with OSError, as an
# unreadable file does, even for root (who can read a chmod 000 file).
DANGLING_LINK = Case("dogs/moved_away.jpg", "quarantined", "unreadable")
# Files refused before anything is read, and paths the manifest cannot hold (written by write_bad_input_root).
FIFO = Case("dogs/pipe.jpg", "quarantined", "not_a_file")
HUGE = Case("dogs/huge.png", "quarantined", "too_large")  # sparse: takes no disk space
LINK_OUTSIDE = Case("dogs/elsewhere.png", "quarantined", "outside_root")  # a good PNG outside the root
BAD_NAME = Case("cats/bad\\xffname.png", "quarantined", "bad_name")  # as the manifest shows b"bad\xffname"
# Hidden and system files: skipped (counted), neither used nor quarantined.
HIDDEN = (".DS_Store", "cats/.DS_Store", "cats/._truncated.jpg", "dogs/Thumbs.db")
EMPTY_CLASS = "birds"
GOOD_PER_CLASS = 8


def write_bad_input_root(root: Path) -> dict[str, Case]:
    """A flat data root: cats and dogs with GOOD_PER_CLASS good PNGs each, every case of CASES in cats,
    a dangling symlink in dogs, hidden files, and an empty class folder. Returns the cases by name."""
    write_image_folder(root, {"cats": GOOD_PER_CLASS, "dogs": GOOD_PER_CLASS})
    for case, make in CASES.values():
        (root / case.path).write_bytes(make())
    os.symlink(root / "nowhere" / "gone.jpg", root / DANGLING_LINK.path)
    os.mkfifo(root / FIFO.path)
    with (root / HUGE.path).open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    (root.parent / "outside.png").write_bytes(one_pixel_png())
    os.symlink(root.parent / "outside.png", root / LINK_OUTSIDE.path)
    (root / os.fsdecode(b"cats/bad\xffname.png")).write_bytes(one_pixel_png())
    for name in HIDDEN:
        (root / name).write_bytes(b"\x00\x05\x16\x07 not an image")
    (root / EMPTY_CLASS).mkdir()
    special = {"dangling_symlink": DANGLING_LINK, "fifo": FIFO, "huge": HUGE, "link_outside": LINK_OUTSIDE}
    return {name: case for name, (case, _) in CASES.items()} | special | {"bad_name": BAD_NAME}


def snapshot(root: Path) -> dict[str, tuple[bytes | str, int]]:
    """Every entry under root: (content, or a symlink's target, and mtime in ns), without following links."""
    state: dict[str, tuple[bytes | str, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        mtime = path.lstat().st_mtime_ns
        if path.is_symlink():
            state[rel] = (os.readlink(path), mtime)
        elif path.is_file() and path.stat().st_size > 2**24:  # the sparse giant: its size is enough
            state[rel] = (f"<{path.stat().st_size} bytes>", mtime)
        elif path.is_file():
            state[rel] = (path.read_bytes(), mtime)
        else:
            state[rel] = ("<dir>", mtime)
    return state
