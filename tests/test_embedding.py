"""What an embedding is made of (extract.backbones.<label>.tta and .layers): the embedder computes it, it is part
of the fingerprint, extraction stores it, and `transfer predict` and the ONNX export compute the same thing."""

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main as transfer
from pipeline.core.config import BackboneParams, ExtractParams, FinetuneParams, HeadParams
from pipeline.core.errors import ConfigError
from pipeline.core.parsing import parse
from pipeline.data.manifest import read_manifest
from pipeline.features.backbones import build_backbone, fingerprint
from pipeline.features.embedding import Embedding, pooled
from pipeline.features.extraction import extract
from pipeline.features.store import read_store
from pipeline.finetuning.model import FinetuneError
from pipeline.finetuning.warm_start import initial_layer
from pipeline.heads.persistence import load_head
from tests.conftest import prepare_manifest
from tests.test_export import run_export, train_and_score

FLIP_AND_BLOCKS = Embedding("flip", (-2, -1))


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def test_the_last_block_pooled_is_the_networks_own_embedding():
    plain = build_backbone("test_efficientnet")
    last = build_backbone("test_efficientnet", embedding=Embedding("none", (-1,)))
    x = _images()
    assert last.embedding_dim == plain.feature_dim == 256
    assert torch.equal(last.embedder()(x), plain.features(x))


@torch.inference_mode()
def test_blocks_are_pooled_and_concatenated_in_the_order_given():
    backbone = build_backbone("test_efficientnet", embedding=Embedding("none", (-1, 1)))
    x = _images()
    seen = {}
    block = backbone.blocks()[1]
    handle = block.register_forward_hook(lambda m, i, out: seen.update(one=pooled(out)))
    own = backbone.features(x)
    handle.remove()
    out = backbone.embedder()(x)
    assert out.shape == (3, 256 + seen["one"].shape[1]) == (3, backbone.embedding_dim)
    assert torch.equal(out[:, :256], own) and torch.equal(out[:, 256:], seen["one"])
    assert not block._forward_hooks  # the embedder leaves no hook behind on the network


@torch.inference_mode()
def test_flip_averages_the_image_and_its_mirror():
    backbone = build_backbone("test_resnet", embedding=Embedding("flip", "last"))
    x = _images()
    expected = (backbone.features(x) + backbone.features(x.flip(3))) / 2
    torch.testing.assert_close(backbone.embedder()(x), expected, rtol=1e-5, atol=1e-6)
    # A left-right symmetric image is its own mirror: the same embedding as without the option.
    symmetric = torch.cat([x[..., :16], x[..., :16].flip(3)], dim=3)
    torch.testing.assert_close(backbone.embedder()(symmetric), backbone.features(symmetric), rtol=1e-5, atol=1e-5)


def test_each_option_is_part_of_the_fingerprint_and_the_plain_one_keeps_todays():
    def fp(embedding: Embedding | None) -> str:
        backbone = build_backbone("test_resnet", embedding=embedding)
        return fingerprint(backbone, backbone.preprocessing, "fp32", True)

    prints = [fp(None), fp(Embedding("flip")), fp(Embedding("none", (-1,))), fp(Embedding("none", (-2, -1)))]
    assert len(set(prints)) == 4
    assert fp(Embedding()) == prints[0]  # stores of the plain embedding keep their fingerprint and cache


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"layers": []}, "list of distinct block indices"),
        ({"layers": [-1, -1]}, "list of distinct block indices"),
        ({"layers": "first"}, "layers"),
        ({"tta": "mirror"}, "tta"),
    ],
)
def test_a_bad_option_is_a_params_error_naming_its_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        parse(ExtractParams, {"backbones": {"test_resnet": entry}}, "extract")


def _params(embedding: Embedding, label: str = "test_resnet") -> ExtractParams:
    layers = embedding.layers if embedding.layers == "last" else list(embedding.layers)
    entry = BackboneParams(image_size=32, tta=embedding.tta, layers=layers)
    return ExtractParams(backbones={label: entry}, batch_size=8, num_workers=0, device="cpu")


def test_a_block_the_network_lacks_is_one_line_naming_the_key(image_folder, tmp_path):
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    with pytest.raises(ConfigError, match=r"extract\.backbones\.test_resnet\.layers: block 40 does not exist"):
        extract(manifest, image_folder, tmp_path / "f.h5", tmp_path / "cache", _params(Embedding("none", (40,))))


@pytest.fixture
def extracted(image_folder, tmp_path) -> dict:
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    store = tmp_path / "features" / "test_resnet.h5"
    result = extract(manifest, image_folder, store, tmp_path / "cache", _params(FLIP_AND_BLOCKS))
    return {"work": tmp_path, "root": image_folder, "manifest": manifest, "store": store, "result": result}


@torch.inference_mode()
def test_the_store_holds_the_embedding_it_says_and_the_cache_keys_it_apart(extracted):
    result, store = extracted["result"], read_store(extracted["store"])
    backbone = build_backbone("test_resnet", embedding=FLIP_AND_BLOCKS)
    assert store.features.shape == (36, backbone.embedding_dim) and backbone.embedding_dim > 96
    assert Embedding.from_spec(store.attrs["embedding"]) == FLIP_AND_BLOCKS
    assert store.attrs["feature_dim"] == backbone.embedding_dim
    record = result.record()
    assert record["embedding"] == "blocks [-2, -1] pooled and concatenated, averaged with the mirror image"
    assert record["extraction_seconds"] > 0  # the extraction cost, reported as for any store
    preprocessing = backbone.preprocessing.with_image_size(32)
    image = Image.open(extracted["root"] / store.paths[5]).convert("RGB")
    expected = backbone.embedder()(preprocessing(image)[None])[0].numpy()
    np.testing.assert_allclose(store.features[5], expected, rtol=1e-5, atol=1e-6)
    # The plain embedding of the same images, on the same cache: its own fingerprint, every image computed, and
    # no `embedding` attribute (stores written before the option are plain).
    plain = extract(
        extracted["manifest"],
        extracted["root"],
        extracted["work"] / "plain.h5",
        extracted["work"] / "cache",
        _params(Embedding()),
    )
    assert plain.computed == 36 and plain.fingerprint != result.fingerprint
    with h5py.File(plain.store) as f:
        assert "embedding" not in f.attrs
    again = extract(
        extracted["manifest"],
        extracted["root"],
        extracted["work"] / "again.h5",
        extracted["work"] / "cache",
        _params(FLIP_AND_BLOCKS),
    )
    assert again.computed == 0 and again.reused == 36


LOGREG = {"logreg": HeadParams(kind="logreg", grid={"C": [1.0]})}


def _test_rows(extracted: dict) -> list:
    return [r for r in read_manifest(extracted["manifest"]).ok_rows() if r.split == "test"]


def test_predict_computes_the_stores_embedding(extracted):
    work, store_path = extracted["work"], extracted["store"]
    train_and_score(store_path, LOGREG, work)
    head = work / "heads" / "test_resnet" / "logreg.h5"
    test = _test_rows(extracted)
    paths = [str(extracted["root"] / r.path) for r in test]
    args = ["predict", "--format", "json", "--num-workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(transfer, [*args, "--head", str(head), "--features", str(store_path), *paths])
    assert result.exit_code == 0, result.stderr
    store = read_store(store_path)
    expected = load_head(head).predict_proba(store.subset("test")[0])
    got = [{t["class"]: t["probability"] for t in p["top"]} for p in json.loads(result.stdout)["predictions"]]
    got = np.array([[row[name] for name in store.classes] for row in got])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)  # predict recomputes the stored embedding


def test_the_onnx_export_computes_the_stores_embedding(extracted):
    work, store_path = extracted["work"], extracted["store"]
    train_and_score(store_path, LOGREG, work)
    run = {"work": work, "root": extracted["root"], "manifest": extracted["manifest"], "store": store_path}
    code, output = run_export(run, work / "out", ["test_resnet-logreg"], LOGREG)
    assert code == 0, output
    parity = json.loads((work / "out" / "export.json").read_text())["test_resnet-logreg"]
    assert parity["images"] == len(_test_rows(extracted)) and parity["top1_disagreements_beyond_ties"] == 0
    assert parity["max_probability_difference"] <= parity["tolerance"]


def test_fine_tuning_refuses_to_start_from_a_head_on_several_blocks(extracted):
    train_and_score(extracted["store"], LOGREG, extracted["work"])
    head = load_head(extracted["work"] / "heads" / "test_resnet" / "logreg.h5")
    tuning = FinetuneParams(init_head="logreg", image_size=32, device="cpu")
    manifest = read_manifest(extracted["manifest"])
    with pytest.raises(FinetuneError, match="init_head to random"):
        initial_layer(build_backbone("test_resnet"), manifest, tuning, head)


def test_a_store_without_the_attribute_is_plain_and_the_attribute_round_trips():
    assert Embedding.from_spec(None) == Embedding() and Embedding().plain
    assert not FLIP_AND_BLOCKS.plain and not Embedding("flip").plain and not Embedding("none", (-1,)).plain
    assert Embedding.from_spec(json.loads(json.dumps(FLIP_AND_BLOCKS.spec()))) == FLIP_AND_BLOCKS
