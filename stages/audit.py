"""DVC stage `audit`: is my data clean? Near-copies across splits, likely label errors, and the test images the
chosen head and the fine-tuned network get wrong: CSVs and picture grids in reports/audit/, counts in
metrics/audit.json. Reads the cached embeddings of audit.backbone (the first backbone unless set) and the
models' answers; decodes images only for thumbnails."""

from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import write_json
from pipeline.features.store import read_store
from pipeline.heads.persistence import chosen_file, head_files
from pipeline.results.audit import run_audit

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
    audit_files = [f for f in files if f.backbone == p.audit_backbone]
    found = run_audit(store, audit_files, [chosen.model_name, "finetune"], p.audit, p.heads, (metrics, data, out))
    write_json(summary, found.summary())
    for line in found.lines(out):
        click.echo(line)


if __name__ == "__main__":
    main()
