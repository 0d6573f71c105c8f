"""A trained head (its pipeline, what it was trained on, its held-out scores) and the choice among heads."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np
from sklearn.pipeline import Pipeline

from pipeline.heads.registry import HEADS, HeadError

# The store attributes a head keeps: what its features were (the fine-tuning warm start checks them).
STORE_ATTRS = ("backbone", "image_size", "weights_file", "fingerprint", "precision", "embedding")


@dataclass
class TrainedHead:
    """A head fitted on one store's features: its pipeline, the grid it was chosen from, and what it was trained on."""

    name: str
    kind: str
    model: Pipeline
    classes: list[str]
    store_fingerprint: str
    hyperparameters: dict  # every argument of the estimator that we set: defaults, args, chosen grid values
    val_curve: list[dict]  # per grid point: its values, held-out accuracy and log loss (val or k-fold mean)
    fit_seconds: float
    n_train: int
    n_val: int
    store_attrs: dict = field(default_factory=dict)  # the store's STORE_ATTRS: what the features were
    # The store's manifest hash: which rows were train, val and test. The fingerprint says what computed the
    # features, not how they were split; a head of another split may have trained on the store's test rows.
    manifest_sha256: str | None = None
    selection: str = "the val split"  # the held-out rows that scored the grid, in words (pipeline.heads.selection)
    backbone: str = ""  # the label of the extract.backbones entry whose store it was trained on

    @property
    def model_name(self) -> str:
        """The model's name wherever models are compared: <backbone label>-<head name> (the head@ stage's
        suffix), or the head's name for a store written without a label."""
        return f"{self.backbone}-{self.name}" if self.backbone else self.name

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for every class of the store, columns in class-index order."""
        return full_proba(self.model, features, len(self.classes))

    @property
    def trainable_params(self) -> int:
        """Numbers fitted to the data: coefficients and intercepts of the linear heads, the class means of
        centroid, plus 1 for a temperature fitted on held-out rows. Scaler statistics are not counted (they are not
        trained), nor k-NN's stored rows: its training only keeps the embeddings, so it has 0."""
        clf = self.model.named_steps["clf"]
        return int(sum(np.size(attrgetter(name)(clf)) for name in HEADS[self.kind].trainable))


def grid_rank(record: dict) -> tuple[float, float]:
    """How grid points of one head compare: held-out accuracy, then the lower held-out log loss (exact ties:
    the first point in ascending grid order, which pipeline.heads.selection tries first)."""
    return record["val_accuracy"], -record["val_log_loss"]


def held_out(head: TrainedHead) -> dict:
    """The chosen grid point's record: its held-out accuracy and log loss (val, or pooled over k folds)."""
    return max(head.val_curve, key=grid_rank)


def chosen_head(heads: list[TrainedHead]) -> TrainedHead:
    """The head to report and export: the highest held-out accuracy of its chosen point; ties go to the first
    in params.yaml order (not to log loss: heads with a temperature fit it on the very rows it would be scored
    on, which favours them). The heads must have been scored on the same held-out rows, or they do not compare.
    """
    methods = {h.selection for h in heads}
    if len(methods) > 1:
        described = "; ".join(f"{h.model_name}: {h.selection}" for h in heads)
        raise HeadError(
            f"the heads were scored on different held-out rows ({described}), so their scores do not compare; give "
            "every head the same selection, cv_folds and seed under heads: in params.yaml"
        )
    best = max(held_out(h)["val_accuracy"] for h in heads)
    return next(h for h in heads if held_out(h)["val_accuracy"] == best)


def full_proba(model: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class; a class absent from training keeps probability 0."""
    full = np.zeros((len(x), n_classes))
    full[:, model.classes_] = model.predict_proba(x)
    # float32 features give float32 probabilities whose rows miss 1 by more than log_loss tolerates.
    return full / full.sum(axis=1, keepdims=True)
