"""What the repository holds: no output of an old layout lingers among the outputs DVC tracks."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.features.extraction import METRIC_KEYS
from pipeline.results.metrics import SCORE_KEYS
from tests.conftest import REPO


def _outputs() -> list[str]:
    """Every output path dvc.lock records (foreach and matrix stages expanded)."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    return [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]


def _tracked(*folders: str) -> list[str]:
    return subprocess.run(
        ["git", "ls-files", *folders], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()


def test_every_metrics_and_report_file_in_git_is_an_output_of_a_stage():
    """A file under metrics/ or reports/ that no stage writes is a leftover of an older layout: `dvc metrics show`
    would still list it, and a stage depending on its folder would hash it."""
    tracked = _tracked("metrics", "reports")
    outputs = _outputs()
    stale = [f for f in tracked if not any(f == out or f.startswith(out.rstrip("/") + "/") for out in outputs)]
    assert not stale, f"in git but written by no stage (git rm them): {stale}"


def test_dvc_metrics_show_of_the_committed_sample_fits_a_terminal_and_holds_only_scores(tmp_path: Path):
    """DVC's own table of the sample's committed metrics: each model's scores with their intervals and each backbone's
    LogME, in at most 200 columns; the choices, timings and counts beside them (details.json) are not in it."""
    tracked = _tracked("metrics")
    for name in ("dvc.yaml", "params.yaml", *tracked):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "show"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 200, done.stdout
    assert lines[0].split() == ["Path", *sorted({*SCORE_KEYS, *METRIC_KEYS})]
    models = [f for f in tracked if f.startswith("metrics/models/") and f.endswith("/metrics.json")]
    assert "metrics/models/finetune/metrics.json" in models and len(models) >= 2
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(
        models + [f for f in tracked if f.startswith("metrics/extract/") and f.endswith("/metrics.json")]
    )
