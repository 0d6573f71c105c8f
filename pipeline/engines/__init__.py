"""Where a store's embeddings are computed: `local` (this process and its loader) or `ray` (Ray Data on a cluster).

Both take the same `Setup` and the manifest rows the embedding cache lacks, and land every embedding in that cache,
keyed by content hash: the store is then assembled from the cache alike, so resume, incremental runs and the store's
bytes do not depend on the engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.backbones import Backbone, Preprocessing, build_backbone, fingerprint, input_size
from pipeline.config import ConfigError, ExtractParams
from pipeline.dataset import Manifest, ManifestRow
from pipeline.jpeg import resolve_decoder
from pipeline.runtime import Runtime, resolve_precision
from pipeline.store import EmbeddingCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """What computes a store's embeddings: one extract.backbones entry on this machine (or on the Ray cluster's
    actors), at its input size."""

    label: str
    weights_file: str | None
    backbone: Backbone
    runtime: Runtime  # where the forward pass runs: here, or in every Ray actor
    preprocessing: Preprocessing
    size_reason: str  # why this input size, in words (pipeline.backbones.input_size)
    decoder: str
    fingerprint: str
    engine: str

    @classmethod
    def resolve(cls, params: ExtractParams, label: str, manifest: Manifest) -> Setup:
        entry = params.backbone(label)
        backbone = build_backbone(entry.backbone, entry.weights_path, params.allow_download)
        if params.engine == "ray":
            from pipeline.engines import ray_data  # Ray is optional: imported only for this engine

            # The actors' device decides the precision, which the fingerprint records: a driver without a GPU may
            # drive GPU actors. Their JPEGs are decoded by CPU tasks.
            device = ray_data.actor_device(params.ray)
            if params.device not in ("auto", device.type):
                raise ConfigError(
                    f"extract.device is {params.device} but the Ray actors run on {device.type} "
                    f"(extract.ray.gpus_per_actor: {params.ray.gpus_per_actor}); set extract.device: auto, or give the "
                    "actors that device (gpus_per_actor)"
                )
            runtime = Runtime(device, resolve_precision(params.precision, device), channels_last=True)
            decode_on = torch.device("cpu")
        else:
            # channels_last on CPU too: the store's bytes were fixed with it, and the fingerprint does not record it.
            runtime = Runtime.resolve(params.device, params.precision, option="extract.device", channels_last=True)
            decode_on = runtime.device
        size, why = input_size(entry.image_size, backbone.preprocessing.crop, manifest.median_short_side())
        preprocessing = backbone.preprocessing.with_image_size(size)
        decoder = resolve_decoder(params.decode, decode_on, preprocessing)
        fp = fingerprint(backbone, preprocessing, runtime.precision, params.jpeg_draft, decoder)
        log.debug("extract@%s: %s at %d px (%s), %s, fingerprint %s", label, backbone.name, size, why, decoder, fp)
        return cls(label, entry.weights, backbone, runtime, preprocessing, why, decoder, fp, params.engine)


def embed_rows(
    setup: Setup, rows: list[ManifestRow], data_root: Path, cache: EmbeddingCache, params: ExtractParams
) -> None:
    """Compute the embeddings of `rows` (one per content hash) with the engine `setup` names, into `cache`."""
    if not rows:
        return
    if setup.engine == "ray":
        from pipeline.engines import ray_data

        ray_data.embed_rows(setup, rows, data_root, cache, params)
    else:
        from pipeline.engines import local

        local.embed_rows(setup, rows, data_root, cache, params)
