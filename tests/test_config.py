"""params.yaml loading: defaults, type checks, and errors that name the key."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.core.config import BackboneParams, HeadParams, Params, load_params, resolve, usable_cores
from pipeline.core.errors import ConfigError
from stages.check_params import main as check_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert list(params.extract.backbones) == ["efficientnet_lite0"]
    assert params.extract.backbone("efficientnet_lite0").backbone == "efficientnet_lite0"
    assert params.finetune.backbone == "efficientnet_lite0" and params.finetune.image_size == "auto"
    assert "logreg" in params.heads
    assert isinstance(params.heads["logreg"], HeadParams)
    assert params.audit.duplicate_threshold == "auto"  # chosen from the embeddings, not tuned to one dataset


def test_empty_file_gives_defaults(tmp_path):
    assert load_params(write(tmp_path, "")) == resolve(Params())  # the defaults, derived values filled in


def test_values_are_read_and_ints_widen_to_float(tmp_path):
    params = load_params(write(tmp_path, "prepare:\n  val_fraction: 0\n  seed: 7\nextract:\n  batch_size: 8\n"))
    assert params.prepare.val_fraction == 0.0 and isinstance(params.prepare.val_fraction, float)
    assert params.prepare.seed == 7
    assert params.extract.batch_size == 8


def test_unknown_key_is_rejected_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'extract\.batchsize'.*batch_size"):
        load_params(write(tmp_path, "extract:\n  batchsize: 8\n"))


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'finetun'"):
        load_params(write(tmp_path, "finetun:\n  epochs: 3\n"))


def test_unknown_key_inside_a_head_names_the_head(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'heads\.logreg\.Cs'"):
        load_params(write(tmp_path, "heads:\n  logreg:\n    Cs: [1.0]\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("extract:\n  batch_size: '32'\n", r"extract\.batch_size must be int; got str '32'"),
        ("extract:\n  batch_size: true\n", r"extract\.batch_size must be int; got bool"),
        ("prepare:\n  val_fraction: 1e-1\n", r"prepare\.val_fraction must be a number; got the string '1e-1'"),
        ("extract:\n  device: gpu\n", r"extract\.device must be one of auto, cpu, cuda, mps; got 'gpu'"),
        ("extract:\n  loader: threads\n", r"extract\.loader must be one of auto, workers, inline; got 'threads'"),
        ("heads:\n  logreg:\n    grid:\n      C: 1.0\n", r"heads\.logreg\.grid\.C must be a list"),
        ("heads:\n  logreg:\n    grid:\n      C: [1.0, x]\n", r"heads\.logreg\.grid\.C\[1\] must be a number"),
        ("extract: 3\n", r"extract: expected a mapping"),
        ("audit:\n  duplicate_threshold: high\n", r"audit\.duplicate_threshold .* must be one of auto; got 'high'"),
        ("audit:\n  duplicate_threshold: 1.5\n", r"audit\.duplicate_threshold must be in \(0, 1\]; got 1.5"),
    ],
)
def test_wrong_types_are_rejected_by_name(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, text))


def test_optional_values_accept_null(tmp_path):
    params = load_params(
        write(tmp_path, "extract:\n  backbones:\n    b0:\n      image_size: null\n      weights: null\n")
    )
    entry = params.extract.backbone("b0")
    assert entry.image_size is None and entry.weights is None and entry.backbone == "b0"
    assert params.finetune_backbone.backbone == "b0" and params.finetune.image_size is None  # follows the entry


def test_several_backbones_each_with_its_own_settings(tmp_path):
    text = (
        "extract:\n  backbones:\n    small:\n      backbone: efficientnet_lite0\n      image_size: 128\n"
        "    resnet50: {}\nfinetune:\n  backbone: small\n"
    )
    params = load_params(write(tmp_path, text))
    assert list(params.extract.backbones) == ["small", "resnet50"]
    assert params.extract.backbone("resnet50") == BackboneParams(backbone="resnet50", image_size="auto")
    assert params.finetune_backbone == BackboneParams(backbone="efficientnet_lite0", image_size=128)
    assert params.finetune.image_size == 128


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "extract:\n  backbone: resnet50\n",
            r"extract\.backbone has moved: set it per backbone, e\.g\. extract\.backbones",
        ),
        ("extract:\n  image_size: 224\n", r"extract\.image_size has moved"),
        ("extract:\n  backbones: {}\n", r"extract\.backbones is empty"),
        ("extract:\n  backbones:\n    lite0-224: {}\n", r"extract\.backbones\.lite0-224: a label may use only letters"),
        ("finetune:\n  backbone: resnet50\n", r"finetune\.backbone: 'resnet50' is not under extract\.backbones"),
        ("audit:\n  backbone: resnet50\n", r"audit\.backbone: 'resnet50' is not under extract\.backbones"),
        ("extract:\n  backbones:\n    b:\n      image_size: big\n", r"extract\.backbones\.b\.image_size must be"),
    ],
)
def test_backbone_mistakes_name_the_key_and_the_fix(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, text))


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "extract: [unclosed\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prepare:\n  val_fraction: -0.1\n", r"prepare\.val_fraction must be in \[0, 1\); got -0\.1"),
        ("prepare:\n  val_fraction: 0.5\n  test_fraction: 0.5\n", r"val_fraction \+ prepare\.test_fraction must be"),
        ("extract:\n  batch_size: 0\n", r"extract\.batch_size must be >= 1; got 0"),
        (
            "extract:\n  backbones:\n    b:\n      image_size: 100000\n",
            r"extract\.backbones\.b\.image_size must be <= 4096",
        ),
        ("finetune:\n  image_size: 5000\n", r"finetune\.image_size must be <= 4096; got 5000"),
        ("prepare:\n  on_cross_split_duplicate: drop\n", r"prepare\.on_cross_split_duplicate"),
        ("extract:\n  num_workers: -1\n", r"extract\.num_workers must be >= 0; got -1"),
        ("evaluate:\n  ece_bins: 0\n", r"evaluate\.ece_bins must be >= 1"),
        ("learning_curve:\n  seeds: 0\n", r"learning_curve\.seeds must be >= 1"),
        ("learning_curve:\n  shots: [4, 0]\n", r"learning_curve\.shots must be >= 1 each \(images per class\); got 0"),
        ("learning_curve:\n  shots: [-2]\n", r"learning_curve\.shots must be >= 1 each \(images per class\); got -2"),
        ("learning_curve:\n  shots: [1, 2, 2]\n", r"learning_curve\.shots lists a value twice: \[1, 2, 2\]"),
        ("learning_curve:\n  shots: [1.5]\n", r"learning_curve\.shots\[0\] must be int; got float 1\.5"),
        ("learning_curve:\n  sizes: [1, 2]\n", r"learning_curve\.sizes has moved: it is learning_curve\.shots now"),
        ("finetune_curve:\n  sizes: [-1]\n", r"finetune_curve\.sizes must be >= 1 each; got -1"),
        ("finetune:\n  epochs: 0\n", r"finetune\.epochs must be >= 1; got 0"),
    ],
)
def test_out_of_range_values_are_rejected_by_name_split_fractions_included(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, text))


def test_prepare_processes_default_to_the_usable_cores(tmp_path):
    assert load_params(write(tmp_path, "")).prepare.num_workers == usable_cores() >= 1
    assert load_params(write(tmp_path, "prepare:\n  num_workers: 1\n")).prepare.num_workers == 1
    with pytest.raises(ConfigError, match=r"prepare\.num_workers must be >= 1; got 0"):
        load_params(write(tmp_path, "prepare:\n  num_workers: 0\n"))


@pytest.mark.parametrize("heads", ["heads:\n  probe:\n    kind: logreg\n", "heads:\n  logreg:\n    kind: knn\n"])
def test_the_logistic_head_the_warm_start_depends_on_is_required(tmp_path, heads):
    with pytest.raises(ConfigError, match="heads.logreg: keep a head named logreg of kind logreg"):
        load_params(write(tmp_path, heads))


def test_check_params_asks_for_the_backbone_to_fine_tune_which_dvc_yaml_names(tmp_path):
    params = write(tmp_path, "extract:\n  backbones:\n    b0: {}\n")
    result = CliRunner().invoke(check_params, ["--out", str(tmp_path / "ok.txt"), "--params", str(params)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "finetune.backbone: name the extract.backbones entry to fine-tune (one of b0)" in result.output
    params.write_text("extract:\n  backbones:\n    b0: {}\nfinetune:\n  backbone: b0\n")
    assert CliRunner().invoke(check_params, ["--out", str(tmp_path / "ok.txt"), "--params", str(params)]).exit_code == 0
