"""The input table: conversion, validation, config files and the CLI built from it."""

import subprocess
import sys

import pytest

from visiontune import inputs as I
from visiontune.cli import build_parser, main
from visiontune.config import resolve
from visiontune.errors import UserError

SPEC = I.by_name(I.FINETUNE_INPUTS)


@pytest.mark.parametrize("raw,expected", [("true", True), ("False", False), ("1", True), ("no", False), (True, True)])
def test_booleans_accept_azure_and_human_forms(raw, expected):
    assert SPEC["apply_augmentations"].convert(raw) is expected


@pytest.mark.parametrize("name,raw,fragment", [
    ("optimizer", "adam", "one of adamw_hf, adamw, sgd"),
    ("learning_rate_scheduler", "linear", "one of warmup_linear"),
    ("metric_for_best_model", "f1", "one of loss"),
    ("label_smoothing_factor", "1.0", "< 1"),
    ("label_smoothing_factor", "-0.1", ">= 0"),
    ("training_batch_size", "0", ">= 1"),
    ("learning_rate", "abc", "a number"),
    ("precision", "8", "one of 16, 32"),
    ("image_height", "0", "(or -1)"),
    ("save_total_limit", "0", "(or -1)"),
    ("apply_augmentations", "maybe", "true or false"),
    ("number_of_epochs", "1.5", "an integer"),
])
def test_bad_values_name_the_input_and_what_is_allowed(name, raw, fragment):
    with pytest.raises(UserError) as err:
        SPEC[name].convert(raw)
    message = str(err.value)
    assert message.startswith(f"--{name}:") and fragment in message and "\n" not in message


def test_minus_one_is_allowed_where_the_spec_says_so():
    assert SPEC["image_height"].convert("-1") == -1
    assert SPEC["save_total_limit"].convert(-1) == -1
    assert SPEC["max_steps"].convert("-1") == -1
    assert SPEC["image_width"].convert("224") == 224


def test_resolve_precedence_cli_over_config_over_defaults():
    config = {"learning_rate": 0.1, "random_seed": 7, "model_path": "m", "training_data": "d",
              "task_name": "image-classification", "output_dir_pytorch": "o"}
    values = resolve(I.FINETUNE_INPUTS, {"learning_rate": "0.5"}, config)
    assert values.learning_rate == 0.5  # command line wins
    assert values.random_seed == 7  # config file
    assert values.apply_augmentations is True  # declared default
    assert values.optimizer is None  # auto: left to the defaults chain


def test_empty_string_means_not_given_and_required_inputs_are_enforced():
    base = {"model_path": "m", "training_data": "d", "task_name": "image-classification",
            "output_dir_pytorch": "o"}
    assert resolve(I.FINETUNE_INPUTS, {**base, "optimizer": ""}).optimizer is None
    with pytest.raises(UserError, match="--training_data is required"):
        resolve(I.FINETUNE_INPUTS, {**base, "training_data": ""})


def test_unknown_config_keys_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    with pytest.raises(UserError, match="unknown input.*learning_rat"):
        resolve(I.FINETUNE_INPUTS, {}, I.read_config_file(str(cfg)))


def test_config_file_must_be_valid_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML or JSON"):
        I.read_config_file(str(cfg))


def test_every_spec_input_is_a_finetune_option():
    spec_names = [
        "model_path", "training_data", "validation_data", "image_height", "image_width", "task_name",
        "metric_for_best_model", "apply_augmentations", "number_of_workers", "apply_deepspeed",
        "deepspeed_config", "apply_ort", "number_of_epochs", "max_steps", "training_batch_size",
        "validation_batch_size", "auto_find_batch_size", "learning_rate", "learning_rate_scheduler",
        "warmup_steps", "optimizer", "weight_decay", "extra_optim_args", "gradient_accumulation_step",
        "precision", "label_smoothing_factor", "random_seed", "evaluation_strategy", "evaluation_steps",
        "logging_strategy", "logging_steps", "save_strategy", "save_steps", "save_total_limit",
        "early_stopping", "early_stopping_patience", "max_grad_norm", "resume_from_checkpoint",
        "save_as_mlflow_model", "output_dir_pytorch", "output_dir_mlflow",
    ]
    azure = [i.name for i in I.FINETUNE_INPUTS if i.azure]
    assert azure == spec_names
    parser = build_parser()
    args = parser.parse_args(["finetune", *[x for n in spec_names for x in (f"--{n}", "1")]])
    assert set(spec_names) <= set(vars(args))


def test_cli_error_is_one_line_and_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "visiontune", "finetune", "--model_path", "m", "--training_data", "d",
         "--task_name", "image-classification", "--output_dir_pytorch", "o", "--optimizer", "adam"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["visiontune finetune: error: --optimizer: 'adam' is not allowed; expected one of "
                     "adamw_hf, adamw, sgd, adafactor, adagrad, adamw_ort_fused"]


def test_unknown_option_is_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--learning_rat", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--learning_rat" in err[0]
