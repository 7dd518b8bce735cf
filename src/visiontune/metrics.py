"""Evaluation metrics with the scikit-learn definitions Azure ML uses (``zero_division=0``).

Multi-class: softmax then argmax. Multi-label: sigmoid then a threshold (one for all classes or
one per class). Metric names match the ``metric_for_best_model`` choices.

Computed here from per-class counts with numpy, and tested against scikit-learn: importing
scikit-learn would add its memory to every training process, for a few divisions.
"""

from __future__ import annotations

import numpy as np

from visiontune.tasks import MULTICLASS, MULTILABEL, check_task

PRIMARY_METRIC = {MULTICLASS: "accuracy", MULTILABEL: "iou"}
MULTILABEL_ONLY = {"iou", "iou_macro", "iou_micro", "iou_weighted"}
DEFAULT_GRID = np.linspace(0.05, 0.95, 19)


def greater_is_better(metric_name: str) -> bool:
    """Every metric improves upwards except the loss."""
    return metric_name != "loss"


def softmax(logits: np.ndarray) -> np.ndarray:
    # Subtracting the row maximum keeps exp() finite for any logits.
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    # exp(-log(1 + exp(-x))) written with logaddexp never overflows.
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    """Class probabilities: softmax (multi-class) or independent sigmoids (multi-label)."""
    _check_task(task)
    return softmax(logits) if task == MULTICLASS else sigmoid(logits)


def compute_metrics(
    logits: np.ndarray, labels: np.ndarray, task: str, *,
    threshold: float | np.ndarray = 0.5, class_names: list[str] | None = None,
) -> dict:
    """Scalar metrics by their component names, plus ``per_class`` rows.

    Macro averages run over all ``logits.shape[1]`` classes, including classes that never occur
    in the labels or the predictions (they score 0), so the macro value is the mean of the
    per-class table. For multi-label, an image with no true and no predicted label scores an iou
    of 0 (``zero_division=0``), as in Azure ML.

    ``labels``: class indices (n,) for multi-class, multi-hot 0/1 (n, C) for multi-label.
    ``threshold``: multi-label only; a scalar or one value per class.
    """
    _check_task(task)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (n, classes) with n > 0, got {logits.shape}")
    n, num_classes = logits.shape
    names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    probs = probabilities(logits, task)

    if task == MULTICLASS:
        y_true = np.asarray(labels)
        if y_true.shape != (n,):
            raise ValueError(f"multi-class labels must have shape ({n},), got {y_true.shape}")
        if not np.array_equal(y_true, np.round(y_true)):
            raise ValueError("multi-class labels must be class indices")
        y_true = y_true.astype(np.int64)
        if y_true.min() < 0 or y_true.max() >= num_classes:
            raise ValueError(f"labels must lie in 0..{num_classes - 1}")
        y_pred = probs.argmax(axis=1)
    else:
        y_true = _multi_hot(labels, (n, num_classes))
        y_pred = (probs >= _thresholds(threshold, num_classes)).astype(np.int64)
    scores = _class_scores(y_true, y_pred, num_classes)
    support, iou = scores["support"], (scores["iou"] if task == MULTILABEL else None)
    precision, recall, f1 = scores["precision"], scores["recall"], scores["f1"]
    result: dict = {
        "accuracy": _accuracy(y_true, y_pred),
        "f1_score_macro": float(np.mean(f1)),
        "precision_score_macro": float(np.mean(precision)),
        "recall_score_macro": float(np.mean(recall)),
    }
    if iou is not None:
        for name in ("iou", "iou_micro", "iou_macro", "iou_weighted"):
            result[name] = _iou_average(name, y_true, y_pred, scores)
    rows = []
    for c in range(num_classes):
        row = {"class": names[c], "precision": float(precision[c]), "recall": float(recall[c]),
               "f1": float(f1[c])}
        if iou is not None:
            row["iou"] = float(iou[c])
        row["support"] = int(support[c])
        rows.append(row)
    result["per_class"] = rows
    return result


def tune_thresholds(
    probs: np.ndarray, labels: np.ndarray, metric: str = "f1", per_class: bool = False,
    grid: np.ndarray = DEFAULT_GRID,
) -> float | np.ndarray:
    """Multi-label threshold(s) from ``grid`` that maximise ``metric`` on (validation) data.

    Global: one threshold maximising ``metric`` ("f1"/"f1_score_macro": macro f1; "iou": the
    per-image iou; "iou_micro", "iou_macro", "iou_weighted"; "accuracy"). Per class: each class's
    own f1 ("f1*") or iou ("iou*"), chosen independently. Ties go to the threshold closest to
    0.5, then to the lower one, so flat regions keep the usual default.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (n, classes), got {probs.shape}")
    y_true = _multi_hot(labels, probs.shape)
    num_classes = probs.shape[1]
    # Rounded so that a grid point like 0.35000000000000003 is saved and compared as 0.35.
    grid = np.round(np.asarray(grid, dtype=np.float64).ravel(), 12)
    if grid.size == 0:
        raise ValueError("grid is empty")

    if per_class:
        if not metric.startswith(("f1", "iou")):
            raise ValueError(f"per-class thresholds tune f1 or iou, not {metric!r}")
        key = "f1" if metric.startswith("f1") else "iou"

        def score(pred):
            return _class_scores(y_true, pred, num_classes)[key]
    else:
        score = _global_scorer(metric, y_true, num_classes)

    # scores[g] holds the score(s) at grid[g]; shape (G,) or (G, C).
    scores = np.array([score((probs >= t).astype(np.int64)) for t in grid], dtype=np.float64)
    # Sort the grid by preference (closest to 0.5, then lower) and take the first best score.
    order = np.lexsort((grid, np.abs(grid - 0.5)))
    ranked = scores[order]
    best = np.isclose(ranked, ranked.max(axis=0), rtol=0, atol=1e-12)
    chosen = grid[order][best.argmax(axis=0)]
    return chosen.astype(np.float64) if per_class else float(chosen)


def _global_scorer(metric: str, y_true: np.ndarray, num_classes: int):
    if metric in ("f1", "f1_score_macro"):
        return lambda pred: float(np.mean(_class_scores(y_true, pred, num_classes)["f1"]))
    if metric == "accuracy":
        return lambda pred: _accuracy(y_true, pred)
    if metric in ("iou", "iou_micro", "iou_macro", "iou_weighted"):
        return lambda pred: _iou_average(metric, y_true, pred, _class_scores(y_true, pred, num_classes))
    raise ValueError(
        f"cannot tune a threshold for {metric!r}; use f1, f1_score_macro, accuracy or an iou metric"
    )


def _ratio(numerator, denominator) -> np.ndarray:
    """numerator / denominator, and 0 where the denominator is 0 (``zero_division=0``)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _class_scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """Per-class counts and scores, from class indices (n,) or 0/1 indicator matrices (n, C):
    ``tp``, ``predicted``, ``support`` (actual), ``precision``, ``recall``, ``f1``, ``iou``."""
    if y_true.ndim == 1:
        tp = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
        predicted = np.bincount(y_pred, minlength=num_classes)
        support = np.bincount(y_true, minlength=num_classes)
    else:
        tp = (y_true.astype(bool) & y_pred.astype(bool)).sum(axis=0)
        predicted, support = y_pred.sum(axis=0), y_true.sum(axis=0)
    return {"tp": tp, "predicted": predicted, "support": support,
            "precision": _ratio(tp, predicted), "recall": _ratio(tp, support),
            "f1": _ratio(2 * tp, predicted + support), "iou": _ratio(tp, predicted + support - tp)}


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The share of rows predicted exactly (for multi-label: every label of the row)."""
    equal = y_true == y_pred
    return float(np.mean(equal if equal.ndim == 1 else equal.all(axis=1)))


def _iou_average(name: str, y_true: np.ndarray, y_pred: np.ndarray, scores: dict) -> float:
    """Multi-label iou: per image and averaged (``iou``, scikit-learn's "samples"), or over
    classes: ``iou_micro`` (pooled counts), ``iou_macro``, ``iou_weighted`` (by support)."""
    if name == "iou":
        t, p = y_true.astype(bool), y_pred.astype(bool)
        return float(np.mean(_ratio((t & p).sum(axis=1), (t | p).sum(axis=1))))
    if name == "iou_micro":
        tp = scores["tp"].sum()
        return float(_ratio([tp], [scores["predicted"].sum() + scores["support"].sum() - tp])[0])
    if name == "iou_macro":
        return float(np.mean(scores["iou"]))
    support = scores["support"]
    return float(_ratio([(scores["iou"] * support).sum()], [support.sum()])[0])


def _thresholds(threshold: float | np.ndarray, num_classes: int) -> np.ndarray:
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim == 0:
        return np.full(num_classes, float(t))
    if t.shape != (num_classes,):
        raise ValueError(
            f"threshold must be a scalar or have shape ({num_classes},), got {t.shape}"
        )
    return t


def _multi_hot(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != tuple(shape):
        raise ValueError(f"multi-label labels must have shape {tuple(shape)}, got {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("multi-label labels must be 0 or 1")
    return y.astype(np.int64)


def _check_task(task: str) -> None:
    check_task(task)
