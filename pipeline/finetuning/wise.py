"""WiSE-FT (Wortsman et al., CVPR 2022): the fine-tuned network's weights mixed with the weights it started from,
the mix chosen on the val split; no training.

theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1, for every parameter and floating buffer (BatchNorm's running
statistics): theta_0 is the pre-trained backbone with the warm_start layer (the logistic head folded in, or its
seeded random weights), theta_1 the fine-tuned network. Integer buffers (num_batches_tracked) are theta_1's. Frozen
blocks are equal in both, so only what fine-tuning moved is mixed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from tqdm import tqdm

from pipeline.core.config import FinetuneParams
from pipeline.core.device import Runtime
from pipeline.data.loading import Images, image_batches
from pipeline.data.manifest import read_manifest
from pipeline.features.backbones import Backbone, build_backbone
from pipeline.finetuning.model import Classifier, FinetuneError, load_finetuned, save_finetuned
from pipeline.finetuning.names import FINETUNE, model_name

log = logging.getLogger(__name__)

TIE_RULE = "the highest val accuracy; ties: the lowest val log loss, then the larger alpha"


@dataclass(frozen=True)
class CurvePoint:
    """One alpha scored on the val split: what the curve plot and details.json hold."""

    alpha: float
    val_accuracy: float
    val_log_loss: float


@dataclass(frozen=True)
class WiseResult:
    model_path: Path
    alpha: float  # the chosen one
    curve: list[CurvePoint]  # in increasing alpha
    n_val: int
    seconds: float
    device: str


def interpolate(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict:
    """theta(alpha) = (1 - alpha) * start + alpha * tuned, tensor by tensor (torch.lerp: exactly `start` at 0 and
    `tuned` at 1); a tensor that is not floating point (a BatchNorm's batch count) is tuned's."""
    check_same_layout(start, tuned)
    return {
        key: torch.lerp(start[key], value, alpha) if value.is_floating_point() else value.clone()
        for key, value in tuned.items()
    }


def check_same_layout(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> None:
    """Two networks can be mixed only tensor for tensor: the same names, shapes and dtypes."""
    if start.keys() != tuned.keys():
        only = sorted(start.keys() ^ tuned.keys())
        raise FinetuneError(
            f"the starting and fine-tuned networks differ in their tensors ({len(only)} named by one only, e.g. "
            f"{only[0]}): another backbone; rerun warm_start and finetune"
        )
    for key, value in tuned.items():
        if (value.shape, value.dtype) != (start[key].shape, start[key].dtype):
            raise FinetuneError(
                f"{key} is {tuple(start[key].shape)} {start[key].dtype} at the start but {tuple(value.shape)} "
                f"{value.dtype} fine-tuned: another backbone or other classes; rerun warm_start and finetune"
            )


def starting_network(backbone: Backbone, layer: dict[str, torch.Tensor], n_classes: int) -> Classifier:
    """theta_0: the pre-trained backbone with the new layer as fine-tuning started it (the warm_start stage's)."""
    model = Classifier(backbone.features, backbone.feature_dim, n_classes)
    try:
        model.head.load_state_dict(layer)
    except RuntimeError as err:  # a layer written for other classes or another backbone
        raise FinetuneError(
            f"the warm_start layer does not fit {backbone.name} and {n_classes} classes ({_first_line(err)}); "
            "rerun warm_start and finetune"
        ) from err
    return model.eval()


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[-1].strip()


def check_pair(
    start: Classifier, tuned: dict[str, torch.Tensor], backbone: Backbone, config: dict, classes: list[str], model_dir
) -> None:
    """Refuse to mix networks that are not a start and its fine-tuning: another backbone or other classes than the
    fine-tuned one's, or frozen blocks whose weights differ (other pre-trained weights than fine-tuning started
    from). Under `batchnorm: train` frozen blocks' statistics move, so only their parameters are compared."""
    if config["backbone"] != backbone.name:
        raise FinetuneError(
            f"{model_dir} was fine-tuned from {config['backbone']}, but finetune.backbone's network is "
            f"{backbone.name}; rerun finetune"
        )
    if config["classes"] != classes:
        raise FinetuneError(f"{model_dir} was trained on classes {config['classes']}, the manifest has {classes}")
    if model_name(config) != FINETUNE:
        raise FinetuneError(f"{model_dir} holds WiSE-FT weights already; give it the finetune stage's model folder")
    check_same_layout(start.state_dict(), tuned)
    blocks = backbone.blocks()
    frozen = blocks[: len(blocks) - int(config["unfrozen_blocks"])]
    names = {id(p): f"features.{n}" for n, p in start.features.named_parameters()}
    for block in frozen:
        for param in block.parameters():
            key = names[id(param)]
            if not torch.equal(param.detach(), tuned[key]):
                raise FinetuneError(
                    f"{key} lies in a block fine-tuning kept frozen, yet differs between the pre-trained "
                    f"{backbone.name} and {model_dir}: it started from other weights; rerun finetune"
                )


def score_curve(
    start: Classifier,
    tuned: Classifier,
    alphas: list[float],
    batches,
    labels: np.ndarray,
    runtime: Runtime,
    normalize,
) -> list[CurvePoint]:
    """Every alpha's val accuracy and log loss, in one pass over the val images (each batch decoded once, then run
    at every alpha). Only the tensors fine-tuning moved are mixed; the others are the network's own."""
    theta_0, theta_1 = start.state_dict(), tuned.state_dict()
    moved = [k for k, v in theta_1.items() if v.is_floating_point() and not torch.equal(v, theta_0[k])]
    log.info("finetune_wise: %d of %d tensors moved in fine-tuning; only they are mixed", len(moved), len(theta_1))
    start_moved, tuned_moved = {k: theta_0[k] for k in moved}, {k: theta_1[k] for k in moved}
    proba = {alpha: [] for alpha in alphas}
    seen = []
    tuned.eval()
    with torch.inference_mode(), tqdm(total=len(labels), desc="finetune_wise", unit="img") as bar:
        for batch in batches:
            bar.update(len(batch.index) + len(batch.rejected))
            if not len(batch.index):
                continue
            x = runtime.inputs(batch.images, normalize)
            for alpha in alphas:
                weights = interpolate(start_moved, tuned_moved, alpha)
                with runtime.autocast():
                    logits = functional_call(tuned, weights, (x,))
                proba[alpha].append(logits.double().softmax(1).cpu().numpy())
            seen.append(batch.index.cpu().numpy())
    if not seen:
        raise FinetuneError("no val image could be read to choose alpha on")
    y = labels[np.concatenate(seen)]
    curve = []
    for alpha in sorted(alphas):
        p = np.concatenate(proba[alpha])
        p_true = np.clip(p[np.arange(len(y)), y], 1e-15, 1.0)  # as scikit-learn's log_loss clips
        curve.append(CurvePoint(float(alpha), float((p.argmax(1) == y).mean()), float(-np.log(p_true).mean())))
    return curve


def choose(curve: list[CurvePoint]) -> CurvePoint:
    """The alpha kept: the highest val accuracy; ties go to the lowest val log loss, then to the larger alpha (nearer
    the fine-tuned network, which early stopping chose on the same val split)."""
    return max(curve, key=lambda p: (p.val_accuracy, -p.val_log_loss, p.alpha))


def wise_finetune(
    model_dir: Path,
    layer: dict[str, torch.Tensor],
    manifest_path: Path,
    data_root: Path,
    out_dir: Path,
    alphas: list[float],
    params: FinetuneParams,
    *,
    backbone_name: str,
    weights: Path | None = None,
    allow_download: bool = True,
) -> WiseResult:
    """Mix the fine-tuned network in `model_dir` with its start (`backbone_name`'s pre-trained weights, or `weights`,
    and `layer`, the warm_start stage's), score each of `alphas` on the manifest's val split (decoded and run as
    fine-tuning validated: `params`' batch size, workers, device and precision), keep the best by TIE_RULE, and
    write it to `out_dir` as the finetune stage writes a model (so scoring, predict and export read it alike), its
    config.json holding the alpha and the curve under `wise`."""
    begin = time.perf_counter()
    manifest = read_manifest(manifest_path)
    rows = [r for r in manifest.ok_rows() if r.split == "val"]
    if not rows:
        raise FinetuneError(f"{manifest_path} has no val images to choose alpha on; set prepare.val_fraction above 0")
    tuned, config, preprocessing = load_finetuned(model_dir)
    backbone = build_backbone(backbone_name, weights, allow_download)
    start = starting_network(backbone, layer, len(config["classes"]))
    check_pair(start, tuned.state_dict(), backbone, config, manifest.classes, model_dir)
    runtime = Runtime.resolve(params.device, params.precision, option="finetune.device")
    start, tuned = runtime.place(start), runtime.place(tuned)
    labels = np.array([manifest.classes.index(r.class_name) for r in rows], dtype=np.int64)
    images = Images.of_rows(data_root, rows, preprocessing.to_uint8)
    batches = image_batches(images, params.batch_size, params.num_workers, runtime.device)
    curve = score_curve(start, tuned, alphas, batches, labels, runtime, preprocessing.normalize)
    best = choose(curve)
    mixed = interpolate(start.state_dict(), tuned.state_dict(), best.alpha)
    tuned.load_state_dict(mixed)
    seconds = time.perf_counter() - begin
    wise = {
        "alpha": best.alpha,
        "chosen_by": TIE_RULE,
        "curve": [asdict(p) for p in curve],
        "n_val": len(labels),
        "seconds": round(seconds, 3),
        "start": f"pre-trained {backbone.name} + the warm_start layer",
    }
    path = save_finetuned(tuned, out_dir, {**config, "wise": wise})
    return WiseResult(path, best.alpha, curve, len(labels), seconds, str(runtime.device))
