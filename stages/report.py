"""DVC stage `report`: reports/strategy.md and its figures, from every model's metrics and the learning curves."""

from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import read_json, read_record, write_text
from pipeline.heads.persistence import head_files
from pipeline.results.answers import Answers, read_copies_in_test
from pipeline.results.report import build_report, summary, write_figures

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, required=True, help="Folder of feature stores (<backbone>.h5).")
@click.option("--heads", type=PathArg, required=True, help="Folder of trained heads (<backbone>/<head>.h5).")
@click.option("--metrics", type=PathArg, required=True, help="Folder of test metrics (<model>/).")
@click.option("--finetuned", type=PathArg, help="Fine-tuned model folder, if the pipeline has one.")
@click.option("--wise", type=PathArg, help="The finetune_wise stage's model folder (WiSE-FT), if any.")
@click.option("--extract-metrics", type=PathArg, required=True, help="Folder of extract metrics (<backbone>/).")
@click.option("--curve", type=PathArg, required=True, help="The learning_curve stage's output.")
@click.option("--finetune-curve", type=PathArg, required=True, help="The finetune_curve stage's output.")
@click.option("--audit", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="metrics/audit.json.")
@click.option("--test-copies", type=PathArg, help="The audit's test_copies.csv (audit.drop_cross_split_duplicates).")
@click.option("--out", type=PathArg, required=True, help="Folder for strategy.md and its figures.")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(
    features, heads, metrics, finetuned, wise, extract_metrics, curve, finetune_curve, audit, test_copies, out, params
):
    p = load_params(params)
    extraction = {label: read_record(extract_metrics / label) for label in p.extract.backbones}
    points, tuned = read_json(curve), read_json(finetune_curve)
    files = head_files(features, heads, p.extract.backbones, p.heads)
    counts = read_json(audit) if audit else None
    leave_out = p.audit.drop_cross_split_duplicates and test_copies is not None
    answers = Answers(metrics, read_copies_in_test(test_copies) if leave_out else frozenset())
    report = build_report(files, answers, finetuned, extraction, (points, tuned), counts, p.evaluate, wise)
    curve_head = points[0]["model"]  # the learning_curve stage's choice, by the same rule as report.chosen
    write_figures(report.rows, answers, report.classes, (points, curve_head, tuned), out, p.evaluate.ece_bins)
    write_text(out / "strategy.md", report.markdown)
    write_text(out / "summary.txt", summary(report, out / "strategy.md"))
    click.echo(f"report: {len(report.rows)} models, learning curve of {curve_head} -> {out / 'strategy.md'}")


if __name__ == "__main__":
    main()
