"""Make N unique photo-like JPEGs from the shared hymenoptera photos, for benchmarks that need more than 398.

    python benchmarks/photos.py N OUT [--data ../shared/datasets/hymenoptera] [--seed 0]

Each image is a random crop (40-100% of a photo's area, aspect 3:4 to 4:3) of one of the photos, flipped at
random, brightness scaled by 0.8-1.2, resized so its longer side is 400-640 px, saved as a quality-90 JPEG
under OUT/<class>/: every file's bytes and pixels differ, the sizes are those of ordinary photos. Written once
per (N, seed): a folder that already holds N images is kept.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
from PIL import Image, ImageEnhance

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def make_photos(n: int, out: Path, data: Path = DEFAULT_DATA, seed: int = 0) -> Path:
    """OUT/<class>/<k>.jpg for k < n (classes as in `data`'s folders); returns OUT."""
    sources = sorted(p for p in Path(data).rglob("*.jpg"))
    random.Random(seed).shuffle(sources)  # every class in the first few
    if not sources:
        raise click.ClickException(f"no .jpg files under {data}")
    if len(list(Path(out).rglob("*.jpg"))) == n:
        return Path(out)
    jobs = [
        (sources[k % len(sources)], Path(out) / sources[k % len(sources)].parent.name / f"{k:07d}.jpg", seed + k)
        for k in range(n)
    ]
    for target in {job[1].parent for job in jobs}:
        target.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_make_one, jobs, chunksize=32))
    return Path(out)


def _make_one(job: tuple[Path, Path, int]) -> None:
    source, target, seed = job
    rng = random.Random(seed)
    with Image.open(source) as img:
        img = img.convert("RGB")
    w, h = img.size
    area = w * h * rng.uniform(0.4, 1.0)
    aspect = rng.uniform(3 / 4, 4 / 3)
    cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    scale = rng.randint(400, 640) / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
    img.save(target, "JPEG", quality=90)


@click.command()
@click.argument("n", type=int)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=DEFAULT_DATA, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(n: int, out: Path, data: Path, seed: int) -> None:
    make_photos(n, out, data, seed)
    print(f"{n} photos under {out}")


if __name__ == "__main__":
    main()
