"""DVC stage `head@<backbone>-<name>`: train one head on a backbone's cached features, then score it on the test
split.

One stage, not two: starting Python and scikit-learn is most of what a head costs (benchmarks/head_stages.py).
"""

from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import write_json
from pipeline.features.store import read_split_sizes, read_store
from pipeline.heads.persistence import load_head, save_head
from pipeline.heads.registry import HeadError
from pipeline.heads.selection import check_head_params, train_head
from pipeline.results.metrics import write_model_metrics
from pipeline.results.scoring import check_has_test_rows, score_head, train_accuracy

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--name", required=True, help="The head's key under `heads` in params.yaml.")
@click.option("--features", type=PathArg, required=True)
@click.option("--out", type=PathArg, required=True, help="The trained head (HDF5).")
@click.option("--curve", type=PathArg, required=True, help="Validation curve (DVC plot data, JSON).")
@click.option(
    "--metrics", type=PathArg, required=True, help="Folder for metrics.json, predictions.csv, the confusion plot."
)
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(name: str, features: Path, out: Path, curve: Path, metrics: Path, params: Path) -> None:
    config = load_params(params)
    if name not in config.heads:
        raise HeadError(f"no head '{name}' under heads in {params}; defined: {', '.join(config.heads)}")
    kind = check_head_params(name, config.heads[name])  # a misconfigured head fails before the store is read
    check_has_test_rows(read_split_sizes(features), features)  # before the fit, not after it
    # Test's features stay on disk until the fit is done; but a head that searches its rows where they lie in the
    # store (knn: its file keeps their row numbers) holds the whole store, rows numbered as in the file.
    fit_rows = read_store(features, splits=None if kind.reads_store else ("train", "val"))
    head = train_head(fit_rows, name, config.heads[name])
    save_head(head, out)
    write_json(curve, head.val_curve)
    click.echo(
        f"head@{head.model_name}: {head.kind} with {head.hyperparameters}, chosen on {head.selection}, "
        f"in {head.fit_seconds:.1f}s -> {out}"
    )
    on_train = train_accuracy(head, fit_rows)
    test = fit_rows if kind.reads_store else read_store(features, splits=("test",))
    del fit_rows
    # Scored as saved: the file the report, the audit and export read is the one these metrics describe.
    scored = score_head(test, features, load_head(out, test), config.evaluate, train_accuracy=on_train)
    click.echo(f"head@{head.model_name}: {write_model_metrics(metrics, scored)}")


if __name__ == "__main__":
    main()
