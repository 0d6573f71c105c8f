"""Real photos (../shared/datasets/hymenoptera, ants vs bees): the default backbone's frozen features
are good enough for a logistic head to reach the accuracy reported for this task. Slow: run with -m slow.
"""

import pytest

from pipeline.core.config import BackboneParams, ExtractParams, HeadParams
from pipeline.data.manifest import build_manifest, write_manifest
from pipeline.features.extraction import extract
from pipeline.features.store import read_store
from pipeline.heads.persistence import save_head
from pipeline.heads.selection import train_head
from pipeline.heads.trained import held_out
from pipeline.results.markdown import ranking_words
from pipeline.results.scoring import evaluate_head


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
