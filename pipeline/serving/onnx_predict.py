"""Classify images with an exported ONNX model: onnxruntime, Pillow and numpy only, no torch.

An exported file (see `pipeline.serving.export`) carries everything needed here in its metadata: the class names and
the preprocessing (resize, crop, interpolation; mean and std are applied inside the graph). `transfer predict
--model` uses this module, so a machine that only deploys models needs neither torch nor the feature store.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import usable_cores
from pipeline.core.errors import PipelineError
from pipeline.data.images import ImageRejected, decode_rgb, read_bytes
from pipeline.data.preprocessing import Preprocessing
from pipeline.serving.answers import Prediction, Rejected

log = logging.getLogger(__name__)

INPUT = "image"  # uint8 [batch, 3, crop, crop], RGB, resized and centre-cropped
OUTPUT = "probabilities"  # float32 [batch, classes]
# The metadata every exported file holds (JSON values); what `OnnxPredictor` reads.
REQUIRED_METADATA = ("classes", "preprocessing", "jpeg_draft")


class OnnxModelError(PipelineError):
    """A file is not an ONNX model exported by this pipeline, or onnxruntime is missing."""


def read_metadata(path: Path) -> dict:
    """The JSON values of an exported file's metadata, checked as `OnnxPredictor` checks them."""
    return _metadata(path, _session(path))


class OnnxPredictor:
    """An exported model in an onnxruntime session on the CPU, with the preprocessing its metadata gives."""

    def __init__(self, path: Path):
        self.session = _session(path)
        self.metadata = _metadata(path, self.session)
        self.classes: list[str] = self.metadata["classes"]
        self.preprocessing = Preprocessing.from_dict(self.metadata["preprocessing"])
        # JPEGs decoded at reduced scale as the features were (jpeg_draft).
        self.draft = self.preprocessing.draft(bool(self.metadata["jpeg_draft"]))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, crop, crop] -> float32 class probabilities [N, classes]."""
        return self.session.run([OUTPUT], {INPUT: images})[0]

    def predict(
        self, paths: list[Path], top_k: int = 3, batch_size: int = 32
    ) -> tuple[list[Prediction], list[Rejected]]:
        """Top-k classes of every readable file; the others with why (as `pipeline.serving.predict.Predictor.predict`).

        Files are decoded by threads (Pillow releases the GIL), a batch at a time, between runs of the model.
        """
        predictions: list[Prediction] = []
        rejected: list[Rejected] = []
        k = min(top_k, len(self.classes))
        with (
            ThreadPoolExecutor(usable_cores(), thread_name_prefix="decode") as pool,
            tqdm(total=len(paths), desc="predict", unit="img") as bar,
        ):
            for start in range(0, len(paths), batch_size):
                chunk = paths[start : start + batch_size]
                ready, pixels = [], []
                for path, decoded in zip(chunk, pool.map(self._pixels, chunk), strict=True):
                    if isinstance(decoded, ImageRejected):
                        rejected.append(Rejected(str(path), decoded.reason, decoded.detail))
                    else:
                        ready.append(path)
                        pixels.append(decoded)
                if ready:
                    predictions += self._top(ready, self.probabilities(np.stack(pixels)), k)
                bar.update(len(chunk))
        return predictions, rejected

    def _top(self, paths: list[Path], proba: np.ndarray, k: int) -> list[Prediction]:
        top = []
        for path, p in zip(paths, proba.astype(np.float64), strict=True):
            order = np.argsort(-p, kind="stable")[:k]
            top.append(Prediction(str(path), [(self.classes[c], float(p[c])) for c in order]))
        return top

    def _pixels(self, path: Path) -> np.ndarray | ImageRejected:
        try:
            return self.preprocessing.resize_crop(decode_rgb(read_bytes(path), self.draft))
        except ImageRejected as err:
            return err


def _session(path: Path):
    """An onnxruntime session on the CPU; a missing package or a file that is no ONNX model is one line."""
    try:
        import onnxruntime
    except ImportError as err:
        raise OnnxModelError("onnxruntime is not installed; pip install onnxruntime") from err
    if not Path(path).is_file():
        raise OnnxModelError(f"{path}: no such file; the export stage writes data/export/<model>.onnx")
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except _load_errors(onnxruntime) as err:
        raise OnnxModelError(f"{path}: not an ONNX model onnxruntime can load ({err})") from err


def _load_errors(onnxruntime) -> tuple[type[Exception], ...]:
    """What onnxruntime raises for a file it cannot load (its exceptions derive from Exception only)."""
    state = onnxruntime.capi.onnxruntime_pybind11_state
    return (state.Fail, state.InvalidArgument, state.InvalidGraph, state.InvalidProtobuf, state.NotImplemented)


def _metadata(path: Path, session) -> dict:
    raw = session.get_modelmeta().custom_metadata_map
    missing = [key for key in REQUIRED_METADATA if key not in raw]
    if missing:
        raise OnnxModelError(
            f"{path}: no {', '.join(missing)} in its metadata; give a model written by the export stage"
        )
    names = ({i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()})
    if names != ({INPUT}, {OUTPUT}):
        raise OnnxModelError(f"{path}: inputs and outputs {names}, expected ({{{INPUT!r}}}, {{{OUTPUT!r}}})")
    return {key: json.loads(value) for key, value in raw.items()}
