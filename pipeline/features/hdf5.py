"""Sealed HDF5 files: how the feature store, head files and embedding-cache shards are written, opened and
checked, their attributes as JSON, and named arrays saved without pickle."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.integrity import check_seal, seal
from pipeline.core.io import atomic_path

SCHEMA_VERSION = 1
ROWS_PER_CHUNK = 256  # HDF5 chunk height of `features`: a few hundred KB to a few MB per chunk

# What to do about a damaged or unreadable file, by what wrote it.
STORE_FIX = "rerun extract"
HEAD_FIX = "rerun the head stage"

# Every HDF5 file written here starts with HDF5's user block (room HDF5 leaves to the application, superblock
# after it) holding the seal (pipeline.core.integrity), checked before HDF5 parses a byte. fletcher32, on every
# dataset besides, is what HDF5 checks on each read; alone it misses a chunk zeroed together with its checksum
# (the Fletcher sum of zeros is zero), and covers neither attributes nor variable-length strings. Damaged HDF5
# metadata can make the library hang or crash instead of raising: it must never see it.
USER_BLOCK = 512
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class StoreError(PipelineError):
    """A feature store or head file is missing, malformed, or not the one that was asked for."""


@contextmanager
def sealed_h5(path: Path) -> Iterator[h5py.File]:
    """A new HDF5 file: written under a temporary name, sealed with its sha256, then renamed into place."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=USER_BLOCK) as f:
            yield f
        seal(tmp, USER_BLOCK)


def verify(path: Path, fix: str = "") -> bool:
    """Check a file's seal before HDF5 opens it: True if sealed and intact, False for a plain HDF5 file (written
    before files were sealed, or by another program); `DamagedFile` otherwise, its message ending with `fix`."""
    with open(path, "rb") as raw:
        if raw.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            return False
    check_seal(path, USER_BLOCK, fix, kind="readable HDF5 file")
    return True


def _checksummed(value: object) -> dict:
    """create_dataset's arguments for a checksum HDF5 verifies on read: fletcher32 needs chunked storage (h5py
    picks the chunks), which HDF5 has for no scalar or empty (null) dataset; the file's seal covers those."""
    return {"fletcher32": True} if np.ndim(value) > 0 else {}


def _open(path: Path, fix: str, what: str = "feature store", writer: str = "extract") -> h5py.File:
    """Open a sealed file once its seal is checked; an unsealed one (older, or another program's) is refused.
    A missing one is named as `what`, with the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{what} {path} not found; run the {writer} stage first")
    if not verify(path, fix):
        raise StoreError(
            f"{path} was written by an older version of this pipeline or by another program (no checksum); {fix}"
        )
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise StoreError(f"{path} is not a readable HDF5 file: {err}; {fix}") from err
    version = f.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        f.close()
        raise StoreError(f"{path}: schema_version {version}, expected {SCHEMA_VERSION}")
    return f


def _check_declared_sizes(path: Path, f: h5py.File, fix: str) -> None:
    """Nothing written here is compressed, so no dataset holds more bytes than its file: a larger declared shape
    (a crafted file; HDF5 fills unwritten chunks in) is refused before reading allocates it."""
    size = os.path.getsize(path)
    for name, dataset in f.items():
        if not isinstance(dataset, h5py.Dataset):
            raise StoreError(f"{path}: {name} is a {type(dataset).__name__}, not a dataset; {fix}")
        declared = 0 if dataset.shape is None else dataset.size * dataset.dtype.itemsize
        if declared > size:
            raise StoreError(f"{path}: {name} declares {declared:,} bytes, more than the file's {size:,}; {fix}")


def _encode_attrs(f: h5py.File, attrs: dict) -> None:
    f.attrs["schema_version"] = SCHEMA_VERSION
    for key, value in attrs.items():
        f.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) or value is None else value


def _decode_attrs(raw: h5py.AttributeManager) -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, str) and value and (value[0] in "[{" or value == "null"):
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def save_arrays(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write named arrays and JSON-able attributes to a sealed HDF5 file atomically: how heads are saved (no
    pickle). Every array but a scalar gets its fletcher32 checksum; the seal covers all of it."""
    with sealed_h5(path) as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value, **_checksummed(value))
        _encode_attrs(f, attrs)


def load_arrays(path: Path, fix: str = HEAD_FIX) -> tuple[dict[str, np.ndarray], dict]:
    """What `save_arrays` wrote (a head file), once the file's seal is checked and no dataset declares more than
    the file holds."""
    with _open(path, fix, what="head file", writer="head") as f:
        _check_declared_sizes(path, f, fix)
        try:
            return {key: f[key][()] for key in f}, _decode_attrs(f.attrs)
        except OSError as err:  # fletcher32 failed: only if the file changed after its seal was checked
            raise StoreError(f"{path}: cannot be read ({err}); {fix}") from err
