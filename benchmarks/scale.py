"""How every stage after extraction scales with the number of images: wall time and peak memory of each stage, run
as DVC runs it, on synthetic feature stores of 10^4, 10^5 and 10^6 rows.

    .venv/bin/python benchmarks/scale.py                    # 10^4, 10^5, 10^6 unless skipped (why: printed)
    .venv/bin/python benchmarks/scale.py --rows 10000       # one size, 100 classes
    .venv/bin/python benchmarks/scale.py --rows 1000000 --classes 1000 --max-seconds 0 --work /big/disk
    .venv/bin/python benchmarks/scale.py --rows 10000 --stages heads,audit --work /tmp/scale --keep
    .venv/bin/python benchmarks/scale.py --rows 1000000 --heads logreg,ridge,linear_svm,centroid   # knn dropped

For each size it lays out a scratch folder like the repository (--work, default a temporary folder; --keep keeps it,
and a kept store of the same size is reused by the next run): params.yaml copied from the repository with
extract.backbones = {synthetic: efficientnet_lite0 at 224 px} and finetune.backbone = synthetic,
data/features/synthetic.h5 and metrics/extract/synthetic/. Then it runs each stage's command line from
dvc.yaml, each in its own process: head@synthetic-<head> for every head of params.yaml's `heads` (its default grid;
--heads keeps some, as a user who drops a head from params.yaml),
learning_curve, audit, report. A stage running longer than --max-seconds (default 1800) is killed. Stages see the
repository's code (PYTHONPATH), not an installed copy. Nothing limits their threads (DVC does not): on a shared
machine other work slows them by more than its share of the cores (their BLAS threads wait for each other), so
compare runs made at a similar load (the first line prints it).

The synthetic store (1,280 features, seeded, written block by block with write_store in a process of its own, which
holds one block of features at a time): rows sorted by class, balanced, split train/val/test within each class by
prepare's rule (params.yaml's prepare fractions: 70/15/15). A row is ReLU(z), z = shared mean (positive, per
feature Gamma(2, 0.25)) + 8 shared directions of decreasing weight (the dominant directions every image has) + its
class's offset in a 32-dimensional class subspace (norm ~14) + within-class variation in that same subspace (norm
~21) + isotropic noise (0.3 per feature). So features are non-negative (28% zeros), class means have cosine ~0.86
to each other (0.73-0.95), a row's distance to its class mean (~19) is larger than the distance between two class
means (~15), and a linear probe is far from 100%: at 10^4 rows x 100 classes the logreg head scores 0.738 on test
(ridge 0.703, linear_svm 0.705, knn 0.696, centroid 0.748); at 10^5 rows logreg 0.786. 1,000 classes at the same
rows have a tenth of the images per class, hence a lower accuracy.

What the stages read besides the store, and what is faked:
- metrics/extract/synthetic/: ExtractResult.record() of pipeline/features/extraction.py. LogME is computed
  (pipeline.features.transferability, on the train rows, as extract does); the extraction cost is assumed, not
  measured: rows / ASSUMED_IMAGES_PER_SECOND (efficientnet_lite0 on 2 CPU cores is of that order).
- Fine-tuning is not run. The audit always reads metrics/models/finetune/predictions.csv: a copy of the first
  head's test predictions is put there before the audit (so its finetune CSV and grid show that head's errors).
  The report runs without a fine-tuned model (no data/finetune, no finetune metrics.json: it leaves the
  fine-tuning row out) and with an empty fine-tuning curve ([], what finetune_curve writes with sizes: []).
- There are no images: the audit's thumbnail grids show "cannot open" placeholders.

Printed lines (one figure each, so that runs can be compared by a script):
- `scale: rows=N classes=K store_mb=M logme=L class_cosine=C seconds=S peak_mb=P`: the store written (or
  `reused`): its size on disk, LogME, the mean cosine between class means, the generating process (not a stage).
- `scale: rows=N classes=K stage=NAME seconds=S peak_mb=M`: wall time of the stage's process (Python start and
  imports included, as under DVC) and its peak resident memory (ru_maxrss from wait4, through a small launcher
  process so that this one's size does not count). `seconds=>LIMIT`: killed at --max-seconds. A failed stage
  adds `failed=<exit code>` and prints its stderr tail; the stages after it (but the other heads) are not run.
- `stage=heads`: the head stages together: the sum of their seconds, the max of their peaks.
- `scale: rows=N classes=K model=NAME test_accuracy=A`: each head's test accuracy (how hard the synthetic task is).
- `scale: skipped rows=N classes=K: REASON`, before a size: not enough disk for the store
  (DISK_FACTOR x store bytes), or memory for a stage to hold the store; and in a default run (no --rows), an
  estimated peak memory (MEMORY_BASE_MB + MEMORY_FACTOR x store bytes, from the peaks at 10^4 and 10^5) over
  what is available, or a stage whose time, extrapolated from the sizes already run (growth exponent, at least
  1), exceeds --max-seconds. With --rows those two are a `scale: warning` and the size runs.
- `scale: growth stage=NAME exponent=E sizes=N1,N2,...`: when more than one size ran, the slope of log seconds on log
  rows (least squares over the sizes where the stage succeeded): 1 is linear in the rows, 2 quadratic. Fixed costs
  (Python start, imports: 2-30 s) pull it below the true exponent between small sizes.

Figures measured with it, and the command of each: docs/benchmarks.md ("Heads, audit and report as rows grow").
The machine's load moves a stage's time by several times (the first line prints it), so exponents mean something
only between sizes run at a similar load. learning_curve fits the chosen head's grid on few-shot draws (at most 16 + 4
images per class, whatever the rows) and scores the test split with each, and with the head as trained (no refit); the
chosen head need not be the same at every size: its exponent may compare different work.

Not measured: extraction (images through the backbone; benchmarks/extract_throughput.py), fine-tuning and its
evaluation, export, DVC's own overhead (hashing outputs; benchmarks/head_stages.py measures it on real photos).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing the package

from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.io import write_record  # noqa: E402
from pipeline.data.manifest import _split_sizes  # noqa: E402  (prepare's rule: how many of a class go to val, test)
from pipeline.data.preprocessing import Preprocessing  # noqa: E402
from pipeline.features.store import SPLIT_CODES, read_attrs, write_store  # noqa: E402
from pipeline.features.transferability import EvidenceStats  # noqa: E402

LABEL = "synthetic"  # the extract.backbones entry: stages head@synthetic-<head>
BACKBONE = "efficientnet_lite0"  # what the store says computed it: 1,280 features; the report builds it
IMAGE_SIZE = 224
FEATURE_DIM = 1280
DEFAULT_ROWS = (10_000, 100_000, 1_000_000)
BLOCK_ROWS = 8192  # rows generated and written at a time: 42 MB of float32
ASSUMED_IMAGES_PER_SECOND = 100.0  # extraction cost written to the extract metrics (the report adds it to heads)
LITE0_BACKBONE_PARAMS = 3_371_008  # efficientnet_lite0 without its classifier (metrics/extract of the sample)
# Generator knobs (see the module docstring); GENERATOR_VERSION changes whenever they or the drawing do.
GENERATOR_VERSION = 1
SHARED_SCALES = (3.0, 2.4, 2.0, 1.6, 1.3, 1.1, 1.0, 0.9)  # std of the rows along the shared directions
CLASS_DIMS = 32  # the subspace the class offsets and within-class variation live in
BETWEEN = 14.0  # norm of a class offset (expected)
WITHIN = 21.0  # norm of a row's variation around its class in the class subspace (expected)
NOISE = 0.3  # isotropic noise per feature
# Peak memory of the hungriest stage, estimated as MEMORY_BASE_MB + MEMORY_FACTOR x store bytes: the stages hold
# the store and at most one working copy of part of it (issue 26), plus Python, numpy and scikit-learn. The peaks
# measured are in docs/benchmarks.md ("Heads, audit and report as rows grow"); these cover them with a margin.
MEMORY_BASE_MB = 1000
MEMORY_FACTOR = 2.5
DISK_FACTOR = 1.3  # the store, and a margin (k-NN's head file keeps row numbers, not rows)
TAIL_LINES = 20


# --- the synthetic store --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One synthetic store: its size and seed."""

    rows: int
    classes: int
    seed: int = 0

    @property
    def store_bytes(self) -> int:
        return self.rows * FEATURE_DIM * 4

    def identity(self) -> dict:
        """What makes two stores the same (a kept store is reused when this matches its `synthetic` attribute)."""
        knobs = {"shared": list(SHARED_SCALES), "class_dims": CLASS_DIMS, "between": BETWEEN, "within": WITHIN}
        return {"version": GENERATOR_VERSION, "rows": self.rows, "classes": self.classes, "seed": self.seed,
                "noise": NOISE, **knobs}  # fmt: skip

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ClassModel:
    """The fixed part of the distribution: shared mean and directions, each class's mean before the ReLU."""

    shared: np.ndarray  # [R, D]: orthonormal shared directions, scaled by SHARED_SCALES
    class_basis: np.ndarray  # [CLASS_DIMS, D]: orthonormal, orthogonal to the shared directions
    means: np.ndarray  # [K, D]: shared mean + class offset, float32

    @classmethod
    def draw(cls, classes: int, seed: int) -> ClassModel:
        rng = np.random.default_rng([seed, 0])
        base = rng.gamma(2.0, 0.25, FEATURE_DIM)
        basis, _ = np.linalg.qr(rng.standard_normal((FEATURE_DIM, len(SHARED_SCALES) + CLASS_DIMS)))
        shared, class_basis = basis[:, : len(SHARED_SCALES)].T, basis[:, len(SHARED_SCALES) :].T
        offsets = rng.standard_normal((classes, CLASS_DIMS)) * (BETWEEN / np.sqrt(CLASS_DIMS))
        return cls(
            shared=(shared * np.array(SHARED_SCALES)[:, None]).astype(np.float32),
            class_basis=class_basis.astype(np.float32),
            means=(base + offsets @ class_basis).astype(np.float32),
        )

    def block(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Rows of the given labels: ReLU(class mean + shared variation + within-class variation + noise)."""
        n = len(labels)
        z = rng.standard_normal((n, FEATURE_DIM), dtype=np.float32)
        z *= NOISE
        z += self.means[labels]
        z += rng.standard_normal((n, len(self.shared)), dtype=np.float32) @ self.shared
        within = rng.standard_normal((n, CLASS_DIMS), dtype=np.float32) * np.float32(WITHIN / np.sqrt(CLASS_DIMS))
        z += within @ self.class_basis
        return np.maximum(z, 0, out=z)


def class_names(classes: int) -> list[str]:
    return [f"class_{k:04d}" for k in range(classes)]


def layout(spec: Spec, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels (rows sorted by class, balanced) and the split, drawn within each class by prepare's counts."""
    counts = spec.rows // spec.classes + (np.arange(spec.classes) < spec.rows % spec.classes)
    labels = np.repeat(np.arange(spec.classes, dtype=np.int64), counts)
    split = np.empty(spec.rows, dtype=np.uint8)
    rng = np.random.default_rng([spec.seed, 1])
    start = 0
    for name, n in zip(class_names(spec.classes), counts, strict=True):
        n_val, n_test = _split_sizes(name, int(n), val_fraction, test_fraction, "synthetic rows")
        codes = np.full(n, SPLIT_CODES["train"], dtype=np.uint8)
        codes[:n_test], codes[n_test : n_test + n_val] = SPLIT_CODES["test"], SPLIT_CODES["val"]
        split[start : start + n] = rng.permutation(codes)
        start += n
    return labels, split


@dataclass
class Written:
    """What writing a store measured: LogME of its train rows, its class means' mean cosine, its cost."""

    logme: float
    class_cosine: float
    seconds: float


def write_synthetic_store(
    path: Path,
    spec: Spec,
    fractions: tuple[float, float] = (0.15, 0.15),
    versions: dict | None = None,
    logme: bool = True,
) -> Written:
    """Write a synthetic feature store of `spec` to `path` block by block (one block in memory at a time).

    `fractions`: val and test, per class (prepare's); `versions`: the library versions the store records (extract's
    library_versions(), which imports torch); `logme`: score the train rows (eigendecomposing F^T F takes seconds).
    """
    start = time.perf_counter()
    labels, split = layout(spec, *fractions)
    names = class_names(spec.classes)
    paths = [f"{names[k]}/{i:07d}.jpg" for i, k in enumerate(labels)]
    hashes = [hashlib.sha256(p.encode()).hexdigest() for p in paths]  # distinct files: no exact copies
    model = ClassModel.draw(spec.classes, spec.seed)
    evidence = EvidenceStats(spec.classes) if logme else None
    sums = np.zeros((spec.classes, FEATURE_DIM))

    def blocks() -> Iterator[np.ndarray]:
        for index, first in enumerate(range(0, spec.rows, BLOCK_ROWS)):
            y, s = labels[first : first + BLOCK_ROWS], split[first : first + BLOCK_ROWS]
            block = model.block(y, np.random.default_rng([spec.seed, 2, index]))
            train = s == SPLIT_CODES["train"]
            if evidence is not None:
                evidence.add(block[train], y[train])  # LogME of the train rows, as extract computes it
            present, starts = np.unique(y, return_index=True)  # rows are sorted by class
            sums[present] += np.add.reduceat(block, starts, axis=0)
            yield block

    attrs = {**store_attrs(spec, names, paths, hashes, split), "versions": versions or {}}
    write_store(path, labels, split, paths, hashes, blocks(), FEATURE_DIM, attrs)
    means = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    cosines = means @ means.T
    off_diagonal = cosines[~np.eye(spec.classes, dtype=bool)]
    score = evidence.logme() if evidence is not None else float("nan")
    return Written(score, float(off_diagonal.mean()), time.perf_counter() - start)


def store_attrs(spec: Spec, names: list[str], paths: list[str], hashes: list[str], split: np.ndarray) -> dict:
    """The attributes extraction writes (pipeline/features/extraction.py: store_attrs, assemble_store), for a store
    that claims efficientnet_lite0 at 224 px computed it, plus `synthetic`: the generator's settings."""
    preprocessing = Preprocessing(resize=256, crop=IMAGE_SIZE, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    return {
        "label": LABEL,
        "backbone": BACKBONE,
        "weights_id": "synthetic (benchmarks/scale.py: no network computed these features)",
        "weights_file": None,
        "preprocessing": preprocessing.to_json(),
        "image_size": IMAGE_SIZE,
        "feature_dim": FEATURE_DIM,
        "fingerprint": spec.fingerprint(),
        "precision": "fp32",
        "jpeg_draft": True,
        "decoder": "pillow",
        "classes": names,
        "manifest_sha256": manifest_sha256(names, paths, hashes, split),
        "created": None,
        "synthetic": spec.identity(),
    }


def manifest_sha256(names: list[str], paths: list[str], hashes: list[str], split: np.ndarray) -> str:
    """pipeline.data.manifest.manifest_sha256 over the rows the store holds, without building a Manifest."""
    split_names = {code: name for name, code in SPLIT_CODES.items()}
    digest = hashlib.sha256()
    for path, sha, code in zip(paths, hashes, split, strict=True):
        digest.update(f"{path}\0{path.split('/')[0]}\0{split_names[int(code)]}\0{sha}\n".encode())
    return digest.hexdigest()


def extract_metrics(spec: Spec, written: Written) -> dict:
    """metrics/extract/synthetic/: ExtractResult.record(), with an assumed extraction cost."""
    from pipeline.features.extraction import ExtractResult

    assumed = spec.rows / ASSUMED_IMAGES_PER_SECOND
    result = ExtractResult(
        store=Path(f"data/features/{LABEL}.h5"), images=spec.rows, computed=spec.rows, reused=0, quarantined=0,
        seconds=assumed + written.seconds, compute_seconds=assumed, write_seconds=written.seconds,
        extraction_seconds=assumed, device="cpu", precision="fp32", fingerprint=spec.fingerprint(), label=LABEL,
        backbone=BACKBONE, image_size=IMAGE_SIZE, size_reason="synthetic", feature_dim=FEATURE_DIM,
        embedding="the backbone's own", logme=written.logme, backbone_params=LITE0_BACKBONE_PARAMS,
        forward_ms_per_image=1000 / ASSUMED_IMAGES_PER_SECOND, forward_device="cpu",
    )  # fmt: skip
    return result.record()


# --- the scratch project ---------------------------------------------------------------------------------------


def scratch_params(repo_params: dict, heads: list[str] | None = None) -> dict:
    """The repository's params.yaml with one backbone entry, `synthetic`, that fine-tuning and the audit name, and
    the entries of `heads` alone under heads (None: every one)."""
    params = json.loads(json.dumps(repo_params))  # a deep copy
    params["extract"]["backbones"] = {LABEL: {"backbone": BACKBONE, "image_size": IMAGE_SIZE}}
    if heads is not None:
        params["heads"] = {name: entry for name, entry in params["heads"].items() if name in heads}
    params["finetune"]["backbone"] = LABEL
    if params.get("audit", {}).get("backbone"):
        params["audit"]["backbone"] = LABEL
    return params


def write_project_files(folder: Path, heads: list[str]) -> None:
    """params.yaml (the repository's, adjusted, with `heads`) and the empty fine-tuning curve the report reads."""
    repo_params = yaml.safe_load((REPO / "params.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(scratch_params(repo_params, heads), sort_keys=False))
    curve = folder / "metrics" / "learning_curve" / "finetune.json"
    curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write_text("[]\n")  # what finetune_curve writes with finetune_curve.sizes: []


def store_paths(folder: Path) -> tuple[Path, Path]:
    return folder / "data" / "features" / f"{LABEL}.h5", folder / "metrics" / "extract" / LABEL


def store_is_current(folder: Path, spec: Spec) -> bool:
    """A store kept by an earlier run (--keep) of the same size, seed and generator."""
    store, metrics = store_paths(folder)
    kept = store.is_file() and (metrics / "details.json").is_file()
    return kept and read_attrs(store).get("synthetic") == spec.identity()


def write_store_and_metrics(folder: Path, spec: Spec) -> str:
    """The store and its extract metrics in `folder` (run in a process of its own: it imports torch for the
    library versions); the figures of the store, as printed."""
    from pipeline.features.extraction import METRIC_KEYS, library_versions  # imports torch

    store, metrics = store_paths(folder)
    store.parent.mkdir(parents=True, exist_ok=True)
    prepare = load_params(REPO / "params.yaml").prepare
    fractions = (prepare.val_fraction, prepare.test_fraction)
    written = write_synthetic_store(store, spec, fractions, library_versions())
    write_record(metrics, extract_metrics(spec, written), METRIC_KEYS)
    return (
        f"store_mb={store.stat().st_size / 2**20:.0f} logme={written.logme:.4f} class_cosine={written.class_cosine:.3f}"
    )


def prepare_project(folder: Path, spec: Spec, heads: list[str]) -> bool:
    """Lay out `folder` like the repository, with the store and what the stages read besides it; say how."""
    write_project_files(folder, heads)
    size = f"rows={spec.rows} classes={spec.classes}"
    if store_is_current(folder, spec):
        click.echo(f"scale: {size} store_mb={store_paths(folder)[0].stat().st_size / 2**20:.0f} reused")
        return True
    argv = [sys.executable, __file__, "--write-store", "--rows", str(spec.rows), "--classes", str(spec.classes)]
    run = run_stage("synthetic_store", [*argv, "--seed", str(spec.seed), "--work", str(folder)], folder, 0)
    if not run.ok:
        report_failure(folder, spec, run, 0)
        return False
    figures = (folder / "logs" / "synthetic_store.out").read_text().split()[-3:]
    click.echo(f"scale: {size} {' '.join(figures)} seconds={run.seconds:.1f} peak_mb={run.peak_mb:.0f}")
    return True


def stage_commands(heads: list[str]) -> dict[str, list[str]]:
    """Each stage's command line from dvc.yaml, in run order: the head matrix expanded for `synthetic`."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commands = {
        f"head@{LABEL}-{head}": render(stages["head"]["cmd"], {"item.backbone": LABEL, "item.head": head})
        for head in heads
    }
    for name in ("learning_curve", "audit", "report"):
        commands[name] = render(stages[name]["cmd"], {})
    return commands


def render(cmd: str, values: dict[str, str]) -> list[str]:
    """A dvc.yaml command with its ${...} filled in, as argv; `python` is this interpreter."""
    unknown = set(re.findall(r"\$\{([^}]*)\}", cmd)) - set(values)
    if unknown:
        raise click.ClickException(f"dvc.yaml command uses {sorted(unknown)}, which this benchmark does not fill in")
    argv = shlex.split(re.sub(r"\$\{([^}]*)\}", lambda m: values[m.group(1)], cmd))
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


def fake_finetune_predictions(folder: Path, first_head: str) -> None:
    """The audit reads the fine-tuned network's test answers: a copy of the first head's stands in for them."""
    models = folder / "metrics" / "models"
    source = models / f"{LABEL}-{first_head}" / "predictions.csv"
    if source.is_file():
        (models / "finetune").mkdir(parents=True, exist_ok=True)
        shutil.copy(source, models / "finetune" / "predictions.csv")


# --- running a stage -------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    name: str
    seconds: float
    peak_mb: float
    exit_code: int
    killed: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.killed


# Each stage is started by this small interpreter (python -S: no site-packages, ~10 MB), which forks it, enforces
# --max-seconds and reports wait4's figures, rather than by the benchmark itself: on Linux a child's ru_maxrss starts
# from its parent's resident size at the fork (exec keeps the high-water mark), so a stage forked by this process
# (numpy and h5py loaded) would report at least this process's size. The stage runs in a session of its own, which
# the launcher kills when it is interrupted.
LAUNCHER = """
import json, os, signal, sys, time
out, limit, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
killed = []
def kill(signum, frame):
    killed.append(signum)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.setsid()
    os.execvp(argv[0], argv)
for stop in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM):  # past --max-seconds, or the benchmark stopped
    signal.signal(stop, kill)
if limit > 0:
    signal.setitimer(signal.ITIMER_REAL, limit)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
signal.setitimer(signal.ITIMER_REAL, 0)
code = os.waitstatus_to_exitcode(status)
with open(out, "w") as f:
    json.dump({"seconds": seconds, "maxrss_kb": usage.ru_maxrss, "exit": code, "killed": signal.SIGALRM in killed}, f)
"""


def run_stage(name: str, argv: list[str], folder: Path, max_seconds: float) -> StageRun:
    """Run one stage in `folder` as its own process (group): its wall time and peak RSS (wait4's ru_maxrss, KiB on
    Linux), its output in logs/<name>.out and .err."""
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    figures = logs / f"{name}.json"
    figures.unlink(missing_ok=True)
    launch = [sys.executable, "-S", "-c", LAUNCHER, str(figures), str(max_seconds), *argv]
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        subprocess.run(launch, cwd=folder, env=env, stdout=out, stderr=err, check=True)
    done = json.loads(figures.read_text())
    return StageRun(name, done["seconds"], done["maxrss_kb"] / 1024, done["exit"], done["killed"])


def stderr_tail(folder: Path, name: str) -> list[str]:
    return (folder / "logs" / f"{name}.err").read_text(errors="replace").splitlines()[-TAIL_LINES:]


def figure_line(spec: Spec, run: StageRun, max_seconds: float) -> str:
    seconds = f">{max_seconds:g}" if run.killed else f"{run.seconds:.1f}"
    failed = f" failed={run.exit_code}" if run.exit_code and not run.killed else ""
    return (
        f"scale: rows={spec.rows} classes={spec.classes} stage={run.name} seconds={seconds} "
        f"peak_mb={run.peak_mb:.0f}{failed}"
    )


def heads_line(spec: Spec, runs: list[StageRun], max_seconds: float) -> str:
    heads = [r for r in runs if r.name.startswith("head@")]
    total = sum(max_seconds if r.killed else r.seconds for r in heads)
    seconds = f">{total:.1f}" if any(r.killed for r in heads) else f"{total:.1f}"
    return (
        f"scale: rows={spec.rows} classes={spec.classes} stage=heads seconds={seconds} "
        f"peak_mb={max(r.peak_mb for r in heads):.0f}"
    )


def run_size(spec: Spec, folder: Path, names: list[str], heads: list[str], max_seconds: float) -> list[StageRun]:
    """Every asked-for stage at one size, in dvc.yaml's order; a stage after a failed one is not run (but the
    other heads: they do not depend on each other)."""
    if not prepare_project(folder, spec, heads):
        return []
    commands = stage_commands(heads)
    runs: list[StageRun] = []
    for name in names:
        failed = [r.name for r in runs if not r.ok]
        if failed and not name.startswith("head@"):
            click.echo(f"scale: rows={spec.rows} classes={spec.classes} stage={name} not run: {failed[0]} failed")
            continue
        if name == "audit":
            fake_finetune_predictions(folder, heads[0])
        run = run_stage(name, commands[name], folder, max_seconds)
        runs.append(run)
        click.echo(figure_line(spec, run, max_seconds))
        if not run.ok:
            report_failure(folder, spec, run, max_seconds)
    if any(r.name.startswith("head@") for r in runs):
        click.echo(heads_line(spec, runs, max_seconds))
    for head in heads:
        metrics = folder / "metrics" / "models" / f"{LABEL}-{head}" / "metrics.json"
        if any(r.name == f"head@{LABEL}-{head}" and r.ok for r in runs):
            accuracy = json.loads(metrics.read_text())["accuracy"]
            click.echo(
                f"scale: rows={spec.rows} classes={spec.classes} model={LABEL}-{head} test_accuracy={accuracy:.4f}"
            )
    return runs


def report_failure(folder: Path, spec: Spec, run: StageRun, max_seconds: float) -> None:
    why = f"killed after {max_seconds:g} s (--max-seconds)" if run.killed else f"exit code {run.exit_code}"
    click.echo(f"scale: stage {run.name} failed at rows={spec.rows} classes={spec.classes}: {why}; its stderr ends:")
    for line in stderr_tail(folder, run.name) or ["(nothing)"]:
        click.echo(f"    {line}")


# --- sizes: what to skip, how times grow -----------------------------------------------------------------------


def size_check(
    spec: Spec, work: Path, done: dict[int, list[StageRun]], max_seconds: float, asked: bool
) -> tuple[list[str], list[str]]:
    """(reasons not to run `spec` here, warnings to print if it runs). Not enough disk for the store and k-NN's
    head, or not enough memory for a stage to hold the store, always skip a size; an estimated peak memory over
    what is available, or a stage predicted to take longer than --max-seconds, skip it in a default run and only
    warn when its size was asked for (--rows)."""
    hard, soft = [], []
    free_disk, available = shutil.disk_usage(work).free, psutil.virtual_memory().available
    disk = DISK_FACTOR * spec.store_bytes
    if disk > free_disk:
        hard.append(f"needs ~{disk / 2**30:.1f} GB of disk (the store and a margin), {free_disk / 2**30:.1f} GB free")
    store = f"the {spec.store_bytes / 2**30:.1f} GB store"
    least, estimate = (MEMORY_BASE_MB * 2**20 + f * spec.store_bytes for f in (1, MEMORY_FACTOR))
    if least > available:
        hard.append(f"a stage holds {store} and needs {least / 2**30:.1f} GB, {available / 2**30:.1f} GB available")
    elif estimate > available:
        soft.append(
            f"the largest stage may peak at ~{estimate / 2**30:.1f} GB ({MEMORY_BASE_MB} MB + {MEMORY_FACTOR:g} x "
            f"{store}), {available / 2**30:.1f} GB available"
        )
    predicted = predicted_seconds(spec.rows, done)
    slow = [f"{name} ~{t:.0f} s" for name, t in predicted.items() if name != "heads" and t > max_seconds > 0]
    if slow:
        sizes = ",".join(map(str, sorted(done)))
        soft.append(f"predicted over --max-seconds {max_seconds:g}: {', '.join(slow)} (from rows {sizes})")
    return (hard, soft) if asked else (hard + soft, [])


def predicted_seconds(rows: int, done: dict[int, list[StageRun]]) -> dict[str, float]:
    """Each stage's seconds at `rows`, from the largest size it ran at and its growth exponent (1 when it ran at
    one size only)."""
    predicted = {}
    for name, points in stage_points(done).items():
        exponent = growth_exponent(points) if len(points) > 1 else 1.0
        largest, seconds = max(points)
        predicted[name] = seconds * (rows / largest) ** max(exponent, 1.0)
    return predicted


def stage_points(done: dict[int, list[StageRun]]) -> dict[str, list[tuple[int, float]]]:
    """(rows, seconds) of each stage where it succeeded, `heads` included."""
    points: dict[str, list[tuple[int, float]]] = {}
    for rows, runs in sorted(done.items()):
        for run in runs:
            if run.ok:
                points.setdefault(run.name, []).append((rows, run.seconds))
        heads = [r for r in runs if r.name.startswith("head@")]
        if heads and all(r.ok for r in heads):
            points.setdefault("heads", []).append((rows, sum(r.seconds for r in heads)))
    return points


def growth_exponent(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log seconds on log rows."""
    rows, seconds = zip(*points, strict=True)
    return float(np.polyfit(np.log(rows), np.log(seconds), 1)[0])


def stage_names(asked: str | None, heads: list[str]) -> list[str]:
    """dvc.yaml's names in run order; --stages picks some (`heads`: every head stage)."""
    every = [f"head@{LABEL}-{h}" for h in heads] + ["learning_curve", "audit", "report"]
    if not asked:
        return every
    picked = set()
    for name in (n.strip() for n in asked.split(",") if n.strip()):
        if name not in every and name != "heads":
            raise click.BadParameter(f"unknown stage {name!r}; valid: heads, {', '.join(every)}", param_hint="--stages")
        picked |= {n for n in every if n.startswith("head@")} if name == "heads" else {name}
    return [n for n in every if n in picked]


@click.command()
@click.option("--rows", type=click.IntRange(min=100), multiple=True, help="Rows of a store (repeatable). [default: "
              "10^4, 10^5, 10^6, the largest skipped when predicted over --max-seconds]")  # fmt: skip
@click.option("--classes", type=click.IntRange(min=2), default=100, show_default=True)
@click.option("--stages", "stages_asked", help="Comma-separated stages to run (dvc.yaml's names, or `heads`).")
@click.option("--heads", "heads_asked", help="Comma-separated heads of params.yaml to keep (as a user drops knn at "
              "10^6 rows) [default: every one]")  # fmt: skip
@click.option("--max-seconds", type=click.FloatRange(min=0), default=1800, show_default=True,
              help="Kill a stage running longer (0: no limit).")  # fmt: skip
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), help="Scratch folder [default: a temp dir].")
@click.option("--keep", is_flag=True, help="Keep the scratch folder (a kept store of the same size is reused).")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--write-store", "store_only", is_flag=True, hidden=True, help="Only write the store of --rows into --work."
)
def main(rows, classes, stages_asked, heads_asked, max_seconds, work, keep, seed, store_only) -> None:
    if store_only:  # the process prepare_project starts
        click.echo(write_store_and_metrics(work, Spec(rows[0], classes, seed)))
        return
    heads = list(load_params(REPO / "params.yaml").heads)
    if heads_asked:
        unknown = [h for h in heads_asked.split(",") if h not in heads]
        if unknown:
            raise click.BadParameter(f"not heads of params.yaml: {', '.join(unknown)}", param_hint="--heads")
        heads = [h for h in heads if h in heads_asked.split(",")]
    names = stage_names(stages_asked, heads)
    sizes, asked = (sorted(set(rows)), True) if rows else (list(DEFAULT_ROWS), False)
    if min(sizes) < 3 * classes:
        raise click.BadParameter(f"at least 3 rows per class (train, val, test): {3 * classes}", param_hint="--rows")
    work = Path(work or tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    click.echo(
        f"scale: {len(names)} stages, sizes {','.join(map(str, sizes))} x {classes} classes, {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f}), {psutil.virtual_memory().available / 2**30:.1f} GB available, "
        f"{shutil.disk_usage(work).free / 2**30:.0f} GB free in {work}"
    )
    done: dict[int, list[StageRun]] = {}
    for n in sizes:
        spec = Spec(n, classes, seed)
        reasons, warnings = size_check(spec, work, done, max_seconds, asked)
        if reasons:
            click.echo(f"scale: skipped rows={n} classes={classes}: {'; '.join(reasons)}")
            continue
        if warnings:
            click.echo(f"scale: warning rows={n} classes={classes}: {'; '.join(warnings)}")
        folder = work / f"rows{n}-classes{classes}"
        try:
            done[n] = run_size(spec, folder, names, heads, max_seconds)
        finally:
            if not keep:
                shutil.rmtree(folder, ignore_errors=True)
    for name, points in stage_points(done).items():
        if len(points) > 1:
            used = ",".join(str(r) for r, _ in points)
            click.echo(f"scale: growth stage={name} exponent={growth_exponent(points):.2f} sizes={used}")
    if not keep and not any(work.iterdir()):
        work.rmdir()


if __name__ == "__main__":
    main()
