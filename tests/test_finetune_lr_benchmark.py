"""benchmarks/finetune_lr.py's options and helpers: the learning rates it parses, the params it runs, its table."""

from dataclasses import replace

import click
import pytest

from benchmarks.finetune_lr import parse_lrs, reduced, table
from pipeline.core.config import load_params
from tests.conftest import REPO


def test_learning_rates_are_parsed_in_order():
    assert parse_lrs("3e-4,1e-3, 3e-3,1e-2") == [3e-4, 1e-3, 3e-3, 1e-2]
    assert parse_lrs("0.01,") == [0.01]


@pytest.mark.parametrize("text", ["", "fast", "1e-3,0", "-1e-3", "inf", "nan", "1e-3,1e-3"])
def test_anything_but_distinct_positive_learning_rates_is_refused(text):
    with pytest.raises(click.BadParameter):
        parse_lrs(text)


def test_params_are_the_repositorys_on_the_cpu_with_only_what_was_reduced():
    params = load_params(REPO / "params.yaml")
    extract_params, tune, changes = reduced(params, None, None)
    assert changes == "nothing"
    assert tune == replace(params.finetune, device="cpu", engine="local")
    assert list(extract_params.backbones) == [params.finetune.backbone]
    assert extract_params.device == "cpu" and extract_params.batch_size == params.extract.batch_size

    extract_params, tune, changes = reduced(params, 2, 160)
    assert (tune.epochs, tune.image_size, tune.lr) == (2, 160, params.finetune.lr)
    assert extract_params.backbones[params.finetune.backbone].image_size == 160  # what the warm start's head saw
    was = params.finetune
    assert changes == f"image_size 160 px (params.yaml: {was.image_size}), epochs 2 (params.yaml: {was.epochs})"


def test_table_has_a_row_per_learning_rate_with_counts():
    row = {
        "lr": 0.003,
        "epochs_run": 4,
        "best_epoch": 1,
        "val_loss": 0.0508,
        "val_accuracy": 36 / 37,
        "val_correct": 36,
        "n_val": 37,
        "test_accuracy": 143 / 153,
        "test_correct": 143,
        "n_test": 153,
        "seconds": 55.2,
    }
    lines = table([row, {**row, "lr": 0.0003}]).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| 0.003 | 4 | 1 | 0.0508 | 0.973 (36/37) | 0.935 (143/153) | 55 |"
    assert lines[3].startswith("| 0.0003 |")
