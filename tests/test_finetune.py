"""Fine-tuning: the freezing is real, the optimizer is right, the warm start is exact, a kill resumes."""

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.config import FinetuneParams, HeadParams
from pipeline.data.loading import Images, collate
from pipeline.data.manifest import Manifest, ManifestRow, manifest_sha256, read_manifest
from pipeline.features.backbones import build_backbone
from pipeline.features.store import write_store
from pipeline.features.surgery import ordered_blocks
from pipeline.finetuning import epochs
from pipeline.finetuning.checkpoint import TRAINING_PACKAGES, read_checkpoint, run_key
from pipeline.finetuning.freezing import freeze
from pipeline.finetuning.model import Classifier, FinetuneError
from pipeline.finetuning.schedule import parameter_groups, warmup_cosine
from pipeline.finetuning.training import finetune, with_input_size
from pipeline.finetuning.warm_start import check_warm_start, init_from_head, initial_layer
from pipeline.heads.persistence import save_head
from pipeline.heads.selection import train_head
from stages.warm_start import main as warm_start_stage
from tests.conftest import REPO, make_store, prepare_manifest, write_image_folder

# On the CPU: weights are compared exactly (tests/conftest.py says why not `device: auto`).
FAST = FinetuneParams(
    unfreeze=2, epochs=2, batch_size=8, init_head="random", augment=False, image_size=32, num_workers=0, device="cpu"
)


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "raw"
    write_image_folder(root, {"a": 12, "b": 12, "c": 12})
    return root, prepare_manifest(root, tmp_path / "manifest.csv")


def _initial_state(name: str) -> dict[str, torch.Tensor]:
    return {f"features.{k}": v.clone() for k, v in build_backbone(name).features.state_dict().items()}


def test_frozen_blocks_and_their_batchnorm_statistics_do_not_move(data, tmp_path):
    root, manifest = data
    before = _initial_state("test_efficientnet")
    finetune(manifest, root, "test_efficientnet", FAST, tmp_path / "out", tmp_path / "ckpt")
    after = load_file(tmp_path / "out" / "model.safetensors")

    reference = build_backbone("test_efficientnet").features
    frozen_keys, trainable_keys = _split_keys(reference, unfreeze=2)
    assert frozen_keys and trainable_keys
    for key in frozen_keys:  # parameters and BatchNorm running statistics of frozen blocks
        assert torch.equal(after[key], before[key]), key
    assert any("running_mean" in k for k in frozen_keys)
    changed = [k for k in trainable_keys if "num_batches_tracked" not in k and not torch.equal(after[k], before[k])]
    trainable_params = [k for k in trainable_keys if k.endswith(("weight", "bias"))]
    assert set(trainable_params) <= set(changed)
    torch.manual_seed(FAST.seed)  # the new layer's initial weights, drawn as finetune draws them
    initial_head = Classifier(reference, 256, 3).head.weight
    assert not torch.equal(after["head.weight"], initial_head)


def test_batchnorm_train_moves_statistics_of_frozen_blocks_but_not_their_weights(data, tmp_path):
    root, manifest = data
    before = _initial_state("test_efficientnet")
    finetune(manifest, root, "test_efficientnet", replace(FAST, batchnorm="train"), tmp_path / "out", tmp_path / "c")
    after = load_file(tmp_path / "out" / "model.safetensors")
    frozen_keys, _ = _split_keys(build_backbone("test_efficientnet").features, unfreeze=2)
    stats = [k for k in frozen_keys if "running_mean" in k]
    weights = [k for k in frozen_keys if k.endswith(("weight", "bias"))]
    assert stats and all(not torch.equal(after[k], before[k]) for k in stats)
    assert all(torch.equal(after[k], before[k]) for k in weights)


def _split_keys(features: nn.Module, unfreeze: int) -> tuple[list[str], list[str]]:
    """State-dict keys (prefixed like the saved classifier's) of the frozen and the trained blocks."""
    blocks = ordered_blocks(features)
    owner = {}
    for i, block in enumerate(blocks):
        for tensor in [*block.parameters(), *block.buffers()]:
            owner[id(tensor)] = i
    frozen, trainable = [], []
    for key, tensor in features.state_dict(keep_vars=True).items():
        index = owner[id(tensor)]
        (trainable if index >= len(blocks) - unfreeze else frozen).append(f"features.{key}")
    return frozen, trainable


def test_optimizer_holds_only_trainable_parameters():
    backbone = build_backbone("test_efficientnet")
    model = Classifier(backbone.features, backbone.feature_dim, 3)
    split = freeze(model, backbone.blocks(), 2)
    groups = parameter_groups(model, split, replace(FAST, lr=0.01, backbone_lr_mult=0.1, layer_decay=0.5))
    in_optimizer = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(in_optimizer) == sorted(trainable) and len(set(in_optimizer)) == len(in_optimizer)
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.001, 0.0005])  # head, last block, the one before
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(p.requires_grad for b in split.frozen for p in b.parameters())


def test_unfreeze_all_and_zero():
    backbone = build_backbone("test_resnet")
    model = Classifier(backbone.features, backbone.feature_dim, 2)
    assert len(freeze(model, backbone.blocks(), "all").frozen) == 0
    assert all(p.requires_grad for p in model.parameters())
    split = freeze(model, backbone.blocks(), 0)
    assert split.trainable == [] and [p for p in model.parameters() if p.requires_grad] == list(model.head.parameters())


def test_unfreeze_zero_trains_the_same_layer_as_training_it_alone(data, tmp_path):
    root, manifest = data
    params = replace(FAST, unfreeze=0, epochs=1, early_stopping_patience=0)
    finetune(manifest, root, "test_resnet", params, tmp_path / "out", tmp_path / "ckpt")
    tuned = load_file(tmp_path / "out" / "model.safetensors")

    # The same layer trained by hand: same init, same batches in the same order, same optimizer and schedule.
    backbone = build_backbone("test_resnet")
    preprocessing = backbone.preprocessing.with_image_size(32)
    m = read_manifest(manifest)
    rows = [r for r in m.ok_rows() if r.split == "train"]
    labels = torch.tensor([m.classes.index(r.class_name) for r in rows])
    torch.manual_seed(params.seed)
    layer = Classifier(backbone.features, backbone.feature_dim, 3).head
    optimizer = torch.optim.AdamW(layer.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    steps = -(-len(rows) // params.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, steps))
    loader = torch.utils.data.DataLoader(
        Images.of_rows(root, rows, preprocessing.to_uint8),
        batch_size=params.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(params.seed * 100_003),
        collate_fn=collate,
    )
    for batch in loader:
        with torch.no_grad():
            features = backbone.features(preprocessing.normalize(batch.images))
        loss = nn.functional.cross_entropy(layer(features), labels[batch.index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(tuned["head.weight"], layer.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tuned["head.bias"], layer.bias.detach(), rtol=1e-5, atol=1e-6)


def _assert_warm_start_reproduces_head(features: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """Train a logistic head on the features, copy it into a new layer: same probabilities."""
    store = make_store(features, labels, np.tile([0, 0, 0, 1], len(features) // 4), classes)
    head = train_head(store, "logreg", HeadParams(grid={"C": [1.0]}))
    layer = nn.Linear(features.shape[1], len(classes))
    init_from_head(layer, head)
    with torch.no_grad():
        proba = layer(torch.as_tensor(features)).double().softmax(1).numpy()
    np.testing.assert_allclose(proba, head.predict_proba(features), atol=1e-6)


def test_warm_start_reproduces_the_logistic_head_exactly():
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(60, 8)) + np.repeat(np.eye(3, 8) * 4, 20, axis=0)).astype(np.float32)
    _assert_warm_start_reproduces_head(features, np.repeat(np.arange(3), 20), ["a", "b", "c"])


def test_binary_warm_start_fills_both_rows():
    """scikit-learn keeps one row of coefficients for two classes; the layer needs both."""
    rng = np.random.default_rng(1)
    features = np.vstack([rng.normal(-2, 1, (20, 4)), rng.normal(2, 1, (20, 4))]).astype(np.float32)
    _assert_warm_start_reproduces_head(features, np.repeat([0, 1], 20), ["ants", "bees"])


def _stage(work: Path, root: Path) -> list[str]:
    return [
        sys.executable, "-m", "stages.finetune", "--data", str(root), "--manifest", str(work / "manifest.csv"),
        "--init", str(work / "init.safetensors"), "--out", str(work / "out"), "--checkpoints", str(work / "ckpt"),
        "--live", str(work / "live"), "--params", str(work / "params.yaml"),
    ]  # fmt: skip


def _setup(work: Path, root: Path) -> None:
    """A work folder for the stage subprocess; its params run on the CPU, where a resumed run's final weights
    equal an uninterrupted run's."""
    work.mkdir()
    manifest = read_manifest(prepare_manifest(root, work / "manifest.csv"))
    save_file(
        initial_layer(build_backbone("test_resnet"), manifest, FinetuneParams(init_head="random")),
        work / "init.safetensors",
    )
    (work / "params.yaml").write_text(
        "extract:\n  backbones:\n    test_resnet: {}\nfinetune:\n  epochs: 5\n  batch_size: 4\n  init_head: random\n"
        "  augment: true\n  image_size: 64\n  num_workers: 0\n  device: cpu\n  early_stopping_patience: 0\n"
    )


class Interrupted(Exception):
    """Stands for a crash in the middle of an epoch."""


def test_a_run_interrupted_in_epoch_three_resumes_there_with_identical_final_weights(data, tmp_path, monkeypatch):
    """The in-process counterpart of the kill -9 test below (full tier): the checkpoint of epoch 2 is resumed at
    epoch 3 (augmentation and shuffling drawn as in an uninterrupted run), and the final weights are the same."""
    root, manifest = data
    params = replace(FAST, epochs=4, batch_size=4, augment=True, early_stopping_patience=0)
    done, train_epoch = [], epochs.train_epoch

    def train_epoch_then_die(*args):
        if len(done) == 2:
            raise Interrupted
        done.append(1)
        return train_epoch(*args)

    monkeypatch.setattr(epochs, "train_epoch", train_epoch_then_die)
    with pytest.raises(Interrupted):
        finetune(manifest, root, "test_resnet", params, tmp_path / "killed", tmp_path / "ckpt")
    monkeypatch.setattr(epochs, "train_epoch", train_epoch)
    resumed = finetune(manifest, root, "test_resnet", params, tmp_path / "killed", tmp_path / "ckpt")
    assert (resumed.resumed_from_epoch, resumed.epochs_run) == (2, 4)
    clean = finetune(manifest, root, "test_resnet", params, tmp_path / "clean", tmp_path / "clean_ckpt")
    assert clean.resumed_from_epoch == 0
    a, b = load_file(resumed.model_path), load_file(clean.model_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_kill_during_epoch_three_resumes_there_with_identical_final_weights(tmp_path):
    root = tmp_path / "raw"
    write_image_folder(root, {"a": 40, "b": 40}, size=64)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    _setup(killed, root)
    proc = subprocess.Popen(
        _stage(killed, root), cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    for line in proc.stderr:
        if "epoch 2:" in line and "checkpoint saved" in line:
            proc.kill()  # SIGKILL, in epoch 3
            break
    proc.wait()
    assert proc.returncode == -9
    saved = read_checkpoint(next((killed / "ckpt").glob("*/checkpoint.pt")))
    assert saved["epoch"] == 2 and not (killed / "out").exists()

    resumed = subprocess.run(_stage(killed, root), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "5 epochs, resumed at epoch 3" in resumed.stdout
    assert "epoch 1:" not in resumed.stderr and "epoch 3:" in resumed.stderr

    _setup(clean, root)
    subprocess.run(_stage(clean, root), cwd=REPO, check=True, capture_output=True)
    a, b = load_file(killed / "out" / "model.safetensors"), load_file(clean / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _head(manifest: str = "m", **seen):
    """What check_warm_start reads of a trained head: trained on manifest `manifest`, features as `seen`."""
    store = {"backbone": "efficientnet_lite0", "image_size": 224, "weights_file": None, **seen}
    attrs = {"name": "logreg", "kind": "logreg", "classes": ["a", "b"], "store_attrs": store}
    return type("Head", (), {**attrs, "manifest_sha256": manifest})()


def test_warm_start_is_refused_for_other_classes_features_weights_or_size():
    check_warm_start(_head(), ["a", "b"], "m", "efficientnet_lite0", 224, None)
    with pytest.raises(FinetuneError, match="at 224 px, fine-tuning runs efficientnet_lite0 at 128 px"):
        check_warm_start(_head(), ["a", "b"], "m", "efficientnet_lite0", 128, None)
    with pytest.raises(FinetuneError, match="trained on test_resnet features at 224 px"):
        check_warm_start(_head(backbone="test_resnet"), ["a", "b"], "m", "efficientnet_lite0", 224, None)
    with pytest.raises(FinetuneError, match="weights w.safetensors, fine-tuning starts from the defaults"):
        check_warm_start(_head(weights_file="w.safetensors"), ["a", "b"], "m", "efficientnet_lite0", 224, None)
    with pytest.raises(FinetuneError, match=r"has classes \['a', 'b'\], the manifest \['a', 'c'\]"):
        check_warm_start(_head(), ["a", "c"], "m", "efficientnet_lite0", 224, None)
    knn = type("Head", (), {"name": "knn", "kind": "knn"})()
    with pytest.raises(FinetuneError, match="needs a logreg head"):
        check_warm_start(knn, ["a", "b"], "m", "efficientnet_lite0", 224, None)


def test_checkpoints_are_not_resumed_across_a_change_of_pixels(data, monkeypatch):
    """New decoding or preprocessing code feeds other pixels: a finished run of the old code is not reused."""
    _, manifest_path = data
    manifest = read_manifest(manifest_path)
    backbone = build_backbone("test_efficientnet")
    layer = nn.Linear(4, 3)
    key = run_key(backbone, FAST, manifest, layer)
    assert run_key(build_backbone("test_efficientnet"), FAST, manifest, layer) == key
    monkeypatch.setattr("pipeline.finetuning.checkpoint.PIXELS_VERSION", 999)
    assert run_key(backbone, FAST, manifest, layer) != key
    monkeypatch.undo()
    other = replace(backbone, preprocessing=replace(backbone.preprocessing, interpolation="bilinear"))
    assert run_key(other, FAST, manifest, layer) != key
    with torch.no_grad():
        layer.bias[0] += 1  # another warm start
    assert run_key(backbone, FAST, manifest, layer) != key


def _warm_start(
    tmp_path: Path, manifest: Path, head: Path, init_head: str, features: Path | None = None
) -> dict[str, torch.Tensor]:
    params = tmp_path / "params.yaml"
    backbones = "extract:\n  backbones:\n    test_resnet:\n      image_size: 32\n"
    params.write_text(f"{backbones}finetune:\n  init_head: {init_head}\n")
    out = tmp_path / f"layer-{head.stem}-{init_head}.safetensors"
    features = features or tmp_path / "features.h5"
    args = ["--manifest", str(manifest), "--head", str(head), "--features", str(features), "--out", str(out)]
    args += ["--params", str(params)]
    result = CliRunner().invoke(warm_start_stage, args)
    assert result.exit_code == 0, result.output
    return load_file(out)


def test_warm_start_stage_writes_the_same_random_layer_whatever_the_head(data, tmp_path):
    """With init_head: random the logistic head is not read, so DVC sees the same bytes and keeps fine-tuning."""
    _, manifest = data
    first = _warm_start(tmp_path, manifest, tmp_path / "one.h5", "random")
    second = _warm_start(tmp_path, manifest, tmp_path / "other.h5", "random")  # none of the files exists
    assert first.keys() == {"weight", "bias"} and first["weight"].shape == (3, 96)
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(0)  # what finetune.seed gives: the layer nn.Linear draws after seeding
    layer = nn.Linear(96, 3)
    assert torch.equal(first["weight"], layer.weight.detach())


def test_warm_start_stage_folds_in_the_logistic_head_fitted_on_the_train_split_alone(data, tmp_path):
    """The head as trained was refit on train+val; the starting layer is its C fitted on train alone, since the val
    split then chooses fine-tuning's epoch and WiSE-FT's alpha: the val labels do not move it."""
    _, manifest = data
    classes, split = read_manifest(manifest).classes, manifest_sha256(read_manifest(manifest))
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 8)
    features = (rng.normal(size=(24, 96)) + np.eye(3, 96)[labels] * 3).astype(np.float32)
    attrs = {"backbone": "test_resnet", "image_size": 32, "manifest_sha256": split, "fingerprint": "f"}
    splits = np.tile([0, 0, 1], 8)
    store = make_store(features, labels, splits, classes, **attrs)
    head = train_head(store, "logreg", HeadParams(grid={"C": [1.0]}))
    save_head(head, tmp_path / "logreg.h5")
    write_store(tmp_path / "features.h5", labels=labels, split=splits, paths=store.paths, sha256=store.sha256,
                feature_chunks=[features], feature_dim=96, attrs={**attrs, "classes": classes})  # fmt: skip
    layer = _warm_start(tmp_path, manifest, tmp_path / "logreg.h5", "logreg")
    train = splits == 0
    on_train = train_head(store, "logreg", HeadParams(grid={"C": [1.0]}, refit_on_train_val=False, selection="val"))
    expected, whole = nn.Linear(96, 3), nn.Linear(96, 3)
    init_from_head(expected, on_train)
    init_from_head(whole, head)
    torch.testing.assert_close(layer["weight"], expected.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer["bias"], expected.bias.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(layer["weight"], whole.weight.detach(), atol=1e-3)  # not the train+val fit
    # The val labels permuted: the same starting layer.
    shuffled = labels.copy()
    shuffled[~train] = np.roll(labels[~train], 1)
    write_store(tmp_path / "shuffled.h5", labels=shuffled, split=splits, paths=store.paths, sha256=store.sha256,
                feature_chunks=[features], feature_dim=96, attrs={**attrs, "classes": classes})  # fmt: skip
    again = _warm_start(tmp_path, manifest, tmp_path / "logreg.h5", "logreg", tmp_path / "shuffled.h5")
    assert torch.equal(again["weight"], layer["weight"]) and torch.equal(again["bias"], layer["bias"])


def test_a_change_to_the_training_code_is_not_resumed(data, tmp_path, monkeypatch):
    """A checkpoint belongs to the code that wrote it: every package the finetune stage runs (its deps in dvc.yaml)
    is in the key."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]
    packages = {dep.removeprefix("pipeline/") for dep in stage["deps"] if dep.startswith("pipeline/")}
    assert packages == set(TRAINING_PACKAGES)
    _, manifest_path = data
    manifest, backbone, layer = read_manifest(manifest_path), build_backbone("test_resnet"), nn.Linear(4, 3)
    module = tmp_path / "data" / "loading.py"
    module.parent.mkdir()
    module.write_text("# one version\n")
    monkeypatch.setattr("pipeline.finetuning.checkpoint.LIBRARY", tmp_path)
    key = run_key(backbone, FAST, manifest, layer)
    module.write_text("# another version\n")
    assert run_key(backbone, FAST, manifest, layer) != key


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_checkpoint_is_set_aside_and_training_starts_again(data, tmp_path, caplog, damage):
    """Before: a checkpoint with 4 KB zeroed was resumed, optimizer state changed; a truncated one was a
    traceback. Now it is renamed aside with a warning, and training starts from scratch: the same weights."""
    root, manifest = data
    params = replace(FAST, epochs=1)
    finetune(manifest, root, "test_resnet", params, tmp_path / "first", tmp_path / "ckpt")
    (checkpoint,) = (tmp_path / "ckpt").glob("*/checkpoint.pt")
    with checkpoint.open("r+b") as f:
        if damage == "zeroed":
            f.seek(checkpoint.stat().st_size // 2)
            f.write(bytes(4096))
        else:
            f.truncate(checkpoint.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="pipeline.finetuning.training"):
        again = finetune(manifest, root, "test_resnet", params, tmp_path / "again", tmp_path / "ckpt")
    assert (again.resumed_from_epoch, again.epochs_run) == (0, 1)
    assert str(checkpoint) in caplog.text and checkpoint.with_name("checkpoint.pt.corrupt").exists()
    a, b = load_file(tmp_path / "first" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_is_refused_for_a_head_trained_on_another_split():
    head = _head(manifest="1" * 64)
    check_warm_start(head, ["a", "b"], "1" * 64, "efficientnet_lite0", 224, None)
    with pytest.raises(FinetuneError, match=r"manifest 1111111111111111.*manifest 2222222222222222.*rerun"):
        check_warm_start(head, ["a", "b"], "2" * 64, "efficientnet_lite0", 224, None)


@pytest.mark.parametrize(
    ("side", "setting", "size", "augment"),
    [
        (8, ("auto", "auto"), 128, False),  # the bundled digits: 128 px, no flips or crops
        (375, ("auto", "auto"), 160, True),  # photos: the weights' size (test_resnet: 160), augmented
        (8, (64, True), 64, True),  # explicit settings are kept
        (375, (None, False), 160, False),
    ],
)
def test_fine_tuning_resolves_size_and_augmentation_on_the_images_as_extract_does(side, setting, size, augment):
    rows = [ManifestRow(f"{i}.png", "a", "train", f"{i:064x}", "ok", width=side + i % 3, height=side) for i in range(9)]
    manifest = Manifest(rows, "flat", [])
    image_size, augmentation = setting
    params = with_input_size(
        FinetuneParams(image_size=image_size, augment=augmentation), build_backbone("test_resnet"), manifest
    )
    assert (params.image_size, params.augment) == (size, augment)
