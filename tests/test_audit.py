"""The audit: near-copies across splits, likely label errors, misclassified test images."""

from __future__ import annotations

import csv
import json
import logging
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.core.config import HeadParams
from pipeline.core.io import write_csv
from pipeline.features.store import read_store, write_store
from pipeline.heads.persistence import save_head
from pipeline.heads.selection import train_head
from pipeline.results.audit import (
    DuplicatePair,
    LabelIssue,
    cross_split_duplicates,
    duplicate_threshold,
    label_issues,
    misclassified,
    nearest_neighbour_cosines,
    table,
)
from pipeline.results.markdown import audit_section
from pipeline.results.metrics import PREDICTIONS_HEADER
from stages.audit import main as audit_stage
from tests.conftest import make_store

TRAIN, VAL, TEST = 0, 1, 2


def _random_store(n: int = 60, dim: int = 32, seed: int = 0):
    """`n` random rows (nearly orthogonal in `dim` dimensions) split 0/1/2 in turn, each with its own sha256."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    split = np.arange(n) % 3
    store = make_store(features, np.arange(n) % 2, split, ["ant", "bee"])
    store.sha256 = [f"{i:064x}" for i in range(n)]
    return store


def test_a_planted_near_copy_across_splits_is_found_with_its_similarity():
    store = _random_store()
    train_row, test_row = 0, 2  # splits 0 and 2
    noise = np.random.default_rng(1).normal(scale=0.01, size=store.features.shape[1]).astype(np.float32)
    store.features[test_row] = 3.0 * store.features[train_row] + noise  # a copy at another scale: cosine ~ 1
    a, b = store.features[train_row].astype(np.float64), store.features[test_row].astype(np.float64)
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    pairs = cross_split_duplicates(store, threshold=0.95)

    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair.path_a, pair.split_a, pair.class_a) == ("0.png", "train", "ant")
    assert (pair.path_b, pair.split_b, pair.class_b) == ("2.png", "test", "ant")
    assert pair.similarity == pytest.approx(expected, abs=1e-6)
    assert 0.95 <= pair.similarity < 1.0
    assert not pair.exact


def _at_cosine(anchor: np.ndarray, direction: np.ndarray, cosine: float) -> np.ndarray:
    """A unit vector at exactly `cosine` to `anchor`, in the plane of `anchor` and `direction`."""
    base = anchor / np.linalg.norm(anchor)
    other = direction - (direction @ base) * base
    other /= np.linalg.norm(other)
    return cosine * base + np.sqrt(1 - cosine**2) * other


def test_distinct_rows_below_the_threshold_are_not_reported_and_one_above_is():
    store = _random_store(dim=64)
    store.features[1] = _at_cosine(store.features[0], store.features[1], 0.90)  # val row vs train row 0
    store.features[4] = _at_cosine(store.features[0], store.features[4], 0.97)  # val row vs train row 0
    # Test row 2 vs train row 3, within the search's float32 margin: the exact cosine must turn it away.
    store.features[2] = _at_cosine(store.features[3], store.features[2], 0.95 - 5e-5)

    pairs = cross_split_duplicates(store, threshold=0.95)

    assert [(p.path_a, p.path_b) for p in pairs] == [("0.png", "4.png")]
    assert pairs[0].similarity == pytest.approx(0.97, abs=1e-5)
    # Rows 1 and 4 are both val: their mutual similarity (~0.87) makes no pair.
    assert {(p.path_a, p.path_b) for p in cross_split_duplicates(store, threshold=0.85)} == {
        ("0.png", "1.png"),
        ("0.png", "4.png"),
        ("3.png", "2.png"),
    }


def test_a_copy_within_one_split_is_not_reported():
    store = _random_store()
    store.features[3] = store.features[0]  # rows 0 and 3 are both train
    store.features[5] = store.features[2]  # rows 2 and 5 are both test
    store.sha256[4] = store.sha256[1]  # rows 1 and 4 are both val, identical files

    assert cross_split_duplicates(store, threshold=0.95) == []


def test_identical_files_across_splits_are_found_even_when_their_embeddings_differ():
    store = _random_store()
    store.sha256[7] = store.sha256[0]  # val row 7, train row 0: same bytes, unrelated embeddings
    store.sha256[8] = store.sha256[0]  # test row 8 too
    assert store.features[0] @ store.features[7] < 0.5 * np.linalg.norm(store.features[0]) ** 2

    pairs = cross_split_duplicates(store, threshold=0.99)

    assert [(p.path_a, p.split_a, p.path_b, p.split_b) for p in pairs] == [
        ("0.png", "train", "7.png", "val"),
        ("0.png", "train", "8.png", "test"),
        ("7.png", "val", "8.png", "test"),
    ]
    assert all(p.exact and p.similarity == 1.0 for p in pairs)


def test_each_unordered_pair_is_reported_once_even_when_both_exact_and_near():
    store = _random_store()
    store.features[1] = store.features[0]  # train 0 / val 1: identical embedding
    store.sha256[1] = store.sha256[0]  # and identical file
    store.features[2] = store.features[0]  # test 2 copies both

    pairs = cross_split_duplicates(store, threshold=0.95)

    keys = [frozenset((p.path_a, p.path_b)) for p in pairs]
    assert len(keys) == len(set(keys)) == 3
    assert {(p.path_a, p.path_b): p.exact for p in pairs} == {
        ("0.png", "1.png"): True,
        ("0.png", "2.png"): False,
        ("1.png", "2.png"): False,
    }
    assert [p.similarity for p in pairs] == sorted((p.similarity for p in pairs), reverse=True)
    # Identical embeddings have cosine 1 as reported, whatever float32 rounding does to their norms.
    assert cross_split_duplicates(store, threshold=1.0) == pairs


def test_pairs_come_most_similar_first():
    store = _random_store(dim=64)
    store.features[1] = _at_cosine(store.features[0], store.features[1], 0.96)  # val row 1 vs train row 0
    store.features[5] = _at_cosine(store.features[3], store.features[5], 0.99)  # test row 5 vs train row 3
    store.sha256[10] = store.sha256[9]  # val row 10, train row 9: identical files

    pairs = cross_split_duplicates(store, threshold=0.95)

    assert [(p.path_a, p.path_b, p.exact) for p in pairs] == [
        ("9.png", "10.png", True),
        ("3.png", "5.png", False),
        ("0.png", "1.png", False),
    ]
    assert [p.similarity for p in pairs] == pytest.approx([1.0, 0.99, 0.96], abs=1e-5)


@pytest.mark.parametrize("threshold", [0.9, 0.3])
def test_the_pairs_are_every_cross_split_pair_of_the_dense_cosine_matrix(threshold):
    """Brute force: every pair of rows in different splits whose float64 cosine, rounded to 6 decimals, reaches the
    threshold (0.3: most pairs of a class, thousands in all)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 75)
    features = (rng.normal(size=(300, 16)) + 3 * np.eye(4, 16)[labels]).astype(np.float32)
    features[[10, 20, 30]] = features[0] + 0.01  # near-copies
    store = make_store(features, labels, rng.integers(0, 3, size=300), list("abcd"))
    store.sha256 = [f"{i:064x}" for i in range(300)]
    unit = features.astype(np.float64) / np.linalg.norm(features.astype(np.float64), axis=1, keepdims=True)
    cosines = np.round(unit @ unit.T, 6)
    expected = {
        (f"{i}.png", f"{j}.png") if store.split[i] < store.split[j] else (f"{j}.png", f"{i}.png"): cosines[i, j]
        for i in range(300)
        for j in range(i + 1, 300)
        if store.split[i] != store.split[j] and cosines[i, j] >= threshold
    }
    pairs = cross_split_duplicates(store, threshold, device="cpu")
    assert len(expected) >= (1000 if threshold < 0.5 else 3)  # the copies; most pairs of a class
    assert {(p.path_a, p.path_b): p.similarity for p in pairs} == pytest.approx(expected, abs=1e-6)
    assert len(pairs) == len(expected)


def test_a_threshold_outside_cosine_range_is_refused():
    with pytest.raises(ValueError, match=r"threshold must be a cosine similarity in \[-1, 1\], got 1.5"):
        cross_split_duplicates(_random_store(), threshold=1.5)


def _pairs_store(partner_cosines: list[float], test_cosines: tuple[float, float]):
    """Training rows in pairs, each row's nearest other row its partner at the given cosine (any other two rows
    orthogonal); then two test rows, row 0 turned towards a free axis to the two `test_cosines`."""
    dim = 2 * len(partner_cosines) + 1
    axes = np.eye(dim)
    rows = []
    for k, cosine in enumerate(partner_cosines):
        rows += [axes[k], cosine * axes[k] + np.sqrt(1 - cosine**2) * axes[len(partner_cosines) + k]]
    rows += [c * axes[0] + np.sqrt(1 - c**2) * axes[dim - 1] for c in test_cosines]
    n = len(rows)
    store = make_store(np.array(rows), np.arange(n) % 2, [TRAIN] * (n - 2) + [TEST, TEST], ["ant", "bee"])
    store.sha256 = [f"{i:064x}" for i in range(n)]
    return store


def test_auto_threshold_is_the_99th_percentile_of_the_training_images_nearest_neighbour_cosines():
    """Nearest-neighbour cosines 0.10, 0.11, ... 0.59, each twice (both rows of a pair): 99th percentile 0.59,
    below halfway from their median (0.345) to 1. The test row at cosine 0.60 to a training row is a near-copy,
    the one at 0.58 is not."""
    cosines = np.round(np.arange(0.10, 0.595, 0.01), 2)
    store = _pairs_store(list(cosines), (0.60, 0.58))
    train = np.flatnonzero(store.split == TRAIN)
    assert nearest_neighbour_cosines(store.features, train, device="cpu") == pytest.approx(
        np.repeat(cosines, 2), abs=1e-6
    )
    threshold, why = duplicate_threshold(store, "auto", device="cpu")
    assert threshold == 0.59
    assert why == (
        "auto: the 99th percentile of the cosine of a training image to its nearest other one, over 100 training "
        "images (median 0.345; halfway from it to 1, 0.672)"
    )
    pairs = cross_split_duplicates(store, threshold, device="cpu")
    assert [(p.path_a, p.path_b, p.similarity) for p in pairs] == [("0.png", "100.png", 0.6)]


def test_auto_threshold_stays_at_or_below_halfway_between_the_median_and_1():
    """Nearest-neighbour cosines 0.2, 0.4, 0.6, 0.8, 0.9, each twice: the 99th percentile (0.9) is above halfway
    from the median (0.6) to 1, so 0.8: a fifth of the training images closer than that to another (copies among
    them) would not hide copies across splits at 0.85."""
    store = _pairs_store([0.2, 0.4, 0.6, 0.8, 0.9], (0.85, 0.75))
    threshold, why = duplicate_threshold(store, "auto", device="cpu")
    assert threshold == 0.8
    assert why == (
        "auto: halfway between 1 and the median (0.600) of the cosine of a training image to its nearest other one, "
        "over 10 training images, below their 99th percentile (0.900)"
    )
    pairs = cross_split_duplicates(store, threshold, device="cpu")
    assert [(p.path_a, p.path_b, p.similarity) for p in pairs] == [("0.png", "10.png", 0.85)]


def test_a_number_is_used_as_given():
    store = _pairs_store([0.5, 0.5], (0.95, 0.85))
    assert duplicate_threshold(store, 0.9) == (0.9, "audit.duplicate_threshold in params.yaml")


def test_nearest_neighbours_of_identical_rows_are_each_other_and_a_sample_gives_the_same_cosines():
    """Identical rows: each one's nearest other row is a copy (cosine 1), whichever the search ranks first. A sample
    of the rows gets each sampled row's own nearest-neighbour cosine, against all the rows."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 8)).astype(np.float32)
    features[[7, 8, 9]] = features[3]
    rows = np.arange(50)
    unit = features.astype(np.float64) / np.linalg.norm(features.astype(np.float64), axis=1, keepdims=True)
    dense = unit @ unit.T
    np.fill_diagonal(dense, -np.inf)
    every = nearest_neighbour_cosines(features, rows, device="cpu")
    assert every == pytest.approx(dense.max(axis=1), abs=1e-6)
    assert every[[3, 7, 8, 9]] == pytest.approx(1.0, abs=1e-6)
    sample = nearest_neighbour_cosines(features, rows, seed=1, device="cpu", sample=10)
    assert len(sample) == 10 and np.isin(np.round(sample, 5), np.round(every, 5)).all()


def test_auto_needs_two_training_images():
    store = make_store(np.eye(3), [0, 1, 1], [TRAIN, TEST, TEST], ["ant", "bee"])
    with pytest.raises(ValueError, match="duplicate_threshold auto needs two training images or more; the store has 1"):
        duplicate_threshold(store, "auto", device="cpu")


def _blobs(per_class: int = 40, seed: int = 0):
    """Three far-apart Gaussian blobs, split train/val/test 60/20/20 within each class.

    Far apart (centres ~20 noise widths from the origin): a flipped label's out-of-fold probability of its true
    class is then near 1. Confident learning counts an image as mislabelled only when that probability exceeds
    the class's mean; at ~6 noise widths the regularised head's probabilities spread over 0.85-0.99 and
    cleanlab's default filter left one of five flips unflagged for about one seed in four.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=20.0, size=(3, 8))
    labels = np.repeat(np.arange(3), per_class)
    features = centres[labels] + rng.normal(size=(len(labels), 8))
    position = np.tile(np.arange(per_class), 3)
    split = np.where(position < 0.6 * per_class, TRAIN, np.where(position < 0.8 * per_class, VAL, TEST))
    return features.astype(np.float32), labels, split


def test_flipped_training_labels_rank_first_with_their_true_class_suggested():
    features, truth, split = _blobs()
    flipped = np.array([0, 5, 40, 47, 85])  # training rows of each class
    assert (split[flipped] == TRAIN).all()
    given = truth.copy()
    given[flipped] = (truth[flipped] + 1) % 3
    store = make_store(features, given, split, ["a", "b", "c"])
    store.features[split == TEST] = np.nan  # the test split must never be read

    issues = label_issues(store, folds=5, seed=0)

    top = issues[:5]
    assert {issue.path for issue in top} == {f"{i}.png" for i in flipped}
    for issue in top:
        row = int(issue.path.removesuffix(".png"))
        assert issue.split == "train"
        assert issue.given_class == "abc"[given[row]]
        assert issue.suggested_class == "abc"[truth[row]]
    assert [i.score for i in issues] == sorted(i.score for i in issues)
    assert top[-1].score < 0.5
    assert all(issue.split != "test" for issue in issues)


def test_label_issues_lower_the_folds_to_the_smallest_class():
    features, labels, split = _blobs(per_class=10)
    keep = ~((labels == 2) & (np.arange(len(labels)) % 10 >= 3))  # class c: 3 images, all train
    store = make_store(features[keep], labels[keep], split[keep], ["a", "b", "c"])

    with warnings.catch_warnings():
        # StratifiedKFold warns when a class has fewer members than folds: with 3 folds, none does.
        warnings.simplefilter("error", UserWarning)
        issues = label_issues(store, folds=5)

    assert all(isinstance(issue, LabelIssue) and issue.split != "test" for issue in issues)


def test_label_issues_are_empty_with_a_reason_when_a_class_has_one_image(caplog):
    features, labels, split = _blobs(per_class=10)
    keep = ~((labels == 2) & (np.arange(len(labels)) % 10 >= 1))  # class c: one train image
    store = make_store(features[keep], labels[keep], split[keep], ["a", "b", "c"])

    with caplog.at_level(logging.WARNING, logger="pipeline.results.audit"):
        assert label_issues(store) == []
    assert "the smallest with 1 images" in caplog.text


def test_misclassified_lists_only_mistakes_the_most_confident_first():
    rows = [
        {"path": "a.jpg", "actual": "ant", "predicted": "ant", "confidence": 0.99},
        {"path": "b.jpg", "actual": "ant", "predicted": "bee", "confidence": 0.61},
        {"path": "c.jpg", "actual": "bee", "predicted": "ant", "confidence": 0.97},
        {"path": "d.jpg", "actual": "bee", "predicted": "ant", "confidence": 0.61},
        {"path": "e.jpg", "actual": "bee", "predicted": "bee", "confidence": 0.51},
    ]

    assert [row["path"] for row in misclassified(rows)] == ["c.jpg", "b.jpg", "d.jpg"]


def test_table_has_one_column_per_field_even_when_empty():
    pair = DuplicatePair("x.jpg", "train", "ant", "y.jpg", "test", "ant", 0.98, False)

    header, rows = table(DuplicatePair, [pair])

    assert header == ["path_a", "split_a", "class_a", "path_b", "split_b", "class_b", "similarity", "exact"]
    assert rows == [("x.jpg", "train", "ant", "y.jpg", "test", "ant", 0.98, False)]
    assert table(LabelIssue, []) == (["path", "split", "given_class", "suggested_class", "score"], [])


def test_the_audit_stage_writes_its_csvs_pictures_and_counts_and_the_report_shows_them(tmp_path):
    """The stage end to end on a written store, real PNG files, a trained head and two models' answers."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    features = (rng.normal(size=(60, 16)) + labels[:, None] * 4).astype(np.float32)
    split = np.tile([0, 0, 0, 1, 2], 12)
    features[4] = features[0] + 1e-4  # test row 4 copies train row 0
    paths = [f"{['ant', 'bee'][y]}/{i:02d}.png" for i, y in enumerate(labels)]
    for path in paths:
        (tmp_path / "raw" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (int(rng.integers(255)), 90, 30)).save(tmp_path / "raw" / path)
    attrs = {
        "classes": ["ant", "bee"],
        "fingerprint": "f",
        "backbone": "test_resnet",
        "image_size": 32,
        "label": "tiny",
    }
    store = tmp_path / "features" / "tiny.h5"
    write_store(store, labels=labels, split=split, paths=paths,
                        sha256=[f"{i:064x}" for i in range(60)], feature_chunks=iter([features]), feature_dim=16,
                        attrs=attrs)  # fmt: skip
    params = tmp_path / "params.yaml"
    backbones = "extract:\n  backbones:\n    tiny: {}\n"
    params.write_text(f"{backbones}heads:\n  logreg:\n    kind: logreg\n    grid:\n      C: [0.25]\naudit:\n  top: 4\n")
    head = train_head(read_store(store), "logreg", HeadParams(grid={"C": [0.25]}))
    save_head(head, tmp_path / "heads" / "tiny" / "logreg.h5")
    test_paths = [p for p, s in zip(paths, split, strict=True) if s == 2]
    for model, wrong in (("tiny-logreg", {test_paths[0]}), ("finetune", set())):
        rows = [(p, p[:3], ("bee" if p[:3] == "ant" else "ant") if p in wrong else p[:3], "0.8") for p in test_paths]
        write_csv(tmp_path / "metrics" / model / "predictions.csv", PREDICTIONS_HEADER, rows)
    out, summary = tmp_path / "reports" / "audit", tmp_path / "audit.json"
    args = ["--features", str(store.parent), "--heads", str(tmp_path / "heads"), "--metrics", str(tmp_path / "metrics")]
    args += ["--data", str(tmp_path / "raw"), "--out", str(out), "--summary", str(summary), "--params", str(params)]
    result = CliRunner().invoke(audit_stage, args)
    assert result.exit_code == 0, result.output
    counts = json.loads(summary.read_text())
    chosen = json.loads((out / "duplicate_threshold.json").read_text())  # params leave it at auto: chosen, and why
    assert chosen["setting"] == "auto" and chosen["reason"].startswith("auto: ")
    assert counts["duplicate_threshold"] == chosen["threshold"] and counts["cross_split_pairs"] >= 1
    assert f"audit: duplicate_threshold {chosen['threshold']} ({chosen['reason']})" in result.output
    assert "out-of-fold logistic regression at C=0.25 (auto: the C heads.logreg chose)" in result.output
    assert (counts["misclassified_tiny-logreg"], counts["misclassified_finetune"]) == (1, 0)
    with open(out / "duplicates.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert (first["path_a"], first["split_a"], first["path_b"], first["split_b"]) == (
        paths[0],
        "train",
        paths[4],
        "test",
    )
    with open(out / "test_copies.csv", newline="") as f:  # what audit.drop_cross_split_duplicates leaves out
        copies = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert copies[paths[4]] == f"near-copy (cosine 1.000) of {paths[0]} (train)" and counts["test_copies"] == len(
        copies
    )
    for picture in ("duplicates", "label_issues", "misclassified_tiny-logreg", "misclassified_finetune"):
        with Image.open(out / f"{picture}.png") as image:
            assert image.width > 100
    section = "\n".join(audit_section(counts))
    assert "![near-copies across splits](audit/duplicates.png)" in section
    assert "- tiny-logreg gets 1 test images wrong: `audit/misclassified_tiny-logreg.csv`." in section
