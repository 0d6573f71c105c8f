"""WiSE-FT (the finetune_wise stage): alpha 0 is the network fine-tuning started from and alpha 1 the fine-tuned one,
each alpha is scored on the val split alone, the best is kept, and the model is scored, predicted and exported as
the fine-tuned one is."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline.cli import main as transfer
from pipeline.core.config import EvaluateParams, ExtractParams, FinetuneParams, FinetuneWiseParams, HeadParams
from pipeline.core.device import Runtime
from pipeline.core.errors import ConfigError
from pipeline.core.parsing import parse
from pipeline.data.loading import Images, image_batches, predict_proba
from pipeline.data.manifest import Manifest, read_manifest, write_manifest
from pipeline.features.backbones import build_backbone
from pipeline.features.extraction import extract
from pipeline.features.store import read_store
from pipeline.finetuning.model import Classifier, FinetuneError, load_finetuned, predict_test_split
from pipeline.finetuning.training import finetune
from pipeline.finetuning.wise import CurvePoint, check_pair, choose, interpolate, starting_network, wise_finetune
from pipeline.heads.curves import learning_curve
from pipeline.heads.persistence import HeadFile, save_head
from pipeline.heads.selection import train_head
from pipeline.results.answers import Answers
from pipeline.results.few_shot import summarised
from pipeline.results.metrics import write_model_metrics
from pipeline.results.model_rows import FINETUNE_WISE, finetune_row
from pipeline.results.report import build_report
from pipeline.results.scoring import score_head, train_accuracy
from pipeline.results.scoring_finetuned import evaluate_finetuned
from pipeline.serving.export import PARITY_ATOL, ExportError, Inputs, chosen_models, export_models
from pipeline.serving.onnx_predict import read_metadata
from stages.finetune_wise import main as wise_stage
from tests.conftest import prepare_manifest, write_image_folder

BACKBONE, DIM = "test_resnet", 96  # tiny, random weights, 5 blocks
# On the CPU, so that the end points are compared bit for bit (tests/conftest.py says why not `device: auto`).
FAST = FinetuneParams(unfreeze=2, epochs=2, lr=0.1, batch_size=8, init_head="random", augment=False, image_size=32)
FAST = replace(FAST, num_workers=0, device="cpu", early_stopping_patience=0, warmup_epochs=0)
ALPHAS = FinetuneWiseParams().alphas


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A start worth keeping and a fine-tuning that spoils it: the starting layer is a new layer trained alone on the
    frozen features (unfreeze 0), then fine-tuning trains the last blocks on train labels rotated a -> b -> c -> a.
    Val and test keep their true labels, so the val curve falls from alpha 0 towards alpha 1."""
    work = tmp_path_factory.mktemp("wise")
    root = work / "raw"
    write_image_folder(root, {"a": 15, "b": 15, "c": 15})
    manifest = prepare_manifest(root, work / "manifest.csv")
    probe = replace(FAST, unfreeze=0, epochs=2)
    finetune(manifest, root, BACKBONE, probe, work / "probe", work / "ckpt")
    probed = load_file(work / "probe" / "model.safetensors")
    layer = {k.removeprefix("head."): v for k, v in probed.items() if k.startswith("head.")}
    m = read_manifest(manifest)
    rotate = {"a": "b", "b": "c", "c": "a"}
    rows = [replace(r, class_name=rotate[r.class_name]) if r.split == "train" else r for r in m.rows]
    write_manifest(Manifest(rows, m.layout, m.skipped), work / "rotated.csv")
    finetune(work / "rotated.csv", root, BACKBONE, FAST, work / "finetune", work / "ckpt", initial=layer)
    save_file(layer, work / "layer.safetensors")
    return {"work": work, "root": root, "manifest": manifest, "layer": layer, "tuned": work / "finetune"}


def _wise(run: dict, out: Path, alphas=ALPHAS, manifest: Path | None = None, **kw):
    kw = {"backbone_name": BACKBONE, **kw}
    layer = kw.pop("layer", run["layer"])
    return wise_finetune(run["tuned"], layer, manifest or run["manifest"], run["root"], out, alphas, FAST, **kw)


def _test_proba(network: torch.nn.Module, run: dict) -> np.ndarray:
    """A network's probabilities on the test split, run as evaluate_finetune runs the fine-tuned one."""
    _, _, preprocessing = load_finetuned(run["tuned"])
    rows = [r for r in read_manifest(run["manifest"]).ok_rows() if r.split == "test"]
    images = Images.of_rows(run["root"], rows, preprocessing.to_uint8)
    runtime = Runtime.resolve("cpu", "fp32", option="test")
    return predict_proba(network, image_batches(images, 8, 0, runtime.device), runtime, preprocessing.normalize)


def test_alpha_0_is_the_starting_network_and_alpha_1_the_fine_tuned_one(run, tmp_path):
    backbone = build_backbone(BACKBONE)
    start = Classifier(backbone.features, backbone.feature_dim, 3)
    start.head.load_state_dict(run["layer"])  # the pre-trained backbone + the layer fine-tuning started from
    tuned = load_file(run["tuned"] / "model.safetensors")
    for alpha, want in ((0.0, start.state_dict()), (1.0, tuned)):
        _wise(run, tmp_path / str(alpha), alphas=[alpha])
        got = load_file(tmp_path / str(alpha) / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), alpha
    start_answers = predict_test_split(tmp_path / "0.0", run["manifest"], run["root"], FAST).proba
    np.testing.assert_array_equal(start_answers, _test_proba(start, run))
    tuned_answers = predict_test_split(run["tuned"], run["manifest"], run["root"], FAST).proba
    end_answers = predict_test_split(tmp_path / "1.0", run["manifest"], run["root"], FAST).proba
    np.testing.assert_array_equal(end_answers, tuned_answers)
    assert not np.array_equal(start_answers, tuned_answers)  # two different networks: the check can fail


def test_interpolate_mixes_floating_tensors_and_keeps_the_fine_tuned_batch_count():
    start = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(5)}
    tuned = {"w": torch.tensor([1.0, 4.0]), "n": torch.tensor(9)}
    mixed = interpolate(start, tuned, 0.25)
    assert torch.allclose(mixed["w"], torch.tensor([0.25, 2.5])) and mixed["n"].item() == 9
    with pytest.raises(FinetuneError, match=r"w is \(2,\) torch.float32 at the start but \(3,\)"):
        interpolate(start, {**tuned, "w": torch.zeros(3)}, 0.5)


def test_the_chosen_alpha_is_the_best_on_val_computed_by_hand(run, tmp_path):
    result = _wise(run, tmp_path / "wise")
    assert [p.alpha for p in result.curve] == ALPHAS
    backbone = build_backbone(BACKBONE)
    start = starting_network(backbone, run["layer"], 3).state_dict()
    tuned, _, preprocessing = load_finetuned(run["tuned"])
    theta_1 = {k: v.clone() for k, v in tuned.state_dict().items()}
    m = read_manifest(run["manifest"])
    rows = [r for r in m.ok_rows() if r.split == "val"]
    labels = np.array([m.classes.index(r.class_name) for r in rows])
    runtime = Runtime.resolve("cpu", "fp32", option="test")
    for point in result.curve:  # each alpha's network built by hand and run on the val images
        a = point.alpha
        by_hand = {k: (1 - a) * start[k] + a * v if v.is_floating_point() else v for k, v in theta_1.items()}
        tuned.load_state_dict(by_hand)
        batches = image_batches(Images.of_rows(run["root"], rows, preprocessing.to_uint8), 8, 0, runtime.device)
        proba = predict_proba(tuned, batches, runtime, preprocessing.normalize)
        assert point.val_accuracy == pytest.approx(float((proba.argmax(1) == labels).mean()))
        assert point.val_log_loss == pytest.approx(-np.log(proba[np.arange(len(labels)), labels]).mean(), rel=1e-4)
    best = max(p.val_accuracy for p in result.curve)
    assert result.alpha < 1.0 and result.curve[ALPHAS.index(result.alpha)].val_accuracy == best
    assert best > result.curve[-1].val_accuracy  # fine-tuning spoilt the start, and WiSE-FT finds it out
    config = json.loads((tmp_path / "wise" / "config.json").read_text())
    assert config["wise"]["alpha"] == result.alpha and len(config["wise"]["curve"]) == len(ALPHAS)


def test_ties_go_to_the_lower_val_log_loss_then_the_larger_alpha():
    curve = [CurvePoint(0.0, 0.9, 0.3), CurvePoint(0.5, 0.9, 0.2), CurvePoint(0.6, 0.9, 0.2), CurvePoint(1.0, 0.8, 0.1)]
    assert choose(curve).alpha == 0.6
    assert choose([*curve, CurvePoint(0.7, 0.9, 0.19)]).alpha == 0.7
    assert choose([*curve, CurvePoint(0.1, 0.95, 0.9)]).alpha == 0.1  # accuracy first


def test_the_test_split_plays_no_part_in_the_choice(run, tmp_path):
    """Test images replaced by noise and their labels rotated: the same curve, alpha and weights."""
    first = _wise(run, tmp_path / "first")
    root = tmp_path / "raw"
    shutil.copytree(run["root"], root)
    m = read_manifest(run["manifest"])
    rng = np.random.default_rng(0)
    rotate = {"a": "c", "b": "a", "c": "b"}
    for r in m.rows:
        if r.split == "test":
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / r.path)
    rows = [replace(r, class_name=rotate[r.class_name]) if r.split == "test" else r for r in m.rows]
    write_manifest(Manifest(rows, m.layout, m.skipped), tmp_path / "manifest.csv")
    second = _wise({**run, "root": root}, tmp_path / "second", manifest=tmp_path / "manifest.csv")
    assert (second.alpha, second.curve) == (first.alpha, first.curve)
    a, b = load_file(first.model_path), load_file(second.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... whereas other val labels change the curve: the comparison above could fail.
    rows = [replace(r, class_name=rotate[r.class_name]) if r.split == "val" else r for r in m.rows]
    write_manifest(Manifest(rows, m.layout, m.skipped), tmp_path / "val.csv")
    assert _wise(run, tmp_path / "third", manifest=tmp_path / "val.csv").curve != first.curve


def test_a_mismatched_pair_is_refused_in_one_line(run, tmp_path):
    other = {"weight": torch.zeros(3, 256), "bias": torch.zeros(3)}  # a layer that fits test_efficientnet
    with pytest.raises(FinetuneError, match="fine-tuned from test_resnet, but finetune.backbone's network is test_eff"):
        _wise(run, tmp_path / "a", backbone_name="test_efficientnet", layer=other)
    with pytest.raises(FinetuneError, match="the warm_start layer does not fit test_resnet and 3 classes"):
        _wise(run, tmp_path / "b", layer={"weight": torch.zeros(2, DIM), "bias": torch.zeros(2)})
    backbone = build_backbone(BACKBONE)
    start = starting_network(backbone, run["layer"], 3)
    tuned, config, _ = load_finetuned(run["tuned"])
    check_pair(start, tuned.state_dict(), backbone, config, ["a", "b", "c"], run["tuned"])  # the real pair passes
    with pytest.raises(FinetuneError, match=r"the manifest has \['a', 'b', 'd'\]"):
        check_pair(start, tuned.state_dict(), backbone, config, ["a", "b", "d"], run["tuned"])
    with torch.no_grad():
        next(backbone.blocks()[0].parameters()).add_(1.0)  # other pre-trained weights than fine-tuning started from
    with pytest.raises(FinetuneError, match="lies in a block fine-tuning kept frozen, yet differs"):
        check_pair(start, tuned.state_dict(), backbone, config, ["a", "b", "c"], run["tuned"])
    _wise(run, tmp_path / "wise", alphas=[0.5])
    with pytest.raises(FinetuneError, match="holds WiSE-FT weights already"):
        _wise({**run, "tuned": tmp_path / "wise"}, tmp_path / "c", alphas=[0.5])


def test_alphas_outside_zero_to_one_or_repeated_are_params_errors():
    assert FinetuneWiseParams().alphas == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for alphas, message in (([1.5], r"must lie in \[0, 1\]"), ([], "is empty"), ([0.5, 0.5], "names an alpha twice")):
        with pytest.raises(ConfigError, match=f"finetune_wise.alphas {message}"):
            parse(FinetuneWiseParams, {"alphas": alphas}, "finetune_wise")


def _params(work: Path, alphas: str = "[0.0, 0.5, 1.0]") -> Path:
    params = work / f"params-{len(list(work.glob('params*')))}.yaml"
    params.write_text(
        f"extract:\n  backbones:\n    {BACKBONE}:\n      image_size: 32\nfinetune:\n  backbone: {BACKBONE}\n"
        "  batch_size: 8\n  num_workers: 0\n  device: cpu\n"
        f"finetune_wise:\n  alphas: {alphas}\nevaluate:\n  bootstrap_resamples: 100\n"
    )
    return params


def _stage(run: dict, work: Path, params: Path, finetuned: Path | None = None):
    args = ["--finetuned", finetuned or run["tuned"], "--init", run["work"] / "layer.safetensors"]
    args += ["--manifest", run["manifest"], "--data", run["root"], "--out", work / "finetune_wise"]
    args += ["--curve", work / "curve.json", "--metrics", work / "metrics" / FINETUNE_WISE, "--params", params]
    return CliRunner().invoke(wise_stage, [str(a) for a in args])


def test_the_stage_writes_the_model_the_curve_and_the_metrics_and_predict_reads_it(run, tmp_path):
    result = _stage(run, tmp_path, _params(tmp_path))
    assert result.exit_code == 0, result.output
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [p["alpha"] for p in curve] == [0.0, 0.5, 1.0]
    assert set(curve[0]) == {"alpha", "val_accuracy", "val_log_loss"}
    folder = tmp_path / "metrics" / FINETUNE_WISE
    details = json.loads((folder / "details.json").read_text())
    assert details["model"] == FINETUNE_WISE and details["wise"]["curve"] == curve
    assert details["hyperparameters"]["wise_alpha"] == details["wise"]["alpha"]
    assert (folder / "predictions.csv").is_file() and (folder / "plots" / "sklearn" / "confusion.json").is_file()
    assert "accuracy_low" in json.loads((folder / "metrics.json").read_text())
    # The same record as evaluate_finetune writes for the folder (the code path finetune's scores take).
    again = evaluate_finetuned(tmp_path / "finetune_wise", run["manifest"], run["root"], params=FAST)
    assert again.record["accuracy"] == json.loads((folder / "metrics.json").read_text())["accuracy"]
    test = [str(run["root"] / r.path) for r in read_manifest(run["manifest"]).ok_rows() if r.split == "test"]
    args = ["predict", "--finetuned", str(tmp_path / "finetune_wise"), "--device", "cpu", "--format", "json"]
    done = CliRunner().invoke(transfer, [*args, "--num-workers", "0", *test])
    assert done.exit_code == 0, done.output
    predicted = [p["top"][0]["class"] for p in json.loads(done.stdout)["predictions"]]
    with open(folder / "predictions.csv") as f:
        assert predicted == [line.split(",")[2] for line in f.read().splitlines()[1:]]
    record = {**details, **json.loads((folder / "metrics.json").read_text())}
    row = finetune_row(tmp_path / "finetune_wise", record, {}, FINETUNE_WISE)
    assert row.name == FINETUNE_WISE and f"alpha {details['wise']['alpha']:g}" in row.layers_trained


def test_stage_mistakes_are_one_line(run, tmp_path):
    for params, finetuned, message in (
        (_params(tmp_path, "[0.0, 2.0]"), None, "finetune_wise.alphas must lie in [0, 1]"),
        (_params(tmp_path), tmp_path / "absent", "no fine-tuned model in"),
    ):
        result = _stage(run, tmp_path, params, finetuned)
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_finetune_wise_exports_with_parity(run, tmp_path):
    out = tmp_path / "wise"
    _wise(run, out, alphas=[0.0, 0.5, 1.0])
    scored = evaluate_finetuned(out, run["manifest"], run["root"], params=FAST)
    write_model_metrics(tmp_path / "metrics" / FINETUNE_WISE, scored)
    assert chosen_models([FINETUNE_WISE], {}) == [FINETUNE_WISE]
    inputs = Inputs({}, run["tuned"], tmp_path / "metrics", run["manifest"], run["root"], out)
    parity = export_models([FINETUNE_WISE], inputs, tmp_path / "export", parity_params())[FINETUNE_WISE]
    assert parity["top1_agreement"] == 1.0 and parity["max_probability_difference"] <= PARITY_ATOL
    meta = read_metadata(tmp_path / "export" / f"{FINETUNE_WISE}.onnx")
    assert meta["model"] == FINETUNE_WISE and meta["classes"] == ["a", "b", "c"]
    assert meta["hyperparameters"]["wise_alpha"] == json.loads((out / "config.json").read_text())["wise"]["alpha"]
    with pytest.raises(ExportError, match="does not hold the finetune-wise model"):  # the plain network is refused
        export_models([FINETUNE_WISE], replace(inputs, wise=run["tuned"]), tmp_path / "other", parity_params())


def parity_params():
    from pipeline.core.config import ExportParams

    return ExportParams(models=[FINETUNE_WISE], batch_size=4)


def test_the_report_has_a_finetune_wise_row_and_compares_it_with_fine_tuning(run, tmp_path):
    """What the head, evaluate_finetune and finetune_wise stages write, read by the report as `dvc repro` has it."""
    settings = ExtractParams.of(BACKBONE, image_size=32, num_workers=0, device="cpu")
    extracted = extract(run["manifest"], run["root"], tmp_path / "test_resnet.h5", tmp_path / "cache", settings)
    store, metrics, scoring = extracted.store, tmp_path / "metrics", EvaluateParams(bootstrap_resamples=100)
    logreg = HeadParams(grid={"C": [1.0]})
    head = train_head(read_store(store), "logreg", logreg)
    save_head(head, tmp_path / "logreg.h5")
    features = read_store(store)
    on_train = train_accuracy(head, features)
    write_model_metrics(metrics / head.model_name, score_head(features, store, head, scoring, on_train))
    tuned = evaluate_finetuned(run["tuned"], run["manifest"], run["root"], params=FAST)
    write_model_metrics(metrics / "finetune", tuned)
    result = _wise(run, tmp_path / "wise")
    scored = evaluate_finetuned(tmp_path / "wise", run["manifest"], run["root"], params=FAST)
    write_model_metrics(metrics / FINETUNE_WISE, scored)
    curve = summarised(learning_curve(read_store(store), head, logreg, shots=[2], seeds=1))
    files = [HeadFile(BACKBONE, "logreg", tmp_path / "logreg.h5", store)]
    extraction = {BACKBONE: extracted.record()}
    args = (files, Answers(metrics), run["tuned"], extraction, (curve, []), None, scoring)
    report = build_report(*args, wise=tmp_path / "wise")
    rows = {r.name: r for r in report.rows}
    assert set(rows) == {head.model_name, "finetune", FINETUNE_WISE}
    wise = rows[FINETUNE_WISE]
    assert wise.accuracy == scored.record["accuracy"] and wise.chosen_on.endswith(f"(val, alpha {result.alpha:g})")
    # Its own train accuracy (the overfitting gap's), not the one the fine-tuned network had in its best epoch.
    on_train = predict_test_split(tmp_path / "wise", run["manifest"], run["root"], FAST, split="train")
    assert wise.train_accuracy == scored.record["train_accuracy"]
    assert scored.record["train_accuracy"] == (on_train.proba.argmax(1) == on_train.labels).mean()
    assert f"| {FINETUNE_WISE} | fine tuning |" in report.markdown
    assert f"**WiSE-FT.** {FINETUNE_WISE} is finetune's weights mixed with those it started from at alpha" in (
        report.markdown
    )
    assert {r.name for r in build_report(*args).rows} == {head.model_name, "finetune"}  # no --wise: no row
