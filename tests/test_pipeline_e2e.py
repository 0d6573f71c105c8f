"""End to end: the real `dvc repro` in a temporary copy of the repository, then a head-only change."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.io import read_record
from pipeline.results.metrics import SCORE_KEYS
from tests.conftest import REPO, write_image_folder

pytestmark = pytest.mark.integration  # the full tier: make test-all


def sh(cwd: Path, *args: str) -> str:
    env_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={"PATH": env_path, "HOME": str(cwd)})
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the repository with its own git and DVC, a tiny ImageFolder and a tiny backbone."""
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["extract"].update(backbones={"test_resnet": {"image_size": 32}}, num_workers=0, batch_size=16)
    params["finetune"].update(backbone="test_resnet", epochs=1, num_workers=0, batch_size=8, init_head="random")
    # A second logistic head that nothing else depends on (the fine-tune stage warm-starts from `logreg`).
    params["heads"]["probe"] = {"kind": "logreg", "grid": {"C": [1.0]}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_image_folder(repo / "data" / "raw", {"cat": 10, "dog": 10, "fox": 10})
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "ci@example.com")
    sh(repo, "git", "config", "user.name", "ci")
    dvc(repo, "init", "-q")
    shutil.copy(REPO / ".dvcignore", repo)  # the stages' bytecode is not their code: without it, nothing is up to date
    dvc(repo, "config", "core.analytics", "false")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "the pipeline")  # DVCLive, like `dvc exp`, needs a commit to start from
    return repo


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_then_head_change_reruns_only_the_head(project: Path):
    first = dvc(project, "repro")
    heads = set(yaml.safe_load((project / "params.yaml").read_text())["heads"])
    assert stages_run(first) == {
        "check_params",
        "prepare",
        "extract@test_resnet",
        "warm_start",
        "finetune",
        "evaluate_finetune",
        "finetune_wise",
        "learning_curve",
        "finetune_curve",
        "audit",
        "report",
        "export",
        *(f"head@test_resnet-{h}" for h in heads),
    }
    assert "Recommendation" in (project / "reports" / "strategy.md").read_text()
    audit = json.loads((project / "metrics" / "audit.json").read_text())
    assert audit["cross_split_exact_pairs"] == 0 and "misclassified_finetune" in audit
    assert (project / "reports" / "audit" / "label_issues.png").is_file()
    assert (project / "reports" / "summary.txt").read_text().startswith("Feature extraction or fine-tuning?")
    for model in ("test_resnet-logreg", "test_resnet-probe", "finetune", "finetune-wise"):
        metrics = read_record(project / "metrics" / "models" / model)
        assert metrics["n_test"] == 6 and metrics["model"] == model
        # The confusion plot holds one record per test image, and the accuracy is the share on its diagonal.
        confusion = json.loads(
            (project / "metrics" / "models" / model / "plots" / "sklearn" / "confusion.json").read_text()
        )
        assert len(confusion) == 6
        assert metrics["accuracy"] == sum(r["actual"] == r["predicted"] for r in confusion) / 6
    wise = json.loads((project / "metrics" / "finetune_wise" / "curve.json").read_text())
    assert [p["alpha"] for p in wise] == [i / 10 for i in range(11)] and "| finetune-wise |" in (
        project / "reports" / "strategy.md"
    ).read_text()
    epochs = (project / "metrics" / "finetune" / "plots" / "metrics" / "val_loss.tsv").read_text().splitlines()
    assert epochs[0].split("\t") == ["step", "val_loss"] and len(epochs) == 2  # header and the one epoch
    extracted = read_record(project / "metrics" / "extract" / "test_resnet")
    assert extracted["computed"] == 30 and extracted["image_size"] == 32 and np.isfinite(extracted["logme"])
    # The head chosen on val and the fine-tuned network, each checked on the 6 test images against PyTorch.
    parity = json.loads((project / "metrics" / "export.json").read_text())
    assert "finetune" in parity and len(parity) == 2 and all(p["top1_agreement"] == 1.0 for p in parity.values())
    assert sorted(p.name for p in (project / "data" / "export").iterdir()) == sorted(f"{m}.onnx" for m in parity)
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")

    assert "Data and pipelines are up to date" in dvc(project, "repro")

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["heads"]["probe"]["grid"]["C"] = [1e-6]  # heavy regularisation: near-uniform probabilities
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = dvc(project, "repro")
    # That head (trained and scored), the learning curve (drawn for the chosen head among all of them), the audit
    # (which lists the chosen head's mistakes), the report that compares every model, and the export (which head
    # is chosen may change); nothing upstream.
    assert stages_run(second) == {
        "check_params",
        "head@test_resnet-probe",
        "learning_curve",
        "audit",
        "report",
        "export",
    }
    assert "Stage 'extract@test_resnet' didn't change, skipping" in second

    diff = json.loads(dvc(project, "metrics", "diff", "--json"))
    changed = diff["metrics/models/test_resnet-probe/metrics.json"]
    assert changed["log_loss"]["old"] != changed["log_loss"]["new"]
    assert set(diff) == {"metrics/models/test_resnet-probe/metrics.json"} and set(changed) <= set(SCORE_KEYS)
    assert read_record(project / "metrics" / "models" / "test_resnet-probe")["hyperparameters"]["C"] == 1e-6

    # Fine-tuning starts from random weights (init_head: random): a new logistic head does not rerun it. The
    # warm_start stage reruns (DVC has no conditional dependency) and writes the same bytes, so DVC stops there.
    params["heads"]["logreg"]["grid"]["C"] = [0.5]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_run(dvc(project, "repro"))
    assert {"head@test_resnet-logreg", "warm_start"} <= ran
    assert not ran & {"finetune", "evaluate_finetune", "finetune_curve", "extract@test_resnet"}

    # With init_head: logreg the warm start is the logistic head, so a new head does rerun fine-tuning.
    params["finetune"]["init_head"] = "logreg"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert {"warm_start", "finetune", "evaluate_finetune"} <= stages_run(dvc(project, "repro"))
    params["heads"]["logreg"]["grid"]["C"] = [0.25]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert {"head@test_resnet-logreg", "warm_start", "finetune"} <= stages_run(dvc(project, "repro"))

    # The learning curve is its own stage: DVC knows what a change to it makes stale, and reruns only that.
    params["learning_curve"]["seeds"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(dvc(project, "status", "--json"))) == {"check_params", "learning_curve"}
    # (The report follows only if the curve's numbers moved: on these easy images every subset may score 1.0.)
    assert {"learning_curve"} <= stages_run(dvc(project, "repro")) <= {"check_params", "learning_curve", "report"}

    # How images are decoded is not what they are: extract reruns, reuses every embedding and writes the same
    # bytes, so DVC reruns nothing downstream of the store; only the report, which reads the extraction
    # metrics, and quotes the same extraction cost as before (recorded in the cache, not re-timed).
    cost = read_record(project / "metrics" / "extract" / "test_resnet")["extraction_seconds"]
    params["extract"].update(loader="workers", num_workers=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc(project, "repro")
    assert stages_run(third) == {"check_params", "extract@test_resnet", "report"}
    extraction = read_record(project / "metrics" / "extract" / "test_resnet")
    assert (extraction["reused"], extraction["extraction_seconds"]) == (30, cost)

    # A second backbone adds its extract stage and its heads; nothing that exists reruns, only what compares every
    # model or follows the chosen one (learning curve, audit, report, export). Fine-tuning stays on test_resnet.
    params["extract"]["backbones"]["tiny_effnet"] = {"backbone": "test_efficientnet", "image_size": 32}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_run(dvc(project, "repro"))
    added = {"extract@tiny_effnet", *(f"head@tiny_effnet-{h}" for h in heads)}
    assert added <= ran and ran - added <= {"check_params", "learning_curve", "audit", "report", "export"}
    report = (project / "reports" / "strategy.md").read_text()
    assert "| tiny_effnet | test_efficientnet | 32 |" in report and "| test_resnet | test_resnet | 32 |" in report
    assert "Spearman rank correlation of the two over 2 backbones" in report
    assert "| tiny_effnet-logreg |" in report and "| test_resnet-logreg |" in report
    shown = dvc(project, "metrics", "show")
    assert "metrics/extract/tiny_effnet/metrics.json" in shown and "logme" in shown
    assert max(len(line) for line in shown.splitlines()) <= 200


def test_a_params_mistake_stops_dvc_repro_in_one_line_before_any_output_is_deleted(project: Path):
    """DVC deletes a stage's outputs just before running it: before, `batch_size: -4` then `dvc repro extract`
    left no feature store, and a head-kind typo deleted the head and its validation curve."""
    dvc(project, "repro", "head@test_resnet-probe")
    kept = {
        path: (project / path).read_bytes()
        for path in (
            "data/features/test_resnet.h5",
            "data/heads/test_resnet/probe.h5",
            "metrics/val_curve/test_resnet-probe.json",
        )
    }
    good = (project / "params.yaml").read_text()
    for mistake, target, message in (
        (("extract", "batch_size", -4), "extract@test_resnet", "extract.batch_size must be >= 1; got -4"),
        (("heads", "probe", {"kind": "logregg"}), "head@test_resnet-probe", "heads.probe.kind: unknown head 'logregg'"),
    ):
        params = yaml.safe_load(good)
        section, key, value = mistake
        params[section][key] = value
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env_path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", target],
            cwd=project,
            capture_output=True,
            text=True,
            env={"PATH": env_path, "HOME": str(project)},
        )
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
        assert stages_run(done.stdout) == {"check_params"}
        for path, data in kept.items():
            assert (project / path).read_bytes() == data, f"{path} changed after {mistake}"
    (project / "params.yaml").write_text(good)
    assert stages_run(dvc(project, "repro", "head@test_resnet-probe")) <= {"check_params"}
