"""Classify new images with a trained model: a head on its backbone's features, or the fine-tuned network."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.device import Runtime
from pipeline.core.errors import PipelineError
from pipeline.data.decoding import PILLOW, JpegDecoder, jpeg_decoder
from pipeline.data.loading import Images, forward_batches, image_batches
from pipeline.data.preprocessing import Preprocessing
from pipeline.features.backbones import backbone_of_store, fingerprint
from pipeline.features.store import read_attrs
from pipeline.finetuning.model import load_finetuned
from pipeline.heads.persistence import load_head
from pipeline.heads.trained import TrainedHead
from pipeline.serving.answers import Prediction, Rejected

log = logging.getLogger(__name__)


class Predictor:
    """A network that maps a normalised image batch to class probabilities, with its preprocessing."""

    def __init__(
        self,
        network,
        preprocessing: Preprocessing,
        classes: list[str],
        draft: int | None,
        runtime: Runtime,
        jpeg: JpegDecoder | None = None,
    ):
        self.runtime = runtime
        self.network = runtime.place(network)
        self.preprocessing, self.classes, self.draft, self.jpeg = preprocessing, classes, draft, jpeg

    def predict(
        self, paths: list[Path], top_k: int = 3, batch_size: int = 32, num_workers: int = 0
    ) -> tuple[list[Prediction], list[Rejected]]:
        """Top-k classes of every readable file; the others with why. `num_workers` decoding processes are
        used on an accelerator; on CPU, threads decode between forward passes (`runtime.image_batches`)."""
        dataset = Images.of_files(paths, self.preprocessing.to_uint8, self.draft, jpeg=self.jpeg)
        batches = image_batches(dataset, batch_size, num_workers, self.runtime.device)
        predictions: list[Prediction] = []
        rejected: list[Rejected] = []
        k = min(top_k, len(self.classes))
        with tqdm(total=len(paths), desc="predict", unit="img") as bar:
            for batch, proba in forward_batches(self.network, batches, self.runtime, self.preprocessing.normalize):
                rejected += [Rejected(str(paths[i]), reason, detail) for i, reason, detail in batch.rejected]
                for i, p in zip(batch.index.tolist(), proba.double().cpu().numpy(), strict=True):
                    order = np.argsort(-p, kind="stable")[:k]
                    predictions.append(Prediction(str(paths[i]), [(self.classes[c], float(p[c])) for c in order]))
                bar.update(len(batch.index) + len(batch.rejected))
        return predictions, rejected


class _HeadOnFeatures(torch.nn.Module):
    """Frozen backbone features, then a scikit-learn head's probabilities (as a tensor)."""

    def __init__(self, features: torch.nn.Module, head: TrainedHead):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.features(x).float().cpu().numpy()
        return torch.as_tensor(self.head.predict_proba(embeddings))


class _Softmax(torch.nn.Module):
    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).double().softmax(1)


def head_predictor(head_path: Path, store_path: Path, device: str = "auto") -> Predictor:
    """A head with the backbone and preprocessing of the store it was trained on: the same features (fingerprint),
    split (manifest) and class names."""
    attrs = read_attrs(store_path)
    head = load_head(head_path, store_path, attrs)  # a knn head reads its reference rows from the store
    backbone = backbone_of_store(attrs)
    preprocessing = Preprocessing.from_dict(attrs["preprocessing"])
    decoder = attrs.get("decoder", PILLOW)  # stores written before the choice were all Pillow's
    rebuilt = fingerprint(backbone, preprocessing, attrs["precision"], bool(attrs["jpeg_draft"]), decoder)
    if rebuilt != attrs["fingerprint"]:
        raise PipelineError(
            f"{store_path} was extracted by model {attrs['fingerprint']}, but {attrs['backbone']} here is {rebuilt} "
            "(other weights or code); rerun extract"
        )
    draft = preprocessing.draft(bool(attrs["jpeg_draft"]))
    # Laid out as extract ran the backbone, so a photo of the store gets its stored embedding (bit for bit when the
    # batch and the thread count are extract's too: CPU kernels may sum in another order for another batch).
    runtime = Runtime.resolve(device, attrs["precision"], option="--device", channels_last=True)
    # Decoded as the store was: torchvision's decoder where extract used it (libjpeg-turbo off a GPU).
    jpeg = jpeg_decoder(decoder, runtime.device, preprocessing)
    network = _HeadOnFeatures(backbone.embedder(), head)
    return Predictor(network, preprocessing, head.classes, draft, runtime, jpeg)


def finetuned_predictor(model_dir: Path, device: str = "auto") -> Predictor:
    model, config, preprocessing = load_finetuned(model_dir)
    runtime = Runtime.resolve(device, config["training"]["precision"], option="--device")
    return Predictor(_Softmax(model), preprocessing, config["classes"], None, runtime)
