"""The one list of the components' inputs: names, types, defaults, allowed values.

The CLI (``cli.py``), the ``--config`` YAML/JSON file, the Azure ML component specs and the
per-command configs (``config.py``, what library code receives) are built from or checked
against these tables, so an input is described exactly once.

``default=None`` on an optional input means "not given": for the training inputs marked
``auto`` the value is then chosen by the defaults chain (model folder > model > task > base).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from visiontune.errors import UserError

from visiontune.tasks import MULTICLASS, MULTILABEL, TASKS  # noqa: F401 (the input table's choices)

METRICS = (
    "loss", "f1_score_macro", "accuracy", "precision_score_macro", "recall_score_macro",
    "iou", "iou_macro", "iou_micro", "iou_weighted",
)
SCHEDULERS = (
    "warmup_linear", "warmup_cosine", "warmup_cosine_with_restarts", "warmup_polynomial",
    "constant", "warmup_constant",
)
OPTIMIZERS = ("adamw_hf", "adamw", "sgd", "adafactor", "adagrad", "adamw_ort_fused")
STRATEGIES = ("epoch", "steps")

# Azure ML component input types, by our kind of input.
AZURE_TYPES = {
    "int": "integer", "float": "number", "bool": "boolean", "str": "string",
    "folder": "uri_folder", "mltable": "mltable", "file": "uri_file",
}


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


# ``component_default=NO_DEFAULT``: the component declares no default although the CLI has one
# (Azure leaves apply_deepspeed and apply_ort unset, to be chosen per model).
NO_DEFAULT = _NoDefault()


@dataclass(frozen=True)
class Input:
    name: str
    kind: str  # int | float | bool | str | folder | mltable | file
    help: str
    default: Any = None
    required: bool = False
    choices: tuple = ()
    minimum: float | None = None  # inclusive
    below: float | None = None  # exclusive upper bound
    auto: bool = False  # None means "chosen by the defaults chain"
    azure: bool = True  # part of the interface of Azure's own component
    also: tuple = ()  # other allowed values outside [minimum, below), e.g. -1
    # The generated Azure ML components (components.py). ``description``: the input's text in
    # the component, the spec's full wording (``help`` stays the short CLI text); empty: help.
    # ``component``: in visiontune's component; None: when ``azure`` (visiontune's own extras
    # are optional component inputs too). ``component_default``: the default the component
    # declares where Azure's differs from the CLI's (the CLI keeps its own, e.g. auto).
    # ``component_type``: an Azure type other than the kind's, e.g. custom_model.
    # (NO_DEFAULT: the component declares none, the CLI's applies when the input is unset.)
    description: str = ""
    component: bool | None = None
    component_default: Any = None
    component_type: str | None = None

    @property
    def in_component(self) -> bool:
        return self.azure if self.component is None else self.component

    @property
    def component_description(self) -> str:
        return self.description or self.help

    def describe_allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.kind == "bool":
            return "true or false"
        parts = []
        if self.minimum is not None:
            parts.append(f">= {self.minimum:g}")
        if self.below is not None:
            parts.append(f"< {self.below:g}")
        text = f"{'an integer' if self.kind == 'int' else 'a number'} " + " and ".join(parts)
        if self.also:
            text += " (or " + ", ".join(str(a) for a in self.also) + ")"
        return text.strip()

    def convert(self, raw: Any) -> Any:
        """Parse and check one value; raise UserError naming the input otherwise."""
        if raw is None:
            return None
        try:
            value = _CONVERTERS[self.kind](raw)
        except (TypeError, ValueError):
            raise UserError(
                f"--{self.name}: {raw!r} is not valid; expected {self.describe_allowed()}"
            ) from None
        if self.choices and value not in self.choices:
            raise UserError(
                f"--{self.name}: {raw!r} is not allowed; expected {self.describe_allowed()}"
            )
        if self.kind in ("int", "float") and value not in self.also:
            if (self.minimum is not None and value < self.minimum) or (
                self.below is not None and value >= self.below
            ):
                raise UserError(
                    f"--{self.name}: {raw!r} is out of range; expected {self.describe_allowed()}"
                )
        return value


def parse_bool(raw: Any) -> bool:
    """Booleans as Azure passes them (True/False) and as people type them."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError(raw)


def _parse_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError(raw)
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(raw)
        return int(raw)
    return int(str(raw).strip())


def _parse_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(raw)
    value = float(str(raw).strip())
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _parse_str(raw: Any) -> str:
    if isinstance(raw, (dict, list)):
        raise ValueError(raw)
    return str(raw).strip()


_CONVERTERS = {
    "int": _parse_int, "float": _parse_float, "bool": parse_bool, "str": _parse_str,
    "folder": _parse_str, "mltable": _parse_str, "file": _parse_str,
}


# The finetune spec's full description of each of its inputs (docs: finetune-component.md),
# paragraphs joined by a space: the text Azure's users read in the component.
SPEC_TEXT: dict[str, str] = {
    'model_path': 'Path to the output directory of model import component.',
    'training_data': 'Path to the mltable folder of training dataset.',
    'validation_data': 'Path to the mltable folder of validation dataset.',
    'image_height': (
        'Final Image height after augmentation that is input to the network. Default '
        'value is -1 which means it would be overwritten by default image height in '
        'Hugging Face feature extractor. If either image_width or image_height is set to '
        '-1, default value would be used for both width and height.'
    ),
    'image_width': (
        'Final Image width after augmentation that is input to the network. Default value '
        'is -1 which means it would be overwritten by default image width in Hugging Face '
        'feature extractor. If either image_width or image_height is set to -1, default '
        'value would be used for both width and height.'
    ),
    'task_name': (
        'Which task the model is solving. It could be one of [`image-classification`, '
        '`image-classification-multilabel`].'
    ),
    'metric_for_best_model': (
        'Specify the metric to use to compare two different models. If left empty, will '
        'be chosen automatically based on the task type selected. It could be one of '
        '[`loss`, `f1_score_macro`, `accuracy`, `precision_score_macro`, '
        '`recall_score_macro`, `iou`, `iou_macro`, `iou_micro`, `iou_weighted`]. If '
        'selecting by yourself, use iou_* metrics in case of multi-label classification '
        'task. Generally, `accuracy` is chosen for multi-class classification task, and '
        '`iou` is chosen for multi-label classification task.'
    ),
    'apply_augmentations': (
        'If set to true, will enable data augmentations for training. The default value '
        'is true.'
    ),
    'number_of_workers': (
        'Number of subprocesses to use for data loading (PyTorch only). 0 means that the '
        'data will be loaded in the main process. The default value is 8.'
    ),
    'apply_deepspeed': (
        'If true enables deepspeed. If no `deepspeed_config` is provided, the default '
        'config in the component will be used else the user passed config will be used. '
        'The default value is false. Please note that to enable deepspeed, '
        '`apply_deepspeed` must be set to true.'
    ),
    'deepspeed_config': 'Path to the deepspeed config file.',
    'apply_ort': 'If true apply ORT optimization. The default value is false.',
    'number_of_epochs': (
        'Number of epochs to run for finetune. If left empty, will be chosen '
        'automatically based on the task type and model selected.'
    ),
    'max_steps': (
        "If set to a positive number, it's the total number of training steps to perform. "
        'It overrides `number_of_epochs`. In case of using a finite iterable dataset the '
        'training may stop before reaching the set number of steps when all data is '
        'exhausted. If left empty, will be chosen automatically based on the task type '
        'and model selected.'
    ),
    'training_batch_size': (
        'Batch size used for training. If left empty, will be chosen automatically based '
        'on the task type and model selected.'
    ),
    'validation_batch_size': (
        'Batch size used for validation. If left empty, will be chosen automatically '
        'based on the task type and model selected.'
    ),
    'auto_find_batch_size': (
        'If set to true, the train batch size will be automatically downscaled '
        'recursively till if finds a valid batch size that fits into memory. If the '
        "provided 'per_device_train_batch_size' goes into Out Of Memory (OOM) enabling "
        'auto_find_batch_size will find the correct batch size by iteratively reducing '
        "'per_device_train_batch_size' by a factor of 2 till the OOM is fixed. The "
        'default value is false.'
    ),
    'learning_rate': (
        'Start learning rate used for training. If left empty, will be chosen '
        'automatically based on the task type and model selected.'
    ),
    'learning_rate_scheduler': (
        'The learning rate scheduler to use. It could be one of [`warmup_linear`, '
        '`warmup_cosine`, `warmup_cosine_with_restarts`, `warmup_polynomial`, `constant`, '
        '`warmup_constant`]. If left empty, will be chosen automatically based on the '
        'task type and model selected.'
    ),
    'warmup_steps': (
        'The number of steps for the learning rate scheduler warmup phase. If left empty, '
        'will be chosen automatically based on the task type and model selected.'
    ),
    'optimizer': (
        "Optimizer to be used while training. 'adamw_ort_fused' optimizer is only "
        'supported for ORT training. It could be one of [`adamw_hf`, `adamw`, `sgd`, '
        '`adafactor`, `adagrad`, `adamw_ort_fused`] If left empty, will be chosen '
        'automatically based on the task type and model selected.'
    ),
    'weight_decay': (
        'The weight decay to apply (if not zero) to all layers except all bias and '
        'LayerNorm weights in AdamW optimizer. If left empty, will be chosen '
        'automatically based on the task type and model selected.'
    ),
    'extra_optim_args': (
        'Optional additional arguments that are supplied to SGD Optimizer. The arguments '
        'should be semi-colon separated key value pairs and should be enclosed in double '
        'quotes. For example, "momentum=0.5; nesterov=True" for sgd. Please make sure to '
        'use a valid parameter names for the chosen optimizer. For exact parameter names, '
        'please refer to '
        'https://pytorch.org/docs/1.13/generated/torch.optim.SGD.html#torch.optim.SGD for '
        'SGD. Parameters supplied in extra_optim_args will take precedence over the '
        'parameter supplied via other arguments such as weight_decay. If weight_decay is '
        'provided via "weight_decay" parameter and via extra_optim_args both, values '
        'specified in extra_optim_args will be used.'
    ),
    'gradient_accumulation_step': (
        'Number of updates steps to accumulate the gradients for, before performing a '
        'backward/update pass. If left empty, will be chosen automatically based on the '
        'task type and model selected.'
    ),
    'precision': (
        'Apply mixed precision training. This can reduce memory footprint by performing '
        'operations in half-precision. It could one of [`16`, `32`]. The default value is '
        '"32".'
    ),
    'label_smoothing_factor': (
        'The label smoothing factor to use in range `[0.0, 1,0)`. Zero means no label '
        'smoothing, otherwise the underlying onehot-encoded labels are changed from 0s '
        'and 1s to label_smoothing_factor/num_labels and 1 - label_smoothing_factor + '
        'label_smoothing_factor/num_labels respectively. Not applicable to multi-label '
        'classification. If left empty, will be chosen automatically based on the task '
        'type and model selected.'
    ),
    'random_seed': (
        'Random seed that will be set at the beginning of training. The default value is '
        '42.'
    ),
    'evaluation_strategy': (
        'The evaluation strategy to adopt during training. If set to "steps", either the '
        '`evaluation_steps_interval` or `evaluation_steps` needs to be specified, which '
        'helps to determine the step at which the model evaluation needs to be computed '
        'else evaluation happens at end of each epoch. The default value is "epoch". It '
        'could be one of [`epoch`, `steps`].'
    ),
    'evaluation_steps': (
        "Number of update steps between two evals if evaluation_strategy='steps'. The "
        'default value is 500.'
    ),
    'logging_strategy': (
        'The logging strategy to adopt during training. If set to "steps", the '
        '`logging_steps` will decide the frequency of logging else logging happens at the '
        'end of epoch. The default value is "epoch". It could be one of [`epoch`, '
        '`steps`].'
    ),
    'logging_steps': (
        "Number of update steps between two logs if logging_strategy='steps'. The default "
        'value is 500.'
    ),
    'save_strategy': (
        'The checkpoint save strategy to adopt during training. The default value is '
        '"epoch". It could be one of [`epoch`, `steps`].'
    ),
    'save_steps': (
        'Number of updates steps before two checkpoint saves if save_strategy="steps". '
        'The default value is 500.'
    ),
    'save_total_limit': (
        'If a value is passed, will limit the total number of checkpoints. Deletes the '
        'older checkpoints in output_dir. If the value is -1 saves all checkpoints". The '
        'default value is -1.'
    ),
    'early_stopping': 'If set to true, early stopping is enabled. The default value is false.',
    'early_stopping_patience': (
        "Stop training when the specified metric doesn't improve for "
        'early_stopping_patience evaluation calls. The default value is 1.'
    ),
    'max_grad_norm': (
        'Maximum gradient norm (for gradient clipping). If left empty, will be chosen '
        'automatically based on the task type and model selected.'
    ),
    'resume_from_checkpoint': (
        'If set to true, resumes the training from last saved checkpoint. Along with '
        'loading the saved weights, saved optimizer, scheduler and random states will be '
        'loaded if exists. The default value is false.'
    ),
    'save_as_mlflow_model': 'Save as mlflow model with pyfunc as flavour. The default value is true.',
    'output_dir_pytorch': (
        'The folder containing finetuned model output with checkpoints, model config, '
        'tokenizer, optimizer and scheduler states and random number states in case of '
        'distributed training.'
    ),
    'output_dir_mlflow': 'Output directory to save the finetuned model as mlflow model.',
}

# ---------------------------------------------------------------------------------------------
# Model import component
# ---------------------------------------------------------------------------------------------
MODEL_FAMILIES = ("HuggingFaceImage",)
# What the data inputs take (docs/data.md shows each with an example).
DATA_FORMS = ("an MLTable folder, a JSON Lines, CSV or Parquet file, a Hugging Face dataset saved "
              "with save_to_disk, WebDataset .tar shards, or an image folder tree")
IMPORT_INPUTS: tuple[Input, ...] = (
    Input("model_family", "str", "Model framework; only HuggingFaceImage (as in Azure's component).",
          default="HuggingFaceImage", choices=MODEL_FAMILIES,
          description="Which framework the model belongs to. HuggingFaceImage (Hugging Face "
          "transformers and timm image classifiers) is the only one."),
    Input("model_name", "str",
          "A Hugging Face hub id (downloaded when online), a local Hugging Face model folder, "
          "or the built-in 'efficientnet-lite0' (offline).",
          description="A Hugging Face hub id, downloaded from the hub when it is reachable (the "
          "model is subject to the license terms on its hub page), a local Hugging Face model "
          "folder, or the built-in 'efficientnet-lite0' (needs no download). A pytorch_model or "
          "mlflow_model input wins over it; model_name then only names the model."),
    Input("pytorch_model", "folder",
          "A model folder written by a previous visiontune or Hugging Face fine-tune "
          "(continual fine-tuning). Wins over model_name.",
          component_type="custom_model",
          description="A PyTorch (Hugging Face) model folder: the pytorch output of an earlier "
          "finetune (continual fine-tuning), the output of an earlier import, or any "
          "save_pretrained folder. Wins over model_name."),
    Input("mlflow_model", "folder",
          "An MLflow model folder (holds an MLmodel file). Wins over model_name.",
          component_type="mlflow_model",
          description="An MLflow model folder (it holds an MLmodel file), e.g. the mlflow output "
          "of an earlier finetune; the Hugging Face model inside it is imported. Wins over "
          "model_name."),
    Input("download_from_source", "bool",
          "Accepted for compatibility with Azure's component and ignored (a hub id is always "
          "downloaded from the hub).", default=False,
          description="Accepted for compatibility with Azure's component and ignored: Azure uses "
          "it to download a model from the Hugging Face hub instead of its model registry; "
          "visiontune has no registry and always downloads a hub id (model_name) from the hub."),
    Input("output_dir", "folder", "Where to write the imported model (read by finetune --model_path).",
          required=True,
          description="The imported model: a Hugging Face model folder (config.json, weights, "
          "preprocessor_config.json) with model_selector_args.json describing it; the finetune "
          "component's model_path."),
)

# ---------------------------------------------------------------------------------------------
# Data inputs shared by finetune, pipeline, data check, evaluate and predict
# ---------------------------------------------------------------------------------------------
MAX_IMAGE_MB = Input("max_image_mb", "int",
                     "Largest image file or download read, in MB; a larger one is a bad row.",
                     default=256, minimum=1, azure=False, component=True,
                     description="Largest image file or download read, in MB; a larger one is a "
                     "bad row (see skip_bad_rows).")
DATA_INPUTS: tuple[Input, ...] = (
    Input("image_column", "str", "Column of the annotation data that holds the image path or URL "
          "(or, in Parquet and Hugging Face datasets, the image itself; there, when image_url is "
          "absent, the one image column is used).",
          default="image_url", azure=False, component=True),
    Input("label_column", "str", "Column of the annotation data that holds the label(s) (in a "
          "Hugging Face dataset without a label column, its one ClassLabel column).",
          default="label", azure=False, component=True),
    Input("skip_bad_rows", "bool",
          "Skip rows whose image or label cannot be used (and report how many) instead of "
          "stopping before training.", default=False, azure=False, component=True,
          description="Set to true to skip rows whose image or label cannot be used (their number "
          "is reported) instead of stopping: by default a bad row stops the job before any "
          "training or evaluation, with the count and the first bad rows."),
    MAX_IMAGE_MB,
)

# ---------------------------------------------------------------------------------------------
# Finetune component (spec order), then visiontune's own additions
# ---------------------------------------------------------------------------------------------
FINETUNE_INPUTS: tuple[Input, ...] = (
    Input("model_path", "folder", "Output folder of import-model (or any Hugging Face model folder).",
          required=True,
          description=SPEC_TEXT["model_path"]),
    Input("training_data", "mltable",
          f"Training data: {DATA_FORMS}.",
          required=True,
          description=SPEC_TEXT["training_data"]),
    Input("validation_data", "mltable",
          "Validation data, same forms. Without it a seeded, stratified part of the training data "
          "is held out (validation_fraction).",
          description=SPEC_TEXT["validation_data"]),
    Input("image_height", "int", "Image height fed to the network; -1 uses the image processor's size.",
          default=-1, minimum=1, also=(-1,),
          description=SPEC_TEXT["image_height"]),
    Input("image_width", "int", "Image width fed to the network; -1 uses the image processor's size.",
          default=-1, minimum=1, also=(-1,),
          description=SPEC_TEXT["image_width"]),
    Input("task_name", "str", "The task.", required=True, choices=TASKS,
          description=SPEC_TEXT["task_name"]),
    Input("metric_for_best_model", "str",
          "Metric used to keep the best model; empty chooses accuracy (multi-class) or iou "
          "(multi-label).", choices=METRICS, auto=True,
          description=SPEC_TEXT["metric_for_best_model"]),
    Input("apply_augmentations", "bool", "Augment the training images.", default=True,
          description=SPEC_TEXT["apply_augmentations"]),
    Input("number_of_workers", "int",
          "Data loading processes; 0 loads in the main process. Default: 8, at most the CPUs "
          "per process; 0 on a CPU-only run, where workers would take the training's cores.",
          minimum=0, auto=True,
          description=SPEC_TEXT["number_of_workers"], component_default=8),
    Input("apply_deepspeed", "bool", "Train with DeepSpeed.", default=False,
          description=SPEC_TEXT["apply_deepspeed"], component_default=NO_DEFAULT),
    Input("deepspeed_config", "file", "DeepSpeed JSON config; the built-in one when empty.",
          description=SPEC_TEXT["deepspeed_config"]),
    Input("apply_ort", "bool", "Use ONNX Runtime (docs/onnx.md: what it does in visiontune).",
          default=False,
          description=SPEC_TEXT["apply_ort"], component_default=NO_DEFAULT),
    Input("number_of_epochs", "int", "Training epochs.", minimum=1, auto=True,
          description=SPEC_TEXT["number_of_epochs"]),
    Input("max_steps", "int", "Total optimizer steps; overrides number_of_epochs when positive.",
          minimum=1, also=(-1,), auto=True,
          description=SPEC_TEXT["max_steps"]),
    Input("training_batch_size", "int", "Training batch size per device.", minimum=1, auto=True,
          description=SPEC_TEXT["training_batch_size"]),
    Input("validation_batch_size", "int", "Validation batch size per device.", minimum=1, auto=True,
          description=SPEC_TEXT["validation_batch_size"]),
    Input("auto_find_batch_size", "bool",
          "Halve the training batch size on out-of-memory errors until it fits.", default=False,
          description=SPEC_TEXT["auto_find_batch_size"]),
    Input("learning_rate", "float", "Initial learning rate.", minimum=0, auto=True,
          description=SPEC_TEXT["learning_rate"]),
    Input("learning_rate_scheduler", "str", "Learning-rate schedule.", choices=SCHEDULERS, auto=True,
          description=SPEC_TEXT["learning_rate_scheduler"]),
    Input("warmup_steps", "int", "Warm-up steps of the schedule.", minimum=0, auto=True,
          description=SPEC_TEXT["warmup_steps"]),
    Input("optimizer", "str", "Optimizer.", choices=OPTIMIZERS, auto=True,
          description=SPEC_TEXT["optimizer"]),
    Input("weight_decay", "float", "Weight decay (not on biases and norm weights).", minimum=0,
          auto=True,
          description=SPEC_TEXT["weight_decay"]),
    Input("extra_optim_args", "str",
          "Extra optimizer arguments, e.g. \"momentum=0.5; nesterov=True\" for sgd; they win over "
          "the other inputs.",
          description=SPEC_TEXT["extra_optim_args"], component_default=""),
    Input("gradient_accumulation_step", "int", "Batches accumulated per optimizer step.", minimum=1,
          auto=True,
          description=SPEC_TEXT["gradient_accumulation_step"]),
    Input("precision", "int", "16: mixed precision (fp16/bf16 on GPU; bf16 on a CPU with native bf16, float32 on others); 32: full.",
          default=32, choices=(16, 32),
          description=SPEC_TEXT["precision"]),
    Input("label_smoothing_factor", "float", "Label smoothing in [0, 1); multi-class only.",
          minimum=0, below=1, auto=True,
          description=SPEC_TEXT["label_smoothing_factor"]),
    Input("random_seed", "int", "Random seed.", default=42, minimum=0,
          description=SPEC_TEXT["random_seed"]),
    Input("evaluation_strategy", "str", "When to evaluate.", default="epoch", choices=STRATEGIES,
          description=SPEC_TEXT["evaluation_strategy"]),
    Input("evaluation_steps", "int", "Steps between evaluations (evaluation_strategy steps).",
          default=500, minimum=1,
          description=SPEC_TEXT["evaluation_steps"]),
    Input("logging_strategy", "str", "When to log.", default="epoch", choices=STRATEGIES,
          description=SPEC_TEXT["logging_strategy"]),
    Input("logging_steps", "int", "Steps between logs (logging_strategy steps).", default=500,
          minimum=1,
          description=SPEC_TEXT["logging_steps"]),
    Input("save_strategy", "str", "When to save checkpoints.", default="epoch", choices=STRATEGIES,
          description=SPEC_TEXT["save_strategy"]),
    Input("save_steps", "int", "Steps between checkpoints (save_strategy steps).", default=500,
          minimum=1,
          description=SPEC_TEXT["save_steps"]),
    Input("save_total_limit", "int", "Checkpoints kept; -1 keeps all.", default=-1, minimum=1,
          also=(-1,),
          description=SPEC_TEXT["save_total_limit"]),
    Input("early_stopping", "bool", "Stop when the metric stops improving.", default=False,
          description=SPEC_TEXT["early_stopping"]),
    Input("early_stopping_patience", "int", "Evaluations without improvement before stopping.",
          default=1, minimum=1,
          description=SPEC_TEXT["early_stopping_patience"]),
    Input("max_grad_norm", "float", "Gradient clipping norm; 0 disables clipping.", minimum=0,
          auto=True,
          description=SPEC_TEXT["max_grad_norm"]),
    Input("resume_from_checkpoint", "bool",
          "Continue from the newest complete checkpoint in output_dir_pytorch.", default=False,
          description=SPEC_TEXT["resume_from_checkpoint"]),
    Input("save_as_mlflow_model", "bool", "Also write an MLflow model.", default=True,
          description=SPEC_TEXT["save_as_mlflow_model"]),
    # Outputs.
    Input("output_dir_pytorch", "folder", "Output: the fine-tuned model and its checkpoints.",
          required=True,
          description=SPEC_TEXT["output_dir_pytorch"], component_type="custom_model"),
    Input("output_dir_mlflow", "folder", "Output: the MLflow model (when save_as_mlflow_model).",
          description=SPEC_TEXT["output_dir_mlflow"], component_type="mlflow_model"),
    # visiontune additions.
    *DATA_INPUTS,
    Input("validation_fraction", "float",
          "Share of the training data held out for validation when validation_data is empty.",
          default=0.2, minimum=0.01, below=1, azure=False, component=True),
    Input("multilabel_threshold", "float",
          "Probability above which a label is predicted (multi-label).", default=0.5, minimum=0,
          below=1, azure=False, component=True,
          description="Multi-label: the probability above which a label is predicted, stored "
          "with the model (prediction and the MLflow model use it)."),
)

DATA_CHECK_INPUTS: tuple[Input, ...] = (
    Input("data", "mltable", f"The data: {DATA_FORMS}.", required=True, azure=False),
    Input("task_name", "str", "The task.", required=True, choices=TASKS),
    *DATA_INPUTS,
)

DEMO_INPUTS: tuple[Input, ...] = (
    Input("output_dir", "folder", "Where to write the demo datasets.", required=True, azure=False),
)

# ---------------------------------------------------------------------------------------------
# Pipeline: model import -> data validation -> finetune -> evaluation
# ---------------------------------------------------------------------------------------------
_IMPORT_SOURCES = tuple(i for i in IMPORT_INPUTS if i.name != "output_dir")
PIPELINE_INPUTS: tuple[Input, ...] = (
    *_IMPORT_SOURCES,
    *(i for i in FINETUNE_INPUTS if i.name != "model_path"),
    Input("test_data", "mltable",
          "Data for the final evaluation report; the validation data when empty."),
    Input("output_dir_evaluation", "folder",
          "Output: the evaluation report (metrics, per-class table, plots); "
          "<output_dir_pytorch>/evaluation when empty."),
)

# ---------------------------------------------------------------------------------------------
# Evaluation, prediction, ONNX export
# ---------------------------------------------------------------------------------------------
# The evaluate component (visiontune's own; the pipeline's evaluation step) carries the inputs
# marked component=True; threshold tuning writes into the model folder, a read-only job input.
MODEL_INPUT = Input("model", "folder", "A fine-tuned model: the PyTorch output folder or the MLflow "
                    "model folder.", required=True, azure=False, component=True)
BATCH_INPUT = Input("batch_size", "int", "Images per forward pass.", default=32, minimum=1, azure=False,
                    component=True)
RUNTIME_INPUT = Input("runtime", "str", "auto: ONNX Runtime when the model has an ONNX export "
                      "(finetune --apply_ort true) and there is no GPU, else PyTorch.",
                      default="auto", choices=("auto", "pytorch", "onnxruntime"), azure=False,
                      component=True)

EVALUATE_INPUTS: tuple[Input, ...] = (
    MODEL_INPUT,
    Input("test_data", "mltable", "Labelled data to evaluate on, in the forms training_data takes.",
          required=True, azure=False, component=True),
    Input("output_dir", "folder", "Where to write metrics.json, per_class.csv and the plots.",
          required=True, azure=False, component=True,
          description="The evaluation report: metrics.json, per_class.csv, predictions.jsonl and "
          "the plots."),
    Input("tune_thresholds", "str",
          "Multi-label: choose the decision threshold(s) on --tuning_data (default: the test data) "
          "and store them with the model.", default="none", choices=("none", "global", "per_class"),
          azure=False),
    Input("tuning_data", "mltable", "Labelled data for threshold tuning (use validation data, not "
          "the test data, for an honest report).", azure=False),
    Input("threshold_metric", "str", "The metric the tuned threshold(s) maximise.", default="f1",
          choices=("f1", "iou", "iou_macro", "iou_micro"), azure=False),
    BATCH_INPUT,
    RUNTIME_INPUT,
    *DATA_INPUTS,
)

PREDICT_INPUTS: tuple[Input, ...] = (
    MODEL_INPUT,
    Input("data", "mltable", "Images to predict: an image folder, a text file listing image paths, "
          "or a table as training_data takes (labels not needed).", required=True, azure=False),
    Input("output", "file", "Predictions file: .jsonl or .csv.", required=True, azure=False),
    BATCH_INPUT,
    RUNTIME_INPUT,
    Input("image_column", "str", "Column of the annotation data that holds the image (path, URL "
          "or, in Parquet and Hugging Face datasets, the image itself).",
          default="image_url", azure=False),
    MAX_IMAGE_MB,
)

EXPORT_ONNX_INPUTS: tuple[Input, ...] = (
    MODEL_INPUT,
    Input("output_dir", "folder", "Where to write model.onnx and its metadata.", required=True,
          azure=False),
    Input("opset", "int", "ONNX opset version (18 or newer: the exporter writes no older one).", default=18, minimum=18, azure=False),
)

OUTPUT_NAMES = frozenset({"output_dir", "output_dir_pytorch", "output_dir_mlflow",
                          "output_dir_evaluation"})


def by_name(inputs: Iterable[Input]) -> dict[str, Input]:
    return {i.name: i for i in inputs}


# ---------------------------------------------------------------------------------------------
# argparse and config files
# ---------------------------------------------------------------------------------------------
def add_to_parser(parser: argparse.ArgumentParser, inputs: Iterable[Input]) -> None:
    """One ``--name`` option per input. Defaults are applied later, so that a ``--config``
    file can sit between the command line and the defaults."""
    for spec in inputs:
        default = "auto" if spec.auto else spec.default
        suffix = "" if default is None else f" (default: {str(default).lower() if spec.kind == 'bool' else default})"
        if spec.required:
            suffix = " (required)"
        metavar = {"bool": "true|false", "folder": "DIR", "mltable": "DATA", "file": "FILE"}.get(
            spec.kind, spec.kind.upper()
        )
        parser.add_argument(
            f"--{spec.name}", dest=spec.name, default=argparse.SUPPRESS, metavar=metavar,
            help=spec.help + suffix,
        )


def read_config_file(path: str | None) -> dict[str, Any]:
    """A YAML or JSON mapping of input names to values (JSON is YAML)."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config: not a file: {path}" if file.exists() else f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"--config: {path} is not UTF-8 text (a YAML or JSON file is)") from None
    except OSError as exc:
        raise UserError(f"--config: cannot read {path} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"--config: {path} is not valid YAML or JSON{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} must hold a mapping of input names to values")
    return data


def as_json(values: Any) -> str:
    """A command's resolved inputs as JSON: a config (``visiontune.config``) or a mapping."""
    if hasattr(values, "as_dict"):
        values = values.as_dict()
    return json.dumps(values, indent=2, sort_keys=True, default=str)


def default_text(spec: Input) -> str:
    """How a default reads in --help, docs/inputs.md and the component specs."""
    if spec.required:
        return "required"
    if spec.auto:
        return "auto"
    if spec.default is None:
        return "-"
    if spec.kind == "bool":
        return str(spec.default).lower()
    return str(spec.default)


def markdown_table(inputs: Iterable[Input]) -> str:
    """The table of inputs in docs/inputs.md (a test keeps the page equal to it)."""
    lines = ["| input | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for spec in inputs:
        allowed = ", ".join(f"`{c}`" for c in spec.choices) if spec.choices else (
            spec.describe_allowed() if spec.kind in ("int", "float") and (spec.minimum is not None or spec.below is not None) else "")
        name = f"`--{spec.name}`" + ("" if spec.azure else " *")
        lines.append(f"| {name} | {AZURE_TYPES[spec.kind]} | {default_text(spec)} | {allowed} | {spec.help} |")
    return "\n".join(lines)


def readme_tables() -> str:
    """The input tables of docs/inputs.md, one per command."""
    sections = (("import-model", IMPORT_INPUTS), ("finetune", FINETUNE_INPUTS),
                ("pipeline (the inputs of import-model but output_dir, of finetune but model_path, and)",
                 PIPELINE_INPUTS[-2:]),
                ("evaluate", EVALUATE_INPUTS), ("predict", PREDICT_INPUTS),
                ("export-onnx", EXPORT_ONNX_INPUTS), ("data check", DATA_CHECK_INPUTS),
                ("demo-data", DEMO_INPUTS))
    return "\n\n".join(f"#### {title}\n\n{markdown_table(table)}" for title, table in sections)


if __name__ == "__main__":  # python -m visiontune.inputs: print the tables of docs/inputs.md
    print(readme_tables())
