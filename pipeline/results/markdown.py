"""The report's markdown: the models' table, the backbones, the learning curve, accuracy per class and the audit's
counts."""

from __future__ import annotations

import numpy as np

from pipeline.heads.trained import TrainedHead, held_out
from pipeline.results.answers import Answers
from pipeline.results.model_rows import ModelRow, extraction_seconds
from pipeline.results.stats import rank_correlation

PER_CLASS_ROWS = 30  # above this many classes, the per-class table keeps the classes hardest on average


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
        "once for every model built on it by its extract stage (median of 5 batches of 32, on the device extraction "
        "ran on), plus each model's own output layer. Intervals: Wilson's for accuracy, a bootstrap over test images "
        "for macro-F1. The "
        "fine-tuned model's train accuracy is the one seen during its best epoch (WiSE-FT's: its own on the train "
        "images, sampled as a head's).",
        "",
        *backbones,
        "",
        *_learning_curve(curve, curve_head),
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


def _learning_curve(curve: list[dict], curve_head: str) -> list[str]:
    """The few-shot learning curve's section: the protocol in words, one row per k and one for every image."""
    shots = [p for p in curve if p["label"] != "all"]
    every = next((p for p in curve if p["label"] == "all"), None)
    seeds = max((p["seeds"] for p in shots), default=1)
    lines = [
        f"## Learning curve ({curve_head} on frozen features, few-shot protocol)",
        "",
        f"The protocol of the CLIP and CoOp papers: for each k and each of {seeds} seeds, k training images per class "
        "are drawn from the train split and min(k, 4) validation images per class from the val split; the head's grid "
        "is chosen on those validation images alone (never on the test split), kept as fitted on the k images (no "
        "refit), and scored on the whole test split. Mean test accuracy over the seeds, with a 95% Student t-interval "
        "(n - 1 degrees of freedom; none for one seed)"
        + (f"; all: the head as trained on every image, its grid chosen on {every['selection']}." if every else "."),
        "",
        "| k: train + val images per class | test accuracy: mean (95% t-interval) | each seed | chosen on the val "
        "images, per seed |",
        "|---|---|---|---|",
    ]
    for p in curve:
        k = f"all (at least {p['per_class']})" if p["label"] == "all" else f"{p['per_class']} + {p['val_per_class']}"
        interval = "" if p["low"] is None else f" ({p['low']:.4f}-{p['high']:.4f})"
        each = ", ".join(f"{r['accuracy']:.4f}" for r in p["runs"]) if len(p["runs"]) > 1 else "-"
        chosen = "; ".join(" ".join(f"{key}={value:g}" for key, value in r["chosen"].items()) for r in p["runs"])
        lines.append(f"| {k} | {p['accuracy']:.4f}{interval} | {each} | {chosen or '-'} |")
    lines.append("")
    for p in shots:
        if p["short_classes"]:
            named = ", ".join(f"{s['class']} ({s['train']} + {s['val']})" for s in p["short_classes"][:10])
            more = f" and {len(p['short_classes']) - 10} more" if len(p["short_classes"]) > 10 else ""
            lines += [
                f"At k = {p['per_class']}, {len(p['short_classes'])} classes have fewer images; all of theirs are "
                f"used: {named}{more}.",
                "",
            ]
    return lines


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
            f"{r.accuracy:.4f} ({s['accuracy_low']:.4f}-{s['accuracy_high']:.4f}) | "
            f"{s['macro_f1']:.4f} ({s['macro_f1_low']:.4f}-{s['macro_f1_high']:.4f}) | {s['ece']:.4f} | "
            f"{r.train_accuracy:.4f} | {r.gap:+.4f} |"
        )
    return lines


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


def test_split_note(answers: Answers) -> list[str]:
    """Markdown: which test images every score leaves out, if any."""
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
