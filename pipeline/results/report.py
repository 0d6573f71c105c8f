"""The strategy report: every model's costs and scores side by side with their uncertainty, a paired comparison
of fine-tuning with the chosen head, learning curves and per-model pictures.

`build_report` gathers them: the rows (model_rows), the advice (advice), the markdown (markdown); `write_figures`
draws the pictures (charts).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import EvaluateParams
from pipeline.core.errors import PipelineError
from pipeline.finetuning.names import FINETUNE, FINETUNE_WISE
from pipeline.heads.persistence import HeadFile
from pipeline.heads.trained import chosen_head
from pipeline.results import charts
from pipeline.results.advice import choice_of_head, recommend, wise_words
from pipeline.results.answers import Answers, paired
from pipeline.results.markdown import audit_section, backbone_section, per_class_accuracy, render, test_split_note
from pipeline.results.metrics import rescored
from pipeline.results.model_rows import ModelRow, feature_extraction_rows, finetune_row, read_model_metrics


@dataclass(frozen=True)
class Report:
    markdown: str
    rows: list[ModelRow]
    recommendation: str
    chosen: str  # the head compared with fine-tuning (pipeline.heads.trained.chosen_head)
    classes: list[str]


def build_report(
    files: list[HeadFile],
    answers: Answers,
    finetuned: Path | None,
    extraction: dict[str, dict],
    curves: tuple[list[dict], list[dict]],
    audit: dict | None = None,
    scoring: EvaluateParams | None = None,
    wise: Path | None = None,
) -> Report:
    """Markdown, its rows and its advice. `files`: every (backbone, head) pair; `extraction`: each backbone's
    extract metrics by label (cost, feature size, LogME, parameters, forward milliseconds). `answers`: each model's
    test answers, without the test images left out (their scores are then computed again, with `scoring`'s bins and
    bootstrap). `curves`: the learning curve of the chosen head (the `learning_curve` stage) and fine-tuning's on
    subsets (the `finetune_curve` stage; empty when not asked for). `audit`: the audit stage's counts, when it ran.
    `wise`: the finetune_wise stage's model folder (WiSE-FT), a row of its own beside fine-tuning's."""
    heads, rows, classes = feature_extraction_rows(files, answers, extraction, scoring)
    curve, tuned_curve = curves
    if not curve or any("runs" not in point for point in curve):
        raise PipelineError(
            "the learning curve has no point, or was written before the few-shot protocol (no runs per seed); "
            "run `dvc repro learning_curve`"
        )
    chosen = chosen_head(heads)
    tuned, comparison = None, None
    if finetuned is not None and (answers.metrics_dir / FINETUNE / "metrics.json").is_file():
        tuned_metrics = read_model_metrics(answers.metrics_dir, [FINETUNE])[FINETUNE]
        if answers.excluded:
            tuned_metrics = rescored(tuned_metrics, answers.of(FINETUNE), classes, scoring or EvaluateParams())
        tuned = finetune_row(finetuned, tuned_metrics, extraction)
        rows.append(tuned)
        comparison = paired(answers, FINETUNE, chosen.model_name)
    wise_note = []
    if tuned is not None and wise is not None and (answers.metrics_dir / FINETUNE_WISE / "metrics.json").is_file():
        wise_metrics = read_model_metrics(answers.metrics_dir, [FINETUNE_WISE])[FINETUNE_WISE]
        if answers.excluded:
            wise_metrics = rescored(wise_metrics, answers.of(FINETUNE_WISE), classes, scoring or EvaluateParams())
        wise_row = finetune_row(wise, wise_metrics, extraction, FINETUNE_WISE)
        rows.append(wise_row)
        wise_note = ["", wise_words(wise_row, tuned, paired(answers, FINETUNE_WISE, FINETUNE))]
    head_row = next(r for r in rows if r.name == chosen.model_name)
    advice = recommend(head_row, tuned, comparison)
    intro = [f"**Recommendation.** {advice}", "", choice_of_head(heads, chosen, rows), *wise_note]
    intro += test_split_note(answers)
    per_class = per_class_accuracy(answers, [r.name for r in sorted(rows, key=lambda r: -r.accuracy)], classes)
    sections = per_class + (audit_section(audit) if audit else [])
    ranking = backbone_section(extraction, heads, rows)
    markdown = render(rows, intro, curve, curve[0]["model"], ranking, tuned_curve, sections)
    return Report(markdown, rows, advice, chosen.model_name, classes)


def write_figures(
    rows: list[ModelRow],
    answers_of: Answers,
    classes: list[str],
    curves: tuple[list[dict], str, list[dict] | None],
    out_dir: Path,
    ece_bins: int,
) -> None:
    """The report's PNGs: learning curve, accuracy against training time, and per model its confusion matrix
    and reliability diagram (drawn from its predictions.csv)."""
    curve, curve_head, tuned_curve = curves
    tuned = [r for r in rows if r.strategy == "fine_tuning"]
    charts.learning_curve_png(
        curve, curve_head, out_dir / "learning_curve.png", tuned_curve, tuned[0].accuracy if tuned else None
    )
    points = [
        {"name": r.name, "strategy": r.strategy, "seconds": r.train_seconds, "accuracy": r.accuracy,
         "low": r.scores["accuracy_low"], "high": r.scores["accuracy_high"]}
        for r in rows
    ]  # fmt: skip
    charts.accuracy_vs_time_png(points, out_dir / "accuracy_vs_time.png")
    for r in rows:
        answers = answers_of.of(r.name)
        actual, predicted = [a["actual"] for a in answers], [a["predicted"] for a in answers]
        charts.confusion_png(actual, predicted, classes, f"{r.name} on the test split", out_dir / "models" /
                              f"{r.name}_confusion.png")  # fmt: skip
        charts.reliability_png(
            np.array([a["confidence"] for a in answers]),
            np.array(actual) == np.array(predicted),
            float(r.scores["ece"]),
            ece_bins,
            f"{r.name} on the test split",
            out_dir / "models" / f"{r.name}_reliability.png",
        )


def summary(report: Report, where: Path) -> str:
    """A few lines for the console at the end of `make run`: the advice, every model's test accuracy with its
    interval, and where the report is."""
    lines = [f"Feature extraction or fine-tuning? Full report: {where}", ""]
    lines += textwrap.wrap(report.recommendation, width=100)
    lines.append("")
    width = max(len(r.name) for r in report.rows)
    for r in sorted(report.rows, key=lambda r: -r.accuracy):
        s, note = r.scores, " (the chosen head)" if r.name == report.chosen else ""
        lines.append(
            f"  {r.name:<{width}} test accuracy {r.accuracy:.4f} (95% interval {s['accuracy_low']:.4f}-"
            f"{s['accuracy_high']:.4f}), {r.train_seconds:.0f} s to train{note}"
        )
    return "\n".join(lines) + "\n"
