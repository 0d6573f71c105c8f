"""DVC stage `report`: reports/strategy.md and its figures, from every model's metrics and the learning curves."""

import json
from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.errors import PipelineError, user_errors
from pipeline.io import write_text
from pipeline.report import Answers, build_report, read_copies_in_test, summary, write_figures
from pipeline.store import read_store

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, required=True)
@click.option("--heads", type=PathArg, required=True, help="Folder of trained heads (<name>.h5).")
@click.option("--metrics", type=PathArg, required=True, help="Folder of test metrics (<model>/metrics.json).")
@click.option("--finetuned", type=PathArg, help="Fine-tuned model folder, if the pipeline has one.")
@click.option("--extract-metrics", type=PathArg, required=True)
@click.option("--curve", type=PathArg, required=True, help="The learning_curve stage's output.")
@click.option("--finetune-curve", type=PathArg, required=True, help="The finetune_curve stage's output.")
@click.option("--audit", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="metrics/audit.json.")
@click.option("--test-copies", type=PathArg, help="The audit's test_copies.csv (audit.drop_cross_split_duplicates).")
@click.option("--out", type=PathArg, required=True, help="Folder for strategy.md and its figures.")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(features, heads, metrics, finetuned, extract_metrics, curve, finetune_curve, audit, test_copies, out, params):
    p = load_params(params)
    # The cost of computing every embedding of the store, even those a rerun took from the cache.
    extract_seconds = json.loads(extract_metrics.read_text()).get("extraction_seconds")
    if extract_seconds is None:
        raise PipelineError(
            f"{extract_metrics} has no extraction cost: the embedding cache holds embeddings from a version that "
            "did not record it; delete .cache/embeddings and run `dvc repro` again"
        )
    points, tuned = json.loads(curve.read_text()), json.loads(finetune_curve.read_text())
    head_paths = [heads / f"{name}.h5" for name in p.heads]
    store = read_store(features)
    counts = json.loads(audit.read_text()) if audit else None
    leave_out = p.audit.drop_cross_split_duplicates and test_copies is not None
    answers = Answers(metrics, read_copies_in_test(test_copies) if leave_out else frozenset())
    report = build_report(store, head_paths, answers, finetuned, extract_seconds, (points, tuned), counts, p.evaluate)
    curve_head = points[0]["model"]  # the learning_curve stage's choice, by the same rule as report.chosen
    write_figures(report.rows, answers, store.classes, (points, curve_head, tuned), out, p.evaluate.ece_bins)
    write_text(out / "strategy.md", report.markdown)
    write_text(out / "summary.txt", summary(report, out / "strategy.md"))
    click.echo(f"report: {len(report.rows)} models, learning curve of {curve_head} -> {out / 'strategy.md'}")


if __name__ == "__main__":
    main()
