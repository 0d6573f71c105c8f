"""pipeline.data.images: each unusual file becomes the right RGB pixels, each broken one the right reason."""

from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import BACKGROUND, MAX_FILE_BYTES, ImageRejected, confined, decode_rgb, read_bytes
from tests import image_fixtures as fx

# Pillow's own default (a quarter gigabyte of 3-byte pixels); the pipeline must not raise or remove it.
PILLOW_DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def pixels(data: bytes) -> np.ndarray:
    img = decode_rgb(data)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def rejection(data: bytes) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_rgb(data)
    return info.value


# --- usable files: kept, with deliberate pixel values ------------------------------------------------


def test_16bit_png_is_rescaled_not_clamped():
    assert Image.open(io.BytesIO(fx.gray16_png())).mode == "I;16"  # the fixture really is 16-bit
    out = pixels(fx.gray16_png())
    assert out.shape == (1, len(fx.GRAY16), 3)
    assert out[0, :, 0].tolist() == list(fx.GRAY16_AS_8BIT)  # 65535 -> 255, 32768 -> 128, 257 -> 1
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_palette_png_transparent_index_becomes_the_background():
    out = pixels(fx.palette_png_with_transparency())
    assert out[0, 0].tolist() == list(fx.RED)
    assert out[0, 1].tolist() == list(BACKGROUND)  # the transparent index is blue in the palette


def test_rgba_png_is_composited_on_the_background():
    out = pixels(fx.rgba_png())
    assert out[0, 0].tolist() == list(fx.RED)
    assert out[0, 1].tolist() == list(BACKGROUND)  # fully transparent blue
    half = np.array(BACKGROUND) * (1 - 128 / 255)  # half-transparent black over the background
    assert np.abs(out[0, 2] - half).max() <= 1


def test_cmyk_jpeg_is_converted_to_rgb():
    assert Image.open(io.BytesIO(fx.cmyk_jpeg())).mode == "CMYK"
    out = pixels(fx.cmyk_jpeg())
    assert np.abs(out - np.array(fx.RED)).max() <= 3  # JPEG is lossy


def test_grayscale_is_expanded_to_three_equal_channels():
    out = pixels(fx.grayscale_png(77))
    assert out.shape == (3, 5, 3)
    assert (out == 77).all()


def test_gif_content_is_decoded_whatever_the_file_is_called():
    out = pixels(fx.gif_bytes())
    assert out.shape == (4, 6, 3)
    assert (out == np.array(fx.BLUE)).all()


def test_one_pixel_image_is_usable():
    assert pixels(fx.one_pixel_png()).tolist() == [[list(fx.RED)]]


@pytest.mark.parametrize(
    ("orientation", "size", "red_corner"),
    [
        (1, (32, 16), "top_left"),  # upright already
        (3, (32, 16), "bottom_right"),  # rotated 180
        (6, (16, 32), "top_right"),  # rotate 90 clockwise to display
        (8, (16, 32), "bottom_left"),  # rotate 90 counter-clockwise to display
    ],
)
def test_exif_orientation_is_applied(orientation, size, red_corner):
    img = decode_rgb(fx.exif_rotated_jpeg(orientation))
    assert img.size == size
    out = np.asarray(img).astype(int)
    corners = {
        "top_left": out[:8, :8],
        "top_right": out[:8, -8:],
        "bottom_left": out[-8:, :8],
        "bottom_right": out[-8:, -8:],
    }
    for name, block in corners.items():
        mean = block.reshape(-1, 3).mean(axis=0)
        if name == red_corner:
            assert mean[0] > 200 and mean[1] < 60 and mean[2] < 60, (name, mean)
        else:
            assert mean.max() < 60, (name, mean)


@pytest.mark.parametrize(
    "exif",
    [
        pytest.param(b"Exif\x00\x00not a TIFF header", id="bad-header-SyntaxError"),
        pytest.param(b"Exif\x00\x00MM\x00*", id="no-IFD-offset-struct.error"),
    ],
)
def test_unreadable_exif_block_keeps_the_image_as_stored(caplog, exif: bytes):
    """A broken EXIF block is metadata, not pixels: the image is kept, unrotated, with a warning."""
    data = fx.encode(Image.new("RGB", (4, 2), fx.RED), "PNG", exif=exif)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.images"):
        img = decode_rgb(data)
    assert img.size == (4, 2)
    assert "unreadable EXIF" in caplog.text


# --- unusable files: rejected with a reason ---------------------------------------------------------


def test_truncated_jpeg_is_corrupt():
    err = rejection(fx.truncated_jpeg())
    assert err.reason == "corrupt"
    assert err.detail.startswith("OSError:") and "truncated" in err.detail.lower()


def test_text_file_named_jpg_is_not_an_image():
    assert rejection(fx.text_file()).reason == "not_an_image"


def test_header_beyond_twice_the_pixel_limit_is_a_bomb():
    err = rejection(fx.bomb_png())
    assert err.reason == "too_many_pixels"
    assert "decompression bomb" in err.detail


def test_header_between_the_limit_and_twice_it_is_a_bomb_too():
    """Pillow only warns between 1x and 2x its limit; decode_rgb treats that warning as an error."""
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 1  # just over 1x, well under 2x
    assert Image.MAX_IMAGE_PIXELS < side * side < 2 * Image.MAX_IMAGE_PIXELS
    err = rejection(fx.png_header(side, side))
    assert err.reason == "too_many_pixels"
    assert str(side * side) in err.detail


def test_pillow_pixel_limit_is_kept():
    decode_rgb(fx.one_pixel_png())
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX_PIXELS


def test_zero_byte_file_is_empty(tmp_path: Path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageRejected) as info:
        read_bytes(path)
    assert info.value.reason == "empty_file"


@pytest.mark.parametrize("kind", ["dangling symlink", "missing file"])
def test_read_failures_are_unreadable(tmp_path: Path, kind: str):
    """Read failures that happen to root as well (root can read a chmod 000 file)."""
    path = tmp_path / "x.jpg"
    if kind == "dangling symlink":
        path.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageRejected) as info:
        read_bytes(path)
    assert info.value.reason == "unreadable"
    assert info.value.detail.split(":")[0] == "FileNotFoundError"


@pytest.mark.parametrize("kind", ["FIFO", "character device", "folder"])
def test_special_files_are_refused_by_type_before_they_are_opened(tmp_path: Path, kind: str):
    """A FIFO would block the read forever and /dev/zero never end: neither is opened."""
    path = {"FIFO": tmp_path / "pipe.jpg", "character device": Path("/dev/zero"), "folder": tmp_path / "d.jpg"}[kind]
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(ImageRejected) as info:
        read_bytes(path)
    assert (info.value.reason, info.value.detail) == ("not_a_file", f"a {kind}, not a regular file; not opened")


def test_a_file_larger_than_any_image_is_refused_before_it_is_read(tmp_path: Path):
    path = tmp_path / "junk.png"
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk space, and read whole it would take 1.5 GB
    with pytest.raises(ImageRejected) as info:
        read_bytes(path)
    assert info.value.reason == "too_large" and "more than any image takes; not read" in info.value.detail


@pytest.mark.parametrize("rel", ["/etc/hostname", "../outside.png", "cats/../../outside.png"])
def test_paths_that_leave_the_data_root_are_refused(tmp_path: Path, rel: str):
    with pytest.raises(ImageRejected, match="outside_root"):
        confined(tmp_path / "root", rel)


def test_a_link_that_resolves_outside_the_data_root_is_refused_and_one_inside_kept(tmp_path: Path):
    root = tmp_path / "root"
    (root / "cats").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "cats" / "real.png").write_bytes(b"x")
    (root / "cats" / "out.png").symlink_to(tmp_path / "secret.png")
    (root / "cats" / "in.png").symlink_to(root / "cats" / "real.png")
    with pytest.raises(ImageRejected, match=f"a link to {tmp_path / 'secret.png'}, outside the data root"):
        confined(root, "cats/out.png")
    assert confined(root, "cats/in.png") == root / "cats" / "in.png"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file; the read failure is tested above")
def test_file_without_read_permission_is_unreadable(tmp_path: Path):
    path = tmp_path / "locked.png"
    path.write_bytes(fx.one_pixel_png())
    path.chmod(0)
    with pytest.raises(ImageRejected) as info:
        read_bytes(path)
    assert info.value.reason == "unreadable"
    assert info.value.detail.startswith("PermissionError")


# --- whatever Pillow raises on a damaged file becomes ImageRejected ---------------------------------

# One small file per format Pillow writes, including those whose damage raises ValueError (PPM, QOI),
# NotImplementedError (DDS) and SyntaxError or struct.error (EXIF blocks).
_FORMATS = {
    "jpeg+exif": lambda: fx.exif_rotated_jpeg(6),
    "png+exif": lambda: fx.encode(fx.noisy_rgb(12, 10), "PNG", exif=Image.Exif().tobytes()),
    "png16": fx.gray16_png,
    "palette": fx.palette_png_with_transparency,
    "gif": fx.gif_bytes,
    "webp": lambda: fx.encode(fx.noisy_rgb(12, 10), "WEBP"),
    "tiff": lambda: fx.encode(fx.noisy_rgb(12, 10), "TIFF", compression="tiff_lzw"),
    "bmp": lambda: fx.encode(fx.noisy_rgb(12, 10), "BMP"),
    "ppm": lambda: fx.encode(fx.noisy_rgb(12, 10), "PPM"),
    "qoi": lambda: fx.encode(fx.noisy_rgb(12, 10), "QOI"),
    "dds": lambda: fx.encode(fx.noisy_rgb(12, 10), "DDS"),
}


def _damaged(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    how = rng.randrange(3)
    if how == 0:
        return bytes(out[: rng.randrange(1, len(out))])  # truncated
    if how == 1:
        for _ in range(rng.randint(1, 6)):
            out[rng.randrange(len(out))] = rng.randrange(256)  # bytes overwritten
        return bytes(out)
    start = rng.randrange(min(len(out), 64))
    del out[start : start + rng.randint(1, 16)]  # header bytes dropped
    return bytes(out)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about each corrupt TIFF/EXIF tag
@pytest.mark.parametrize("fmt", sorted(_FORMATS))
def test_damaged_files_are_rejected_never_raised(fmt: str):
    """A seeded sample of damaged files: each decodes to RGB or is an ImageRejected, never another error."""
    rng = random.Random(fmt)
    data = _FORMATS[fmt]()
    reasons = set()
    for _ in range(40):
        try:
            assert decode_rgb(_damaged(data, rng)).mode == "RGB"
        except ImageRejected as err:
            reasons.add(err.reason)
    assert reasons <= {"corrupt", "not_an_image", "too_many_pixels"}
