"""`transfer predict`: the same answers as evaluate on the test split; bad files listed, the rest predicted."""

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.core.config import ExtractParams, FinetuneParams, HeadParams
from pipeline.data.listing import list_images
from pipeline.data.manifest import read_manifest
from pipeline.features.extraction import extract
from pipeline.features.hdf5 import load_arrays, save_arrays
from pipeline.features.store import read_store
from pipeline.finetuning.training import finetune
from pipeline.heads.persistence import load_head, save_head
from pipeline.heads.selection import train_head
from pipeline.results.scoring import evaluate_head
from pipeline.results.scoring_finetuned import evaluate_finetuned
from tests.conftest import prepare_manifest


def _train(root: Path, tmp_path: Path, params: ExtractParams) -> dict:
    """Extract `root` with `params`, then train a logistic head on the store."""
    manifest = prepare_manifest(root, tmp_path / "manifest.csv")
    store = extract(manifest, root, tmp_path / "features.h5", tmp_path / "cache", params).store
    save_head(train_head(read_store(store), "logreg", HeadParams(grid={"C": [1.0]})), tmp_path / "logreg.h5")
    test = [root / r.path for r in read_manifest(manifest).ok_rows() if r.split == "test"]
    return {"root": root, "manifest": manifest, "store": store, "head": tmp_path / "logreg.h5", "test": test}


@pytest.fixture
def trained(image_folder: Path, tmp_path: Path) -> dict:
    return _train(image_folder, tmp_path, ExtractParams.of("test_resnet", image_size=32, num_workers=0, device="cpu"))


def _predict(*args: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, ["predict", "--format", "json", "--num-workers", "0", *args])
    payload = json.loads(result.stdout) if result.exit_code == 0 else {}
    return result.exit_code, payload, result.stderr


# Under bf16 autocast (`precision: auto` on CUDA) predict recomputes each embedding in other batches than
# extract did, with other kernels: the last bits differ. Agreement then means every probability within
# BF16_ATOL of evaluate's (bf16 against fp32 on 120 hymenoptera photos with efficientnet_lite0 differed by at
# most 0.012), and the same top class wherever evaluate's top two are more than 2 * BF16_ATOL apart (closer
# than that, they may swap within the tolerance).
BF16_ATOL = 0.02


def disagreements(expected: np.ndarray, got: np.ndarray, atol: float = BF16_ATOL) -> list[str]:
    """Where predict's class probabilities `got` (one row per image) do not agree with evaluate's `expected`
    under bf16; empty when they agree."""
    problems = []
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        drift = np.abs(e - g).max()
        if drift > atol:
            problems.append(f"image {i}: a probability differs by {drift:.3g} > {atol}")
        second, first = np.sort(e)[-2:]
        if first - second > 2 * atol and e.argmax() != g.argmax():
            problems.append(
                f"image {i}: top class {g.argmax()}, evaluate's {e.argmax()} by a margin of {first - second:.3g}"
            )
    return problems


def test_the_bf16_agreement_rule_lets_only_near_ties_swap():
    expected = np.array([[0.70, 0.20, 0.10], [0.41, 0.40, 0.19]])
    # Every probability within 0.02; the second image's top two, 0.01 apart, swap.
    assert disagreements(expected, expected + [[-0.015, 0.01, 0.005], [-0.012, 0.012, 0.0]]) == []
    # The first image's top two, 0.5 apart, swap: it is reported for both reasons; the second image agrees.
    swapped = np.array([[0.20, 0.70, 0.10], [0.41, 0.40, 0.19]])
    assert disagreements(expected, swapped) == [
        "image 0: a probability differs by 0.5 > 0.02",
        "image 0: top class 1, evaluate's 0 by a margin of 0.5",
    ]
    # The top class kept, but a probability drifted past the tolerance.
    assert disagreements(expected, expected + [[0.0, 0.03, -0.03], [0.0, 0.0, 0.0]]) == [
        "image 0: a probability differs by 0.03 > 0.02"
    ]


@pytest.mark.parametrize(
    "device, precision",
    [
        ("cpu", "fp32"),
        ("cpu", "bf16"),
        pytest.param("cuda", "auto", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    ],
)
def test_head_predictions_agree_with_evaluate_on_the_test_split(image_folder, tmp_path, device, precision):
    """Extract and predict run on the same device at the store's precision. On the CPU in fp32, predict
    recomputes each stored embedding to float32 rounding (bit for bit with extract's batches and thread count; with
    one thread per test worker, oneDNN sums a batch of other images in another order): the same classes as
    evaluate, probabilities within 1e-6. Under bf16
    (on CUDA `auto` means bf16; on the CPU it checks the same rule here), they agree as `disagreements` says."""
    params = ExtractParams.of("test_resnet", image_size=32, num_workers=0, device=device, precision=precision)
    trained = _train(image_folder, tmp_path, params)
    predicted = evaluate_head(trained["store"], trained["head"]).predicted
    model = ["--head", str(trained["head"]), "--features", str(trained["store"])]
    code, payload, stderr = _predict("--device", device, *model, *map(str, trained["test"]))
    assert code == 0, stderr
    store = read_store(trained["store"])
    expected = load_head(trained["head"]).predict_proba(store.subset("test")[0])
    top = [{t["class"]: t["probability"] for t in p["top"]} for p in payload["predictions"]]
    got = np.array([[probabilities[name] for name in store.classes] for probabilities in top])
    if (device, precision) == ("cpu", "fp32"):
        assert [p["top"][0]["class"] for p in payload["predictions"]] == predicted
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)  # the stored embedding, to float32 rounding
    else:
        assert [store.classes[i] for i in expected.argmax(1)] == predicted  # evaluate's classes, from `expected`
        assert disagreements(expected, got) == []


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
    predicted = evaluate_finetuned(tmp_path / "ft", trained["manifest"], trained["root"], params=params).predicted
    # Evaluated on the CPU above, so predicted on it too: the top classes are compared exactly.
    code, payload, _ = _predict("--device", "cpu", "--finetuned", str(tmp_path / "ft"), *map(str, trained["test"]))
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


def _one_line_error(code: int, stderr: str) -> str:
    lines = stderr.rstrip("\n").splitlines()
    assert code == 1 and "Traceback" not in stderr
    assert lines[-1].startswith("Error: ") and not any(line.startswith("Error: ") for line in lines[:-1])
    return lines[-1]


def test_a_head_whose_class_list_was_reversed_is_refused(trained):
    """Before: the head's own (reversed) names labelled every image, a 3 as a 6, exit 0."""
    arrays, attrs = load_arrays(trained["head"])
    save_arrays(trained["head"], arrays, {**attrs, "classes": attrs["classes"][::-1]})
    model = ["--head", str(trained["head"]), "--features", str(trained["store"])]
    message = _one_line_error(*_predict(*model, str(trained["test"][0]))[::2])
    assert "['triangle', 'square', 'circle']" in message and "['circle', 'square', 'triangle']" in message


def test_a_head_with_nan_coefficients_is_refused(trained):
    """Before: every probability printed as nan, exit 0."""
    arrays, attrs = load_arrays(trained["head"])
    arrays["clf.coef_"][0, 0] = np.nan
    save_arrays(trained["head"], arrays, attrs)
    model = ["--head", str(trained["head"]), "--features", str(trained["store"])]
    message = _one_line_error(*_predict(*model, str(trained["test"][0]))[::2])
    assert "clf.coef_ holds 1 non-finite value" in message and "rerun the head stage" in message


def test_special_files_in_a_folder_are_listed_as_rejected_not_skipped(trained, tmp_path):
    """Before: a FIFO or a socket in a folder was left out silently; now each comes back with its reason."""
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "photo.png").write_bytes(trained["test"][0].read_bytes())
    os.mkfifo(folder / "pipe.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.png"))
    try:
        assert [p.name for p in list_images([folder])] == ["photo.png", "pipe.png", "sock.png"]
        model = ["--head", str(trained["head"]), "--features", str(trained["store"])]
        code, payload, stderr = _predict(*model, str(folder))
    finally:
        server.close()
    assert code == 0, stderr
    assert [Path(p["path"]).name for p in payload["predictions"]] == ["photo.png"]
    assert sorted(Path(r["path"]).name for r in payload["rejected"]) == ["pipe.png", "sock.png"]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_a_file_name_that_is_not_utf8_is_predicted_and_written_escaped(trained, tmp_path, fmt):
    """Before: predict crashed on `bad\\xffname.png` and left a 0-byte output file."""
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / os.fsdecode(b"bad\xffname.png")).write_bytes(trained["test"][0].read_bytes())
    (folder / os.fsdecode(b"broken\xfe.png")).write_bytes(b"not an image")
    out = tmp_path / f"predictions.{fmt}"
    runner = CliRunner()
    args = ["predict", "--head", str(trained["head"]), "--features", str(trained["store"]), "--device", "cpu"]
    result = runner.invoke(main, [*args, "--format", fmt, "--output", str(out), str(folder)])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert "bad\\xffname.png" in text.replace("\\\\", "\\")
    assert "rejected" in result.stderr and "broken\\xfe.png" in result.stderr
