"""Real photos (../shared/datasets/hymenoptera, ants vs bees): the default backbone's frozen features
are good enough for a logistic head to reach the accuracy reported for this task. Slow: run with -m slow.
"""

import pytest

from pipeline.config import ExtractParams, HeadParams
from pipeline.dataset import build_manifest, write_manifest
from pipeline.evaluate import evaluate_head
from pipeline.extract import extract
from pipeline.heads import save_head
from pipeline.selection import train_head
from pipeline.store import read_store


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
