"""DVC stage `audit`: is my data clean? Near-copies across splits, likely label errors, and the test images the
chosen head and the fine-tuned network get wrong: CSVs and picture grids in reports/audit/, counts in
metrics/audit.json. Reads the cached embeddings of audit.backbone (the first backbone unless set) and the
models' answers; decodes images only for thumbnails."""

import time
from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import write_json
from pipeline.features.store import read_store
from pipeline.heads.persistence import HeadFile, chosen_file, head_files
from pipeline.results.audit import (
    cross_split_duplicates,
    duplicate_threshold,
    label_issues,
    misclassified,
    write_audit,
)
from pipeline.results.metrics import read_predictions

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, required=True, help="Folder of feature stores (<backbone>.h5).")
@click.option("--heads", type=PathArg, required=True, help="Folder of trained heads (<backbone>/<head>.h5).")
@click.option("--metrics", type=PathArg, required=True, help="Folder of each model's test answers.")
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the store's paths are relative to.")
@click.option("--out", type=PathArg, required=True, help="Folder for the CSVs and picture grids.")
@click.option("--summary", type=PathArg, required=True, help="The audit's counts (JSON, read by the report).")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(features, heads, metrics, data, out, summary, params) -> None:
    p = load_params(params)
    files = head_files(features, heads, p.extract.backbones, p.heads)
    _, chosen = chosen_file(files)
    store = read_store(features / f"{p.audit_backbone}.h5")  # one backbone's cosine space: audit.backbone
    clock = [time.perf_counter()]
    threshold, why = duplicate_threshold(store, p.audit.duplicate_threshold, p.audit.seed, p.audit.device)
    pairs = cross_split_duplicates(store, threshold, p.audit.device)
    clock.append(time.perf_counter())
    C, C_why = logistic_C(p.audit.C, [f for f in files if f.backbone == p.audit_backbone], p.heads)
    issues = label_issues(store, p.audit.folds, p.audit.seed, C)
    clock.append(time.perf_counter())
    models = [chosen.model_name, "finetune"]
    wrong = {m: misclassified(read_predictions(metrics / m / "predictions.csv")) for m in models}
    counts = write_audit(out, data, (pairs, issues, wrong), p.audit.top)
    chosen_threshold = {"setting": p.audit.duplicate_threshold, "threshold": threshold, "reason": why}
    write_json(out / "duplicate_threshold.json", chosen_threshold)
    write_json(summary, {"duplicate_threshold": threshold, **counts})
    click.echo(f"audit: duplicate_threshold {threshold} ({why})")
    click.echo(
        f"audit: {counts['cross_split_pairs']} near-copies across splits (cosine >= {threshold}), "
        f"{counts['label_issues']} likely label errors, "
        + ", ".join(f"{len(rows)} test images {m} gets wrong" for m, rows in wrong.items())
        + f" -> {out}"
    )
    click.echo(f"audit: label issues from out-of-fold logistic regression at C={C} ({C_why})")
    click.echo(f"audit: near-copy search {clock[1] - clock[0]:.1f}s, label issues {clock[2] - clock[1]:.1f}s")


def logistic_C(setting: float | str, files: list[HeadFile], heads: dict) -> tuple[float, str]:
    """audit.C resolved, and why: a number as given; auto: the C of the first logreg head among `files` (the audit
    backbone's), as chosen on val, else 1.0."""
    if setting != "auto":
        return float(setting), "audit.C"
    for file in files:
        if heads[file.name].kind == "logreg":
            return float(file.load().model[-1].C), f"auto: the C heads.{file.name} chose"
    return 1.0, "auto: no logreg head, scikit-learn's default"


if __name__ == "__main__":
    main()
