"""Run a frozen backbone over the usable images of a manifest and write the feature store."""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import sklearn
import timm
import torch
import torchvision
from tqdm import tqdm

from pipeline.backbones import Backbone, Preprocessing, build_backbone, fingerprint, input_size
from pipeline.config import ExtractParams
from pipeline.dataset import Manifest, ManifestRow, manifest_sha256, read_manifest
from pipeline.jpeg import JpegDecoder, resolve_decoder
from pipeline.runtime import Images, Runtime, forward_batches, image_batches
from pipeline.store import SPLIT_CODES, EmbeddingCache, write_store
from pipeline.transferability import EvidenceStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractResult:
    store: Path
    images: int
    computed: int  # forward passes run in this call
    reused: int  # images whose embedding came from the cache
    quarantined: int  # manifest rows skipped because prepare rejected them
    seconds: float  # the whole call: model loading and hashing included
    compute_seconds: float  # decode, preprocess, forward and cache flush of the computed images
    write_seconds: float  # cache compaction and the feature store
    # What computing every embedding of the store took, in this run or the earlier ones whose embeddings the
    # cache kept (nan if a cache written before costs were recorded holds some): the one-off extraction cost.
    extraction_seconds: float
    device: str
    precision: str
    fingerprint: str
    label: str  # the extract.backbones entry
    backbone: str  # its network
    image_size: int
    size_reason: str  # why this size, in words (pipeline.backbones.input_size)
    feature_dim: int
    logme: float  # transferability of the train split's features to its labels (pipeline.transferability)

    def metrics(self) -> dict:
        return {
            "backbone": self.backbone,
            "image_size": self.image_size,
            "feature_dim": self.feature_dim,
            "logme": round(self.logme, 6),
            "images": self.images,
            "computed": self.computed,
            "reused": self.reused,
            "quarantined": self.quarantined,
            "seconds": round(self.seconds, 3),
            "compute_seconds": round(self.compute_seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "extraction_seconds": None if math.isnan(self.extraction_seconds) else round(self.extraction_seconds, 3),
            "images_per_second": round(self.computed / self.compute_seconds, 2) if self.computed else None,
            "device": self.device,
            "precision": self.precision,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class Setup:
    """What computes a store's embeddings: one extract.backbones entry on this machine, at its input size."""

    label: str
    weights_file: str | None
    backbone: Backbone
    runtime: Runtime
    preprocessing: Preprocessing
    size_reason: str  # why this input size, in words (pipeline.backbones.input_size)
    decoder: str
    fingerprint: str

    @classmethod
    def resolve(cls, params: ExtractParams, label: str, manifest: Manifest) -> Setup:
        entry = params.backbone(label)
        backbone = build_backbone(entry.backbone, entry.weights_path, params.allow_download)
        # channels_last on CPU too: the store's bytes were fixed with it, and the fingerprint does not record it.
        runtime = Runtime.resolve(params.device, params.precision, option="extract.device", channels_last=True)
        size, why = input_size(entry.image_size, backbone.preprocessing.crop, manifest.median_short_side())
        preprocessing = backbone.preprocessing.with_image_size(size)
        decoder = resolve_decoder(params.decode, runtime.device, preprocessing)
        fp = fingerprint(backbone, preprocessing, runtime.precision, params.jpeg_draft, decoder)
        log.debug("extract@%s: %s at %d px (%s), %s, fingerprint %s", label, backbone.name, size, why, decoder, fp)
        return cls(label, entry.weights, backbone, runtime, preprocessing, why, decoder, fp)

    def store_attrs(self, jpeg_draft: bool) -> dict:
        """The store's attributes: what computed its features (the manifest's are added when it is written)."""
        return {
            "label": self.label,
            "backbone": self.backbone.name,
            "weights_id": self.backbone.weights_id,
            "weights_file": self.weights_file,
            "preprocessing": self.preprocessing.to_json(),
            "image_size": self.preprocessing.crop,
            "feature_dim": self.backbone.feature_dim,
            "fingerprint": self.fingerprint,
            "precision": self.runtime.precision,
            "jpeg_draft": jpeg_draft,
            "decoder": self.decoder,
            "versions": library_versions(),
        }


def extract(
    manifest_path: Path, data_root: Path, out: Path, cache_dir: Path, params: ExtractParams, label: str | None = None
) -> ExtractResult:
    """Embed every usable manifest row with the backbone `label` of params.backbones (None: the first), computing
    only what the embedding cache lacks; then score the train split's transferability (LogME)."""
    start = time.perf_counter()
    manifest = read_manifest(manifest_path)
    rows = manifest.ok_rows()
    setup = Setup.resolve(params, label or next(iter(params.backbones)), manifest)
    backbone, runtime = setup.backbone, setup.runtime
    with EmbeddingCache(cache_dir, setup.fingerprint, backbone.feature_dim) as cache:
        missing = _first_occurrences([r for r in rows if r.sha256 not in cache])
        compute_start = time.perf_counter()
        embed_rows(backbone, setup.preprocessing, missing, data_root, cache, params, runtime, setup.decoder)
        write_start = time.perf_counter()
        cache.compact()
        evidence = EvidenceStats(len(manifest.classes))  # LogME of the train split, from the rows as they are written
        extraction_seconds = assemble_store(out, manifest, cache, setup.store_attrs(params.jpeg_draft), evidence)
        write_seconds = time.perf_counter() - write_start
        logme = evidence.logme()
    return ExtractResult(
        store=Path(out),
        images=len(rows),
        computed=len(missing),
        reused=len(rows) - len(missing),
        quarantined=len(manifest.quarantined()),
        seconds=time.perf_counter() - start,
        compute_seconds=write_start - compute_start,
        write_seconds=write_seconds,
        extraction_seconds=extraction_seconds,
        device=str(runtime.device),
        precision=runtime.precision,
        fingerprint=setup.fingerprint,
        label=setup.label,
        backbone=backbone.name,
        image_size=setup.preprocessing.crop,
        size_reason=setup.size_reason,
        feature_dim=backbone.feature_dim,
        logme=logme,
    )


def assemble_store(
    out: Path, manifest: Manifest, cache: EmbeddingCache, attrs: dict, evidence: EvidenceStats | None = None
) -> float:
    """Write the store from the cache (row i = usable manifest row i) and return what computing its embeddings
    took, in this run or the earlier ones whose embeddings the cache kept. `evidence`, when given, accumulates
    the train rows as they pass (LogME's statistics: one read of the cache serves both)."""
    rows, classes = manifest.ok_rows(), manifest.classes
    hashes = [r.sha256 for r in rows]
    unique = list(dict.fromkeys(hashes))  # identical files share one embedding, counted once
    extraction_seconds, created = cache.seconds(unique), cache.computed_at(unique)
    labels = np.array([classes.index(r.class_name) for r in rows], dtype=np.int64)
    split = np.array([SPLIT_CODES[r.split] for r in rows], dtype=np.uint8)

    def chunks(size: int = 1024) -> Iterator[np.ndarray]:
        for i in range(0, len(hashes), size):
            block = cache.read(hashes[i : i + size])
            if evidence is not None:
                train = split[i : i + size] == SPLIT_CODES["train"]
                evidence.add(block[train], labels[i : i + size][train])
            yield block

    write_store(
        out,
        labels=labels,
        split=split,
        paths=[r.path for r in rows],
        sha256=hashes,
        feature_chunks=chunks(),
        feature_dim=cache.feature_dim,
        attrs={
            **attrs,
            "classes": classes,
            "manifest_sha256": manifest_sha256(manifest),
            # When the newest embedding was computed, not when this file was written: rewriting the store from
            # the cache (another loader, num_workers or batch_size) then gives the same bytes.
            "created": None if math.isnan(created) else _iso(created),
        },
    )
    return extraction_seconds


def embed_rows(
    backbone: Backbone,
    preprocessing: Preprocessing,
    rows: list[ManifestRow],
    data_root: Path,
    cache: EmbeddingCache,
    params: ExtractParams,
    runtime: Runtime,
    decoder: str = "pillow",
) -> None:
    """Forward `rows` through the frozen backbone, flushing each batch to the cache as it completes.

    The flush (the copy to the host, which waits for the forward pass, and the cache write) runs in a thread,
    one batch behind, so the main thread is already decoding and launching the next batch meanwhile.
    """
    if not rows:
        return
    draft = preprocessing.resize if params.jpeg_draft else None
    jpeg = None if decoder == "pillow" else JpegDecoder.on(runtime.device, preprocessing)
    dataset = Images.of_rows(data_root, rows, preprocessing.to_uint8, draft, jpeg=jpeg)
    batches = image_batches(dataset, params.batch_size, params.num_workers, runtime.device, params.loader)
    model = runtime.place(backbone.features)
    with tqdm(total=len(rows), desc="extract", unit="img") as bar, ThreadPoolExecutor(1, "flush") as flusher:
        clock = _BatchClock()
        pending = None
        for batch, embeddings in forward_batches(model, batches, runtime, preprocessing.normalize):
            hashes = [rows[i].sha256 for i in batch.index.tolist()]
            if pending is not None:
                pending.result()  # at most one batch in flight; its error surfaces here
            pending = flusher.submit(_flush, cache, hashes, embeddings, clock, bar)
        if pending is not None:
            pending.result()


class _BatchClock:
    """Each batch's cost: wall time since the previous batch was flushed (decoding or waiting for it, the
    forward pass, the previous flush; the first batch also starts the loader and warms the model)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


@torch.inference_mode()
def _flush(cache: EmbeddingCache, hashes: list[str], embeddings: torch.Tensor, clock: _BatchClock, bar) -> None:
    features = embeddings.float().cpu().numpy()
    cache.add(hashes, features, seconds=clock.lap())
    bar.update(len(hashes))


def _iso(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, timezone.utc).isoformat(timespec="seconds")


def _first_occurrences(rows: list[ManifestRow]) -> list[ManifestRow]:
    """One row per content hash: identical files are embedded once."""
    seen: set[str] = set()
    out = []
    for r in rows:
        if r.sha256 not in seen:
            seen.add(r.sha256)
            out.append(r)
    return out


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }
