"""What computes a store's embeddings (`Setup`): the backbone of one extract.backbones entry, where it runs, its
input size and preprocessing, the JPEG decoder, and the fingerprint of all of it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.core.config import ExtractParams
from pipeline.core.device import Runtime
from pipeline.core.errors import ConfigError
from pipeline.data.decoding import resolve_decoder
from pipeline.data.manifest import Manifest
from pipeline.data.preprocessing import Preprocessing, input_size
from pipeline.features.backbones import Backbone, build_backbone, fingerprint
from pipeline.features.embedding import Embedding

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
    size_reason: str  # why this input size, in words (pipeline.data.preprocessing.input_size)
    decoder: str
    fingerprint: str
    engine: str

    @classmethod
    def resolve(cls, params: ExtractParams, label: str, manifest: Manifest) -> Setup:
        entry = params.backbone(label)
        try:
            embedding = Embedding(entry.tta, entry.layers)
            backbone = build_backbone(entry.backbone, entry.weights_path, params.allow_download, embedding)
        except ConfigError as err:  # a block index the network does not have
            raise ConfigError(f"extract.backbones.{label}.{err}") from None
        if params.engine == "ray":
            from pipeline.features.engines import ray_data  # Ray is optional: imported only for this engine

            # The actors' device decides the precision, which the fingerprint records: a driver without a GPU may
            # drive GPU actors. Their JPEGs are decoded by CPU tasks.
            device = ray_data.actor_device(params.ray)
            if params.device not in ("auto", device.type):
                raise ConfigError(
                    f"extract.device is {params.device} but the Ray actors run on {device.type} "
                    f"(extract.ray.gpus_per_actor: {params.ray.gpus_per_actor}); set extract.device: auto, or give the "
                    "actors that device (gpus_per_actor)"
                )
            runtime = Runtime.on(device, params.precision)
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
