"""The embedding options (issue 28, item 1) against today's plain embedding, on three kinds of image: flip-averaged
embeddings (`tta: flip`), several blocks pooled and concatenated (`layers`), and both; the evidence for their
defaults, and how close each gets hymenoptera to 0.97.

    python benchmarks/embedding_options.py [--datasets hymenoptera,digits,shapes] [--layers=-3,-2,-1]
        [--work /tmp/embedding_options]
    python benchmarks/embedding_options.py --cost    # each option's forward pass alone; run it on an idle machine

Each dataset is laid out and split as benchmarks/cosine_normalize.py does it (hymenoptera: its own train/ and val/,
the val/ folder the test split; the digits sample and generated shapes: 80% / 20% per class, seeded), then
extracted by the extract stage's code with params.yaml's extract settings (its first backbone, on the CPU) and the
option, and every head of params.yaml trained by pipeline.heads.selection.train_head (grid, selection, refit on
train+val). Prints, as lines a script can read:

    embedding_options: dataset=D option=O dim=F extraction_seconds=S
    embedding_options: dataset=D option=O head=H test_accuracy=A correct=C n=T held_out=V
    embedding_options: dataset=D option=O head=H minus_plain=X low=L high=H p=P option_only=A plain_only=B verdict=V
    embedding_options: dataset=D option=O chosen=H test_accuracy=A

minus_plain: the option's test accuracy minus the plain embedding's for the same head, on the same test images
(pipeline.results.stats.compare: the exact McNemar test and its dual 95% interval); verdict: option or plain where
the test says one is more accurate (p < 0.05), none otherwise. chosen: the head with the best held-out score, as the
report chooses (its test accuracy is what a user gets). extraction_seconds: computing every embedding of the store
(the first run; the embedding cache under --work makes later runs cost seconds). --cost times each option's
embedder as extraction times its backbone (batch 32 of random images at the entry's size, on the CPU, the median
of 5 runs after a warm-up):

    embedding_options: option=O image_size=S forward_ms_per_image=M relative=R
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cosine_normalize import REPO, store_of  # noqa: E402

from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.device import Runtime  # noqa: E402
from pipeline.features.backbones import build_backbone  # noqa: E402
from pipeline.features.embedding import Embedding  # noqa: E402
from pipeline.features.inference_cost import forward_ms_per_row, random_images  # noqa: E402
from pipeline.features.store import read_store  # noqa: E402
from pipeline.heads.selection import train_head  # noqa: E402
from pipeline.heads.trained import chosen_head, held_out  # noqa: E402
from pipeline.results.stats import compare  # noqa: E402


def options(layers: list[int]) -> dict[str, dict]:
    """Each option by name, as extract.backbones entry keys."""
    return {
        "plain": {},
        "flip": {"tta": "flip"},
        "layers": {"layers": layers},
        "flip+layers": {"tta": "flip", "layers": layers},
    }


def measure(name: str, work: Path, layers: list[int]) -> None:
    heads = load_params(REPO / "params.yaml").heads
    correct: dict[str, dict[str, object]] = {}
    for option, entry in options(layers).items():
        result = store_of(name, work, entry)
        store = read_store(result.store)
        x_test, y_test = store.subset("test")
        click.echo(
            f"embedding_options: dataset={name} option={option} dim={store.features.shape[1]} "
            f"extraction_seconds={result.extraction_seconds:.1f}"
        )
        trained, correct[option] = [], {}
        for head, params in heads.items():
            trained.append(train_head(store, head, params))
            hit = trained[-1].predict_proba(x_test).argmax(axis=1) == y_test
            correct[option][head] = hit
            click.echo(
                f"embedding_options: dataset={name} option={option} head={head} test_accuracy={hit.mean():.4f} "
                f"correct={int(hit.sum())} n={len(y_test)} held_out={held_out(trained[-1])['val_accuracy']:.4f}"
            )
            if option != "plain":
                r = compare(hit, correct["plain"][head])
                verdict = {"a": "option", "b": "plain"}.get(r.verdict, "none")
                click.echo(
                    f"embedding_options: dataset={name} option={option} head={head} minus_plain={r.difference:+.4f} "
                    f"low={r.interval[0]:+.4f} high={r.interval[1]:+.4f} p={r.mcnemar.p_value:.3g} "
                    f"option_only={r.mcnemar.a_only} plain_only={r.mcnemar.b_only} verdict={verdict}"
                )
        chosen = chosen_head(trained).name  # as the report chooses
        click.echo(
            f"embedding_options: dataset={name} option={option} chosen={chosen} "
            f"test_accuracy={correct[option][chosen].mean():.4f}"
        )


def time_options(layers: list[int]) -> None:
    params = load_params(REPO / "params.yaml").extract
    entry = params.backbone(next(iter(params.backbones)))
    runtime = Runtime.resolve("cpu", "fp32", option="--cost", channels_last=True)
    plain_ms = None
    for option, settings in options(layers).items():
        embedding = Embedding(settings.get("tta", "none"), settings.get("layers", "last"))
        backbone = build_backbone(entry.backbone, entry.weights_path, embedding=embedding)
        ms = forward_ms_per_row(
            runtime.place(backbone.embedder()), random_images(runtime, backbone.preprocessing), runtime
        )
        plain_ms = plain_ms or ms
        click.echo(
            f"embedding_options: option={option} image_size={backbone.preprocessing.crop} "
            f"forward_ms_per_image={ms:.2f} relative={ms / plain_ms:.2f}"
        )


@click.command()
@click.option("--datasets", default="hymenoptera,digits,shapes", show_default=True)
@click.option("--layers", default="-3,-2,-1", show_default=True, help="Block indices of the layers option.")
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), default=Path("/tmp/embedding_options"),
              show_default=True)  # fmt: skip
@click.option("--cost", is_flag=True, help="Time each option's forward pass instead.")
def main(datasets: str, layers: str, work: Path, cost: bool) -> None:
    blocks = [int(i) for i in layers.split(",")]
    if cost:
        return time_options(blocks)
    work.mkdir(parents=True, exist_ok=True)
    for name in datasets.split(","):
        measure(name.strip(), work, blocks)


if __name__ == "__main__":
    main()
