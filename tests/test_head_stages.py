"""A head's stages score cached features without torch: starting Python is most of what they cost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import HeadParams
from pipeline.core.errors import PipelineError
from pipeline.core.io import read_record
from pipeline.features.store import SPLIT_CODES, read_store, write_store
from pipeline.finetuning.live import log_epochs
from pipeline.heads.selection import train_head
from pipeline.results.metrics import SCORE_KEYS, read_predictions
from pipeline.results.scoring import train_accuracy
from tests.conftest import REPO, make_store

# Runs one stage's click command in this process, then reports which of the heavy modules it imported: the
# networks' libraries, and DVC's repository (which DVCLive opens to start a session).
PROBE = """
import importlib, json, sys
stage = importlib.import_module(sys.argv[1])
stage.main(sys.argv[2:], standalone_mode=False)
print(json.dumps([m for m in ("torch", "torchvision", "timm", "dvclive", "dvc.repo") if m in sys.modules]))
"""


def tiny_store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 15)
    split = np.tile([SPLIT_CODES["train"]] * 3 + [SPLIT_CODES["val"], SPLIT_CODES["test"]], 6)
    features = (rng.normal(size=(30, 8)) + labels[:, None] * 3).astype(np.float32)
    write_store(
        path,
        labels=labels,
        split=split,
        paths=[f"{i}.png" for i in range(30)],
        sha256=["0" * 64] * 30,
        feature_chunks=iter([features]),
        feature_dim=8,
        attrs={"classes": ["ant", "bee"], "fingerprint": "f", "backbone": "test_resnet", "image_size": 32},
    )
    return path


def run_stage(module: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, module, *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_head_stage_imports_no_torch(tmp_path: Path):
    store = tiny_store(tmp_path / "features.h5")
    params = tmp_path / "params.yaml"
    params.write_text("heads:\n  logreg:\n    kind: logreg\n    grid:\n      C: [0.1, 1.0]\n")
    head, curve, live = tmp_path / "logreg.h5", tmp_path / "curve.json", tmp_path / "live"
    args = ["--name", "logreg", "--features", str(store), "--out", str(head), "--curve", str(curve)]
    assert run_stage("stages.head", *args, "--metrics", str(live), "--params", str(params)) == []
    assert head.is_file() and json.loads(curve.read_text())[0]["C"] == 0.1
    # metrics.json holds the scores alone (what `dvc metrics show` tabulates); details.json the rest of the record.
    assert list(json.loads((live / "metrics.json").read_text())) == list(SCORE_KEYS)
    details = json.loads((live / "details.json").read_text())
    assert details["model"] == "logreg" and details["n_test"] == 6 and details["hyperparameters"]["C"] in (0.1, 1.0)
    metrics = read_record(live)
    assert metrics["accuracy"] == 1.0
    # 6 of 6 right: Wilson's 95% interval is [1 / (1 + z^2 / 6), 1] = [0.6097, 1], not a bare 1.0.
    assert metrics["accuracy_low"] == pytest.approx(6 / (6 + 1.959964**2), abs=1e-5)
    assert metrics["accuracy_high"] == 1.0
    assert metrics["macro_f1_low"] <= metrics["macro_f1"] <= metrics["macro_f1_high"]
    assert metrics["head_ms_per_image"] > 0  # the head's own cost, which the report adds to its backbone's
    answers = read_predictions(tmp_path / "live" / "predictions.csv")
    store_rows = read_store(store)
    assert [a["path"] for a in answers] == store_rows.paths_of("test")
    assert [a["actual"] for a in answers] == [store_rows.classes[y] for y in store_rows.subset("test")[1]]
    assert all(a["predicted"] == a["actual"] and 0.5 < a["confidence"] <= 1 for a in answers)


def test_scoring_needs_no_commit_and_fine_tuning_curves_say_to_commit(tmp_path: Path, monkeypatch):
    """The head stage writes plain JSON, so a new repository without a commit scores heads; DVCLive, which writes the
    fine-tuning curves, reads the current commit (dvclive#522): there, one line saying to commit, no traceback."""
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    store = tiny_store(tmp_path / "features.h5")
    params = tmp_path / "params.yaml"
    params.write_text("heads:\n  logreg:\n    kind: logreg\n    grid:\n      C: [1.0]\n")
    head = ["--name", "logreg", "--features", str(store), "--out", str(tmp_path / "logreg.h5"), "--curve", "c.json"]
    done = subprocess.run(
        [sys.executable, "-m", "stages.head", *head, "--metrics", "metrics", "--params", str(params)],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert read_record(project / "metrics")["n_test"] == 6

    monkeypatch.chdir(project)
    with pytest.raises(PipelineError, match=r"commit once \(git add -A && git commit -m start\), then run"):
        log_epochs(project / "live", [{"val_loss": 1.0}], ("val_loss",), best_epoch=1)


def test_train_accuracy_is_measured_on_at_most_a_seeded_sample_of_the_training_rows():
    """The report's overfitting gap needs the train accuracy; on a million rows it is a sample's, not k-NN's
    quadratic pass over every training image."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    store = make_store(rng.normal(size=(90, 8)) + np.eye(3, 8)[labels] * 2, labels, np.tile([0, 0, 1], 30), list("abc"))
    head = train_head(store, "knn", HeadParams(kind="knn", grid={"n_neighbors": [3]}))
    x, y = store.subset("train")
    every = float((head.predict_proba(x).argmax(1) == y).mean())
    assert train_accuracy(head, store) == every  # fewer rows than the cap: all of them
    sampled = train_accuracy(head, store, at_most=10)
    assert sampled == train_accuracy(head, store, at_most=10) and sampled * 10 == round(sampled * 10)  # seeded, 10 rows
