"""The fine-tuned network: a backbone's feature extractor and a new output layer, saved and loaded as one folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_folder
from pipeline.features.backbones import Preprocessing, build_backbone


class Classifier(nn.Module):
    """A backbone's feature extractor followed by a new output layer."""

    def __init__(self, features: nn.Module, feature_dim: int, n_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# The folder's files and their sha256, in the format of `sha256sum` (so `sha256sum -c SHA256SUMS` checks them
# too): safetensors has no checksum of its own, and zeroed bytes inside a tensor load as zeros.
CHECKSUMS = "SHA256SUMS"
FILES = ("model.safetensors", "config.json")


def save_finetuned(model: Classifier, out_dir: Path, config: dict) -> Path:
    """safetensors weights plus a JSON config (classes, backbone, preprocessing, training) and their checksums, as
    one folder: the weights and their config always belong together."""
    with atomic_folder(out_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CHECKSUMS).write_text("".join(f"{_sha256(tmp / name)}  {name}\n" for name in FILES))
    return Path(out_dir) / "model.safetensors"


def load_finetuned(model_dir: Path) -> tuple[Classifier, dict, Preprocessing]:
    """The fine-tuned classifier in eval mode, its config, and its preprocessing, once their checksums match."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"no fine-tuned model in {model_dir} (config.json missing); run the finetune stage")
    check_files(model_dir)
    config = json.loads(config_path.read_text())
    backbone = build_backbone(config["backbone"])  # every weight is then replaced by the fine-tuned ones
    model = Classifier(backbone.features, config["feature_dim"], len(config["classes"]))
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    return model.eval(), config, Preprocessing.from_dict(config["preprocessing"])


def check_files(model_dir: Path) -> None:
    """Refuse a model folder whose files are not the bytes `save_finetuned` wrote, before any is parsed."""
    sums = model_dir / CHECKSUMS
    if not sums.is_file():
        raise PipelineError(f"{model_dir} has no {CHECKSUMS} (saved by an older version); rerun finetune")
    recorded = {}
    for line in sums.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        recorded[name] = digest
    for name in FILES:
        path = model_dir / name
        if not path.is_file() or recorded.get(name) != _sha256(path):
            raise PipelineError(
                f"{path} is damaged or truncated: its sha256 is not the one {CHECKSUMS} recorded; rerun finetune"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
