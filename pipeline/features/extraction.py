"""Run a frozen backbone over the usable images of a manifest and write the feature store.

The embeddings are computed by an engine, `local` (this process and its loader) or `ray` (Ray Data on a cluster):
both take the same `Setup` and the manifest rows the embedding cache lacks, and land every embedding in that cache,
keyed by content hash, so the store is assembled from the cache alike and resume, incremental runs and the store's
bytes do not depend on the engine.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import sklearn
import timm
import torch
import torchvision

from pipeline.core.config import ExtractParams
from pipeline.data.loading import Runtime
from pipeline.data.manifest import Manifest, ManifestRow, manifest_sha256, read_manifest
from pipeline.features.cache import EmbeddingCache
from pipeline.features.inference_cost import count_parameters, forward_ms_per_row, random_images
from pipeline.features.setup import Setup
from pipeline.features.store import SPLIT_CODES, write_store
from pipeline.features.transferability import EvidenceStats

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
    size_reason: str  # why this size, in words (pipeline.data.preprocessing.input_size)
    feature_dim: int  # of the embedding: the network's own, or its pooled blocks concatenated
    embedding: str  # what the embedding is made of, in words (pipeline.features.embedding.Embedding)
    logme: float  # transferability of the train split's features to its labels (pipeline.features.transferability)
    backbone_params: int
    # The backbone's forward pass per image (batch 32, at the store's size), on `forward_device`: extraction's device,
    # unless only the Ray actors have it. Every model built on the store shares it in the report's inference cost.
    forward_ms_per_image: float
    forward_device: str

    def record(self) -> dict:
        """What the extract stage writes: LogME (METRIC_KEYS) to its metrics.json, the rest to details.json."""
        return {
            "backbone": self.backbone,
            "image_size": self.image_size,
            "feature_dim": self.feature_dim,
            "embedding": self.embedding,
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
            "backbone_params": self.backbone_params,
            "forward_ms_per_image": round(self.forward_ms_per_image, 6),
            "forward_device": self.forward_device,
        }


# The extract stage's DVC metric: how well the backbone's features suit the labels, before any head is trained.
METRIC_KEYS = ("logme",)


def store_attrs(setup: Setup, jpeg_draft: bool) -> dict:
    """The store's attributes: what computed its features (the manifest's are added when it is written). Not the
    engine: `local` and `ray` write the same store from the same fingerprint (pipeline/features/engines/ray_data.py).
    The embedding's make only when it is not the plain one (stores written before the choice had none)."""
    embedding = setup.backbone.embedding
    return {
        "label": setup.label,
        "backbone": setup.backbone.name,
        "weights_id": setup.backbone.weights_id,
        "weights_file": setup.weights_file,
        "preprocessing": setup.preprocessing.to_json(),
        "image_size": setup.preprocessing.crop,
        "feature_dim": setup.backbone.embedding_dim,
        **({} if embedding.plain else {"embedding": embedding.spec()}),
        "fingerprint": setup.fingerprint,
        "precision": setup.runtime.precision,
        "jpeg_draft": jpeg_draft,
        "decoder": setup.decoder,
        "versions": library_versions(),
    }


def extract(
    manifest_path: Path, data_root: Path, out: Path, cache_dir: Path, params: ExtractParams, label: str | None = None
) -> ExtractResult:
    """Embed every usable manifest row with the backbone `label` of params.backbones (None: the first), computing
    only what the embedding cache lacks; then score the train split's transferability (LogME)."""
    start = time.perf_counter()
    manifest = read_manifest(manifest_path, data_root)  # its rows checked before the cache is asked for any
    rows = manifest.ok_rows()
    setup = Setup.resolve(params, label or next(iter(params.backbones)), manifest)
    backbone, runtime = setup.backbone, setup.runtime
    with EmbeddingCache(cache_dir, setup.fingerprint, backbone.embedding_dim) as cache:
        missing = _first_occurrences([r for r in rows if r.sha256 not in cache])
        compute_start = time.perf_counter()
        embed_rows(setup, missing, data_root, cache, params)
        write_start = time.perf_counter()
        cache.compact()
        evidence = EvidenceStats(len(manifest.classes))  # LogME of the train split, from the rows as they are written
        extraction_seconds = assemble_store(out, manifest, cache, store_attrs(setup, params.jpeg_draft), evidence)
        write_seconds = time.perf_counter() - write_start
        logme = evidence.logme()
    forward_ms, forward_device = time_backbone(setup)
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
        feature_dim=backbone.embedding_dim,
        embedding=backbone.embedding.describe(),
        logme=logme,
        backbone_params=count_parameters(backbone.features),
        forward_ms_per_image=forward_ms,
        forward_device=forward_device,
    )


def time_backbone(setup: Setup) -> tuple[float, str]:
    """The backbone's forward milliseconds per image on a batch of random images at the store's size, and the
    device they were measured on: extraction's, at its precision. Measured once per store, so that the noise of two
    measurements cannot rank the models that share this forward pass differently."""
    runtime = setup.runtime
    if runtime.device.type == "cuda" and not torch.cuda.is_available():
        # GPU Ray actors driven from a machine without a GPU: this process can only time it on its CPU.
        runtime = Runtime(torch.device("cpu"), "fp32", channels_last=True)
        log.warning("extract@%s: the backbone is timed on this machine's CPU, not on the actors' GPU", setup.label)
    network = runtime.place(setup.backbone.embedder())
    return forward_ms_per_row(network, random_images(runtime, setup.preprocessing), runtime), str(runtime.device)


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


def embed_rows(
    setup: Setup, rows: list[ManifestRow], data_root: Path, cache: EmbeddingCache, params: ExtractParams
) -> None:
    """Compute the embeddings of `rows` (one per content hash) with the engine `setup` names, into `cache`."""
    if not rows:
        return
    if setup.engine == "ray":
        from pipeline.features.engines import ray_data

        ray_data.embed_rows(setup, rows, data_root, cache, params)
    else:
        from pipeline.features.engines import local

        local.embed_rows(setup, rows, data_root, cache, params)
