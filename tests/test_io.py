"""The atomic writer: readers see the old file or folder or the new one, never a half-written one."""

import os
from pathlib import Path

import pytest

from pipeline.io import atomic_folder, atomic_path, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "out" / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "accuracy": 0.5\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_folder_is_replaced_whole(tmp_path: Path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_folder(target) as tmp:
        (tmp / "weights").write_text("new")
        (tmp / "config.json").write_text("{}")
        assert not (target / "weights").exists()  # nothing visible until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path: Path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(OSError), atomic_folder(target) as tmp:
        (tmp / "weights").write_text("new")
        raise OSError("disk full")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_write(tmp_path: Path):
    """The state a kill leaves after the old folder was renamed aside and before the new one took its place."""
    target = tmp_path / "model"
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "weights").write_text("old")
    with pytest.raises(OSError), atomic_folder(target):
        assert (target / "weights").read_text() == "old"  # put back before anything else
        raise OSError("disk full")
    assert (target / "weights").read_text() == "old"


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path: Path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name == ".model.tmp":
            raise OSError("no space left")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="no space left"), atomic_folder(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
