"""What an image's embedding is made of (`Embedding`): the backbone's own output, or the pooled outputs of several of
its blocks concatenated (DINO's `n_last_blocks`), of the image alone or averaged with its mirror image (test-time
augmentation at the embedding level). `Embedder` computes it; extraction, `transfer predict` and the ONNX export all
run that one module, so they compute the same thing."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from pipeline.core.errors import ConfigError

LAST = "last"


@dataclass(frozen=True)
class Embedding:
    """tta: none, or flip (the mean of the image's embedding and its left-right mirror's). layers: last (the
    backbone's own embedding), or indices of its blocks (`transfer backbones` counts them: stem, stages, head;
    negative from the end) whose outputs are average-pooled over space and concatenated in the order given."""

    tta: str = "none"
    layers: str | tuple[int, ...] = LAST

    def __post_init__(self) -> None:  # checked as params (pipeline.core.config.BackboneParams)
        if self.layers != LAST:
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def plain(self) -> bool:
        """The backbone's own embedding of the image as it is (what stores held before these options)."""
        return self.tta == "none" and self.layers == LAST

    def spec(self) -> dict:
        return {"tta": self.tta, "layers": self.layers if self.layers == LAST else list(self.layers)}

    @classmethod
    def from_spec(cls, spec: dict | None) -> Embedding:
        """A store's `embedding` attribute (`spec()`); absent (stores written before it): the plain embedding."""
        return cls(spec["tta"], spec["layers"]) if spec else cls()

    def describe(self) -> str:
        parts = [] if self.layers == LAST else [f"blocks {list(self.layers)} pooled and concatenated"]
        if self.tta == "flip":
            parts.append("averaged with the mirror image")
        return ", ".join(parts) or "the backbone's own"


def pooled(output: torch.Tensor) -> torch.Tensor:
    """A block's output as one vector per image: feature maps [B, C, H, W] averaged over space, tokens [B, N, C]
    over tokens."""
    if output.dim() == 4:
        return output.mean(dim=(2, 3))
    if output.dim() == 3:
        return output.mean(dim=1)
    return output.flatten(1)


class Embedder(nn.Module):
    """images [B, 3, H, W] -> embeddings [B, dim] as an `Embedding` says, from a frozen feature extractor and its
    ordered blocks (pipeline.features.surgery.ordered_blocks). The blocks' outputs are read by forward hooks that
    live only during one forward pass, so the network itself is left as it was."""

    def __init__(self, network: nn.Module, blocks: list[nn.Module], embedding: Embedding):
        super().__init__()
        self.network = network
        self.flip = embedding.tta == "flip"
        self.taps: list[nn.Module] = []  # a plain list: these modules are the network's, not registered twice
        if embedding.layers != LAST:
            for index in embedding.layers:
                if not -len(blocks) <= index < len(blocks):
                    raise ConfigError(
                        f"layers: block {index} does not exist; this backbone has {len(blocks)} blocks "
                        f"(0 to {len(blocks) - 1}, or -1 to -{len(blocks)} from the end)"
                    )
                block = blocks[index]
                # A block made of several loose layers (a ModuleList) is never called itself: tap its last layer.
                self.taps.append(block[-1] if isinstance(block, nn.ModuleList) else block)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.flip:
            return self._embed(images)
        n = images.shape[0]
        both = self._embed(torch.cat([images, images.flip(3)]))  # one forward pass for the image and its mirror
        return (both[:n] + both[n:]) / 2

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        if not self.taps:
            return self.network(images)
        outputs: dict[int, torch.Tensor] = {}

        def keep(position: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            outputs[position] = pooled(output)

        handles = [tap.register_forward_hook(partial(keep, i)) for i, tap in enumerate(self.taps)]
        try:
            self.network(images)
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat([outputs[i] for i in range(len(self.taps))], dim=1)


@torch.inference_mode()
def embedding_dim(embedder: Embedder, crop: int) -> int:
    """The size of the embeddings `embedder` gives, from one image of `crop` pixels (the channels of tapped blocks
    are known only by running them)."""
    parameter = next(embedder.network.parameters())
    image = torch.zeros(1, 3, crop, crop, device=parameter.device, dtype=parameter.dtype)
    return int(embedder(image).shape[1])
