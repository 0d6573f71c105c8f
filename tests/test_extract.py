"""Extraction: correct rows, deterministic bytes, and the embedding cache's promises (resume, increments)."""

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main as transfer
from pipeline.core.config import ExtractParams
from pipeline.core.errors import DataError
from pipeline.core.io import read_record
from pipeline.data.manifest import read_manifest
from pipeline.features.backbones import build_backbone, fingerprint
from pipeline.features.cache import EmbeddingCache
from pipeline.features.extraction import extract
from pipeline.features.store import read_store
from pipeline.features.transferability import logme
from tests.conftest import REPO, prepare_manifest, write_image_folder

# On the CPU: these tests compare stores byte for byte (tests/conftest.py says why not `device: auto`).
TINY = ExtractParams.of("test_resnet", image_size=32, batch_size=8, num_workers=0, device="cpu")


def run(root: Path, work: Path, params: ExtractParams = TINY, cache: str = "cache"):
    manifest = prepare_manifest(root, work / "manifest.csv")
    return extract(manifest, root, work / "features.h5", work / cache, params)


def test_store_rows_are_the_backbone_applied_to_each_image(image_folder, tmp_path):
    result = run(image_folder, tmp_path)
    store = read_store(result.store, expect_fingerprint=result.fingerprint)
    assert result.images == 36 and result.computed == 36 and result.reused == 0
    assert store.features.shape == (36, 96)
    assert store.classes == ["circle", "square", "triangle"]
    assert store.split_sizes() == {"train": 24, "val": 6, "test": 6}
    backbone = build_backbone("test_resnet")
    preprocessing = backbone.preprocessing.with_image_size(32)
    for row in (0, 17, 35):
        image = Image.open(image_folder / store.paths[row]).convert("RGB")
        with torch.inference_mode():
            expected = backbone.features(preprocessing(image)[None])[0].numpy()
        np.testing.assert_allclose(store.features[row], expected, rtol=1e-5, atol=1e-6)
        assert store.classes[store.labels[row]] == store.paths[row].split("/")[0]
    for key in ("backbone", "weights_id", "preprocessing", "image_size", "feature_dim", "classes", "fingerprint"):
        assert key in store.attrs
    assert store.attrs["versions"]["torch"] == torch.__version__
    # What the report quotes for every model built on this store: the backbone's size and forward pass.
    metrics = result.record()
    assert metrics["backbone_params"] == sum(p.numel() for p in backbone.features.parameters())
    assert metrics["forward_ms_per_image"] > 0 and metrics["forward_device"] == "cpu"


def test_extraction_is_deterministic_on_cpu(image_folder, tmp_path):
    a = run(image_folder, tmp_path / "a")
    b = run(image_folder, tmp_path / "b")
    assert read_store(a.store).features.tobytes() == read_store(b.store).features.tobytes()


def test_second_run_reuses_every_embedding_and_writes_the_same_bytes(image_folder, tmp_path):
    first = run(image_folder, tmp_path)
    before = first.store.read_bytes()
    assert read_store(first.store).attrs["created"]  # when the embeddings were computed
    second = run(image_folder, tmp_path)
    assert (second.computed, second.reused) == (0, 36)
    assert second.store.read_bytes() == before  # so DVC reruns nothing downstream of an unchanged store
    # The extraction cost is what computing the embeddings took, not the few ms of reading them back.
    assert 0 < first.extraction_seconds <= first.compute_seconds
    assert second.extraction_seconds == pytest.approx(first.extraction_seconds)
    assert second.record()["extraction_seconds"] == round(first.extraction_seconds, 3)


def test_adding_ten_images_costs_ten_forward_passes(image_folder, tmp_path):
    first = run(image_folder, tmp_path)
    for path in write_image_folder(tmp_path / "extra", {"circle": 10}, seed=99):  # new content
        path.rename(image_folder / "circle" / f"new_{path.name}")
    second = run(image_folder, tmp_path)
    assert (second.images, second.computed, second.reused) == (46, 10, 36)
    # The 36 kept their recorded cost; the 10 new ones add what this run spent computing them.
    assert first.extraction_seconds < second.extraction_seconds <= first.extraction_seconds + second.compute_seconds


def test_renaming_and_moving_files_computes_nothing(image_folder, tmp_path):
    run(image_folder, tmp_path)
    (image_folder / "circle" / "circle_000.png").rename(image_folder / "circle" / "renamed.png")
    (image_folder / "circle" / "sub").mkdir()
    (image_folder / "circle" / "circle_001.png").rename(image_folder / "circle" / "sub" / "moved.png")
    second = run(image_folder, tmp_path)
    assert (second.computed, second.reused) == (0, 36)
    assert "circle/sub/moved.png" in read_store(second.store).paths


def test_a_new_fingerprint_gets_its_own_cache(image_folder, tmp_path):
    first = run(image_folder, tmp_path)
    larger = ExtractParams.of("test_resnet", image_size=48, batch_size=8, num_workers=0, device="cpu")
    other = run(image_folder, tmp_path, larger)
    assert other.fingerprint != first.fingerprint and other.computed == 36


def _stage(work: Path, root: Path, params_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "stages.extract", "--data", str(root), "--manifest", str(work / "manifest.csv"),
        "--backbone", "test_resnet", "--out", str(work / "features.h5"), "--cache-dir", str(work / "cache"),
        "--metrics", str(work / "extract"), "--params", str(params_file),
    ]  # fmt: skip


def _params_file(work: Path, batch_size: int) -> Path:
    """The stage subprocess's params: on the CPU, where a resumed store matches an uninterrupted run's bytes."""
    path = work / "params.yaml"
    path.write_text(
        f"extract:\n  backbones:\n    test_resnet:\n      image_size: 64\n  batch_size: {batch_size}\n"
        "  num_workers: 0\n  device: cpu\n"
    )
    return path


class Interrupted(Exception):
    """Stands for a crash: raised from inside the run, after some batches reached the cache."""


def test_an_interrupted_extract_resumes_from_what_reached_the_cache(image_folder, tmp_path, monkeypatch):
    """The in-process counterpart of the kill -9 test below (full tier): a run that dies after three batches were
    flushed computes only the rest when run again, and writes the bytes of an uninterrupted run."""
    params = replace(TINY, batch_size=4)
    flushed, add = [], EmbeddingCache.add

    def add_then_die(self, hashes, features, seconds=float("nan")):
        if len(flushed) == 3:
            raise Interrupted
        add(self, hashes, features, seconds)
        flushed.append(len(hashes))

    monkeypatch.setattr(EmbeddingCache, "add", add_then_die)
    with pytest.raises(Interrupted):
        run(image_folder, tmp_path, params)
    assert not (tmp_path / "features.h5").exists()
    monkeypatch.setattr(EmbeddingCache, "add", add)
    resumed = run(image_folder, tmp_path, params)
    assert (resumed.computed, resumed.reused) == (36 - 12, 12)
    (tmp_path / "clean").mkdir()
    run(image_folder, tmp_path / "clean", params)
    assert (
        read_store(tmp_path / "features.h5").features.tobytes()
        == read_store(tmp_path / "clean" / "features.h5").features.tobytes()
    )


@pytest.mark.integration
def test_kill_minus_nine_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    root = tmp_path / "raw"
    write_image_folder(root, {"a": 60, "b": 60}, size=64)
    work = tmp_path / "killed"
    work.mkdir()
    prepare_manifest(root, work / "manifest.csv")
    params_file = _params_file(work, batch_size=1)
    proc = subprocess.Popen(_stage(work, root, params_file), cwd=REPO, stderr=subprocess.DEVNULL)
    shards = work / "cache"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("*/shard-*.h5"))) < 20:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    flushed = len(list(shards.glob("*/shard-*.h5")))
    assert proc.returncode == -signal.SIGKILL and 20 <= flushed < 120
    assert not (work / "features.h5").exists()

    resumed = subprocess.run(_stage(work, root, params_file), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({120 - flushed} computed, {flushed} reused)" in resumed.stdout

    clean = tmp_path / "clean"
    clean.mkdir()
    prepare_manifest(root, clean / "manifest.csv")
    subprocess.run(_stage(clean, root, _params_file(clean, 1)), cwd=REPO, check=True, capture_output=True)
    resumed_bytes = read_store(work / "features.h5").features.tobytes()
    assert resumed_bytes == read_store(clean / "features.h5").features.tobytes()


@pytest.mark.integration  # two stage processes; tests/test_store.py holds the lock's fast test
def test_a_second_extract_on_the_same_cache_fails_at_once(image_folder, tmp_path):
    prepare_manifest(image_folder, tmp_path / "manifest.csv")
    params_file = _params_file(tmp_path, batch_size=8)
    backbone = build_backbone("test_resnet")
    fp = fingerprint(backbone, backbone.preprocessing.with_image_size(64), "fp32", True)
    with EmbeddingCache(tmp_path / "cache", fp, backbone.feature_dim):  # another extract holds it
        busy = subprocess.run(_stage(tmp_path, image_folder, params_file), cwd=REPO, capture_output=True, text=True)
    assert busy.returncode == 1
    assert "is in use by another extract process" in busy.stderr and "Traceback" not in busy.stderr
    assert not (tmp_path / "features.h5").exists()
    ok = subprocess.run(_stage(tmp_path, image_folder, params_file), cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "(36 computed, 0 reused)" in ok.stdout


@pytest.mark.parametrize("draft", [True, False])
def test_large_jpegs_decode_with_or_without_draft(tmp_path, draft):
    root = tmp_path / "raw"
    write_image_folder(root, {"a": 6, "b": 6}, size=600, fmt="jpg")
    result = run(root, tmp_path, ExtractParams(**{**TINY.__dict__, "jpeg_draft": draft}))
    assert result.computed == 12


def test_workers_and_inline_decoding_give_the_same_store(image_folder, tmp_path):
    """Where images are decoded changes no feature (each run computes its own, in its own cache)."""
    stores = {}
    for loader in ("workers", "inline"):
        params = ExtractParams(**{**TINY.__dict__, "loader": loader, "num_workers": 2})
        result = run(image_folder, tmp_path / loader, params)
        assert result.computed == 36
        stores[loader] = read_store(result.store)
    workers, inline = stores["workers"], stores["inline"]
    assert workers.features.tobytes() == inline.features.tobytes()
    assert (workers.paths, workers.sha256) == (inline.paths, inline.sha256)
    np.testing.assert_array_equal(workers.labels, inline.labels)
    # Only the time the embeddings were computed may differ.
    assert {**workers.attrs, "created": None} == {**inline.attrs, "created": None}


def test_a_file_changed_after_prepare_stops_inline_decoding_with_its_name(image_folder, tmp_path):
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    victim = sorted(image_folder.glob("square/*"))[1]
    victim.write_bytes(victim.read_bytes() + b"edited")
    params = ExtractParams(**{**TINY.__dict__, "loader": "inline"})
    with pytest.raises(DataError, match=f"square/{victim.name} changed since prepare ran"):
        extract(manifest, image_folder, tmp_path / "features.h5", tmp_path / "cache", params)


def _plant(manifest: Path, **row: str) -> None:
    """Append a row to a manifest as a person editing the CSV would: a copy of its first usable row, changed."""
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    planted = {**next(r for r in rows if r["status"] == "ok"), **row}
    with manifest.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow(planted)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_manifest_row_leaving_the_data_root_is_refused_even_when_the_cache_holds_its_content(image_folder, tmp_path):
    first = run(image_folder, tmp_path)
    manifest = tmp_path / "manifest.csv"
    # A file outside the data root whose content the cache already holds: looking it up would read nothing.
    source = sorted(image_folder.glob("circle/*"))[0]
    outside = tmp_path / "outside" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(source.read_bytes())
    sha = read_store(first.store).sha256[read_store(first.store).paths.index(f"circle/{source.name}")]
    _plant(manifest, path="../outside/secret.png", sha256=sha, split="train")
    cache = _files(tmp_path / "cache")
    with pytest.raises(DataError, match=r"manifest\.csv, line 38 \(\.\./outside/secret\.png\): .* not a path inside"):
        extract(manifest, image_folder, tmp_path / "second.h5", tmp_path / "cache", TINY)
    assert not (tmp_path / "second.h5").exists()
    assert _files(tmp_path / "cache") == cache  # nothing looked up, nothing written


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"path": "/etc/passwd"}, "not a path inside the data root"),
        ({"path": "circle/../../raw/circle/circle_000.png"}, "not a path inside the data root"),
        ({"sha256": ""}, "content hash '' is not 64 hex digits"),
        ({"sha256": "abc"}, "content hash 'abc' is not 64 hex digits"),
        ({"status": "OK"}, "status 'OK', expected ok or quarantined"),
        ({"split": "holdout"}, "split 'holdout', expected one of train, val, test"),
    ],
)
def test_a_bad_manifest_row_is_one_line_that_names_it(image_folder, tmp_path, row, message):
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    _plant(manifest, **row)
    with pytest.raises(DataError, match=f"line 38 .*{re.escape(message)}.*run `dvc repro`"):
        read_manifest(manifest, image_folder)
    assert len(read_manifest(prepare_manifest(image_folder, manifest), image_folder).ok_rows()) == 36


def test_a_link_out_of_the_data_root_in_the_manifest_is_refused(image_folder, tmp_path):
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    (tmp_path / "outside.png").write_bytes(sorted(image_folder.glob("circle/*"))[0].read_bytes())
    (image_folder / "circle" / "link.png").symlink_to(tmp_path / "outside.png")
    _plant(manifest, path="circle/link.png")
    with pytest.raises(DataError, match="circle/link.png.*outside the data root"):
        read_manifest(manifest, image_folder)


def _features_offset(shard: Path) -> int:
    """Where the first stored block of a shard's `features` lies in the file."""
    with h5py.File(shard, "r") as f:
        features = f["features"]
        return features.id.get_chunk_info(0).byte_offset if features.chunks else features.id.get_offset()


@pytest.mark.parametrize("damage", ["overwritten", "truncated"])
def test_a_damaged_cache_shard_is_set_aside_and_its_rows_recomputed(image_folder, tmp_path, caplog, damage):
    """Before: 200 floats overwritten in a shard were copied into the store (one row silently different), exit 0;
    a truncated shard stopped extract with a traceback."""
    clean = run(image_folder, tmp_path / "clean")
    run(image_folder, tmp_path / "work")  # one compacted shard of 36 rows
    (shard,) = (tmp_path / "work" / "cache").glob("*/shard-*.h5")
    if damage == "overwritten":
        with shard.open("r+b") as f:
            f.seek(_features_offset(shard) + 4 * 96 * 5)  # row 5 onwards
            f.write(np.full(200, 0.5, dtype=np.float32).tobytes())
    else:
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size - 1000)
    with caplog.at_level(logging.WARNING, logger="pipeline.core.integrity"):
        again = run(image_folder, tmp_path / "work")
    assert (again.computed, again.reused) == (36, 0)
    assert shard.name in caplog.text and shard.with_name(shard.name + ".corrupt").exists()
    fresh, expected = read_store(again.store), read_store(clean.store)
    assert fresh.features.tobytes() == expected.features.tobytes()
    for name in ("labels", "split", "paths", "sha256"):
        assert np.array_equal(getattr(fresh, name), getattr(expected, name)), name


@pytest.mark.parametrize(("side", "size", "why"), [(32, 128, "the images are tiny"), (48, 160, "the size the weights")])
def test_image_size_auto_follows_the_images_and_the_stage_says_so(tmp_path, side, size, why):
    """test_resnet's weights take 160 px: 32 px images are read at 128, 48 px ones at 160, and the stage's line
    and metrics say which and why; the store records the size the heads and the predictor will use."""
    root = tmp_path / "raw"
    write_image_folder(root, {"a": 6, "b": 6}, size=side)
    work = tmp_path / "work"
    work.mkdir()
    prepare_manifest(root, work / "manifest.csv")
    params = work / "params.yaml"
    params.write_text("extract:\n  backbones:\n    test_resnet: {}\n  num_workers: 0\n  device: cpu\n")
    done = subprocess.run(_stage(work, root, params), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"extract@test_resnet: test_resnet at {size} px (image_size auto: {why}" in done.stdout
    # Its one metric (LogME) in metrics.json, what it chose and measured beside it in details.json.
    assert list(json.loads((work / "extract" / "metrics.json").read_text())) == ["logme"]
    metrics = read_record(work / "extract")
    assert (metrics["image_size"], metrics["feature_dim"], metrics["backbone"]) == (size, 96, "test_resnet")
    assert np.isfinite(metrics["logme"])
    store = read_store(work / "features.h5")
    assert store.attrs["image_size"] == size and store.attrs["label"] == "test_resnet"


def test_the_store_metrics_carry_the_logme_of_its_train_split(image_folder, tmp_path):
    """The score in the metrics is LogME of the store's own train rows, computed again here from the store."""
    result = run(image_folder, tmp_path)
    store = read_store(result.store)
    x, y = store.subset("train")
    assert result.record()["logme"] == pytest.approx(logme(x, y), abs=1e-6)


def test_transfer_inspect_names_the_stores_label_backbone_and_size(image_folder, tmp_path):
    result = run(image_folder, tmp_path)
    shown = CliRunner().invoke(transfer, ["inspect", str(result.store)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == f"{result.store}: 36 images x 96 features (float32)"
    assert lines[1:3] == ["  label: test_resnet", "  backbone: test_resnet"] and "  image_size: 32" in lines
