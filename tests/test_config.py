"""The per-command configs: generated from the input table, frozen, read by attribute, and
each value with where it came from."""

import dataclasses
import json
from typing import Optional

import pytest

from visiontune import config as C
from visiontune import inputs as I
from visiontune.errors import UserError

REQUIRED = {"model_path": "m", "training_data": "d", "task_name": I.MULTICLASS,
            "output_dir_pytorch": "o"}
TABLES = {C.ImportConfig: I.IMPORT_INPUTS, C.FinetuneConfig: I.FINETUNE_INPUTS,
          C.PipelineConfig: I.PIPELINE_INPUTS, C.EvaluateConfig: I.EVALUATE_INPUTS,
          C.PredictConfig: I.PREDICT_INPUTS, C.ExportOnnxConfig: I.EXPORT_ONNX_INPUTS,
          C.DataCheckConfig: I.DATA_CHECK_INPUTS, C.DemoConfig: I.DEMO_INPUTS}
TYPES = {"int": int, "float": float, "bool": bool, "str": str, "folder": str, "mltable": str,
         "file": str}


@pytest.mark.parametrize("cls", list(TABLES), ids=lambda cls: cls.__name__)
def test_the_fields_are_the_input_table(cls):
    table = TABLES[cls]
    fields = C.input_fields(cls)
    assert [f.name for f in fields] == [spec.name for spec in table]
    for f, spec in zip(fields, table):
        assert f.metadata["input"] is spec
        kind = TYPES[spec.kind]
        unset = not spec.required and spec.default is None
        assert f.type == (Optional[kind] if unset else kind), spec.name
        if spec.required:
            assert f.default is dataclasses.MISSING, spec.name
        else:
            assert f.default == spec.default and type(f.default) is type(spec.default), spec.name
    assert C.config_class(table) is cls
    assert set(C.CONFIGS) == set(TABLES)


def test_a_config_is_frozen_and_a_step_returns_a_new_one():
    cfg = C.resolve(C.FinetuneConfig, REQUIRED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 0.1
    chosen = cfg.chosen("a test", learning_rate=0.1)
    assert (cfg.learning_rate, chosen.learning_rate) == (None, 0.1)


def test_a_misspelt_input_fails_at_its_first_use():
    cfg = C.resolve(C.FinetuneConfig, REQUIRED)
    with pytest.raises(AttributeError, match="learning_rat"):
        cfg.learning_rat  # noqa: B018
    with pytest.raises(AttributeError, match="learning_rat"):
        cfg.source("learning_rat")
    with pytest.raises(TypeError, match="learning_rat"):
        C.FinetuneConfig(**REQUIRED, learning_rat=0.1)


def test_provenance_of_command_line_config_file_and_default():
    cfg = C.resolve(C.FinetuneConfig, {**REQUIRED, "learning_rate": "0.5"},
                    {"random_seed": 7, "learning_rate": 0.1})
    assert (cfg.learning_rate, cfg.source("learning_rate")) == (0.5, C.COMMAND_LINE)
    assert (cfg.random_seed, cfg.source("random_seed")) == (7, C.CONFIG_FILE)
    assert (cfg.precision, cfg.source("precision")) == (32, C.DEFAULT)
    assert cfg.source("optimizer") == C.DEFAULT and cfg.chosen_by("optimizer") is None
    assert cfg.given("learning_rate") and not cfg.given("precision")
    # An empty value counts as not given, wherever it came from.
    assert C.resolve(C.FinetuneConfig, {**REQUIRED, "optimizer": " "}).source("optimizer") == C.DEFAULT


def test_provenance_is_not_part_of_equality():
    from_cli = C.resolve(C.FinetuneConfig, {**REQUIRED, "random_seed": "7"})
    from_file = C.resolve(C.FinetuneConfig, REQUIRED, {"random_seed": 7})
    assert from_cli == from_file and hash(from_cli) == hash(from_file)
    assert from_cli.source("random_seed") != from_file.source("random_seed")


def test_provenance_of_an_api_keyword(monkeypatch):
    import visiontune
    import visiontune.training.finetune as ft

    monkeypatch.setattr(ft, "finetune", lambda cfg, **kwargs: cfg)
    cfg = visiontune.finetune(**REQUIRED, learning_rate=0.01)
    assert isinstance(cfg, C.FinetuneConfig)
    assert (cfg.learning_rate, cfg.source("learning_rate")) == (0.01, C.KEYWORD)
    assert cfg.source("random_seed") == C.DEFAULT


def test_the_cli_hands_its_command_a_config_with_provenance(monkeypatch, tmp_path, capsys):
    import visiontune.training.finetune as ft
    from visiontune.cli import main

    seen = []

    def record(cfg, **kwargs):
        seen.append(cfg)
        return ft.FinetuneResult(tmp_path / "o", None, {"accuracy": 0.5}, ["a", "b"])

    monkeypatch.setattr(ft, "finetune", record)
    file = tmp_path / "inputs.yaml"
    file.write_text("random_seed: 7\nlearning_rate: 0.1\n")
    argv = ["finetune", "--config", str(file), "--learning_rate", "0.5"]
    assert main([*argv, *(x for k, v in REQUIRED.items() for x in (f"--{k}", v))]) == 0
    (cfg,) = seen
    assert [cfg.source(n) for n in ("learning_rate", "random_seed", "precision", "model_path")] == [
        C.COMMAND_LINE, C.CONFIG_FILE, C.DEFAULT, C.COMMAND_LINE]
    printed = capsys.readouterr().out
    assert "validation metrics of the best model: accuracy=0.5000" in printed
    assert f"pytorch model: {tmp_path / 'o'}" in printed


def test_provenance_of_values_chosen_after_resolving():
    from tests.helpers import workers_config
    from visiontune.training.arguments import check_inputs
    from visiontune.training.defaults import apply_defaults, defaults_sources
    from visiontune.training.finetune import choose_workers

    given = C.resolve(C.FinetuneConfig, {**REQUIRED, "learning_rate": "0.5"})
    cfg = apply_defaults(given, None)
    assert (cfg.optimizer, cfg.source("optimizer"), cfg.chosen_by("optimizer")) == (
        "adamw_hf", C.AUTO, "base")
    assert cfg.chosen_by("number_of_epochs") == f"task {I.MULTICLASS}"
    assert cfg.source("learning_rate") == C.COMMAND_LINE  # the user's value is kept
    assert given.optimizer is None  # the resolved config is left as it was
    assert defaults_sources(cfg)["learning_rate"] == "user"

    workers = choose_workers(workers_config(), use_cpu=True)
    assert (workers.number_of_workers, workers.source("number_of_workers")) == (0, C.AUTO)
    assert "CPU-only" in workers.chosen_by("number_of_workers")

    aligned, notes = check_inputs(C.resolve(C.FinetuneConfig, {
        **REQUIRED, "evaluation_strategy": "steps", "evaluation_steps": "10"}))
    assert (aligned.save_strategy, aligned.source("save_strategy")) == ("steps", C.AUTO)
    assert aligned.chosen_by("save_strategy") in notes
    assert aligned.output_dir_mlflow == "o/mlflow_model" and aligned.source("output_dir_mlflow") == C.AUTO


def test_a_config_built_directly_records_its_values_as_keywords():
    cfg = C.FinetuneConfig(**REQUIRED, random_seed=3)
    assert cfg.source("random_seed") == C.KEYWORD and cfg.source("precision") == C.DEFAULT


def test_as_dict_and_as_json_follow_the_table():
    cfg = C.resolve(C.DataCheckConfig, {"data": "d", "task_name": I.MULTICLASS})
    assert list(cfg.as_dict()) == [spec.name for spec in I.DATA_CHECK_INPUTS]
    assert json.loads(I.as_json(cfg)) == json.loads(I.as_json(cfg.as_dict())) == cfg.as_dict()


def test_a_pipeline_config_carries_its_provenance_into_the_finetune_config():
    pipe = C.resolve(C.PipelineConfig, {"model_name": "efficientnet-lite0", "learning_rate": "0.5",
                                        **{k: v for k, v in REQUIRED.items() if k != "model_path"}})
    cfg = C.config_from(C.FinetuneConfig, pipe, "the imported model", model_path="/tmp/m")
    assert cfg.learning_rate == 0.5 and cfg.source("learning_rate") == C.COMMAND_LINE
    assert (cfg.source("model_path"), cfg.chosen_by("model_path")) == (C.AUTO, "the imported model")
    with pytest.raises(TypeError):  # a required input left out
        C.config_from(C.EvaluateConfig, pipe, "x")


def test_unknown_config_file_inputs_are_refused():
    with pytest.raises(UserError, match="--config: unknown input.*learning_rat"):
        C.resolve(C.FinetuneConfig, REQUIRED, {"learning_rat": 0.1})
