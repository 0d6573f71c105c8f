"""How an image becomes a network's input: the input size (image_size auto), resize and centre crop, and
normalisation, as the weights' own eval transform says."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.core.errors import PipelineError
from pipeline.data.images import PIL_FILTERS

if TYPE_CHECKING:
    import torch


class PreprocessingError(PipelineError):
    """A transform this pipeline cannot apply (an interpolation Pillow does not have)."""


# Part of every fingerprint: bump it when decoding or preprocessing code changes the pixels it produces,
# so embedding caches computed by the old code are not reused.
PIXELS_VERSION = 3  # 3: resize and centre crop resample only the pixels the crop keeps


# image_size: auto. Images whose median shorter side is at most TINY_IMAGE_SIDE px (icons, 8x8 digits, 28 px MNIST,
# 32 px CIFAR) are read at SMALL_INPUT_SIZE px instead of the backbone's own size: a third of 224 px's pixels, so
# about a third of the forward pass, and still a 4x4 map after an ImageNet CNN's 32x downsampling.
TINY_IMAGE_SIDE = 32
SMALL_INPUT_SIZE = 128


def tiny_images(median_side: float) -> bool:
    """Images too small to be photos (icons, digits, 32 px thumbnails): whose median shorter side is at most
    TINY_IMAGE_SIDE px (0: a manifest without sizes, taken as photos)."""
    return 0 < median_side <= TINY_IMAGE_SIDE


def input_size(setting: int | str | None, own: int, median_side: float) -> tuple[int, str]:
    """The square input size for `setting` (an extract.backbones entry's image_size) and why, in words: pixels as
    given; None: the weights' own size `own`; auto: `own`, or SMALL_INPUT_SIZE for tiny images."""
    if isinstance(setting, int):
        return setting, "image_size in params.yaml"
    if setting is None:
        return own, "image_size null: the size the weights were trained at"
    if tiny_images(median_side) and own > SMALL_INPUT_SIZE:
        why = f"image_size auto: the images are tiny (median shorter side {median_side:g} px <= {TINY_IMAGE_SIDE})"
        return SMALL_INPUT_SIZE, f"{why}, so {SMALL_INPUT_SIZE} px rather than the weights' {own}"
    return own, f"image_size auto: the size the weights were trained at (median shorter side {median_side:g} px)"


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise: the eval transform of the weights.

    The one home of these pixels: the Pillow path (`resize_crop`, `to_uint8`) that extraction, fine-tuning, predict
    and the torch-free ONNX predictor share, the tensor path of the JPEG decoder (`resize_crop_tensor`), and the
    normalisation (`normalize`, also inside every exported ONNX graph). torch is imported by the methods that return
    tensors only, so the ONNX predictor runs without it.
    """

    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.interpolation not in PIL_FILTERS:
            expected = ", ".join(PIL_FILTERS)
            raise PreprocessingError(f"unsupported interpolation {self.interpolation!r}; expected one of {expected}")

    def with_image_size(self, size: int | None) -> Preprocessing:
        """The same transform at another crop size, keeping the resize/crop ratio."""
        if size is None or size == self.crop:
            return self
        return replace(self, crop=size, resize=round(size * self.resize / self.crop))

    def draft(self, jpeg_draft: bool) -> int | None:
        """The shorter side a JPEG may be decoded down to (`pipeline.data.images.decode_rgb`'s draft) when
        `jpeg_draft` is on: never below the resize target, so the resize that follows loses nothing."""
        return self.resize if jpeg_draft else None

    def _resized(self, img: Image.Image) -> Image.Image:
        """torchvision's resize (shorter side to `resize`, the longer truncated) then centre crop, with Pillow.

        Pillow resamples only the columns, then the rows, that the crop keeps, placing every output pixel and its
        filter window as the full resize would, in the same order (horizontal pass first). Filters with hard edges
        (nearest, box), whose taps a rounding error can flip, take the full resize, then the crop; a crop larger
        than the resized image is padded with 0 as torchvision pads (tests compare both with torchvision's).
        """
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_w, new_h = (self.resize, int(self.resize * long / short))[:: 1 if w <= h else -1]
        c = self.crop
        resample = PIL_FILTERS[self.interpolation]
        if resample in (Image.Resampling.NEAREST, Image.Resampling.BOX) or c > self.resize:
            img = img.resize((new_w, new_h), resample) if (new_w, new_h) != (w, h) else img
            left, top = _crop_offset(new_w, c), _crop_offset(new_h, c)
            return img.crop((left, top, left + c, top + c))
        left, top = round((new_w - c) / 2), round((new_h - c) / 2)
        sx, sy = w / new_w, h / new_h
        img = img.resize((c, h), resample, box=(left * sx, 0, (left + c) * sx, h))
        return img.resize((c, c), resample, box=(0, top * sy, c, (top + c) * sy))

    def resize_crop(self, img: Image.Image) -> np.ndarray:
        """Resize and crop: uint8 [3, crop, crop] (numpy, contiguous)."""
        return np.ascontiguousarray(np.asarray(self._resized(img), dtype=np.uint8).transpose(2, 0, 1))

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """Resize and crop: a uint8 [3, crop, crop] tensor, a quarter of float32's bytes between processes."""
        import torch

        return torch.from_numpy(np.asarray(self._resized(img), dtype=np.uint8).copy()).permute(2, 0, 1)

    def resize_crop_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """The same resize and crop of a decoded uint8 [3, H, W] tensor, on its device, by torchvision (the
        JPEG decoder's path: nvJPEG leaves the image on the GPU; antialiased as Pillow resamples)."""
        import torchvision.transforms.v2.functional as TF

        mode = TF.InterpolationMode(self.interpolation)
        return TF.center_crop(TF.resize(image, [self.resize], interpolation=mode, antialias=True), [self.crop])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised float32, in one fused pass, on whatever device `batch` is on."""
        import torch

        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return normalized(batch, mean, std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """One image as the network expects it: float32 [3, crop, crop]."""
        return self.normalize(self.to_uint8(img)[None])[0]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_dict(self) -> dict:
        """As JSON has it (lists, sorted keys): what config files and ONNX metadata record."""
        return json.loads(self.to_json())

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(d["resize"], d["crop"], d["interpolation"], tuple(d["mean"]), tuple(d["std"]))


def normalized(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images -> (x / 255 - mean) / std in float32: the arithmetic of `Preprocessing.normalize` and of the
    exported graphs (pipeline.serving.export), in the same operations and order, so both see the same floats."""
    return (batch.float() / 255.0 - mean) / std


def _crop_offset(length: int, crop: int) -> int:
    """torchvision's centre-crop offset; a crop longer than the side is padded by (crop - side) // 2 first."""
    return -((crop - length) // 2) if crop > length else int(round((length - crop) / 2.0))
