"""DeepSpeed for the finetune component (``--apply_deepspeed true``).

Built-in configuration (``--deepspeed_config`` empty), ``DEFAULT_CONFIG``:

- ZeRO stage 2: optimizer states and gradients are partitioned across the processes, the
  weights stay whole on each. For image classifiers (up to a few hundred million weights) this
  removes most of the optimizer's memory at the communication cost of plain data parallelism;
  stage 3 (partitioned weights) would add communication for memory these models do not need.
  (Azure's built-in configuration uses stage 1.)
- ``"auto"`` for everything the Trainer knows, so that it comes from the component's inputs:
  ``train_micro_batch_size_per_gpu`` (training_batch_size), ``gradient_accumulation_steps``,
  ``train_batch_size`` (their product times the number of processes), ``gradient_clipping``
  (max_grad_norm), and ``fp16.enabled`` / ``bf16.enabled`` (precision: 16 is fp16 on GPUs without
  bf16, bf16 on the others and on the CPU; 32 is neither).
- No ``optimizer`` and no ``scheduler`` section: the Trainer builds the optimizer and the
  schedule named by the inputs (any of them, with extra_optim_args, and without weight decay on
  biases and norm weights), and ZeRO partitions that optimizer's state. Azure's configuration
  sets AdamW + WarmupLR and so silently replaces a chosen optimizer and schedule; this one
  replaces nothing.

A user's configuration meets the inputs by one rule: **the component's inputs win.** Every value
of the configuration that the inputs also decide and that differs from them is replaced (by
``"auto"``, which the Trainer then fills from the inputs), and each replacement is printed as a
note and saved in finetune_args.json. The inputs are what the run prints as its effective
settings, what finetune_args.json records and what the defaults chain tunes per model; letting a
file override them would make all three wrong without a word. (The Trainer itself refuses such
mismatches with an error.) What the inputs do not decide (the ZeRO stage, offloading, bucket
sizes, communication settings) is the configuration's. In detail:

- batch sizes, gradient accumulation, gradient clipping: replaced when they differ;
- ``fp16`` / ``bf16`` / ``amp``: ``enabled`` follows the precision input;
- ``optimizer``: kept when its type is the optimizer input's (AdamW or Adam in AdamW mode for
  adamw / adamw_hf, Adagrad for adagrad; DeepSpeed's implementations are faster and are what
  ZeRO-Offload needs), with lr, betas, eps and weight_decay taken from the inputs; any other type
  is removed and the Trainer builds the optimizer input's;
- ``scheduler``: always removed; learning_rate_scheduler and warmup_steps decide the schedule
  (DeepSpeed's schedules have other shapes: WarmupLR warms up logarithmically, for one);
- ZeRO stage 3 gets ``stage3_gather_16bit_weights_on_model_save: true``, without which the saved
  model folder would hold no usable weights.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
from typing import Any

from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config,
)

from visiontune.errors import UserError

DEFAULT_CONFIG: dict[str, Any] = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "fp16": {"enabled": "auto"},
    "bf16": {"enabled": "auto"},
    # The Trainer logs progress; DeepSpeed's own lines would repeat it on every rank.
    "steps_per_print": 1_000_000,
    "wall_clock_breakdown": False,
}

INSTALL_HINT = 'apply_deepspeed needs the deepspeed package: pip install "visiontune[deepspeed]"'

# Top-level settings of DeepSpeed's configuration (its documented keys, as of 0.19). A file
# with none of them is not a DeepSpeed configuration; other keys are reported as ignored.
KNOWN_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast",
    "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
    "gradient_allreduce_op", "communication_data_type", "seq_parallel_communication_data_type",
    "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown", "memory_breakdown",
    "dump_state", "disable_allgather", "disable_python_gc", "activation_checkpointing",
    "flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet", "aio",
    "elasticity", "autotuning", "data_efficiency", "curriculum_learning", "compression_training",
    "checkpoint", "data_types", "pipeline", "sparse_attention", "eigenvalue",
    "progressive_layer_drop", "quantize_training", "hybrid_engine", "compile", "nebula",
    "weight_quantization", "load_universal_checkpoint", "dataloader_drop_last", "log_level",
    "timers", "tensor_parallel", "expert_parallel", "use_data_before_expert_parallelism",
    "vocabulary_size", "managed_gradient_accumulation", "graph_harvesting", "mics_shard_size",
})

_POSITIVE_INT_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                      "gradient_accumulation_steps")
_SECTIONS = ("fp16", "bf16", "bfloat16", "amp", "optimizer", "scheduler", "zero_optimization")

# Trainer optimizer (TrainingArguments.optim) -> DeepSpeed optimizer types that run it, and the
# hyperparameters the inputs decide for that type.
_MATCHING_OPTIMIZERS = {"adamw_torch_fused": ("adamw", "adam"), "adagrad": ("adagrad",)}
_OPTIMIZER_PARAMS = {"adamw": ("lr", "betas", "eps", "weight_decay"),
                     "adam": ("lr", "betas", "eps", "weight_decay"),
                     "adagrad": ("lr", "eps", "weight_decay")}


@contextlib.contextmanager
def whole_weights_while_loading(args):
    """Load the model with whole weights on every process, also under ZeRO-3.

    Under ZeRO-3 transformers builds the model inside ``deepspeed.zero.Init``, which partitions
    each weight as it is created: the new head's initialisation and visiontune's re-initialising
    or reordering of its rows then act on empty partitions, and a head of another size fails to
    load. Image classifiers fit whole on each process; DeepSpeed partitions them when training
    starts."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(args.hf_deepspeed_config)


def check_installed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(INSTALL_HINT)


def _is_auto(value: Any) -> bool:
    return value == "auto"


def _shown(value: Any) -> str:
    return json.dumps(value)


def validate(config: dict[str, Any], where: str) -> list[str]:
    """Refuse what is not a DeepSpeed configuration; return notes on ignored keys.

    ``where`` names the file in messages. Only the settings this module reads or the Trainer
    fills are type-checked; DeepSpeed checks the rest when it starts."""
    def bad(message: str) -> UserError:
        return UserError(f"--deepspeed_config: {where}: {message}")

    known = [k for k in config if k in KNOWN_KEYS]
    if not known:
        shown = ", ".join(sorted(config)[:5]) or "nothing"
        raise bad(f"not a DeepSpeed configuration (it sets {shown}; a DeepSpeed configuration sets "
                  "e.g. zero_optimization, train_micro_batch_size_per_gpu, fp16)")
    for key in _POSITIVE_INT_KEYS:
        if key in config:
            value = config[key]
            if not _is_auto(value) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise bad(f'{key} must be a positive integer or "auto" (got {_shown(value)})')
    if "gradient_clipping" in config:
        value = config["gradient_clipping"]
        if not _is_auto(value) and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise bad(f'gradient_clipping must be a number >= 0 or "auto" (got {_shown(value)})')
    if "steps_per_print" in config:
        value = config["steps_per_print"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f"steps_per_print must be a positive integer (got {_shown(value)})")
    for key in _SECTIONS:
        if key in config and not isinstance(config[key], dict):
            example = '{"stage": 2}' if key == "zero_optimization" else '{"enabled": true}' if key in (
                "fp16", "bf16", "bfloat16", "amp") else '{"type": "AdamW", "params": {...}}'
            raise bad(f"{key} must be an object like {example} (got {_shown(config[key])})")
    for key in ("fp16", "bf16", "bfloat16", "amp"):
        enabled = config.get(key, {}).get("enabled", False)
        if not (isinstance(enabled, bool) or _is_auto(enabled)):
            raise bad(f'{key}.enabled must be true, false or "auto" (got {_shown(enabled)})')
    zero = config.get("zero_optimization", {})
    if "stage" in zero:
        stage = zero["stage"]
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
            raise bad(f"zero_optimization.stage must be 0, 1, 2 or 3 (got {_shown(stage)})")
    for key in ("optimizer", "scheduler"):
        if key in config:
            section = config[key]
            if not isinstance(section.get("type"), str) or not section["type"]:
                raise bad(f'{key} needs a "type" (a DeepSpeed {key} name)')
            if "params" in section and not isinstance(section["params"], dict):
                raise bad(f"{key}.params must be an object")
    unknown = sorted(k for k in config if k not in KNOWN_KEYS)
    if unknown:
        return [f"deepspeed_config: {', '.join(unknown)} not DeepSpeed setting(s) (a typo?); "
                "DeepSpeed ignores them"]
    return []


def autocast_16bit(config: dict[str, Any] | None) -> bool:
    """Whether a merged configuration trains under DeepSpeed's torch autocast (precision 16 as
    bf16); the Trainer's own bf16 is then off, DeepSpeed's engine casts."""
    return bool(config and config.get("torch_autocast", {}).get("enabled") is True)


def _precision_regime(merged: dict[str, Any], args: dict[str, Any], notes: list[str]) -> None:
    """bf16 runs as DeepSpeed's torch autocast: the weights, batch norm's included, stay float32
    (as without DeepSpeed) and matrix products and convolutions run in bf16. DeepSpeed's bf16
    section would cast every weight to bf16 but keep batch norm's running statistics float32,
    a mix batch norm refuses ("expected scalar type BFloat16 but found Float").
    fp16 keeps DeepSpeed's fp16 section, since under ZeRO only it scales the loss; its buffers
    are cast to fp16 with the weights, so batch norm trains fully in fp16."""
    autocast = merged.get("torch_autocast")
    if args.get("bf16"):
        for key in ("bf16", "fp16"):
            merged.setdefault(key, {})["enabled"] = False
        merged["torch_autocast"] = {**(autocast or {}), "enabled": True, "dtype": "bfloat16"}
        notes.append("deepspeed: precision 16 runs as bf16 autocast (torch_autocast): the weights, "
                     "batch norm's included, stay float32")
        return
    if autocast is not None and autocast.get("enabled") is True:
        autocast["enabled"] = False
        notes.append("deepspeed_config: torch_autocast.enabled true replaced by false ("
                     + ("precision 16 runs as fp16 with loss scaling" if args.get("fp16")
                        else "precision 32") + ")")
    if args.get("fp16"):
        data_types = merged.setdefault("data_types", {})
        if data_types.get("buffer_dtype") in (None, "fp16"):
            data_types["buffer_dtype"] = "fp16"
            notes.append("deepspeed: precision 16 runs as DeepSpeed's fp16 (its loss scaling): "
                         "weights and buffers, batch norm's included, in fp16")


def merge(config: dict[str, Any] | None, args: dict[str, Any], world_size: int) -> tuple[dict[str, Any], list[str]]:
    """The configuration the run uses: ``config`` (the built-in one when None) with the inputs
    winning, as ``args`` (TrainingArguments keywords planned from the inputs) states them.

    Returns (configuration, notes): one note per replaced or removed value."""
    if config is None:
        merged, notes = copy.deepcopy(DEFAULT_CONFIG), []
        _precision_regime(merged, args, notes)
        return merged, notes
    merged = copy.deepcopy(config)
    notes: list[str] = []

    def replace(key: str, new: Any, why: str) -> None:
        """Say so when the configuration held another value, then let the Trainer fill it."""
        node, _, leaf = key.rpartition(".")
        holder = merged
        for part in filter(None, node.split(".")):
            holder = holder.setdefault(part, {})
        old = holder.get(leaf, "auto")
        if not _is_auto(old) and old != new:
            notes.append(f"deepspeed_config: {key} {_shown(old)} replaced by {_shown(new)} ({why})")
        holder[leaf] = "auto"

    micro, accumulation = args["per_device_train_batch_size"], args["gradient_accumulation_steps"]
    replace("train_micro_batch_size_per_gpu", micro, "training_batch_size")
    replace("gradient_accumulation_steps", accumulation, "gradient_accumulation_step")
    replace("train_batch_size", micro * accumulation * world_size,
            f"training_batch_size {micro} x gradient_accumulation_step {accumulation} x "
            f"{world_size} process(es)")
    replace("gradient_clipping", args["max_grad_norm"], "max_grad_norm")

    fp16, bf16 = bool(args.get("fp16")), bool(args.get("bf16"))
    if "bfloat16" in merged:  # DeepSpeed's older name for the bf16 section
        legacy = merged.pop("bfloat16")
        merged.setdefault("bf16", legacy)
        notes.append("deepspeed_config: bfloat16 read as bf16 (its current name)")
    precision = "precision 16" if fp16 or bf16 else "precision 32"
    replace("fp16.enabled", fp16, precision + (" runs as bf16" if bf16 else ""))
    replace("bf16.enabled", bf16, precision + (" runs as fp16" if fp16 else ""))
    if merged.get("amp", {}).get("enabled") is True:
        merged["amp"]["enabled"] = False
        notes.append("deepspeed_config: amp.enabled true replaced by false (precision decides "
                     "mixed precision, through the fp16/bf16 sections)")
    _precision_regime(merged, args, notes)

    optimizer = merged.get("optimizer")
    if optimizer is not None:
        kind = optimizer["type"].lower()
        optim = args["optim"]
        adam_mode_off = kind == "adam" and optimizer.get("params", {}).get("adam_w_mode") is False
        if kind in _MATCHING_OPTIMIZERS.get(optim, ()) and not adam_mode_off:
            params = optimizer.setdefault("params", {})
            wanted = {"lr": args["learning_rate"], "weight_decay": args["weight_decay"],
                      "eps": args.get("adam_epsilon", 1e-8),
                      "betas": [args.get("adam_beta1", 0.9), args.get("adam_beta2", 0.999)]}
            for name in _OPTIMIZER_PARAMS[kind]:
                old = params.get(name, "auto")
                if not _is_auto(old) and old != wanted[name]:
                    notes.append(f"deepspeed_config: optimizer.params.{name} {_shown(old)} replaced "
                                 f"by {_shown(wanted[name])} (the optimizer inputs)")
                params[name] = "auto"
            if args["weight_decay"]:
                notes.append(f"deepspeed_config: DeepSpeed's {optimizer['type']} applies "
                             "weight_decay to every weight, biases and norm weights included")
        else:
            del merged["optimizer"]
            notes.append(f"deepspeed_config: optimizer {optimizer['type']} removed: the optimizer "
                         f"input ({optim}) decides; the Trainer builds it and ZeRO partitions it")
    scheduler = merged.pop("scheduler", None)
    if scheduler is not None:
        notes.append(f"deepspeed_config: scheduler {scheduler['type']} removed: "
                     f"learning_rate_scheduler ({args['lr_scheduler_type']}) and warmup_steps "
                     "decide the schedule")

    zero = merged.get("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        notes.append("deepspeed_config: zero_optimization.stage3_gather_16bit_weights_on_model_save "
                     "set to true, so that the saved model folder holds the whole weights")
    return merged, notes


def plan_deepspeed(config: dict[str, Any] | None, where: str | None, args: dict[str, Any],
                   world_size: int) -> tuple[dict[str, Any], list[str]]:
    """Validate, merge and check the package: everything before any data or model is loaded."""
    notes = validate(config, where or "deepspeed_config") if config is not None else []
    merged, merge_notes = merge(config, args, world_size)
    check_installed()
    if config is None:
        stage = merged["zero_optimization"]["stage"]
        notes.append(f"deepspeed: built-in configuration (ZeRO stage {stage}; batch sizes, "
                     "clipping, precision, optimizer and schedule from the inputs)")
    return merged, notes + merge_notes
