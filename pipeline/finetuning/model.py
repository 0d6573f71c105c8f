"""The fine-tuned network: a backbone's feature extractor and a new output layer, saved and loaded as one folder,
and run on a manifest's test split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.config import FinetuneParams
from pipeline.core.device import Runtime
from pipeline.core.errors import PipelineError
from pipeline.core.integrity import check_checksums, write_checksums
from pipeline.core.io import atomic_folder, read_json
from pipeline.data.loading import Images, image_batches, predict_proba
from pipeline.data.manifest import Manifest, ManifestRow, read_manifest
from pipeline.data.preprocessing import Preprocessing
from pipeline.features.backbones import build_backbone


class Classifier(nn.Module):
    """A backbone's feature extractor followed by a new output layer."""

    def __init__(self, features: nn.Module, feature_dim: int, n_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


FILES = ("model.safetensors", "config.json")
FIX = "rerun finetune"


class FinetuneError(PipelineError):
    """Fine-tuning cannot start: e.g. a warm-start head trained on other classes or another backbone."""


def new_layer(feature_dim: int, n_classes: int, seed: int) -> nn.Linear:
    """The new output layer at its seeded random weights (PyTorch's default initialisation)."""
    torch.manual_seed(seed)
    return nn.Linear(feature_dim, n_classes)


def save_finetuned(model: Classifier, out_dir: Path, config: dict) -> Path:
    """safetensors weights plus a JSON config (classes, backbone, preprocessing, training) and their checksums
    (`SHA256SUMS`: safetensors has none of its own), as one folder: the weights and their config always belong
    together."""
    with atomic_folder(out_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_checksums(tmp, FILES)
    return Path(out_dir) / "model.safetensors"


def load_finetuned(model_dir: Path) -> tuple[Classifier, dict, Preprocessing]:
    """The fine-tuned classifier in eval mode, its config, and its preprocessing, once their checksums match."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"no fine-tuned model in {model_dir} (config.json missing); run the finetune stage")
    check_checksums(model_dir, FILES, FIX)
    config = read_json(config_path)
    backbone = build_backbone(config["backbone"])  # every weight is then replaced by the fine-tuned ones
    model = Classifier(backbone.features, config["feature_dim"], len(config["classes"]))
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    return model.eval(), config, Preprocessing.from_dict(config["preprocessing"])


@dataclass(frozen=True)
class TestAnswers:
    """The fine-tuned network's class probabilities on a manifest's test split, with what they are of."""

    proba: np.ndarray  # float64 [test images, classes]
    labels: np.ndarray  # int64: each test image's class index
    rows: list[ManifestRow]  # the test rows (or those of the split asked for), in manifest order
    manifest: Manifest
    config: dict  # the model's config.json


def predict_test_split(
    model_dir: Path,
    manifest_path: Path,
    data_root: Path,
    params: FinetuneParams,
    *,
    split: str = "test",
    at_most: int | None = None,
) -> TestAnswers:
    """Run the fine-tuned model on the manifest's test split (or `split`: a seeded sample of `at_most` of its rows
    when it has more), decoded and run as fine-tuning validated it (`params`: batch size, decoding workers, device,
    precision)."""
    model, config, preprocessing = load_finetuned(model_dir)
    classes = config["classes"]
    manifest = read_manifest(manifest_path)
    if manifest.classes != classes:
        raise FinetuneError(f"{model_dir} was trained on classes {classes}, the manifest has {manifest.classes}")
    rows = [r for r in manifest.ok_rows() if r.split == split]
    if not rows:
        raise FinetuneError(f"{manifest_path} has no {split} images to score; set prepare.{split}_fraction above 0")
    if at_most is not None and len(rows) > at_most:
        kept = np.sort(np.random.default_rng(params.seed).choice(len(rows), at_most, replace=False))
        rows = [rows[i] for i in kept]
    labels = np.array([classes.index(r.class_name) for r in rows], dtype=np.int64)
    runtime = Runtime.resolve(params.device, params.precision, option="finetune.device")
    images = Images.of_rows(data_root, rows, preprocessing.to_uint8)
    batches = image_batches(images, params.batch_size, params.num_workers, runtime.device)
    proba = predict_proba(runtime.place(model), batches, runtime, preprocessing.normalize)
    return TestAnswers(proba, labels, rows, manifest, config)
