"""Labels: checking their shape for the task, the class list, and encoding for training.

Multi-class rows carry one label, a string or an integer (integers become strings, so ``3`` and
``"3"`` are the same class). Multi-label rows carry a list of them; an empty list means "none of
the classes" and duplicates collapse. Booleans, floats, null and nested values are refused:
``1.0`` or ``true`` as a class name is almost always a mistake upstream.

In CSV files every value is text, so a multi-label cell is read as either a JSON list
(``["cat","dog"]``) or labels joined by ``,`` or ``;`` (``cat;dog``, ``"cat,dog"`` quoted);
an empty cell is an empty list. A multi-class CSV cell is the label as written, trimmed.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

import numpy as np

from visiontune.errors import DataError
from visiontune.tasks import MULTICLASS, MULTILABEL, check_task

Label = str | tuple[str, ...]

_INTEGER = re.compile(r"[+-]?\d+")


def _one_label(value: Any) -> str:
    """One class name from a JSON value; ValueError says what is wrong."""
    if isinstance(value, bool):
        raise ValueError(f"label {json.dumps(value)} is a boolean; expected a string or an integer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("empty label")
        return text
    if value is None:
        raise ValueError("label is null")
    if isinstance(value, float):
        raise ValueError(f"label {value!r} is a number with a fraction; expected a string or an integer")
    kind = "list" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__
    raise ValueError(f"label is a {kind}; expected a string or an integer")


def normalize_label(value: Any, task: str) -> Label:
    """The label of one row from JSON: str (multi-class) or sorted tuple of str (multi-label)."""
    if task == MULTICLASS:
        if isinstance(value, list):
            raise ValueError(
                f"label {_short(value)} is a list, but {MULTICLASS} needs one label per image "
                f"(use task {MULTILABEL} for several)"
            )
        return _one_label(value)
    if not isinstance(value, list):
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            raise ValueError(
                f"label {_short(value)} is a single value, but {MULTILABEL} needs a list of labels "
                f"(e.g. [{json.dumps(value)}])"
            )
        _one_label(value)  # raises with the right words for null/float/bool/object
    labels = set()
    for item in value:
        try:
            labels.add(_one_label(item))
        except ValueError as exc:
            raise ValueError(f"in the label list {_short(value)}: {exc}") from None
    return tuple(sorted(labels))


def parse_text_label(text: str | None, task: str) -> Label:
    """The label of one row from a CSV cell (see the module docstring for the forms)."""
    if text is None:
        raise ValueError("label cell missing")
    text = text.strip()
    if task == MULTICLASS:
        if not text:
            raise ValueError("empty label")
        return text
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"label {_short(text)} starts with '[' but is not a JSON list ({exc.msg})") from None
        return normalize_label(value, task)
    parts = [p.strip() for p in re.split(r"[;,]", text)]
    return tuple(sorted({p for p in parts if p}))


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def class_sort_key_fn(names: Iterable[str]):
    """Numeric order when every class is an integer ("2" before "10"), else text order."""
    names = list(names)
    if names and all(_INTEGER.fullmatch(n) for n in names):
        return lambda n: (int(n), n)
    return lambda n: n


def sort_classes(names: Iterable[str]) -> list[str]:
    unique = set(names)
    return sorted(unique, key=class_sort_key_fn(unique))


def _labels_of(item: Any) -> Iterable[str]:
    label = getattr(item, "label", item)
    if isinstance(label, str):
        return (label,)
    return tuple(label)


def build_classes(*record_lists: Iterable[Any]) -> list[str]:
    """The sorted union of the labels of all lists (Records, or labels themselves); the class
    id is the position in this list."""
    names: set[str] = set()
    for records in record_lists:
        for item in records:
            names.update(_labels_of(item))
    return sort_classes(names)


def encode_label(label: Label, class_to_id: dict[str, int], task: str) -> int | np.ndarray:
    """Class id (multi-class) or a float32 multi-hot vector of len(class_to_id) (multi-label)."""
    try:
        if task == MULTICLASS:
            if not isinstance(label, str):
                raise DataError(f"multi-class label must be one string, got {label!r}")
            return class_to_id[label]
        check_task(task)
        vector = np.zeros(len(class_to_id), dtype=np.float32)
        for name in _labels_of(label):
            vector[class_to_id[name]] = 1.0
        return vector
    except KeyError as exc:
        known = ", ".join(list(class_to_id)[:20])
        raise DataError(f"label {exc.args[0]!r} is not one of the classes ({known})") from None
