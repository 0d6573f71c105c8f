"""DVC stage `check_params`: validate all of params.yaml before any stage that uses it runs.

DVC deletes a stage's outputs just before running it, so a mistake found by the stage itself (a negative
batch size, a head kind misspelt) would cost the outputs of the last good run. This stage runs first (prepare
depends on its output, and every stage on prepare) whenever any section changes, and stops `dvc repro` at
the first mistake with one line, before anything is deleted. Its output never changes, so passing it reruns
nothing downstream.
"""

from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import ConfigError, user_errors
from pipeline.core.io import write_text
from pipeline.heads.selection import check_head_params

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--out", type=PathArg, required=True, help="A constant file the prepare stage depends on.")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(out: Path, params: Path) -> None:
    checked = load_params(params)
    if checked.finetune.backbone is None:
        labels = ", ".join(checked.extract.backbones)
        raise ConfigError(
            f"finetune.backbone: name the extract.backbones entry to fine-tune (one of {labels}); dvc.yaml's "
            "warm_start and finetune stages read it"
        )
    for name, head in checked.heads.items():
        check_head_params(name, head)
    write_text(out, "params.yaml passed stages/check_params.py\n")


if __name__ == "__main__":
    main()
