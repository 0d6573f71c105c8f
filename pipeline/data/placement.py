"""A user's ImageFolder put in place as the pipeline's data root: linked or copied whole, never mixed with the bundled
sample or with other images, the source never written."""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import DataError
from pipeline.data.listing import files_under
from pipeline.data.manifest import scan

# Written by `transfer sample` next to the class folders: the files it wrote. Hidden, so prepare skips it.
SAMPLE_MARKER = ".transfer-sample"


@dataclass(frozen=True)
class Placed:
    """What `place_images` did: the images put in place (hard-linked or copied), and what the destination held."""

    images: int
    classes: int
    layout: str
    linked: int
    copied: int
    found: str  # "" (nothing), "the bundled sample" or "other images" (replaced), "the same images" (kept)
    not_files: tuple[str, ...] = ()  # entries of the source that are not regular files (links to nothing, pipes)


def mark_sample(root: Path, files: list[str]) -> None:
    """Say that `root` holds a bundled sample and nothing else: the files (relative paths) it was written with."""
    header = "# The bundled sample, written by `transfer sample`: `transfer init PATH` replaces it with your images.\n"
    (Path(root) / SAMPLE_MARKER).write_text(header + "".join(f"{name}\n" for name in sorted(files)))


def holds_sample(root: Path) -> bool:
    """Whether `root` holds a bundled sample and nothing else: its marker lists every file there is (a file added
    to the sample by hand makes it the user's data, never replaced without being asked)."""
    marker = Path(root) / SAMPLE_MARKER
    if not marker.is_file():
        return False
    written = {line for line in marker.read_text().splitlines() if line and not line.startswith("#")}
    return written == set(_visible_files(root))


def place_images(source: Path, dest: Path, *, force: bool = False, link: bool = True) -> Placed:
    """Put the images of the ImageFolder `source` (class folders, or train/ val/ test/ of class folders: the layouts
    prepare reads) at `dest`, as hard links where the filesystem allows (`link`), else as copies.

    `dest` may be missing or empty, hold the bundled sample (replaced), or hold exactly these images (kept as they
    are); any other images there are replaced only with `force`. The new tree is built beside `dest` and renamed
    into place, so a failure leaves `dest` as it was. Nothing under `source` is written.
    """
    source, dest = Path(source), Path(dest)
    if not source.exists():
        raise DataError(f"{source}: no such folder")
    if not source.is_dir():
        raise DataError(f"{source} is a file; give the folder that holds one folder of images per class")
    if _overlap(source, dest):
        raise DataError(f"{source} and {dest} overlap; give a folder of images outside {dest}")
    if dest.exists() and not dest.is_dir():
        raise DataError(f"{dest} is a file, not a folder; move it away first")
    layout, files, _ = scan(source)
    if not files:
        raise DataError(f"{source}: no images in class folders; put each class's images in a folder of its own")
    classes = sorted({cls for _, cls, _ in files})
    if len(classes) < 2:
        raise DataError(f"{source}: one class folder ({classes[0]}); at least two are needed, one per class")
    names = [rel for rel, _, _ in files if (source / rel).is_file()]
    not_files = tuple(rel for rel, _, _ in files if not (source / rel).is_file())

    found = _what_is_there(source, names, dest, force)
    if found == "the same images":
        return Placed(len(names), len(classes), layout, 0, 0, found, not_files)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        linked = sum(_put(source / rel, staging / rel, link) for rel in names)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return Placed(len(names), len(classes), layout, linked, len(names) - linked, found, not_files)


def _what_is_there(source: Path, names: list[str], dest: Path, force: bool) -> str:
    if holds_sample(dest):
        return "the bundled sample"
    there = _visible_files(dest) if dest.is_dir() else []
    if not there:
        return ""
    if sorted(there) == sorted(names) and all(_same(source / rel, dest / rel) for rel in names):
        return "the same images"
    if not force:
        raise DataError(
            f"{dest} holds {len(there)} file{'s' * (len(there) != 1)}, neither the bundled sample nor the images "
            f"of {source}; `transfer init --force {source}` replaces them (a version you committed comes back "
            "with `dvc checkout`)"
        )
    return "other images"


def _visible_files(root: Path) -> list[str]:
    return [path.relative_to(root).as_posix() for path, junk in files_under(root) if not junk]


def _same(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _put(source: Path, target: Path, link: bool) -> bool:
    """Hard-link `source` at `target` (True), or copy it where the filesystem cannot (another device, no links)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, target)  # a symbolic link is followed: the file it names is linked
            return True
        except OSError:
            pass
    shutil.copy2(source, target)
    return False
