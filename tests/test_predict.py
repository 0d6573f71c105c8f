"""`transfer predict`: the same answers as evaluate on the test split; bad files listed, the rest predicted."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ExtractParams, FinetuneParams, HeadParams
from pipeline.dataset import build_manifest, read_manifest, write_manifest
from pipeline.evaluate import evaluate_finetuned, evaluate_head
from pipeline.extract import extract
from pipeline.finetune import finetune
from pipeline.heads import load_head, save_head, train_head
from pipeline.store import read_store


@pytest.fixture
def trained(image_folder: Path, tmp_path: Path) -> dict:
    manifest = tmp_path / "manifest.csv"
    write_manifest(build_manifest(image_folder, 0.2, 0.2, seed=0), manifest)
    params = ExtractParams(backbone="test_resnet", image_size=32, num_workers=0, device="cpu")
    store = extract(manifest, image_folder, tmp_path / "features.h5", tmp_path / "cache", params).store
    save_head(train_head(read_store(store), "logreg", HeadParams(grid={"C": [1.0]})), tmp_path / "logreg.h5")
    test = [image_folder / r.path for r in read_manifest(manifest).ok_rows() if r.split == "test"]
    return {"root": image_folder, "manifest": manifest, "store": store, "head": tmp_path / "logreg.h5", "test": test}


def _predict(*args: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["predict", "--format", "json", "--num-workers", "0", *args])
    payload = json.loads(result.stdout) if result.exit_code == 0 else {}
    return result.exit_code, payload, result.stderr


def test_head_predictions_agree_with_evaluate_on_the_test_split(trained):
    _, records = evaluate_head(trained["store"], trained["head"])
    code, payload, _ = _predict(
        "--head", str(trained["head"]), "--features", str(trained["store"]), *map(str, trained["test"])
    )
    assert code == 0
    assert [p["top"][0]["class"] for p in payload["predictions"]] == [r["predicted"] for r in records]
    store = read_store(trained["store"])
    expected = load_head(trained["head"]).predict_proba(store.subset("test")[0])
    got = [{t["class"]: t["probability"] for t in p["top"]} for p in payload["predictions"]]
    for row, probabilities in zip(expected, got, strict=True):
        for name, value in probabilities.items():
            assert value == pytest.approx(row[store.classes.index(name)], abs=1e-5)


def test_corrupt_files_are_listed_and_the_rest_predicted(trained, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for path in trained["test"][:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(trained["test"][0].read_bytes()[:60])
    (folder / "notes.jpg").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    code, payload, stderr = _predict("--head", str(trained["head"]), "--features", str(trained["store"]), str(folder))
    assert code == 0
    assert len(payload["predictions"]) == 3 and all(len(p["top"]) == 3 for p in payload["predictions"])
    reasons = {Path(r["path"]).name: r["reason"] for r in payload["rejected"]}
    assert reasons == {"broken.png": "corrupt", "notes.jpg": "not_an_image"}
    assert "rejected" in stderr and "predicted 3 images, rejected 2" in stderr


def test_csv_output_has_top_k_columns(trained, tmp_path):
    out = tmp_path / "predictions.csv"
    args = ["predict", "--head", str(trained["head"]), "--features", str(trained["store"]), "--top-k", "2"]
    result = CliRunner().invoke(main, [*args, "--num-workers", "0", "--output", str(out), str(trained["test"][0])])
    assert result.exit_code == 0, result.output
    header, row = out.read_text().splitlines()
    assert header == "path,class_1,probability_1,class_2,probability_2"
    assert float(row.split(",")[2]) >= float(row.split(",")[4])


def test_finetuned_predictions_agree_with_evaluate(trained, tmp_path):
    params = replace(
        FinetuneParams(), epochs=1, init_head="random", augment=False, image_size=32, num_workers=0, device="cpu"
    )
    finetune(trained["manifest"], trained["root"], "test_resnet", params, tmp_path / "ft", tmp_path / "ckpt")
    scores, records = evaluate_finetuned(tmp_path / "ft", trained["manifest"], trained["root"], num_workers=0)
    code, payload, _ = _predict("--finetuned", str(tmp_path / "ft"), *map(str, trained["test"]))
    assert code == 0
    assert [p["top"][0]["class"] for p in payload["predictions"]] == [r["predicted"] for r in records]
    assert np.isclose(sum(t["probability"] for t in payload["predictions"][0]["top"]), 1.0)


def test_mixing_model_options_is_a_usage_error(trained):
    result = CliRunner().invoke(main, ["predict", "--head", str(trained["head"]), str(trained["test"][0])])
    assert result.exit_code == 2 and "give either --head with --features, or --finetuned" in result.output
    missing = CliRunner().invoke(main, ["predict", "--finetuned", str(trained["root"]), "nope.png"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
