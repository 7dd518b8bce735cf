"""``visiontune predict``: labels and probabilities for unlabelled images.

``--data`` may be an image folder (every image below it, sorted), a ``.txt`` file listing
image paths (relative to the file), or any table the data layer reads (JSON Lines, CSV,
Parquet, an MLTable folder, a saved Hugging Face dataset, WebDataset shards).
Labels are not needed: only the image column is read. An image that cannot be read or decoded
becomes an output row with an ``error`` field instead of stopping the run. Opening the model
and scoring the images are ``visiontune.inference``'s, shared with evaluation.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from visiontune.data.columnar import is_embedded
from visiontune.data.files import JSON_LINES_SUFFIXES, MLTABLE_FILE
from visiontune.data.sources import (
    IMAGE_SUFFIXES, resolve_image, source_path, table_rows, table_spec,
)
from visiontune.data.storage import redact
from visiontune.errors import DataError, UserError
from visiontune.inference import Classifier, open_model, predicted, score_images
from visiontune.metrics import probabilities
from visiontune.outputs import check_file_target
from visiontune.tasks import MULTILABEL

OUTPUT_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
ERRORS_SHOWN = 5


# ---------------------------------------------------------------------------------------------
# Finding the images
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One image to predict: how the output names it, and what to read (None: a bad row)."""

    image: str
    uri: str | None
    error: str | None = None


def list_images(source: str | Path, image_column: str = "image_url") -> list[Item]:
    """The images of every supported ``--data`` form, in a stable order."""
    path = source_path(source)
    if not (path.is_file() or path.is_dir()):  # a named pipe would block the read forever
        raise DataError(f"--data {redact(str(source))}: not a regular file or a folder"
                        if path.exists() else f"--data: not found: {redact(str(source))}")
    if path.is_file() and path.suffix.lower() == ".txt" and not _has_header(path, image_column):
        return _listed_images(path)
    spec = table_spec(path)
    if spec is not None:
        return _table_images(spec, image_column)
    if path.is_dir():
        return _folder_images(path, IMAGE_SUFFIXES)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [Item(str(path.resolve()), str(path.resolve()))]
    raise DataError(
        f"--data {redact(str(source))}: unknown data format; give an image folder, a .txt file "
        f"listing image paths, a JSON Lines ({', '.join(JSON_LINES_SUFFIXES)}), CSV (.csv, .tsv) or Parquet "
        "file, an MLTable folder, a saved Hugging Face dataset or WebDataset .tar shards"
    )


def _folder_images(root: Path, suffixes: frozenset[str]) -> list[Item]:
    found = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return [Item(str(p.resolve()), str(p.resolve())) for p in found]


def _has_header(path: Path, image_column: str) -> bool:
    """A .txt file is a path list unless its first line is a header naming the image column
    (then it is delimited text, as the data layer reads it)."""
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        for line in handle:
            if line.strip():
                fields = line.replace("\t", ",").split(",")
                return image_column in (f.strip().strip('"') for f in fields)
    return False


def _listed_images(path: Path) -> list[Item]:
    items = []
    text = path.read_text(encoding="utf-8-sig")
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.strip()
        if not value or value.startswith("#"):
            continue
        try:
            uri = resolve_image(value, path.parent)
        except ValueError as exc:
            items.append(Item(redact(value), None, f"{path}:{number}: {exc}"))
            continue
        items.append(Item(redact(uri), uri))
    return items


def _table_images(spec, image_column: str) -> list[Item]:
    """The image column of every row, labels or not. The row readers are the data layer's;
    only the column handling differs from training, which needs a label on every row."""
    if image_column in spec.drop_columns or (
        spec.keep_columns is not None and image_column not in spec.keep_columns
    ):
        raise DataError(f"{spec.base_dir / MLTABLE_FILE}: the MLTable drops the image column "
                        f"{image_column!r}")
    items: list[Item] = []
    for where, row in table_rows(spec, image_column, None, None):
        if isinstance(row, str):
            items.append(Item(where, None, f"{where}: {row}"))
            continue
        value = row.get(image_column)
        if not isinstance(value, str) or not value.strip():
            items.append(Item(where, None, f"{where}: no image in column {image_column!r}"))
            continue
        try:
            uri = resolve_image(value, spec.base_dir)
        except ValueError as exc:
            items.append(Item(redact(value), None, f"{where}: {exc}"))
            continue
        # An image stored inside the data file is named by its row, not by its extracted copy;
        # a URL without its query string (a SAS token).
        items.append(Item(where if is_embedded(uri) else redact(uri), uri))
    return items


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def output_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UserError(
            f"--output {path}: unknown file type {suffix or '(none)'!r}; use a .jsonl or .csv file"
        )
    return OUTPUT_FORMATS[suffix]


def run_predict(cfg) -> int:
    """``visiontune predict``. Exit code 0 when at least one image was predicted, 1 when none
    could be read."""
    result = predict(cfg)
    print(f"predicted {result.predicted} of {result.images} image(s) into {result.output}")
    if result.errors:
        shown = list(result.errors.values())[:ERRORS_SHOWN]
        more = len(result.errors) - len(shown)
        print(f"{len(result.errors)} image(s) could not be read (rows with an 'error' field): "
              + "; ".join(shown) + (f"; ... and {more} more" if more else ""))
    return 0 if result.predicted else 1


@dataclass(frozen=True)
class PredictionResult:
    """Where the predictions are, how many images were predicted, and the error of each image
    that could not be (by its row number, from 0)."""

    output: Path
    images: int
    predicted: int
    errors: dict[int, str]


def predict(cfg) -> PredictionResult:
    """Predict every image of ``data`` into ``output`` (a row for each, with an ``error`` field
    where an image could not be read)."""
    fmt = output_format(cfg.output)
    output = check_file_target(cfg.output, "output")  # before the model and the images
    classifier = open_model(cfg.model, cfg.runtime)
    items = list_images(cfg.data, cfg.image_column)
    if not items:
        raise DataError(f"--data {redact(str(cfg.data))}: no images found")

    readable = [i for i, item in enumerate(items) if item.uri is not None]
    logits, read_errors = score_images(classifier, [items[i].uri for i in readable],
                                       cfg.batch_size, desc="predict")

    probs = np.full((len(items), len(classifier.classes)), np.nan)
    probs[readable] = probabilities(logits, classifier.task)
    errors = {i: item.error for i, item in enumerate(items) if item.error is not None}
    errors.update({readable[j]: message for j, message in read_errors.items()})

    rows = []
    for i, item in enumerate(items):
        rows.append((item.image, None if i in errors else probs[i], errors.get(i)))
    write_predictions(output, fmt, classifier, rows)
    return PredictionResult(Path(output), len(items), len(items) - len(errors),
                            {i: errors[i] for i in sorted(errors)})


def write_predictions(
    output: Path, fmt: str, classifier: Classifier,
    rows: Sequence[tuple[str, np.ndarray | None, str | None]],
) -> None:
    """Write (image, probabilities or None, error or None) rows; whole or not at all."""
    multilabel = classifier.task == MULTILABEL
    key = "predicted_labels" if multilabel else "predicted_label"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        if fmt == "jsonl":
            for image, p, error in rows:
                record: dict[str, Any] = {"image": image}
                if p is None:
                    record.update({key: None, "probs": None, "error": error})
                else:
                    record[key] = predicted(classifier, p)
                    record["probs"] = {c: float(x) for c, x in zip(classifier.classes, p)}
                handle.write(json.dumps(record) + "\n")
        else:
            # Multi-label predictions are joined with ";", the form the data layer reads back.
            writer = csv.writer(handle)
            writer.writerow(["image", "predicted", *(f"prob_{c}" for c in classifier.classes),
                             "error"])
            for image, p, error in rows:
                if p is None:
                    writer.writerow([image, "", *([""] * len(classifier.classes)), error])
                    continue
                label = predicted(classifier, p)
                writer.writerow([image, ";".join(label) if multilabel else label,
                                 *(repr(float(x)) for x in p), ""])
    os.replace(tmp, output)
