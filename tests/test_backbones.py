"""The backbone registry: real offline weights, classifier removal, preprocessing, clear errors."""

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.data.preprocessing import PreprocessingError, input_size
from pipeline.features.backbones import REGISTRY, build_backbone, fingerprint, imagenet_categories
from pipeline.features.surgery import ordered_blocks
from pipeline.features.weights import BackboneError, load_state_dict


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0")


@pytest.mark.parametrize(("image", "expected"), [("china.jpg", "palace"), ("flower.jpg", "daisy")])
def test_default_backbone_has_real_imagenet_weights(lite0, image, expected):
    """Random weights cannot rank these ImageNet classes first; the packaged weights do."""
    x = lite0.preprocessing(Image.fromarray(load_sample_image(image)))[None]
    with torch.inference_mode():
        logits = lite0.classifier(lite0.features(x))
    assert lite0.categories[int(logits.argmax())] == expected


def test_default_backbone_shape_and_preprocessing(lite0):
    assert lite0.feature_dim == 1280
    assert lite0.categories == imagenet_categories() and len(lite0.categories) == 1000
    p = lite0.preprocessing
    # timm's pretrained config for tf_efficientnet_lite0: bicubic, crop 0.875 (256 -> 224), mean = std = 0.5.
    assert (p.resize, p.crop, p.interpolation, p.mean, p.std) == (256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)
    with torch.inference_mode():
        out = lite0.features(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, 1280)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "nearest", "box"])
@pytest.mark.parametrize("sizes", [(256, 224), (146, 128), (200, 224)])
@pytest.mark.parametrize("source", ["photo", "noise"])
def test_preprocessing_gives_the_pixels_of_torchvision_resize_then_centre_crop(lite0, interpolation, sizes, source):
    """Resampling only what the crop keeps gives torchvision's pixels, to a grey level or two of rounding.

    Landscape, portrait, extreme and tiny images; a crop one pixel off would differ in most pixels by tens.
    """
    rng = np.random.default_rng(0)
    p = replace(lite0.preprocessing, resize=sizes[0], crop=sizes[1], interpolation=interpolation)
    for size in [(500, 375), (333, 500), (145, 300), (40, 1000), (1000, 40), (256, 256), (36, 38), (1, 1)]:
        if source == "photo":
            image = Image.fromarray(load_sample_image("china.jpg")).resize(size, Image.Resampling.BILINEAR)
        else:
            image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        resized = TF.resize(image, p.resize, InterpolationMode(interpolation))
        expected = TF.pil_to_tensor(TF.center_crop(resized, p.crop))
        got = p.to_uint8(image)
        assert got.shape == expected.shape == (3, p.crop, p.crop) and got.dtype == torch.uint8
        diff = (got.int() - expected.int()).abs()
        assert diff.max() <= 2 and (diff > 0).float().mean() < 0.02, (size, diff.max(), (diff > 0).float().mean())


def test_an_unsupported_interpolation_is_refused_by_name(lite0):
    with pytest.raises(PreprocessingError, match="unsupported interpolation 'nearest-exact'; expected one of nearest"):
        replace(lite0.preprocessing, interpolation="nearest-exact")


def test_feature_extractor_is_frozen_and_in_eval_mode(lite0):
    assert not lite0.features.training
    assert not any(p.requires_grad for p in lite0.features.parameters())


def test_blocks_are_ordered_stem_to_head(lite0):
    blocks = lite0.blocks()
    # stem (conv_stem + bn1), the 7 stages of MBConv blocks, head (conv_head + bn2)
    assert len(blocks) == 9
    assert list(blocks[0]) == [lite0.features.conv_stem, lite0.features.bn1]
    assert all(a is b for a, b in zip(blocks[1:8], lite0.features.blocks, strict=True))
    assert list(blocks[-1]) == [lite0.features.conv_head, lite0.features.bn2]
    owned = [id(p) for b in blocks for p in b.parameters()]
    assert sorted(owned) == sorted(id(p) for p in lite0.features.parameters())  # each parameter exactly once


def test_resnet_blocks_are_its_stem_and_stages():
    resnet = build_backbone("test_resnet").features
    blocks = ordered_blocks(resnet)
    assert len(blocks) == 5
    assert list(blocks[0]) == [resnet.conv1, resnet.bn1]  # stem
    assert blocks[1] is resnet.layer1 and blocks[-1] is resnet.layer4


def test_image_size_override_keeps_the_crop_ratio(lite0):
    p = lite0.preprocessing.with_image_size(112)
    assert (p.resize, p.crop) == (128, 112)
    assert lite0.preprocessing.with_image_size(None) is lite0.preprocessing


def test_random_test_models_are_seeded():
    a, b = build_backbone("test_resnet"), build_backbone("test_resnet")
    assert a.weights_sha256() == b.weights_sha256()
    assert a.feature_dim == 96


def test_fingerprint_changes_with_what_changes_an_embedding():
    bb = build_backbone("test_efficientnet")
    base = fingerprint(bb, bb.preprocessing, "fp32", True)
    assert base == fingerprint(bb, bb.preprocessing, "fp32", True)
    assert base != fingerprint(bb, bb.preprocessing, "bf16", True)
    assert base != fingerprint(bb, bb.preprocessing, "fp32", False)
    assert base != fingerprint(bb, bb.preprocessing.with_image_size(64), "fp32", True)
    other = build_backbone("test_resnet")
    assert base != fingerprint(other, other.preprocessing, "fp32", True)


def test_local_weights_file_replaces_the_weights(tmp_path: Path):
    model = build_backbone("test_resnet")
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in _full_state("test_resnet").items()}
    save_file(state, tmp_path / "w.safetensors")
    custom = build_backbone("test_resnet", weights=tmp_path / "w.safetensors")
    assert custom.weights_id == "file:w.safetensors"
    assert custom.weights_sha256() != model.weights_sha256()
    loaded = custom.features.state_dict()
    for key in ("layer1.0.conv1.weight", "layer4.0.bn1.running_mean"):
        np.testing.assert_array_equal(loaded[key].numpy(), state[key].numpy())


def _full_state(name: str) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    return {k: v.clone().contiguous() for k, v in timm.create_model(name).state_dict().items()}


def test_torch_weights_files_load_without_unpickling(tmp_path: Path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "w.pth")
    assert torch.equal(load_state_dict(tmp_path / "w.pth")["w"], torch.ones(2))
    with pytest.raises(BackboneError, match="weights file not found"):
        load_state_dict(tmp_path / "missing.pth")


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet'.*efficientnet_lite0.*torchvision/<model>"):
        build_backbone("resnet")
    with pytest.raises(BackboneError, match=r"unknown torchvision model 'resnet51'; valid: .*resnet50"):
        build_backbone("torchvision/resnet51")


def test_the_registry_lists_what_it_builds(lite0):
    """One declaration: the names build_backbone accepts are the ones `transfer backbones` lists, each with the
    embedding size the built backbone has (torchvision's members are listed from torchvision itself)."""
    singles = [entry for entry in REGISTRY.values() if not entry.family]
    assert [entry.name for entry in singles] == ["efficientnet_lite0", "test_efficientnet", "test_resnet"]
    for entry in singles:
        (info,) = entry.listing()
        built = lite0 if entry.name == lite0.name else build_backbone(entry.name)
        assert (info.name, info.feature_dim, info.offline) == (entry.name, built.feature_dim, True)
    assert [entry.name for entry in REGISTRY.values() if entry.family] == ["torchvision/", "timm/"]
    assert [info.name for info in REGISTRY["timm/"].listing()] == ["timm/<model>"]
    with pytest.raises(BackboneError, match=r"valid: efficientnet_lite0, test_efficientnet, test_resnet, torchvision/"):
        build_backbone("test_vit")


def test_uncached_weights_fail_at_once_with_the_fix(tmp_path):
    # An empty torch hub directory: resnet18's weights are certainly not cached. Downloads are off,
    # so nothing touches the network.
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(BackboneError, match=r"torchvision/resnet18 are not cached.*download https://\S+ on a"):
            build_backbone("torchvision/resnet18", allow_download=False)
    finally:
        torch.hub.set_dir(previous)


class _Payload:
    """A pickle that would create a file when unpickled: what a malicious weights file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_weights(kind: str, tmp_path: Path) -> Path:
    if kind == "other-architecture":
        save_file(_full_state("test_efficientnet"), tmp_path / "w.safetensors")
        return tmp_path / "w.safetensors"
    if kind == "malicious-pickle":
        torch.save({"state_dict": _Payload(tmp_path / "pwned")}, tmp_path / "w.pth")
        return tmp_path / "w.pth"
    if kind == "random-bytes":
        (tmp_path / "w.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
        return tmp_path / "w.safetensors"
    save_file(_full_state("test_resnet"), tmp_path / "full.safetensors")
    torch.save(_full_state("test_resnet"), tmp_path / "full.pth")
    suffix = ".safetensors" if kind == "truncated-safetensors" else ".pth"
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"w{suffix}").write_bytes(data[: len(data) // 2])
    return tmp_path / f"w{suffix}"


@pytest.mark.parametrize(
    "kind", ["other-architecture", "malicious-pickle", "random-bytes", "truncated-safetensors", "truncated-torch"]
)
@pytest.mark.parametrize("backbone", ["test_resnet", "timm/test_resnet"])
def test_a_bad_weights_file_is_one_line_error_and_runs_no_code(tmp_path, kind, backbone):
    """Before: a traceback (RuntimeError, UnpicklingError, SafetensorError) for each."""
    path = _bad_weights(kind, tmp_path)
    with pytest.raises(BackboneError, match=rf"{re.escape(str(path))}: .*extract\.backbones\.<label>\.weights") as err:
        build_backbone(backbone, weights=path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("setting", "own", "median_side", "size", "words"),
    [
        ("auto", 224, 375.0, 224, "the size the weights were trained at"),  # photos: the weights' own size
        ("auto", 224, 33.0, 224, "the size the weights were trained at"),  # just above tiny
        ("auto", 224, 8.0, 128, "the images are tiny (median shorter side 8 px <= 32)"),  # the bundled digits
        ("auto", 224, 32.0, 128, "so 128 px rather than the weights' 224"),  # CIFAR-sized
        ("auto", 96, 8.0, 96, "the size the weights were trained at"),  # never above the weights' own size
        ("auto", 224, 0.0, 224, "the size the weights were trained at"),  # a manifest without sizes
        (None, 224, 8.0, 224, "image_size null"),
        (300, 224, 8.0, 300, "image_size in params.yaml"),
    ],
)
def test_input_size_follows_the_setting_and_says_why(setting, own, median_side, size, words):
    chosen, why = input_size(setting, own, median_side)
    assert chosen == size and words in why
