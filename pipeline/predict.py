"""Classify new images with a trained model: a head on its backbone's features, or the fine-tuned network."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbones import Preprocessing, fingerprint, resolve_device
from pipeline.dataset import JUNK_NAMES, image_batches
from pipeline.errors import PipelineError
from pipeline.extract import backbone_of_store, resolve_precision
from pipeline.finetune import load_finetuned
from pipeline.heads import load_head
from pipeline.images import ImageRejected, decode_rgb, read_bytes
from pipeline.store import read_attrs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), most probable first


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str
    detail: str


def list_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders walked recursively (hidden and system files skipped), in sorted order."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths.extend(
                p
                for p in sorted(item.rglob("*"))
                if p.is_file() and not any(part.startswith(".") or part in JUNK_NAMES for part in p.parts)
            )
        elif item.exists() or item.is_symlink():
            paths.append(item)
        else:
            raise PipelineError(f"{item}: no such file or folder")
    return paths


class _Images(torch.utils.data.Dataset):
    """uint8 tensors of the files, or an empty tensor and the rejection for a file that cannot be used."""

    def __init__(self, paths: list[Path], preprocessing: Preprocessing, draft: int | None):
        self.paths, self.preprocessing, self.draft = paths, preprocessing, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = decode_rgb(read_bytes(self.paths[i]), self.draft)
        except ImageRejected as err:
            return torch.zeros(0, dtype=torch.uint8), i, f"{err.reason}\t{err.detail}"
        return self.preprocessing.to_uint8(image), i, ""


def _collate(items):
    ok = [(x, i) for x, i, why in items if not why]
    images = torch.stack([x for x, _ in ok]) if ok else torch.zeros(0)
    return images, [i for _, i in ok], [(i, why) for _, i, why in items if why]


class Predictor:
    """A network that maps a normalised image batch to class probabilities, with its preprocessing."""

    def __init__(
        self, network, preprocessing: Preprocessing, classes: list[str], draft: int | None, device: str, precision: str
    ):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.network = network.to(self.device).eval()
        self.preprocessing, self.classes, self.draft = preprocessing, classes, draft

    @torch.inference_mode()
    def predict(
        self, paths: list[Path], top_k: int = 3, batch_size: int = 32, num_workers: int = 0
    ) -> tuple[list[Prediction], list[Rejected]]:
        """Top-k classes of every readable file; the others with why. `num_workers` decoding processes are
        used on an accelerator; on CPU, threads decode between forward passes (`dataset.image_batches`)."""
        loader = image_batches(
            _Images(paths, self.preprocessing, self.draft), batch_size, num_workers, self.device, collate_fn=_collate
        )
        predictions: list[Prediction] = []
        rejected: list[Rejected] = []
        k = min(top_k, len(self.classes))
        with tqdm(total=len(paths), desc="predict", unit="img") as bar:
            for images, index, failures in loader:
                rejected += [Rejected(str(paths[i]), *why.split("\t", 1)) for i, why in failures]
                if len(index):
                    batch = self.preprocessing.normalize(images.to(self.device))
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                        proba = self.network(batch).double().cpu().numpy()
                    for i, p in zip(index, proba, strict=True):
                        order = np.argsort(-p, kind="stable")[:k]
                        predictions.append(Prediction(str(paths[i]), [(self.classes[c], float(p[c])) for c in order]))
                bar.update(len(index) + len(failures))
        return predictions, rejected


class _HeadOnFeatures(torch.nn.Module):
    """Frozen backbone features, then a scikit-learn head's probabilities (as a tensor)."""

    def __init__(self, features: torch.nn.Module, head):
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
    """A head with the backbone and preprocessing of the store it was trained on, checked by fingerprint."""
    attrs = read_attrs(store_path)
    head = load_head(head_path)
    if head.store_fingerprint != attrs["fingerprint"]:
        raise PipelineError(
            f"{head_path} was trained on features {head.store_fingerprint}, {store_path} has {attrs['fingerprint']}"
        )
    backbone = backbone_of_store(attrs)
    preprocessing = Preprocessing.from_dict(attrs["preprocessing"])
    rebuilt = fingerprint(backbone, preprocessing, attrs["precision"], bool(attrs["jpeg_draft"]))
    if rebuilt != attrs["fingerprint"]:
        raise PipelineError(
            f"{store_path} was extracted by model {attrs['fingerprint']}, but {attrs['backbone']} here is {rebuilt} "
            "(other weights or code); rerun extract"
        )
    draft = preprocessing.resize if attrs["jpeg_draft"] else None
    network = _HeadOnFeatures(backbone.features, head)
    return Predictor(network, preprocessing, head.classes, draft, device, attrs["precision"])


def finetuned_predictor(model_dir: Path, device: str = "auto") -> Predictor:
    model, config, preprocessing = load_finetuned(model_dir)
    return Predictor(_Softmax(model), preprocessing, config["classes"], None, device, config["training"]["precision"])
