"""DVC stage `export`: one ONNX file per chosen model, each checked against PyTorch on every test image."""

from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import write_json
from pipeline.heads.persistence import head_files
from pipeline.serving.export import Inputs, chosen_models, export_models

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, required=True, help="Folder of feature stores (<backbone>.h5).")
@click.option("--heads", type=PathArg, required=True, help="Folder of trained heads (<backbone>/<head>.h5).")
@click.option("--finetuned", type=PathArg, required=True, help="The fine-tuned model folder.")
@click.option("--wise", type=PathArg, help="The finetune_wise stage's model folder (export.models: finetune-wise).")
@click.option("--metrics", type=PathArg, required=True, help="Folder of test metrics (<model>/metrics.json).")
@click.option("--manifest", type=PathArg, required=True)
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the manifest's paths are relative to.")
@click.option("--out", type=PathArg, required=True, help="Folder for <model>.onnx.")
@click.option("--parity", type=PathArg, required=True, help="Parity metrics (JSON), one record per model.")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(features, heads, finetuned, wise, metrics, manifest, data, out, parity, params) -> None:
    p = load_params(params)
    settings = p.export
    files = {f.model_name: f for f in head_files(features, heads, p.extract.backbones, p.heads)}
    names = chosen_models(settings.models, files)  # a refused or unknown model stops before any work
    inputs = Inputs(files, finetuned, metrics, manifest, data, wise)
    results = export_models(names, inputs, out, settings)
    write_json(parity, results)
    summary = ", ".join(
        f"{name} (max diff {r['max_probability_difference']:.1e}, top-1 {r['top1_agreement']:.0%})"
        for name, r in results.items()
    )
    click.echo(f"export: {summary} on {next(iter(results.values()))['images']} test images -> {out}")


if __name__ == "__main__":
    main()
