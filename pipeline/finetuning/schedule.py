"""How fast each part learns: a learning rate per parameter group (the new layer, each unfrozen block) and the
warm-up then cosine schedule."""

from __future__ import annotations

import math

from pipeline.core.config import FinetuneParams
from pipeline.finetuning.freezing import Frozen
from pipeline.finetuning.model import Classifier


def parameter_groups(model: Classifier, split: Frozen, params: FinetuneParams) -> list[dict]:
    """The head at `lr`; each unfrozen block at lr * backbone_lr_mult * layer_decay ** depth (0 = last block).

    Only parameters that require grad are given to the optimizer.
    """
    groups = [{"params": list(model.head.parameters()), "lr": params.lr, "name": "head"}]
    for depth, block in enumerate(reversed(split.trainable)):
        trainable = [p for p in block.parameters() if p.requires_grad]
        if trainable:
            lr = params.lr * params.backbone_lr_mult * params.layer_decay**depth
            groups.append({"params": trainable, "lr": lr, "name": f"block-{len(split.trainable) - 1 - depth}"})
    return groups


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per optimizer step: linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
