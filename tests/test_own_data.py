"""The user's images versioned by DVC, in real git + DVC repositories: a commit brings back the images its results
came from (`git checkout` + `dvc checkout`), and queued experiments (`dvc exp run --queue`, `dvc queue start`) run
on the sample that `make run` writes and tracks, reusing its extraction."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import REPO, write_image_folder
from tests.test_pipeline_e2e import dvc, sh  # commands as a user types them
from tests.test_placement import contents, snapshot

pytestmark = pytest.mark.integration  # the full tier: make test-all

# One head: the logistic one, which check_params asks for (fine-tuning's warm start reads it), on one C chosen on val
# (no cross-validation: one point has nothing to choose from).
HEADS = {"logreg": {"kind": "logreg", "grid": {"C": [1.0]}, "selection": "val"}}


def transfer(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def project(root: Path, backbones: dict, heads: dict, stages: tuple[str, ...]) -> Path:
    """A copy of the repository (its .gitignore and .dvcignore too) with the stages named, on the backbones and heads
    given, in its own git and DVC repository: committed, nothing in data/raw."""
    root.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root)
    dag = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: dag["stages"][s] for s in stages}}, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["extract"].update(backbones=backbones, num_workers=0, batch_size=64, device="cpu")
    params["evaluate"]["bootstrap_resamples"] = 200
    params["finetune"]["backbone"] = next(iter(backbones))
    params["heads"] = heads
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "config", "user.email", "ci@example.com")
    sh(root, "git", "config", "user.name", "ci")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "the pipeline")
    return root


def commit(repo: Path, message: str) -> str:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)
    return sh(repo, "git", "rev-parse", "HEAD").strip()


def manifest_paths(repo: Path) -> list[str]:
    lines = (repo / "data/prepared/manifest.csv").read_text().splitlines()
    column = lines[0].split(",").index("path")
    return sorted(line.split(",")[column] for line in lines[1:])


def test_a_commit_brings_back_the_images_its_results_came_from(tmp_path: Path, monkeypatch):
    first, second = tmp_path / "photos-may", tmp_path / "photos-june"
    write_image_folder(first, {"ant": 10, "bee": 10}, size=48, seed=1, fmt="jpg")
    # The same names with other pixels, and a third class: only the bytes tell the two versions apart.
    write_image_folder(second, {"ant": 10, "bee": 10, "wasp": 10}, size=48, seed=2, fmt="jpg")
    originals = {first: snapshot(first), second: snapshot(second)}
    repo = project(
        tmp_path / "project", {"efficientnet_lite0": {"image_size": 64}}, HEADS, ("check_params", "prepare", "extract")
    )
    monkeypatch.chdir(repo)

    assert "as hard links" in transfer("init", str(first))
    assert "Running stage 'extract@efficientnet_lite0'" in dvc(repo, "repro")
    may = commit(repo, "Data: photos-may")
    assert "replacing other images" in transfer("init", "--force", str(second))
    dvc(repo, "repro")
    commit(repo, "Data: photos-june")
    assert contents(repo / "data/raw") == contents(second)
    assert "wasp/wasp_000.jpg" in manifest_paths(repo)

    sh(repo, "git", "checkout", "-q", may)
    dvc(repo, "checkout")
    assert contents(repo / "data/raw") == contents(first)  # the same names and bytes, nothing of June's
    assert manifest_paths(repo) == sorted(contents(first))
    assert "Data and pipelines are up to date." in dvc(repo, "status")
    again = dvc(repo, "repro")
    assert "Running stage" not in again and "Data and pipelines are up to date." in again
    assert {folder: snapshot(folder) for folder in originals} == originals  # the user's folders: never written


def queue_status(repo: Path) -> dict[str, str]:
    """Experiment name -> Queued, Running, Success or Failed, from `dvc queue status`."""
    rows = [line.split() for line in dvc(repo, "queue", "status").splitlines()[1:]]
    return {row[1]: row[-1] for row in rows if len(row) >= 3 and row[-1] in ("Queued", "Running", "Success", "Failed")}


def test_queued_experiments_run_on_the_tracked_sample_and_reuse_its_extraction(tmp_path: Path, monkeypatch):
    repo = project(
        tmp_path / "project",
        {"test_resnet": {"image_size": 32}},
        HEADS,
        ("check_params", "prepare", "extract", "head"),
    )
    monkeypatch.chdir(repo)
    # What plain `make run` does in a fresh clone, then a commit: the experiments start from it.
    transfer("sample", "digits", "data/raw")
    dvc(repo, "add", "--quiet", "data/raw")
    assert "Running stage 'extract@test_resnet'" in dvc(repo, "repro")
    commit(repo, "the sample, run")

    names = {"c-0.1": "[0.1]", "c-0.01": "[0.01]"}
    for name, grid in names.items():
        dvc(repo, "exp", "run", "--queue", "-n", name, "-S", f"heads.logreg.grid.C={grid}")
    try:
        dvc(repo, "queue", "start")
        deadline = time.monotonic() + 600
        while set(queue_status(repo).values()) - {"Success", "Failed"} and time.monotonic() < deadline:
            time.sleep(5)
        status = queue_status(repo)
        logs = {name: dvc(repo, "queue", "logs", name) for name in names}
        assert status == dict.fromkeys(names, "Success"), f"{status}\n" + "\n".join(logs.values())
    finally:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "stop"], cwd=repo, capture_output=True)

    for name, log in logs.items():
        # The features came from the baseline's run (restored from DVC's cache): extraction did not run again.
        assert "Stage 'extract@test_resnet' didn't change, skipping" in log, log
        assert "Running stage 'extract@test_resnet'" not in log and "Running stage 'prepare'" not in log, log
        assert "Running stage 'head@test_resnet-logreg'" in log, f"{name}: {log}"

    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                if rev.get("name") in names:
                    data = rev["data"]
                    grid = data["params"]["params.yaml"]["data"]["heads"]["logreg"]["grid"]["C"]
                    scores = data["metrics"]["metrics/models/test_resnet-logreg/metrics.json"]["data"]
                    found[rev["name"]] = (grid, scores["accuracy"])
    assert sorted(found) == sorted(names), json.dumps(shown, indent=1)[:4000]
    assert [found[name][0] for name in names] == [[0.1], [0.01]]
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy in found.values())
