"""The Ray engine: extraction on Ray Data, the batch-inference pattern of Ray's own examples.

The rows the embedding cache lacks stream from this process (the driver) through CPU tasks that read, check and
decode `extract.ray.decode_batch` images at a time, into a pool of actors that each hold the frozen backbone (GPU
actors on a cluster with GPUs) and embed `extract.batch_size` images a pass; the driver lands each embedded batch
in the embedding cache as it arrives. Ray does the scheduling and the retries: a decode task whose worker dies runs
again, an actor that dies is restarted and its batch rerun (Ray Data retries both without limit).

Same store as `local`: the cache is keyed by content hash and the store is assembled from it alike. Each actor
pass embeds the rows a local forward pass would (rows [k*B, (k+1)*B) of the missing ones, in order): CPU kernels
round differently for another batch composition or thread count, and with the same batches and as many torch
threads per actor as the local process uses (Ray gives an actor floor(cpus_per_actor)), the features are the same
bytes. The decoder is resolved for the CPU tasks: on a GPU cluster `decode: auto` is Pillow (the local engine's
auto there is nvJPEG), another fingerprint and another store.

Every machine of the cluster needs this package's dependencies and the images at the path the driver sees; the
package itself travels with the job (Ray's `py_modules`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import pipeline
from pipeline.core.config import ExtractParams, RayParams
from pipeline.core.device import Runtime
from pipeline.core.errors import ConfigError, DataError, PipelineError
from pipeline.data.decoding import jpeg_decoder
from pipeline.data.loading import Batch, Images, forward_batches, stack
from pipeline.data.manifest import ManifestRow
from pipeline.data.preprocessing import Preprocessing
from pipeline.features.backbones import build_backbone
from pipeline.features.cache import EmbeddingCache
from pipeline.features.embedding import Embedding
from pipeline.features.engines.local import BatchClock

if TYPE_CHECKING:
    from pipeline.features.setup import Setup

RAY_MISSING = (
    "extract.engine is ray but Ray Data is not installed: pip install -e '.[ray]' in the project's folder "
    "(or set extract.engine: local)"
)


def _ray():
    """The `ray` module with Ray Data, or a one-line error that says what to install."""
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise PipelineError(RAY_MISSING) from err
    return ray


def connect():
    """Join the cluster that RAY_ADDRESS names, or start a local one on this machine's cores, once per process."""
    ray = _ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        try:
            # This package travels with the job, so the workers run the driver's code whatever is installed there.
            ray.init(
                # Without RAY_ADDRESS, a Ray instance of this process's own: not a cluster some other `ray start` left
                # on this machine, which plain ray.init() would join.
                address=address or "local",
                runtime_env={"py_modules": [str(Path(pipeline.__file__).parent)]},
                **({} if address else {"include_dashboard": False}),
            )
        except ConnectionError as err:
            raise PipelineError(
                f"extract.engine is ray but no Ray cluster answers at RAY_ADDRESS={address}: {err}"
            ) from err
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the local engine's batches, and the cache filled in order
    context.enable_progress_bars = False  # the driver's own bar counts what reaches the cache
    context.print_on_execution_start = False
    return ray


def gpus_per_actor(settings: RayParams) -> float:
    """extract.ray.gpus_per_actor, with auto resolved on the cluster: one GPU an actor when it has any."""
    if settings.gpus_per_actor != "auto":
        return float(settings.gpus_per_actor)
    return 1.0 if connect().cluster_resources().get("GPU", 0) > 0 else 0.0


def actor_device(settings: RayParams) -> torch.device:
    """Where the actors run the backbone: what the fingerprint's precision depends on."""
    return torch.device("cuda" if gpus_per_actor(settings) > 0 else "cpu")


def check_room_to_decode(cpus: float, settings: RayParams) -> None:
    """Refuse actors that would take every CPU of the cluster: the decode tasks (one CPU each) would wait for one
    forever, and the run would hang instead of failing."""
    taken = settings.actors * settings.cpus_per_actor
    if cpus - taken < 1:
        raise ConfigError(
            f"extract.ray: {settings.actors} actors x {settings.cpus_per_actor:g} CPUs take {taken:g} of the cluster's "
            f"{cpus:g} CPUs, leaving none for the decode tasks; use fewer actors or cpus_per_actor"
        )


def embed_rows(
    setup: Setup, rows: list[ManifestRow], data_root: Path, cache: EmbeddingCache, params: ExtractParams
) -> None:
    """Embed `rows` on the cluster, each batch flushed to `cache` as the driver receives it."""
    clock = BatchClock()
    with tqdm(total=len(rows), desc="extract (ray)", unit="img") as bar:
        for batch in embeddings(setup, rows, data_root, params).iter_batches(batch_size=None, batch_format="numpy"):
            problems = [str(p) for p in batch["problem"] if p]
            if problems:  # before any of the batch reaches the cache, as the local engine stops
                raise PipelineError(problems[0])
            cache.add([str(h) for h in batch["sha256"]], batch["features"], seconds=clock.lap())
            bar.update(len(batch["sha256"]))


def embeddings(setup: Setup, rows: list[ManifestRow], data_root: Path, params: ExtractParams):
    """The Ray Dataset of `rows`' embeddings, in order: CPU tasks decode, the actor pool embeds."""
    ray = connect()
    check_room_to_decode(ray.cluster_resources().get("CPU", 0.0), params.ray)
    items = [{"path": r.path, "sha256": r.sha256} for r in rows]
    decoded = ray.data.from_items(items, override_num_blocks=math.ceil(len(rows) / params.ray.decode_batch))
    decoded = decoded.map_batches(
        decode,
        fn_kwargs={
            "root": str(Path(data_root).resolve()),
            "preprocessing": setup.preprocessing,
            "draft": setup.preprocessing.draft(params.jpeg_draft),
            "decoder": setup.decoder,
        },
        batch_size=params.ray.decode_batch,
        num_cpus=1,
        # No limit on the tasks a worker runs (Ray's default), named so that decoding stays in tasks of its own:
        # Ray Data fuses a task operator into the actors' when their remote arguments match, and the actors would
        # then decode on their own CPUs alone.
        max_calls=0,
    )
    # Blocks of exactly extract.batch_size rows, in order: each actor call embeds the rows a local forward pass
    # would (rows [k*B, (k+1)*B) of the missing ones; the decode blocks are of another size).
    decoded = decoded.repartition(target_num_rows_per_block=params.batch_size, strict=True)
    return decoded.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "network": setup.backbone.name,
            "weights": str(Path(setup.weights_file).resolve()) if setup.weights_file else None,
            "allow_download": params.allow_download,
            "preprocessing": setup.preprocessing,
            "device": setup.runtime.device.type,
            "precision": setup.runtime.precision,
            "weights_sha256": setup.backbone.weights_sha256(),
            "embedding": setup.backbone.embedding,
        },
        batch_size=params.batch_size,
        compute=ray.data.ActorPoolStrategy(size=params.ray.actors),
        num_cpus=params.ray.cpus_per_actor,
        num_gpus=gpus_per_actor(params.ray),
        zero_copy_batch=False,
    )


class Source(NamedTuple):
    """A manifest row, as far as reading its image goes (`pipeline.data.loading.ImageSource`)."""

    path: str
    sha256: str


def decode(
    batch: dict[str, np.ndarray], root: str, preprocessing: Preprocessing, draft: int | None, decoder: str
) -> dict:
    """A Ray task: read, check and decode a few rows as the local engine does (JPEGs by torchvision on the CPU when
    the decoder is not Pillow): uint8 [B, 3, crop, crop]. A file that changed since prepare, or no longer decodes,
    is a `problem` (the local engine's message), which the driver raises: an error raised here would reach it
    wrapped in Ray's, its own message lost."""
    rows = [Source(str(p), str(h)) for p, h in zip(batch["path"], batch["sha256"], strict=True)]
    jpeg = jpeg_decoder(decoder, torch.device("cpu"), preprocessing)  # decode tasks run on CPUs
    images = Images.of_rows(Path(root), rows, preprocessing.to_uint8, draft, jpeg=jpeg)
    pixels, problems = [], []
    for i in range(len(images)):
        try:
            pixels.append(images[i].pixels)
            problems.append("")
        except DataError as err:
            pixels.append(torch.zeros(3, preprocessing.crop, preprocessing.crop, dtype=torch.uint8))
            problems.append(str(err))
    return {"sha256": batch["sha256"], "pixels": stack(pixels).numpy(), "problem": np.array(problems)}


class Embedder:
    """A Ray actor holding the frozen backbone: a batch of decoded images in, their embeddings out.

    A backbone it cannot build (a weights file missing on its machine, a download refused) or whose weights are not
    the driver's (the fingerprint would lie) is its `problem`, returned with every row for the driver to raise in
    one line: an error raised here would reach it wrapped in Ray's."""

    def __init__(
        self,
        network: str,
        weights: str | None,
        allow_download: bool,
        preprocessing: Preprocessing,
        device: str,
        precision: str,
        weights_sha256: str,
        embedding: Embedding,
    ):
        self.problem = ""
        try:
            backbone = build_backbone(network, Path(weights) if weights else None, allow_download, embedding)
        except PipelineError as err:
            self.problem = f"a Ray actor could not build the backbone: {err}"
            return
        if backbone.weights_sha256() != weights_sha256:
            self.problem = (
                f"a Ray actor loaded other weights for {network} ({weights or 'the defaults'}) than the driver: "
                "install the same weights on every machine"
            )
            return
        # A GPU actor sees only the GPU Ray gave it, as device 0.
        self.runtime = Runtime.on(device, precision)
        self.model = self.runtime.place(backbone.embedder())
        self.normalize = preprocessing.normalize

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["sha256"])
        if self.problem:
            return {"sha256": batch["sha256"], "problem": np.full(n, self.problem), "features": np.zeros((n, 1))}
        images = torch.from_numpy(batch["pixels"])
        inputs = Batch(images, torch.arange(n), [])
        ((_, embeddings),) = forward_batches(self.model, iter([inputs]), self.runtime, self.normalize)
        return {"sha256": batch["sha256"], "problem": batch["problem"], "features": embeddings.float().cpu().numpy()}
