"""torchvision's JPEG decoder: the files it takes, upright as Pillow turns them, a batch decoded in one call,
Pillow for everything else, and embeddings that agree with Pillow's."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import ExtractParams
from pipeline.core.errors import PipelineError
from pipeline.data.decoding import JpegDecoder, orient, resolve_decoder
from pipeline.data.images import decode_rgb, jpeg_orientation
from pipeline.data.loading import Images, image_batches
from pipeline.data.preprocessing import Preprocessing
from pipeline.features.backbones import build_backbone, fingerprint
from pipeline.features.extraction import extract
from pipeline.features.store import read_store
from tests.conftest import prepare_manifest, write_image_folder
from tests.image_fixtures import (
    cmyk_jpeg,
    encode,
    exif_rotated_jpeg,
    gif_bytes,
    noisy_rgb,
    rgba_png,
    text_file,
    truncated_jpeg,
)

CPU = torch.device("cpu")
SMALL = Preprocessing(resize=40, crop=32, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_upright_as_pillow_turns_it(orientation):
    data = exif_rotated_jpeg(orientation)
    assert jpeg_orientation(data) == orientation
    stored = torch.from_numpy(np.array(decode_rgb(exif_rotated_jpeg(1)))).permute(2, 0, 1)
    upright = torch.from_numpy(np.array(decode_rgb(data))).permute(2, 0, 1)  # Pillow's exif_transpose
    assert torch.equal(orient(stored, orientation), upright)


def test_only_8_bit_rgb_and_grey_jpegs_are_taken_the_rest_go_to_pillow():
    assert jpeg_orientation(encode(noisy_rgb(8, 8), "JPEG")) == 1
    assert jpeg_orientation(encode(noisy_rgb(8, 8).convert("L"), "JPEG")) == 1
    for other in (cmyk_jpeg(), rgba_png(), gif_bytes(), text_file(), b""):
        assert jpeg_orientation(other) is None


def _write_mixed_files(folder: Path) -> list[Path]:
    folder.mkdir()
    files = {
        "a.jpg": encode(noisy_rgb(60, 45, seed=1), "JPEG", quality=90),
        "grey.jpg": encode(noisy_rgb(45, 60, seed=2).convert("L"), "JPEG", quality=90),
        "rotated.jpg": exif_rotated_jpeg(6),
        "cmyk.jpg": cmyk_jpeg(),
        "truncated.jpg": truncated_jpeg(),
        "alpha.png": rgba_png(),
        "notes.jpg": text_file(),
        "z.jpg": encode(noisy_rgb(80, 50, seed=3), "JPEG", quality=90),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def test_a_batch_decoded_in_one_call_equals_file_by_file_and_refused_files_go_to_pillow(tmp_path):
    paths = _write_mixed_files(tmp_path / "mixed")
    batches = {}
    for batched in (True, False):
        dataset = Images.of_files(paths, SMALL.to_uint8, jpeg=JpegDecoder(CPU, SMALL, batched=batched))
        (batches[batched],) = list(image_batches(dataset, 16, 0, CPU, loader="inline"))
    one_call, per_file = batches[True], batches[False]
    assert one_call.index.tolist() == per_file.index.tolist() == [0, 1, 2, 3, 5, 7]  # in dataset order
    assert torch.equal(one_call.images, per_file.images) and one_call.images.shape == (6, 3, 32, 32)
    # The truncated JPEG is taken, refused by torchvision, then rejected by Pillow; the text file never taken.
    assert sorted((i, reason) for i, reason, _ in one_call.rejected) == [(4, "corrupt"), (6, "not_an_image")]
    pillow = Images.of_files(paths, SMALL.to_uint8)
    for position, i in enumerate(one_call.index.tolist()):
        if paths[i].name in ("cmyk.jpg", "alpha.png"):  # not JPEGs it takes: Pillow's very pixels
            assert torch.equal(one_call.images[position], pillow[i].pixels)


def test_decoding_in_loader_workers_gives_the_batches_of_inline_decoding(tmp_path):
    paths = _write_mixed_files(tmp_path / "mixed") * 3
    dataset = Images.of_files(paths, SMALL.to_uint8, jpeg=JpegDecoder(CPU, SMALL, batched=True))
    inline = list(image_batches(dataset, 10, 2, CPU, loader="inline"))
    workers = list(image_batches(dataset, 10, 2, CPU, loader="workers"))
    assert [b.index.tolist() for b in inline] == [b.index.tolist() for b in workers]
    assert all(torch.equal(a.images, b.images) for a, b in zip(inline, workers, strict=True))
    assert [b.rejected for b in inline] == [b.rejected for b in workers]


def test_pillow_only_interpolations_keep_pillow_unless_device_decoding_is_asked_for():
    lanczos = Preprocessing(resize=40, crop=32, interpolation="lanczos", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert resolve_decoder("auto", CPU, SMALL) == "pillow"
    assert resolve_decoder("device", CPU, SMALL) == "libjpeg-turbo"
    assert resolve_decoder("auto", torch.device("cuda"), SMALL) == "nvjpeg"
    assert resolve_decoder("auto", torch.device("cuda"), lanczos) == "pillow"
    with pytest.raises(PipelineError, match="resizes with 'lanczos', which only Pillow implements"):
        resolve_decoder("device", CPU, lanczos)


def test_device_decoding_is_part_of_the_fingerprint_and_of_the_store(tmp_path):
    root = tmp_path / "raw"
    write_image_folder(root, {"a": 6, "b": 6}, size=48, fmt="jpg")
    manifest = prepare_manifest(root, tmp_path / "manifest.csv")
    stores = {}
    for decode in ("cpu", "device"):
        params = ExtractParams.of("test_resnet", image_size=32, batch_size=4, device="cpu", decode=decode)
        result = extract(manifest, root, tmp_path / f"{decode}.h5", tmp_path / "cache", params)
        assert result.computed == 12  # one cache, two fingerprints: nothing reused across decoders
        stores[decode] = read_store(result.store)
    assert (stores["cpu"].attrs["decoder"], stores["device"].attrs["decoder"]) == ("pillow", "libjpeg-turbo")
    bb = build_backbone("test_resnet")
    p = bb.preprocessing.with_image_size(32)
    assert stores["cpu"].attrs["fingerprint"] == fingerprint(bb, p, "fp32", True)
    assert stores["device"].attrs["fingerprint"] == fingerprint(bb, p, "fp32", True, "libjpeg-turbo")


def test_embeddings_of_the_two_decoders_agree_on_real_photos(hymenoptera):
    """Both decoders are libjpeg-turbo here; the resizes differ (Pillow's and torch's bicubic). Measured on
    these 32 photos with EfficientNet-Lite0 at 224 px: cosine similarity 0.99998 at worst, 0.999996 on average."""
    backbone = build_backbone("efficientnet_lite0")
    p = backbone.preprocessing
    paths = sorted(hymenoptera.rglob("*.jpg"))[::12][:32]
    embeddings = []
    for jpeg in (None, JpegDecoder(CPU, p, batched=True)):
        (batch,) = list(image_batches(Images.of_files(paths, p.to_uint8, jpeg=jpeg), 32, 0, CPU, "inline"))
        with torch.inference_mode():
            embeddings.append(torch.nn.functional.normalize(backbone.features.eval()(p.normalize(batch.images))))
    cosine = (embeddings[0] * embeddings[1]).sum(1)
    print(f"cosine similarity: min {cosine.min():.6f}, mean {cosine.mean():.6f}")
    assert cosine.min() > 0.9999, cosine.min()
