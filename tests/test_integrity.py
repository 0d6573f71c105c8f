"""Nothing silently wrong: each artifact records what it was made from, its readers check that, and damage on
disk is caught, in one line, never a traceback and never a plausible wrong number.

Each test is one probe: a store, head or model changed behind the pipeline's back (data re-split, bytes
overwritten, a file cut short), then the stage that reads it. Real files throughout: the store written by
extract, the head by the head stage's code, the model by finetune.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import main as transfer
from pipeline.core import integrity
from pipeline.core.config import ExtractParams, FinetuneParams, HeadParams
from pipeline.core.errors import PipelineError
from pipeline.core.integrity import SEAL_LINE, DamagedFile, check_seal, seal
from pipeline.data.manifest import build_manifest, write_manifest
from pipeline.features.extraction import extract
from pipeline.features.hdf5 import StoreError, load_arrays, save_arrays
from pipeline.features.store import read_attrs, read_store
from pipeline.finetuning.model import load_finetuned
from pipeline.finetuning.training import finetune
from pipeline.heads.persistence import HeadFile, load_head, save_head
from pipeline.heads.selection import train_head
from pipeline.results.answers import Answers
from pipeline.results.report import build_report
from stages.head import main as head_stage
from stages.warm_start import main as warm_start_stage
from tests.conftest import prepare_manifest

# On the CPU: stores are compared bit for bit (tests/conftest.py says why not `device: auto`).
TINY = ExtractParams.of("test_resnet", image_size=32, batch_size=8, num_workers=0, device="cpu")
PARAMS_YAML = (
    "extract:\n  backbones:\n    test_resnet:\n      image_size: 32\n  batch_size: 8\n  num_workers: 0\n  device: cpu\n"
    "finetune:\n  init_head: logreg\n"
)


@dataclass(frozen=True)
class Run:
    root: Path
    manifest: Path
    store: Path
    head: Path
    cache: Path
    params: Path


@pytest.fixture
def run(image_folder: Path, tmp_path: Path) -> Run:
    """prepare (seed 0), extract and a logistic head (as head@logreg trains it) on the 36 generated images."""
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    store = extract(manifest, image_folder, tmp_path / "features.h5", tmp_path / "cache", TINY).store
    save_head(train_head(read_store(store), "logreg", HeadParams(grid={"C": [1.0]})), tmp_path / "logreg.h5")
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS_YAML)
    return Run(image_folder, manifest, store, tmp_path / "logreg.h5", tmp_path / "cache", params)


def one_line_error(result: Result) -> str:
    """A failure the user can fix: exit 1 and one line of error last on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # click's exit, nothing escaped
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[-1].startswith("Error: ") and not any(line.startswith("Error: ") for line in lines[:-1])
    assert "Traceback" not in result.output
    return lines[-1]


def predict(run: Run) -> Result:
    """`transfer predict` with the head and its store: a reader that scores the head, as the report does."""
    image = next(run.root.glob("circle/*.png"))
    args = ["predict", "--head", str(run.head), "--features", str(run.store), "--device", "cpu", str(image)]
    return CliRunner().invoke(transfer, args)


def resplit(run: Run, seed: int = 1) -> tuple[str, str]:
    """prepare again with another split seed, then extract (all from the cache): the manifest hashes before and
    after. The fingerprint, which says what computed the features, is the same."""
    before = read_attrs(run.store)
    write_manifest(build_manifest(run.root, 0.2, 0.2, seed=seed), run.manifest)
    extract(run.manifest, run.root, run.store, run.cache, TINY)
    after = read_attrs(run.store)
    assert after["fingerprint"] == before["fingerprint"]
    assert after["manifest_sha256"] != before["manifest_sha256"]
    return before["manifest_sha256"], after["manifest_sha256"]


def test_a_head_is_refused_by_every_reader_once_the_data_was_split_again(run, tmp_path):
    """Before: evaluate scored the head on test rows it had trained on (accuracy 1.0), exit 0."""
    old, new = resplit(run)
    message = one_line_error(predict(run))
    assert old[:16] in message and new[:16] in message and "rerun the head stage" in message

    warm = ["--manifest", str(run.manifest), "--head", str(run.head), "--features", str(run.store)]
    warm += ["--out", str(tmp_path / "layer.safetensors")]
    message = one_line_error(CliRunner().invoke(warm_start_stage, [*warm, "--params", str(run.params)]))
    assert old[:16] in message and new[:16] in message and "rerun the head stage" in message

    with pytest.raises(StoreError, match=rf"manifest {old[:16]}, but the feature store holds manifest {new[:16]}"):
        build_report([HeadFile("test_resnet", "logreg", run.head, run.store)], Answers(tmp_path), None, {}, ([], []))


def test_a_head_saved_before_heads_recorded_their_manifest_is_refused_with_retrain(run):
    """Before: a KeyError. Heads of older versions carry neither a checksum nor the manifest they were trained on."""
    arrays, attrs = load_arrays(run.head)
    del attrs["manifest_sha256"]
    save_arrays(run.head, arrays, attrs)
    with pytest.raises(StoreError, match=r"logreg\.h5: saved before heads recorded the split .*; rerun the head stage"):
        load_head(run.head)
    with h5py.File(run.head, "w") as f:  # as the old save_head wrote it: plain HDF5
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        f.attrs["schema_version"] = 1
        f.attrs.update({key: json.dumps(value) for key, value in attrs.items()})
    with pytest.raises(StoreError, match=r"logreg\.h5 was written by an older version .*; rerun the head stage") as err:
        load_head(run.head)
    assert "\n" not in str(err.value)


def zero(path: Path, start: int, count: int) -> None:
    with path.open("r+b") as f:
        f.seek(start)
        f.write(bytes(count))


def test_zeroed_bytes_in_a_head_file_stop_its_reader_in_one_line(run, tmp_path):
    """Before: evaluate reported another accuracy (0.8699 on the digits), exit 0."""
    with h5py.File(run.head, "r") as f:
        coefficients = f["clf.coef_"].id.get_chunk_info(0).byte_offset
    zero(run.head, coefficients + 64, 256)
    message = one_line_error(predict(run))
    assert str(run.head) in message and "rerun the head stage" in message


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_feature_store_stops_its_readers_in_one_line(run, tmp_path, damage):
    size = run.store.stat().st_size
    if damage == "zeroed":
        zero(run.store, size // 2, 256)
    else:
        with run.store.open("r+b") as f:
            f.truncate(size // 2)
    out = ["--out", str(tmp_path / "h.h5"), "--curve", str(tmp_path / "c.json"), "--metrics", str(tmp_path / "m")]
    args = ["--name", "logreg", "--features", str(run.store), *out, "--params", str(run.params)]
    message = one_line_error(CliRunner().invoke(head_stage, args))
    assert str(run.store) in message and "rerun extract" in message
    assert not (tmp_path / "m").exists() and not (tmp_path / "h.h5").exists()


def test_every_damaged_byte_of_a_head_or_a_store_is_caught(run):
    """Zero 32 bytes at every 128th offset: each load either fails with a one-line error (the seal: DamagedFile;
    HDF5's own checks: StoreError) or the bytes were zero already. Nothing in between: no wrong value, no hang, no
    crash (HDF5 is never handed damaged metadata)."""
    for path, load in ((run.head, load_head), (run.store, read_store)):
        original = path.read_bytes()
        for start in range(0, len(original), 128):
            if not any(original[start : start + 32]):
                continue
            zero(path, start, 32)
            with pytest.raises((DamagedFile, StoreError), match="damaged|truncated"):
                load(path)
            path.write_bytes(original)


def test_a_damaged_fine_tuned_model_is_one_line_error(run, tmp_path):
    params = replace(
        FinetuneParams(), epochs=1, init_head="random", augment=False, image_size=32, num_workers=0, device="cpu"
    )
    finetune(run.manifest, run.root, "test_resnet", params, tmp_path / "ft", tmp_path / "ckpt")
    weights = tmp_path / "ft" / "model.safetensors"
    zero(weights, weights.stat().st_size // 2, 4096)  # inside a tensor: the file still parses
    with pytest.raises(PipelineError, match=r"model\.safetensors .*damaged.*rerun finetune") as err:
        load_finetuned(tmp_path / "ft")
    assert "\n" not in str(err.value)
    image = next(run.root.glob("circle/*.png"))
    predict = ["predict", "--finetuned", str(tmp_path / "ft"), "--device", "cpu", str(image)]
    assert "rerun finetune" in one_line_error(CliRunner().invoke(transfer, predict))
    (tmp_path / "ft" / "SHA256SUMS").unlink()  # as models were saved before they carried checksums
    with pytest.raises(PipelineError, match=r"ft has no SHA256SUMS \(saved by an older version\); rerun finetune"):
        load_finetuned(tmp_path / "ft")


def test_a_large_file_is_hashed_once_in_a_process_until_it_changes(tmp_path, monkeypatch):
    """A stage opens its store several times; at 10^6 rows each hash costs seconds. The second check of the same
    intact file reads nothing; a byte changed since (its times with it) is caught; a small file is always hashed."""
    monkeypatch.setattr(integrity, "_checked", set())
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path, start=0: hashed.append(path) or real(path, start))
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    for path, size in ((big, integrity.REMEMBER_FROM_BYTES), (small, 4096)):
        with open(path, "wb") as raw:
            raw.truncate(SEAL_LINE + size)  # zeros, sparse: quick to write and to hash
        seal(path)
    hashed.clear()

    check_seal(big), check_seal(big), check_seal(small), check_seal(small)
    assert hashed == [big, small, small]

    before = big.stat()
    with open(big, "r+b") as raw:
        raw.seek(SEAL_LINE + 12345)
        raw.write(b"\x01")
    # The write moves its times, but maybe not past the clock's step: moved by hand, as any later write would.
    os.utime(big, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    with pytest.raises(DamagedFile, match="damaged or truncated"):
        check_seal(big)
    assert hashed[-1] == big and len(hashed) == 4
