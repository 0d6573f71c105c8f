"""Which files under a folder are the user's images: every entry but folders, in sorted order, with hidden files
and folders and operating-system droppings told apart. The one listing `prepare` and `transfer predict` share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import PipelineError

JUNK_NAMES = {"Thumbs.db", "desktop.ini", "__MACOSX"}


def is_junk(name: str) -> bool:
    """Hidden files and folders and operating-system droppings: not the user's images."""
    return name.startswith(".") or name in JUNK_NAMES


def files_under(folder: Path) -> Iterator[tuple[Path, bool]]:
    """Every entry below `folder` that is not a folder, recursively and sorted, with whether it is junk (a hidden or
    system file, or one inside such a folder; where `folder` itself lies does not matter).

    Special files (FIFOs, sockets, devices) and broken links are listed too: readers refuse them by type, so they
    are reported with their reason, never silently lost."""
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_dir():
            yield path, any(is_junk(part) for part in path.relative_to(folder).parts)


def list_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders walked recursively, in sorted order. Hidden and system files and folders inside a
    given folder are skipped; where the folder itself lies (`../photos`, `~/.data/photos`) does not matter.

    Everything in a folder but its folders is listed, special files (FIFOs, sockets, devices) and broken links
    included: reading refuses them by type, so they come back as rejected with their reason, never unmentioned."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = [path for path, junk in files_under(item) if not junk]
            if not found:
                raise PipelineError(f"{item}: no image files in this folder (hidden and system files are skipped)")
            paths.extend(found)
        elif item.exists() or item.is_symlink():
            paths.append(item)
        else:
            raise PipelineError(f"{item}: no such file or folder")
    return paths
