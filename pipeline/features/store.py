"""The HDF5 feature store: one file per backbone configuration, row i of every dataset is usable manifest row i."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.features.hdf5 import (
    ROWS_PER_CHUNK,
    STORE_FIX,
    StoreError,
    _check_declared_sizes,
    _decode_attrs,
    _encode_attrs,
    _open,
    sealed_h5,
)

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


# Rows of `features` read from the file at a time when only some splits are wanted: 64 MB of 1,280 floats.
READ_BLOCK_ROWS = 1 << 13


@dataclass
class FeatureStore:
    """A feature store read into memory: row i of every array is usable manifest row i (of the splits read, in
    store order, when `read_store` was given some)."""

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
        """Features and labels of the rows in the given splits, in store order: the arrays themselves (no copy)
        when every row is in them."""
        mask = np.isin(self.split, [SPLIT_CODES[s] for s in splits])
        if mask.all():
            return self.features, self.labels
        return self.features[mask], self.labels[mask]

    def rows(self, *splits: str) -> np.ndarray:
        """Row numbers of the rows in the given splits, in store order (the rows of `subset`)."""
        return np.flatnonzero(np.isin(self.split, [SPLIT_CODES[s] for s in splits]))

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


def read_split_sizes(path: Path) -> dict[str, int]:
    """How many rows each split has, without reading any features."""
    with _open(path, STORE_FIX) as f:
        split = f["split"][:]
    return {name: int((split == code).sum()) for name, code in SPLIT_CODES.items()}


def read_attrs(path: Path) -> dict:
    """A store's attributes (JSON values decoded), without reading the features (the seal is checked)."""
    with _open(path, STORE_FIX) as f:
        if "features" not in f:
            raise StoreError(f"{path} is not a feature store (no features dataset); give data/features/<backbone>.h5")
        return _decode_attrs(f.attrs)


def read_store(
    path: Path,
    expect_fingerprint: str | None = None,
    expect_classes: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
) -> FeatureStore:
    """Read a store, or only the rows of `splits` (a head trains on train and val, then scores test: the features of
    the others never enter memory), refusing one built by another model or for other classes, or a damaged one."""
    with _open(path, STORE_FIX) as f:
        attrs = _decode_attrs(f.attrs)
        check_matches(path, attrs, expect_fingerprint, expect_classes)
        _check_declared_sizes(path, f, STORE_FIX)
        try:
            split = f["split"][:]
            keep = np.ones(len(split), bool) if splits is None else np.isin(split, [SPLIT_CODES[s] for s in splits])
            paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]]
            return FeatureStore(
                features=f["features"][:] if keep.all() else _rows(f["features"], keep),
                labels=f["labels"][:][keep],
                split=split[keep],
                paths=[p for p, k in zip(paths, keep, strict=True) if k],
                sha256=[h.decode() for h, k in zip(f["sha256"][:], keep, strict=True) if k],
                attrs=attrs,
            )
        except (OSError, KeyError) as err:  # fletcher32 failed, or a dataset is missing
            raise StoreError(f"{path}: cannot be read as a feature store ({err}); {STORE_FIX}") from err


def _rows(dataset: h5py.Dataset, keep: np.ndarray) -> np.ndarray:
    """The rows of `dataset` where `keep` is true, read a block at a time into one array: memory holds them and
    one block, never the whole dataset."""
    out = np.empty((int(keep.sum()), dataset.shape[1]), dtype=dataset.dtype)
    filled = 0
    for start in range(0, len(keep), READ_BLOCK_ROWS):
        wanted = keep[start : start + READ_BLOCK_ROWS]
        if wanted.any():
            block = dataset[start : start + len(wanted)][wanted]
            out[filled : filled + len(block)] = block
            filled += len(block)
    return out


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
