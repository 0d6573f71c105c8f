"""The HDF5 feature store (one file per backbone configuration) and the embedding cache behind it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
ROWS_PER_CHUNK = 256  # HDF5 chunk height of `features`: a few hundred KB to a few MB per chunk


# What to do about a damaged or unreadable file, by what wrote it.
STORE_FIX = "rerun extract"
HEAD_FIX = "rerun the head stage"

# Every HDF5 file written here starts with HDF5's user block (room HDF5 leaves to the application, superblock
# after it) holding the sha256 of the rest of the file, checked before HDF5 parses a byte. fletcher32, on every
# dataset besides, is what HDF5 checks on each read; alone it misses a chunk zeroed together with its checksum
# (the Fletcher sum of zeros is zero), and covers neither attributes nor variable-length strings. Damaged HDF5
# metadata can make the library hang or crash instead of raising: it must never see it.
USER_BLOCK = 512
SEAL = b"transfer-pipeline sha256 "
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class StoreError(PipelineError):
    """A feature store or head file is missing, malformed, or not the one that was asked for."""


class DamagedFile(StoreError):
    """A file's bytes are not the ones written: its recorded sha256 does not match, or it is cut short."""


@contextmanager
def sealed_h5(path: Path) -> Iterator[h5py.File]:
    """A new HDF5 file: written under a temporary name, sealed with its sha256, then renamed into place."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=USER_BLOCK) as f:
            yield f
        seal = SEAL + _sha256_after_user_block(tmp).encode() + b"\n"
        with open(tmp, "r+b") as raw:
            raw.write(seal.ljust(USER_BLOCK, b"\0"))


def verify(path: Path, fix: str = "") -> bool:
    """Check a file's seal before HDF5 opens it: True if sealed and intact, False for a plain HDF5 file (written
    before files were sealed, or by another program); `DamagedFile` otherwise, its message ending with `fix`."""
    then = f"; {fix}" if fix else ""
    with open(path, "rb") as raw:
        head = raw.read(USER_BLOCK)
    if head.startswith(HDF5_SIGNATURE):
        return False
    if not head.startswith(SEAL):
        raise DamagedFile(
            f"{path} is not a readable HDF5 file of this pipeline (damaged, truncated, or another kind of file){then}"
        )
    recorded = head[len(SEAL) : len(SEAL) + 64].decode("ascii", "replace")
    actual = _sha256_after_user_block(path)
    if actual != recorded:
        raise DamagedFile(
            f"{path} is damaged or truncated: its bytes hash to sha256 {actual[:16]}, it was written as "
            f"{recorded[:16]}{then}"
        )
    return True


def _sha256_after_user_block(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as raw:
        raw.seek(USER_BLOCK)
        while block := raw.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _checksummed(value: object) -> dict:
    """create_dataset's arguments for a checksum HDF5 verifies on read: fletcher32 needs chunked storage (h5py
    picks the chunks), which HDF5 has for no scalar or empty (null) dataset; the file's seal covers those."""
    return {"fletcher32": True} if np.ndim(value) > 0 else {}


@dataclass
class FeatureStore:
    """A feature store read into memory: row i of every array is manifest row i."""

    features: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # int64 [N]
    split: np.ndarray  # uint8 [N]: 0 train, 1 val, 2 test
    paths: list[str]
    sha256: list[str]
    attrs: dict

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    def subset(self, *splits: str) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of the rows in the given splits, in store order."""
        mask = np.isin(self.split, [SPLIT_CODES[s] for s in splits])
        return self.features[mask], self.labels[mask]

    def paths_of(self, *splits: str) -> list[str]:
        """Image paths of the rows in the given splits, in store order (the order of `subset`)."""
        mask = np.isin(self.split, [SPLIT_CODES[s] for s in splits])
        return [path for path, keep in zip(self.paths, mask, strict=True) if keep]

    def split_sizes(self) -> dict[str, int]:
        return {name: int((self.split == code).sum()) for name, code in SPLIT_CODES.items()}


def write_store(
    path: Path,
    labels: np.ndarray,
    split: np.ndarray,
    paths: Sequence[str],
    sha256: Sequence[str],
    feature_chunks: Iterator[np.ndarray],
    feature_dim: int,
    attrs: dict,
) -> None:
    """Write a store chunk by chunk to a temporary file, then rename it into place.

    `feature_chunks` yields consecutive row blocks, so memory holds one block, never the whole matrix.
    """
    n = len(labels)
    with sealed_h5(path) as f:
        feats = f.create_dataset(
            "features",
            shape=(n, feature_dim),
            dtype="float32",
            chunks=(min(ROWS_PER_CHUNK, max(n, 1)), feature_dim),
            fletcher32=True,
        )
        start = 0
        for block in feature_chunks:
            feats[start : start + len(block)] = block
            start += len(block)
        if start != n:
            raise StoreError(f"{path}: {start} feature rows written for {n} images")
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64), fletcher32=True)
        f.create_dataset("split", data=np.asarray(split, dtype=np.uint8), fletcher32=True)
        # Fixed-width UTF-8: HDF5 filters no variable-length data, so fletcher32 needs it (readers decode bytes).
        encoded = [p.encode() for p in paths]
        text = h5py.string_dtype("utf-8", max(map(len, encoded), default=1) or 1)
        f.create_dataset("paths", data=np.array(encoded, dtype=text), fletcher32=True)
        f.create_dataset("sha256", data=np.array(sha256, dtype="S64"), fletcher32=True)
        _encode_attrs(f, attrs)


def read_attrs(path: Path) -> dict:
    """A store's attributes (JSON values decoded), without reading the features (the seal is checked)."""
    with _open(path, STORE_FIX) as f:
        if "features" not in f:
            raise StoreError(f"{path} is not a feature store (no features dataset); give data/features/<backbone>.h5")
        return _decode_attrs(f.attrs)


def read_store(
    path: Path, expect_fingerprint: str | None = None, expect_classes: Sequence[str] | None = None
) -> FeatureStore:
    """Read a whole store, refusing one built by another model or for other classes, or a damaged one."""
    with _open(path, STORE_FIX) as f:
        attrs = _decode_attrs(f.attrs)
        check_matches(path, attrs, expect_fingerprint, expect_classes)
        _check_declared_sizes(path, f, STORE_FIX)
        try:
            return FeatureStore(
                features=f["features"][:],
                labels=f["labels"][:],
                split=f["split"][:],
                paths=[p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]],
                sha256=[h.decode() for h in f["sha256"][:]],
                attrs=attrs,
            )
        except (OSError, KeyError) as err:  # fletcher32 failed, or a dataset is missing
            raise StoreError(f"{path}: cannot be read as a feature store ({err}); {STORE_FIX}") from err


def check_matches(
    path: Path, attrs: dict, expect_fingerprint: str | None, expect_classes: Sequence[str] | None
) -> None:
    if expect_fingerprint is not None and attrs.get("fingerprint") != expect_fingerprint:
        raise StoreError(
            f"{path} was built by model fingerprint {attrs.get('fingerprint')} "
            f"({attrs.get('backbone')}), but {expect_fingerprint} was expected; rerun extract"
        )
    if expect_classes is not None and list(attrs.get("classes", [])) != list(expect_classes):
        raise StoreError(f"{path} has classes {attrs.get('classes')}, but {list(expect_classes)} were expected")


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


# Per embedding, beside its features: compute seconds (its share of its batch's decoding and forward pass)
# and when it was computed (Unix time). Stores report both for the embeddings they hold, reused or not.
RECORD = ("seconds", "computed_at")


class CacheBusy(PipelineError):
    """Another process holds the embedding cache."""


class EmbeddingCache:
    """Every embedding ever computed by one model fingerprint, keyed by image content hash.

    A directory of small HDF5 shards, each written to a temporary name and renamed into place: a
    process killed at any moment leaves only whole shards, so a rerun recomputes nothing already
    flushed. (One HDF5 file appended in place is not safe against kill -9.) A lock file makes a second
    process fail at once instead of interleaving writes. Use it as a context manager.

    Shards are sealed like every file here, and every seal is checked when the cache is opened (one read of the
    whole cache): a damaged shard is renamed to `<shard>.corrupt` with a warning and its rows leave the index, so
    the run computes them again. Shards of older versions carry no seal and are read unchecked.
    """

    def __init__(self, root: Path, fingerprint: str, feature_dim: int):
        self.dir = Path(root) / fingerprint
        self.feature_dim = feature_dim
        self._lock = FileLock(str(self.dir) + ".lock")
        self._index: dict[str, tuple[Path, int]] = {}
        self._readers: dict[Path, h5py.File] = {}
        self._next_number = 0

    def __enter__(self) -> EmbeddingCache:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout as err:
            raise CacheBusy(
                f"embedding cache {self.dir} is in use by another extract process "
                f"(lock {self._lock.lock_file}); wait for it to finish"
            ) from err
        for stale in self.dir.glob(".*.tmp"):  # left by a killed writer; never renamed, never valid
            stale.unlink()
        # Numbered past the shards set aside too, so a new shard never takes a damaged one's name.
        numbers = (int(p.name.split(".")[0].split("-")[1]) for p in self.dir.glob("shard-*.h5*"))
        self._next_number = max(numbers, default=-1) + 1
        for shard in sorted(self.dir.glob("shard-*.h5")):
            for row, key in enumerate(self._intact_hashes(shard)):
                self._index.setdefault(key, (shard, row))
        return self

    def _intact_hashes(self, shard: Path) -> list[str]:
        """The content hashes a shard holds, once its seal shows every byte is as written (a shard written before
        seals is read unchecked). A damaged shard is renamed aside and holds nothing: its embeddings are
        computed again, since extract computes whatever the cache lacks."""
        try:
            verify(shard)
            with h5py.File(shard, "r") as f:
                hashes = [key.decode() for key in f["sha256"][:]]
                shape = f["features"].shape
            if shape != (len(hashes), self.feature_dim):
                raise DamagedFile(f"features of shape {shape} for {len(hashes)} hashes of dimension {self.feature_dim}")
        except (StoreError, OSError, KeyError) as err:  # KeyError: h5py's error for a missing dataset
            aside = shard.with_name(shard.name + ".corrupt")
            os.replace(shard, aside)
            log.warning(
                "embedding cache shard %s is damaged (%s): moved aside to %s; its embeddings will be computed again",
                *(shard, err, aside.name),
            )
            return []
        return hashes

    def __exit__(self, *exc) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._lock.release()

    def __contains__(self, sha: str) -> bool:
        return sha in self._index

    def __len__(self) -> int:
        return len(self._index)

    def add(self, hashes: Sequence[str], features: np.ndarray, seconds: float = float("nan")) -> None:
        """Flush one batch of new embeddings to disk as a shard; `seconds` is what computing the batch took."""
        keep = [i for i, h in enumerate(hashes) if h not in self._index]
        if keep:
            record = {
                "seconds": np.full(len(keep), seconds / len(hashes)),
                "computed_at": np.full(len(keep), time.time()),
            }
            self._write_shard([hashes[i] for i in keep], [np.asarray(features, dtype=np.float32)[keep]], record)

    def seconds(self, hashes: Sequence[str]) -> float:
        """What computing these embeddings took, whenever they were computed (nan where unrecorded)."""
        return float(self._record("seconds", hashes).sum())

    def computed_at(self, hashes: Sequence[str]) -> float:
        """When the last of these embeddings was computed (Unix time; nan where unrecorded)."""
        times = self._record("computed_at", hashes)
        return float(times.max()) if len(times) else float("nan")

    def _record(self, key: str, hashes: Sequence[str]) -> np.ndarray:
        """One `RECORD` column for `hashes`, in that order."""
        columns = {}
        out = np.empty(len(hashes))
        for i, h in enumerate(hashes):
            shard, row = self._index[h]
            if shard not in columns:
                columns[shard] = self._column(shard, key)
            out[i] = columns[shard][row]
        return out

    def read(self, hashes: Sequence[str]) -> np.ndarray:
        """Embeddings for `hashes`, in that order."""
        out = np.empty((len(hashes), self.feature_dim), dtype=np.float32)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, h in enumerate(hashes):
            shard, row = self._index[h]
            by_shard.setdefault(shard, []).append((row, i))
        for shard, pairs in by_shard.items():
            rows = np.array(sorted({row for row, _ in pairs}))
            block = self._column(shard, "features", rows)  # h5py wants increasing indices
            position = {row: k for k, row in enumerate(rows)}
            for row, i in pairs:
                out[i] = block[position[row]]
        return out

    def compact(self) -> None:
        """Merge all shards into one, block by block, so later runs open one file instead of thousands."""
        shards = sorted(self.dir.glob("shard-*.h5"))
        if len(shards) <= 1:
            return
        hashes = list(self._index)
        blocks = (self.read(hashes[i : i + 4096]) for i in range(0, len(hashes), 4096))
        record = {key: self._record(key, hashes) for key in RECORD}
        self._write_shard(hashes, blocks, record)
        for shard in shards:
            if shard in self._readers:
                self._readers.pop(shard).close()
            shard.unlink()

    def _write_shard(self, hashes: list[str], blocks: Iterable[np.ndarray], record: dict[str, np.ndarray]) -> None:
        """Write a shard under a temporary name and rename it: readers only ever see whole shards."""
        shard = self.dir / f"shard-{self._next_number:08d}.h5"
        self._next_number += 1
        with sealed_h5(shard) as f:
            f.create_dataset("sha256", data=np.array(hashes, dtype="S64"), fletcher32=True)
            for key in RECORD:
                f.create_dataset(key, data=np.asarray(record[key], dtype=np.float64), fletcher32=True)
            features = f.create_dataset(
                "features",
                shape=(len(hashes), self.feature_dim),
                dtype="float32",
                chunks=(min(ROWS_PER_CHUNK, max(len(hashes), 1)), self.feature_dim),
                fletcher32=True,
            )
            start = 0
            for block in blocks:
                features[start : start + len(block)] = block
                start += len(block)
        self._index.update({h: (shard, row) for row, h in enumerate(hashes)})

    def _column(self, shard: Path, key: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Rows of one dataset of a shard (all by default); a `RECORD` column a shard written before it was
        recorded lacks is nan. Its checksums were verified at open: a failure now means it changed since."""
        if shard not in self._readers:
            self._readers[shard] = h5py.File(shard, "r")
        f = self._readers[shard]
        try:
            if key not in f:
                return np.full(len(f["sha256"]) if rows is None else len(rows), np.nan)
            return f[key][:] if rows is None else f[key][rows]
        except OSError as err:
            raise StoreError(
                f"embedding cache shard {shard} changed while extract ran ({err}); run extract again: it will be "
                "set aside and its embeddings computed again"
            ) from err


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
