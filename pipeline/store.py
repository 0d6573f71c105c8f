"""The HDF5 feature store (one file per backbone configuration) and the embedding cache behind it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from pipeline.errors import PipelineError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
ROWS_PER_CHUNK = 256  # HDF5 chunk height of `features`: a few hundred KB to a few MB per chunk


class StoreError(PipelineError):
    """A feature store or head file is missing, malformed, or not the one that was asked for."""


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
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        feats = f.create_dataset(
            "features",
            shape=(n, feature_dim),
            dtype="float32",
            chunks=(min(ROWS_PER_CHUNK, max(n, 1)), feature_dim),
        )
        start = 0
        for block in feature_chunks:
            feats[start : start + len(block)] = block
            start += len(block)
        if start != n:
            raise StoreError(f"{path}: {start} feature rows written for {n} images")
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("split", data=np.asarray(split, dtype=np.uint8))
        f.create_dataset("paths", data=list(paths), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("sha256", data=np.array(sha256, dtype="S64"))
        _encode_attrs(f, attrs)


def read_attrs(path: Path) -> dict:
    """A store's attributes (JSON values decoded), without reading the features."""
    with _open(path) as f:
        if "features" not in f:
            raise StoreError(f"{path} is not a feature store (no features dataset); give data/features/<backbone>.h5")
        return _decode_attrs(f.attrs)


def read_store(
    path: Path, expect_fingerprint: str | None = None, expect_classes: Sequence[str] | None = None
) -> FeatureStore:
    """Read a whole store, refusing one built by another model or for other classes."""
    with _open(path) as f:
        attrs = _decode_attrs(f.attrs)
        check_matches(path, attrs, expect_fingerprint, expect_classes)
        return FeatureStore(
            features=f["features"][:],
            labels=f["labels"][:],
            split=f["split"][:],
            paths=[p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]],
            sha256=[h.decode() for h in f["sha256"][:]],
            attrs=attrs,
        )


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


def _open(path: Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"feature store {path} not found; run the extract stage first")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise StoreError(f"{path} is not a readable HDF5 file: {err}") from err
    version = f.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        f.close()
        raise StoreError(f"{path}: schema_version {version}, expected {SCHEMA_VERSION}")
    return f


def _encode_attrs(f: h5py.File, attrs: dict) -> None:
    f.attrs["schema_version"] = SCHEMA_VERSION
    for key, value in attrs.items():
        f.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) or value is None else value


def _decode_attrs(raw: h5py.AttributeManager) -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, str) and (value[:1] in "[{" or value == "null"):
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
        shards = sorted(self.dir.glob("shard-*.h5"))
        self._next_number = max((int(p.stem.split("-")[1]) for p in shards), default=-1) + 1
        for shard in shards:
            with h5py.File(shard, "r") as f:
                for row, key in enumerate(f["sha256"][:]):
                    self._index.setdefault(key.decode(), (shard, row))
        return self

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
                columns[shard] = _record_of(self._reader(shard), key)
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
            block = self._reader(shard)["features"][rows]  # h5py wants increasing indices
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
        with atomic_path(shard) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("sha256", data=np.array(hashes, dtype="S64"))
            for key in RECORD:
                f.create_dataset(key, data=np.asarray(record[key], dtype=np.float64))
            features = f.create_dataset("features", shape=(len(hashes), self.feature_dim), dtype="float32")
            start = 0
            for block in blocks:
                features[start : start + len(block)] = block
                start += len(block)
        self._index.update({h: (shard, row) for row, h in enumerate(hashes)})

    def _reader(self, shard: Path) -> h5py.File:
        if shard not in self._readers:
            self._readers[shard] = h5py.File(shard, "r")
        return self._readers[shard]


def _record_of(shard: h5py.File, key: str) -> np.ndarray:
    """One `RECORD` column of a shard; nan for shards written before it was recorded."""
    return shard[key][:] if key in shard else np.full(len(shard["sha256"]), np.nan)


def save_arrays(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write named arrays and JSON-able attributes to HDF5 atomically: how heads are saved (no pickle)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        _encode_attrs(f, attrs)


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with _open(path) as f:
        return {key: f[key][()] for key in f}, _decode_attrs(f.attrs)
