"""DVC stage `finetune_wise`: WiSE-FT, the fine-tuned weights mixed with their start, alpha chosen on the val split,
then scored on the test split as model finetune-wise (as evaluate_finetune scores finetune)."""

from dataclasses import asdict
from pathlib import Path

import click
from safetensors.torch import load_file

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import write_json
from pipeline.finetuning.wise import wise_finetune
from pipeline.results.metrics import write_model_metrics
from pipeline.results.scoring_finetuned import evaluate_finetuned

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--finetuned", type=PathArg, required=True, help="The fine-tuned model folder (theta_1).")
@click.option("--init", type=PathArg, required=True, help="The layer fine-tuning started from (the warm_start stage).")
@click.option("--manifest", type=PathArg, required=True)
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the manifest's paths are relative to.")
@click.option("--out", type=PathArg, required=True, help="Folder for the mixed model (as the finetune stage's).")
@click.option("--curve", type=PathArg, required=True, help="Val accuracy and log loss per alpha (JSON plot).")
@click.option("--metrics", type=PathArg, required=True, help="Folder for its test metrics, as evaluate_finetune's.")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(finetuned, init, manifest, data, out, curve, metrics, params) -> None:
    p = load_params(params)
    entry = p.finetune_backbone  # the pre-trained network and weights fine-tuning started from
    if not Path(init).is_file():
        raise click.ClickException(f"{init} not found; run the warm_start stage (dvc repro)")
    result = wise_finetune(
        finetuned,
        load_file(init),
        manifest,
        data,
        out,
        p.finetune_wise.alphas,
        p.finetune,
        backbone_name=entry.backbone,
        weights=entry.weights_path,
        allow_download=p.extract.allow_download,
    )
    write_json(curve, [asdict(point) for point in result.curve])
    chosen = next(point for point in result.curve if point.alpha == result.alpha)
    ends = {point.alpha: point.val_accuracy for point in result.curve}
    at_one = f", {ends[1.0]:.4f} at alpha 1 (finetune)" if 1.0 in ends else ""
    click.echo(
        f"finetune_wise: alpha {result.alpha:g} chosen among {len(result.curve)} (val accuracy "
        f"{chosen.val_accuracy:.4f}{at_one}; {result.n_val} val images, {result.seconds:.1f}s on {result.device}) "
        f"-> {out}"
    )
    scored = evaluate_finetuned(out, manifest, data, params=p.finetune, scoring=p.evaluate)
    click.echo(f"finetune_wise: {write_model_metrics(metrics, scored)}")


if __name__ == "__main__":
    main()
