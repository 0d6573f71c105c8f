"""Which blocks of the backbone train and which stay as pre-trained, and what train mode means for each."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pipeline.finetuning.model import Classifier

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class Frozen:
    """Which blocks train and which stay as pre-trained."""

    trainable: list[nn.Module]  # backbone blocks that train, first to last
    frozen: list[nn.Module]


def freeze(model: Classifier, blocks: list[nn.Module], unfreeze: int | str) -> Frozen:
    """Freeze every backbone parameter, then unfreeze the last `unfreeze` blocks (or all); the head trains."""
    k = len(blocks) if unfreeze == "all" else min(int(unfreeze), len(blocks))
    trainable, frozen = blocks[len(blocks) - k :], blocks[: len(blocks) - k]
    model.features.requires_grad_(False)
    for block in trainable:
        block.requires_grad_(True)
    model.head.requires_grad_(True)
    return Frozen(trainable, frozen)


def set_train_mode(model: Classifier, split: Frozen, batchnorm: str) -> None:
    """Train mode for what learns; under `batchnorm: frozen` (the default) frozen blocks stay in eval mode
    entirely and every BatchNorm layer keeps its pre-trained statistics.

    Keeping the statistics of the unfrozen blocks too is the usual advice for fine-tuning (Keras' transfer
    learning guide): batch statistics of a new dataset shift every feature the first step sees, which
    wrecks a warm-started head and makes small batches noisy. Their scale and shift still learn.
    `batchnorm: train` lets every BatchNorm layer, frozen blocks' included, use and track batch statistics.
    """
    model.train()
    if batchnorm == "frozen":
        for block in split.frozen:
            block.eval()
        for module in model.modules():
            if isinstance(module, BATCHNORM):
                module.eval()
