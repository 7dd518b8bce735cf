"""The model card: ``README.md`` in a fine-tuned model's folder, in the Hugging Face hub's format.

YAML front matter that the hub reads (library, pipeline tag, base model, tags, the metrics as a
model-index), then what a user of the folder needs: base model, task, labels, data, the
effective inputs, validation and test metrics, and how to load the model with transformers,
MLflow and visiontune. It is what the hub shows when the folder is pushed there.

Everything comes from the files finetune writes beside the weights, plus ``model_card.json``
for what no other file holds (the data summary, the test metrics), so the card can be written
again, or into another folder (the MLflow model's), from the model folder alone.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from visiontune import __version__
from visiontune.model_folder import ARGS_FILE, AUGMENTATIONS_FILE, EVAL_RESULTS_FILE, ModelFolder
from visiontune.outputs import write_text_atomic
from visiontune.tasks import MULTILABEL

CARD_FILE = "README.md"
FACTS_FILE = "model_card.json"
TASK_NAMES = {"image-classification": "multi-class (one label per image)",
              MULTILABEL: "multi-label (any number of labels per image)"}
# visiontune's metric -> (hub metric id, its configuration, the name shown)
HUB_METRICS = {
    "accuracy": ("accuracy", None, "Accuracy"),
    "f1_score_macro": ("f1", "macro", "F1 (macro)"),
    "precision_score_macro": ("precision", "macro", "Precision (macro)"),
    "recall_score_macro": ("recall", "macro", "Recall (macro)"),
    "iou": ("jaccard", "samples", "IoU (samples)"),
    "iou_micro": ("jaccard", "micro", "IoU (micro)"),
    "iou_macro": ("jaccard", "macro", "IoU (macro)"),
    "iou_weighted": ("jaccard", "weighted", "IoU (weighted)"),
}
# Inputs that say where things are or how fast they run, not what was trained: left out of
# the card's table of effective inputs.
NOT_SHAPING = frozenset({
    "model_path", "training_data", "validation_data", "output_dir_pytorch", "output_dir_mlflow",
    "number_of_workers", "resume_from_checkpoint", "save_as_mlflow_model", "image_column",
    "label_column", "max_image_mb", "validation_batch_size", "logging_strategy", "logging_steps",
    "save_strategy", "save_steps", "save_total_limit", "apply_ort", "skip_bad_rows",
})
TABLE_UP_TO = 100  # classes; beyond that the per-class tables are left to the evaluation report


# ---------------------------------------------------------------------------------------------
# Facts: plain data
# ---------------------------------------------------------------------------------------------
def data_summary(data) -> dict[str, Any]:
    """What the card says about a fine-tune's data (``data``: data.prepare.PreparedData)."""
    counts: dict[str, list[int]] = {c: [0, 0] for c in data.classes}
    for column, records in enumerate((data.train, data.validation)):
        for record in records:
            for label in (record.label if isinstance(record.label, tuple) else (record.label,)):
                counts.setdefault(str(label), [0, 0])[column] += 1
    return {
        "training_rows": len(data.train), "validation_rows": len(data.validation),
        "validation_is_split": bool(data.validation_is_split), "classes": len(data.classes),
        "bad_rows_skipped": len(data.skipped),
        "bad_rows": [str(p) for p in data.skipped[:5]],
        "images_per_class": counts, "image_sizes": dict(data.image_sizes or {}),
    }


def test_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the card says about an evaluation on test data (``report``: what evaluate writes
    to ``metrics.json``)."""
    return {
        "test_data": report.get("test_data"), "number_of_images": report.get("number_of_images"),
        "bad_rows_skipped": report.get("bad_rows_skipped") or 0,
        "metrics": {k: v for k, v in report.items() if k in HUB_METRICS},
        "per_class": report.get("per_class") or [],
        "multilabel_threshold": report.get("multilabel_threshold"),
    }


def read_facts(model_dir: str | Path) -> dict[str, Any]:
    """Everything the card shows, from the files finetune wrote in ``model_dir``."""
    folder = ModelFolder(Path(model_dir))
    meta = folder.metadata()
    args = folder.read_json(ARGS_FILE) or {}
    values = args.get("values") or {}
    model_meta = meta.get("model_metadata") or {}
    id2label = model_meta.get("id2label") or {}
    evaluation = folder.read_json(EVAL_RESULTS_FILE) or {}
    augmentations = folder.read_json(AUGMENTATIONS_FILE) or {}
    stored = folder.read_json(FACTS_FILE) or {}
    return {
        "base_model": model_meta.get("base_model_name") or meta.get("model_name"),
        "task": model_meta.get("finetuning_task") or values.get("task_name"),
        "classes": [id2label[k] for k in sorted(id2label, key=int)],
        "multilabel_threshold": meta.get("multilabel_threshold"),
        "preprocessing": meta.get("preprocessing") or augmentations.get("preprocessing"),
        "augmentations": [step.get("name") for step in augmentations.get("train") or []
                          if isinstance(step, dict)] if augmentations.get("apply_augmentations") else [],
        "inputs": values, "sources": args.get("sources") or {}, "notes": args.get("notes") or [],
        "validation": {k: v for k, v in evaluation.items() if k in HUB_METRICS or k == "loss"},
        "validation_per_class": evaluation.get("per_class") or [],
        "data": stored.get("data"),
        "test": stored.get("test"),
        "visiontune_version": __version__,
    }


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_model_card(folder: str | Path, *, model_dir: str | Path | None = None, data=None,
                     test: dict[str, Any] | None = None, mlflow_model: bool | None = None,
                     location: str | Path | None = None) -> Path:
    """Write ``README.md`` into ``folder``; returns its path.

    ``model_dir``: the fine-tuned model's files (default: ``folder``, or the model folder inside
    an MLflow model). ``data`` (a PreparedData, at the end of a fine-tune) and ``test`` (an
    evaluation report on test data) are stored in ``model_dir``'s ``model_card.json`` and shown
    from then on; new data starts a new record (an earlier run's test metrics are dropped).
    ``mlflow_model``: whether ``folder`` is an MLflow model (default: it has an MLmodel file).
    ``location``: where the folder will be read from, for the card's name and load paths
    (default: ``folder``; given when the card is written into a staging folder first)."""
    folder = Path(folder)
    model_dir = Path(model_dir) if model_dir is not None else ModelFolder.holding_record(folder).path
    if data is not None or test is not None:
        stored = {} if data is not None else (ModelFolder(model_dir).read_json(FACTS_FILE) or {})
        if data is not None:
            stored["data"] = data_summary(data)
        if test is not None:
            stored["test"] = test_summary(test)
        ModelFolder(model_dir).write_json(FACTS_FILE, stored)
    facts = read_facts(model_dir)
    if mlflow_model is None:
        mlflow_model = (folder / "MLmodel").is_file()
    shown = Path(location) if location is not None else folder
    facts["paths"] = _paths(folder, shown, model_dir, facts["inputs"], mlflow_model)
    facts["name"] = _name(shown)
    return write_card(folder, facts)


def write_card(folder: str | Path, facts: dict[str, Any]) -> Path:
    """Write the card of ``facts`` (as ``read_facts`` returns them, with ``paths`` and ``name``)
    into ``folder``."""
    path = Path(folder) / CARD_FILE
    write_text_atomic(path, render(facts))
    return path


def _name(folder: Path) -> str:
    """The folder's name, or its parent's for the generic names of visiontune's outputs
    (``runs/digits/pytorch`` is the model ``digits``)."""
    folder = folder.resolve()
    generic = {"pytorch", "mlflow", "mlflow_model", "model", "models", "output", "outputs", "out"}
    return folder.parent.name if folder.name.lower() in generic and folder.parent.name else folder.name


def _paths(folder: Path, shown: Path, model_dir: Path, values: dict[str, Any],
           mlflow_model: bool) -> dict:
    if mlflow_model:
        inside = ModelFolder.holding_record(folder).path  # the Hugging Face files the MLflow model carries
        hf = shown / inside.relative_to(folder) if inside != folder else model_dir
        return {"transformers": str(hf), "mlflow": str(shown), "visiontune": str(shown)}
    mlflow = None
    if values.get("save_as_mlflow_model"):
        mlflow = values.get("output_dir_mlflow") or str(shown / "mlflow_model")
    return {"transformers": str(shown), "mlflow": mlflow, "visiontune": str(shown)}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def hub_base_model(name: str | None) -> str | None:
    """``name`` when it is a Hugging Face hub id (``owner/model``), else None (a built-in model
    or a local folder's name, which the hub could not link)."""
    if not name or name.count("/") != 1 or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _metadata(facts: dict[str, Any]) -> str:
    task = facts["task"]
    results = []
    for split, metrics, dataset in (("validation", facts["validation"], _dataset_name(facts, "validation")),
                                    ("test", (facts.get("test") or {}).get("metrics") or {},
                                     _dataset_name(facts, "test"))):
        for name, value in metrics.items():
            if name not in HUB_METRICS or not isinstance(value, (int, float)):
                continue
            metric, config, shown = HUB_METRICS[name]
            if task == MULTILABEL and name == "accuracy":
                shown = "Accuracy (exact match)"
            results.append(EvalResult(
                task_type="image-classification", task_name="Image Classification",
                dataset_type="imagefolder", dataset_name=dataset, dataset_split=split,
                metric_type=metric, metric_value=round(float(value), 4), metric_config=config,
                metric_name=shown))
    tags = ["image-classification", "vision", "visiontune"]
    if task == MULTILABEL:
        tags.append("multi-label-classification")
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-classification",
        base_model=hub_base_model(facts.get("base_model")), tags=tags,
        model_name=facts.get("name") or "model", eval_results=results or None,
    )
    return data.to_yaml()


def _dataset_name(facts: dict[str, Any], split: str) -> str:
    values = facts.get("inputs") or {}
    if split == "test":
        source = (facts.get("test") or {}).get("test_data")
    else:
        source = values.get("validation_data") or values.get("training_data")
    if not source:
        return split
    parts = [p for p in str(source).replace("\\", "/").rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) if parts else split


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _metric(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else value


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _threshold_text(facts: dict[str, Any], classes: list[str]) -> str:
    threshold = facts.get("multilabel_threshold")
    if isinstance(threshold, list):
        return "per class: " + ", ".join(f"{c} {_cell(t)}" for c, t in zip(classes, threshold))
    return _cell(0.5 if threshold is None else threshold)


def _code(value: Any) -> str:
    return "`" + str(value).replace("`", "'") + "`"


def render(facts: dict[str, Any]) -> str:
    """The card's text: front matter, then Markdown."""
    task = facts.get("task") or "image-classification"
    multilabel = task == MULTILABEL
    classes = facts.get("classes") or []
    base = facts.get("base_model") or "an unknown model"
    body = [f"# {facts.get('name') or 'model'}", ""]
    body.append(f"A fine-tune of {_code(base)} for {TASK_NAMES.get(task, task)} image "
                f"classification into {len(classes)} classes, made with visiontune"
                + (f" {facts['visiontune_version']}" if facts.get("visiontune_version") else "")
                + ". Its preprocessing (size, normalisation) is saved in "
                "`preprocessor_config.json` and `model_selector_args.json`.")
    body += ["", "## Labels", "",
             ", ".join(f"{i}: {_code(c)}" for i, c in enumerate(classes)) or "(none recorded)"]
    if multilabel:
        body += ["", "A label is predicted when its sigmoid probability reaches the threshold "
                 f"({_threshold_text(facts, classes)}; stored as `multilabel_threshold` in "
                 "`model_selector_args.json`)."]
    body += _data_section(facts, classes)
    body += _inputs_section(facts)
    body += _metrics_section(facts, multilabel)
    body += _usage_section(facts, multilabel)
    return f"---\n{_metadata(facts)}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def _data_section(facts: dict[str, Any], classes: list[str]) -> list[str]:
    values = facts.get("inputs") or {}
    data = facts.get("data")
    lines = ["", "## Data", ""]
    if not data:
        lines.append(f"Training data: {_code(values.get('training_data', 'not recorded'))}.")
        return lines
    if data.get("validation_is_split"):
        validation = (f"held out of the training data ({_cell(values.get('validation_fraction'))} "
                      f"of it, seeded and stratified)")
    else:
        validation = _code(values.get("validation_data"))
    rows = [["training", _code(values.get("training_data")), data["training_rows"]],
            ["validation", validation, data["validation_rows"]]]
    test = facts.get("test")
    if test and test.get("test_data"):
        rows.append(["test", _code(test["test_data"]), test.get("number_of_images")])
    lines += _table(["split", "source", "images"], rows)
    lines += ["", f"{data['classes']} classes. Bad rows skipped: {data['bad_rows_skipped']}"
              + (" (`skip_bad_rows` true)" if data["bad_rows_skipped"] else "") + "."]
    for problem in data.get("bad_rows") or []:
        lines.append(f"- {_cell(problem)}")
    sizes = data.get("image_sizes") or {}
    if {"min_width", "max_width", "min_height", "max_height"} <= set(sizes):
        lines += ["", f"Image sizes seen: {sizes['min_width']}-{sizes['max_width']} px wide, "
                  f"{sizes['min_height']}-{sizes['max_height']} px high."]
    counts = data.get("images_per_class") or {}
    if counts and len(counts) <= TABLE_UP_TO:
        lines += ["", "Images per class:", ""]
        lines += _table(["class", "training", "validation"],
                        [[c, *counts.get(c, [0, 0])] for c in (classes or counts)])
    return lines


def _inputs_section(facts: dict[str, Any]) -> list[str]:
    values, sources = facts.get("inputs") or {}, facts.get("sources") or {}
    task = facts.get("task")
    rows = []
    for name, value in values.items():
        if name in NOT_SHAPING or value is None:
            continue
        if name == "multilabel_threshold" and task != MULTILABEL:
            continue
        if name == "validation_fraction" and not (facts.get("data") or {}).get("validation_is_split"):
            continue
        source = sources.get(name)
        rows.append([name, value, "" if source in (None, "user") else source])
    lines = ["", "## Training", ""]
    if not rows:
        return lines + ["The training inputs were not recorded."]
    lines += ["The effective inputs (the column on the right: what chose a value the defaults "
              "chain set):", ""]
    lines += _table(["input", "value", "chosen by"], rows)
    pre = facts.get("preprocessing") or {}
    if pre:
        lines += ["", f"Preprocessing: resize to {pre.get('height')}x{pre.get('width')} "
                  f"({pre.get('interpolation')}), normalise with mean {_cell(pre.get('mean'))} "
                  f"and std {_cell(pre.get('std'))}."]
    steps = facts.get("augmentations") or []
    lines += ["", "Training augmentations: " + (", ".join(steps) if steps else "none") + "."]
    for note in facts.get("notes") or []:
        lines.append(f"- note: {_cell(note)}")
    return lines


def _metrics_section(facts: dict[str, Any], multilabel: bool) -> list[str]:
    lines = ["", "## Evaluation", ""]
    validation, test = facts.get("validation") or {}, (facts.get("test") or {})
    names = [n for n in HUB_METRICS if n in validation or n in (test.get("metrics") or {})]
    if not names:
        return lines + ["No metrics were recorded."]
    header, rows = ["metric", "validation"], []
    if test:
        header.append("test")
    for name in [*names, *(["loss"] if "loss" in validation else [])]:
        row = [name, _metric(validation.get(name, ""))]
        if test:
            row.append(_metric((test.get("metrics") or {}).get(name, "")))
        rows.append(row)
    lines += _table(header, rows)
    lines += ["", "Validation: the best checkpoint, on the whole validation set."
              + (f" Test: {test.get('number_of_images')} images of {_code(test.get('test_data'))}"
                 + (f", {test['bad_rows_skipped']} bad row(s) skipped" if test.get("bad_rows_skipped") else "")
                 + "." if test else "")
              + (" Accuracy is the exact match of the label set; IoU is Jaccard's index." if multilabel else "")]
    per_class = test.get("per_class") or facts.get("validation_per_class") or []
    if per_class and len(per_class) <= TABLE_UP_TO:
        lines += ["", f"Per class ({'test' if test.get('per_class') else 'validation'}):", ""]
        columns = list(per_class[0])
        lines += _table(columns, [[_metric(row.get(c, "")) for c in columns] for row in per_class])
    return lines


def _usage_section(facts: dict[str, Any], multilabel: bool) -> list[str]:
    paths = facts.get("paths") or {}
    hf = json.dumps(paths.get("transformers") or "path/to/model")
    lines = ["", "## How to use", "", "With transformers:", "", "```python",
             "from transformers import pipeline", "",
             f'classifier = pipeline("image-classification", model={hf})']
    if multilabel:
        threshold = facts.get("multilabel_threshold")
        if isinstance(threshold, list):
            lines.append(f"threshold = {json.dumps(dict(zip(facts.get('classes') or [], threshold)))}")
            test = 'threshold[s["label"]]'
        else:
            test = _cell(0.5 if threshold is None else threshold)
        lines += ['scores = classifier("image.png", top_k=None)  # every label, sigmoid',
                  f'labels = [s["label"] for s in scores if s["score"] >= {test}]']
    else:
        lines.append('print(classifier("image.png"))  # the top labels with their probabilities')
    lines.append("```")
    if paths.get("mlflow"):
        lines += ["", "With MLflow (a DataFrame with an `image` column of base64-encoded image "
                  "files; `mlflow models serve -m FOLDER` serves the same):", "", "```python",
                  "import base64", "", "import mlflow", "import pandas as pd", "",
                  f"model = mlflow.pyfunc.load_model({json.dumps(paths['mlflow'])})",
                  'image = base64.b64encode(open("image.png", "rb").read()).decode()',
                  'print(model.predict(pd.DataFrame({"image": [image]})))', "```"]
    model = shlex.quote(paths.get("visiontune") or "path/to/model")
    lines += ["", "With visiontune (a folder, a file list, JSON Lines, CSV or an MLTable):", "",
              "```bash", f"visiontune predict --model {model} --data images/ --output predictions.jsonl",
              f"visiontune evaluate --model {model} --test_data labelled/ --output_dir report/",
              "```"]
    return lines
