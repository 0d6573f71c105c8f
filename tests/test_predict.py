"""`transfer predict`: the same answers as evaluate on the test split; bad files listed, the rest predicted."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ExtractParams, FinetuneParams, HeadParams
from pipeline.dataset import read_manifest
from pipeline.evaluate import evaluate_head
from pipeline.evaluate_finetune import evaluate_finetuned
from pipeline.extract import extract
from pipeline.finetune import finetune
from pipeline.heads import load_head, save_head
from pipeline.selection import train_head
from pipeline.store import read_store
from tests.conftest import prepare_manifest


@pytest.fixture
def trained(image_folder: Path, tmp_path: Path) -> dict:
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
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
    _, _, predicted = evaluate_head(trained["store"], trained["head"])
    code, payload, _ = _predict(
        "--head", str(trained["head"]), "--features", str(trained["store"]), *map(str, trained["test"])
    )
    assert code == 0
    assert [p["top"][0]["class"] for p in payload["predictions"]] == predicted
    store = read_store(trained["store"])
    expected = load_head(trained["head"]).predict_proba(store.subset("test")[0])
    got = [{t["class"]: t["probability"] for t in p["top"]} for p in payload["predictions"]]
    for row, probabilities in zip(expected, got, strict=True):
        for name, value in probabilities.items():  # the stored embedding, bit for bit: the same probabilities
            assert value == row[store.classes.index(name)]


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
    _, _, predicted = evaluate_finetuned(tmp_path / "ft", trained["manifest"], trained["root"], params=params)
    code, payload, _ = _predict("--finetuned", str(tmp_path / "ft"), *map(str, trained["test"]))
    assert code == 0
    assert [p["top"][0]["class"] for p in payload["predictions"]] == predicted
    assert np.isclose(sum(t["probability"] for t in payload["predictions"][0]["top"]), 1.0)


def test_mixing_model_options_is_a_usage_error(trained):
    result = CliRunner().invoke(main, ["predict", "--head", str(trained["head"]), str(trained["test"][0])])
    assert result.exit_code == 2 and "give either --head with --features, or --finetuned" in result.output
    missing = CliRunner().invoke(main, ["predict", "--finetuned", str(trained["root"]), "nope.png"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output


@pytest.mark.parametrize("where", ["../photos", ".hidden/photos"])
def test_folders_given_by_a_relative_or_dotted_path_are_predicted(trained, tmp_path, monkeypatch, where):
    """Hidden files are skipped inside the folder given, wherever that folder lies."""
    folder = tmp_path / where.removeprefix("../")
    folder.mkdir(parents=True)
    for path in trained["test"][:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / ".DS_Store").write_bytes(b"\0")
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd if where.startswith("..") else tmp_path)
    code, payload, stderr = _predict("--head", str(trained["head"]), "--features", str(trained["store"]), where)
    assert code == 0, stderr
    assert sorted(Path(p["path"]).name for p in payload["predictions"]) == sorted(p.name for p in trained["test"][:2])
    assert payload["rejected"] == []


def test_a_folder_without_images_is_an_error_not_zero_predictions(trained, tmp_path):
    empty = tmp_path / "empty"
    (empty / ".thumbnails").mkdir(parents=True)
    (empty / ".thumbnails" / "a.png").write_bytes(trained["test"][0].read_bytes())
    code, _, stderr = _predict("--head", str(trained["head"]), "--features", str(trained["store"]), str(empty))
    assert code == 1
    assert "no image files in this folder" in stderr and "Traceback" not in stderr


def test_files_of_which_none_is_an_image_are_an_error(trained, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    out = tmp_path / "predictions.csv"
    code, _, stderr = _predict(
        "--head",
        str(trained["head"]),
        "--features",
        str(trained["store"]),
        "--output",
        str(out),
        str(tmp_path / "notes.jpg"),
    )
    assert not out.exists()  # no file that looks like an answer
    assert code == 1 and "rejected" in stderr
    assert "none of the 1 files given could be read as an image" in stderr and "Traceback" not in stderr
