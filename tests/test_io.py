"""The atomic writer: readers see the old file or folder or the new one, never a half-written one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.io import ConcurrentWriteError, atomic_folder, atomic_path, write_json


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


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_write(tmp_path: Path):
    """The state a kill leaves after the old folder was renamed aside and before the new one took its place."""
    target = tmp_path / "model"
    aside = tmp_path / f".model.{_dead_pid()}.0a1b2c3d.old"
    aside.mkdir()
    (aside / "weights").write_text("old")
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
        if Path(src).name.endswith(".tmp"):
            raise OSError("no space left")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="no space left"), atomic_folder(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_dead_writers_are_cleared_and_a_live_writers_are_not(tmp_path: Path):
    target = tmp_path / "store.h5"
    dead, live = tmp_path / f".store.h5.{_dead_pid()}.00000000.tmp", tmp_path / f".store.h5.{os.getpid()}.1.tmp"
    for leftover in (dead, live):
        leftover.write_text("half")
    write_json(target, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "store.h5"])


def test_two_processes_writing_one_file_at_once_both_succeed_and_one_copy_wins_whole(tmp_path: Path):
    """Each writer has its own temporary name: h5py's lock on a shared one made both fail."""
    target = tmp_path / "features.h5"
    script = (
        "import sys, time, h5py, numpy as np\n"
        "from pipeline.core.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp, h5py.File(tmp, 'w') as f:\n"
        "    f['x'] = np.full(100_000, int(sys.argv[2]))\n"
        "    time.sleep(1)\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(target), str(k)]) for k in (1, 2)]
    assert [w.wait() for w in writers] == [0, 0]
    import h5py

    with h5py.File(target) as f:
        values = set(f["x"][:].tolist())
    assert values in ({1}, {2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.h5"]


def test_folder_writers_one_after_the_other_both_succeed_and_the_last_wins_whole(tmp_path: Path):
    target = tmp_path / "model"
    first, second = atomic_folder(target), atomic_folder(target)
    a, b = first.__enter__(), second.__enter__()
    (a / "weights").write_text("a")
    (b / "weights").write_text("b")
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert (target / "weights").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_folder_landing_between_a_writers_two_renames_wins_and_the_writer_fails_in_one_line(tmp_path, monkeypatch):
    target = tmp_path / "model"
    real_replace = os.replace

    def replace(src, dst):
        try:
            real_replace(src, dst)
        finally:
            if Path(src) == target and not target.exists():  # another writer's folder lands right now
                target.mkdir()
                (target / "weights").write_text("theirs")

    monkeypatch.setattr(os, "replace", replace)
    match = "model was replaced by another process meanwhile"
    with pytest.raises(ConcurrentWriteError, match=match), atomic_folder(target) as tmp:
        (tmp / "weights").write_text("ours")
    assert (target / "weights").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
