"""Real photos (../shared/datasets/hymenoptera, ants vs bees): the default backbone's frozen features
are good enough for a logistic head to reach the accuracy reported for this task. Slow: run with -m slow.
"""

import shutil

import pytest
from PIL import Image, ImageEnhance

from pipeline.core.config import BackboneParams, ExtractParams, HeadParams, load_params
from pipeline.data.manifest import build_manifest, write_manifest
from pipeline.features.extraction import extract
from pipeline.features.store import read_store
from pipeline.heads.persistence import save_head
from pipeline.heads.selection import train_head
from pipeline.heads.trained import held_out
from pipeline.results.audit import cross_split_duplicates, duplicate_threshold
from pipeline.results.markdown import ranking_words
from pipeline.results.scoring import evaluate_head
from tests.conftest import REPO


@pytest.mark.slow
def test_logistic_head_on_lite0_features_reaches_093(hymenoptera, tmp_path):
    manifest = build_manifest(hymenoptera, val_fraction=0.15, test_fraction=0.15, seed=0)
    # train/ + val/ folders: the folder's val (153 photos) is the test split, val is carved from train/.
    assert manifest.layout == "train+val"
    assert manifest.counts()["n_test"] == 153
    write_manifest(manifest, tmp_path / "manifest.csv")
    result = extract(
        tmp_path / "manifest.csv", hymenoptera, tmp_path / "lite0.h5", tmp_path / "cache", ExtractParams(device="cpu")
    )
    store = read_store(result.store)
    head = train_head(store, "logreg", HeadParams(kind="logreg", grid={"C": [0.01, 0.1, 1.0]}))
    save_head(head, tmp_path / "logreg.h5")
    metrics = evaluate_head(result.store, tmp_path / "logreg.h5").record
    assert metrics["n_test"] == 153
    assert metrics["accuracy"] >= 0.93


@pytest.mark.slow
def test_the_imagenet_backbone_outranks_random_ones_by_logme_and_by_accuracy(hymenoptera, tmp_path):
    """Four backbones on the photos, as extract.backbones would list them: the offline ImageNet network at its own
    224 px and at 128 px, and the two tiny random networks. LogME (from the train split alone) and the best
    head's held-out accuracy must both put the ImageNet ones first. The figures are printed (-s)."""
    write_manifest(build_manifest(hymenoptera, val_fraction=0.15, test_fraction=0.15, seed=0), tmp_path / "m.csv")
    backbones = {
        "lite0_224": BackboneParams(backbone="efficientnet_lite0", image_size="auto"),
        "lite0_128": BackboneParams(backbone="efficientnet_lite0", image_size=128),
        "random_resnet": BackboneParams(backbone="test_resnet", image_size="auto"),
        "random_effnet": BackboneParams(backbone="test_efficientnet", image_size="auto"),
    }
    params = ExtractParams(backbones=backbones, device="cpu")
    grid = HeadParams(kind="logreg", grid={"C": [0.01, 0.1, 1.0]})
    logme, accuracy = {}, {}
    for label in backbones:
        result = extract(tmp_path / "m.csv", hymenoptera, tmp_path / f"{label}.h5", tmp_path / "cache", params, label)
        head = train_head(read_store(result.store), "logreg", grid)
        logme[label], accuracy[label] = result.logme, held_out(head)["val_accuracy"]
        print(f"{label}: {result.image_size} px, LogME {result.logme:.4f}, held-out accuracy {accuracy[label]:.4f}")
    for imagenet in ("lite0_224", "lite0_128"):
        for random in ("random_resnet", "random_effnet"):
            assert logme[imagenet] > logme[random] and accuracy[imagenet] > accuracy[random]
    print(ranking_words(logme, accuracy))
    assert "Ranked by LogME: lite0_" in ranking_words(logme, accuracy)


@pytest.mark.slow
def test_the_audit_on_untouched_params_names_every_planted_near_copy_of_a_photo(hymenoptera, tmp_path):
    """Issue 27: 8 training photos copied into the test split, each cropped 2-8% (per side), 5-10% brighter and
    re-encoded as JPEG at quality 60-90, all at once. The repository's params.yaml as it is (duplicate_threshold:
    auto), prepare's manifest and the extract stage's code: the audit pairs every copy with its original and lists
    at most 4 other pairs. The threshold and its reason are printed (-s)."""
    root = tmp_path / "raw"
    shutil.copytree(hymenoptera, root)
    originals = sorted((root / "train").rglob("*.jpg"))[::30][:8]
    planted = set()
    for k, original in enumerate(originals):
        with Image.open(original) as img:
            img = img.convert("RGB")
        w, h = img.size
        cut_w, cut_h = round(w * (0.02 + 0.06 * k / 7)), round(h * (0.08 - 0.06 * k / 7))
        img = img.crop((cut_w // 2, cut_h // 2, w - (cut_w - cut_w // 2), h - (cut_h - cut_h // 2)))
        img = ImageEnhance.Brightness(img).enhance(1.05 + 0.05 * k / 7)
        copy = root / "val" / original.parent.name / f"copy_{original.name}"  # the folder's val: the test split
        img.save(copy, "JPEG", quality=60 + 30 * k // 7)
        planted.add((str(original.relative_to(root)), str(copy.relative_to(root))))
    params = load_params(REPO / "params.yaml")
    assert params.audit.duplicate_threshold == "auto"
    p = params.prepare
    manifest = build_manifest(root, p.val_fraction, p.test_fraction, p.seed, num_workers=p.num_workers,
                              on_cross_split_duplicate=p.on_cross_split_duplicate)  # fmt: skip
    write_manifest(manifest, tmp_path / "manifest.csv")
    result = extract(tmp_path / "manifest.csv", root, tmp_path / "store.h5", tmp_path / "cache", params.extract)
    store = read_store(result.store)
    threshold, why = duplicate_threshold(store, params.audit.duplicate_threshold, params.audit.seed, "cpu")
    pairs = cross_split_duplicates(store, threshold, "cpu")
    print(f"duplicate_threshold {threshold} ({why})")
    for pair in pairs:
        print(f"  {pair.similarity:.3f} {pair.path_a} ({pair.split_a}) ~ {pair.path_b} ({pair.split_b})")
    found = {(pair.path_a, pair.path_b) for pair in pairs}
    assert why.startswith("auto: ") and planted <= found
    # Distinct photos whose nearest one in an earlier split is about as close as the closest 1% of training photos'
    # nearest neighbours (4 here, at cosines 0.79-0.80: similar scenes).
    assert len(found - planted) <= 4
