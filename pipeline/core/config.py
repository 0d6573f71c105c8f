"""Typed, frozen mirrors of params.yaml: unknown keys and wrong types are errors that name the key."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core.errors import ConfigError
from pipeline.core.parsing import parse

# Inputs larger than this are a typo, not a backbone's resolution (the largest ImageNet CNNs take 600 px,
# high-resolution ones about 1,000): 100,000 px would need 120 GB for one batch-size-one input.
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class PrepareParams:
    seed: int = 0
    # Fractions of each class's usable images; used when the data root has no train/val/test folders.
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # Processes that decode the files; None: one per core the process may use (`load_params` fills it in).
    num_workers: int | None = None
    # Split folders holding copies of one file in two splits: stop (error), keep them with a warning (warn),
    # or quarantine the copy in the later split (drop_from_test). Carved splits always keep copies together.
    on_cross_split_duplicate: Literal["error", "warn", "drop_from_test"] = "error"

    def __post_init__(self) -> None:
        _at_least("prepare", self, num_workers=1)
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"prepare.{key} must be in [0, 1); got {getattr(self, key)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"prepare.val_fraction + prepare.test_fraction must be below 1 to leave images for training; "
                f"got {self.val_fraction} + {self.test_fraction}"
            )


# What names a backbone entry may have: it names a DVC stage (extract@<label>), a file, and a params key.
LABEL_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class BackboneParams:
    """One entry of extract.backbones: which network computes the features, with which weights, at which size."""

    # A name from `transfer backbones`; None: the entry's own label (so `resnet50: {}` is ResNet-50).
    backbone: str | None = None
    # Optional local weights file (safetensors or a torch state dict) for the backbone's architecture.
    weights: str | None = None
    # Square input size in pixels; None: the size the weights were trained at; auto: that size, unless the images
    # are tiny (pipeline.data.preprocessing.input_size says when and why), and the stage's output says which it chose.
    image_size: int | Literal["auto"] | None = "auto"
    # Test-time augmentation of the embedding: none, or flip (the mean of the image's and its mirror's; twice the
    # forward passes).
    tta: Literal["none", "flip"] = "none"
    # last (the network's own embedding), or block indices (as finetune.unfreeze counts blocks: stem, stages, head;
    # negative from the end) whose outputs are average-pooled and concatenated, e.g. [-3, -2, -1].
    layers: Literal["last"] | list[int] = "last"

    @property
    def weights_path(self) -> Path | None:
        return Path(self.weights) if self.weights else None


@dataclass(frozen=True)
class RayParams:
    """extract.ray: how the Ray engine spreads the work (pipeline.features.engines.ray_data)."""

    # Each actor's forward pass takes extract.batch_size images, the batches the local engine would form.
    actors: int = 1  # embedding actors, each holding the frozen backbone (one per GPU on a GPU cluster)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | Literal["auto"] = "auto"  # auto: 1 when the cluster has GPUs, else 0 (CPU actors)
    decode_batch: int = 16  # images a CPU decode task reads, checks and decodes at a time

    def __post_init__(self) -> None:
        _at_least("extract.ray", self, actors=1, decode_batch=1)
        if self.cpus_per_actor < 0 or (self.gpus_per_actor != "auto" and self.gpus_per_actor < 0):
            raise ConfigError(
                f"extract.ray: cpus_per_actor and gpus_per_actor must be >= 0; got {self.cpus_per_actor} and "
                f"{self.gpus_per_actor}"
            )


@dataclass(frozen=True)
class ExtractParams:
    # One extract stage, feature store and set of heads per entry, by label (extract@<label>,
    # data/features/<label>.h5, head@<label>-<head>): adding an entry adds stages and reruns nothing else.
    backbones: dict[str, BackboneParams] = field(default_factory=lambda: {DEFAULT_BACKBONE: BackboneParams()})
    # Allow downloading torchvision/timm weights that are not in the local cache.
    allow_download: bool = True
    batch_size: int = 32
    # Decoding processes that run ahead of the forward pass when it runs on an accelerator (loader: workers).
    num_workers: int = 2
    # Where images are decoded: workers (DataLoader processes, beside the forward pass), inline (threads,
    # between forward passes), auto (workers on an accelerator, inline on CPU); see runtime.image_batches.
    loader: Literal["auto", "workers", "inline"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # auto = bf16 autocast on CUDA, fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Who decodes JPEGs: cpu (Pillow in the loader), device (torchvision: nvJPEG a batch at a time on CUDA,
    # libjpeg-turbo in the loader elsewhere; other formats still Pillow), auto (device on CUDA, else cpu).
    decode: Literal["auto", "cpu", "device"] = "auto"
    # Decode large JPEGs at a reduced scale (never below the resize target) before resizing.
    jpeg_draft: bool = True
    # Where the embeddings are computed: local (this process and its loader) or ray (Ray Data on the cluster that
    # RAY_ADDRESS names, else a local one; `pip install -e '.[ray]'`). Same cache, same store.
    engine: Literal["local", "ray"] = "local"
    ray: RayParams = field(default_factory=RayParams)

    def __post_init__(self) -> None:
        _at_least("extract", self, batch_size=1, num_workers=0)
        if not self.backbones:
            raise ConfigError(f"extract.backbones is empty; name at least one, e.g. {{{DEFAULT_BACKBONE}: {{}}}}")
        for label, entry in self.backbones.items():
            if not label or not set(label) <= LABEL_CHARACTERS:
                raise ConfigError(
                    f"extract.backbones.{label}: a label may use only letters, digits and _ (it names a DVC stage, "
                    "a file and a params key); put the network's own name under `backbone:`"
                )
            if isinstance(entry.image_size, int):
                _at_least(f"extract.backbones.{label}", entry, image_size=1)
                _at_most(f"extract.backbones.{label}", entry, image_size=MAX_IMAGE_SIZE)
            if entry.layers != "last" and (not entry.layers or len(set(entry.layers)) != len(entry.layers)):
                raise ConfigError(
                    f"extract.backbones.{label}.layers must be last or a list of distinct block indices, e.g. "
                    f"[-3, -2, -1]; got {entry.layers}"
                )

    @classmethod
    def of(
        cls, backbone: str, image_size: int | str | None = "auto", weights: str | None = None, **settings: Any
    ) -> ExtractParams:
        """One backbone, labelled by its name, with the shared `settings` (for code and tests; params.yaml has
        the mapping)."""
        return cls(backbones={backbone: BackboneParams(weights=weights, image_size=image_size)}, **settings)

    def backbone(self, label: str) -> BackboneParams:
        """The entry `label`, with its network's name filled in."""
        if label not in self.backbones:
            raise ConfigError(f"no backbone '{label}' under extract.backbones; defined: {', '.join(self.backbones)}")
        entry = self.backbones[label]
        return dataclasses.replace(entry, backbone=entry.backbone or label)


@dataclass(frozen=True)
class HeadParams:
    # Registered head kind (see pipeline.heads.registry.HEADS).
    kind: str = "logreg"
    # Keyword arguments of the estimator, by the estimator's own names (e.g. max_iter, class_weight).
    args: dict[str, Any] = field(default_factory=dict)
    # The regularisation grid, each point scored on held-out rows (see selection), e.g. {C: [0.01, 0.1, 1]}.
    grid: dict[str, list[float]] = field(default_factory=dict)
    # Refit the chosen setting on train+val before saving (the linear-probe protocol).
    refit_on_train_val: bool = True
    seed: int = 0
    # How the grid point is chosen: on the val split, by stratified k-fold cross-validation on train+val, or
    # auto: cross-validation when val is too small to separate grid points (pipeline.heads.selection.MIN_VAL_IMAGES).
    selection: Literal["auto", "val", "cv"] = "auto"
    cv_folds: int = 5  # at least 2 (checked with the head's name by pipeline.heads.selection.check_head_params)
    # Where logreg and linear_svm are fitted and knn searches: auto = CUDA when the machine has it and the work is
    # large enough to be worth starting it (pipeline.heads.linear.solver_device, pipeline.heads.neighbors), else the
    # CPU; cuda without a GPU is an error. The other heads run on the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class TorchrunParams:
    """finetune.torchrun: the processes of a DistributedDataParallel run (torch.distributed.run's own flags)."""

    nproc_per_node: int = 2  # processes on this machine: one per GPU, or CPU ranks (gloo)
    nnodes: int = 1  # machines; the others join with the command the README gives
    rdzv_endpoint: str = "localhost:29400"  # host:port on the first machine, which every machine can reach
    rdzv_id: str = "transfer-finetune"  # one name per run, the same on every machine

    def __post_init__(self) -> None:
        _at_least("finetune.torchrun", self, nproc_per_node=1, nnodes=1)


@dataclass(frozen=True)
class FinetuneParams:
    # The label of the extract.backbones entry to fine-tune (its network, weights and image size). dvc.yaml's
    # warm_start and finetune stages name it, so params.yaml must set it (stages/check_params.py says so); None,
    # for code that builds Params itself: the first entry.
    backbone: str | None = None
    # Trailing backbone blocks to train (`transfer backbones` shows the count), or "all"; 0 = new layer only.
    unfreeze: int | Literal["all"] = 2
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.001  # the new output layer's learning rate
    backbone_lr_mult: float = 0.1  # unfrozen blocks learn at lr * backbone_lr_mult ...
    layer_decay: float = 1.0  # ... times layer_decay ** (blocks between them and the output)
    weight_decay: float = 0.0001
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to zero
    # Random resized crop + horizontal flip; off = extraction's preprocessing; auto: on for photos, off for tiny
    # images (digits, icons: a flip or a crop changes what they show; pipeline.data.preprocessing.tiny_images).
    augment: bool | Literal["auto"] = "auto"
    batchnorm: Literal["frozen", "train"] = "frozen"  # frozen: BatchNorm of frozen blocks stays in eval mode
    init_head: Literal["logreg", "random"] = "logreg"  # logreg: start from the trained logistic head
    early_stopping_patience: int = 3  # epochs without a lower val loss before stopping; 0 = never stop
    seed: int = 0
    # None: the backbone entry's image_size, the inputs its frozen features came from (`load_params` fills it in).
    image_size: int | Literal["auto"] | None = None
    num_workers: int = 2
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    # local: one process; torchrun: DistributedDataParallel over finetune.torchrun's processes (batch_size stays
    # the global batch, split evenly between them). Also entered when the stage itself runs under torchrun.
    engine: Literal["local", "torchrun"] = "local"
    torchrun: TorchrunParams = field(default_factory=TorchrunParams)

    def __post_init__(self) -> None:
        if self.unfreeze != "all" and self.unfreeze < 0:
            raise ConfigError(f"finetune.unfreeze must be >= 0 or 'all'; got {self.unfreeze}")
        _at_least("finetune", self, epochs=1, batch_size=1, num_workers=0)
        if self.engine == "torchrun":  # a params error, so check_params stops `dvc repro` before outputs go
            rank_batch_size(self.batch_size, self.torchrun.nproc_per_node * self.torchrun.nnodes)
        if isinstance(self.image_size, int):
            _at_least("finetune", self, image_size=1)
            _at_most("finetune", self, image_size=MAX_IMAGE_SIZE)


# The alphas WiSE-FT scores: 0, 0.1, ..., 1 (Wortsman et al. 2022 sweep this grid).
WISE_ALPHAS = [round(0.1 * i, 1) for i in range(11)]


@dataclass(frozen=True)
class FinetuneWiseParams:
    """finetune_wise: WiSE-FT, the fine-tuned weights theta_1 mixed with those fine-tuning started from, theta_0 (the
    pre-trained backbone + the warm_start layer): theta(alpha) = (1 - alpha) theta_0 + alpha theta_1."""

    # Each alpha is scored on the val split (no training); the best val accuracy is kept (ties: the lower val log
    # loss, then the larger alpha). In [0, 1]: 0 is the starting network, 1 the fine-tuned one.
    alphas: list[float] = field(default_factory=lambda: list(WISE_ALPHAS))

    def __post_init__(self) -> None:
        if not self.alphas:
            raise ConfigError("finetune_wise.alphas is empty; e.g. [0.0, 0.1, ..., 1.0] (11 values)")
        outside = [a for a in self.alphas if not 0.0 <= a <= 1.0]
        if outside:
            raise ConfigError(f"finetune_wise.alphas must lie in [0, 1] (0: the start, 1: fine-tuned); got {outside}")
        if len(set(self.alphas)) != len(self.alphas):
            raise ConfigError(f"finetune_wise.alphas names an alpha twice: {self.alphas}")


@dataclass(frozen=True)
class EvaluateParams:
    ece_bins: int = 15
    # 95% intervals: Wilson's for accuracy, a percentile bootstrap over test images for macro-F1 (resamples and
    # seed here, so reruns give the same interval). The report's paired comparison is exact (pipeline.results.stats).
    bootstrap_resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least("evaluate", self, ece_bins=1, bootstrap_resamples=100, seed=0)


@dataclass(frozen=True)
class LearningCurveParams:
    # The few-shot protocol of CLIP / CoOp for the chosen head (pipeline.heads.curves): for each k, `seeds` draws of
    # k train images and min(k, 4) val images per class; the head's grid chosen on those val images, the test split
    # scored (plus the head as trained on every image).
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: int = 5  # draws per k: the curve shows their mean with a 95% t-interval

    def __post_init__(self) -> None:
        _at_least("learning_curve", self, seeds=1)
        for k in self.shots:
            if k < 1:
                raise ConfigError(f"learning_curve.shots must be >= 1 each (images per class); got {k}")
        if len(set(self.shots)) != len(self.shots):
            raise ConfigError(f"learning_curve.shots lists a value twice: {self.shots}; list each k once")


@dataclass(frozen=True)
class FinetuneCurveParams:
    # Fine-tune on subsets of these many training images per class (one run each; expensive). Empty: off.
    sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for size in self.sizes:
            if size < 1:
                raise ConfigError(f"finetune_curve.sizes must be >= 1 each; got {size}")


@dataclass(frozen=True)
class AuditParams:
    # Cosine similarity of two images' embeddings at or above which images of different splits count as
    # near-copies; auto: from the embeddings themselves, the 99th percentile of the training images' cosines to
    # their nearest neighbours, at most halfway from their median to 1 (pipeline.results.audit.duplicate_threshold
    # says why; the stage prints its choice).
    duplicate_threshold: float | Literal["auto"] = "auto"
    folds: int = 5  # cross-validation folds of the out-of-fold probabilities whose label errors cleanlab ranks
    # Inverse regularisation of those out-of-fold logistic fits; auto: the C the logreg head chose on val for
    # audit.backbone (the first head of kind logreg under heads), 1.0 without one.
    C: float | Literal["auto"] = "auto"
    seed: int = 0
    top: int = 24  # images per picture grid in reports/audit/
    # Leave the test images that copy a train or val image (reports/audit/test_copies.csv, with the reason) out
    # of the report's scores, so that it scores a clean test split; the data root and the manifest stay as
    # they are, and metrics/models/ keeps the scores on the whole split.
    drop_cross_split_duplicates: bool = False
    # The label of the extract.backbones entry whose embeddings are searched for copies and label errors (the
    # threshold belongs to one backbone's cosine space); None: the first entry.
    backbone: str | None = None
    # Where the near-copy search runs: auto (a CUDA GPU when there is one), cpu or cuda.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if self.duplicate_threshold != "auto" and not 0.0 < self.duplicate_threshold <= 1.0:
            raise ConfigError(f"audit.duplicate_threshold must be in (0, 1]; got {self.duplicate_threshold}")
        if self.C != "auto" and not self.C > 0:
            raise ConfigError(f"audit.C must be above 0 (or auto); got {self.C}")
        _at_least("audit", self, folds=2, seed=0, top=1)


@dataclass(frozen=True)
class ExportParams:
    # Head names (see heads:), chosen_on_val (among the heads export writes, not k-NN, the chosen head) and
    # finetune (the fine-tuned network), finetune-wise (WiSE-FT's, the finetune_wise stage).
    models: list[str] = field(default_factory=lambda: ["chosen_on_val", "finetune"])
    opset: int = 18  # ONNX opset: torch's exporter's lowest native one (onnxruntime >= 1.14 runs it)
    batch_size: int = 32  # test images per batch in the parity check

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("export.models is empty; name at least one model, e.g. [chosen_on_val, finetune]")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"export.models names a model twice: {self.models}")
        _at_least("export", self, opset=18, batch_size=1)


@dataclass(frozen=True)
class Params:
    prepare: PrepareParams = field(default_factory=PrepareParams)
    extract: ExtractParams = field(default_factory=ExtractParams)
    heads: dict[str, HeadParams] = field(default_factory=lambda: {"logreg": HeadParams()})
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    finetune_wise: FinetuneWiseParams = field(default_factory=FinetuneWiseParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    learning_curve: LearningCurveParams = field(default_factory=LearningCurveParams)
    finetune_curve: FinetuneCurveParams = field(default_factory=FinetuneCurveParams)
    export: ExportParams = field(default_factory=ExportParams)
    audit: AuditParams = field(default_factory=AuditParams)

    def __post_init__(self) -> None:
        # dvc.yaml's warm_start stage depends on data/heads/<finetune.backbone>/logreg.h5 (read with init_head: logreg).
        if "logreg" not in self.heads or self.heads["logreg"].kind != "logreg":
            raise ConfigError(
                "heads.logreg: keep a head named logreg of kind logreg; fine-tuning's warm_start stage depends on it"
            )
        for key, label in (("finetune.backbone", self.finetune.backbone), ("audit.backbone", self.audit.backbone)):
            if label is not None and label not in self.extract.backbones:
                raise ConfigError(
                    f"{key}: '{label}' is not under extract.backbones ({', '.join(self.extract.backbones)}); "
                    "name one of them"
                )

    @property
    def finetune_backbone(self) -> BackboneParams:
        """The extract.backbones entry fine-tuning starts from (finetune.backbone, or the first)."""
        return self.extract.backbone(self.finetune.backbone or next(iter(self.extract.backbones)))

    @property
    def audit_backbone(self) -> str:
        """The label of the store the audit searches (audit.backbone, or the first of extract.backbones)."""
        return self.audit.backbone or next(iter(self.extract.backbones))


def rank_batch_size(batch_size: int, world: int) -> int:
    """`finetune.batch_size` is the global batch: each of `world` processes takes an equal share of it, so the
    ranks together take the batches one process takes."""
    if batch_size % world:
        raise ConfigError(
            f"finetune.batch_size {batch_size} does not split evenly between {world} processes "
            f"(finetune.torchrun.nproc_per_node x nnodes); use a multiple of {world}"
        )
    return batch_size // world


def _at_most(section: str, params: object, **maximum: int) -> None:
    for key, high in maximum.items():
        value = getattr(params, key)
        if value is not None and value > high:
            raise ConfigError(f"{section}.{key} must be <= {high}; got {value}")


def _at_least(section: str, params: object, **minimum: int) -> None:
    """Range checks: each named value (when set) must be at least its minimum."""
    for key, low in minimum.items():
        value = getattr(params, key)
        if value is not None and value < low:
            raise ConfigError(f"{section}.{key} must be >= {low}; got {value}")


def load_params(path: Path) -> Params:
    """Read params.yaml into `Params`, rejecting unknown keys and wrong types by name."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return resolve(parse(Params, raw, "", MOVED))


def resolve(params: Params) -> Params:
    """Fill in the values that default to another section's, once, so no caller derives them again."""
    finetune, prepare = params.finetune, params.prepare
    if finetune.image_size is None:
        finetune = dataclasses.replace(finetune, image_size=params.finetune_backbone.image_size)
    if prepare.num_workers is None:
        prepare = dataclasses.replace(prepare, num_workers=usable_cores())
    return dataclasses.replace(params, finetune=finetune, prepare=prepare)


# Keys of older params.yaml files, and where their values go now.
MOVED = {
    **{
        f"extract.{key}": f"set it per backbone, e.g. extract.backbones: {{{DEFAULT_BACKBONE}: {{{key}: <value>}}}}"
        for key in ("backbone", "weights", "image_size")
    },
    "learning_curve.sizes": "it is learning_curve.shots now (train images per class of the few-shot protocol, "
    "e.g. [1, 2, 4, 8, 16])",
}


def usable_cores() -> int:
    """The cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
