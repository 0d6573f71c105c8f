"""What `transfer predict` reads and answers, whatever runs the model: the files to classify, the answers, the
refusals. Imports no torch, so the onnxruntime path (`pipeline.serving.onnx_predict`) shares it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.data.manifest import is_junk


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
    """Files as given, folders walked recursively, in sorted order. Hidden and system files and folders inside a
    given folder are skipped; where the folder itself lies (`../photos`, `~/.data/photos`) does not matter.

    Everything in a folder but its folders is listed, special files (FIFOs, sockets, devices) and broken links
    included: reading refuses them by type, so they come back as rejected with their reason, never unmentioned."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = [
                p
                for p in sorted(item.rglob("*"))
                if not p.is_dir() and not any(is_junk(part) for part in p.relative_to(item).parts)
            ]
            if not found:
                raise PipelineError(f"{item}: no image files in this folder (hidden and system files are skipped)")
            paths.extend(found)
        elif item.exists() or item.is_symlink():
            paths.append(item)
        else:
            raise PipelineError(f"{item}: no such file or folder")
    return paths
