"""DVC stage `learning_curve`: the few-shot learning curve of the chosen head (pipeline.heads.trained.chosen_head):
test accuracy at k train images per class, its grid chosen on min(k, 4) val images per class (pipeline.heads.curves),
the mean over seeds with its t-interval (pipeline.results.few_shot)."""

from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import write_json
from pipeline.features.store import read_store
from pipeline.heads.curves import learning_curve
from pipeline.heads.persistence import chosen_file, head_files
from pipeline.heads.trained import held_out
from pipeline.results.few_shot import summarised

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, required=True, help="Folder of feature stores (<backbone>.h5).")
@click.option("--heads", type=PathArg, required=True, help="Folder of trained heads (<backbone>/<head>.h5).")
@click.option("--out", type=PathArg, required=True, help="The curve (DVC plot data, JSON).")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(features: Path, heads: Path, out: Path, params: Path) -> None:
    p = load_params(params)
    chosen, best = chosen_file(head_files(features, heads, p.extract.backbones, p.heads))
    store = read_store(chosen.store)
    curve = p.learning_curve
    points = summarised(learning_curve(store, best, p.heads[best.name], curve.shots, curve.seeds))
    write_json(out, points)
    score = held_out(best)["val_accuracy"]
    click.echo(
        f"learning_curve: {best.model_name} (held-out accuracy {score:.4f} on {best.selection}), few-shot at "
        f"{len(points) - 1} of k = {curve.shots} ({curve.seeds} seeds each), and as trained on every image -> {out}"
    )


if __name__ == "__main__":
    main()
