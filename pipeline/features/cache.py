"""The embedding cache: every embedding ever computed by one model fingerprint, keyed by image content hash."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from pipeline.core.errors import PipelineError
from pipeline.core.integrity import DamagedFile, set_aside
from pipeline.features.hdf5 import ROWS_PER_CHUNK, StoreError, sealed_h5, verify

log = logging.getLogger(__name__)

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
        except (DamagedFile, StoreError, OSError, KeyError) as err:  # KeyError: h5py's error for a missing dataset
            set_aside(shard, "embedding cache shard", err, "its embeddings will be computed again")
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
