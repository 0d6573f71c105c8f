"""DVC stage `report`: reports/strategy.md, its figures, and the learning curve as a DVC plot."""

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.errors import PipelineError, user_errors
from pipeline.metrics import write_json, write_text
from pipeline.report import build_report, finetune_curve, write_figures
from pipeline.store import read_store

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, required=True)
@click.option("--heads", type=PathArg, required=True, help="Folder of trained heads (<name>.h5).")
@click.option("--metrics", type=PathArg, required=True, help="Folder of test metrics (<model>.json).")
@click.option("--finetuned", type=PathArg, help="Fine-tuned model folder, if the pipeline has one.")
@click.option("--extract-metrics", type=PathArg, required=True)
@click.option("--manifest", type=PathArg, required=True, help="For the fine-tuning curve (report.finetune_curve).")
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the manifest's paths are relative to.")
@click.option("--out", type=PathArg, required=True, help="Folder for strategy.md and its figures.")
@click.option("--curve", type=PathArg, required=True, help="Learning curve (DVC plot data, JSON).")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(features, heads, metrics, finetuned, extract_metrics, manifest, data, out, curve, params) -> None:
    p = load_params(params)
    head_paths = [heads / f"{name}.h5" for name in p.heads]
    # The cost of computing every embedding of the store, even those a rerun took from the cache.
    extract_seconds = json.loads(extract_metrics.read_text()).get("extraction_seconds")
    if extract_seconds is None:
        raise PipelineError(
            f"{extract_metrics} has no extraction cost: the embedding cache holds embeddings from a version that "
            "did not record it; delete .cache/embeddings and run `dvc repro` again"
        )
    tuned_curve = None
    if p.report.finetune_curve:
        tuning = replace(p.finetune, image_size=p.finetune.image_size or p.extract.image_size)
        with tempfile.TemporaryDirectory() as work:
            sizes = p.report.finetune_curve_sizes
            weights = Path(p.extract.weights) if p.extract.weights else None
            tuned_curve = finetune_curve(manifest, data, p.extract.backbone, tuning, sizes, Path(work), weights)
    markdown, rows, points, curve_head = build_report(
        read_store(features),
        head_paths,
        metrics,
        finetuned,
        extract_seconds,
        p.report.learning_curve_sizes,
        p.report.seeds,
        tuned_curve,
    )
    write_figures(rows, points, curve_head, out, tuned_curve)
    write_text(out / "strategy.md", markdown)
    write_json(curve, points)
    click.echo(f"report: {len(rows)} models, learning curve of {curve_head} -> {out / 'strategy.md'}")


if __name__ == "__main__":
    main()
