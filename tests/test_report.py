"""The strategy report's numbers: parameter counts against torch's, the advice, the sections."""

import json
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.core.config import EvaluateParams, FinetuneParams, HeadParams
from pipeline.core.errors import PipelineError
from pipeline.core.io import write_csv
from pipeline.data.manifest import read_manifest
from pipeline.features.backbones import build_backbone
from pipeline.features.store import FeatureStore
from pipeline.finetuning.curve import finetune_curve
from pipeline.finetuning.freezing import freeze
from pipeline.finetuning.model import Classifier
from pipeline.finetuning.training import finetune
from pipeline.heads.curves import learning_curve
from pipeline.heads.selection import train_head
from pipeline.heads.trained import held_out
from pipeline.results.advice import recommend
from pipeline.results.answers import Answers, paired, read_copies_in_test
from pipeline.results.markdown import backbone_section, per_class_accuracy, ranking_words
from pipeline.results.metrics import PREDICTIONS_HEADER, rescored
from pipeline.results.model_rows import ModelRow, extraction_seconds, finetune_row, head_rows
from pipeline.results.scoring_finetuned import evaluate_finetuned
from pipeline.results.stats import compare, wilson_interval
from stages.report import main as report_stage
from tests.conftest import REPO, make_store, prepare_manifest


def blobs(n_per_class: int = 40, dim: int = 6, seed: int = 0) -> FeatureStore:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    features = (rng.normal(size=(len(labels), dim)) + np.eye(3, dim)[labels] * 1.5).astype(np.float32)
    split = np.tile([0, 0, 0, 0, 1, 2], len(labels) // 6)
    return make_store(features, labels, split, ["a", "b", "c"], backbone="test_resnet", image_size=32)


def test_head_rows_add_the_backbones_extract_metrics_to_the_heads_own():
    store = blobs(dim=96)  # test_resnet's feature size
    head = train_head(store, "logreg", HeadParams(grid={"C": [1.0]}))
    scores = {"accuracy": 0.9, "macro_f1": 0.9, "ece": 0.05}
    metrics = {"logreg": {**scores, "fit_seconds": 0.1, "head_ms_per_image": 0.25, "train_accuracy": 0.95}}
    extraction = {"tiny": {"extraction_seconds": 2.0, "backbone_params": 1000, "forward_ms_per_image": 4.5}}
    (row,) = head_rows(store, [head], metrics, extraction, "tiny")
    assert row.params_updated == 96 * 3 + 3
    assert row.params_total == 1000 + row.params_updated
    assert (row.train_accuracy, row.gap) == (0.95, pytest.approx(0.05))  # measured by the head stage
    assert (row.train_seconds, row.fit_seconds) == (pytest.approx(2.1), 0.1)  # extraction + fit, and the fit
    assert row.inference_ms == pytest.approx(4.5 + 0.25)  # the backbone's shared forward pass plus the head's own
    assert row.chosen_on == f"{head.val_curve[0]['val_accuracy']:.4f} (5-fold CV)"
    older = {"tiny": {"extraction_seconds": 2.0}}  # extract metrics of a version that did not time the backbone
    with pytest.raises(PipelineError, match=r"the extract metrics of tiny have no backbone_params .*run `dvc repro`"):
        head_rows(store, [head], metrics, older, "tiny")


def test_finetune_row_shares_the_backbone_measurement_and_counts_what_torch_says_was_trainable(
    image_folder: Path, tmp_path: Path
):
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    params = replace(
        FinetuneParams(), unfreeze=2, epochs=1, init_head="random", image_size=32, num_workers=0, device="cpu"
    )
    finetune(manifest, image_folder, "test_resnet", params, tmp_path / "ft", tmp_path / "ckpt")
    record = evaluate_finetuned(tmp_path / "ft", manifest, image_folder, params=params).record
    backbone = build_backbone("test_resnet")
    model = Classifier(backbone.features, backbone.feature_dim, 3)
    freeze(model, backbone.blocks(), 2)
    assert record["params_total"] == sum(p.numel() for p in model.parameters())
    assert record["forward_ms_per_image"] > 0 and record["head_ms_per_image"] > 0  # the whole network, its layer
    extraction = {"tiny": {"backbone": "test_resnet", "image_size": 32, "forward_ms_per_image": 1000.0}}
    same = finetune_row(tmp_path / "ft", record, extraction)
    assert same.params_updated == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert same.params_total == record["params_total"]
    assert same.layers_trained == "last 2 of 5 blocks + new output layer"
    # The same network as the heads' backbone: its cost is their shared measurement plus the new layer's.
    assert same.inference_ms == pytest.approx(1000.0 + record["head_ms_per_image"])
    other = finetune_row(tmp_path / "ft", record, {"tiny": {**extraction["tiny"], "image_size": 64}})
    assert other.inference_ms == record["forward_ms_per_image"]  # another input size: the whole network, timed alone


def test_the_report_stage_builds_no_network():
    """The costs are measured where the models run (extract, head, evaluate_finetune): the report only reads them."""
    code = "import json, sys, stages.report; print(json.dumps([m for m in ('torch', 'timm') if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == []


def _row(name: str, strategy: str, correct: np.ndarray, seconds: float) -> ModelRow:
    n, k = len(correct), int(correct.sum())
    low, high = wilson_interval(k, n)
    scores = {"accuracy": k / n, "accuracy_low": low, "accuracy_high": high, "n_test": n}
    return ModelRow(name, strategy, "", 1, 10, seconds, seconds, 1.0, scores, 1.0)


def right(n_test: int, wrong: list[int]) -> np.ndarray:
    correct = np.ones(n_test, dtype=bool)
    correct[wrong] = False
    return correct


def test_one_image_of_153_is_no_measurable_difference_and_the_cheaper_run_is_advised():
    """The README case: 94.8% against 94.1% on hymenoptera's 153 test images."""
    head_right, tuned_right = right(153, list(range(8))), right(153, list(range(9)))
    head = _row("logreg", "feature_extraction", head_right, 9.0)
    tuned = _row("finetune", "fine_tuning", tuned_right, 52.0)
    text = recommend(head, tuned, compare(tuned_right, head_right))
    assert text.startswith("No measurable difference between fine-tuning (94.1%, 95% interval 89.2% to 96.9%)")
    assert "they disagree on 1: 0 right only after fine-tuning, 1 only with logreg" in text
    assert "p = 1" in text and text.endswith("use feature extraction.")
    cheaper_tuning = _row("finetune", "fine_tuning", tuned_right, 5.0)
    assert recommend(head, cheaper_tuning, compare(tuned_right, head_right)).endswith("use fine-tuning.")


def test_a_clear_gain_is_measured_and_named():
    head_right, tuned_right = right(200, list(range(30))), right(200, [0, 1])  # 28 images only fine-tuning gets
    head = _row("logreg", "feature_extraction", head_right, 9.0)
    tuned = _row("finetune", "fine_tuning", tuned_right, 52.0)
    text = recommend(head, tuned, compare(tuned_right, head_right))
    assert text.startswith("Fine-tuning (99.0%, 95% interval") and text.endswith("Use fine-tuning.")
    assert f"p = {2 * 0.5**28:.3g}" in text and "28 right only after fine-tuning, 0 only with logreg" in text
    worse = recommend(tuned, head, compare(head_right, tuned_right))  # the roles swapped: the head wins
    assert worse.endswith("Use feature extraction.") and "is more accurate than fine-tuning" in worse
    only = recommend(head, None, None)
    assert only.startswith("Only feature extraction was measured: logreg reaches 85.0%, 95% interval")


def test_paired_comparison_reads_both_models_answers_image_by_image(tmp_path: Path):
    for name, wrong in (("finetune", {"b.png"}), ("logreg", {"a.png", "c.png"})):
        rows = [(p, "ant", "bee" if p in wrong else "ant", "0.9") for p in ("a.png", "b.png", "c.png")]
        write_csv(tmp_path / name / "predictions.csv", PREDICTIONS_HEADER, rows)
    result = paired(Answers(tmp_path), "finetune", "logreg")
    assert (result.mcnemar.a_only, result.mcnemar.b_only) == (2, 1)
    relabelled = [(p, "bee", "bee", "0.9") for p in ("a.png", "b.png", "c.png")]  # same images, other labels
    write_csv(tmp_path / "logreg" / "predictions.csv", PREDICTIONS_HEADER, relabelled)
    with pytest.raises(PipelineError, match="finetune and logreg were scored on different test images or labels"):
        paired(Answers(tmp_path), "finetune", "logreg")
    (tmp_path / "logreg" / "predictions.csv").unlink()  # an older run's folder: one line saying what to do
    with pytest.raises(PipelineError, match=r"logreg/predictions.csv not found .*; run `dvc repro`"):
        paired(Answers(tmp_path), "finetune", "logreg")


def test_finetune_curve_trains_on_subsets_and_scores_the_full_test_split(image_folder: Path, tmp_path: Path):
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    params = replace(FinetuneParams(), epochs=1, image_size=32, num_workers=0, device="cpu", init_head="logreg")
    points = finetune_curve(manifest, image_folder, "test_resnet", params, [2, 4], tmp_path / "work")
    assert [p["per_class"] for p in points] == [2, 4]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in points)
    subset = read_manifest(tmp_path / "work" / "manifest-2.csv")
    assert sorted(Counter(r.class_name for r in subset.ok_rows() if r.split == "train").values()) == [2, 2, 2]
    assert sum(r.split == "test" for r in subset.ok_rows()) == 6  # every test image still scored
    config = json.loads((tmp_path / "work" / "model-2" / "config.json").read_text())
    assert config["params"]["init_head"] == "random"  # the logistic head saw every training image


def test_learning_curve_skips_shots_too_few_for_knn():
    store = blobs()
    params = HeadParams(kind="knn", grid={"n_neighbors": [5.0]})
    curve = learning_curve(store, train_head(store, "knn", params), params, shots=[1, 2, 10], seeds=2)
    assert [p["label"] for p in curve] == ["2", "10", "all"]  # 1 per class: 3 rows, fewer than k = 5


def test_report_refuses_an_unknown_extraction_cost_in_one_line(tmp_path):
    """A cache whose embeddings carry no recorded cost must not be quoted as a few ms of extraction."""
    assert extraction_seconds({"b": {"extraction_seconds": 1.5}}, "b") == 1.5
    with pytest.raises(
        PipelineError, match=r"the extract metrics of b have no extraction cost: .*delete \.cache/embeddings"
    ):
        extraction_seconds({"b": {"seconds": 0.1, "computed": 0, "reused": 36, "extraction_seconds": None}}, "b")
    metrics = tmp_path / "extract"
    args = ["--features", "f", "--heads", "h", "--metrics", "m", "--extract-metrics", str(metrics)]
    args += ["--curve", "c.json", "--finetune-curve", "t.json", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(report_stage, [*args, "--params", str(REPO / "params.yaml")])
    assert (
        result.exit_code == 1 and "extract/efficientnet_lite0/metrics.json not found; run `dvc repro`" in result.output
    )
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_accuracy_per_class_counts_each_models_answers(tmp_path: Path, monkeypatch):
    answers = {"logreg": ["a", "a", "b", "c"], "finetune": ["a", "b", "b", "b"]}  # predicted; actual a, a, b, c
    for model, predicted in answers.items():
        rows = [(f"{i}.png", actual, p, "0.9") for i, (actual, p) in enumerate(zip("aabc", predicted, strict=True))]
        write_csv(tmp_path / model / "predictions.csv", PREDICTIONS_HEADER, rows)
    lines = per_class_accuracy(Answers(tmp_path), ["logreg", "finetune"], ["a", "b", "c"])
    assert lines[2:6] == [
        "| class | logreg | finetune |",
        "|---|---|---|",
        "| a | 1.000 (2/2) | 0.500 (1/2) |",
        "| b | 1.000 (1/1) | 1.000 (1/1) |",
    ]
    assert lines[6] == "| c | 1.000 (1/1) | 0.000 (0/1) |"
    monkeypatch.setattr("pipeline.results.markdown.PER_CLASS_ROWS", 2)  # many classes: the hardest on average only
    hardest = per_class_accuracy(Answers(tmp_path), ["logreg", "finetune"], ["a", "b", "c"])
    assert hardest[0] == "## Accuracy per class (the 2 hardest classes)"
    assert [line.split(" |")[0] for line in hardest[4:6]] == ["| c", "| a"]


def test_leaving_out_the_copies_of_training_images_scores_the_rest_again(tmp_path: Path):
    """audit.drop_cross_split_duplicates: the report's answers skip the listed test images, and each model's
    scores are computed again from what is left."""
    rows = [("a.png", "ant", "ant", "0.9"), ("b.png", "ant", "ant", "0.8"), ("c.png", "bee", "ant", "0.7")]
    write_csv(tmp_path / "logreg" / "predictions.csv", PREDICTIONS_HEADER, rows)
    write_csv(tmp_path / "finetune" / "predictions.csv", PREDICTIONS_HEADER, [(p, a, a, "0.9") for p, a, _, _ in rows])
    answers = Answers(tmp_path, frozenset({"a.png"}))  # a.png copies a training image
    assert [row["path"] for row in answers.of("logreg")] == ["b.png", "c.png"]
    assert paired(answers, "finetune", "logreg").accuracy_b == 0.5  # 1 of the 2 images left, not 2 of 3
    record = {"model": "logreg", "accuracy": 2 / 3, "log_loss": 0.4, "n_test": 3, "fit_seconds": 0.1}
    clean = rescored(record, answers.of("logreg"), ["ant", "bee"], EvaluateParams(bootstrap_resamples=200))
    assert (clean["accuracy"], clean["n_test"], clean["fit_seconds"]) == (0.5, 2, 0.1)
    assert "log_loss" not in clean  # the answers do not hold the probability of the true class
    assert clean["accuracy_low"] < 0.5 < clean["accuracy_high"]
    assert clean["ece"] == pytest.approx((abs(1 - 0.8) + abs(0 - 0.7)) / 2)  # two bins of one image each
    copies = tmp_path / "test_copies.csv"
    write_csv(copies, ("path", "reason"), [("a.png", "near-copy (cosine 0.990) of train/x.png (train)")])
    assert read_copies_in_test(copies) == frozenset({"a.png"})
    with pytest.raises(PipelineError, match="run the audit stage"):
        read_copies_in_test(tmp_path / "missing.csv")


def test_backbones_are_ranked_by_logme_and_by_their_best_head_with_the_rank_correlation():
    logme = {"lite0": 0.9, "resnet": 0.7, "random": -0.2}
    words = ranking_words(logme, {"lite0": 0.95, "resnet": 0.96, "random": 0.55})
    assert "Ranked by LogME: lite0, resnet, random." in words
    assert "Ranked by the best head's held-out accuracy: resnet, lite0, random." in words
    assert "Spearman rank correlation of the two over 3 backbones: +0.50." in words  # d^2 = 1 + 1: 1 - 12/24
    assert "One backbone" in ranking_words({"lite0": 0.9}, {"lite0": 0.95})


def test_the_backbones_section_shows_each_backbones_cost_size_score_and_best_head():
    heads = {}
    for label, dim in (("small", 6), ("wide", 12)):
        store = blobs(dim=dim)
        store.attrs["label"] = label
        for c in (0.01, 1.0):
            head = train_head(store, f"logreg_{c}", HeadParams(grid={"C": [c]}))
            heads[head.model_name] = head
    extraction = {
        "small": {
            "backbone": "test_resnet",
            "image_size": 32,
            "feature_dim": 6,
            "extraction_seconds": 1.25,
            "logme": 0.2,
        },
        "wide": {
            "backbone": "test_resnet",
            "image_size": 64,
            "feature_dim": 12,
            "extraction_seconds": 3.5,
            "logme": 0.4,
        },
    }
    rows = [_row(name, "feature_extraction", np.ones(10, dtype=bool), 1.0) for name in heads]
    lines = backbone_section(extraction, list(heads.values()), rows)
    table = [line for line in lines if line.startswith("| small") or line.startswith("| wide")]
    assert [line.split(" | ")[0] for line in table] == ["| wide", "| small"]  # the higher LogME first
    for line, label in zip(table, ("wide", "small"), strict=True):
        best = max((h for h in heads.values() if h.backbone == label), key=lambda h: held_out(h)["val_accuracy"])
        e = extraction[label]
        assert f"| {e['image_size']} | {e['feature_dim']} | {e['extraction_seconds']:.1f} | {e['logme']:.4f} |" in line
        assert f"| {best.name} | {held_out(best)['val_accuracy']:.4f} | 1.0000 |" in line
    assert any("over 2 backbones: -1.00" in line or "over 2 backbones: +1.00" in line for line in lines)
