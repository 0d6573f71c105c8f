"""The local engine: this process decodes (threads or DataLoader workers) and runs the forward pass."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from pipeline.core.config import ExtractParams
from pipeline.data.decoding import jpeg_decoder
from pipeline.data.loading import Images, forward_batches, image_batches
from pipeline.data.manifest import ManifestRow
from pipeline.features.cache import EmbeddingCache

if TYPE_CHECKING:
    from pipeline.features.setup import Setup


def embed_rows(
    setup: Setup, rows: list[ManifestRow], data_root: Path, cache: EmbeddingCache, params: ExtractParams
) -> None:
    """Forward `rows` through the frozen backbone, flushing each batch to the cache as it completes.

    The flush (the copy to the host, which waits for the forward pass, and the cache write) runs in a thread,
    one batch behind, so the main thread is already decoding and launching the next batch meanwhile.
    """
    preprocessing, runtime = setup.preprocessing, setup.runtime
    draft = preprocessing.draft(params.jpeg_draft)
    jpeg = jpeg_decoder(setup.decoder, runtime.device, preprocessing)
    dataset = Images.of_rows(data_root, rows, preprocessing.to_uint8, draft, jpeg=jpeg)
    batches = image_batches(dataset, params.batch_size, params.num_workers, runtime.device, params.loader)
    model = runtime.place(setup.backbone.embedder())
    with tqdm(total=len(rows), desc="extract", unit="img") as bar, ThreadPoolExecutor(1, "flush") as flusher:
        clock = BatchClock()
        pending = None
        for batch, embeddings in forward_batches(model, batches, runtime, preprocessing.normalize):
            hashes = [rows[i].sha256 for i in batch.index.tolist()]
            if pending is not None:
                pending.result()  # at most one batch in flight; its error surfaces here
            pending = flusher.submit(_flush, cache, hashes, embeddings, clock, bar)
        if pending is not None:
            pending.result()


class BatchClock:
    """Each batch's cost: wall time since the previous batch was flushed (decoding or waiting for it, the
    forward pass, the previous flush; the first batch also starts the loader and warms the model)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


@torch.inference_mode()
def _flush(cache: EmbeddingCache, hashes: list[str], embeddings: torch.Tensor, clock: BatchClock, bar) -> None:
    features = embeddings.float().cpu().numpy()
    cache.add(hashes, features, seconds=clock.lap())
    bar.update(len(hashes))
