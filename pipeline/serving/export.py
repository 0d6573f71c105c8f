"""ONNX export of trained models (a head on its frozen backbone, the fine-tuned network) and the parity check
that the exported file says what the trained model says, image for image on the test split."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.core.config import ExportParams
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_folder, read_record
from pipeline.data.loading import Images, forward_batches, image_batches
from pipeline.data.manifest import ManifestRow, manifest_sha256, read_manifest
from pipeline.data.preprocessing import Preprocessing, normalized
from pipeline.features.backbones import backbone_of_store
from pipeline.features.store import read_attrs
from pipeline.finetuning.model import load_finetuned
from pipeline.finetuning.names import FINETUNE, FINETUNE_WISE, model_name
from pipeline.heads.estimators import CosineCentroids, TemperatureScaled, scores_per_class
from pipeline.heads.persistence import HeadFile, head_kind, load_head, load_heads
from pipeline.heads.trained import TrainedHead, chosen_head
from pipeline.serving.onnx_predict import INPUT, OUTPUT, OnnxPredictor
from pipeline.serving.predict import Predictor, finetuned_predictor, head_predictor

log = logging.getLogger(__name__)

CHOSEN_ON_VAL = "chosen_on_val"  # in export.models: the exportable head chosen_head picks (val or k-fold)
LINEAR_HEADS = ("logreg", "ridge", "linear_svm", "centroid")  # kinds that are an affine map, then softmax
# How far an exported model's probabilities may be from the trained model's on any test image. Two correct
# float32 runtimes never agree bit for bit: they sum in other orders, and a head that standardises features of a
# tiny spread magnifies their rounding (metrics/export.json records each export's largest difference). 1e-3 is an
# order of magnitude above what correct exports differ by, invisible in a two-decimal probability, and can swap a
# top class only where the top two are within 2e-3; a real mistake in an export (a temperature, the scaler or the
# normalisation left out) moves them by 0.5 or more.
PARITY_ATOL = 1e-3


class ExportError(PipelineError):
    """A model cannot be exported as asked (unknown name, a head that is no affine map) or fails parity."""


# --- the exported network: uint8 images -> class probabilities -------------------------------------------


class Normalize(nn.Module):
    """uint8 [B, 3, H, W] -> the network's input, in `Preprocessing.normalize`'s operations and order, so the
    graph's first convolution sees the very floats PyTorch's does."""

    def __init__(self, preprocessing: Preprocessing):
        super().__init__()
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return normalized(images, self.mean, self.std)


class Softmax(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(1)


class LinearHead(nn.Module):
    """A head that is an affine map of its features, then softmax(logits / T), as layers: standardised features
    (logreg, ridge, linear_svm) or L2-normalised ones (centroid; centred first with its normalize cl2n), each step
    as scikit-learn computes it."""

    def __init__(self, weight, bias, temperature: float, mean=None, scale=None, unit=False, place=None, centre=None):
        super().__init__()
        self.register_buffer("centre", _float32(centre))
        self.register_buffer("weight", _float32(weight))
        self.register_buffer("bias", _float32(bias))
        self.temperature, self.unit = float(temperature), unit
        self.register_buffer("mean", _float32(mean))
        self.register_buffer("scale", _float32(scale))
        # [fitted classes, classes]: a class absent from training keeps probability 0, as heads.full_proba does.
        self.register_buffer("place", _float32(place))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centre is not None:
            x = x - self.centre
        if self.unit:  # sklearn.preprocessing.normalize: a zero row stays zero
            norm = x.norm(dim=1, keepdim=True)
            x = x / torch.where(norm == 0, torch.ones_like(norm), norm)
        if self.mean is not None:
            x = (x - self.mean) / self.scale
        proba = (nn.functional.linear(x, self.weight, self.bias) / self.temperature).softmax(1)
        return proba if self.place is None else proba @ self.place


def _float32(array) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.array(array, dtype=np.float32))  # a copy, writable


def head_layers(head: TrainedHead) -> LinearHead:
    """The head's fitted pipeline as layers; a k-NN head (or any kind that is no affine map) is refused."""
    if head.kind not in LINEAR_HEADS:
        raise ExportError(refusal(head.name, head.kind))
    steps = head.model.named_steps
    clf = steps["clf"]
    linear = clf.estimator_ if isinstance(clf, TemperatureScaled) else clf
    if isinstance(linear, CosineCentroids):
        weight, bias = linear.centroids_, np.zeros(len(linear.centroids_))
    else:
        weight = np.atleast_2d(linear.coef_)
        bias = np.broadcast_to(np.asarray(linear.intercept_, dtype=np.float64), len(weight))
    if len(weight) == 1:  # two classes scored by one logit
        weight, bias = scores_per_class(weight), scores_per_class(bias)
    scaler = steps.get("scale")
    fitted = np.asarray(clf.classes_)  # class indices of the store
    n_classes = len(head.classes)
    place = None
    if not np.array_equal(fitted, np.arange(n_classes)):
        place = np.zeros((len(fitted), n_classes))
        place[np.arange(len(fitted)), fitted] = 1.0
    return LinearHead(
        weight,
        bias,
        getattr(clf, "temperature_", 1.0),
        mean=None if scaler is None else (scaler.mean_ if scaler.with_mean else np.zeros(weight.shape[1])),
        scale=None if scaler is None else (scaler.scale_ if scaler.with_std else np.ones(weight.shape[1])),
        unit=isinstance(linear, CosineCentroids),
        place=place,
        centre=getattr(linear, "mean_", None) if isinstance(linear, CosineCentroids) else None,
    )


def refusal(name: str, kind: str) -> str:
    """Why a head of `kind` is not exported, in one line that names the fix."""
    why = (
        "its probabilities are the votes of the training images nearest to each image, so the file would carry "
        "every training embedding, and a vote moves by 1/k whenever float rounding reorders two neighbours"
        if kind == "knn"
        else f"export writes only {', '.join(LINEAR_HEADS)} heads as layers"
    )
    return (
        f"export.models: {name} is a {kind} head, which is not exported ({why}); "
        f"export a {', '.join(LINEAR_HEADS)} head or {FINETUNE} instead"
    )


class Deployable(nn.Module):
    """What one exported file computes: uint8 images [B, 3, crop, crop] -> class probabilities [B, classes]."""

    def __init__(self, preprocessing: Preprocessing, network: nn.Module, head: nn.Module):
        super().__init__()
        self.normalize, self.network, self.head = Normalize(preprocessing), network, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.network(self.normalize(images)))


@dataclass
class Exportable:
    """One model to export: the network to write, the trained model it must agree with, and its metadata."""

    name: str
    deployable: Deployable
    reference: Predictor  # the trained model as `transfer predict` runs it (its checks included)
    metadata: dict


def head_exportable(head_path: Path, store_path: Path, metrics: dict) -> Exportable:
    """A head on the frozen backbone of the store it was trained on (refused if the store is another one)."""
    reference = head_predictor(head_path, store_path, device="cpu")  # checks head, store and backbone agree
    head, attrs = load_head(head_path), read_attrs(store_path)
    preprocessing = Preprocessing.from_dict(attrs["preprocessing"])
    described = {
        "model": head.model_name,
        "kind": head.kind,
        "backbone": attrs["backbone"],
        "weights_id": attrs.get("weights_id"),
        "store_fingerprint": head.store_fingerprint,
        "manifest_sha256": attrs.get("manifest_sha256"),
        "hyperparameters": head.hyperparameters,
    }
    return Exportable(
        name=head.model_name,
        deployable=Deployable(preprocessing, backbone_of_store(attrs).embedder(), head_layers(head)),
        reference=reference,
        metadata=_metadata(described, head.classes, preprocessing, reference.draft is not None, metrics),
    )


def finetuned_exportable(model_dir: Path, metrics: dict, manifest_sha256: str, name: str = FINETUNE) -> Exportable:
    """The fine-tuned network (`name` finetune), or WiSE-FT's (finetune-wise), then softmax. It was trained on images,
    not on a store: no store fingerprint."""
    model, config, preprocessing = load_finetuned(model_dir)
    if model_name(config) != name:
        raise ExportError(f"export.models: {model_dir} does not hold the {name} model; rerun its stage (dvc repro)")
    described = {
        "model": name,
        "kind": name,
        "backbone": config["backbone"],
        "store_fingerprint": None,
        "manifest_sha256": manifest_sha256,
        "hyperparameters": {
            **config["params"],
            **({"wise_alpha": config["wise"]["alpha"]} if "wise" in config else {}),
        },
    }
    return Exportable(
        name=name,
        deployable=Deployable(preprocessing, model, Softmax()),
        reference=finetuned_predictor(model_dir, device="cpu"),
        metadata=_metadata(described, config["classes"], preprocessing, False, metrics),
    )


# Test metrics copied into the file: what the model scored, as `evaluate` measured it.
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece", "n_train", "n_val", "n_test")


def _metadata(described: dict, classes: list[str], preprocessing: Preprocessing, draft: bool, metrics: dict) -> dict:
    """The file's metadata_props (each value JSON): enough to use the model and to know where it came from."""
    crop = preprocessing.crop
    return {
        **described,
        "classes": classes,
        "preprocessing": preprocessing.to_dict(),
        "jpeg_draft": draft,
        "input": f"{INPUT}: uint8 [batch, 3, {crop}, {crop}], RGB, resized and centre-cropped (normalised inside)",
        "output": f"{OUTPUT}: float32 [batch, {len(classes)}], in the order of classes",
        "test_metrics": {key: metrics[key] for key in METRIC_KEYS if key in metrics},
        "versions": {name: _version(name) for name in ("transfer-pipeline", "torch", "onnxscript", "onnx")},
    }


def _version(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


# --- choosing, writing and checking -----------------------------------------------------------------------


def chosen_models(requested: list[str], heads: dict[str, HeadFile]) -> list[str]:
    """export.models with chosen_on_val resolved to a model's name, each name checked before any work: a
    (backbone, head) pair of params.yaml (`heads` by model name, <backbone>-<head>) that export can write as
    layers, finetune or finetune-wise."""
    names: list[str] = []
    for name in requested:
        if name == CHOSEN_ON_VAL:
            name = chosen_on_val(heads)
        elif name not in (FINETUNE, FINETUNE_WISE):
            _check_head(name, heads)
        if name not in names:  # chosen_on_val may name a head listed too
            names.append(name)
    return names


def _check_head(name: str, heads: dict[str, HeadFile]) -> None:
    if name not in heads:
        valid = ", ".join([CHOSEN_ON_VAL, FINETUNE, FINETUNE_WISE, *heads])
        raise ExportError(f"export.models: unknown model '{name}'; valid: {valid}")
    kind = head_kind(heads[name].path)  # a knn head is refused without reading its store
    if kind not in LINEAR_HEADS:
        raise ExportError(refusal(name, kind))


def chosen_on_val(heads: dict[str, HeadFile]) -> str:
    """The chosen head among those export writes (pipeline.heads.trained.chosen_head's rule, k-NN left out): a
    pipeline whose best head on held-out rows is k-NN still exports its best linear one, and says so."""
    trained = load_heads(list(heads.values()))
    linear = [h for h in trained if h.kind in LINEAR_HEADS]
    if not linear:
        raise ExportError(
            f"export.models: {CHOSEN_ON_VAL} finds no head export can write among {', '.join(heads)} (it writes "
            f"{', '.join(LINEAR_HEADS)} heads); name the models to export, e.g. [{FINETUNE}]"
        )
    chosen, best = chosen_head(linear), chosen_head(trained)
    if best is not chosen:
        log.warning(
            "export: %s is %s; %s scored higher on held-out rows but is a %s head, which is not exported",
            CHOSEN_ON_VAL,
            chosen.model_name,
            best.model_name,
            best.kind,
        )
    return chosen.model_name


def write_onnx(network: nn.Module, crop: int, path: Path, metadata: dict, opset: int) -> None:
    """Export with torch.onnx's dynamo exporter (torch.export, then onnxscript; the TorchScript exporter is
    deprecated), the batch dimension dynamic, the metadata as metadata_props (each value JSON)."""
    example = torch.zeros(2, 3, crop, crop, dtype=torch.uint8)  # 2: torch.export specialises a size of 1
    for name in ("onnx_ir", "onnxscript"):  # their optimiser logs every initializer it merges at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    program = torch.onnx.export(
        network.eval(),
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=opset,
        verbose=False,
    )
    for key, value in metadata.items():
        program.model.metadata_props[key] = json.dumps(value)
    program.save(path)  # weights in the file; beside it only past protobuf's 2 GB limit


@torch.inference_mode()
def parity(path: Path, reference: Predictor, rows: list[ManifestRow], data_root: Path, batch_size: int) -> dict:
    """Every image of `rows` through the exported file in onnxruntime and through the trained model in PyTorch
    (in fp32 on the CPU, whatever precision it was trained at), from the same uint8 pixels: the largest
    probability difference, and how often the two agree on the top class."""
    exported = OnnxPredictor(path)
    runtime = replace(reference.runtime, precision="fp32")
    normalize = reference.preprocessing.normalize
    images = Images.of_rows(data_root, rows, reference.preprocessing.to_uint8, reference.draft)
    batches = image_batches(images, batch_size, 0, runtime.device)
    worst, same, flips, n = 0.0, 0, 0, 0
    bar = tqdm(total=len(rows), desc=f"parity {path.stem}", unit="img")
    for batch, proba in forward_batches(reference.network, batches, runtime, normalize):
        bar.update(len(batch.index) + len(batch.rejected))
        if not len(batch.index):
            continue
        want = proba.double().cpu().numpy()
        got = exported.probabilities(batch.images.numpy()).astype(np.float64)
        worst = max(worst, float(np.abs(got - want).max()))
        differ = got.argmax(1) != want.argmax(1)
        top_two = np.sort(want, axis=1)[:, -2:]
        # A top-two tie closer than the tolerance may swap within it; any other change of class is a failure.
        flips += int((differ & (top_two[:, 1] - top_two[:, 0] > 2 * PARITY_ATOL)).sum())
        same, n = same + int((~differ).sum()), n + len(want)
    bar.close()
    return {
        "images": n,
        "max_probability_difference": worst,
        "top1_agreement": same / n,
        "top1_disagreements": n - same,
        "top1_disagreements_beyond_ties": flips,
        "tolerance": PARITY_ATOL,
    }


def check_parity(name: str, result: dict) -> None:
    """Refuse to ship a file that does not say what the trained model says."""
    if result["max_probability_difference"] > result["tolerance"] or result["top1_disagreements_beyond_ties"]:
        raise ExportError(
            f"{name}: the ONNX model disagrees with PyTorch on the test split (largest probability difference "
            f"{result['max_probability_difference']:.3g}, tolerance {result['tolerance']}; top class differs on "
            f"{result['top1_disagreements']} of {result['images']} images); no model written"
        )


@dataclass(frozen=True)
class Inputs:
    """What the export stage reads: the pipeline's outputs that describe and score the models."""

    heads: dict[str, HeadFile]  # by model name (<backbone>-<head>): each head file and its feature store
    finetuned: Path  # the fine-tuned model folder
    metrics: Path  # folder of test metrics, <model>/metrics.json and details.json
    manifest: Path
    data_root: Path
    wise: Path | None = None  # the finetune_wise stage's model folder (WiSE-FT)


def export_models(names: list[str], inputs: Inputs, out_dir: Path, params: ExportParams) -> dict[str, dict]:
    """Write out_dir/<name>.onnx for each model (all or none: the folder is replaced only when every file passed
    parity) and return each one's parity record."""
    manifest = read_manifest(inputs.manifest)
    rows = [r for r in manifest.ok_rows() if r.split == "test"]
    if not rows:
        raise ExportError(f"{inputs.manifest} has no test images to check parity on; set prepare.test_fraction above 0")
    results = {}
    with atomic_folder(out_dir) as tmp:
        for name in names:
            item = _exportable(name, inputs, manifest_sha256(manifest))
            path = tmp / f"{name}.onnx"
            start = time.perf_counter()
            write_onnx(item.deployable, item.reference.preprocessing.crop, path, item.metadata, params.opset)
            seconds = time.perf_counter() - start
            result = parity(path, item.reference, rows, inputs.data_root, params.batch_size)
            check_parity(name, result)
            # No timings in the record: git tracks it, and a diff should show only what changed.
            results[name] = {**result, "bytes": path.stat().st_size}
            log.info("export: %s written in %.1fs; parity %s", name, seconds, result)
    return results


def _exportable(name: str, inputs: Inputs, manifest_hash: str) -> Exportable:
    path = inputs.metrics / name / "metrics.json"
    if not path.is_file():
        raise ExportError(
            f"no test metrics for {name} ({path}); run its head, evaluate_finetune or finetune_wise first"
        )
    metrics = read_record(path.parent)  # the scores, and the counts (n_train, ...) in details.json beside them
    if name == FINETUNE:
        return finetuned_exportable(inputs.finetuned, metrics, manifest_hash)
    if name == FINETUNE_WISE:
        if inputs.wise is None:
            raise ExportError(f"export.models names {FINETUNE_WISE}, but no WiSE-FT model folder was given (--wise)")
        return finetuned_exportable(inputs.wise, metrics, manifest_hash, FINETUNE_WISE)
    return head_exportable(inputs.heads[name].path, inputs.heads[name].store, metrics)
