"""A model folder's own record, ``model_selector_args.json``: named, read and written here only;
and the names of the other files finetune leaves in it.

Import writes it (where the model came from, Azure's layout), finetune rewrites it (task,
labels, preprocessing, threshold), evaluation stores a tuned threshold in it; fine-tuning,
prediction, serving and the model card read it."""

from __future__ import annotations

import json
from pathlib import Path

from visiontune.errors import UserError
from visiontune.outputs import write_json_atomic

METADATA_FILE = "model_selector_args.json"
# What finetune writes beside the weights, for the model card and for people: the resolved
# inputs and their sources, the augmentations, the best model's validation metrics.
ARGS_FILE = "finetune_args.json"
AUGMENTATIONS_FILE = "augmentations.json"
EVAL_RESULTS_FILE = "eval_results.json"


def metadata_path(folder: str | Path) -> Path:
    return Path(folder) / METADATA_FILE


def read_metadata(folder: str | Path) -> dict:
    """The folder's record; ``{}`` when it has none (a plain Hugging Face folder), a UserError
    naming the file when it is not a JSON object."""
    path = metadata_path(folder)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def write_metadata(folder: str | Path, metadata: dict) -> Path:
    """Write the record whole or not at all."""
    return write_json_atomic(metadata_path(folder), metadata)
