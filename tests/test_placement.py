"""`transfer init`: a user's ImageFolder put at data/raw (hard links or copies), never mixed with the sample or with
other images, its source never written, versioned by `dvc add` in a real git + DVC repository."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import DATA_ROOT, main
from pipeline.core.errors import DataError
from pipeline.data.manifest import build_manifest
from pipeline.data.placement import SAMPLE_MARKER, holds_sample, place_images
from pipeline.data.sample import write_digits
from tests.conftest import REPO, write_image_folder


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int]]:
    """Every entry under root: content hash (files), mode, mtime and inode, to prove nothing there was written."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[path.relative_to(root).as_posix()] = (digest, st.st_mode, st.st_mtime_ns, st.st_ino)
    return found


def contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """The bundled sample as `transfer sample digits` writes it (copied by the tests that change it)."""
    root = tmp_path_factory.mktemp("sample") / "raw"
    write_digits(root)
    return root


def test_the_sample_is_marked_and_prepare_skips_the_marker(sample: Path, tmp_path: Path):
    assert holds_sample(sample)
    assert (sample / SAMPLE_MARKER).is_file()
    manifest = build_manifest(sample, 0.15, 0.15, seed=0)
    assert len(manifest.rows) == 1797 and manifest.skipped == [SAMPLE_MARKER]
    assert all(SAMPLE_MARKER not in row.path for row in manifest.rows)
    # The sample with one photo added by hand is the user's data: never replaced without being asked.
    changed = tmp_path / "raw"
    shutil.copytree(sample, changed)
    write_image_folder(changed, {"cat": 1})
    assert not holds_sample(changed)
    assert not holds_sample(tmp_path / "nowhere")


def test_images_are_hard_linked_in_place_and_the_source_is_not_written(image_folder: Path, tmp_path: Path):
    before = snapshot(image_folder)
    dest = tmp_path / "project" / "data" / "raw"
    placed = place_images(image_folder, dest)
    assert (placed.images, placed.classes, placed.layout) == (36, 3, "flat")
    assert (placed.linked, placed.copied, placed.found) == (36, 0, "")
    assert contents(dest) == contents(image_folder)
    assert all(os.path.samefile(dest / rel, image_folder / rel) for rel in contents(dest))
    assert snapshot(image_folder) == before
    assert [p.name for p in dest.parent.iterdir()] == ["raw"]  # no staging folder left beside it


def test_copies_when_asked_or_across_filesystems(image_folder: Path, tmp_path: Path):
    placed = place_images(image_folder, tmp_path / "copied", link=False)
    assert (placed.linked, placed.copied) == (0, 36)
    assert contents(tmp_path / "copied") == contents(image_folder)
    assert not os.path.samefile(
        tmp_path / "copied" / "circle" / "circle_000.png", image_folder / "circle/circle_000.png"
    )
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to copy across")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        write_image_folder(other, {"a": 2, "b": 2})
        placed = place_images(other, tmp_path / "across")  # a hard link cannot cross filesystems: copied
        assert (placed.linked, placed.copied) == (0, 4)
        assert contents(tmp_path / "across") == contents(other)
    finally:
        shutil.rmtree(other)


def test_the_sample_is_replaced_whole(sample: Path, image_folder: Path, tmp_path: Path):
    dest = tmp_path / "data" / "raw"
    shutil.copytree(sample, dest)
    placed = place_images(image_folder, dest)
    assert placed.found == "the bundled sample"
    assert contents(dest) == contents(image_folder)  # no digit, no marker left: never mixed


def test_other_images_are_replaced_only_with_force(tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    write_image_folder(first, {"cat": 3, "dog": 3}, seed=1)
    write_image_folder(second, {"ant": 3, "bee": 3}, seed=2)
    dest = tmp_path / "raw"
    place_images(first, dest)
    with pytest.raises(
        DataError,
        match=r"raw holds 6 files, neither the bundled sample nor .*`transfer init --force .*second` replaces them",
    ):
        place_images(second, dest)
    assert contents(dest) == contents(first)
    before = snapshot(first)
    placed = place_images(second, dest, force=True)
    assert placed.found == "other images"
    assert contents(dest) == contents(second)
    assert snapshot(first) == before  # unlinking its hard links left the first folder as it was


def test_the_same_images_are_kept_as_they_are(image_folder: Path, tmp_path: Path):
    dest = tmp_path / "data" / "raw"
    place_images(image_folder, dest, link=False)
    before = snapshot(dest)
    placed = place_images(image_folder, dest)  # `make run DATA=PATH` twice: nothing to do
    assert (placed.found, placed.linked, placed.copied, placed.images) == ("the same images", 0, 0, 36)
    assert snapshot(dest) == before


def test_split_folders_and_what_is_not_an_image_folder_entry(tmp_path: Path):
    source = tmp_path / "photos"
    write_image_folder(source / "train", {"ant": 4, "bee": 4})
    write_image_folder(source / "val", {"ant": 2, "bee": 2}, seed=3)
    (source / "train" / "ant" / ".DS_Store").write_bytes(b"junk")
    (source / "notes.txt").write_text("not in a class folder")
    os.mkfifo(source / "train" / "bee" / "pipe.png")
    placed = place_images(source, tmp_path / "raw")
    assert (placed.layout, placed.images, placed.not_files) == ("train+val", 12, ("train/bee/pipe.png",))
    assert sorted(contents(tmp_path / "raw")) == sorted(
        rel for rel in contents(source) if rel.startswith(("train/", "val/")) and not rel.endswith(".DS_Store")
    )


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", r"photos: no such folder"),
        ("file", r"photos is a file; give the folder that holds one folder of images per class"),
        ("empty", r"photos: no images in class folders"),
        ("loose", r"photos: no images in class folders"),
        ("one class", r"photos: one class folder \(cat\); at least two are needed"),
        ("mixed", r"photos: mixes split folders \(train\) with other folders \(cat\)"),
        ("inside", r"photos and .*raw overlap; give a folder of images outside"),
        ("around", r"photos and .*raw overlap"),
    ],
)
def test_a_source_that_is_not_an_image_folder_is_one_error(tmp_path: Path, layout: str, message: str):
    source, dest = tmp_path / "photos", tmp_path / "raw"
    if layout == "file":
        source.write_bytes(b"x")
    elif layout == "empty":
        source.mkdir()
    elif layout == "loose":
        write_image_folder(tmp_path, {"photos": 3})  # images, but no class folder
    elif layout == "one class":
        write_image_folder(source, {"cat": 3})
    elif layout == "mixed":
        write_image_folder(source, {"cat": 2})
        write_image_folder(source / "train", {"cat": 2, "dog": 2})
    elif layout == "inside":
        write_image_folder(tmp_path / "raw" / "photos", {"cat": 2, "dog": 2})
        source = dest / "photos"
    elif layout == "around":
        write_image_folder(source, {"cat": 2, "dog": 2})
        dest = source / "data" / "raw"
    with pytest.raises(DataError, match=message):
        place_images(source, dest)
    assert not (tmp_path / "raw").exists() or layout == "inside"


def test_the_data_root_is_the_one_prepare_reads():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert f"--data {DATA_ROOT.as_posix()} " in stages["prepare"]["cmd"]
    assert DATA_ROOT.as_posix() in stages["prepare"]["deps"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def dvc(cwd: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An empty git + DVC repository."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    return root


def test_transfer_init_versions_the_images_with_dvc_add(repo: Path, tmp_path: Path, monkeypatch):
    photos = tmp_path / "photos"
    write_image_folder(photos, {"ant": 3, "bee": 3}, fmt="jpg")
    before = snapshot(photos)
    # With DVC's hardlink cache, a plain `dvc add` would make the linked files the read-only cache: PATH's own.
    dvc(repo, "config", "cache.type", "hardlink")
    (repo / "data").mkdir()
    monkeypatch.chdir(repo / "data")  # anywhere inside the repository
    result = CliRunner().invoke(main, ["init", str(photos)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        f"data/raw: 6 images of 2 classes (flat layout) from {photos}, as hard links to the files there (no second "
        "copy on disk)"
    )
    assert lines[1].startswith("dvc add data/raw: data/raw.dvc pins these images")
    assert lines[2:] == [
        "Next:",
        "  dvc repro                                  # the pipeline on these images",
        "  git commit -m 'Data: photos'               # the commit names the images its results came from",
        "  dvc remote add -d storage URL && dvc push  # share the images, once you have a remote",
    ]
    assert snapshot(photos) == before  # modes included: not turned into DVC's read-only cache
    assert all(os.path.samefile(repo / "data/raw" / rel, photos / rel) for rel in contents(photos))
    assert yaml.safe_load((repo / "data/raw.dvc").read_text())["outs"][0]["nfiles"] == 6
    assert set(git(repo, "diff", "--cached", "--name-only").split()) >= {"data/raw.dvc", "data/.gitignore"}
    status = git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    assert not [line for line in status if "data/raw/" in line]  # the images: ignored by git
    assert "up to date" in dvc(repo, "status")

    again = CliRunner().invoke(main, ["init", str(photos)])
    assert again.exit_code == 0, again.output
    assert again.output.startswith(f"data/raw already holds the 6 images of 2 classes (flat layout) from {photos}")


def test_transfer_init_errors_are_one_line(repo: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outside = CliRunner().invoke(main, ["init", "photos"])
    assert outside.exit_code == 1
    assert outside.output == f"Error: {tmp_path} is not inside a DVC repository; run this in the project's folder\n"
    monkeypatch.chdir(repo)
    missing = CliRunner().invoke(main, ["init", "photos"])
    assert (missing.exit_code, missing.output) == (1, "Error: photos: no such folder\n")
    (repo / "data" / "raw" / "cat").mkdir(parents=True)
    (repo / "data" / "raw" / "cat" / "mine.jpg").write_bytes(b"a photo of mine")
    write_image_folder(tmp_path / "photos", {"ant": 2, "bee": 2})
    refused = CliRunner().invoke(main, ["init", str(tmp_path / "photos")])
    assert refused.exit_code == 1 and len(refused.output.splitlines()) == 1
    assert re.match(r"Error: data/raw holds 1 file, neither the bundled sample nor the images of", refused.output)
    assert (repo / "data" / "raw" / "cat" / "mine.jpg").read_bytes() == b"a photo of mine"
