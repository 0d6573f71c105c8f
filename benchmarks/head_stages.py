"""What a head costs through DVC: wall time of its stages beside its own fit time, and the feature-extraction DAG.

    .venv/bin/python benchmarks/head_stages.py [--data ../shared/datasets/hymenoptera] [--repeats 3]

Copies the pipeline into a temporary git + DVC project with the photos as data/raw (params.yaml as it is: the
backbone at its own size, 224 px, which `image_size: auto` picks for photos), then prints:
- the wall time of `dvc repro` of prepare, extract, every head and every head's evaluation (fine-tuning, the
  curves and the report left out), on a fresh embedding cache, with extraction's own compute time beside it;
- for every head, the median wall time of `dvc repro -f -s head@<backbone>-<head>` (train, then score on the test split)
  over `--repeats` runs, beside the head's fit seconds (its grid search and refit, from its metrics);
- `dvc status` and `python -c "import torch"` on the same machine, the floor any stage sits on.
Wall times on a shared machine drift; the medians and the floors put them in proportion.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "hymenoptera"
# The feature-extraction half of the DAG: `dvc repro head` runs every head and everything upstream of them.
TARGETS = ("head",)


def timed(cwd: Path, *args: str) -> float:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def make_project(work: Path, data: Path) -> Path:
    """A copy of the pipeline in its own git and DVC repository, with `data` as data/raw."""
    project = work / "project"
    project.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project)
    shutil.copy(REPO / "params.yaml", project)
    shutil.copytree(data, project / "data" / "raw")
    dvc = [sys.executable, "-m", "dvc"]
    timed(project, "git", "init", "-q")
    timed(project, *dvc, "init", "-q")
    timed(project, *dvc, "config", "core.analytics", "false")
    timed(project, "git", "add", "-A")  # DVCLive, like `dvc exp`, starts from a commit
    timed(project, "git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "pipeline")
    return project


@click.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=DEFAULT_DATA, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
def main(data: Path, repeats: int) -> None:
    dvc = [sys.executable, "-m", "dvc"]
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp), data)
        params = yaml.safe_load((project / "params.yaml").read_text())
        heads, (backbone,) = list(params["heads"]), list(params["extract"]["backbones"])
        full = timed(project, *dvc, "repro", *TARGETS)
        extract = json.loads((project / "metrics" / "extract" / backbone / "details.json").read_text())
        click.echo(f"{data}: {extract['images']} images, {len(heads)} heads, python {sys.version.split()[0]}")
        click.echo(
            f"dvc repro (prepare, extract, {len(heads)} heads trained and scored): {full:.1f} s wall; "
            f"extraction compute {extract['compute_seconds']:.1f} s ({backbone} at {extract['image_size']} px)"
        )
        click.echo(f"{'head':<12} {'head@ stage s':>13} {'fit s':>7}")
        for head in heads:
            model = f"{backbone}-{head}"
            stage = statistics.median(
                timed(project, *dvc, "repro", "-f", "-s", f"head@{model}") for _ in range(repeats)
            )
            fit = json.loads((project / "metrics" / "models" / model / "details.json").read_text())["fit_seconds"]
            click.echo(f"{head:<12} {stage:>13.2f} {fit:>7.2f}")
        status = statistics.median(timed(project, *dvc, "status") for _ in range(repeats))
        torch = statistics.median(timed(project, sys.executable, "-c", "import torch") for _ in range(repeats))
        click.echo(f"floors: dvc status {status:.2f} s, python -c 'import torch' {torch:.2f} s (medians of {repeats})")


if __name__ == "__main__":
    main()
