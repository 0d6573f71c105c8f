"""JPEGs decoded by torchvision (nvJPEG on CUDA, libjpeg-turbo on CPU), resized and cropped where they land.

The other decoder is Pillow (`pipeline.data.images`), which takes every format. This one takes the files most
datasets are made of, 8-bit RGB or greyscale JPEGs, and on a GPU decodes a whole batch in one call: the CPU
only reads and hashes. Anything it does not take, or fails on, goes to Pillow file by file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.core.errors import PipelineError
from pipeline.data.preprocessing import Preprocessing

Decode = Literal["auto", "cpu", "device"]
PILLOW = "pillow"  # the decoder of every format (pipeline.data.images); the others take JPEGs only
# Interpolations torchvision resizes tensors with; a backbone whose weights want another keeps Pillow.
TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# torchvision 0.29 deprecates its decoders for TorchCodec's; they remain the ones torch <= 2.14 ships, and
# the warning would repeat on every call. Silenced by its message only.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)


def resolve_decoder(requested: Decode, device: torch.device, preprocessing: Preprocessing) -> str:
    """The decoder's name, recorded in the store's fingerprint: `pillow`, `libjpeg-turbo` or `nvjpeg`.

    `auto` decodes on the device when it is a CUDA GPU and with Pillow elsewhere. `device` on a machine without
    CUDA decodes with torchvision on the CPU (in the loader's workers): the path the tests run.
    """
    if requested == "cpu" or (requested == "auto" and device.type != "cuda"):
        return PILLOW
    if preprocessing.interpolation not in TENSOR_INTERPOLATIONS:
        if requested == "auto":
            return PILLOW
        raise PipelineError(
            f"extract.decode is device but the backbone resizes with {preprocessing.interpolation!r}, which only "
            f"Pillow implements; use decode: cpu or auto"
        )
    return "nvjpeg" if device.type == "cuda" else "libjpeg-turbo"


def jpeg_decoder(decoder: str, device: torch.device, preprocessing: Preprocessing) -> JpegDecoder | None:
    """The decoder a name (`resolve_decoder`'s, recorded with a store) stands for: None for Pillow, else torchvision's
    on `device` (batched there on a GPU, file by file in the loader on the CPU)."""
    return None if decoder == PILLOW else JpegDecoder.on(device, preprocessing)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a [C, H, W] image upright as Pillow's `ImageOps.exif_transpose` does."""
    if orientation in (5, 6, 7, 8):  # the stored rows are the picture's columns
        image = image.transpose(-1, -2)
    if orientation in (2, 3, 6, 7):
        image = image.flip(-1)
    if orientation in (3, 4, 7, 8):
        image = image.flip(-2)
    return image


@dataclass(frozen=True)
class JpegDecoder:
    """Decode JPEG bytes on `device`, then resize and crop as `preprocessing` says: uint8 [3, crop, crop]."""

    device: torch.device
    preprocessing: Preprocessing
    # On a GPU a whole batch of files is decoded in one call, in the main process (`Images.finish`); on CPU
    # each loader worker decodes its own files.
    batched: bool

    @classmethod
    def on(cls, device: torch.device, preprocessing: Preprocessing) -> JpegDecoder:
        return cls(device, preprocessing, batched=device.type == "cuda")

    def decode(self, encoded: list[bytes], orientations: list[int]) -> list[torch.Tensor | None]:
        """The images in order; None for a file the decoder refused (the caller gives it to Pillow)."""
        data = [torch.frombuffer(bytearray(e), dtype=torch.uint8) for e in encoded]
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one refused file fails the call: find it, keep the others
            if len(encoded) == 1:
                return [None]
            return [image for data, o in zip(encoded, orientations, strict=True) for image in self.decode([data], [o])]
        return [self.preprocessing.resize_crop_tensor(orient(x, o)) for x, o in zip(images, orientations, strict=True)]
