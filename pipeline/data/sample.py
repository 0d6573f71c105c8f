"""The bundled sample: scikit-learn's handwritten digits written as an ImageFolder of PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.data.placement import mark_sample


def write_digits(root: Path) -> int:
    """Write the 1,797 8x8 digits (ships with scikit-learn, so offline) as `root/<digit>/<index>.png`, marked as the
    sample (`transfer init` replaces it; prepare skips the hidden marker)."""
    digits = load_digits()
    root = Path(root)
    written = []
    for index, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255 / 16)).astype(np.uint8)  # 0..16 grey levels -> 0..255
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
        written.append(f"{target}/{index:04d}.png")
    mark_sample(root, written)
    return len(written)
