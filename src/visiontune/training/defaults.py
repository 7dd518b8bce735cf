"""The defaults chain for the training inputs marked ``auto``.

Precedence (Azure's): the user's value > ``model_defaults.json`` in the model folder >
per-model defaults > per-task defaults > base defaults. Every value chosen here is recorded in
the config with the layer that chose it, so the run can print and save both.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from visiontune.config import FinetuneConfig
from visiontune.errors import UserError
from visiontune.inputs import FINETUNE_INPUTS
from visiontune.tasks import MULTICLASS, MULTILABEL

log = logging.getLogger(__name__)

MODEL_DEFAULTS_FILE = "model_defaults.json"

BASE: dict[str, Any] = {
    "number_of_epochs": 3,
    "training_batch_size": 8,
    "validation_batch_size": 8,
    "learning_rate": 5e-5,
    "optimizer": "adamw_hf",
    "gradient_accumulation_step": 1,
    "max_steps": -1,
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "learning_rate_scheduler": "warmup_linear",
    "metric_for_best_model": "loss",
    "label_smoothing_factor": 0.0,
    "max_grad_norm": 1.0,
    "number_of_workers": 8,
}

PER_TASK: dict[str, dict[str, Any]] = {
    MULTICLASS: {
        "number_of_epochs": 15,
        "learning_rate_scheduler": "warmup_cosine",
        "metric_for_best_model": "accuracy",
    },
    MULTILABEL: {
        "number_of_epochs": 15,
        "learning_rate_scheduler": "warmup_cosine",
        "metric_for_best_model": "iou",
        "label_smoothing_factor": 0.0,
    },
}


def _batch(n: int) -> dict[str, int]:
    return {"training_batch_size": n, "validation_batch_size": n}


PER_MODEL: dict[str, dict[str, Any]] = {
    "google/vit-base-patch16-224": {
        **_batch(72), "learning_rate": 5.0249077359786836e-05, "optimizer": "adamw",
        "weight_decay": 6.933735771405163e-07, "metric_for_best_model": "loss",
    },
    "microsoft/beit-base-patch16-224-pt22k-ft22k": {
        **_batch(72), "learning_rate": 9.973114624235077e-05,
        "weight_decay": 1.1847040694703787e-07, "metric_for_best_model": "loss",
    },
    "microsoft/swinv2-base-patch4-window12-192-22k": {
        **_batch(12), "learning_rate": 3.388822145881516e-05, "optimizer": "adafactor",
        "weight_decay": 1.6496304960471456e-08, "number_of_epochs": 5,
        "metric_for_best_model": "loss",
    },
    "facebook/deit-base-patch16-224": {
        **_batch(60), "learning_rate": 5e-5, "metric_for_best_model": "accuracy",
    },
    "apple/mobilevit-small": {
        **_batch(16), "learning_rate": 6.605687285815252e-05,
        "weight_decay": 1.3211374571630504e-05, "learning_rate_scheduler": "constant",
        "label_smoothing_factor": 0.1, "metric_for_best_model": "loss",
    },
    # The built-in model: a small CNN that fine-tunes well at a higher rate than the
    # transformers above (measured on the demo data; see README).
    "efficientnet-lite0": {
        **_batch(32), "learning_rate": 1e-3, "optimizer": "adamw", "weight_decay": 1e-4,
        "warmup_steps": 20,
    },
}

# Per-model values that do not hold for a task (Azure: mobilevit's smoothing is 0 multi-label).
PER_MODEL_TASK_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("apple/mobilevit-small", MULTILABEL): {"label_smoothing_factor": 0.0},
}

AUTO_NAMES = tuple(i.name for i in FINETUNE_INPUTS if i.auto)


def read_model_defaults(model_dir: str | Path) -> dict[str, Any]:
    """``model_defaults.json`` shipped inside a model folder, checked like user input."""
    path = Path(model_dir) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"--model_path: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"--model_path: {path} must hold a JSON object of input names to values")
    specs = {i.name: i for i in FINETUNE_INPUTS}
    unknown = sorted(set(data) - set(AUTO_NAMES))
    if unknown:
        raise UserError(
            f"--model_path: {path} sets {', '.join(unknown)}; it may set only: {', '.join(AUTO_NAMES)}"
        )
    return {k: specs[k].convert(v) for k, v in data.items()}


def apply_defaults(cfg: FinetuneConfig, model_name: str | None,
                   model_dir: str | Path | None = None) -> FinetuneConfig:
    """The config with the ``auto`` inputs left unset filled in, each recorded as chosen by
    its layer (``base``, ``task ...``, ``model ...``, ``model_defaults.json``)."""
    task = cfg.task_name
    layers = [
        ("base", BASE),
        (f"task {task}", PER_TASK.get(task, {})),
        (f"model {model_name}", PER_MODEL.get(model_name or "", {})),
        (f"model {model_name} ({task})", PER_MODEL_TASK_OVERRIDES.get((model_name or "", task), {})),
    ]
    if model_dir is not None:
        layers.append((f"{MODEL_DEFAULTS_FILE}", read_model_defaults(model_dir)))
    chosen: dict[str, dict[str, Any]] = {}  # layer -> the values it decides (the last one wins)
    for name in AUTO_NAMES:
        if getattr(cfg, name) is not None:
            continue
        decided = [(layer_name, layer[name]) for layer_name, layer in layers if name in layer]
        if decided:
            layer_name, value = decided[-1]
            chosen.setdefault(layer_name, {})[name] = value
    for layer_name, values in chosen.items():
        cfg = cfg.chosen(layer_name, **values)
    return cfg


def defaults_sources(cfg: FinetuneConfig) -> dict[str, str]:
    """Where each ``auto`` input's value came from, as the run prints it and
    ``finetune_args.json`` keeps it: ``user`` for a value given, else what chose it."""
    sources: dict[str, str] = {}
    for name in AUTO_NAMES:
        if cfg.given(name):
            sources[name] = "user"
        elif cfg.chosen_by(name) is not None:
            sources[name] = cfg.chosen_by(name)
    return sources
