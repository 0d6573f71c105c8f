"""One atomic writer for files and folders: a temporary name beside the target, fsync, then a rename."""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.errors import PipelineError


class ConcurrentWriteError(PipelineError):
    """Another process replaced the same folder at the same moment; its copy won."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error it replaces `path`.

    Readers see the old file or the new one, never half of one. The temporary name is this writer's own
    (`.<name>.<pid>.<random>.tmp`), so two processes writing the same file never touch each other's bytes: the
    last to finish wins, whole. A killed writer's leftover is removed by the next write once its process is
    gone. The caller writes (and closes) the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(path)
    tmp = _own_name(path, "tmp")
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
    non-empty folder, so the old one is first renamed aside to this writer's `.<name>.<pid>.<random>.old`: a
    kill between the two renames leaves that, and the next call puts it back; a failed second rename puts it
    back at once. Readers see the old folder or the new one; in that window, none. Of two processes replacing
    the folder at the same moment, one wins whole and the other fails with `ConcurrentWriteError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(path)
    tmp, old = _own_name(path, "tmp"), _own_name(path, "old")
    tmp.mkdir()
    try:
        yield tmp
        for child in (*tmp.iterdir(), tmp):
            _fsync(child)
        with contextlib.suppress(FileNotFoundError):  # no folder yet, or another writer moved it aside
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError as err:
            if old.exists() and not path.exists():
                os.replace(old, path)
            if path.exists() and err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ConcurrentWriteError(
                    f"{path} was replaced by another process meanwhile; it kept that copy"
                ) from err
            raise
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():  # never the only good copy: a failed restore leaves it for the next call to put back
            shutil.rmtree(old, ignore_errors=True)


def _own_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _remove_dead_writers(path: Path) -> None:
    """Clear what killed writers of `path` left: a folder they had moved aside goes back if `path` is missing,
    the rest is removed. A leftover of a process still running is its own business."""
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.*")):
        owner = leftover.name[len(path.name) + 2 :].partition(".")[0]  # of ".<name>.<pid>.<random>.<kind>"
        kind = leftover.suffix
        if kind not in (".tmp", ".old") or not owner.isdigit() or _alive(int(owner)):
            continue
        if kind == ".old" and not path.exists():
            os.replace(leftover, path)
        elif leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, payload: object, indent: int = 2) -> None:
    """Write JSON atomically, so a failed stage never leaves a half-written metrics file."""
    write_text(path, json.dumps(payload, indent=indent) + "\n")


def read_json(path: Path) -> object:
    """A JSON file another stage wrote; missing or unreadable, a one-line error that says to rerun the pipeline."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise PipelineError(f"{path} not found; run `dvc repro` to write it") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} is not valid JSON ({err}); run `dvc repro` to write it again") from err


def write_record(folder: Path, record: dict, metrics: Sequence[str]) -> None:
    """A stage's record as two files in `folder`: metrics.json, the keys `metrics` names (what dvc.yaml declares as
    metrics, so `dvc metrics show` tabulates only what says how good a model is and how sure), and details.json,
    the rest (choices, timings, counts: an output beside it, read by the report, not tabulated)."""
    write_json(Path(folder) / "metrics.json", {k: record[k] for k in metrics}, indent=4)
    write_json(Path(folder) / "details.json", {k: v for k, v in record.items() if k not in metrics}, indent=4)


def read_record(folder: Path) -> dict:
    """A record `write_record` wrote, its two files as one dict."""
    metrics, details = read_json(Path(folder) / "metrics.json"), Path(folder) / "details.json"
    if not details.is_file():
        raise PipelineError(f"{details} not found (an older version kept it all in metrics.json); run `dvc repro`")
    return {**read_json(details), **metrics}


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV file (UTF-8, a header line, then `rows`) atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames), to the disk."""
    if path.is_dir() and os.name != "posix":  # Windows cannot open a folder to flush it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
