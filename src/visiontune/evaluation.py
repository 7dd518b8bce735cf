"""``visiontune evaluate``: a fine-tuned model on labelled test data, with a report.

Writes into ``--output_dir``: ``metrics.json`` (every metric of the task, with the image
count), ``per_class.csv`` (also printed), ``predictions.jsonl`` (one line per image) and PNG
plots: ``confusion_matrix.png`` (+ ``confusion_matrix.csv``) for multi-class,
``per_class_metrics.png`` and ``precision_recall_curves.png`` for multi-label.

Multi-label models can have their decision threshold(s) tuned here (``--tune_thresholds``);
the result is stored in the model's ``model_selector_args.json``, which prediction and the
MLflow model read, and the report is computed with it.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from visiontune.data.columnar import is_embedded
from visiontune.data.prepare import prepare_test_data
from visiontune.data.storage import redact
from visiontune.errors import DataError, UserError
from visiontune.inference import Classifier, check_threshold, open_model, predicted, score_images
from visiontune.metrics import MULTILABEL_ONLY, compute_metrics, probabilities, tune_thresholds
from visiontune.model_folder import ModelFolder
from visiontune.outputs import check_folder
from visiontune.tasks import MULTILABEL

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
PREDICTIONS_FILE = "predictions.jsonl"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
PER_CLASS_PNG = "per_class_metrics.png"
PR_CURVES_PNG = "precision_recall_curves.png"
ANNOTATED_CELLS_UP_TO = 30  # classes; beyond that the counts in the cells become unreadable


REPORT_FILES = frozenset({METRICS_FILE, PER_CLASS_FILE, PREDICTIONS_FILE, CONFUSION_CSV,
                          CONFUSION_PNG, PER_CLASS_PNG, PR_CURVES_PNG})


def is_evaluation_report(folder: Path) -> bool:
    """An earlier evaluation's report (which may be replaced): only the report's files, and a
    metrics.json that evaluate wrote."""
    names = {p.name for p in folder.iterdir()}
    if not names <= REPORT_FILES or METRICS_FILE not in names:
        return False
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and {"task", "number_of_images", "per_class"} <= set(metrics)


def check_report_folder(path: str | Path, input_name: str) -> Path:
    """Before the model and the data: a folder the report may be written to."""
    return check_folder(path, input_name, replaceable=is_evaluation_report, create=False)


def run_evaluate(cfg) -> int:
    """``visiontune evaluate``: the report, and its summary printed."""
    show_report(evaluate(cfg)[0], cfg.output_dir)
    return 0


def show_report(report: dict[str, Any], out) -> None:
    """Print an evaluation's summary: the tuned threshold (when tuned), the metrics, the
    per-class table and where the report is."""
    tuning = report.get("threshold_tuning")
    if tuning:
        print(f"tuned multilabel_threshold ({tuning['mode']}, maximising {tuning['metric']} on "
              f"{tuning['tuning_data']}): {_threshold_text(report)}; stored in {tuning['stored_in']}")
    _print_summary(report, out)


def evaluate(cfg) -> tuple[dict[str, Any], Classifier]:
    """Score ``test_data`` with the model and write the report into ``output_dir``; returns
    the report (as saved in its metrics file) and the classifier that scored."""
    tune = cfg.tune_thresholds
    check_report_folder(cfg.output_dir, "output_dir")  # before the model and the data
    classifier = open_model(cfg.model, cfg.runtime)
    task = classifier.task
    if tune != "none" and task != MULTILABEL:
        raise UserError(
            f"--tune_thresholds {tune}: thresholds exist only for multi-label models; this model's "
            f"task is {task} (it predicts the most probable class)"
        )
    if cfg.tuning_data and tune == "none":
        log.warning("--tuning_data is ignored: --tune_thresholds is none")

    batch_size = cfg.batch_size
    test, skipped = read_labelled(cfg.test_data, "test data", classifier, cfg)
    logits = _score(classifier, test, batch_size, "evaluate")
    targets = encode_targets(test, classifier)

    tuning = None
    if tune != "none":
        metric = cfg.threshold_metric
        if cfg.tuning_data:
            tuning_records, _ = read_labelled(cfg.tuning_data, "tuning data", classifier, cfg)
            tuning_logits = _score(classifier, tuning_records, batch_size, "tuning")
            tuning_targets = encode_targets(tuning_records, classifier)
            source = redact(str(cfg.tuning_data))
        else:
            log.warning(
                "tuning the threshold(s) on the test data itself: the reported metrics will be "
                "optimistic; give --tuning_data (e.g. the validation data) for an honest report"
            )
            tuning_logits, tuning_targets, source = logits, targets, "test data"
        chosen = tune_thresholds(probabilities(tuning_logits, task), tuning_targets,
                                 metric=metric, per_class=tune == "per_class")
        stored = store_threshold(classifier, chosen)
        tuning = {"mode": tune, "metric": metric, "tuning_data": source,
                  "number_of_images": int(len(tuning_targets)), "stored_in": stored}

    report = write_report(Path(cfg.output_dir), classifier, test, logits, targets,
                          extra={"model": str(cfg.model),
                                 "test_data": redact(str(cfg.test_data)),
                                 "bad_rows_skipped": skipped, "threshold_tuning": tuning})
    return report, classifier


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def read_labelled(source, name: str, classifier: Classifier, cfg):
    """(usable Records, number of bad rows skipped) against the model's classes."""
    return prepare_test_data(
        source, task=classifier.task, classes=classifier.classes,
        image_column=cfg.image_column, label_column=cfg.label_column,
        skip_bad_rows=cfg.skip_bad_rows, name=name,
    )


def encode_targets(records, classifier: Classifier) -> np.ndarray:
    """Class indices (multi-class) or a 0/1 matrix (multi-label), in the model's class order."""
    index = {c: i for i, c in enumerate(classifier.classes)}
    if classifier.task != MULTILABEL:
        return np.array([index[r.label] for r in records], dtype=np.int64)
    targets = np.zeros((len(records), len(classifier.classes)), dtype=np.int64)
    for row, record in enumerate(records):
        targets[row, [index[label] for label in record.label]] = 1
    return targets


def _score(classifier: Classifier, records, batch_size: int, desc: str) -> np.ndarray:
    logits, errors = score_images(classifier, [r.image for r in records], batch_size, desc)
    if errors:  # the images were verified just before, so only a file changed meanwhile
        first = min(errors)
        raise DataError(f"{records[first].where}: {errors[first]}")
    return logits


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------
def store_threshold(classifier: Classifier, threshold: float | np.ndarray) -> str:
    """Save the threshold(s) in the model's metadata (for an MLflow model folder, the copy
    inside ``artifacts/model``, which serving loads) and use them from now on."""
    value: float | list[float]
    value = ([float(t) for t in threshold] if np.ndim(threshold) else float(threshold))
    path = ModelFolder(classifier.model_dir).update_metadata(multilabel_threshold=value)
    classifier.threshold = check_threshold(value, len(classifier.classes))
    return str(path)


def _threshold_text(report: dict[str, Any]) -> str:
    t = report["multilabel_threshold"]
    if not isinstance(t, list):
        return f"{float(t):g}"
    return ", ".join(f"{row['class']}={float(x):g}" for row, x in zip(report["per_class"], t))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def write_report(
    out: Path, classifier: Classifier, records, logits: np.ndarray, targets: np.ndarray,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every report file; returns what ``metrics.json`` holds."""
    task, classes = classifier.task, classifier.classes
    multilabel = task == MULTILABEL
    result = compute_metrics(logits, targets, task, threshold=classifier.threshold,
                             class_names=classes)
    per_class = result.pop("per_class")
    probs = probabilities(logits, task)

    report: dict[str, Any] = {"task": task, "number_of_images": int(len(records)),
                              "number_of_classes": len(classes)}
    if multilabel:
        report["number_of_labels"] = int(targets.sum())
    report.update(result)
    if multilabel:
        t = classifier.threshold
        report["multilabel_threshold"] = float(t) if t.ndim == 0 else [float(x) for x in t]
    report.update(extra or {})
    report["per_class"] = per_class

    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with (out / PER_CLASS_FILE).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(per_class[0]))
        writer.writeheader()
        writer.writerows(per_class)
    _write_predictions(out / PREDICTIONS_FILE, classifier, records, probs)

    if multilabel:
        plot_per_class_metrics(per_class, out / PER_CLASS_PNG)
        plot_precision_recall_curves(targets, probs, classes, per_class, out / PR_CURVES_PNG)
    else:
        from sklearn.metrics import confusion_matrix

        matrix = confusion_matrix(targets, probs.argmax(axis=1), labels=list(range(len(classes))))
        with (out / CONFUSION_CSV).open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["true \\ predicted", *classes])
            writer.writerows([c, *(int(x) for x in row)] for c, row in zip(classes, matrix))
        plot_confusion_matrix(matrix, classes, out / CONFUSION_PNG)
    return report


def _write_predictions(path: Path, classifier: Classifier, records, probs: np.ndarray) -> None:
    multilabel = classifier.task == MULTILABEL
    with path.open("w", encoding="utf-8") as handle:
        for record, p in zip(records, probs):
            # An image stored in a data file by its row; a URL without its query (a SAS token).
            image = record.where if is_embedded(record.image) else redact(record.image)
            row: dict[str, Any] = {"image": image}
            if multilabel:
                row["labels"] = list(record.label)
                row["predicted_labels"] = predicted(classifier, p)
            else:
                row["label"] = record.label
                row["predicted_label"] = predicted(classifier, p)
            row["probs"] = {c: float(x) for c, x in zip(classifier.classes, p)}
            row["where"] = record.where
            handle.write(json.dumps(row) + "\n")


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
             for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(columns, widths)))]
    for row in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _print_summary(report: dict[str, Any], out) -> None:
    names = ["accuracy", "f1_score_macro", "precision_score_macro", "recall_score_macro"]
    if report["task"] == MULTILABEL:
        names += sorted(MULTILABEL_ONLY)
    print(f"evaluated {report['number_of_images']} image(s) ({report['task']})"
          + (f", {report['bad_rows_skipped']} bad row(s) skipped"
             if report.get("bad_rows_skipped") else "")
          + (f", threshold {_threshold_text(report)}" if report["task"] == MULTILABEL
             else ""))
    print("  ".join(f"{n} {report[n]:.4f}" for n in names))
    print(format_table(report["per_class"]))
    print(f"report written to {out}")


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no global backend switch, no pyplot state)
# ---------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _rotation(classes: list[str]) -> int:
    return 45 if len(classes) > 12 or max(len(c) for c in classes) > 3 else 0


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    n = len(classes)
    side = min(40.0, max(6.5, 0.6 * n + 3))
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    rotation = _rotation(classes)
    ax.set_xticks(range(n), labels=classes, rotation=rotation,
                  ha="right" if rotation else "center")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} images)")
    if n <= ANNOTATED_CELLS_UP_TO:
        dark = matrix.max() / 2 if matrix.max() else 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                        fontsize=10 if n <= 15 else 7,
                        color="white" if matrix[i, j] > dark else "black")
    fig.savefig(path)


def plot_per_class_metrics(per_class: list[dict[str, Any]], path: Path) -> None:
    classes = [row["class"] for row in per_class]
    n = len(classes)
    fig = _figure(min(40.0, max(8.0, 0.7 * n + 3)), 5.5)
    ax = fig.add_subplot()
    x = np.arange(n)
    width = 0.27
    for k, name in enumerate(("precision", "recall", "iou")):
        ax.bar(x + (k - 1) * width, [row[name] for row in per_class], width, label=name)
    rotation = _rotation(classes)
    ax.set_xticks(x, labels=classes, rotation=rotation, ha="right" if rotation else "center")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("score")
    ax.set_title("Per-class precision, recall and IoU")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    fig.savefig(path)


def plot_precision_recall_curves(
    targets: np.ndarray, probs: np.ndarray, classes: list[str], per_class: list[dict[str, Any]],
    path: Path,
) -> None:
    """One curve per class that has positives; a dot marks where the threshold puts it."""
    from matplotlib import colormaps
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = _figure(10, 7)
    ax = fig.add_subplot()
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    missing = []
    for c, name in enumerate(classes):
        if not targets[:, c].any():
            missing.append(name)  # no positive: recall is undefined
            continue
        colour = palette(c % palette.N)
        precision, recall, _ = precision_recall_curve(targets[:, c], probs[:, c])
        ap = average_precision_score(targets[:, c], probs[:, c])
        ax.plot(recall, precision, color=colour, lw=1.5, label=f"{name} (AP {ap:.2f})")
        ax.plot(per_class[c]["recall"], per_class[c]["precision"], "o", color=colour, ms=6)
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    title = "Precision-recall per class (dots: at the decision threshold)"
    if missing:
        title += f"\nnot drawn, no positive images: {', '.join(missing[:10])}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(classes) - len(missing):
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.savefig(path)
