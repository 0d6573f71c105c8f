"""Fit time (train_head: grid search on val + refit) and peak memory of every head in params.yaml.

    .venv/bin/python benchmarks/heads.py --store data/features/efficientnet_lite0.h5
    .venv/bin/python benchmarks/heads.py --synthetic                  # 50,000 x 1,280, 100 classes
    .venv/bin/python benchmarks/heads.py --synthetic --rows 5000      # a quick check
    .venv/bin/python benchmarks/heads.py --synthetic --overlap 0.8    # overlapping classes, correlated features
    .venv/bin/python benchmarks/heads.py --synthetic --device cuda    # logreg and linear_svm on the GPU

Each head runs in a fresh subprocess, so one head's memory never shows in another's peak. Peak RSS is the
child's whole peak (features included); "data MB" is the peak after loading the features, before fitting.
Timings are wall-clock on a shared machine: treat them as approximate.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

from pipeline.core.config import load_params  # noqa: E402
from pipeline.features.store import SPLIT_CODES, FeatureStore, read_store  # noqa: E402
from pipeline.heads.persistence import save_head  # noqa: E402
from pipeline.heads.selection import train_head  # noqa: E402


def synthetic_store(
    rows: int,
    dim: int,
    n_classes: int,
    separation: float,
    seed: int = 0,
    overlap: float = 0.0,
    spread: float = 2.5,
    latent: int = 64,
) -> FeatureStore:
    """Synthetic features, float32, split 70/15/15 at random, written block by block so memory holds the matrix
    once. overlap 0: separable Gaussian blobs (class means N(0, separation^2) per dimension, unit noise), which
    every head gets right. overlap > 0: embeddings more like a CNN's: class means at about that cosine to each
    other (a shared direction), the classes told apart in a `latent`-dimensional subspace where the within-class
    spread is `spread` times the between-class one (features correlated through it), plus isotropic noise; with
    the defaults a linear probe reaches about 75-90%."""
    rng = np.random.default_rng(seed)
    if overlap > 0:
        basis = rng.standard_normal((latent, dim)) / np.sqrt(latent)
        shared = rng.standard_normal(dim) * np.sqrt(overlap / (1.0 - overlap))
        means = (shared + rng.standard_normal((n_classes, latent)) @ basis).astype(np.float32)
    else:
        means = (rng.normal(size=(n_classes, dim)) * separation).astype(np.float32)
    labels = rng.permutation(np.arange(rows) % n_classes)
    u = rng.random(rows)
    split = np.where(u < 0.7, SPLIT_CODES["train"], np.where(u < 0.85, SPLIT_CODES["val"], SPLIT_CODES["test"]))
    features = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 4096):
        block = labels[start : start + 4096]
        if overlap > 0:
            noise = spread * rng.standard_normal((len(block), latent)) @ basis
            noise += 0.5 * rng.standard_normal((len(block), dim))
        else:
            noise = rng.standard_normal((len(block), dim), dtype=np.float32)
        features[start : start + len(block)] = means[block] + noise
    return FeatureStore(
        features=features,
        labels=labels.astype(np.int64),
        split=split.astype(np.uint8),
        paths=[""] * rows,
        sha256=[""] * rows,
        attrs={"classes": [f"class{k}" for k in range(n_classes)], "fingerprint": "synthetic", "backbone": "synthetic"},
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_head(
    name: str, params_path: Path, store_path: Path | None, synthetic: dict, threads: int | None, device: str | None
) -> dict:
    """Train one head (in this process, which the parent started for it alone) and report."""
    if threads:
        threadpool_limits(limits=threads)  # BLAS and OpenMP pools alike
    store = read_store(store_path) if store_path else synthetic_store(**synthetic)
    data_mb = peak_rss_mb()
    params = load_params(params_path).heads[name]
    head = train_head(store, name, dataclasses.replace(params, device=device) if device else params)
    fit_peak_mb = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        save_head(head, Path(tmp) / "head.h5")
        save_seconds = time.perf_counter() - start
        file_mb = (Path(tmp) / "head.h5").stat().st_size / 2**20
    best = max(head.val_curve, key=lambda c: (c["val_accuracy"], -c["val_log_loss"]))
    x_test, y_test = store.subset("test")
    return {
        "head": name,
        "kind": head.kind,
        "train_val": f"{head.n_train}+{head.n_val}",
        "dim": store.features.shape[1],
        "classes": len(store.classes),
        "grid_points": len(head.val_curve),
        "fit_s": round(head.fit_seconds, 1),
        "chosen": {k: v for k, v in best.items() if not k.startswith("val_") and k != "temperature"},
        "val_acc": round(best["val_accuracy"], 4),
        "test_acc": round(float((head.predict_proba(x_test).argmax(1) == y_test).mean()), 4),
        "peak_mb": round(fit_peak_mb),
        "data_mb": round(data_mb),
        "file_mb": round(file_mb, 1),
        "save_s": round(save_seconds, 1),
    }


def run_child(
    name: str, params: Path, store: Path | None, synthetic: dict, threads: int | None, device: str | None, timeout: int
) -> dict:
    args = [sys.executable, __file__, "--measure-one", name, "--params", str(params)]
    args += [f"--device={device}"] if device else []
    args += [f"--threads={threads}"] if threads else []
    args += ["--store", str(store)] if store else ["--synthetic"]
    args += [f"--rows={synthetic['rows']}", f"--dim={synthetic['dim']}", f"--classes={synthetic['n_classes']}"]
    args += [f"--separation={synthetic['separation']}", f"--overlap={synthetic['overlap']}"]
    args += [f"--spread={synthetic['spread']}"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"head": name, "error": f"killed after {timeout}s"}
    if done.returncode != 0:
        return {"head": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


COLUMNS = ["head", "kind", "train_val", "grid_points", "fit_s", "chosen", "val_acc", "test_acc", "peak_mb", "data_mb"]
COLUMNS += ["file_mb"]


def print_table(title: str, rows: list[dict]) -> None:
    click.echo(title)
    cells = [[str(r.get(c, "")) if "error" not in r or c == "head" else "" for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for row, r in zip(cells, rows, strict=True):
        line = "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
        click.echo(line + (f"  ERROR: {r['error']}" if "error" in r else ""))


@click.command()
@click.option("--store", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A feature store (.h5).")
@click.option("--synthetic", is_flag=True, help="Also run on synthetic separable features.")
@click.option("--rows", default=50_000, show_default=True, help="Synthetic rows (train/val/test 70/15/15).")
@click.option("--dim", default=1280, show_default=True, help="Synthetic feature dimension.")
@click.option("--classes", "n_classes", default=100, show_default=True, help="Synthetic classes.")
@click.option("--separation", default=0.2, show_default=True, help="Std of the synthetic class means (noise 1).")
@click.option("--overlap", default=0.0, show_default=True, help="Cosine of the class means; 0: separable blobs.")
@click.option("--spread", default=2.5, show_default=True, help="With --overlap: within- over between-class spread.")
@click.option("--params", type=click.Path(exists=True, path_type=Path), default=REPO / "params.yaml", show_default=True)
@click.option("--head", "heads", multiple=True, help="Only these heads (names under `heads`); default: all.")
@click.option("--threads", type=int, help="Limit BLAS/OpenMP threads per head (default: the libraries' own).")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Override heads.<name>.device (logreg, linear_svm)."
)
@click.option("--timeout", default=900, show_default=True, help="Seconds before a head's process is killed.")
@click.option("--measure-one", hidden=True, help="Internal: measure one head in this process, print JSON.")
def main(
    store: Path | None,
    synthetic: bool,
    rows: int,
    dim: int,
    n_classes: int,
    separation: float,
    overlap: float,
    spread: float,
    params: Path,
    heads: tuple[str, ...],
    threads: int | None,
    device: str | None,
    timeout: int,
    measure_one: str | None,
) -> None:
    spec = {"rows": rows, "dim": dim, "n_classes": n_classes, "separation": separation}
    spec |= {"overlap": overlap, "spread": spread}
    if measure_one:
        click.echo(json.dumps(measure_head(measure_one, params, store, spec, threads, device)))
        return
    if not store and not synthetic:
        raise click.UsageError("give --store PATH, --synthetic, or both")
    defined = list(load_params(params).heads)
    unknown = [h for h in heads if h not in defined]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)} not under heads in {params}; defined: {', '.join(defined)}")
    names = list(heads) or defined
    threads_note = f", {threads} BLAS thread(s)" if threads else ""
    targets = [(f"store {store}{threads_note}", store)] if store else []
    targets += [(f"synthetic {spec}{threads_note}", None)] if synthetic else []
    for title, path in targets:
        results = []
        for name in names:
            results.append(run_child(name, params, path, spec, threads, device, timeout))
            click.echo(f"  {name}: {results[-1].get('fit_s', results[-1].get('error'))}", err=True)
        print_table(title, results)


if __name__ == "__main__":
    main()
