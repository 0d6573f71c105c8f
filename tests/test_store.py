"""The HDF5 feature store and the embedding cache: round trip, refusal of mismatches, atomicity, locking."""

import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.core.integrity import DamagedFile
from pipeline.features.cache import CacheBusy, EmbeddingCache
from pipeline.features.hdf5 import StoreError, load_arrays, save_arrays, sealed_h5
from pipeline.features.store import read_attrs, read_store, write_store


def _write(path: Path, n: int = 10, dim: int = 4, chunk: int = 3, attrs: dict | None = None) -> np.ndarray:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    write_store(
        path,
        labels=np.arange(n) % 2,
        split=np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])[:n],
        paths=[f"cls/{i}.png" for i in range(n)],
        sha256=[f"{i:064x}" for i in range(n)],
        feature_chunks=(features[i : i + chunk] for i in range(0, n, chunk)),
        feature_dim=dim,
        attrs=attrs or {"classes": ["ants", "bees"], "fingerprint": "fp1", "backbone": "tiny", "weights": None},
    )
    return features


def test_store_round_trip(tmp_path):
    path = tmp_path / "features" / "tiny.h5"
    features = _write(path)
    store = read_store(path, expect_fingerprint="fp1", expect_classes=["ants", "bees"])
    np.testing.assert_array_equal(store.features, features)
    assert store.labels.dtype == np.int64 and list(store.labels) == [0, 1] * 5
    assert store.split_sizes() == {"train": 6, "val": 2, "test": 2}
    assert store.paths[3] == "cls/3.png" and store.sha256[3] == f"{3:064x}"
    assert store.classes == ["ants", "bees"] and store.fingerprint == "fp1"
    assert store.attrs["weights"] is None
    x_test, y_test = store.subset("test")
    np.testing.assert_array_equal(x_test, features[8:])
    assert read_attrs(path)["schema_version"] == 1
    with h5py.File(path) as f:
        assert f["features"].chunks is not None and f["features"].dtype == np.float32


def test_reading_some_splits_gives_their_rows_of_the_whole_store_in_block_sized_reads(tmp_path, monkeypatch):
    """A head reads train and val to fit, then test to score: the same rows, in store order, as the whole store's
    subsets, read a few rows at a time (blocks smaller than the store here) so the other splits never load."""
    monkeypatch.setattr("pipeline.features.store.READ_BLOCK_ROWS", 4)
    path = tmp_path / "tiny.h5"
    features = _write(path)
    whole = read_store(path)
    for splits in (("train", "val"), ("test",), ("val",)):
        part = read_store(path, splits=splits)
        np.testing.assert_array_equal(part.features, whole.subset(*splits)[0])
        np.testing.assert_array_equal(part.labels, whole.subset(*splits)[1])
        assert part.paths == whole.paths_of(*splits) and part.split_sizes()["train"] == whole.split_sizes()["train"] * (
            "train" in splits
        )
    fit = read_store(path, splits=("train", "val"))
    assert fit.subset("train", "val")[0] is fit.features  # every row wanted: the array itself, not a copy
    np.testing.assert_array_equal(fit.subset("val")[0], features[6:8])


def test_reader_refuses_another_fingerprint_or_classes_naming_both(tmp_path):
    path = tmp_path / "s.h5"
    _write(path)
    with pytest.raises(StoreError, match=r"fingerprint fp1 \(tiny\), but fp2 was expected"):
        read_store(path, expect_fingerprint="fp2")
    with pytest.raises(StoreError, match=r"classes \['ants', 'bees'\], but \['ants', 'wasps'\]"):
        read_store(path, expect_classes=["ants", "wasps"])


def test_missing_or_foreign_files_are_store_errors(tmp_path):
    with pytest.raises(StoreError, match="not found; run the extract stage"):
        read_store(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(DamagedFile, match="not a readable HDF5 file"):
        read_store(tmp_path / "junk.h5")


def test_a_failed_write_leaves_no_store(tmp_path):
    path = tmp_path / "s.h5"

    def chunks():
        yield np.zeros((3, 4), np.float32)
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        write_store(path, np.zeros(10), np.zeros(10), ["p"] * 10, ["0" * 64] * 10, chunks(), 4, {})
    assert list(tmp_path.iterdir()) == []


def test_too_few_rows_is_an_error_not_a_short_store(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(StoreError, match="3 feature rows written for 10 images"):
        write_store(path, np.zeros(10), np.zeros(10), ["p"] * 10, ["0" * 64] * 10, iter([np.zeros((3, 4))]), 4, {})
    assert not path.exists()


def test_arrays_round_trip(tmp_path):
    arrays = {"coef": np.arange(6.0).reshape(2, 3), "classes": np.array([0, 1])}
    save_arrays(tmp_path / "h.h5", arrays, {"kind": "logreg", "curve": [{"C": 1.0}]})
    loaded, attrs = load_arrays(tmp_path / "h.h5")
    np.testing.assert_array_equal(loaded["coef"], arrays["coef"])
    assert attrs["kind"] == "logreg" and attrs["curve"] == [{"C": 1.0}]


def _hashes(n: int, offset: int = 0) -> list[str]:
    return [f"{i + offset:064x}" for i in range(n)]


def test_cache_flushes_shards_and_reads_in_any_order(tmp_path):
    with EmbeddingCache(tmp_path, "fp", 2) as cache:
        cache.add(_hashes(3), np.arange(6, dtype=np.float32).reshape(3, 2))
        cache.add(_hashes(2, 3), np.full((2, 2), 9, np.float32))
        assert len(list((tmp_path / "fp").glob("shard-*.h5"))) == 2
        out = cache.read([_hashes(5)[4], _hashes(5)[0], _hashes(5)[2]])
    np.testing.assert_array_equal(out, [[9, 9], [0, 1], [4, 5]])
    with EmbeddingCache(tmp_path, "fp", 2) as cache:  # a new process sees what was flushed
        assert len(cache) == 5 and _hashes(1)[0] in cache
        cache.compact()
        assert len(list((tmp_path / "fp").glob("shard-*.h5"))) == 1
        np.testing.assert_array_equal(cache.read(_hashes(2, 1)), [[2, 3], [4, 5]])


def test_cache_keeps_each_embeddings_cost_and_time_through_compaction(tmp_path):
    with EmbeddingCache(tmp_path, "fp", 1) as cache:
        cache.add(_hashes(3), np.zeros((3, 1), np.float32), seconds=3.0)  # 1 s per embedding
        first = cache.computed_at(_hashes(3))
        cache.add(_hashes(2, 3), np.zeros((2, 1), np.float32), seconds=1.0)  # 0.5 s per embedding
        later = cache.computed_at(_hashes(2, 3))
        cache.add(_hashes(1, 5), np.zeros((1, 1), np.float32))  # cost not given: unknown
        before = [(cache.seconds([h]), cache.computed_at([h])) for h in _hashes(6)]
        cache.compact()
        after = [(cache.seconds([h]), cache.computed_at([h])) for h in _hashes(6)]
    np.testing.assert_array_equal(after, before)  # row by row, not just in total
    assert [cost for cost, _ in after[:5]] == [1.0, 1.0, 1.0, 0.5, 0.5] and np.isnan(after[5][0])
    assert first <= later and [t for _, t in after[:5]] == [first] * 3 + [later] * 2
    with EmbeddingCache(tmp_path, "fp", 1) as cache:
        assert cache.seconds(_hashes(5)) == 4.0 and cache.computed_at(_hashes(5)) == later


def test_cache_ignores_known_hashes_and_cleans_temporary_shards(tmp_path):
    (tmp_path / "fp").mkdir()
    (tmp_path / "fp" / ".shard-00000007.h5.tmp").write_bytes(b"half written")
    with EmbeddingCache(tmp_path, "fp", 1) as cache:
        cache.add(_hashes(2), np.ones((2, 1), np.float32))
        cache.add(_hashes(2), np.zeros((2, 1), np.float32))  # already cached: first value wins
        np.testing.assert_array_equal(cache.read(_hashes(2)), [[1], [1]])
    assert not (tmp_path / "fp" / ".shard-00000007.h5.tmp").exists()


def test_second_user_of_a_cache_fails_at_once(tmp_path):
    with EmbeddingCache(tmp_path, "fp", 1) as cache:
        cache.add(_hashes(1), np.ones((1, 1), np.float32))
        with pytest.raises(CacheBusy, match="in use by another extract process"), EmbeddingCache(tmp_path, "fp", 1):
            pass
    with EmbeddingCache(tmp_path, "fp", 1) as cache:  # released, and intact
        np.testing.assert_array_equal(cache.read(_hashes(1)), [[1]])


def test_a_store_of_another_schema_or_a_head_file_is_a_clean_error(tmp_path):
    with sealed_h5(tmp_path / "old.h5") as f:
        f.attrs["schema_version"] = 0
    with pytest.raises(StoreError, match="schema_version 0, expected 1"):
        read_attrs(tmp_path / "old.h5")
    save_arrays(tmp_path / "head.h5", {"coef": np.zeros(2)}, {"kind": "logreg"})
    with pytest.raises(StoreError, match="is not a feature store"):
        read_attrs(tmp_path / "head.h5")


def _datasets(path: Path) -> dict[str, h5py.Dataset]:
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: found.update({name: (item.shape, item.fletcher32)}))
    return found


def test_every_dataset_written_carries_a_checksum_hdf5_verifies(tmp_path):
    """fletcher32 on every dataset with elements (HDF5 filters no scalar), beside the file's own digest."""
    _write(tmp_path / "store.h5")
    with EmbeddingCache(tmp_path / "cache", "fp", 2) as cache:
        cache.add(_hashes(3), np.ones((3, 2), np.float32))
        cache.add(_hashes(2, 3), np.ones((2, 2), np.float32))
        cache.compact()
    save_arrays(tmp_path / "head.h5", {"coef": np.ones((2, 3)), "classes": np.arange(2), "t_": np.float64(2)}, {})
    files = [tmp_path / "store.h5", *(tmp_path / "cache" / "fp").glob("shard-*.h5"), tmp_path / "head.h5"]
    for path in files:
        datasets = _datasets(path)
        assert datasets and all(checked for shape, checked in datasets.values() if shape), (path, datasets)
    assert _datasets(tmp_path / "head.h5")["t_"] == ((), False)


def _corrupt_features(shard: Path) -> None:
    with h5py.File(shard, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    with shard.open("r+b") as f:
        f.seek(offset)
        f.write(np.full(2, 7, np.float32).tobytes())


def test_a_damaged_shard_is_renamed_aside_and_only_its_rows_leave_the_cache(tmp_path, caplog):
    with EmbeddingCache(tmp_path, "fp", 2) as cache:
        cache.add(_hashes(3), np.ones((3, 2), np.float32))
        cache.add(_hashes(2, 3), np.full((2, 2), 2, np.float32))
    first, second = sorted((tmp_path / "fp").glob("shard-*.h5"))
    _corrupt_features(first)
    with caplog.at_level(logging.WARNING, logger="pipeline.core.integrity"), EmbeddingCache(tmp_path, "fp", 2) as cache:
        assert len(cache) == 2 and _hashes(1)[0] not in cache
        np.testing.assert_array_equal(cache.read(_hashes(2, 3)), np.full((2, 2), 2))
        cache.add(_hashes(3), np.zeros((3, 2), np.float32))  # recomputed: a new shard, a new number
    assert first.name in caplog.text and "its embeddings will be computed again" in caplog.text
    assert first.with_name(first.name + ".corrupt").exists() and not first.exists()
    assert sorted(p.name for p in (tmp_path / "fp").glob("shard-*.h5")) == [second.name, "shard-00000002.h5"]


def test_a_shard_written_before_checksums_is_still_read(tmp_path):
    """A shard of an older version: plain HDF5, no digest, no fletcher32."""
    (tmp_path / "fp").mkdir()
    with h5py.File(tmp_path / "fp" / "shard-00000000.h5", "w") as f:
        f.create_dataset("sha256", data=np.array(_hashes(2), dtype="S64"))
        f.create_dataset("features", data=np.arange(4, dtype=np.float32).reshape(2, 2))
    with EmbeddingCache(tmp_path, "fp", 2) as cache:
        np.testing.assert_array_equal(cache.read(_hashes(2)[::-1]), [[2, 3], [0, 1]])
        assert np.isnan(cache.seconds(_hashes(2)))


def test_a_damaged_or_truncated_store_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "s.h5"
    _write(path)
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(DamagedFile, match=rf"{re.escape(str(path))} is damaged or truncated: .*; rerun extract"):
        read_store(path)
    damaged = bytearray(original)
    damaged[len(original) // 2] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(DamagedFile, match=rf"{re.escape(str(path))} is damaged or truncated: .*; rerun extract"):
        read_store(path)
