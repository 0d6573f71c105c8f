"""The new layer's starting weights: seeded random ones, or the trained logistic head's chosen point fitted on the
train split alone and folded in (linear probe, then fine-tune), once the head is shown to have seen these classes,
this split and these features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.config import FinetuneParams, HeadParams
from pipeline.data.manifest import Manifest, manifest_sha256
from pipeline.features.backbones import Backbone
from pipeline.features.embedding import LAST, Embedding
from pipeline.features.store import FeatureStore
from pipeline.finetuning.model import FinetuneError, new_layer
from pipeline.finetuning.training import with_input_size
from pipeline.heads.estimators import scores_per_class
from pipeline.heads.persistence import check_trained_on
from pipeline.heads.selection import train_head
from pipeline.heads.trained import TrainedHead


def init_from_head(layer: nn.Linear, head: TrainedHead) -> None:
    """Copy a trained logistic head into the new layer: scaler and coefficients folded into one affine map.

    logits = ((f - mean) / scale) @ coef.T + b = f @ (coef / scale).T + (b - coef @ (mean / scale)).
    scikit-learn stores a binary problem as one row (the logit of class 1); class 0 gets a zero row.
    """
    scaler, clf = head.model.named_steps["scale"], head.model.named_steps["clf"]
    coef, intercept = clf.coef_ / scaler.scale_, clf.intercept_ - clf.coef_ @ (scaler.mean_ / scaler.scale_)
    if coef.shape[0] == 1:
        coef, intercept = scores_per_class(coef), scores_per_class(intercept)
    weight = np.zeros(tuple(layer.weight.shape))
    bias = np.zeros(layer.out_features)
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))


def check_warm_start(
    head: TrainedHead, classes: list[str], manifest: str, backbone: str, crop: int, weights: str | Path | None
) -> None:
    """A head can seed the new layer only if it saw these classes, in the split of this manifest (`manifest`,
    its hash: a head of another split may have trained on this one's test rows), and the features this backbone
    (with these weights) gives at this image size."""
    if head.kind != "logreg":
        raise FinetuneError(f"init_head needs a logreg head; {head.name} is a {head.kind} head")
    if head.classes != classes:
        raise FinetuneError(f"the logreg head has classes {head.classes}, the manifest {classes}; rerun the head stage")
    if head.manifest_sha256 != manifest:
        raise FinetuneError(
            f"the logreg head was trained on the split of manifest {str(head.manifest_sha256)[:16]}, fine-tuning "
            f"reads manifest {manifest[:16]} (prepare ran again since): rerun the head stage"
        )
    seen = head.store_attrs
    embedding = Embedding.from_spec(seen.get("embedding"))
    if embedding.layers != LAST:
        raise FinetuneError(
            f"the logreg head was trained on embeddings of {embedding.describe()}; the fine-tuned network has only "
            "its own embedding: set init_head to random, or fine-tune a backbone entry with layers: last"
        )
    if _as_path(seen.get("weights_file")) != _as_path(weights):  # `./w.safetensors` is `w.safetensors`
        raise FinetuneError(
            f"the logreg head was trained on features of weights {seen.get('weights_file') or 'the defaults'}, "
            f"fine-tuning starts from {weights or 'the defaults'}: rerun extract and the head stage"
        )
    if (seen.get("backbone"), seen.get("image_size")) != (backbone, crop):
        raise FinetuneError(
            f"the logreg head was trained on {seen.get('backbone')} features at {seen.get('image_size')} px, "
            f"fine-tuning runs {backbone} at {crop} px: set finetune.image_size to null or init_head to random"
        )


def _as_path(value: str | Path | None) -> Path | None:
    return Path(value) if value else None


def train_split_probe(head: TrainedHead, store: FeatureStore) -> TrainedHead:
    """The logistic head's chosen point (its hyperparameters) fitted on the store's train split alone. The head as
    trained was refit on train+val; but the val split chooses fine-tuning's epoch (early stopping) and WiSE-FT's
    alpha, and a start fitted on those images would be favoured by the very images that judge it."""
    params = HeadParams(
        kind=head.kind, args=dict(head.hyperparameters), grid={}, refit_on_train_val=False, selection="val"
    )
    return train_head(store, head.name, params)


def initial_layer(
    backbone: Backbone,
    manifest: Manifest,
    params: FinetuneParams,
    head: TrainedHead | None = None,
    weights: str | Path | None = None,
    store: FeatureStore | None = None,
) -> dict[str, torch.Tensor]:
    """The new output layer's starting weights: seeded random ones, or (`params.init_head: logreg`, the linear probe
    then fine-tune recipe) the logistic head's chosen point fitted on the train split of its `store` and folded in,
    after checking that the head saw the manifest's classes and split, and the features of this backbone, weights
    (`weights`, extract's) and image size."""
    layer = new_layer(backbone.feature_dim, len(manifest.classes), params.seed)
    if params.init_head == "logreg":
        if head is None:
            raise FinetuneError("finetune.init_head is logreg but no trained logreg head was given")
        crop = with_input_size(params, backbone, manifest).image_size
        check_warm_start(head, manifest.classes, manifest_sha256(manifest), backbone.name, crop, weights)
        if store is None:
            raise FinetuneError("finetune.init_head is logreg but the logreg head's feature store was not given")
        check_trained_on(head, store.attrs, Path(f"the {head.name} head"), "its feature store")
        init_from_head(layer, train_split_probe(head, store))
    return {name: tensor.detach().clone() for name, tensor in layer.state_dict().items()}
