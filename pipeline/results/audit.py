"""Audit a feature store: near-copies across splits, likely label errors, and a model's most confident mistakes.

All three run on the cached embeddings and the models' answers; no image is decoded and no network runs here.

- `cross_split_duplicates` measures leakage. A test (or val) image that is a near-copy of a training image (the
  same photo re-encoded, resized, cropped, flipped) is one the heads have in effect already seen: it inflates
  every score the pipeline reports and the comparison between strategies with it. Prepare refuses identical
  files across splits by default; this finds the copies that differ by a byte, by their embeddings, at a cosine
  threshold read from the embedding space itself (`duplicate_threshold`).
- `label_issues` measures label noise. A mislabelled training image teaches a head the wrong answer and costs it
  accuracy (a mislabelled val image misleads its model selection): cleanlab's confident learning ranks the
  train+val images whose given label a cheap out-of-fold head believes least. The test split is never read.
- `misclassified` lists a model's test mistakes, most confident first: those are where a wrong label, a
  near-duplicate or a real blind spot of the model is most likely.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.model_selection import StratifiedKFold

from pipeline.core.accelerator import use_cuda
from pipeline.core.config import AuditParams, HeadParams
from pipeline.core.io import write_csv, write_json
from pipeline.features.store import SPLIT_CODES, FeatureStore
from pipeline.heads.linear import fit_logistic, predict_proba_rows, shared_preconditioner
from pipeline.heads.neighbors import pairs_at_least, top_k
from pipeline.heads.persistence import HeadFile
from pipeline.results import thumbnails
from pipeline.results.metrics import PREDICTIONS_HEADER, read_predictions

log = logging.getLogger(__name__)

SPLIT_NAMES = {code: name for name, code in SPLIT_CODES.items()}
# The neighbour search runs in float32 (the store's dtype); float32 rounding moves a unit-vector cosine by about
# 1e-6. The search takes everything within this margin below the threshold, and each candidate's cosine in
# float64, rounded as reported, decides: a pair is listed exactly when its reported similarity >= threshold.
SEARCH_MARGIN = 1e-4
SIMILARITY_DECIMALS = 6
PAIR_BLOCK = 4096  # candidate pairs whose cosine is computed at once (2 x 4,096 x D float64 gathered)
# audit.duplicate_threshold: auto measures the nearest neighbour of at most this many training images (a seeded
# sample, each searched against every training image): one block of queries, and a median and 99th percentile
# within about 0.005 of the whole split's (two standard errors, for cosines spread as hymenoptera's are).
NEIGHBOUR_QUERIES = 2000
NEIGHBOUR_QUANTILE = 0.99
THRESHOLD_DECIMALS = 3


@dataclass(frozen=True)
class DuplicatePair:
    """Two images in different splits whose embeddings are near-identical (or whose files are identical).

    `a` is the image in the earlier split (train before val before test); `similarity` is the cosine of their
    embeddings, 1.0 for identical files (`exact`).
    """

    path_a: str
    split_a: str
    class_a: str
    path_b: str
    split_b: str
    class_b: str
    similarity: float
    exact: bool


@dataclass(frozen=True)
class LabelIssue:
    """A train or val image whose given label is likely wrong, with the class an out-of-fold head prefers.

    `score` is cleanlab's label quality score of the given label (its out-of-fold probability, "self
    confidence"): 0 to 1, lower is more suspicious.
    """

    path: str
    split: str
    given_class: str
    suggested_class: str
    score: float


def duplicate_threshold(
    store: FeatureStore, setting: float | str, seed: int = 0, device: str = "auto"
) -> tuple[float, str]:
    """The cosine at or above which two images count as near-copies for `setting` (audit.duplicate_threshold), and
    why, in words: a number as given; auto: from the training images' embeddings, the cosine of a training image to
    its nearest other training image, measured for each: their 99th percentile, or halfway between their median and
    1 if that is lower; to 3 decimals.

    A test image whose nearest training image is no closer than a training image's nearest distinct neighbour
    usually is, is no copy: the 99th percentile puts the threshold above all but 1% of those distinct neighbours
    (held-out images' nearest training images fall as the training images' own do: the same spread to 0.01 on
    hymenoptera), so about 1% of held-out images make false pairs. Real copies among the training images would
    raise that percentile towards 1 and hide the copies across splits: the threshold never exceeds halfway from
    the median to 1 (in distances, 1 - cosine: half the typical distance to a nearest neighbour), which such copies
    cannot move unless they are half the training images. What copies and distinct images score on photos, the
    digits sample and generated shapes: `benchmarks/duplicate_threshold.py` (docs/benchmarks.md). It reads the
    embedding space it is applied to, so it follows the backbone, the input size and the kind of image. `seed`
    draws the training images measured when there are more than NEIGHBOUR_QUERIES; `device` as for
    `cross_split_duplicates`.
    """
    if setting != "auto":
        return float(setting), "audit.duplicate_threshold in params.yaml"
    train = np.flatnonzero(store.split == SPLIT_CODES["train"])
    if len(train) < 2:
        raise ValueError(f"duplicate_threshold auto needs two training images or more; the store has {len(train)}")
    nearest = nearest_neighbour_cosines(store.features, train, seed, device)
    median, high = float(np.median(nearest)), float(np.quantile(nearest, NEIGHBOUR_QUANTILE))
    halfway = (1 + median) / 2
    what = f"cosine of a training image to its nearest other one, over {len(nearest)} training images"
    if high <= halfway:
        why = f"auto: the 99th percentile of the {what} (median {median:.3f}; halfway from it to 1, {halfway:.3f})"
    else:
        why = (
            f"auto: halfway between 1 and the median ({median:.3f}) of the {what}, below their 99th percentile "
            f"({high:.3f})"
        )
    return round(min(high, halfway), THRESHOLD_DECIMALS), why


def nearest_neighbour_cosines(
    features: np.ndarray, rows: np.ndarray, seed: int = 0, device: str = "auto", sample: int = NEIGHBOUR_QUERIES
) -> np.ndarray:
    """The cosine of each of `rows` (at most `sample` of them, drawn with `seed`) to its most similar other row of
    `rows`: by pipeline.heads.neighbors' exact search, each row's two nearest, itself being one of them (or, among
    identical rows, another copy at the same cosine)."""
    rows = np.asarray(rows)
    queries = rows if len(rows) <= sample else np.sort(np.random.default_rng(seed).choice(rows, sample, replace=False))
    on = "cuda" if use_cuda(device, "audit.device") else None
    cosines, positions = top_k(features, features, 2, query_rows=queries, reference_rows=rows, device=on)
    itself = rows[positions[:, 0]] == queries
    return np.where(itself, cosines[:, 1], cosines[:, 0]).astype(np.float64)


def cross_split_duplicates(store: FeatureStore, threshold: float, device: str = "auto") -> list[DuplicatePair]:
    """Every pair of images in different splits with embedding cosine >= `threshold` (as reported, to 6
    decimals), and every pair of identical files (same sha256) in different splits; each unordered pair once,
    most similar first.

    Exact: each val and test row is compared with every train row, then each test row with every val row, by
    pipeline.heads.neighbors' blocked search (`device`: auto, cpu or cuda, where it runs; auto is a CUDA GPU when
    there is one). Memory holds the store, one block of cosines and the pairs found, never an N x N matrix; the
    rows are read where they lie in the store. Every pair, not k nearest neighbours: it cannot miss the (k+1)-th
    copy of a photo. The answer grows with the pairs above the threshold, so a threshold far below near-copies'
    (0.5) lists most pairs of a class; `duplicate_threshold` says which threshold (auto: from the embeddings).
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    on = "cuda" if use_cuda(device, "audit.device") else None
    found: dict[tuple[int, int], tuple[float, bool]] = {}
    train, val, test = (np.flatnonzero(store.split == SPLIT_CODES[s]) for s in ("train", "val", "test"))
    for reference, queries in ((train, np.concatenate([val, test])), (val, test)):
        for i, j, similarity in _near_pairs(store.features, reference, queries, threshold, on):
            found[(i, j)] = (similarity, False)
    for i, j in _identical_files(store):
        found[(i, j)] = (1.0, True)
    pairs = [_pair(store, i, j, similarity, exact) for (i, j), (similarity, exact) in found.items()]
    return sorted(pairs, key=lambda p: (-p.similarity, p.path_a, p.path_b))


def _near_pairs(
    features: np.ndarray, reference: np.ndarray, queries: np.ndarray, threshold: float, device: str | None
) -> Iterator[tuple[int, int, float]]:
    """(reference row, query row, cosine) for each query row's reference rows with cosine >= `threshold`."""
    if not len(reference) or not len(queries):
        return
    q, r, _ = pairs_at_least(
        features, features, threshold - SEARCH_MARGIN, query_rows=queries, reference_rows=reference, device=device
    )
    for start in range(0, len(q), PAIR_BLOCK):
        i, j = reference[r[start : start + PAIR_BLOCK]], queries[q[start : start + PAIR_BLOCK]]
        cosine = np.round(_cosine(features[i], features[j]), SIMILARITY_DECIMALS)
        keep = cosine >= threshold
        yield from zip(i[keep].tolist(), j[keep].tolist(), cosine[keep].tolist(), strict=True)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [P, D] blocks in float64, clipped to [-1, 1] (0 where a row is all zero)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    return np.clip(np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0), -1.0, 1.0)


def _identical_files(store: FeatureStore) -> Iterator[tuple[int, int]]:
    """(earlier row, later row) for every two rows in different splits with the same sha256."""
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, sha in enumerate(store.sha256):
        rows_of[sha].append(i)
    for rows in rows_of.values():
        for k, i in enumerate(rows):
            for j in rows[k + 1 :]:
                if store.split[i] != store.split[j]:
                    yield (i, j) if store.split[i] < store.split[j] else (j, i)


def _pair(store: FeatureStore, i: int, j: int, similarity: float, exact: bool) -> DuplicatePair:
    classes = store.classes
    return DuplicatePair(
        path_a=store.paths[i],
        split_a=SPLIT_NAMES[int(store.split[i])],
        class_a=classes[int(store.labels[i])],
        path_b=store.paths[j],
        split_b=SPLIT_NAMES[int(store.split[j])],
        class_b=classes[int(store.labels[j])],
        similarity=round(similarity, SIMILARITY_DECIMALS),
        exact=exact,
    )


def label_issues(store: FeatureStore, folds: int = 5, seed: int = 0, C: float = 1.0) -> list[LabelIssue]:
    """The train and val images cleanlab finds likely mislabelled, most suspicious first.

    Out-of-fold class probabilities from StandardScaler + LogisticRegression at `C` (stratified, shuffled, seeded
    k-fold: every image is scored by a head that never saw it), then `cleanlab.filter.find_label_issues`
    ranked by self-confidence. `folds` is lowered to the smallest class's size; below 2 there is nothing to
    cross-validate and the answer is empty (the reason is logged). Test rows are never read.
    """
    rows = np.flatnonzero(np.isin(store.split, [SPLIT_CODES["train"], SPLIT_CODES["val"]]))
    present, labels = np.unique(store.labels[rows], return_inverse=True)  # classes absent from train+val dropped
    smallest = int(np.bincount(labels).min()) if len(rows) else 0
    if len(present) < 2 or min(folds, smallest) < 2:
        log.warning(
            "label issues not searched: train+val hold %d classes, the smallest with %d images; cross-validation "
            "needs two classes and two images of each (and folds >= 2, given %d)",
            *(len(present), smallest, folds),
        )
        return []
    pred_probs = _out_of_fold_proba(store.features, rows, labels, min(folds, smallest), seed, C)
    ranked = find_label_issues(labels, pred_probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    scores = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    classes = store.classes
    return [
        LabelIssue(
            path=store.paths[rows[i]],
            split=SPLIT_NAMES[int(store.split[rows[i]])],
            given_class=classes[int(present[labels[i]])],
            suggested_class=classes[int(present[pred_probs[i].argmax()])],
            score=round(float(scores[i]), 6),
        )
        for i in ranked
    ]


def _out_of_fold_proba(
    features: np.ndarray, rows: np.ndarray, labels: np.ndarray, folds: int, seed: int, C: float
) -> np.ndarray:
    """Each of `rows`' class probabilities from the head fitted on the other folds: StandardScaler + logistic
    regression at C, fitted as the logreg head is (pipeline.heads.linear.fit_logistic), reading the store's
    rows a block at a time (no copy of a fold). Each fold's fit starts from the previous fold's solution: the
    objective has one minimum, and the start only moves where the solver stops within its tolerance (tol 1e-4 on
    the largest gradient entry; how far that moves a probability is not measured), in fewer iterations (at 10^5
    rows x 100 classes: 32 for the first fold, 12-23 for the others). One preconditioner, built on all of `rows`,
    serves every fold (linear.shared_preconditioner)."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba, model = np.zeros((len(rows), int(labels.max()) + 1)), None
    preconditioner = shared_preconditioner(features, labels, rows)
    for fit, held in splitter.split(np.zeros((len(rows), 1)), labels):
        model = fit_logistic(features, labels[fit], C, take=rows[fit], start=model, preconditioner=preconditioner)
        proba[held] = predict_proba_rows(model, features, rows[held])
    return proba


def misclassified(predictions: list[dict]) -> list[dict]:
    """A model's answers (`pipeline.results.metrics.read_predictions` rows) that are wrong, the most confident first
    (ties by path)."""
    wrong = [row for row in predictions if row["predicted"] != row["actual"]]
    return sorted(wrong, key=lambda row: (-float(row["confidence"]), row["path"]))


def table(kind: type[DuplicatePair] | type[LabelIssue], items: Sequence) -> tuple[list[str], list[tuple]]:
    """A header (the field names) and one row per item, for `pipeline.core.io.write_csv`."""
    header = [field.name for field in dataclasses.fields(kind)]
    return header, [dataclasses.astuple(item) for item in items]


def copies_in_test(pairs: list[DuplicatePair]) -> list[tuple[str, str]]:
    """Each test image that copies a train or val image, once (its closest copy), with the reason in words."""
    copies = {}
    for p in pairs:  # most similar first: the first pair of an image is its closest copy
        if p.split_b == "test" and p.split_a != "test" and p.path_b not in copies:
            how = "identical to" if p.exact else f"near-copy (cosine {p.similarity:.3f}) of"
            copies[p.path_b] = f"{how} {p.path_a} ({p.split_a})"
    return sorted(copies.items())


TEST_COPIES = "test_copies.csv"


def write_audit(
    out: Path,
    data_root: Path,
    found: tuple[list[DuplicatePair], list[LabelIssue], dict[str, list[dict]]],
    top: int,
) -> dict:
    """Write the audit's CSVs and picture grids into `out`, and return its counts (for metrics/audit.json).

    `found`: the cross-split pairs, the label issues, and each model's misclassified test images. The grids
    show the `top` first of each list; the CSVs hold them all.
    """
    pairs, issues, wrong = found
    write_csv(out / "duplicates.csv", *table(DuplicatePair, pairs))
    write_csv(out / "label_issues.csv", *table(LabelIssue, issues))
    copies = copies_in_test(pairs)
    write_csv(out / TEST_COPIES, ("path", "reason"), copies)
    cells = [
        {"images": [data_root / p.path_a, data_root / p.path_b],
         "caption": f"{p.path_a} ({p.split_a}) ~ {p.path_b} ({p.split_b})\n"
                    f"{'identical files' if p.exact else f'cosine {p.similarity:.3f}'}"}
        for p in pairs[:top]
    ]  # fmt: skip
    thumbnails.thumbnail_grid_png(cells, f"Near-copies across splits ({len(pairs)} pairs)", out / "duplicates.png", 3)
    cells = [
        {"images": [data_root / i.path],
         "caption": f"{i.path}\ngiven: {i.given_class} -> suggested: {i.suggested_class}\nscore {i.score:.3f}"}
        for i in issues[:top]
    ]  # fmt: skip
    thumbnails.thumbnail_grid_png(cells, f"Likely label errors ({len(issues)})", out / "label_issues.png")
    for model, rows in wrong.items():
        write_csv(
            out / f"misclassified_{model}.csv", PREDICTIONS_HEADER, [[r[k] for k in PREDICTIONS_HEADER] for r in rows]
        )
        cells = [
            {"images": [data_root / r["path"]],
             "caption": f"{r['path']}\ntrue: {r['actual']} / predicted: {r['predicted']} ({r['confidence']:.2f})"}
            for r in rows[:top]
        ]  # fmt: skip
        title = f"{model}: misclassified test images ({len(rows)}), the most confident first"
        thumbnails.thumbnail_grid_png(cells, title, out / f"misclassified_{model}.png")
    return {
        "cross_split_pairs": len(pairs),
        "cross_split_exact_pairs": sum(p.exact for p in pairs),
        "label_issues": len(issues),
        "test_copies": len(copies),
        **{f"misclassified_{model}": len(rows) for model, rows in wrong.items()},
    }


def label_issue_C(setting: float | str, files: list[HeadFile], heads: dict[str, HeadParams]) -> tuple[float, str]:
    """audit.C resolved, and why: a number as given; auto: the C of the first logreg head among `files` (the audit
    backbone's), as chosen on val, else 1.0."""
    if setting != "auto":
        return float(setting), "audit.C"
    for file in files:
        if heads[file.name].kind == "logreg":
            return float(file.load().model[-1].C), f"auto: the C heads.{file.name} chose"
    return 1.0, "auto: no logreg head, scikit-learn's default"


@dataclass(frozen=True)
class AuditRun:
    """What `run_audit` found: the threshold and C it used and why, its counts, how long its two searches took."""

    threshold: float
    threshold_reason: str
    C: float
    C_reason: str
    counts: dict
    wrong: dict[str, int]  # model -> test images it gets wrong
    seconds: tuple[float, float]  # the near-copy search, the label-issue fits

    def summary(self) -> dict:
        """metrics/audit.json: the threshold and the counts."""
        return {"duplicate_threshold": self.threshold, **self.counts}

    def lines(self, out: Path) -> list[str]:
        """What the stage prints."""
        wrong = ", ".join(f"{n} test images {m} gets wrong" for m, n in self.wrong.items())
        return [
            f"audit: duplicate_threshold {self.threshold} ({self.threshold_reason})",
            f"audit: {self.counts['cross_split_pairs']} near-copies across splits (cosine >= {self.threshold}), "
            f"{self.counts['label_issues']} likely label errors, {wrong} -> {out}",
            f"audit: label issues from out-of-fold logistic regression at C={self.C} ({self.C_reason})",
            f"audit: near-copy search {self.seconds[0]:.1f}s, label issues {self.seconds[1]:.1f}s",
        ]


def run_audit(
    store: FeatureStore,
    files: list[HeadFile],
    models: list[str],
    settings: AuditParams,
    heads: dict[str, HeadParams],
    paths: tuple[Path, Path, Path],
) -> AuditRun:
    """The audit stage's work: near-copies across splits, likely label errors (at `label_issue_C` of `files`, the
    audit backbone's heads), and each of `models`' misclassified test images; `paths`: (the folder of each model's
    predictions.csv, the data root, the output folder), where the CSVs, grids and duplicate_threshold.json go."""
    metrics, data, out = paths
    start = time.perf_counter()
    threshold, why = duplicate_threshold(store, settings.duplicate_threshold, settings.seed, settings.device)
    pairs = cross_split_duplicates(store, threshold, settings.device)
    searched = time.perf_counter()
    C, C_why = label_issue_C(settings.C, files, heads)
    issues = label_issues(store, settings.folds, settings.seed, C)
    fitted = time.perf_counter()
    wrong = {m: misclassified(read_predictions(metrics / m / "predictions.csv")) for m in models}
    counts = write_audit(out, data, (pairs, issues, wrong), settings.top)
    write_json(
        out / "duplicate_threshold.json",
        {"setting": settings.duplicate_threshold, "threshold": threshold, "reason": why},
    )
    wrong_counts = {m: len(rows) for m, rows in wrong.items()}
    return AuditRun(threshold, why, C, C_why, counts, wrong_counts, (searched - start, fitted - searched))
