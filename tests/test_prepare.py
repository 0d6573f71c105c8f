"""The prepare stage: bad files quarantined with their reason, layout mistakes as one-line errors, splits."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.data import manifest as dataset
from pipeline.data.images import REASONS, decode_rgb
from pipeline.data.manifest import (
    SPLITS,
    DataError,
    Manifest,
    build_manifest,
    cross_split_duplicates,
    scan,
    write_manifest,
    write_quarantine,
)
from stages.prepare import main as prepare_main
from tests import image_fixtures as fx
from tests.conftest import write_image_folder

FRACTIONS = {"val_fraction": 0.25, "test_fraction": 0.25}


def prepare(root: Path, seed: int = 0, **fractions: float) -> Manifest:
    return build_manifest(root, **{**FRACTIONS, **fractions}, seed=seed)


def split_of(manifest: Manifest) -> dict[str, str]:
    return {r.path: r.split for r in manifest.ok_rows()}


# --- bad input: every file decided deliberately, the run completes ---------------------------------


@pytest.fixture
def bad_root(tmp_path: Path) -> tuple[Path, dict[str, fx.Case]]:
    root = tmp_path / "raw"
    return root, fx.write_bad_input_root(root)


def test_each_fixture_is_kept_or_quarantined_with_its_reason(bad_root):
    root, cases = bad_root
    manifest = prepare(root)
    rows = {r.path: r for r in manifest.rows}
    for name, case in cases.items():
        row = rows[case.path]
        assert (row.status, row.reason) == (case.status, case.reason), name
        assert (row.split in SPLITS) == (case.status == "ok"), name  # quarantined rows get no split
    # Only unusable files are quarantined: everything else is ok, the generated good images included.
    bad = {c.path for c in cases.values() if c.status == "quarantined"}
    assert {r.path for r in manifest.quarantined()} == bad
    assert len(manifest.ok_rows()) == 2 * fx.GOOD_PER_CLASS + len(cases) - len(bad)


def test_each_readable_file_is_decoded_once(bad_root, monkeypatch):
    root, _ = bad_root
    decoded = []

    def counting_decode(data: bytes, *args):
        decoded.append(hashlib.sha256(data).hexdigest())
        return decode_rgb(data, *args)

    monkeypatch.setattr(dataset, "decode_rgb", counting_decode)
    manifest = prepare(root)
    never_read = ("unreadable", "empty_file", "not_a_file", "too_large", "outside_root", "bad_name")
    read = [r.sha256 for r in manifest.rows if r.reason not in never_read]
    assert sorted(decoded) == sorted(read)


def test_kept_fixtures_record_their_upright_size(bad_root):
    root, cases = bad_root
    rows = {r.path: r for r in prepare(root).rows}
    assert (rows[cases["exif_rotated_jpeg"].path].width, rows[cases["exif_rotated_jpeg"].path].height) == (16, 32)
    assert (rows[cases["one_pixel_png"].path].width, rows[cases["one_pixel_png"].path].height) == (1, 1)
    assert (rows[cases["gray16_png"].path].width, rows[cases["gray16_png"].path].height) == (len(fx.GRAY16), 1)


def test_quarantined_rows_say_what_went_wrong(bad_root):
    root, cases = bad_root
    rows = {r.path: r for r in prepare(root).rows}
    assert "truncated" in rows[cases["truncated_jpeg"].path].detail.lower()
    assert rows[cases["dangling_symlink"].path].detail.startswith("FileNotFoundError")
    assert rows[cases["dangling_symlink"].path].sha256 == ""  # nothing could be read to hash
    truncated = rows[cases["truncated_jpeg"].path]
    assert truncated.sha256 == hashlib.sha256((root / truncated.path).read_bytes()).hexdigest()


def test_hidden_files_and_empty_class_folders_are_neither_used_nor_quarantined(bad_root):
    root, _ = bad_root
    manifest = prepare(root)
    assert sorted(manifest.skipped) == sorted(fx.HIDDEN)
    assert not any(Path(r.path).name.startswith(".") or r.path.endswith("Thumbs.db") for r in manifest.rows)
    assert manifest.classes == ["cats", "dogs"]  # the empty folder is no class
    assert fx.EMPTY_CLASS not in {r.class_name for r in manifest.rows}


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file; the dangling symlink covers it")
def test_file_without_read_permission_is_quarantined_as_unreadable(bad_root):
    root, _ = bad_root
    locked = root / "dogs" / "locked.png"
    locked.write_bytes(fx.one_pixel_png())
    locked.chmod(0)
    row = next(r for r in prepare(root).rows if r.path == "dogs/locked.png")
    assert (row.status, row.reason) == ("quarantined", "unreadable")
    assert row.detail.startswith("PermissionError")


def test_stage_writes_counts_quarantine_list_and_leaves_the_data_root_untouched(bad_root, tmp_path: Path):
    root, cases = bad_root
    before = fx.snapshot(root)
    out = tmp_path / "out"
    result = run_stage(tmp_path, "--data", str(root), *stage_outputs(out))
    assert result.exit_code == 0, result.output

    assert fx.snapshot(root) == before  # same entries, bytes, link targets and mtimes
    metrics = json.loads((out / "prepare.json").read_text())
    bad = [c for c in cases.values() if c.status == "quarantined"]
    assert metrics["quarantined"] == len(bad)
    assert metrics["ok"] == 2 * fx.GOOD_PER_CLASS + len(cases) - len(bad)
    assert metrics["files"] == metrics["ok"] + metrics["quarantined"]
    assert metrics["skipped_hidden"] == len(fx.HIDDEN)
    assert metrics["classes"] == 2
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == metrics["ok"]
    reasons = Counter(c.reason for c in bad)
    assert {k: v for k, v in metrics.items() if k.startswith("quarantined_")} == {
        f"quarantined_{reason}": reasons.get(reason, 0) for reason in REASONS
    }
    with (out / "quarantine.csv").open(newline="") as f:
        listed = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert listed == {c.path: c.reason for c in bad}


# --- user errors: one line, before any file is decoded ---------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if a file is decoded: layout mistakes must be reported before that work."""

    def fail(*args, **kwargs):
        raise AssertionError("a file was decoded before the layout error was reported")

    monkeypatch.setattr(dataset, "decode_rgb", fail)


def test_missing_data_root(tmp_path: Path, no_decoding):
    with pytest.raises(DataError, match=r"data root .*nope does not exist or is not a directory"):
        prepare(tmp_path / "nope")


def test_a_single_class(tmp_path: Path, no_decoding):
    write_image_folder(tmp_path, {"cats": 8})
    (tmp_path / "dogs").mkdir()  # an empty folder is no class
    with pytest.raises(DataError, match=r"need at least two classes with images, found 1 \(cats\)"):
        prepare(tmp_path)


def test_two_classes_but_one_has_no_usable_images(tmp_path: Path):
    write_image_folder(tmp_path, {"cats": 8})
    (tmp_path / "dogs").mkdir()
    for i in range(8):
        (tmp_path / "dogs" / f"{i}.jpg").write_bytes(fx.text_file())
    with pytest.raises(DataError, match=r"need at least two classes with usable images, found 1 \(cats\)"):
        prepare(tmp_path)


def test_a_class_with_too_few_files_to_split(tmp_path: Path, no_decoding):
    write_image_folder(tmp_path, {"cats": 8, "dogs": 2})
    with pytest.raises(DataError, match=r"class 'dogs' has 2 image files: too few to split into train/val/test"):
        prepare(tmp_path)


def test_a_class_with_too_few_usable_images_to_split(tmp_path: Path):
    """Three files are enough to split, but one of them is broken; this is found after decoding."""
    write_image_folder(tmp_path, {"cats": 8, "dogs": 2})
    (tmp_path / "dogs" / "broken.jpg").write_bytes(fx.truncated_jpeg())
    with pytest.raises(DataError, match=r"class 'dogs' has 2 distinct usable images: too few .*\(at least 3\)"):
        prepare(tmp_path)


def test_a_class_in_val_but_not_in_train(tmp_path: Path, no_decoding):
    write_image_folder(tmp_path / "train", {"cats": 4, "dogs": 4})
    write_image_folder(tmp_path / "val", {"cats": 2, "birds": 2})
    with pytest.raises(DataError, match=r"class 'birds' is in val/ but not in train/"):
        prepare(tmp_path)


def test_split_folders_mixed_with_class_folders(tmp_path: Path, no_decoding):
    write_image_folder(tmp_path / "train", {"cats": 4, "dogs": 4})
    write_image_folder(tmp_path, {"birds": 4})
    with pytest.raises(DataError, match=r"mixes split folders \(train\) with other folders \(birds\)"):
        prepare(tmp_path)


def test_split_folders_without_train(tmp_path: Path, no_decoding):
    write_image_folder(tmp_path / "val", {"cats": 4, "dogs": 4})
    with pytest.raises(DataError, match=r"mixes split folders \(val\) with other folders \(no train/\)"):
        prepare(tmp_path)


def test_a_class_with_no_usable_train_images_in_a_kept_split(tmp_path: Path):
    write_image_folder(tmp_path / "train", {"cats": 4})
    (tmp_path / "train" / "dogs").mkdir()
    (tmp_path / "train" / "dogs" / "broken.jpg").write_bytes(fx.truncated_jpeg())
    write_image_folder(tmp_path / "val", {"cats": 2, "dogs": 2}, seed=1)
    write_image_folder(tmp_path / "test", {"cats": 2, "dogs": 2}, seed=2)
    with pytest.raises(DataError, match=r"class 'dogs' has no usable images in train/"):
        prepare(tmp_path)


# --- the stage's command line ------------------------------------------------------------------------


def stage_outputs(out: Path) -> list[str]:
    return [
        "--manifest",
        str(out / "manifest.csv"),
        "--quarantine",
        str(out / "quarantine.csv"),
        "--metrics",
        str(out / "prepare.json"),
    ]


def run_stage(tmp_path: Path, *args: str):
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  seed: 0\n  val_fraction: 0.25\n  test_fraction: 0.25\n")
    return CliRunner().invoke(prepare_main, [*args, "--params", str(params)])


def test_stage_reports_a_user_error_in_one_line_with_exit_code_1(tmp_path: Path):
    out = tmp_path / "out"
    result = run_stage(tmp_path, "--data", str(tmp_path / "missing"), *stage_outputs(out))
    assert result.exit_code == 1
    assert result.output.startswith("Error: data root ")
    assert result.output.count("\n") == 1  # one line
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing that looks like a result


def test_stage_reports_a_layout_mistake_in_one_line(tmp_path: Path):
    root = tmp_path / "raw"
    write_image_folder(root, {"cats": 8, "dogs": 2})
    result = run_stage(tmp_path, "--data", str(root), *stage_outputs(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("Error: class 'dogs' has 2 image files: too few to split")


# --- layouts and splits --------------------------------------------------------------------------


def test_flat_folder_is_split_stratified(image_folder: Path):
    manifest = prepare(image_folder)
    assert manifest.layout == "flat"
    per_class = Counter((r.class_name, r.split) for r in manifest.ok_rows())
    for cls in ("circle", "square", "triangle"):  # 12 images each: a quarter to val, a quarter to test
        assert (per_class[cls, "train"], per_class[cls, "val"], per_class[cls, "test"]) == (6, 3, 3)


def test_flat_split_is_seeded(image_folder: Path):
    first, again, other = (split_of(prepare(image_folder, seed=s)) for s in (0, 0, 1))
    assert first == again
    assert first != other
    assert first.keys() == other.keys()


def test_no_file_is_in_two_splits(image_folder: Path):
    manifest = prepare(image_folder)
    paths = [r.path for r in manifest.rows]
    assert len(paths) == len(set(paths)) == 36
    by_split = {s: {r.path for r in manifest.ok_rows() if r.split == s} for s in SPLITS}
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"])
    assert not by_split["val"] & by_split["test"]


def test_train_val_test_folders_are_kept_exactly(tmp_path: Path):
    for split, seed in zip(SPLITS, (0, 1, 2), strict=True):
        write_image_folder(tmp_path / split, {"cats": 3, "dogs": 3}, seed=seed)
    manifest = prepare(tmp_path)
    assert manifest.layout == "train+val+test"
    assert {r.path: r.split for r in manifest.rows} == {r.path: r.path.split("/")[0] for r in manifest.rows}
    assert len(manifest.ok_rows()) == 18


def test_train_val_folders_carve_val_from_train_and_use_the_folder_val_as_test(tmp_path: Path):
    """The hymenoptera layout (train/ and val/ only): the folder's val/ is the one held-out set, so it becomes
    test, scored once; val for choosing hyperparameters is carved from train/, seeded and stratified."""
    write_image_folder(tmp_path / "train", {"ants": 8, "bees": 8}, seed=0)
    write_image_folder(tmp_path / "val", {"ants": 3, "bees": 3}, seed=1)
    manifest = prepare(tmp_path)
    assert manifest.layout == "train+val"
    for row in manifest.ok_rows():
        folder = row.path.split("/")[0]
        assert row.split in (("train", "val") if folder == "train" else ("test",)), row
    per_class = Counter((r.class_name, r.split) for r in manifest.ok_rows())
    for cls in ("ants", "bees"):
        assert (per_class[cls, "train"], per_class[cls, "val"], per_class[cls, "test"]) == (6, 2, 3)


def test_hymenoptera_is_read_as_train_val(hymenoptera: Path):
    """Only the listing (no decoding): ../shared/datasets/hymenoptera has train/ and val/, ants and bees."""
    layout, files, skipped = scan(hymenoptera)
    assert layout == "train+val"
    assert {(split, cls) for _, cls, split in files} == {(s, c) for s in ("train", "val") for c in ("ants", "bees")}
    assert len(files) == 398


@pytest.mark.slow
def test_hymenoptera_prepares_with_its_val_folder_as_test(hymenoptera: Path):
    manifest = prepare(hymenoptera, val_fraction=0.15, test_fraction=0.15)
    assert manifest.quarantined() == []
    counts = manifest.counts()
    assert counts["n_test"] == 153  # the folder's val/: 70 ants + 83 bees
    assert counts["n_train"] + counts["n_val"] == 245


def test_several_processes_write_the_same_manifest_and_quarantine_byte_for_byte(
    image_folder: Path, tmp_path: Path, monkeypatch
):
    pools = []

    class CountedPool(dataset.ProcessPoolExecutor):
        def __init__(self, workers: int):
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(dataset, "ProcessPoolExecutor", CountedPool)
    (image_folder / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (image_folder / "square" / "empty.jpg").write_bytes(b"")
    written = {}
    for workers in (1, 2):
        manifest = build_manifest(image_folder, 0.2, 0.2, seed=3, num_workers=workers)
        write_manifest(manifest, tmp_path / f"manifest-{workers}.csv")
        write_quarantine(manifest, tmp_path / f"quarantine-{workers}.csv")
        written[workers] = [(tmp_path / f"{name}-{workers}.csv").read_bytes() for name in ("manifest", "quarantine")]
    assert pools == [2]  # one process alone decodes in place; two use a pool
    assert written[1] == written[2]
    assert b"broken.png" in written[2][1] and b"empty.jpg" in written[2][1]


# --- leak-proof splits: copies of one file never straddle two splits ---------------------------------


@pytest.mark.parametrize("seed", [4, 6])
def test_copies_of_one_file_always_share_a_carved_split(tmp_path: Path, seed: int):
    """Before: ten copies of one image, seeds 4 and 6, landed 4 in train, 3 in val, 3 in test."""
    write_image_folder(tmp_path, {"cats": 12, "dogs": 12})
    original = (tmp_path / "cats" / "cats_000.png").read_bytes()
    for k in range(10):
        (tmp_path / "cats" / f"copy_{k}.png").write_bytes(original)
    manifest = prepare(tmp_path, seed=seed)
    copies = [r for r in manifest.ok_rows() if r.sha256 == hashlib.sha256(original).hexdigest()]
    assert len(copies) == 11 and len({r.split for r in copies}) == 1
    assert manifest.cross_split_duplicates == 0


def _split_folders_with_a_copy_in_test(root: Path) -> str:
    write_image_folder(root / "train", {"cats": 4, "dogs": 4}, seed=0)
    write_image_folder(root / "val", {"cats": 2, "dogs": 2}, seed=1)
    write_image_folder(root / "test", {"cats": 2, "dogs": 2}, seed=2)
    copy = root / "test" / "cats" / "from_train.png"
    copy.write_bytes((root / "train" / "cats" / "cats_001.png").read_bytes())
    return "test/cats/from_train.png"


def test_a_file_copied_into_two_split_folders_stops_prepare_by_default(tmp_path: Path):
    """Before: the same file in train/ and test/ was accepted, and test accuracy became 1.0."""
    _split_folders_with_a_copy_in_test(tmp_path)
    match = r"1 files have an identical copy in another split, e\.g\. train/cats/cats_001\.png \(train\) and test/"
    with pytest.raises(DataError, match=match):
        prepare(tmp_path)


def test_warn_keeps_a_cross_split_copy_and_counts_it(tmp_path: Path, caplog):
    copy = _split_folders_with_a_copy_in_test(tmp_path)
    manifest = build_manifest(tmp_path, 0.25, 0.25, seed=0, on_cross_split_duplicate="warn")
    assert split_of(manifest)[copy] == "test"
    assert manifest.counts()["cross_split_duplicates"] == 1
    assert "1 files have an identical copy in another split" in caplog.text


def test_drop_from_test_quarantines_the_later_copy_and_says_which_it_duplicates(tmp_path: Path):
    copy = _split_folders_with_a_copy_in_test(tmp_path)
    manifest = build_manifest(tmp_path, 0.25, 0.25, seed=0, on_cross_split_duplicate="drop_from_test")
    row = next(r for r in manifest.rows if r.path == copy)
    assert (row.status, row.split, row.reason) == ("quarantined", "", "duplicate_across_splits")
    assert row.detail == "identical to train/cats/cats_001.png in train"
    assert split_of(manifest)["train/cats/cats_001.png"] == "train"
    counts = manifest.counts()
    assert (counts["cross_split_duplicates"], counts["quarantined_duplicate_across_splits"]) == (1, 1)
    assert len(cross_split_duplicates(manifest.rows)) == 0  # what remains is leak-free
