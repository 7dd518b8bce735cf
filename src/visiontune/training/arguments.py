"""From the component's inputs to Hugging Face ``TrainingArguments``.

Everything here runs before any data or model is loaded, so a bad combination of inputs
fails in a second with one line naming the input. Where the Trainer would reject a
combination that has an obvious fix, the fix is applied and stated (``notes``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune import ranks, settings
from visiontune.config import FinetuneConfig
from visiontune.errors import UserError
from visiontune.hardware import (
    CpuKind, GpuKind, cpu_bf16, cpu_kind, cpu_paths, gpu_kind, gpu_paths, gpu_training_options,
    normalise_on_device, warn_unusable_gpu,
)
from visiontune.tasks import MULTICLASS, MULTILABEL
from visiontune.training.deepspeed import autocast_16bit, plan_deepspeed
from visiontune.training.tracking import plan_tracking

log = logging.getLogger(__name__)

SCHEDULER_NAMES = {
    "warmup_linear": "linear",
    "warmup_cosine": "cosine",
    "warmup_cosine_with_restarts": "cosine_with_restarts",
    "warmup_polynomial": "polynomial",
    "constant": "constant",
    "warmup_constant": "constant_with_warmup",
}

# adamw_hf (the removed transformers AdamW) runs as torch's AdamW, like "adamw": the fused
# kernel (the Trainer's own default): one pass over all weights instead of a loop over tensors,
# faster per optimizer step on the CPU (BENCHMARKS.md, *Levers*), the same update up to float
# rounding.
OPTIMIZER_NAMES = {
    "adamw_hf": "adamw_torch_fused",
    "adamw": "adamw_torch_fused",
    "sgd": "sgd",
    "adafactor": "adafactor",
    "adagrad": "adagrad",
}

# extra_optim_args keys each optimizer honours, and where each goes: "optim_args" passes the
# key to the optimizer, any other value names the TrainingArguments field it sets.
EXTRA_OPTIM_KEYS: dict[str, dict[str, str]] = {
    "sgd": {"momentum": "optim_args", "dampening": "optim_args", "nesterov": "optim_args",
            "weight_decay": "weight_decay", "lr": "learning_rate"},
    "adagrad": {"lr_decay": "optim_args", "eps": "optim_args", "weight_decay": "weight_decay",
                "lr": "learning_rate"},
    "adamw_torch_fused": {"beta1": "adam_beta1", "beta2": "adam_beta2", "eps": "adam_epsilon",
                          "weight_decay": "weight_decay", "lr": "learning_rate"},
    "adafactor": {"weight_decay": "weight_decay", "lr": "learning_rate"},
}


def parse_extra_optim_args(text: str | None) -> dict[str, Any]:
    """``"momentum=0.5; nesterov=True"`` -> ``{"momentum": 0.5, "nesterov": True}``."""
    if not text:
        return {}
    result: dict[str, Any] = {}
    for part in text.strip().strip('"').strip("'").replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise UserError(
                f"--extra_optim_args: cannot read {part!r}; write key=value pairs separated by "
                f"';', e.g. \"momentum=0.5; nesterov=True\""
            )
        if raw.lower() in ("true", "false"):
            value: Any = raw.lower() == "true"
        else:
            try:
                value = float(raw)
            except ValueError:
                raise UserError(
                    f"--extra_optim_args: {key}={raw!r} is not a number or true/false"
                ) from None
        result[key] = value
    return result


def read_deepspeed_config(path: str | None) -> dict[str, Any] | None:
    """A DeepSpeed config must be a JSON object; checked here, before anything is loaded."""
    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--deepspeed_config: file not found: {path}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(f"--deepspeed_config: invalid JSON in deepspeed config file {path}{where}") from None
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed_config: {path} must hold a JSON object (a DeepSpeed config)")
    return config


def ort_training_available() -> bool:
    """ORT training (ORTModule) does not import with current torch; check rather than assume."""
    try:
        from onnxruntime.training.ortmodule import ORTModule  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class Plan:
    """What the run will do: TrainingArguments keywords and the decisions stated to the user."""

    config: FinetuneConfig  # the inputs planned for, with check_inputs' alignments
    training_args: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    deepspeed_config: dict[str, Any] | None = None
    mlflow_tracking: bool = False  # training/tracking.py: the Trainer's MLflow callback, guarded
    normalise_on_device: bool = False  # uint8 batches, normalised by the trainer on the GPU


def check_inputs(cfg: FinetuneConfig) -> tuple[FinetuneConfig, list[str]]:
    """Cross-input rules. Returns the config with the stated alignments applied (each recorded
    as chosen by its note) and the notes."""
    notes: list[str] = []
    task = cfg.task_name
    metric = cfg.metric_for_best_model
    if task == MULTICLASS and metric and metric.startswith("iou"):
        raise UserError(
            f"--metric_for_best_model: {metric} is for multi-label classification; for "
            f"{MULTICLASS} use one of loss, accuracy, f1_score_macro, precision_score_macro, "
            "recall_score_macro"
        )
    if task == MULTILABEL and cfg.label_smoothing_factor:
        notes.append(
            f"label_smoothing_factor {cfg.label_smoothing_factor} reset to 0: label smoothing "
            "does not apply to multi-label classification"
        )
        cfg = cfg.chosen(notes[-1], label_smoothing_factor=0.0)
    if cfg.optimizer == "adamw_ort_fused":
        if not cfg.apply_ort:
            raise UserError("--optimizer: adamw_ort_fused needs --apply_ort true (ONNX Runtime training)")
        if not ort_training_available():
            raise UserError(
                "--optimizer: adamw_ort_fused needs ONNX Runtime training, which does not import "
                "with this torch; choose one of adamw_hf, adamw, sgd, adafactor, adagrad"
            )
    if cfg.deepspeed_config and not cfg.apply_deepspeed:
        notes.append("deepspeed_config is ignored: apply_deepspeed is false")
    if cfg.output_dir_mlflow is None and cfg.save_as_mlflow_model:
        mlflow_dir = str(Path(cfg.output_dir_pytorch) / "mlflow_model")
        notes.append(f"output_dir_mlflow not given: the MLflow model goes to {mlflow_dir}")
        cfg = cfg.chosen(notes[-1], output_dir_mlflow=mlflow_dir)

    # The best model is kept at the end (as in Azure), so checkpoints must line up with
    # evaluations; align instead of letting the Trainer refuse.
    ev, sv = cfg.evaluation_strategy, cfg.save_strategy
    if ev != sv:
        notes.append(
            f"save_strategy set to {ev!r} to match evaluation_strategy: the best model is chosen "
            "among evaluated checkpoints"
        )
        aligned = {"save_strategy": ev}
        if ev == "steps" and cfg.save_steps % cfg.evaluation_steps:
            aligned["save_steps"] = cfg.evaluation_steps
        cfg = cfg.chosen(notes[-1], **aligned)
    if cfg.save_strategy == "steps" and cfg.save_steps % cfg.evaluation_steps:
        steps = -(-cfg.save_steps // cfg.evaluation_steps) * cfg.evaluation_steps
        notes.append(
            f"save_steps {cfg.save_steps} raised to {steps}, a multiple of evaluation_steps "
            f"{cfg.evaluation_steps}, so that every checkpoint has been evaluated"
        )
        cfg = cfg.chosen(notes[-1], save_steps=steps)
    return cfg, notes


def extra_optimizer_settings(optim: str, extra: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Split extra_optim_args into TrainingArguments fields and the ``optim_args`` string."""
    allowed = EXTRA_OPTIM_KEYS.get(optim, {})
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        raise UserError(
            f"--extra_optim_args: {', '.join(unknown)} not accepted for this optimizer; allowed: "
            + (", ".join(sorted(allowed)) or "none")
        )
    fields: dict[str, Any] = {}
    optim_args: list[str] = []
    for key, value in extra.items():
        target = allowed[key]
        if target == "optim_args":
            optim_args.append(f"{key}={value}")
        else:
            fields[target] = value
    return fields, (",".join(optim_args) or None)


def auto_batch_size_applies(asked: bool, world_size: int,
                            ds_config: dict[str, Any] | None) -> tuple[bool, str | None]:
    """Whether the Trainer may retry out-of-memory errors at a smaller batch, and a note when
    auto_find_batch_size is asked for but cannot apply.

    The retry is per process: under several processes the one that ran out of memory starts
    over alone while the others wait in a collective for a step it no longer takes, and the run
    hangs. The Trainer refuses it under ZeRO-3."""
    if not asked:
        return False, None
    if world_size > 1:
        return False, (f"auto_find_batch_size is off: with {world_size} processes an out-of-memory "
                       "error cannot be retried by every process together; set training_batch_size "
                       "(a one-process run with auto_find_batch_size true finds one that fits)")
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        return False, ("auto_find_batch_size is off: the Trainer does not support it under "
                       "DeepSpeed ZeRO stage 3; set training_batch_size")
    return True, None


def plan_training(cfg: FinetuneConfig, *, use_cpu: bool, bf16_ok: bool,
                  cpu: CpuKind | None = None, gpu: GpuKind | None = None) -> Plan:
    """Map a checked, defaulted config onto TrainingArguments keywords. ``bf16_ok``: the GPU runs
    bf16 natively; ``cpu``: the CPU's kind on a CPU-only run, ``gpu``: what torch sees of the
    GPUs (default: this machine's)."""
    cfg, notes = check_inputs(cfg)
    optim = OPTIMIZER_NAMES.get(cfg.optimizer, cfg.optimizer)
    extra = parse_extra_optim_args(cfg.extra_optim_args)
    extra_fields, optim_args = extra_optimizer_settings(optim, extra)
    if optim == "adamw_torch_fused" and not settings.flag("VISIONTUNE_FUSED_ADAMW"):
        optim = "adamw_torch"  # the same update, by a loop over tensors
    for key, value in extra_fields.items():
        notes.append(f"extra_optim_args sets {key}={value} (it wins over the other inputs)")

    precision: dict[str, Any] = {}
    gpu = gpu or gpu_kind()
    device_options: dict[str, Any] = {"dataloader_pin_memory": False}
    on_device = False
    unusable = warn_unusable_gpu(gpu)  # a GPU torch cannot use, or has no kernels for
    if unusable:
        notes.append(unusable)
    if use_cpu:
        cpu = cpu or cpu_kind()
        if cfg.precision == 16:
            bf16, note = cpu_bf16(cpu)
            precision["bf16"] = bf16
            notes.append(note)
        notes.append(cpu_paths(cpu, bf16=bool(precision.get("bf16")),
                               deepspeed=cfg.apply_deepspeed))
    else:
        if cfg.precision == 16 and bf16_ok:
            precision["bf16"] = True
            notes.append("precision 16 runs as bf16 mixed precision")
        elif cfg.precision == 16:
            precision["fp16"] = True
        device_options = gpu_training_options(gpu)
        on_device = normalise_on_device(gpu)
        notes.append(gpu_paths(gpu, device_options, on_device))

    max_steps = cfg.max_steps if cfg.max_steps and cfg.max_steps > 0 else -1
    args: dict[str, Any] = dict(
        output_dir=cfg.output_dir_pytorch,
        num_train_epochs=cfg.number_of_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=cfg.training_batch_size,
        per_device_eval_batch_size=cfg.validation_batch_size,
        auto_find_batch_size=cfg.auto_find_batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=SCHEDULER_NAMES[cfg.learning_rate_scheduler],
        warmup_steps=cfg.warmup_steps,
        optim=optim,
        optim_args=optim_args,
        weight_decay=cfg.weight_decay,
        gradient_accumulation_steps=cfg.gradient_accumulation_step,
        max_grad_norm=cfg.max_grad_norm,
        label_smoothing_factor=cfg.label_smoothing_factor,
        seed=cfg.random_seed,
        data_seed=cfg.random_seed,
        eval_strategy=cfg.evaluation_strategy,
        eval_steps=cfg.evaluation_steps,
        logging_strategy=cfg.logging_strategy,
        logging_steps=cfg.logging_steps,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=None if cfg.save_total_limit == -1 else cfg.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=cfg.metric_for_best_model,
        greater_is_better=cfg.metric_for_best_model != "loss",
        dataloader_num_workers=cfg.number_of_workers,
        dataloader_persistent_workers=(cfg.number_of_workers > 0
                                       and settings.flag("VISIONTUNE_PERSISTENT_WORKERS")),
        dataloader_prefetch_factor=(int(settings.number("VISIONTUNE_LOADER_PREFETCH"))
                                    if cfg.number_of_workers > 0 else None),
        remove_unused_columns=False,
        # MLflow tracking, when asked for, through a callback that cannot fail the run.
        report_to=[],
        use_cpu=use_cpu,
        # BCE has no token count: averaging "tokens" across ranks would scale the loss by the
        # world size (environment.md). Cross-entropy over images has the same semantics.
        average_tokens_across_devices=False,
        # The trainer turns it on for a model with weights that get no gradient (trainer.py).
        ddp_find_unused_parameters=False,
        **precision,
        **device_options,
    )
    args.update(extra_fields)
    tracking, note = plan_tracking()
    if note:
        notes.append(note)
    ds_config = None
    if cfg.apply_deepspeed:
        ds_config, ds_notes = plan_deepspeed(read_deepspeed_config(cfg.deepspeed_config),
                                             cfg.deepspeed_config, args,
                                             ranks.world_size())
        notes.extend(ds_notes)
        if autocast_16bit(ds_config):  # DeepSpeed's engine casts, not the Trainer
            args["bf16"] = False
        if not ranks.launched():
            notes.append("apply_deepspeed without a distributed launcher: DeepSpeed runs as a "
                         "one-process group; launch with torchrun (or Azure ML's distribution) "
                         "to train on several GPUs")
    args["auto_find_batch_size"], note = auto_batch_size_applies(cfg.auto_find_batch_size,
                                                                 ranks.world_size(), ds_config)
    if note:
        notes.append(note)
    return Plan(config=cfg, training_args=args, notes=notes, deepspeed_config=ds_config, mlflow_tracking=tracking,
                normalise_on_device=on_device)
