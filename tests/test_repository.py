"""What the repository holds: no output of an old layout lingers among the outputs DVC tracks."""

import subprocess

import yaml

from tests.conftest import REPO


def _outputs() -> list[str]:
    """Every output path dvc.lock records (foreach and matrix stages expanded)."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    return [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]


def test_every_metrics_and_report_file_in_git_is_an_output_of_a_stage():
    """A file under metrics/ or reports/ that no stage writes is a leftover of an older layout: `dvc metrics show`
    would still list it, and a stage depending on its folder would hash it."""
    tracked = subprocess.run(
        ["git", "ls-files", "metrics", "reports"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    outputs = _outputs()
    stale = [f for f in tracked if not any(f == out or f.startswith(out.rstrip("/") + "/") for out in outputs)]
    assert not stale, f"in git but written by no stage (git rm them): {stale}"
