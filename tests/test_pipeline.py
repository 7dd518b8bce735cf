"""The pipeline: data checked before import, then finetune and a real evaluation."""

import json

import pytest

from conftest import subset
from visiontune.cli import main

MC = "image-classification"
FAST = ["--number_of_epochs", "1", "--training_batch_size", "8", "--image_height", "32",
        "--image_width", "32", "--number_of_workers", "0", "--learning_rate", "0.001"]


@pytest.fixture(scope="module")
def small(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    return (subset(demo_dir / "digits" / "train", root / "train.jsonl", 6, per_class=True),
            subset(demo_dir / "digits" / "validation", root / "val.jsonl", 3, per_class=True),
            subset(demo_dir / "digits" / "test", root / "test.jsonl", 3, per_class=True))


def test_pipeline_runs_import_finetune_and_evaluation(tiny_vit, small, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["pipeline", "--pytorch_model", str(tiny_vit), "--training_data", str(small[0]),
                 "--validation_data", str(small[1]), "--test_data", str(small[2]),
                 "--task_name", MC, "--output_dir_pytorch", str(out), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[1/4] validating data" in printed and "evaluation report:" in printed
    assert (out / "model.safetensors").is_file() and (out / "mlflow_model" / "MLmodel").is_file()
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert "accuracy" in json.dumps(metrics)
    # The evaluation ran on the 30 test images, not on the validation data.
    rows = (out / "evaluation" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 30


def test_bad_data_fails_before_the_model_is_imported(small, tmp_path, monkeypatch, capsys):
    import visiontune.models.importer as importer

    def never(**kwargs):
        raise AssertionError("the model must not be imported when the data is bad")

    monkeypatch.setattr(importer, "import_model", never)
    bad = tmp_path / "bad.jsonl"
    lines = small[0].read_text().splitlines()
    bad.write_text("\n".join(lines[:5] + ['{"image_url": "missing.png", "label": "3"}', "{not json"]
                             + lines[5:]) + "\n")
    code = main(["pipeline", "--model_name", "efficientnet-lite0", "--training_data", str(bad),
                 "--task_name", MC, "--output_dir_pytorch", str(tmp_path / "o"), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}:6" in err and f"{bad}:7" in err and "2 bad row(s)" in err


def test_test_data_with_unknown_labels_fails_before_training(small, tmp_path, monkeypatch, capsys):
    import visiontune.models.importer as importer

    monkeypatch.setattr(importer, "import_model", lambda **kw: pytest.fail("imported"))
    test = tmp_path / "test.jsonl"
    row = json.loads(small[2].read_text().splitlines()[0])
    test.write_text(json.dumps({**row, "label": "eleven"}) + "\n")
    code = main(["pipeline", "--model_name", "efficientnet-lite0", "--training_data", str(small[0]),
                 "--test_data", str(test), "--task_name", MC,
                 "--output_dir_pytorch", str(tmp_path / "o"), *FAST])
    assert code == 2
    assert "label(s) the model does not know: eleven" in capsys.readouterr().err


def test_without_validation_data_evaluates_the_held_out_split(tiny_vit, small, tmp_path):
    out = tmp_path / "out"
    assert main(["pipeline", "--pytorch_model", str(tiny_vit), "--training_data", str(small[0]),
                 "--task_name", MC, "--output_dir_pytorch", str(out),
                 "--save_as_mlflow_model", "false", *FAST]) == 0
    split = (out / "validation_split.jsonl").read_text().splitlines()
    assert len(split) == 12  # 20 % of 60, stratified: every class held out
    rows = (out / "evaluation" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == len(split)
