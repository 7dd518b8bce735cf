"""Multi-label thresholds: a label is predicted when its probability is at or above its
threshold, the same rule in the metrics, in tuning, in ``visiontune predict`` and in the
served model. Each is checked with probabilities exactly at the threshold and one float step
either side of it, where a ``>`` in place of ``>=`` shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from tests.tiny_models import random_images, save_tiny_model
from visiontune.data.images import load_image
from visiontune.data.transforms import Preprocessing
from visiontune.inference import Classifier, ClassifierBase
from visiontune.metrics import compute_metrics, sigmoid, tune_thresholds
from visiontune.model_folder import ModelFolder
from visiontune.tasks import MULTILABEL

LABELS = ["a", "b", "c"]
PREPROCESSING = {"height": 32, "width": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                 "interpolation": "bilinear"}


def up(x):
    return np.nextafter(x, 2.0)


def down(x):
    return np.nextafter(x, -1.0)


def test_metrics_count_a_probability_at_the_threshold_as_predicted():
    logits = np.array([[0.0, 1.3, -0.7], [2.0, -2.0, 0.4]])
    at = sigmoid(logits[0])  # the probabilities compute_metrics computes, bit for bit
    truth = np.array([[1, 1, 1], [1, 0, 1]])
    for threshold, predicted_row0 in ((at, 1), (down(at), 1), (up(at), 0)):
        per_class = compute_metrics(logits, truth, MULTILABEL, threshold=threshold)["per_class"]
        # row 1 holds the largest probabilities of classes a and c, so only row 0 moves
        assert [row["recall"] for row in per_class] == pytest.approx(
            [0.5 + 0.5 * predicted_row0, predicted_row0, 0.5 + 0.5 * predicted_row0]), threshold
    # one threshold for every class: logit 0 is probability 0.5 exactly
    scalar = compute_metrics(np.zeros((2, 3)), np.ones((2, 3), dtype=int), MULTILABEL, threshold=0.5)
    assert scalar["accuracy"] == 1.0 and scalar["iou"] == 1.0
    assert compute_metrics(np.zeros((2, 3)), np.ones((2, 3), dtype=int), MULTILABEL,
                           threshold=up(0.5))["accuracy"] == 0.0


def _applier(threshold) -> ClassifierBase:
    """The prediction rule of every backend, without a model."""
    return ClassifierBase(Path("."), LABELS, MULTILABEL, Preprocessing(**PREPROCESSING), threshold)


@pytest.mark.parametrize("per_class", [False, True], ids=["global", "per-class"])
def test_tuned_thresholds_are_the_best_under_the_rule_prediction_applies(per_class):
    """Positives sit exactly on a grid point and negatives one grid step below: the only
    threshold that separates them, applied as prediction applies it, is the positives' own."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, (40, 3))
    truth[0], truth[1] = 1, 0  # every class has positives and negatives
    on_grid = [0.35, 0.35, 0.35] if not per_class else [0.35, 0.6, 0.8]
    probs = np.where(truth == 1, on_grid, np.round(np.array(on_grid) - 0.05, 12))
    chosen = tune_thresholds(probs, truth, metric="f1", per_class=per_class)
    assert np.allclose(chosen, on_grid if per_class else on_grid[0], rtol=0, atol=1e-12), chosen
    applied = _applier(chosen)
    predicted = np.array([[c in applied.labels_above_threshold(p) for c in LABELS] for p in probs])
    assert f1_score(truth, predicted.astype(int), average="macro", zero_division=0) == 1.0


def test_every_backend_predicts_a_label_at_its_threshold():
    probs = np.array([0.25, 0.5, 0.75])
    for threshold, wanted in ((probs, LABELS), (down(probs), LABELS), (up(probs), []),
                              ([0.25, up(0.5), 0.75], ["a", "c"]), (0.5, ["b", "c"]),
                              (up(0.5), ["c"])):
        applier = _applier(threshold)
        assert applier.labels_above_threshold(probs) == wanted, threshold
        assert applier.describe(probs[None])[0]["predicted_labels"] == wanted, threshold


@pytest.fixture(scope="module")
def multilabel_model(tmp_path_factory):
    """A tiny multi-label model, an image, and that image's probabilities under the model."""
    root = tmp_path_factory.mktemp("thresholds")
    folder = save_tiny_model("vit", root / "model", num_labels=3, image_size=32, labels=LABELS)
    meta = {"model_metadata": {"finetuning_task": MULTILABEL, "is_finetuned_model": True,
                               "id2label": dict(enumerate(LABELS))},
            "preprocessing": PREPROCESSING, "multilabel_threshold": 0.5}
    ModelFolder(folder).write_metadata(meta)
    random_images(1, seed=5)[0].save(root / "image.png")
    image = load_image(str(root / "image.png"))  # as predict and serving decode it
    probs = Classifier(folder).probabilities([image])[0]  # on the device predict uses
    return folder, meta, root / "image.png", probs


def _store(folder: Path, meta: dict, threshold) -> None:
    ModelFolder(folder).write_metadata({**meta, "multilabel_threshold": [float(t) for t in threshold]})


def test_predict_and_serving_predict_a_label_at_its_stored_threshold(multilabel_model, tmp_path):
    from visiontune.config import resolve
    from visiontune.inputs import PREDICT_INPUTS
    from visiontune.prediction import run_predict
    from visiontune.serving.mlflow_model import ImageClassifierModel, ServingConfig

    folder, meta, image_path, probs = multilabel_model
    for threshold, wanted in ((probs, LABELS), (down(probs), LABELS), (up(probs), []),
                              ([probs[0], up(probs[1]), probs[2]], ["a", "c"])):
        _store(folder, meta, threshold)
        out = tmp_path / "p.jsonl"
        assert run_predict(resolve(PREDICT_INPUTS, {"model": str(folder), "data": str(image_path),
                                                    "output": str(out)})) == 0
        row = json.loads(out.read_text().splitlines()[0])
        assert row["predicted_labels"] == wanted, threshold
        served = ImageClassifierModel()
        served.classifier, served.config = Classifier(folder), ServingConfig()
        answer = served.predict(None, pd.DataFrame({"image": [image_path.read_bytes()]}))
        assert answer["predicted_labels"].tolist() == [wanted], threshold
