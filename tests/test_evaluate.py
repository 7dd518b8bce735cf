"""``visiontune evaluate``: metrics checked against scikit-learn, plots, threshold tuning.

The models are tiny ViTs whose heads are fitted by logistic regression on a few demo images,
so predictions vary like a real model's (no training loop needed)."""

import base64
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score, confusion_matrix, f1_score, jaccard_score, precision_recall_fscore_support,
    precision_score, recall_score,
)

from tests.helpers import subset
from visiontune.cli import main
from visiontune.config import resolve
from visiontune.errors import DataError, UserError
from visiontune.evaluation import run_evaluate
from visiontune.inference import Classifier
from visiontune.inputs import EVALUATE_INPUTS, MULTICLASS, MULTILABEL
from visiontune.metrics import DEFAULT_GRID

# mlflow's advice on input examples when a model is saved: not ours to act on.
pytestmark = pytest.mark.filterwarnings("ignore:.*input example:UserWarning")

CLASSES = [str(d) for d in range(10)]
PREPROCESSING = {"height": 32, "width": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                 "interpolation": "bilinear"}


# ---------------------------------------------------------------------------------------------
# Helpers, also used by test_predict.py
# ---------------------------------------------------------------------------------------------
def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def make_model(path, task, train_jsonl=None, bias_shift=0.0):
    """A "fine-tuned" output folder: tiny ViT + model_selector_args.json. With ``train_jsonl``
    the head is fitted to those images; ``bias_shift`` is added to every logit afterwards."""
    from tests.tiny_models import save_tiny_model
    from visiontune.model_folder import ModelFolder

    path = Path(path)
    save_tiny_model("vit", path, num_labels=len(CLASSES), image_size=32, labels=CLASSES)
    ModelFolder(path).write_metadata({
        "model_metadata": {"finetuning_task": task, "is_finetuned_model": True,
                           "id2label": {str(i): c for i, c in enumerate(CLASSES)}},
        "preprocessing": PREPROCESSING,
        "multilabel_threshold": 0.5 if task == MULTILABEL else None,
    })
    if train_jsonl is not None:
        _fit_head(path, read_jsonl(train_jsonl), task, bias_shift)
    return path


def _fit_head(path, rows, task, bias_shift):
    import torch

    from visiontune.data.images import load_image

    classifier = Classifier(path, device="cpu")
    head = classifier.model.classifier
    features = []
    hook = head.register_forward_pre_hook(lambda _, args: features.append(args[0].numpy()))
    classifier.logits([load_image(r["image_url"]) for r in rows])
    hook.remove()
    x = np.concatenate(features)
    mean, std = x.mean(0), x.std(0) + 1e-8
    xs = (x - mean) / std
    if task == MULTICLASS:
        fit = LogisticRegression(max_iter=2000).fit(xs, [CLASSES.index(r["label"]) for r in rows])
        coef, intercept = fit.coef_, fit.intercept_
    else:
        fits = [LogisticRegression(max_iter=2000).fit(xs, [c in r["label"] for r in rows])
                for c in CLASSES]
        coef = np.concatenate([f.coef_ for f in fits])
        intercept = np.concatenate([f.intercept_ for f in fits])
    with torch.no_grad():
        head.weight.copy_(torch.tensor(coef / std))
        head.bias.copy_(torch.tensor(intercept - (coef * mean / std).sum(1) + bias_shift))
    classifier.model.save_pretrained(path)


def png_ok(path, min_side=300):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > min_side and image.height > min_side
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 10  # not one flat colour


def multi_hot(label_lists):
    return np.array([[c in labels for c in CLASSES] for labels in label_lists], dtype=int)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    return SimpleNamespace(
        digits_train=subset(demo_dir / "digits" / "train", root / "dt.jsonl", 20, per_class=True),
        digits_test=subset(demo_dir / "digits" / "test", root / "dte.jsonl", 8, per_class=True),
        mosaics_train=subset(demo_dir / "mosaics" / "train", root / "mt.jsonl", 300),
        mosaics_val=subset(demo_dir / "mosaics" / "validation", root / "mv.jsonl", 100),
        mosaics_test=subset(demo_dir / "mosaics" / "test", root / "mte.jsonl", 100),
    )


@pytest.fixture(scope="module")
def digits_model(data, tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("digits_model") / "m", MULTICLASS,
                      data.digits_train)


@pytest.fixture(scope="module")
def mosaics_model(data, tmp_path_factory):
    # Shifted down so that 0.5 is a poor threshold and tuning has something to fix.
    return make_model(tmp_path_factory.mktemp("mosaics_model") / "m", MULTILABEL,
                      data.mosaics_train, bias_shift=-1.5)


@pytest.fixture()
def mosaics_copy(mosaics_model, tmp_path):
    """A copy that a test may change (tuning writes into the model folder)."""
    return Path(shutil.copytree(mosaics_model, tmp_path / "model"))


def evaluate(**given):
    return run_evaluate(resolve(EVALUATE_INPUTS, {k: str(v) for k, v in given.items()}))


# ---------------------------------------------------------------------------------------------
# Multi-class
# ---------------------------------------------------------------------------------------------
def test_multiclass_report_matches_sklearn(digits_model, data, tmp_path, capsys):
    out = tmp_path / "report"
    assert evaluate(model=digits_model, test_data=data.digits_test, output_dir=out,
                    batch_size=16) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    preds = read_jsonl(out / "predictions.jsonl")
    assert metrics["number_of_images"] == len(preds) == 80
    assert metrics["task"] == MULTICLASS

    y_true = [p["label"] for p in preds]
    y_pred = [p["predicted_label"] for p in preds]
    probs = np.array([[p["probs"][c] for c in CLASSES] for p in preds])
    assert list(preds[0]["probs"]) == CLASSES
    assert y_pred == [CLASSES[i] for i in probs.argmax(1)]
    assert np.allclose(probs.sum(1), 1)
    assert len(set(y_pred)) > 3  # a model that varies, so the checks below mean something

    # The probabilities are the model's own, image by image.
    from visiontune.data.images import load_image

    classifier = Classifier(digits_model, device="cpu")
    direct = classifier.probabilities([load_image(p["image"]) for p in preds[:12]])
    assert np.allclose(direct, probs[:12], atol=1e-6)

    kw = {"labels": CLASSES, "average": "macro", "zero_division": 0}
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["f1_score_macro"] == pytest.approx(f1_score(y_true, y_pred, **kw))
    assert metrics["precision_score_macro"] == pytest.approx(precision_score(y_true, y_pred, **kw))
    assert metrics["recall_score_macro"] == pytest.approx(recall_score(y_true, y_pred, **kw))
    assert 0.2 < metrics["accuracy"] < 1
    assert "iou" not in metrics

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=CLASSES, zero_division=0)
    with (out / "per_class.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["class", "precision", "recall", "f1", "support"]
    assert [r["class"] for r in rows] == CLASSES
    for i, row in enumerate(rows):
        assert float(row["precision"]) == pytest.approx(precision[i])
        assert float(row["recall"]) == pytest.approx(recall[i])
        assert float(row["f1"]) == pytest.approx(f1[i])
        assert int(row["support"]) == support[i] == 8

    with (out / "confusion_matrix.csv").open() as handle:
        table = list(csv.reader(handle))
    assert table[0][1:] == CLASSES and [r[0] for r in table[1:]] == CLASSES
    saved = np.array([[int(x) for x in r[1:]] for r in table[1:]])
    assert (saved == confusion_matrix(y_true, y_pred, labels=CLASSES)).all()

    png_ok(out / "confusion_matrix.png", min_side=500)  # 10 classes: room for every cell
    assert not (out / "precision_recall_curves.png").exists()
    printed = capsys.readouterr().out
    assert "class" in printed and "support" in printed and f"{metrics['accuracy']:.4f}" in printed


def test_tuning_is_refused_for_multiclass(digits_model, data, tmp_path):
    with pytest.raises(UserError, match="multi-label"):
        evaluate(model=digits_model, test_data=data.digits_test, output_dir=tmp_path,
                 tune_thresholds="global")


def test_unknown_label_is_a_one_line_error(digits_model, data, tmp_path, capsys):
    rows = read_jsonl(data.digits_test)[:4]
    rows[1]["label"], rows[3]["label"] = "cat", "dog"
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["evaluate", "--model", str(digits_model), "--test_data", str(test),
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "does not know" in err and "cat, dog" in err
    assert not (tmp_path / "out").exists()


def test_bad_rows_stop_unless_skipped(digits_model, data, tmp_path):
    rows = read_jsonl(data.digits_test)[:6]
    rows[2]["image_url"] = str(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows[4]["image_url"] = str(tmp_path / "broken.png")
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    with pytest.raises(DataError, match=r"3 bad row\(s\) of 7.*skip_bad_rows"):
        evaluate(model=digits_model, test_data=test, output_dir=tmp_path / "a")
    assert evaluate(model=digits_model, test_data=test, output_dir=tmp_path / "b",
                    skip_bad_rows="true") == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["number_of_images"] == 4 and metrics["bad_rows_skipped"] == 3


# ---------------------------------------------------------------------------------------------
# Multi-label
# ---------------------------------------------------------------------------------------------
def _check_multilabel(out, threshold):
    """The saved report against scikit-learn, from predictions.jsonl alone."""
    metrics = json.loads((out / "metrics.json").read_text())
    preds = read_jsonl(out / "predictions.jsonl")
    y_true = multi_hot(p["labels"] for p in preds)
    probs = np.array([[p["probs"][c] for c in CLASSES] for p in preds])
    y_pred = (probs >= np.broadcast_to(threshold, probs.shape)).astype(int)
    assert (multi_hot(p["predicted_labels"] for p in preds) == y_pred).all()
    assert metrics["multilabel_threshold"] == pytest.approx(threshold)
    assert metrics["number_of_images"] == len(preds)
    assert metrics["number_of_labels"] == y_true.sum()

    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for name, average in (("iou", "samples"), ("iou_micro", "micro"), ("iou_macro", "macro"),
                          ("iou_weighted", "weighted")):
        assert metrics[name] == pytest.approx(
            jaccard_score(y_true, y_pred, average=average, zero_division=0)), name
    assert metrics["f1_score_macro"] == pytest.approx(
        f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert metrics["precision_score_macro"] == pytest.approx(
        precision_score(y_true, y_pred, average="macro", zero_division=0))

    iou = jaccard_score(y_true, y_pred, average=None, zero_division=0)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, zero_division=0)
    with (out / "per_class.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["class", "precision", "recall", "f1", "iou", "support"]
    for i, row in enumerate(rows):
        assert row["class"] == CLASSES[i]
        assert [float(row[k]) for k in ("precision", "recall", "f1", "iou")] == pytest.approx(
            [precision[i], recall[i], f1[i], iou[i]])
        assert int(row["support"]) == support[i]
    png_ok(out / "per_class_metrics.png")
    png_ok(out / "precision_recall_curves.png")
    assert not (out / "confusion_matrix.png").exists()
    return metrics, probs, y_true


def test_multilabel_report_matches_sklearn(mosaics_model, data, tmp_path):
    before = (mosaics_model / "model_selector_args.json").read_text()
    out = tmp_path / "report"
    assert evaluate(model=mosaics_model, test_data=data.mosaics_test, output_dir=out) == 0
    metrics, _, _ = _check_multilabel(out, 0.5)
    assert metrics["threshold_tuning"] is None
    assert (mosaics_model / "model_selector_args.json").read_text() == before


def _best_on_grid(probs, y_true, score):
    """Independent check of a tuned threshold: the best grid score (ties allowed)."""
    return max(score((probs >= t).astype(int)) for t in np.round(DEFAULT_GRID, 12))


def test_per_class_tuning_is_stored_and_used(mosaics_copy, data, tmp_path):
    out = tmp_path / "report"
    assert evaluate(model=mosaics_copy, test_data=data.mosaics_test, output_dir=out,
                    tune_thresholds="per_class", tuning_data=data.mosaics_val,
                    threshold_metric="f1") == 0
    stored = json.loads((mosaics_copy / "model_selector_args.json").read_text())
    thresholds = stored["multilabel_threshold"]
    assert isinstance(thresholds, list) and len(thresholds) == 10
    assert any(t != 0.5 for t in thresholds)
    assert stored["model_metadata"]["finetuning_task"] == MULTILABEL  # the rest is kept

    # Each class's threshold maximises that class's f1 on the tuning data.
    from visiontune.data.images import load_image

    tuning = read_jsonl(data.mosaics_val)
    classifier = Classifier(mosaics_copy, device="cpu")
    assert np.array_equal(classifier.threshold, thresholds)
    tuning_probs = classifier.probabilities([load_image(r["image_url"]) for r in tuning])
    tuning_true = multi_hot(r["label"] for r in tuning)
    for c, t in enumerate(thresholds):
        def score(pred, c=c):
            return f1_score(tuning_true[:, c], pred[:, c], zero_division=0)
        chosen = score((tuning_probs >= t).astype(int))
        assert chosen == pytest.approx(_best_on_grid(tuning_probs, tuning_true, score))

    # The report uses the tuned thresholds, and they change the predictions.
    metrics, probs, _ = _check_multilabel(out, np.array(thresholds))
    assert metrics["threshold_tuning"]["mode"] == "per_class"
    assert ((probs >= 0.5) != (probs >= np.array(thresholds))).any()
    described = classifier.describe(probs)
    assert [d["predicted_labels"] for d in described] == [
        [c for c, p, t in zip(CLASSES, row, thresholds) if p >= t] for row in probs]


def test_global_tuning_on_test_data_warns(mosaics_copy, data, tmp_path, caplog):
    out = tmp_path / "report"
    assert evaluate(model=mosaics_copy, test_data=data.mosaics_test, output_dir=out,
                    tune_thresholds="global", threshold_metric="iou") == 0
    assert "optimistic" in caplog.text
    threshold = json.loads((mosaics_copy / "model_selector_args.json").read_text())[
        "multilabel_threshold"]
    assert isinstance(threshold, float) and threshold < 0.5
    metrics, probs, y_true = _check_multilabel(out, threshold)
    assert metrics["threshold_tuning"]["tuning_data"] == "test data"

    def score(pred):
        return jaccard_score(y_true, pred, average="samples", zero_division=0)
    assert metrics["iou"] == pytest.approx(_best_on_grid(probs, y_true, score))
    assert metrics["iou"] > score((probs >= 0.5).astype(int))


def test_tuning_an_mlflow_model_updates_what_serving_loads(mosaics_copy, data, tmp_path):
    from visiontune.serving.mlflow_model import ImageClassifierModel, save_mlflow_model

    mlflow_dir = save_mlflow_model(mosaics_copy, tmp_path / "mlflow")
    before = (mosaics_copy / "model_selector_args.json").read_text()
    assert evaluate(model=mlflow_dir, test_data=data.mosaics_test, output_dir=tmp_path / "r",
                    tune_thresholds="global") == 0
    inner = mlflow_dir / "artifacts" / "model"
    threshold = json.loads((inner / "model_selector_args.json").read_text())["multilabel_threshold"]
    assert threshold != 0.5
    assert (mosaics_copy / "model_selector_args.json").read_text() == before
    _check_multilabel(tmp_path / "r", threshold)

    # The pyfunc, as `mlflow models serve` loads it, predicts with the tuned threshold.
    import pandas as pd

    served = ImageClassifierModel()
    served.load_context(SimpleNamespace(artifacts={"model": str(inner)}))
    rows = read_jsonl(data.mosaics_test)[:8]
    images = [base64.b64encode(Path(r["image_url"]).read_bytes()).decode() for r in rows]
    result = served.predict(None, pd.DataFrame({"image": images}))
    for _, row in result.iterrows():
        assert row["predicted_labels"] == [l for l, p in zip(row["labels"], row["probs"])
                                           if p >= threshold]
    assert any(r for r in result["predicted_labels"])


def test_cli_subprocess(mosaics_model, data, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "visiontune", "evaluate", "--model", str(mosaics_model),
         "--test_data", str(data.mosaics_test), "--output_dir", str(out), "--batch_size", "64"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "iou" in done.stdout and "report written to" in done.stdout
    assert "evaluate: 100/100 images" in done.stderr  # plain progress lines off a terminal
    for name in ("metrics.json", "per_class.csv", "predictions.jsonl", "per_class_metrics.png",
                 "precision_recall_curves.png"):
        assert (out / name).is_file(), name
