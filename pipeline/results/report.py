"""The strategy report: every model's costs and scores side by side with their uncertainty, a paired comparison
of fine-tuning with the chosen head, learning curves and per-model pictures."""

from __future__ import annotations

import csv
import json
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.core.config import EvaluateParams
from pipeline.core.errors import PipelineError
from pipeline.features.backbones import backbone_of_store
from pipeline.features.store import FeatureStore, read_store
from pipeline.finetuning.model import load_finetuned
from pipeline.heads.trained import HeadFile, TrainedHead, chosen_head, held_out, load_head
from pipeline.results import charts
from pipeline.results.metrics import read_predictions, rescored
from pipeline.results.stats import Comparison, compare, rank_correlation


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


@dataclass(frozen=True)
class ModelRow:
    name: str
    strategy: str  # feature_extraction or fine_tuning
    layers_trained: str
    params_updated: int
    params_total: int  # of the whole network that classifies an image: backbone + output layer
    train_seconds: float  # what it took to get this model: heads include the one-off extraction
    fit_seconds: float  # the model's own training: a head's fit alone
    inference_ms: float  # per image, batch of 32, on this machine
    scores: dict  # the model's test metrics (metrics.json): accuracy, macro_f1, ece and their intervals
    train_accuracy: float
    chosen_on: str = ""  # heads: the held-out rows their grid was scored on, and the score

    @property
    def accuracy(self) -> float:
        return float(self.scores["accuracy"])

    @property
    def gap(self) -> float:
        """Train accuracy - test accuracy: the overfitting gap."""
        return self.train_accuracy - self.accuracy

    @property
    def fraction_updated(self) -> float:
        return self.params_updated / self.params_total


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def median_ms_per_row(run: Callable[[], object], n_rows: int, repeats: int = 5) -> float:
    """Median milliseconds per row of `repeats` timed calls of `run` (after one untimed warm-up call)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / max(1, n_rows)


def forward_ms_per_image(network: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """A network's forward pass on `x`, in milliseconds per row (in eval mode, without autograd)."""
    with torch.inference_mode():
        network.eval()
        return median_ms_per_row(lambda: network(x), len(x), repeats)


def backbone_ms(backbone: torch.nn.Module, image_size: int, batch: int = 32) -> float:
    """The frozen backbone's forward pass per image: measured once and shared by every model built on it, so
    that the noise of two measurements cannot rank identical work differently."""
    return forward_ms_per_image(backbone, torch.randn(batch, 3, image_size, image_size))


def head_ms(head: TrainedHead, features: np.ndarray, repeats: int = 5) -> float:
    """A head's own cost per image on cached features (over at most 1,000 rows)."""
    rows = features[:1000]
    return median_ms_per_row(lambda: head.predict_proba(rows), len(rows), repeats)


def head_rows(
    store: FeatureStore, heads: list[TrainedHead], metrics: dict[str, dict], extract_seconds: float
) -> tuple[list[ModelRow], float]:
    """One row per head (the backbone is frozen, only the head's numbers are learned), and the backbone's
    forward milliseconds per image, which every head's inference includes."""
    backbone = backbone_of_store(store.attrs)
    backbone_params = count_parameters(backbone.features)
    shared_ms = backbone_ms(backbone.features, int(store.attrs["image_size"]))
    x_train, y_train = store.subset("train")
    rows = []
    for head in heads:
        m = metrics[head.model_name]
        rows.append(
            ModelRow(
                name=head.model_name,
                strategy="feature_extraction",
                layers_trained=f"new {head.kind} head only (backbone frozen)",
                params_updated=head.trainable_params,
                params_total=backbone_params + head.trainable_params,
                train_seconds=extract_seconds + float(m["fit_seconds"]),
                fit_seconds=float(m["fit_seconds"]),
                inference_ms=shared_ms + head_ms(head, x_train),
                scores=m,
                train_accuracy=float((head.predict_proba(x_train).argmax(1) == y_train).mean()),
                chosen_on=f"{held_out(head)['val_accuracy']:.4f} ({_short(head.selection)})",
            )
        )
    return rows, shared_ms


def _short(selection: str) -> str:
    """ "5-fold cross-validation on train+val (...)" -> "5-fold CV"; "the val split (...)" -> "val"."""
    return selection.split(" cross-validation")[0] + " CV" if "cross-validation" in selection else "val"


def finetune_row(model_dir: Path, metrics: dict, timings: dict[str, tuple[dict, float]]) -> ModelRow:
    """The fine-tuned network's row. Built on a store's backbone at that store's image size (`timings`: each
    store's attributes and its backbone's forward milliseconds by label), its inference is that same shared
    forward pass plus its new output layer; otherwise its whole network is timed."""
    model, config, preprocessing = load_finetuned(model_dir)
    training = config["training"]
    same = [
        ms
        for attrs, ms in timings.values()
        if config["backbone"] == attrs.get("backbone") and preprocessing.crop == attrs.get("image_size")
    ]
    if same:
        inference = same[0] + forward_ms_per_image(model.head, torch.randn(32, model.head.in_features))
    else:
        inference = forward_ms_per_image(model, torch.randn(32, 3, preprocessing.crop, preprocessing.crop))
    return ModelRow(
        name="finetune",
        strategy="fine_tuning",
        layers_trained=f"last {config['unfrozen_blocks']} of {config['total_blocks']} blocks + new output layer",
        params_updated=int(training["trainable_params"]),
        params_total=count_parameters(model),
        train_seconds=float(training["train_seconds"]),
        fit_seconds=float(training["train_seconds"]),
        inference_ms=inference,
        scores=metrics,
        train_accuracy=float(training["train_accuracy"]),
    )


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


def _with_interval(row: ModelRow) -> str:
    s = row.scores
    return f"{row.accuracy:.1%}, 95% interval {s['accuracy_ci95_low']:.1%} to {s['accuracy_ci95_high']:.1%}"


def recommend(head: ModelRow, tuned: ModelRow | None, comparison: Comparison | None) -> str:
    """Plain words computed from the numbers: which strategy, and why. `comparison` is fine-tuning (a) against
    the chosen head (b) on the same test images; with no measurable difference the cheaper run is advised."""
    if tuned is None or comparison is None:
        return f"Only feature extraction was measured: {head.name} reaches {_with_interval(head)} test accuracy."
    c, n = comparison, int(head.scores["n_test"])
    evidence = (
        f"on the same {n} test images they disagree on {c.mcnemar.a_only + c.mcnemar.b_only}: "
        f"{c.mcnemar.a_only} right only after fine-tuning, {c.mcnemar.b_only} only with {head.name} (McNemar's "
        f"exact test p = {c.mcnemar.p_value:.3g}; the difference is {100 * c.difference:+.1f} points, exact 95% "
        f"interval {100 * c.interval[0]:+.1f} to {100 * c.interval[1]:+.1f})"
    )
    costs = f"{tuned.train_seconds:.0f} s of fine-tuning against {head.train_seconds:.0f} s for {head.name} "
    costs += "including extraction"
    if c.verdict == "a":
        return (
            f"Fine-tuning ({_with_interval(tuned)}) is more accurate than {head.name} on frozen features "
            f"({_with_interval(head)}): {evidence}; it costs {costs}. Use fine-tuning."
        )
    if c.verdict == "b":
        return (
            f"{head.name} on frozen features ({_with_interval(head)}) is more accurate than fine-tuning "
            f"({_with_interval(tuned)}): {evidence}; it costs {costs}. Use feature extraction."
        )
    cheaper = "feature extraction" if head.train_seconds <= tuned.train_seconds else "fine-tuning"
    return (
        f"No measurable difference between fine-tuning ({_with_interval(tuned)}) and {head.name} on frozen "
        f"features ({_with_interval(head)}): {evidence}. Choose on cost ({costs}): use {cheaper}."
    )


def choice_of_head(heads: list[TrainedHead], chosen: TrainedHead, rows: list[ModelRow]) -> str:
    """How the head compared with fine-tuning was chosen, and what the test split would have said."""
    text = (
        f"**Head.** {chosen.model_name}, chosen among {len(heads)} heads by its held-out accuracy "
        f"({held_out(chosen)['val_accuracy']:.4f}) on {chosen.selection}. Ties go to the first in params.yaml."
    )
    best_on_test = max((r for r in rows if r.strategy == "feature_extraction"), key=lambda r: r.accuracy)
    if best_on_test.name != chosen.model_name:
        text += (
            f" {best_on_test.name} scores higher on test ({best_on_test.accuracy:.4f} against "
            f"{next(r for r in rows if r.name == chosen.model_name).accuracy:.4f}), but the test split only scores: a "
            "head chosen on it would report an optimistic accuracy."
        )
    return text


def render(
    rows: list[ModelRow],
    intro: list[str],
    curve: list[dict],
    curve_head: str,
    backbones: list[str],
    tuned_curve: list[dict] | None = None,
    sections: list[str] | None = None,
) -> str:
    """The report's markdown; `backbones`: its Backbones section, after the models' table; `sections` (lines) come
    after the per-model pictures."""
    lines = ["# Feature extraction or fine-tuning?", "", *intro, "", *_table(rows)]
    lines += [
        "",
        "Training seconds of a head are the one-off extraction of its backbone's features (shared by every head on "
        "them: see Backbones) plus its own fit, in brackets. Inference is the backbone's forward pass, measured "
        "once for every model built on it (median of 5 batches of 32 on this machine), plus each model's own "
        "output layer. Intervals: Wilson's for accuracy, a bootstrap over test images for macro-F1. The "
        "fine-tuned model's train accuracy is the one seen during its best epoch.",
        "",
        *backbones,
        "",
        f"## Learning curve ({curve_head} on frozen features)",
        "",
        "| training images per class | test accuracy (mean) | spread (std over seeds) |",
        "|---|---|---|",
        *[f"| {p['label']} ({p['per_class']}) | {p['accuracy']:.4f} | {p['std']:.4f} |" for p in curve],
        "",
    ]
    if tuned_curve:
        lines += [
            "Fine-tuning on subsets (one seed each, new layer from random weights):",
            "",
            "| training images per class | test accuracy |",
            "|---|---|",
            *[f"| {p['per_class']} | {p['accuracy']:.4f} |" for p in tuned_curve],
            "",
        ]
    lines += ["![learning curve](learning_curve.png)", "", "![accuracy against training time](accuracy_vs_time.png)"]
    lines += ["", "## Each model on the test split", ""]
    for r in sorted(rows, key=lambda r: -r.accuracy):
        lines += [f"![{r.name}: confusion matrix](models/{r.name}_confusion.png) "
                  f"![{r.name}: reliability diagram](models/{r.name}_reliability.png)", ""]  # fmt: skip
    return "\n".join([*lines, *(sections or [])])


PER_CLASS_ROWS = 30  # above this many classes, the per-class table keeps the classes hardest on average


def per_class_accuracy(answers_of: Answers, models: list[str], classes: list[str]) -> list[str]:
    """Markdown: each class's test accuracy (right / images) for every model, from their predictions.csv.
    With many classes, the PER_CLASS_ROWS classes with the lowest mean accuracy over the models."""
    table = {(model, name): (0, 0) for model in models for name in classes}
    for model in models:
        for a in answers_of.of(model):  # one pass over the answers, whatever the number of classes
            right, seen = table[model, a["actual"]]
            table[model, a["actual"]] = (right + (a["predicted"] == a["actual"]), seen + 1)
    mean = {c: np.mean([r / n if n else 1.0 for r, n in (table[m, c] for m in models)]) for c in classes}
    shown = sorted(classes, key=lambda c: mean[c])[:PER_CLASS_ROWS] if len(classes) > PER_CLASS_ROWS else classes
    title = "## Accuracy per class" + (f" (the {PER_CLASS_ROWS} hardest classes)" if shown is not classes else "")
    lines = [title, "", "| class | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for c in shown:
        cells = [f"{r / n:.3f} ({r}/{n})" if n else "-" for r, n in (table[m, c] for m in models)]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _table(rows: list[ModelRow]) -> list[str]:
    """Every model's row, the most accurate first."""
    lines = [
        "| model | strategy | layers trained | parameters updated | share of the network | training s "
        "| inference ms/image | held-out accuracy | test accuracy (95% interval) "
        "| macro-F1 (95% interval) | ECE | train accuracy | overfitting gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r.accuracy):
        s = r.scores
        seconds = f"{r.train_seconds:.1f}" + (f" ({r.fit_seconds:.2f})" if r.strategy == "feature_extraction" else "")
        lines.append(
            f"| {r.name} | {r.strategy.replace('_', ' ')} | {r.layers_trained} | {r.params_updated:,} | "
            f"{r.fraction_updated:.2%} | {seconds} | {r.inference_ms:.2f} | {r.chosen_on or '-'} | "
            f"{r.accuracy:.4f} ({s['accuracy_ci95_low']:.4f}-{s['accuracy_ci95_high']:.4f}) | "
            f"{s['macro_f1']:.4f} ({s['macro_f1_ci95_low']:.4f}-{s['macro_f1_ci95_high']:.4f}) | {s['ece']:.4f} | "
            f"{r.train_accuracy:.4f} | {r.gap:+.4f} |"
        )
    return lines


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
         "low": r.scores["accuracy_ci95_low"], "high": r.scores["accuracy_ci95_high"]}
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


INTERVAL_KEYS = {"accuracy_ci95_low", "accuracy_ci95_high", "macro_f1_ci95_low", "macro_f1_ci95_high"}


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
) -> Report:
    """Markdown, its rows and its advice. `files`: every (backbone, head) pair; `extraction`: each backbone's
    extract metrics by label (cost, feature size, LogME). `answers`: each model's test answers, without the test
    images left out (their scores are then computed again, with `scoring`'s bins and bootstrap). `curves`: the
    learning curve of the chosen head (the `learning_curve` stage) and fine-tuning's on subsets (the
    `finetune_curve` stage; empty when not asked for). `audit`: the audit stage's counts, when it ran."""
    heads, rows, timings, classes = feature_extraction_rows(files, answers, extraction, scoring)
    curve, tuned_curve = curves
    if not curve:
        raise PipelineError(
            "the learning curve has no point: every training subset was too small for the chosen head "
            "(see learning_curve.sizes)"
        )
    chosen = chosen_head(heads)
    tuned, comparison = None, None
    if finetuned is not None and (answers.metrics_dir / "finetune" / "metrics.json").is_file():
        tuned_metrics = _read_metrics(answers.metrics_dir, ["finetune"])["finetune"]
        if answers.excluded:
            tuned_metrics = rescored(tuned_metrics, answers.of("finetune"), classes, scoring or EvaluateParams())
        tuned = finetune_row(finetuned, tuned_metrics, timings)
        rows.append(tuned)
        comparison = paired(answers, "finetune", chosen.model_name)
    head_row = next(r for r in rows if r.name == chosen.model_name)
    advice = recommend(head_row, tuned, comparison)
    intro = [f"**Recommendation.** {advice}", "", choice_of_head(heads, chosen, rows), *_left_out(answers)]
    per_class = per_class_accuracy(answers, [r.name for r in sorted(rows, key=lambda r: -r.accuracy)], classes)
    sections = per_class + (audit_section(audit) if audit else [])
    ranking = backbone_section(extraction, heads, rows)
    markdown = render(rows, intro, curve, curve[0]["model"], ranking, tuned_curve, sections)
    return Report(markdown, rows, advice, chosen.model_name, classes)


def feature_extraction_rows(
    files: list[HeadFile], answers: Answers, extraction: dict[str, dict], scoring: EvaluateParams | None
) -> tuple[list[TrainedHead], list[ModelRow], dict[str, tuple[dict, float]], list[str]]:
    """Every head with its row, backbone by backbone (one store in memory at a time); each backbone's store
    attributes and forward milliseconds by label; the class names."""
    heads, rows, timings, classes = [], [], {}, []
    for label in dict.fromkeys(f.backbone for f in files):
        mine = [f for f in files if f.backbone == label]
        store = read_store(mine[0].store)
        trained = [load_head(f.path, store) for f in mine]
        classes, metrics = store.classes, _read_metrics(answers.metrics_dir, [h.model_name for h in trained])
        if answers.excluded:
            for h in trained:
                name = h.model_name
                metrics[name] = rescored(metrics[name], answers.of(name), classes, scoring or EvaluateParams())
        new_rows, shared_ms = head_rows(store, trained, metrics, extraction_seconds(extraction, label))
        heads, rows, timings[label] = heads + trained, rows + new_rows, (store.attrs, shared_ms)
    return heads, rows, timings, classes


def extraction_seconds(extraction: dict[str, dict], label: str) -> float:
    """The cost of computing every embedding of the backbone's store, even those a rerun took from the cache."""
    seconds = extraction.get(label, {}).get("extraction_seconds")
    if seconds is None:
        raise PipelineError(
            f"the extract metrics of {label} have no extraction cost: the embedding cache holds embeddings from a "
            "version that did not record it; delete .cache/embeddings and run `dvc repro` again"
        )
    return float(seconds)


def backbone_section(extraction: dict[str, dict], heads: list[TrainedHead], rows: list[ModelRow]) -> list[str]:
    """Markdown: each backbone's cost, feature size and LogME beside its best head, and the two rankings."""
    test = {r.name: r.accuracy for r in rows}
    best = {}
    for head in heads:
        if head.backbone not in best or held_out(head)["val_accuracy"] > held_out(best[head.backbone])["val_accuracy"]:
            best[head.backbone] = head
    labels = list(best)
    lines = [
        "## Backbones",
        "",
        "| backbone | network | input px | features | extraction s | LogME | best head | its held-out accuracy "
        "| its test accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in sorted(labels, key=lambda b: -extraction[b]["logme"]):
        e, h = extraction[label], best[label]
        lines.append(
            f"| {label} | {e['backbone']} | {e['image_size']} | {e['feature_dim']:,} | "
            f"{extraction_seconds(extraction, label):.1f} | {e['logme']:.4f} | {h.name} | "
            f"{held_out(h)['val_accuracy']:.4f} | {test[h.model_name]:.4f} |"
        )
    logme = {b: float(extraction[b]["logme"]) for b in labels}
    return [*lines, "", ranking_words(logme, {b: held_out(best[b])["val_accuracy"] for b in labels}), ""]


def ranking_words(logme: dict[str, float], accuracy: dict[str, float]) -> str:
    """The backbones (by label) ranked by LogME (computed before any head is trained) and by the best head's
    held-out accuracy, and how well the two rankings agree."""
    labels = list(logme)
    by_score = ", ".join(sorted(labels, key=lambda b: -logme[b]))
    by_accuracy = ", ".join(sorted(labels, key=lambda b: -accuracy[b]))
    text = (
        "LogME (You et al., ICML 2021) is the log evidence of a Bayesian linear model of the labels on the train "
        "split's features, per image: larger is better, and it needs no training. "
        f"Ranked by LogME: {by_score}. Ranked by the best head's held-out accuracy: {by_accuracy}."
    )
    if len(labels) < 2:
        return text + " One backbone: add entries under extract.backbones in params.yaml to compare backbones."
    rho = rank_correlation([logme[b] for b in labels], [accuracy[b] for b in labels])
    agreement = "undefined (tied scores)" if np.isnan(rho) else f"{rho:+.2f}"
    caveat = " (with two backbones it can only be +1 or -1)" if len(labels) == 2 else ""
    return text + f" Spearman rank correlation of the two over {len(labels)} backbones: {agreement}{caveat}."


def _read_metrics(metrics_dir: Path, models: list[str]) -> dict[str, dict]:
    """The metrics.json of each of `models` under `metrics_dir`, once each has one and all have their intervals."""
    paths = {name: Path(metrics_dir) / name / "metrics.json" for name in models}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise PipelineError(f"no metrics for {', '.join(missing)} in {metrics_dir}; run `dvc repro` first")
    metrics = {name: json.loads(path.read_text()) for name, path in paths.items()}
    older = [name for name, m in metrics.items() if not set(m) >= INTERVAL_KEYS]
    if older:
        raise PipelineError(
            f"{metrics_dir}: the metrics of {', '.join(older)} have no 95% intervals (written by an older version); "
            "run `dvc repro` so that evaluate scores them again"
        )
    return metrics


def _left_out(answers: Answers) -> list[str]:
    if not answers.excluded:
        return []
    return [
        "",
        f"**Test split.** Every score here leaves out the {len(answers.excluded)} test images that copy a train or "
        "val image (`audit.drop_cross_split_duplicates`; each with its reason in `audit/test_copies.csv`); "
        "`metrics/models/` keeps the scores on the whole split. Log loss and balanced accuracy are not recomputed.",
    ]


def audit_section(counts: dict) -> list[str]:
    """Markdown: the audit's counts (metrics/audit.json) and its picture grids (reports/audit/)."""
    wrong = {key.removeprefix("misclassified_"): n for key, n in counts.items() if key.startswith("misclassified_")}
    lines = [
        "## Data audit",
        "",
        f"- {counts['cross_split_pairs']} pairs of images in different splits are near-copies (embedding cosine "
        f">= {counts['duplicate_threshold']}; {counts['cross_split_exact_pairs']} of them identical files): a "
        "test image that copies a training image inflates every score above. `audit/duplicates.csv`.",
        f"- {counts.get('test_copies', 0)} test images copy a train or val image: `audit/test_copies.csv`, each "
        "with its reason (left out of every score above with `audit.drop_cross_split_duplicates: true`).",
        f"- {counts['label_issues']} train or val images look mislabelled (cleanlab on out-of-fold probabilities "
        "of a logistic head): `audit/label_issues.csv`, the most suspicious first.",
        *[f"- {model} gets {n} test images wrong: `audit/misclassified_{model}.csv`." for model, n in wrong.items()],
        "",
        "![near-copies across splits](audit/duplicates.png)",
        "",
        "![likely label errors](audit/label_issues.png)",
        "",
    ]
    return lines + [
        line for model in wrong for line in (f"![{model}: misclassified](audit/misclassified_{model}.png)", "")
    ]


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
            f"  {r.name:<{width}} test accuracy {r.accuracy:.4f} (95% interval {s['accuracy_ci95_low']:.4f}-"
            f"{s['accuracy_ci95_high']:.4f}), {r.train_seconds:.0f} s to train{note}"
        )
    return "\n".join(lines) + "\n"
