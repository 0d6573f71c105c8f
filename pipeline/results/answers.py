"""Each model's test answers as the report reads them (without the test images that copy training images), and
the image-by-image comparison of two models on them."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.results.metrics import read_predictions
from pipeline.results.stats import Comparison, compare


@dataclass(frozen=True)
class Answers:
    """Each model's test answers (`metrics_dir`/<model>/predictions.csv), without the `excluded` test images
    (audit.drop_cross_split_duplicates: the copies of train or val images)."""

    metrics_dir: Path
    excluded: frozenset[str] = frozenset()

    read: dict[str, list[dict]] = field(default_factory=dict, compare=False, repr=False)

    def of(self, model: str) -> list[dict]:
        """Read once per Answers: the scores, the paired test, the per-class table and the pictures share it."""
        if model not in self.read:
            rows = read_predictions(Path(self.metrics_dir) / model / "predictions.csv")
            self.read[model] = [row for row in rows if row["path"] not in self.excluded]
        return self.read[model]


def read_copies_in_test(path: Path) -> frozenset[str]:
    """The test images the audit found copying a train or val image (its test_copies.csv: path, reason)."""
    if not Path(path).is_file():
        raise PipelineError(f"{path} not found; run the audit stage (dvc repro) before the report")
    with open(path, newline="", encoding="utf-8") as f:
        return frozenset(row["path"] for row in csv.DictReader(f))


def paired(answers_of: Answers, a: str, b: str) -> Comparison:
    """Compare models `a` and `b` image by image on their shared test split (their predictions.csv files)."""
    answers = {name: answers_of.of(name) for name in (a, b)}
    truth = {name: {r["path"]: r["actual"] for r in rows} for name, rows in answers.items()}
    if truth[a] != truth[b]:
        common = set(truth[a]) & set(truth[b])
        raise PipelineError(
            f"{a} and {b} were scored on different test images or labels ({len(truth[a])} and {len(truth[b])} "
            f"images, {len(common)} paths in common); run `dvc repro` so both score the same split"
        )
    right = {name: {r["path"]: r["actual"] == r["predicted"] for r in rows} for name, rows in answers.items()}
    paths = sorted(right[a])
    return compare(np.array([right[a][p] for p in paths]), np.array([right[b][p] for p in paths]))
