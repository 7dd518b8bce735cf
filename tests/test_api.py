"""The Python API: the commands as functions with the CLI's inputs, defaults and checks, and
results that match the files each command writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import visiontune
from tests.helpers import subset
from visiontune.errors import UserError


@pytest.fixture(scope="module")
def digits(demo_dir, tmp_path_factory):
    """Digits 0, 1 and 2 (the tiny model's three classes): training, validation and test."""
    root = tmp_path_factory.mktemp("apidata")

    def three(split, n):
        return subset(demo_dir / "digits" / split, root / f"{split}.jsonl", n, per_class=True,
                      labels=("0", "1", "2"))

    return three("train", 8), three("validation", 4), three("test", 4)


@pytest.fixture(scope="module")
def trained(tiny_vit, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "pytorch"
    result = visiontune.finetune(
        model_path=tiny_vit, training_data=digits[0], validation_data=digits[1],
        task_name="image-classification", output_dir_pytorch=out, number_of_epochs=1,
        image_height=32, image_width=32, number_of_workers=0, save_as_mlflow_model=False)
    return out, result


def test_import_visiontune_loads_neither_torch_nor_transformers():
    code = ("import sys, visiontune; visiontune.finetune; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_finetune_takes_keywords_with_the_cli_defaults(trained):
    out, result = trained
    assert result.output_dir_pytorch == out and result.output_dir_mlflow is None
    assert result.classes == ["0", "1", "2"]
    saved = json.loads((out / "eval_results.json").read_text())
    assert result.metrics["accuracy"] == saved["accuracy"]
    values = json.loads((out / "finetune_args.json").read_text())["values"]
    assert values["learning_rate"] is not None and values["random_seed"] == 42  # defaults applied
    assert values["output_dir_pytorch"] == str(out)  # a Path given, a path string kept


def test_evaluate_returns_the_report_it_writes(trained, digits, tmp_path):
    out, _ = trained
    report = visiontune.evaluate(model=out, test_data=digits[2], output_dir=tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report == saved and report["number_of_images"] == 12
    assert 0.0 <= report["accuracy"] <= 1.0


def test_predict_and_export_return_what_they_wrote(trained, digits, tmp_path):
    out, _ = trained
    listing = tmp_path / "images.txt"
    images = [json.loads(l)["image_url"] for l in digits[2].read_text().splitlines()]
    listing.write_text("".join(f"{p}\n" for p in images) + f"{tmp_path / 'missing.png'}\n")
    result = visiontune.predict(model=out, data=listing, output=tmp_path / "p.jsonl")
    rows = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert (result.images, result.predicted) == (len(images) + 1, len(images)) == (len(rows), len(rows) - 1)
    assert list(result.errors) == [len(images)] and "missing.png" in result.errors[len(images)]
    onnx = visiontune.export_onnx(model=out, output_dir=tmp_path / "onnx")
    assert onnx.is_file() and onnx.suffix == ".onnx"


def test_pipeline_returns_the_model_and_the_report_and_prints_nothing(tiny_vit, digits, tmp_path,
                                                                     capsys):
    import visiontune.pipeline_run  # noqa: F401 (the module does not shadow the function)

    result = visiontune.pipeline(
        pytorch_model=tiny_vit, training_data=digits[0], validation_data=digits[1],
        test_data=digits[2], task_name="image-classification", output_dir_pytorch=tmp_path / "pt",
        number_of_epochs=1, image_height=32, image_width=32, number_of_workers=0,
        save_as_mlflow_model=False)
    assert capsys.readouterr().out == ""
    assert result.finetune.output_dir_pytorch == tmp_path / "pt" and result.finetune.classes == ["0", "1", "2"]
    assert result.evaluation_dir == tmp_path / "pt" / "evaluation" and result.test_data == str(digits[2])
    saved = json.loads((result.evaluation_dir / "metrics.json").read_text())
    assert result.evaluation == saved and saved["number_of_images"] == 12


def test_import_model_returns_a_folder_finetune_takes(tmp_path):
    folder = visiontune.import_model(model_name="efficientnet-lite0", output_dir=tmp_path / "m")
    assert isinstance(folder, Path) and (folder / "model_selector_args.json").is_file()


@pytest.mark.parametrize("given, words", [
    ({"learning_rat": 0.1}, ["unknown input(s) learning_rat (did you mean learning_rate?)"]),
    ({"learning_rate": -1}, ["--learning_rate", "out of range"]),
    ({"task_name": "segmentation"}, ["--task_name", "not allowed"]),
    ({"training_data": None}, ["--training_data is required"]),
])
def test_bad_keywords_are_one_clear_error_before_anything_loads(tmp_path, given, words):
    inputs = {"model_path": tmp_path, "training_data": tmp_path / "t.jsonl",
              "task_name": "image-classification", "output_dir_pytorch": tmp_path / "out", **given}
    with pytest.raises(UserError) as err:
        visiontune.finetune(**{k: v for k, v in inputs.items() if v is not None})
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_names_are_not_api_functions():
    with pytest.raises(AttributeError):
        visiontune.train  # noqa: B018
