"""The strategy report: every model's costs and scores side by side, a learning curve, a recommendation."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones import Backbone, backbone_of_store
from pipeline.errors import PipelineError
from pipeline.finetuned import load_finetuned
from pipeline.heads import TrainedHead, load_head
from pipeline.store import FeatureStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRow:
    name: str
    strategy: str  # feature_extraction or fine_tuning
    layers_trained: str
    params_updated: int
    params_total: int  # of the whole network that classifies an image: backbone + output layer
    train_seconds: float
    inference_ms: float  # per image, batch of 32, on this machine
    accuracy: float
    macro_f1: float
    ece: float
    train_accuracy: float
    gap: float  # train accuracy - test accuracy: the overfitting gap

    @property
    def fraction_updated(self) -> float:
        return self.params_updated / self.params_total


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def forward_ms_per_image(network: torch.nn.Module, image_size: int, batch: int = 32) -> float:
    """Median milliseconds per image of three timed forward passes on random input (after a warm-up)."""
    x = torch.randn(batch, 3, image_size, image_size)
    times = []
    with torch.inference_mode():
        network.eval()
        network(x)
        for _ in range(3):
            start = time.perf_counter()
            network(x)
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / batch


def head_rows(
    store: FeatureStore, heads: list[TrainedHead], metrics: dict[str, dict], backbone: Backbone
) -> list[ModelRow]:
    """One row per head: the backbone is frozen, only the head's numbers are learned."""
    backbone_params = count_parameters(backbone.features)
    forward_ms = forward_ms_per_image(backbone.features, int(store.attrs["image_size"]))
    x_train, y_train = store.subset("train")
    rows = []
    for head in heads:
        m = metrics[head.name]
        start = time.perf_counter()
        train_accuracy = float((head.predict_proba(x_train).argmax(1) == y_train).mean())
        head_ms = 1000 * (time.perf_counter() - start) / max(1, len(y_train))
        rows.append(
            ModelRow(
                name=head.name,
                strategy="feature_extraction",
                layers_trained=f"new {head.kind} head only (backbone frozen)",
                params_updated=head.trainable_params,
                params_total=backbone_params + head.trainable_params,
                train_seconds=float(m["fit_seconds"]),
                inference_ms=forward_ms + head_ms,
                accuracy=m["accuracy"],
                macro_f1=m["macro_f1"],
                ece=m["ece"],
                train_accuracy=train_accuracy,
                gap=train_accuracy - m["accuracy"],
            )
        )
    return rows


def finetune_row(model_dir: Path, metrics: dict) -> ModelRow:
    model, config, preprocessing = load_finetuned(model_dir)
    training = config["training"]
    train_accuracy = float(training["train_accuracy"])
    return ModelRow(
        name="finetune",
        strategy="fine_tuning",
        layers_trained=f"last {config['unfrozen_blocks']} of {config['total_blocks']} blocks + new output layer",
        params_updated=int(training["trainable_params"]),
        params_total=count_parameters(model),
        train_seconds=float(training["train_seconds"]),
        inference_ms=forward_ms_per_image(model, preprocessing.crop),
        accuracy=metrics["accuracy"],
        macro_f1=metrics["macro_f1"],
        ece=metrics["ece"],
        train_accuracy=train_accuracy,
        gap=train_accuracy - metrics["accuracy"],
    )


def recommend(rows: list[ModelRow], extract_seconds: float, best_head: str | None = None) -> str:
    """Plain words computed from the numbers: which strategy, and why.

    `best_head` is the head chosen on val (the test split only scores); by default the most accurate.
    """
    heads = [r for r in rows if r.strategy == "feature_extraction"]
    tuned = [r for r in rows if r.strategy == "fine_tuning"]
    if not heads:
        raise PipelineError("the report needs at least one head")
    best = next((r for r in heads if r.name == best_head), None) or max(heads, key=lambda r: r.accuracy)
    if not tuned:
        return f"Only feature extraction was measured: {best.name} reaches {best.accuracy:.1%} test accuracy."
    ft = tuned[0]
    fx_cost = best.train_seconds + extract_seconds
    speedup = ft.train_seconds / fx_cost if fx_cost > 0 else float("inf")
    cost = f"1/{speedup:.0f} of" if speedup >= 1 else f"{1 / speedup:.1f}x"
    if ft.accuracy - best.accuracy > 0.01:
        return (
            f"Fine-tuning gains {100 * (ft.accuracy - best.accuracy):.1f} points of test accuracy over the best head "
            f"on frozen features ({ft.accuracy:.1%} against {best.name}'s {best.accuracy:.1%}) for {speedup:.0f}x "
            f"its training time ({ft.train_seconds:.0f} s against {fx_cost:.0f} s including extraction): "
            "use fine-tuning."
        )
    return (
        f"Frozen features reach {best.accuracy / ft.accuracy:.0%} of the fine-tuned accuracy ({best.name}: "
        f"{best.accuracy:.1%}, fine-tuned: {ft.accuracy:.1%}) at {cost} the training time "
        f"({fx_cost:.0f} s including extraction, against {ft.train_seconds:.0f} s): use feature extraction."
    )


def render(
    rows: list[ModelRow],
    curve: list[dict],
    curve_head: str,
    recommendation: str,
    extract_seconds: float,
    tuned_curve: list[dict] | None = None,
) -> str:
    lines = ["# Feature extraction or fine-tuning?", "", f"**Recommendation.** {recommendation}", "", *_table(rows)]
    lines += [
        "",
        f"Training seconds of the heads exclude the one-off extraction of the features ({extract_seconds:.1f} s), "
        "which every head shares. Inference is the backbone's forward pass plus the head, measured on this "
        "machine. The fine-tuned model's train accuracy is the one seen during its best epoch.",
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
    lines += [
        "![learning curve](learning_curve.png)",
        "",
        "![accuracy against training time](accuracy_vs_time.png)",
        "",
    ]
    return "\n".join(lines)


def _table(rows: list[ModelRow]) -> list[str]:
    """Every model's row, the most accurate first."""
    lines = [
        "| model | strategy | layers trained | parameters updated | share of the network | training s "
        "| inference ms/image | test accuracy | macro-F1 | ECE | train accuracy | overfitting gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r.accuracy):
        lines.append(
            f"| {r.name} | {r.strategy.replace('_', ' ')} | {r.layers_trained} | {r.params_updated:,} | "
            f"{r.fraction_updated:.2%} | {r.train_seconds:.2f} | {r.inference_ms:.2f} | {r.accuracy:.4f} | "
            f"{r.macro_f1:.4f} | {r.ece:.4f} | {r.train_accuracy:.4f} | {r.gap:+.4f} |"
        )
    return lines


def write_figures(
    rows: list[ModelRow], curve: list[dict], curve_head: str, out_dir: Path, tuned_curve: list[dict] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p["per_class"] for p in curve]
    y = np.array([p["accuracy"] for p in curve])
    s = np.array([p["std"] for p in curve])
    ax.plot(x, y, marker="o", label=curve_head)
    ax.fill_between(x, y - s, y + s, alpha=0.2)
    if tuned_curve:
        ax.plot(
            [p["per_class"] for p in tuned_curve],
            [p["accuracy"] for p in tuned_curve],
            marker="s",
            color="tab:red",
            label="fine-tuned",
        )
    tuned = [r for r in rows if r.strategy == "fine_tuning"]
    if tuned:
        ax.axhline(tuned[0].accuracy, color="tab:red", linestyle="--", label="fine-tuned, all images")
    ax.set(xscale="log", xlabel="training images per class", ylabel="test accuracy", title="Learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curve.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(
            max(r.train_seconds, 1e-3), r.accuracy, color="tab:red" if r.strategy == "fine_tuning" else "tab:blue"
        )
        ax.annotate(r.name, (max(r.train_seconds, 1e-3), r.accuracy), textcoords="offset points", xytext=(4, 4))
    ax.set(
        xscale="log", xlabel="training seconds (log)", ylabel="test accuracy", title="Accuracy against training time"
    )
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_time.png", dpi=100)
    plt.close(fig)


def build_report(
    store: FeatureStore,
    head_paths: list[Path],
    metrics_dir: Path,
    finetuned: Path | None,
    extract_seconds: float,
    curve: list[dict],
    tuned_curve: list[dict],
) -> tuple[str, list[ModelRow]]:
    """Markdown and its rows. `curve` is the learning curve of the head chosen on val (the `learning_curve`
    stage); `tuned_curve` fine-tuning's on subsets (the `finetune_curve` stage; empty when not asked for)."""
    heads = [load_head(p, store) for p in head_paths]
    metrics = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(metrics_dir).glob("*/metrics.json"))}
    missing = [h.name for h in heads if h.name not in metrics]
    if missing:
        raise PipelineError(f"no metrics for {', '.join(missing)} in {metrics_dir}; run evaluate first")
    if not curve:
        raise PipelineError(
            "the learning curve has no point: every training subset was too small for the head chosen on val "
            "(see learning_curve.sizes)"
        )
    rows = head_rows(store, heads, metrics, backbone_of_store(store.attrs))
    if finetuned is not None and "finetune" in metrics:
        rows.append(finetune_row(finetuned, metrics["finetune"]))
    best = curve[0]["model"]  # the head chosen on val, like every other choice here: the test split only scores
    recommendation = recommend(rows, extract_seconds, best)
    return render(rows, curve, best, recommendation, extract_seconds, tuned_curve), rows
