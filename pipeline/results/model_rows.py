"""One row per model for the report: what it trained, what it cost and how it scored, read from the metrics the
extract, head and evaluate_finetune stages wrote (nothing is timed or built here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import EvaluateParams
from pipeline.core.errors import PipelineError
from pipeline.core.integrity import check_checksums
from pipeline.core.io import read_json, read_record
from pipeline.features.store import FeatureStore, read_store
from pipeline.finetuning.names import FINETUNE, FINETUNE_WISE
from pipeline.heads.persistence import HeadFile, load_head
from pipeline.heads.trained import TrainedHead, held_out
from pipeline.results.answers import Answers
from pipeline.results.metrics import rescored

INTERVAL_KEYS = {"accuracy_low", "accuracy_high", "macro_f1_low", "macro_f1_high"}


@dataclass(frozen=True)
class ModelRow:
    name: str
    strategy: str  # feature_extraction or fine_tuning
    layers_trained: str
    params_updated: int
    params_total: int  # of the whole network that classifies an image: backbone + output layer
    train_seconds: float  # what it took to get this model: heads include the one-off extraction
    fit_seconds: float  # the model's own training: a head's fit alone
    inference_ms: float  # per image: the backbone's forward pass (batch of 32) plus the model's own output layer
    scores: dict  # the model's record (metrics.json and details.json): accuracy, macro_f1, ece, intervals...
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


def feature_extraction_rows(
    files: list[HeadFile], answers: Answers, extraction: dict[str, dict], scoring: EvaluateParams | None
) -> tuple[list[TrainedHead], list[ModelRow], list[str]]:
    """Every head with its row, backbone by backbone (one store in memory at a time), and the class names.
    `extraction`: each backbone's extract metrics by label."""
    heads, rows, classes = [], [], []
    for label in dict.fromkeys(f.backbone for f in files):
        mine = [f for f in files if f.backbone == label]
        store = read_store(mine[0].store)
        trained = [load_head(f.path, store) for f in mine]
        classes, metrics = store.classes, read_model_metrics(answers.metrics_dir, [h.model_name for h in trained])
        if answers.excluded:
            for h in trained:
                name = h.model_name
                metrics[name] = rescored(metrics[name], answers.of(name), classes, scoring or EvaluateParams())
        heads, rows = heads + trained, rows + head_rows(store, trained, metrics, extraction, label)
    return heads, rows, classes


def head_rows(
    store: FeatureStore, heads: list[TrainedHead], metrics: dict[str, dict], extraction: dict[str, dict], label: str
) -> list[ModelRow]:
    """One row per head on the store of backbone `label` (frozen: only the head's numbers are learned). The
    backbone's parameters, extraction seconds and forward milliseconds come from its extract metrics, the head's
    own milliseconds from its metrics."""
    extract = extraction.get(label, {})
    backbone_params = int(measured(extract, "backbone_params", f"the extract metrics of {label}"))
    forward_ms = measured(extract, "forward_ms_per_image", f"the extract metrics of {label}")
    extract_seconds = extraction_seconds(extraction, label)
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
                inference_ms=forward_ms + measured(m, "head_ms_per_image", f"the metrics of {head.model_name}"),
                scores=m,
                train_accuracy=measured(m, "train_accuracy", f"the metrics of {head.model_name}"),
                chosen_on=f"{held_out(head)['val_accuracy']:.4f} ({_short(head.selection)})",
            )
        )
    return rows


def _short(selection: str) -> str:
    """ "5-fold cross-validation on train+val (...)" -> "5-fold CV"; "the val split (...)" -> "val"."""
    return selection.split(" cross-validation")[0] + " CV" if "cross-validation" in selection else "val"


def finetune_row(model_dir: Path, metrics: dict, extraction: dict[str, dict], name: str = FINETUNE) -> ModelRow:
    """The fine-tuned network's row (`metrics`: its evaluate_finetune metrics), or WiSE-FT's (`name` finetune-wise,
    `model_dir` the finetune_wise stage's folder: its held-out accuracy is the chosen alpha's on val). Built on a
    store's backbone at that store's image size (`extraction`: each backbone's extract metrics by label), its
    inference is that same forward pass, measured by extract, plus its new output layer's; otherwise its whole
    network's, measured by evaluate_finetune."""
    check_checksums(model_dir, ("config.json",), "rerun finetune")
    config = read_json(Path(model_dir) / "config.json")
    training, crop, wise = config["training"], config["preprocessing"]["crop"], config.get("wise")
    if (name == FINETUNE_WISE) != (wise is not None):
        raise PipelineError(f"{model_dir} does not hold the {name} model; run `dvc repro` so its stage writes it")
    same = [b for b, e in extraction.items() if (e.get("backbone"), e.get("image_size")) == (config["backbone"], crop)]
    whose = f"the metrics of {name}"
    if same:
        shared = measured(extraction[same[0]], "forward_ms_per_image", f"the extract metrics of {same[0]}")
        inference = shared + measured(metrics, "head_ms_per_image", whose)
    else:
        inference = measured(metrics, "forward_ms_per_image", whose)
    layers = f"last {config['unfrozen_blocks']} of {config['total_blocks']} blocks + new output layer"
    chosen_on = ""
    if wise:
        point = next(p for p in wise["curve"] if p["alpha"] == wise["alpha"])
        layers = f"{layers}, mixed with the start (WiSE-FT, alpha {wise['alpha']:g})"
        chosen_on = f"{point['val_accuracy']:.4f} (val, alpha {wise['alpha']:g})"
    seconds = float(training["train_seconds"]) + (float(wise["seconds"]) if wise else 0.0)
    return ModelRow(
        name=name,
        strategy="fine_tuning",
        layers_trained=layers,
        params_updated=int(training["trainable_params"]),
        params_total=int(measured(metrics, "params_total", whose)),
        train_seconds=seconds,
        fit_seconds=seconds,
        inference_ms=inference,
        scores=metrics,
        # WiSE-FT's network was scored on the train images by finetune_wise; fine-tuning's during its best epoch.
        train_accuracy=float(metrics["train_accuracy"] if wise else training["train_accuracy"]),
        chosen_on=chosen_on,
    )


def measured(record: dict, key: str, whose: str) -> float:
    """A cost a stage measured and recorded in its metrics; missing (metrics of an older version), one line that
    says how to measure it."""
    if record.get(key) is None:
        raise PipelineError(f"{whose} have no {key} (written by an older version); run `dvc repro` to measure it")
    return float(record[key])


def extraction_seconds(extraction: dict[str, dict], label: str) -> float:
    """The cost of computing every embedding of the backbone's store, even those a rerun took from the cache."""
    seconds = extraction.get(label, {}).get("extraction_seconds")
    if seconds is None:
        raise PipelineError(
            f"the extract metrics of {label} have no extraction cost: the embedding cache holds embeddings from a "
            "version that did not record it; delete .cache/embeddings and run `dvc repro` again"
        )
    return float(seconds)


def read_model_metrics(metrics_dir: Path, models: list[str]) -> dict[str, dict]:
    """The record of each of `models` under `metrics_dir` (its metrics.json and details.json, one dict), once each
    has one and all have their intervals."""
    folders = {name: Path(metrics_dir) / name for name in models}
    missing = [name for name, folder in folders.items() if not (folder / "metrics.json").is_file()]
    if missing:
        raise PipelineError(f"no metrics for {', '.join(missing)} in {metrics_dir}; run `dvc repro` first")
    metrics = {name: read_record(folder) for name, folder in folders.items()}
    older = [name for name, m in metrics.items() if not set(m) >= INTERVAL_KEYS]
    if older:
        raise PipelineError(
            f"{metrics_dir}: the metrics of {', '.join(older)} have no 95% intervals (written by an older version); "
            "run `dvc repro` so that evaluate scores them again"
        )
    return metrics
