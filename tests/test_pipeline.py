"""The pipeline: data checked before import, then finetune and a real evaluation."""

import json

import pytest

from tests.helpers import subset
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
    # The evaluation ran on the 30 test images, not on the validation data.
    rows = [json.loads(l) for l in (out / "evaluation" / "predictions.jsonl").read_text().splitlines()]
    test_rows = [json.loads(l) for l in small[2].read_text().splitlines()]
    assert [(r["image"], r["label"]) for r in rows] == [(t["image_url"], t["label"]) for t in test_rows]
    assert metrics["number_of_images"] == 30
    _assert_report_is_the_model_s_on_the_test_data(out, rows, metrics)


def _assert_report_is_the_model_s_on_the_test_data(model_dir, rows, metrics):
    """The report's probabilities are the fine-tuned model's own on each test image, and its
    numbers are scikit-learn's on those predictions."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    from visiontune.data.images import load_image
    from visiontune.inference import Classifier

    classifier = Classifier(model_dir)  # on the device the evaluation chose
    classes = classifier.classes
    probs = np.array([[r["probs"][c] for c in classes] for r in rows])
    direct = classifier.probabilities([load_image(r["image"]) for r in rows])
    np.testing.assert_allclose(probs, direct, atol=1e-5)
    y_true = [r["label"] for r in rows]
    y_pred = [classes[i] for i in probs.argmax(axis=1)]
    assert [r["predicted_label"] for r in rows] == y_pred
    macro = {"labels": classes, "average": "macro", "zero_division": 0}
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert metrics["f1_score_macro"] == pytest.approx(f1_score(y_true, y_pred, **macro), abs=1e-12)
    assert metrics["precision_score_macro"] == pytest.approx(
        precision_score(y_true, y_pred, **macro), abs=1e-12)
    assert metrics["recall_score_macro"] == pytest.approx(recall_score(y_true, y_pred, **macro), abs=1e-12)
    per_class = {row["class"]: row for row in metrics["per_class"]}
    assert sorted(per_class) == sorted(classes)
    assert [per_class[c]["support"] for c in classes] == [y_true.count(c) for c in classes]


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
    split = [json.loads(l) for l in (out / "validation_split.jsonl").read_text().splitlines()]
    assert len(split) == 12  # 20 % of 60, stratified: every class held out
    rows = [json.loads(l) for l in (out / "evaluation" / "predictions.jsonl").read_text().splitlines()]
    assert sorted((r["image"], r["label"]) for r in rows) == sorted((s["image_url"], s["label"]) for s in split)
    _assert_report_is_the_model_s_on_the_test_data(
        out, rows, json.loads((out / "evaluation" / "metrics.json").read_text()))
