"""Surgery on a pre-trained network: its classifier removed, its blocks found in forward order."""

from __future__ import annotations

from torch import nn

from pipeline.features.weights import BackboneError


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
