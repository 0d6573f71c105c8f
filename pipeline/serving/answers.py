"""What `transfer predict` answers, whatever runs the model: the top classes of each image, or why it was refused.
Imports no torch, so the onnxruntime path (`pipeline.serving.onnx_predict`) shares it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), most probable first


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str
    detail: str
