"""Centred L2 (SimpleShot's CL2N) against plain L2 for the cosine heads, centroid and knn, on three kinds of image:
the evidence for their `normalize` default (issue 28, item 2).

    python benchmarks/cosine_normalize.py [--datasets hymenoptera,digits,shapes] [--work /tmp/cosine_normalize]

Each dataset is laid out as benchmarks/duplicate_threshold.py lays it out (hymenoptera: its own train/ and val/, the
val/ folder the test split; the digits sample and generated shapes: 80% / 20% per class, seeded), without planted
copies. Then the pipeline's own path: prepare's manifest (val carved from train/ by params.yaml's prepare
fractions), the extract stage's code with params.yaml's extract settings (its first backbone, on the CPU), and each
head trained by pipeline.heads.selection.train_head with params.yaml's entry for it (grid, selection, refit on
train+val), once with normalize l2 and once with cl2n. Prints, per dataset and head, each variant's test accuracy
and the paired comparison on the same test images (pipeline.results.stats.compare: the exact McNemar test and its
dual interval of the difference at 95%), as lines that a script can read:

    cosine_normalize: dataset=D head=H normalize=N test_accuracy=A correct=C n=T
    cosine_normalize: dataset=D head=H cl2n_minus_l2=X low=L high=H p=P cl2n_only=A l2_only=B verdict=V

verdict: cl2n or l2 where the test says one is more accurate (p < 0.05), none otherwise. The embedding cache under
--work makes a second run cost seconds.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))  # duplicate_threshold's datasets

from duplicate_threshold import write_dataset  # noqa: E402

from pipeline.core.config import load_params  # noqa: E402
from pipeline.data.manifest import build_manifest, write_manifest  # noqa: E402
from pipeline.features.extraction import ExtractResult, extract  # noqa: E402
from pipeline.features.store import read_store  # noqa: E402
from pipeline.heads.selection import train_head  # noqa: E402
from pipeline.results.stats import compare  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEADS = ("centroid", "knn")


def store_of(name: str, work: Path, entry: dict | None = None) -> ExtractResult:
    """The dataset's feature store, extracted as the extract stage extracts it (cached under work/cache), with the
    first backbone entry's settings replaced by `entry`'s (e.g. {"tta": "flip"}); one store per entry."""
    params = load_params(REPO / "params.yaml")
    root = work / name / "raw"
    if root.exists():
        shutil.rmtree(root)
    write_dataset(name, root, seed=0)
    prepare = params.prepare
    manifest = build_manifest(root, val_fraction=prepare.val_fraction, test_fraction=prepare.test_fraction, seed=0)
    write_manifest(manifest, work / name / "manifest.csv")
    label, backbone = next(iter(params.extract.backbones.items()))
    backbone = dataclasses.replace(backbone, **(entry or {}))
    extract_params = dataclasses.replace(params.extract, backbones={label: backbone}, device="cpu")
    suffix = "".join(f"-{key}{value}" for key, value in sorted((entry or {}).items())).replace(" ", "")
    store = work / name / f"store{suffix}.h5"
    return extract(work / name / "manifest.csv", root, store, work / "cache", extract_params)


def measure(name: str, work: Path) -> None:
    store = read_store(store_of(name, work).store)
    heads = load_params(REPO / "params.yaml").heads
    x_test, y_test = store.subset("test")
    for head in HEADS:
        correct = {}
        for normalize in ("l2", "cl2n"):
            params = dataclasses.replace(heads[head], args={**heads[head].args, "normalize": normalize})
            trained = train_head(store, head, params)
            correct[normalize] = trained.predict_proba(x_test).argmax(axis=1) == y_test
            click.echo(
                f"cosine_normalize: dataset={name} head={head} normalize={normalize} "
                f"test_accuracy={correct[normalize].mean():.4f} correct={int(correct[normalize].sum())} n={len(y_test)}"
            )
        result = compare(correct["cl2n"], correct["l2"])
        verdict = {"a": "cl2n", "b": "l2"}.get(result.verdict, "none")
        click.echo(
            f"cosine_normalize: dataset={name} head={head} cl2n_minus_l2={result.difference:+.4f} "
            f"low={result.interval[0]:+.4f} high={result.interval[1]:+.4f} p={result.mcnemar.p_value:.3g} "
            f"cl2n_only={result.mcnemar.a_only} l2_only={result.mcnemar.b_only} verdict={verdict}"
        )


@click.command()
@click.option("--datasets", default="hymenoptera,digits,shapes", show_default=True)
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), default=Path("/tmp/cosine_normalize"),
              show_default=True)  # fmt: skip
def main(datasets: str, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for name in datasets.split(","):
        measure(name.strip(), work)


if __name__ == "__main__":
    main()
