"""ONNX export: real files run by onnxruntime say what the trained models say; `transfer predict --model` and the
README's deploy example run them without torch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.cli import main as transfer
from pipeline.core.config import ExtractParams, FinetuneParams, HeadParams
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.parsing import parse
from pipeline.data.listing import list_images
from pipeline.data.manifest import read_manifest
from pipeline.data.preprocessing import Preprocessing
from pipeline.features.extraction import extract
from pipeline.features.store import read_attrs, read_store
from pipeline.finetuning.training import finetune
from pipeline.heads.persistence import HeadFile, head_files, save_head
from pipeline.heads.selection import train_head
from pipeline.heads.trained import chosen_head
from pipeline.results.metrics import write_model_metrics
from pipeline.results.scoring import evaluate_head
from pipeline.results.scoring_finetuned import evaluate_finetuned
from pipeline.serving.export import (
    CHOSEN_ON_VAL,
    PARITY_ATOL,
    ExportError,
    ExportParams,
    check_parity,
    chosen_models,
    head_layers,
)
from pipeline.serving.onnx_predict import OnnxModelError, OnnxPredictor, read_metadata
from stages.export import main as export_stage
from tests.conftest import REPO, make_store, prepare_manifest, write_image_folder

HEADS = {
    "logreg": HeadParams(kind="logreg", grid={"C": [0.1, 1.0]}),
    "ridge": HeadParams(kind="ridge", grid={"alpha": [1.0]}),
    "centroid": HeadParams(kind="centroid"),
    "knn": HeadParams(kind="knn", grid={"n_neighbors": [3]}),
}
# Runs a command's click entry point in this process, then reports which heavy modules it imported.
PROBE = """
import importlib, json, runpy, sys
if sys.argv[1] == "--script":
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    importlib.import_module("pipeline.cli").main(sys.argv[1:], standalone_mode=False)
print(json.dumps([m for m in ("torch", "torchvision", "timm", "pipeline.serving.predict") if m in sys.modules]))
"""


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> dict:
    """What `dvc repro` leaves for the export stage, on generated images and the tiny test_resnet: a store, four
    heads and their test metrics, a fine-tuned network and its metrics."""
    work = tmp_path_factory.mktemp("pipeline")
    root = work / "raw"
    write_image_folder(root, {"circle": 12, "square": 12, "triangle": 12})
    manifest = prepare_manifest(root, work / "manifest.csv")
    params = ExtractParams.of("test_resnet", image_size=32, num_workers=0, device="cpu")
    store_path = extract(manifest, root, work / "features" / "test_resnet.h5", work / "cache", params).store
    train_and_score(store_path, HEADS, work)
    tuning = FinetuneParams(epochs=1, init_head="random", augment=False, image_size=32, num_workers=0, device="cpu")
    finetune(manifest, root, "test_resnet", tuning, work / "finetune", work / "ckpt")
    write_model_metrics(
        work / "metrics" / "finetune", evaluate_finetuned(work / "finetune", manifest, root, params=tuning)
    )
    test = [root / r.path for r in read_manifest(manifest).ok_rows() if r.split == "test"]
    return {"work": work, "root": root, "manifest": manifest, "store": store_path, "test": test}


def train_and_score(store: Path, heads: dict[str, HeadParams], work: Path) -> None:
    """What the head@<backbone>-<head> stages write, for the store's backbone (its file name is its label)."""
    label = store.stem
    for name, params in heads.items():
        head = work / "heads" / label / f"{name}.h5"
        save_head(train_head(read_store(store), name, params), head)
        write_model_metrics(work / "metrics" / f"{label}-{name}", evaluate_head(store, head))


def files(run: dict, heads: dict[str, HeadParams] = HEADS) -> dict[str, HeadFile]:
    """Each head of the run by model name, as the export stage finds them."""
    found = head_files(run["store"].parent, run["work"] / "heads", [run["store"].stem], heads)
    return {f.model_name: f for f in found}


def run_export(run: dict, out: Path, models: list[str], heads: dict[str, HeadParams] = HEADS) -> tuple[int, str]:
    """The export stage's command, as dvc.yaml runs it, with `export.models` set to `models`."""
    params = out / "params.yaml"
    out.mkdir(parents=True, exist_ok=True)
    heads = {name: {"kind": h.kind, "grid": h.grid} for name, h in heads.items()}
    backbones = {"backbones": {run["store"].stem: {}}}
    params.write_text(
        yaml.safe_dump({"extract": backbones, "heads": heads, "export": {"models": models, "batch_size": 4}})
    )
    work = run["work"]
    args = ["--features", run["store"].parent, "--heads", work / "heads", "--finetuned", work / "finetune"]
    args += ["--metrics", work / "metrics", "--manifest", run["manifest"], "--data", run["root"]]
    args += ["--out", out / "export", "--parity", out / "export.json", "--params", params]
    result = CliRunner().invoke(export_stage, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def exported(pipeline_run, tmp_path_factory) -> dict:
    """The head chosen on val, logreg (standardised features), centroid (L2-normalised ones) and the fine-tuned
    network, exported by the stage."""
    out = tmp_path_factory.mktemp("exported")
    code, output = run_export(
        pipeline_run, out, [CHOSEN_ON_VAL, "test_resnet-logreg", "test_resnet-centroid", "finetune"]
    )
    assert code == 0, output
    parity = json.loads((out / "export.json").read_text())
    return {**pipeline_run, "out": out / "export", "parity": parity, "chosen": next(iter(parity))}


def test_every_test_image_gets_the_same_class_and_probabilities_within_the_tolerance(exported):
    parity = exported["parity"]
    names = [exported["chosen"], "test_resnet-logreg", "test_resnet-centroid", "finetune"]
    assert list(parity) == list(dict.fromkeys(names))
    for name, record in parity.items():
        assert record["images"] == len(exported["test"]), name
        assert record["top1_agreement"] == 1.0, name
        assert record["max_probability_difference"] <= PARITY_ATOL, name
        assert (exported["out"] / f"{name}.onnx").stat().st_size == record["bytes"]


def test_the_metadata_holds_classes_preprocessing_provenance_and_test_metrics(exported):
    attrs = read_attrs(exported["store"])
    for name in (exported["chosen"], "finetune"):
        meta = read_metadata(exported["out"] / f"{name}.onnx")
        metrics = json.loads((exported["work"] / "metrics" / name / "metrics.json").read_text())
        assert meta["classes"] == ["circle", "square", "triangle"]
        assert meta["preprocessing"] == attrs["preprocessing"]  # resize, crop, interpolation, mean, std
        assert meta["test_metrics"]["accuracy"] == metrics["accuracy"]
        assert meta["test_metrics"]["n_test"] == len(exported["test"]) and meta["backbone"] == "test_resnet"
    assert read_metadata(exported["out"] / f"{exported['chosen']}.onnx")["store_fingerprint"] == attrs["fingerprint"]
    assert read_metadata(exported["out"] / "finetune.onnx")["store_fingerprint"] is None  # trained on images


def test_linear_heads_as_layers_compute_what_scikit_learn_computes():
    """logreg, ridge, linear_svm and centroid (L2 and CL2N: the training mean subtracted first), with three
    classes, two (one logit), and a class absent from training (probability 0): the layers against the fitted
    pipeline, on features of every scale."""
    rng = np.random.default_rng(0)
    for labels, classes in (
        (np.repeat([0, 1, 2], 20), ["a", "b", "c"]),
        (np.repeat([0, 1], 30), ["a", "b"]),
        (np.repeat([0, 2], 30), ["a", "b", "c"]),
    ):
        features = rng.normal(size=(len(labels), 6)) * [1, 10, 0.1, 1, 5, 1] + labels[:, None]
        store = make_store(features, labels, np.tile([0, 0, 0, 1, 2], len(labels) // 5), classes)
        for kind, args in (("logreg", {}), ("ridge", {}), ("linear_svm", {}), ("centroid", {}),
                           ("centroid", {"normalize": "cl2n"})):  # fmt: skip
            head = train_head(store, kind, HeadParams(kind=kind, args=args))
            x = store.features
            with torch.inference_mode():
                got = head_layers(head)(torch.from_numpy(x)).double().numpy()
            np.testing.assert_allclose(got, head.predict_proba(x), atol=1e-6, err_msg=f"{kind}, {classes}")


def test_a_knn_head_is_refused_in_one_line(pipeline_run, tmp_path):
    with pytest.raises(ExportError, match="export.models: test_resnet-knn is a knn head, which is not exported"):
        chosen_models(["test_resnet-knn"], files(pipeline_run))
    code, output = run_export(pipeline_run, tmp_path, ["test_resnet-knn", "finetune"])
    assert code == 1 and "Traceback" not in output and len(output.strip().splitlines()) == 1
    assert "would carry every training embedding" in output and "export a logreg, ridge" in output
    assert not (tmp_path / "export").exists()  # refused before any work


def test_model_names_are_checked_and_the_chosen_head_named_once(pipeline_run):
    heads = files(pipeline_run)
    chosen = chosen_models([CHOSEN_ON_VAL], heads)[0]
    assert chosen_models([CHOSEN_ON_VAL, chosen, "finetune"], heads) == [chosen, "finetune"]
    valid = "valid: chosen_on_val, finetune, finetune-wise, test_resnet-logreg"
    with pytest.raises(ExportError, match=f"unknown model 'logreg'; {valid}"):
        chosen_models(["logreg"], heads)
    with pytest.raises(ConfigError, match="export.models is empty"):
        parse(ExportParams, {"models": []}, "export")
    with pytest.raises(ConfigError, match="unknown key 'export.model'"):
        parse(ExportParams, {"model": ["logreg"]}, "export")
    with pytest.raises(ConfigError, match="export.opset must be >= 18; got 17"):
        parse(ExportParams, {"opset": 17}, "export")
    assert ExportParams().models == [CHOSEN_ON_VAL, "finetune"]


def test_chosen_on_val_passes_over_a_knn_head_that_scored_higher(pipeline_run, tmp_path, caplog):
    run, store = {**pipeline_run, "work": tmp_path}, read_store(pipeline_run["store"])
    heads = files(run)
    for name, params in HEADS.items():
        head = train_head(store, name, params)
        if name == "knn":
            head.val_curve = [{**point, "val_accuracy": 2.0} for point in head.val_curve]  # above any real one
        save_head(head, heads[head.model_name].path)
    linear = chosen_head([heads[f"test_resnet-{name}"].load() for name in ("logreg", "ridge", "centroid")])
    assert chosen_models([CHOSEN_ON_VAL], heads) == [linear.model_name]
    assert "test_resnet-knn scored higher on held-out rows but is a knn head, which is not exported" in caplog.text


def test_a_model_beyond_the_tolerance_is_not_shipped():
    close = {"images": 8, "max_probability_difference": 5e-5, "top1_disagreements": 0, "tolerance": PARITY_ATOL}
    check_parity("logreg", {**close, "top1_disagreements_beyond_ties": 0})
    with pytest.raises(ExportError, match="logreg: the ONNX model disagrees with PyTorch"):
        check_parity("logreg", {**close, "max_probability_difference": 0.01, "top1_disagreements_beyond_ties": 0})
    with pytest.raises(ExportError, match="top class differs on 1 of 8 images"):
        check_parity("logreg", {**close, "top1_disagreements": 1, "top1_disagreements_beyond_ties": 1})


def _predict(*args) -> tuple[int, dict, str]:
    result = CliRunner().invoke(transfer, ["predict", "--format", "json", "--num-workers", "0", *map(str, args)])
    return result.exit_code, (json.loads(result.stdout) if result.exit_code == 0 else {}), result.stderr


def test_predict_with_the_onnx_file_answers_as_predict_with_the_head(exported, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for path in exported["test"]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(exported["test"][0].read_bytes()[:60])
    (folder / "notes.jpg").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    name = exported["chosen"]
    head = ["--head", files(exported)[name].path, "--features", exported["store"], "--device", "cpu"]
    code, want, want_err = _predict(*head, folder)
    assert code == 0, want_err
    code, got, got_err = _predict("--model", exported["out"] / f"{name}.onnx", folder)
    assert code == 0, got_err
    assert got["rejected"] == want["rejected"] and len(got["rejected"]) == 2
    assert [line for line in got_err.splitlines() if line.startswith(("rejected", "predicted"))] == [
        line for line in want_err.splitlines() if line.startswith(("rejected", "predicted"))
    ]
    for g, w in zip(got["predictions"], want["predictions"], strict=True):
        assert g["path"] == w["path"] and [t["class"] for t in g["top"]] == [t["class"] for t in w["top"]]
        for gt, wt in zip(g["top"], w["top"], strict=True):
            assert abs(gt["probability"] - wt["probability"]) <= PARITY_ATOL


def test_predict_with_the_onnx_file_imports_no_torch(exported, tmp_path):
    model = exported["out"] / "finetune.onnx"
    out = tmp_path / "predictions.csv"
    args = ["predict", "--model", str(model), "--top-k", "2", "--output", str(out), *map(str, exported["test"])]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    header, *rows = out.read_text().splitlines()
    assert header == "path,class_1,probability_1,class_2,probability_2" and len(rows) == len(exported["test"])
    assert f"predicted {len(rows)} images, rejected 0" in done.stderr


def test_the_deploy_example_needs_only_onnxruntime_pillow_and_numpy(exported):
    model, image = exported["out"] / "finetune.onnx", exported["test"][0]
    script = REPO / "docs" / "deploy_example.py"
    code_lines = [line for line in script.read_text().split('"""')[2].splitlines() if line.strip()]
    assert len([line for line in code_lines if not line.startswith(("import", "from"))]) <= 11
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "--script", str(script), str(model), str(image)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    answer, modules = done.stdout.strip().splitlines()
    assert json.loads(modules) == []
    name, probability = answer.split()
    _, want, _ = _predict("--model", model, image)
    top = want["predictions"][0]["top"][0]
    assert name == top["class"] and abs(float(probability) - top["probability"]) < 0.01  # torchvision's pixels


def test_a_file_that_is_no_exported_model_is_one_line(pipeline_run, tmp_path):
    garbage = tmp_path / "model.onnx"
    garbage.write_text("not a model")
    code, _, stderr = _predict("--model", garbage, pipeline_run["test"][0])
    assert code == 1 and "not an ONNX model onnxruntime can load" in stderr and "Traceback" not in stderr
    code, _, stderr = _predict("--model", tmp_path / "absent.onnx", "--device", "cuda", pipeline_run["test"][0])
    assert code == 2 and "--model runs on onnxruntime's CPU provider" in stderr
    with pytest.raises(OnnxModelError, match="no such file"):
        OnnxPredictor(tmp_path / "absent.onnx")


@pytest.mark.slow
def test_parity_on_the_hymenoptera_photos_with_the_default_backbone(hymenoptera, tmp_path):
    """Every linear head and a fine-tuned network on EfficientNet-Lite0 at 224 px, on the 153 test photos: the
    numbers PARITY_ATOL is set against (printed; run with -m slow -s)."""
    from pipeline.data.manifest import build_manifest, write_manifest

    manifest = tmp_path / "manifest.csv"
    write_manifest(build_manifest(hymenoptera, 0.15, 0.15, seed=0), manifest)
    features = tmp_path / "features" / "efficientnet_lite0.h5"
    store = extract(manifest, hymenoptera, features, tmp_path / "cache", ExtractParams(device="cpu")).store
    grids = {"logreg": {"C": [0.01, 0.1, 1.0]}, "ridge": {"alpha": [1.0, 100.0]}, "linear_svm": {"C": [1e-4, 1e-2]}}
    heads = {kind: HeadParams(kind=kind, grid=grids.get(kind, {})) for kind in (*grids, "centroid")}
    train_and_score(store, heads, tmp_path)
    tuning = FinetuneParams(epochs=1, init_head="random", augment=False, num_workers=0, device="cpu")
    finetune(manifest, hymenoptera, "efficientnet_lite0", tuning, tmp_path / "finetune", tmp_path / "ckpt")
    scored = evaluate_finetuned(tmp_path / "finetune", manifest, hymenoptera, params=tuning)
    write_model_metrics(tmp_path / "metrics" / "finetune", scored)
    run = {"work": tmp_path, "root": hymenoptera, "manifest": manifest, "store": store}
    code, output = run_export(run, tmp_path / "out", [*files(run, heads), "finetune"], heads)
    assert code == 0, output
    parity = json.loads((tmp_path / "out" / "export.json").read_text())
    for name, record in parity.items():
        print(f"{name}: {record}")
        assert record["images"] == 153 and record["top1_agreement"] == 1.0
        assert record["max_probability_difference"] <= PARITY_ATOL


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos", "hamming", "nearest", "box"])
def test_the_one_resize_and_crop_gives_torchvisions_pixels(interpolation):
    """Preprocessing's Pillow path (every decoder but the JPEG tensor one, the torch-free ONNX predictor included)
    against torchvision's resize then centre crop: the same pixels for filters with hard edges and for crops larger
    than the resized image; smooth filters, resampled only where the crop keeps, within two grey levels."""
    rng = np.random.default_rng(1)
    for (w, h), (resize, crop) in [
        ((37, 23), (20, 16)),
        ((23, 61), (26, 24)),
        ((40, 40), (32, 32)),
        ((30, 20), (16, 18)),
        ((300, 200), (224, 200)),
    ]:
        image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        pre = Preprocessing(resize, crop, interpolation, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        reference = TF.center_crop(TF.resize(image, resize, InterpolationMode(interpolation)), crop)
        expected = np.asarray(reference, dtype=np.int16).transpose(2, 0, 1)
        ours = pre.resize_crop(image)
        np.testing.assert_array_equal(pre.to_uint8(image).numpy(), ours)
        difference = np.abs(ours.astype(np.int16) - expected)
        if interpolation in ("nearest", "box") or crop > resize:
            assert difference.max() == 0
        else:
            assert difference.max() <= 2 and (difference > 0).mean() < 0.05


def test_the_listing_both_predictors_share_skips_hidden_files_and_keeps_broken_links(tmp_path):
    """One torch-free `pipeline.data.listing.list_images` serves `--model` and the torch predictors alike."""
    folder = tmp_path / "photos"
    write_image_folder(folder, {"a": 2, "b": 1})
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.png").write_bytes(b"")
    (folder / "Thumbs.db").write_bytes(b"\0")
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    inputs = [folder, tmp_path / "photos" / "a" / "a_000.png"]
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(inputs)]
    assert names == [
        "photos/a/a_000.png",
        "photos/a/a_001.png",
        "photos/b/b_000.png",
        "photos/dangling.png",
        "photos/a/a_000.png",
    ]
    (tmp_path / "empty").mkdir()
    for missing, message in (([tmp_path / "nope"], "no such file or folder"), ([tmp_path / "empty"], "no image files")):
        with pytest.raises(PipelineError, match=message):
            list_images(missing)
