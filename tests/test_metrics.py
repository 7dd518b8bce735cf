"""Metrics: scikit-learn definitions, every class counted, hand-checked values, threshold tuning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score, f1_score, jaccard_score, precision_recall_fscore_support, precision_score,
    recall_score,
)

from visiontune import inputs
from visiontune.errors import UserError
from visiontune.metrics import (
    MULTILABEL_ONLY, PRIMARY_METRIC, compute_metrics, greater_is_better, probabilities, sigmoid,
    softmax, tune_thresholds,
)

MC, ML = "image-classification", "image-classification-multilabel"
SCALARS_MC = {"accuracy", "f1_score_macro", "precision_score_macro", "recall_score_macro"}
SCALARS_ML = SCALARS_MC | {"iou", "iou_micro", "iou_macro", "iou_weighted"}


def one_hot_logits(pred: list[int], num_classes: int) -> np.ndarray:
    logits = np.zeros((len(pred), num_classes))
    logits[np.arange(len(pred)), pred] = 5.0
    return logits


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


# --------------------------------------------------------------------------------------------
# Multi-class
# --------------------------------------------------------------------------------------------
def test_multiclass_by_hand_counts_unseen_classes():
    # y_true = 0 0 1 1 2, y_pred = 0 1 1 1 0, four classes (class 3 never appears anywhere).
    #   class 0: tp 1, fp 1, fn 1 -> p 1/2, r 1/2, f1 1/2
    #   class 1: tp 2, fp 1, fn 0 -> p 2/3, r 1,   f1 0.8
    #   class 2: tp 0, fp 0, fn 1 -> p 0,   r 0,   f1 0
    #   class 3: nothing          -> 0,     0,     0
    # macro f1 = (0.5 + 0.8) / 4 = 0.325 (over the three seen classes it would be 0.4333).
    m = compute_metrics(one_hot_logits([0, 1, 1, 1, 0], 4), np.array([0, 0, 1, 1, 2]), MC)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["f1_score_macro"] == pytest.approx(0.325)
    assert m["precision_score_macro"] == pytest.approx((0.5 + 2 / 3) / 4)
    assert m["recall_score_macro"] == pytest.approx(0.375)
    assert [row["f1"] for row in m["per_class"]] == pytest.approx([0.5, 0.8, 0.0, 0.0])
    assert [row["support"] for row in m["per_class"]] == [2, 2, 1, 0]
    assert [row["class"] for row in m["per_class"]] == ["0", "1", "2", "3"]
    assert set(m) == SCALARS_MC | {"per_class"}


def test_multiclass_matches_sklearn_with_unseen_and_unpredicted_classes():
    rng = np.random.default_rng(7)
    n, c = 60, 6
    labels = rng.integers(0, c - 1, size=n)  # class 5 never occurs in y_true
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[labels] * (rng.random(n) < 0.6)[:, None]
    logits[:, 3] = -50.0  # class 3 is never predicted
    pred = logits.argmax(axis=1)
    assert 3 not in pred and 5 not in labels and 3 in labels

    names = [f"class_{i}" for i in range(c)]
    m = compute_metrics(logits, labels, MC, class_names=names)
    every = list(range(c))
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    for key, fn in (("f1_score_macro", f1_score), ("precision_score_macro", precision_score),
                    ("recall_score_macro", recall_score)):
        expected = fn(labels, pred, labels=every, average="macro", zero_division=0)
        assert m[key] == pytest.approx(expected), key
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=every, zero_division=0)
    assert [row["class"] for row in m["per_class"]] == names
    assert [row["precision"] for row in m["per_class"]] == pytest.approx(p)
    assert [row["recall"] for row in m["per_class"]] == pytest.approx(r)
    assert [row["f1"] for row in m["per_class"]] == pytest.approx(f)
    assert [row["support"] for row in m["per_class"]] == list(s)
    assert all(isinstance(m[k], float) for k in SCALARS_MC)
    assert all(isinstance(row["support"], int) for row in m["per_class"])


def test_multiclass_rejects_bad_labels():
    logits = np.zeros((3, 2))
    with pytest.raises(ValueError):
        compute_metrics(logits, np.array([0, 1, 2]), MC)  # class 2 does not exist
    with pytest.raises(ValueError):
        compute_metrics(logits, np.array([0, 1]), MC)
    with pytest.raises(ValueError):
        compute_metrics(logits, np.array([0, 1, 1]), MC, class_names=["a"])
    with pytest.raises(UserError, match="task_name: unknown task"):
        compute_metrics(logits, np.array([0, 1, 1]), "segmentation")


# --------------------------------------------------------------------------------------------
# Multi-label
# --------------------------------------------------------------------------------------------
def test_multilabel_by_hand():
    # y    = [1 0 1] [0 1 0] [0 0 0]
    # pred = [1 0 0] [0 1 1] [0 0 0]
    # per image iou: 1/2, 1/2, and 0 for the empty row (zero_division=0) -> iou = 1/3
    # exact match only on the last row -> accuracy 1/3
    # micro: tp 2, fp 1, fn 1 -> 2/4; per class iou 1, 1, 0 -> macro and weighted 2/3
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    m = compute_metrics(np.where(pred == 1, 3.0, -3.0), y, ML, class_names=["a", "b", "c"])
    assert m["iou"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["iou_micro"] == pytest.approx(0.5)
    assert m["iou_macro"] == pytest.approx(2 / 3)
    assert m["iou_weighted"] == pytest.approx(2 / 3)
    assert m["f1_score_macro"] == pytest.approx(2 / 3)
    assert [row["iou"] for row in m["per_class"]] == pytest.approx([1, 1, 0])
    assert [row["support"] for row in m["per_class"]] == [1, 1, 1]
    assert set(m) == SCALARS_ML | {"per_class"}
    assert set(m["per_class"][0]) == {"class", "precision", "recall", "f1", "iou", "support"}


def expected_multilabel(y: np.ndarray, pred: np.ndarray) -> dict:
    return {
        "accuracy": accuracy_score(y, pred),
        "iou": jaccard_score(y, pred, average="samples", zero_division=0),
        "iou_micro": jaccard_score(y, pred, average="micro", zero_division=0),
        "iou_macro": jaccard_score(y, pred, average="macro", zero_division=0),
        "iou_weighted": jaccard_score(y, pred, average="weighted", zero_division=0),
        "f1_score_macro": f1_score(y, pred, average="macro", zero_division=0),
        "precision_score_macro": precision_score(y, pred, average="macro", zero_division=0),
        "recall_score_macro": recall_score(y, pred, average="macro", zero_division=0),
    }


@pytest.fixture
def multilabel_case():
    rng = np.random.default_rng(3)
    n, c = 50, 5
    y = (rng.random((n, c)) < 0.35).astype(int)
    y[:, 4] = 0  # class 4 never occurs
    y[:8] = 0  # images with no label at all
    logits = rng.normal(size=(n, c)) + 1.5 * (2 * y - 1)
    logits[:, 2] = -20.0  # class 2 is never predicted
    return logits, y


def test_multilabel_matches_sklearn(multilabel_case):
    logits, y = multilabel_case
    pred = (sigmoid(logits) >= 0.5).astype(int)
    assert pred[:, 2].sum() == 0 and y[:, 4].sum() == 0 and (y.sum(axis=1) == 0).any()

    m = compute_metrics(logits, y, ML)
    for key, value in expected_multilabel(y, pred).items():
        assert m[key] == pytest.approx(value), key
    p, r, f, s = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    iou = jaccard_score(y, pred, average=None, zero_division=0)
    for key, values in (("precision", p), ("recall", r), ("f1", f), ("iou", iou)):
        assert [row[key] for row in m["per_class"]] == pytest.approx(values), key
    assert [row["support"] for row in m["per_class"]] == list(s)


def test_multilabel_per_class_thresholds(multilabel_case):
    logits, y = multilabel_case
    thresholds = np.array([0.3, 0.5, 0.05, 0.7, 0.9])
    pred = (sigmoid(logits) >= thresholds).astype(int)
    m = compute_metrics(logits, y, ML, threshold=thresholds)
    for key, value in expected_multilabel(y, pred).items():
        assert m[key] == pytest.approx(value), key
    # A scalar threshold is the same as that value for every class.
    scalar = compute_metrics(logits, y, ML, threshold=0.3)
    same = compute_metrics(logits, y, ML, threshold=np.full(5, 0.3))
    assert scalar == same
    with pytest.raises(ValueError):
        compute_metrics(logits, y, ML, threshold=np.array([0.5, 0.5]))


def test_multilabel_rejects_bad_labels():
    with pytest.raises(ValueError):
        compute_metrics(np.zeros((2, 3)), np.array([[0, 2, 1], [1, 0, 0]]), ML)
    with pytest.raises(ValueError):
        compute_metrics(np.zeros((2, 3)), np.array([0, 1]), ML)


# --------------------------------------------------------------------------------------------
# Probabilities
# --------------------------------------------------------------------------------------------
def test_softmax_and_sigmoid_are_stable_for_large_logits():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        big = softmax(np.array([[1000.0, 999.0, -1000.0], [-1e4, -1e4, -1e4]]))
        s = sigmoid(np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]))
    assert np.isfinite(big).all()
    assert big[0] == pytest.approx(softmax(np.array([[1.0, 0.0, -1999.0]]))[0])
    assert big[1] == pytest.approx([1 / 3] * 3)
    assert big.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert s == pytest.approx([0.0, 1 / (1 + np.exp(30)), 0.5, 1 / (1 + np.exp(-30)), 1.0])
    logits = np.array([[2.0, -1.0]])
    assert probabilities(logits, MC) == pytest.approx(softmax(logits))
    assert probabilities(logits, ML) == pytest.approx(1 / (1 + np.exp(-logits)))
    # Large logits still give the right metrics.
    m = compute_metrics(np.array([[1e4, -1e4], [-1e4, 1e4]]), np.array([0, 1]), MC)
    assert m["accuracy"] == 1.0


# --------------------------------------------------------------------------------------------
# Threshold tuning
# --------------------------------------------------------------------------------------------
def test_per_class_tuning_finds_each_class_optimum():
    # Class 0 is perfectly separated for t in (0.2, 0.33]: grid 0.25, 0.30 -> 0.30 is closest
    # to 0.5. Class 1 for t in (0.67, 0.8]: grid 0.70, 0.75, 0.80 -> 0.70.
    probs = np.array([[0.9, 0.9], [0.7, 0.8], [0.33, 0.67], [0.2, 0.6]])
    y = np.array([[1, 1], [1, 1], [1, 0], [0, 0]])
    for metric in ("f1", "iou"):
        t = tune_thresholds(probs, y, metric=metric, per_class=True)
        assert isinstance(t, np.ndarray)
        assert t.tolist() == [0.3, 0.7], metric  # exactly the decimal values
        m = compute_metrics(logit(probs), y, ML, threshold=t)
        assert m["f1_score_macro"] == pytest.approx(1.0)
        assert m["accuracy"] == pytest.approx(1.0)


def test_global_tuning_matches_brute_force(multilabel_case):
    logits, y = multilabel_case
    probs = sigmoid(logits)
    grid = np.linspace(0.05, 0.95, 19)
    for metric, score in (
        ("f1", lambda p: f1_score(y, p, average="macro", zero_division=0)),
        ("iou", lambda p: jaccard_score(y, p, average="samples", zero_division=0)),
        ("iou_micro", lambda p: jaccard_score(y, p, average="micro", zero_division=0)),
    ):
        scores = np.array([score((probs >= t).astype(int)) for t in grid])
        t = tune_thresholds(probs, y, metric=metric)
        assert isinstance(t, float)
        assert score((probs >= t).astype(int)) == pytest.approx(scores.max()), metric
        best = grid[np.isclose(scores, scores.max())]
        assert abs(t - 0.5) == pytest.approx(np.abs(best - 0.5).min()), metric


def test_global_tuning_known_optimum():
    # One class; the positives score 0.6 and above, the negatives 0.4 and below, except one
    # negative at 0.62: thresholds in (0.62, 0.65] are perfect -> grid point 0.65.
    probs = np.array([[0.9], [0.8], [0.65], [0.62], [0.4], [0.1]])
    y = np.array([[1], [1], [1], [0], [0], [0]])
    assert tune_thresholds(probs, y, metric="f1") == pytest.approx(0.65)
    assert tune_thresholds(probs, y, metric="iou_macro") == pytest.approx(0.65)
    assert tune_thresholds(probs, y, metric="iou_micro") == pytest.approx(0.65)
    # The per-image iou scores an image with no true and no predicted label 0 (zero_division=0),
    # so here it cannot tell 0.65 from lower thresholds: all score 3/6, and 0.5 wins the tie.
    assert tune_thresholds(probs, y, metric="iou") == pytest.approx(0.5)


def test_tuning_ties_go_to_the_threshold_nearest_half():
    probs = np.array([[0.99, 0.01], [0.01, 0.99]])
    y = np.array([[1, 0], [0, 1]])
    # Every grid point is perfect, so 0.5 stays.
    assert tune_thresholds(probs, y) == pytest.approx(0.5)
    assert tune_thresholds(probs, y, per_class=True) == pytest.approx([0.5, 0.5])
    # 0.4 and 0.6 are equally near 0.5: the lower one wins.
    assert tune_thresholds(probs, y, grid=np.array([0.6, 0.4])) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        tune_thresholds(probs, y, metric="loss")


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
def test_metric_names_and_direction():
    assert PRIMARY_METRIC == {MC: "accuracy", ML: "iou"}
    assert MULTILABEL_ONLY == {"iou", "iou_macro", "iou_micro", "iou_weighted"}
    assert set(SCALARS_ML) | {"loss"} == set(inputs.METRICS)
    assert greater_is_better("loss") is False
    assert all(greater_is_better(name) for name in SCALARS_ML)


def test_multilabel_with_a_single_class():
    # scikit-learn reads one indicator column as binary labels; the metrics must stay multi-label.
    # y = 1 1 0 0, pred = 1 0 1 0 -> per image iou 1, 0, 0, 0 (empty row scores 0) -> 1/4;
    # exact match on rows 1 and 4 -> 1/2; class iou tp 1 / (tp 1 + fp 1 + fn 1) = 1/3.
    y = np.array([[1], [1], [0], [0]])
    logits = np.array([[3.0], [-3.0], [3.0], [-3.0]])
    m = compute_metrics(logits, y, ML)
    assert m["iou"] == pytest.approx(0.25)
    assert m["accuracy"] == pytest.approx(0.5)
    for key in ("iou_micro", "iou_macro", "iou_weighted"):
        assert m[key] == pytest.approx(1 / 3), key
    assert m["f1_score_macro"] == pytest.approx(0.5)
    assert len(m["per_class"]) == 1 and m["per_class"][0]["support"] == 2
    # Perfect for t in (0.3, 0.55]: 0.5 is in that range.
    probs = np.array([[0.9], [0.55], [0.3], [0.1]])
    assert tune_thresholds(probs, y, per_class=True) == pytest.approx([0.5])
    assert tune_thresholds(probs, y, metric="iou_micro") == pytest.approx(0.5)
    # Perfect only for t in (0.3, 0.4]: grid 0.35 and 0.4 -> 0.4.
    assert tune_thresholds(np.array([[0.9], [0.4], [0.3], [0.1]]), y) == pytest.approx(0.4)


@pytest.mark.parametrize("seed", range(12))
def test_random_cases_match_sklearn_everywhere(seed):
    """Every scalar and per-class value on random cases: one to six classes, empty rows, classes
    never true or never predicted, all-empty predictions."""
    rng = np.random.default_rng(100 + seed)
    n, c = int(rng.integers(1, 30)), int(rng.integers(1, 7))
    every = list(range(c))
    labels = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c))
    m = compute_metrics(logits, labels, MC)
    pred = logits.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=every, zero_division=0)
    assert [row["f1"] for row in m["per_class"]] == pytest.approx(f)
    assert m["precision_score_macro"] == pytest.approx(np.mean(p))
    assert m["recall_score_macro"] == pytest.approx(np.mean(r))

    y = (rng.random((n, c)) < rng.uniform(0, 0.6)).astype(int)
    logits = rng.normal(size=(n, c)) + rng.uniform(-3, 1)  # sometimes nothing is predicted
    pred = (sigmoid(logits) >= 0.5).astype(int)
    m = compute_metrics(logits, y, ML)
    # scikit-learn reads a one-column indicator matrix as binary labels; an all-zero extra
    # column, left out through labels=, makes it multi-label and changes nothing
    y2, pred2 = (np.hstack([a, np.zeros_like(a)]) if c == 1 else a for a in (y, pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's ill-defined-metric warnings
        assert m["accuracy"] == pytest.approx(accuracy_score(y2, pred2))
        for average, key in (("samples", "iou"), ("micro", "iou_micro"), ("macro", "iou_macro"),
                             ("weighted", "iou_weighted")):
            want = jaccard_score(y2, pred2, labels=every, average=average, zero_division=0)
            assert m[key] == pytest.approx(want), key
        p, r, f, s = precision_recall_fscore_support(y2, pred2, labels=every, zero_division=0)
        iou = jaccard_score(y2, pred2, labels=every, average=None, zero_division=0)
    for key, values in (("precision", p), ("recall", r), ("f1", f), ("iou", iou)):
        assert [row[key] for row in m["per_class"]] == pytest.approx(values), key
    assert [row["support"] for row in m["per_class"]] == list(s)


def test_training_processes_do_not_import_sklearn():
    """scikit-learn adds about 140 MB to a process; the metrics need none of it."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "import visiontune.training.finetune, transformers.trainer\n"
            "from visiontune.metrics import compute_metrics, tune_thresholds\n"
            "compute_metrics(np.eye(3), np.arange(3), 'image-classification')\n"
            "tune_thresholds(np.full((2, 2), 0.6), np.eye(2, dtype=int))\n"
            "print('sklearn' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
