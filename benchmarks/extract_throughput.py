"""Extraction throughput: end-to-end images/s over pure-forward images/s, measured in the same run; then the
loader alone (no forward pass) against Pillow's ceiling with as many processes.

    python benchmarks/extract_throughput.py [--data ../shared/datasets/hymenoptera | --photos N]
        [--loader auto|workers|inline] [--decode auto|cpu|device] [--batch-size B] [--num-workers W]
        [--engine local|ray [--actors A] [--cpus-per-actor C]]

End to end = the extract library call on a fresh embedding cache: read, hash, decode, preprocess,
forward, cache flush and store write (model loading, once per call, is printed apart). Pure forward =
the same backbone on ready tensors of the same batch size. Prints both and `ratio X` (target >= 0.85).

`--photos N` makes N unique photo-like JPEGs from the hymenoptera photos (benchmarks/photos.py) and runs on
them, so a GPU has more than 398 images to chew on. The decode-only comparison runs the extract stage's own
loader (read, hash, decode, resize, crop; JPEGs on the device with `--decode device`) over every image, against
a process pool that only reads, decodes with Pillow and resizes/crops the same files (`decode ceiling`), with
as many processes as the loader decodes in (`--num-workers` for the workers loader, one thread per torch
thread inline).

`--engine ray` compares the engines instead: whole extract calls on a fresh cache, local and Ray alternating
(ABBA), each on every image and on one batch of them. Ray's start-up (starting or joining the cluster, once per
process) is printed apart; the one-batch calls give each engine's fixed cost per run (for Ray: scheduling, starting
the actors, which import torch and load the backbone), and (N - B) / (t_N - t_B) the rate once running.

A small shared machine's speed drifts by tens of percent within seconds, so the two are measured in short
alternating slices (a few batches each, in ABBA order so a steady drift cancels) and the totals compared.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import torch
from photos import make_photos

from pipeline.core.config import BackboneParams, ExtractParams, RayParams, usable_cores
from pipeline.core.device import Runtime
from pipeline.data.decoding import JpegDecoder, resolve_decoder
from pipeline.data.images import decode_rgb, read_bytes
from pipeline.data.loading import Images, image_batches
from pipeline.data.manifest import Manifest, ManifestRow, build_manifest, write_manifest
from pipeline.data.preprocessing import Preprocessing
from pipeline.features.backbones import build_backbone
from pipeline.features.extraction import extract

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def only(params: ExtractParams) -> BackboneParams:
    """The one backbone this benchmark runs (--backbone, --image-size)."""
    return params.backbone(next(iter(params.backbones)))


class PureForward:
    """The backbone alone on a ready, normalised batch: the ceiling extraction can approach."""

    def __init__(self, params: ExtractParams):
        backbone = build_backbone(only(params).backbone)
        # As extract runs it (channels_last everywhere).
        self.runtime = Runtime.resolve(params.device, params.precision, option="--device", channels_last=True)
        self.device, self.precision = self.runtime.device, self.runtime.precision
        size = backbone.preprocessing.with_image_size(only(params).image_size).crop
        self.model = self.runtime.place(backbone.features).eval()
        self.batch = torch.randn(params.batch_size, 3, size, size, device=self.device)
        self.batch = self.batch.contiguous(memory_format=torch.channels_last)
        self.seconds(2)  # warm-up: allocator, kernel selection

    @torch.inference_mode()
    def seconds(self, n_batches: int) -> float:
        with self.runtime.autocast():
            _sync(self.device)
            start = time.perf_counter()
            for _ in range(n_batches):
                self.model(self.batch)
            _sync(self.device)
        return time.perf_counter() - start


def end_to_end_seconds(manifest: Manifest, data: Path, params: ExtractParams) -> tuple[float, float]:
    """(decode-to-store seconds, model loading seconds) of one extract call on a fresh embedding cache."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_manifest(manifest, work / "manifest.csv")
        result = extract(work / "manifest.csv", data, work / "features.h5", work / "cache", params)
    assert result.computed == len(manifest.rows)
    busy = result.compute_seconds + result.write_seconds
    return busy, result.seconds - busy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(
    rows: list[ManifestRow], full: Manifest, data: Path, params: ExtractParams, slice_batches: int, repeats: int
) -> None:
    """Print end-to-end and pure-forward images/s, measured in alternating slices, and their ratio."""
    batch_size = params.batch_size
    per_slice = min(slice_batches * batch_size, len(rows) // batch_size * batch_size) or len(rows)
    slices = [rows[i : i + per_slice] for i in range(0, len(rows) - per_slice + 1, per_slice)]
    print(
        f"{len(rows)} images from {data}, {only(params).backbone}, batch {batch_size}, loader {params.loader}, "
        f"decode {params.decode}, workers {params.num_workers}, draft {params.jpeg_draft}; "
        f"{repeats} x {len(slices)} slices of {per_slice} images"
    )
    forward = PureForward(params)
    fwd_images = fwd_seconds = e2e_images = e2e_seconds = 0.0
    setup, pair_ratios = [], []
    for k, part in enumerate(slices * repeats):
        manifest = Manifest(part, full.layout, [])
        n_batches = -(-len(part) // batch_size)
        steps = ("forward", "e2e") if k % 2 == 0 else ("e2e", "forward")  # ABBA: a steady drift cancels
        for step in steps:
            if step == "forward":
                f = forward.seconds(n_batches)
                fwd_images, fwd_seconds = fwd_images + n_batches * batch_size, fwd_seconds + f
            else:
                e, s = end_to_end_seconds(manifest, data, params)
                e2e_images, e2e_seconds = e2e_images + len(part), e2e_seconds + e
                setup.append(s)
        pair_ratios.append((len(part) / e) / (n_batches * batch_size / f))
    fwd_rate, e2e_rate = fwd_images / fwd_seconds, e2e_images / e2e_seconds
    print(f"device {forward.device} precision {forward.precision} torch threads {torch.get_num_threads()}")
    print(f"model loading, hashing and timing {statistics.median(setup):.2f} s per extract call (not in end-to-end)")
    print(f"forward images/s {fwd_rate:.1f} ({fwd_images:.0f} images in {fwd_seconds:.1f} s)")
    print(f"end-to-end images/s {e2e_rate:.1f} ({e2e_images:.0f} images in {e2e_seconds:.1f} s)")
    quartiles = statistics.quantiles(pair_ratios, n=4) if len(pair_ratios) > 1 else pair_ratios * 3
    print(
        f"slice ratios: median {statistics.median(pair_ratios):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
        f"range {min(pair_ratios):.3f}-{max(pair_ratios):.3f} ({len(pair_ratios)} slices)"
    )
    print(f"ratio {e2e_rate / fwd_rate:.3f}")


def loader_seconds(rows: list[ManifestRow], data: Path, params: ExtractParams, runtime: Runtime) -> float:
    """The extract stage's loader alone over `rows`: every image decoded, resized, cropped, on the device."""
    p = build_backbone(only(params).backbone).preprocessing.with_image_size(only(params).image_size)
    decoder = resolve_decoder(params.decode, runtime.device, p)
    jpeg = None if decoder == "pillow" else JpegDecoder.on(runtime.device, p)
    dataset = Images.of_rows(data, rows, p.to_uint8, p.resize if params.jpeg_draft else None, jpeg=jpeg)
    start = time.perf_counter()
    for batch in image_batches(dataset, params.batch_size, params.num_workers, runtime.device, params.loader):
        assert not batch.rejected
    _sync(runtime.device)
    return time.perf_counter() - start


def _pillow_one(job: tuple[Path, Preprocessing, int | None]) -> int:
    path, p, draft = job
    return p.to_uint8(decode_rgb(read_bytes(path), draft)).shape[0]


def ceiling_seconds(paths: list[Path], p: Preprocessing, draft: int | None, processes: int) -> float:
    """Read, decode with Pillow, resize and crop `paths` in a pool of `processes` (started before the clock)."""
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_pillow_one, [(paths[0], p, draft)] * processes))  # start every process
        start = time.perf_counter()
        list(pool.map(_pillow_one, [(path, p, draft) for path in paths], chunksize=8))
        return time.perf_counter() - start


def decode_only(rows: list[ManifestRow], data: Path, params: ExtractParams, runtime: Runtime, repeats: int) -> None:
    """Print the loader's rate beside the Pillow ceiling with as many processes, alternating (ABBA)."""
    loader = params.loader if params.loader != "auto" else ("inline" if runtime.device.type == "cpu" else "workers")
    processes = params.num_workers if loader == "workers" else torch.get_num_threads()
    p = build_backbone(only(params).backbone).preprocessing.with_image_size(only(params).image_size)
    paths = [data / r.path for r in rows]
    draft = p.resize if params.jpeg_draft else None
    totals = {"loader": 0.0, "ceiling": 0.0}
    for k in range(repeats):
        for step in ("loader", "ceiling") if k % 2 == 0 else ("ceiling", "loader"):
            if step == "loader":
                totals[step] += loader_seconds(rows, data, params, runtime)
            else:
                totals[step] += ceiling_seconds(paths, p, draft, processes)
    n = len(rows) * repeats
    rate, ceiling = n / totals["loader"], n / totals["ceiling"]
    decoder = resolve_decoder(params.decode, runtime.device, p)
    print(
        f"decode only: loader ({loader}, {decoder}) {rate:.1f} img/s; Pillow ceiling with {processes} processes "
        f"{ceiling:.1f} img/s; loader/ceiling {rate / ceiling:.3f} ({len(rows)} images x {repeats})"
    )


def compare_engines(rows: list[ManifestRow], full: Manifest, data: Path, params: ExtractParams, repeats: int) -> None:
    """Print each engine's end-to-end img/s on every row, its fixed cost per run, and its rate once running."""
    from pipeline.features.engines import ray_data

    start = time.perf_counter()
    ray_data.connect()
    print(f"Ray start-up (ray.init: start or join the cluster) {time.perf_counter() - start:.1f} s, not counted below")
    print(f"{len(rows)} images, {only(params).backbone}, batch {params.batch_size}, {params.ray}")
    if len(rows) <= params.batch_size:
        raise click.UsageError(f"--engine ray needs more than one batch of images ({len(rows)} <= {params.batch_size})")
    one_batch = rows[: params.batch_size]
    seconds: dict[tuple[str, int], list[float]] = {}
    for k in range(repeats):
        for engine in ("local", "ray") if k % 2 == 0 else ("ray", "local"):
            engine_params = dataclasses.replace(params, engine=engine)
            for part in (rows, one_batch):
                busy, _ = end_to_end_seconds(Manifest(part, full.layout, []), data, engine_params)
                seconds.setdefault((engine, len(part)), []).append(busy)
    n, b = len(rows), len(one_batch)
    for engine in ("local", "ray"):
        t_n, t_b = statistics.median(seconds[engine, n]), statistics.median(seconds[engine, b])
        print(
            f"{engine}: end-to-end {n / t_n:.1f} img/s ({n} images in {t_n:.1f} s, median of {repeats}); fixed cost "
            f"per run {t_b:.1f} s ({b} images); once running {(n - b) / (t_n - t_b):.1f} img/s"
        )


@click.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=DEFAULT_DATA, show_default=True)
@click.option("--photos", type=int, default=None, help="Run on N unique photo-like JPEGs made from --data.")
@click.option("--photos-dir", type=click.Path(path_type=Path), default=None, help="Where to keep them (a temp dir).")
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--image-size", type=int, default=None, help="Default: the weights' size.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True)
@click.option("--loader", type=click.Choice(["auto", "workers", "inline"]), default="auto", show_default=True)
@click.option("--decode", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True)
@click.option("--jpeg-draft/--no-jpeg-draft", default=True, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default="auto", show_default=True)
@click.option("--slice-batches", type=int, default=3, show_default=True, help="Batches per alternating slice.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Passes over the dataset.")
@click.option("--decode-repeats", type=int, default=2, show_default=True, help="Passes of the decode-only check.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--actors", type=int, default=1, show_default=True, help="Ray actors (--engine ray).")
@click.option("--cpus-per-actor", type=float, default=1.0, show_default=True, help="CPUs each Ray actor takes.")
def main(data, photos, photos_dir, slice_batches, repeats, decode_repeats, engine, actors, cpus_per_actor, **options):
    if photos:
        folder = photos_dir or Path(tempfile.gettempdir()) / f"transfer-pipeline-photos-{photos}"
        data = make_photos(photos, folder, data)
    backbone, image_size = options.pop("backbone"), options.pop("image_size")
    params = ExtractParams.of(backbone, image_size=image_size, **options)
    full = build_manifest(data, 0.15, 0.15, seed=0, num_workers=usable_cores())
    seen: set[str] = set()  # one row per content hash: each slice's images are all computed
    rows = [r for r in full.ok_rows() if not (r.sha256 in seen or seen.add(r.sha256))]
    random.Random(0).shuffle(rows)  # every slice mixes classes and image sizes
    if engine == "ray":
        ray = RayParams(actors=actors, cpus_per_actor=cpus_per_actor)
        compare_engines(rows, full, data, dataclasses.replace(params, ray=ray), repeats)
        return
    throughput(rows, full, data, params, slice_batches, repeats)
    runtime = Runtime.resolve(params.device, params.precision, option="--device")
    decode_only(rows, data, params, runtime, decode_repeats)


if __name__ == "__main__":
    main()
