"""One atomic writer for files and folders: a temporary name beside the target, fsync, then a rename."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error it replaces `path`.

    Readers see the old file or the new one, never half of one; a failed or killed writer leaves at most a
    hidden `.<name>.tmp` that the next write replaces. The caller writes (and closes) the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself, so a power cut cannot undo it
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without error it replaces `path`.

    The files inside it always belong together (a model's weights and its config). POSIX cannot rename over a
    non-empty folder, so the old one is first renamed aside to `.<name>.old`: a kill between the two renames
    leaves that, and the next call (or a failed second rename) puts it back. Readers see the old folder or the
    new one; in that window, none.
    """
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)  # an earlier writer was killed between its renames: its old folder is the good one
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for child in (*tmp.iterdir(), tmp):
            _fsync(child)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():  # never the only good copy: a failed restore leaves it for the next call to put back
            shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, payload: object) -> None:
    """Write JSON atomically, so a failed stage never leaves a half-written metrics file."""
    write_text(path, json.dumps(payload, indent=2) + "\n")


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames), to the disk."""
    if path.is_dir() and os.name != "posix":  # Windows cannot open a folder to flush it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
