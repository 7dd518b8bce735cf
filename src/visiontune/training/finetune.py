"""The finetune component: checked inputs -> data -> model -> Hugging Face Trainer -> outputs.

``finetune`` takes a ``FinetuneConfig`` (``visiontune.config``) and runs it in named steps:
``check_finetune`` (every input, the defaults chain, the plan), ``read_data``,
``build_trainer``, ``train`` and ``save``; it returns a ``FinetuneResult`` and prints nothing
(the CLI shows the plan and the result).

Order matters for users: every input is checked (and the defaults chain applied) before any
data or model is loaded, so a typo fails in a second; the data is read and verified before
the model is loaded, so a bad dataset fails before the expensive part.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from transformers import (
    EarlyStoppingCallback, MobileViTImageProcessor, TrainingArguments, ViTImageProcessor, set_seed,
)
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from visiontune import hardware, malloc
from visiontune.config import FinetuneConfig
from visiontune.data.dataset import ImageDataset
from visiontune.data.prepare import prepare_data
from visiontune.data.storage import redact
from visiontune.data.transforms import (
    PIL_CODES, DeviceNormalize, Preprocessing, describe_augmentations, eval_transform,
    resolve_preprocessing, timm_pretrained_cfg, train_transform,
)
from visiontune.errors import UserError
from visiontune.metrics import compute_metrics
from visiontune.model_card import write_model_card
from visiontune.model_folder import ARGS_FILE, AUGMENTATIONS_FILE, EVAL_RESULTS_FILE, ModelFolder
from visiontune.models import loading
from visiontune.models.builtin import write_timm_processor_config
from visiontune.outputs import FolderLock, check_folder, is_visiontune_mlflow_model, write_text_atomic
from visiontune.ranks import is_main_process
from visiontune.tasks import MULTILABEL
from visiontune.training import distributed
from visiontune.training.apply_ort import ONNX_SUBDIR, check_apply_ort, export_and_validate
from visiontune.training.arguments import Plan, plan_training
from visiontune.training.callbacks import (
    METRICS_LOG, CompleteCheckpointCallback, DatasetEpochCallback, FrozenHeapCallback,
    MetricsLogCallback,
    list_checkpoints, newest_complete_checkpoint, remove_incomplete_checkpoints, trim_metrics_log,
)
from visiontune.training.deepspeed import autocast_16bit, whole_weights_while_loading
from visiontune.training.defaults import apply_defaults, defaults_sources
from visiontune.training.tracking import tracking_callback
from visiontune.training.trainer import VisionTrainer, mean_loss, plan_unused_parameters

log = logging.getLogger("visiontune.finetune")

VALIDATION_SPLIT_FILE = "validation_split.jsonl"
MODEL_PATH_EXPECTED = ("pass the output folder of `visiontune import-model` or a Hugging Face model "
                       "folder")


@dataclass
class FinetuneResult:
    output_dir_pytorch: Path
    output_dir_mlflow: Path | None
    metrics: dict[str, Any]
    classes: list[str]


def _model_name(model_dir: Path, metadata: dict[str, Any]) -> str | None:
    name = metadata.get("model_metadata", {}).get("base_model_name") or metadata.get("model_name")
    if name:
        return name
    try:
        return json.loads((model_dir / "config.json").read_text()).get("_name_or_path") or None
    except (OSError, ValueError):
        return None


def _device_flags() -> tuple[bool, bool]:
    gpu = hardware.gpu_kind()
    if gpu.cuda_available:
        # Native bf16 only (compute capability 8+, or ROCm): torch.cuda.is_bf16_supported() also
        # says yes for a V100, which only emulates it, slowly; fp16 is its mixed precision.
        return False, gpu.hip or gpu.capability[0] >= 8
    return True, False


def choose_workers(cfg: FinetuneConfig, use_cpu: bool) -> FinetuneConfig:
    """Data-loader workers that help rather than compete; the config with the number chosen.

    On a CPU-only run the training's compute threads already use every core: worker processes
    cost more throughput and memory than the main-process loading they would hide (with the
    decoded-image cache; BENCHMARKS.md, *Levers*). So the default is 0 there; a value the user
    gives is kept. Each process on a node loads its own batches, so no process gets more
    workers than its share of the node's CPUs."""
    if use_cpu and not cfg.given("number_of_workers") and cfg.number_of_workers:
        return cfg.chosen("CPU-only run: loading in the main process", number_of_workers=0)

    # Under a launcher that does not say how many processes share the node (Azure ML's),
    # one per GPU (hardware.local_processes).
    shared = hardware.local_processes(hardware.gpu_kind()) > 1
    cpus = hardware.workers_per_process(os.cpu_count() or 1, hardware.gpu_kind())
    if cfg.number_of_workers > cpus:
        return cfg.chosen(f"reduced from {cfg.number_of_workers} to the CPUs here"
                          + (" per process" if shared else ""), number_of_workers=cpus)
    return cfg


def shown_inputs(cfg: FinetuneConfig) -> dict[str, Any]:
    """The inputs as the run shows and records them: URLs without their query (a SAS token)."""
    return {name: redact(value) if isinstance(value, str) else value
            for name, value in cfg.as_dict().items()}


def plan_text(cfg: FinetuneConfig, sources: dict[str, str], notes: list[str]) -> str:
    """The effective inputs, where the ones chosen by defaults came from, and the notes: what
    the run shows before it starts."""
    lines = ["effective inputs (value, and where it came from when chosen by defaults):"]
    for name, value in shown_inputs(cfg).items():
        src = sources.get(name)
        lines.append(f"  {name} = {value}" + (f"   [{src}]" if src and src != "user" else ""))
    for note in notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _first(predictions):
    return predictions[0] if isinstance(predictions, (tuple, list)) else predictions


def check_row_count(label_ids, expected: int) -> None:
    """Metrics are over the whole validation set, each row once, however many processes ran.

    The Trainer gathers every rank's predictions and drops the rows repeated to even out the
    last batch; should that ever go wrong, the run stops rather than report wrong metrics."""
    if len(label_ids) != expected:
        raise RuntimeError(f"evaluation saw {len(label_ids)} predictions for {expected} validation "
                           "rows; metrics would be wrong")


def _scalar_metrics(task: str, threshold: float, rows: int, label_smoothing: float):
    def compute(prediction) -> dict[str, float]:
        logits = _first(prediction.predictions)
        check_row_count(prediction.label_ids, rows)
        result = compute_metrics(np.asarray(logits), np.asarray(prediction.label_ids), task,
                                 threshold=threshold)
        scalars = {k: v for k, v in result.items() if k != "per_class"}
        # Replaces the Trainer's eval_loss, an average of per-batch losses that counts the rows
        # repeated to even out the last batch across processes.
        scalars["loss"] = mean_loss(logits, prediction.label_ids, task, label_smoothing)
        return scalars

    return compute


def _prepare_output_dir(out: Path, resume: bool) -> Path | None:
    """Pick the checkpoint to resume from, or clear old checkpoints for a fresh start.

    Rank 0 alone cleans up and chooses; the other ranks wait for it and take its choice, so no
    rank looks at the folder while checkpoints are being removed."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = _clean_output_dir(out, resume) if is_main_process() else None
    chosen = distributed.broadcast_from_main(str(chosen) if chosen else None)
    distributed.check_shared_folder(out, "output_dir_pytorch")
    return Path(chosen) if chosen else None


def _clean_output_dir(out: Path, resume: bool) -> Path | None:
    if resume:
        for folder in remove_incomplete_checkpoints(out):
            log.warning("removed incomplete checkpoint %s (written when a run stopped)", folder)
        checkpoint = newest_complete_checkpoint(out)
        if checkpoint is None:
            log.warning("resume_from_checkpoint: no complete checkpoint in %s; starting from the "
                        "beginning", out)
            trim_metrics_log(out / METRICS_LOG, 0)  # every step is trained again
        else:
            log.info("resuming from %s", checkpoint)
            step = int(checkpoint.name.rsplit("-", 1)[1])
            if trim_metrics_log(out / METRICS_LOG, step):  # those steps are trained again
                log.info("%s: the lines after step %d (trained again now) removed", METRICS_LOG, step)
        return checkpoint
    old = list_checkpoints(out)
    if old:
        log.warning("output_dir_pytorch holds %d checkpoint(s) of an earlier run; removing them "
                    "(resume_from_checkpoint true, --resume_from_checkpoint true, continues that "
                    "run instead)", len(old))
        for _, folder in old:
            shutil.rmtree(folder, ignore_errors=True)
    metrics_log = out / METRICS_LOG
    if metrics_log.exists():
        metrics_log.unlink()
    return None


def _earlier_run(folder: Path) -> bool:
    """An output folder of an earlier fine-tune (its files may be replaced)."""
    return any((folder / name).exists() for name in (ARGS_FILE, METRICS_LOG, "trainer_state.json")) \
        or any(folder.glob("checkpoint-*"))


def check_outputs(cfg: FinetuneConfig) -> None:
    """Every output location, checked by rank 0 before any data or model is loaded."""
    if not is_main_process():
        return
    out = Path(cfg.output_dir_pytorch)
    if cfg.model_path and Path(cfg.model_path).resolve() == out.resolve():
        raise UserError("--output_dir_pytorch: must not be the --model_path folder (the model "
                        "would be overwritten while it is read); give another folder")
    check_folder(out, "output_dir_pytorch", replaceable=_earlier_run, create=False)
    if cfg.save_as_mlflow_model:
        mlflow_dir = Path(cfg.output_dir_mlflow).resolve()
        if mlflow_dir == out.resolve() or mlflow_dir in out.resolve().parents:
            raise UserError(f"--output_dir_mlflow: {mlflow_dir} must not be --output_dir_pytorch or "
                            "a folder holding it (the MLflow model replaces that folder's contents); "
                            "give another folder, e.g. one inside --output_dir_pytorch")
        check_folder(mlflow_dir, "output_dir_mlflow", replaceable=is_visiontune_mlflow_model,
                     create=False)


def check_finetune_inputs(cfg: FinetuneConfig, model_name: str | None) -> None:
    """Every cross-input rule and output location, before a model exists (the pipeline
    checks before importing: its ``model_path`` is None then)."""
    distributed.check_launch_environment()
    use_cpu, bf16_ok = _device_flags()
    plan = plan_training(apply_defaults(cfg, model_name), use_cpu=use_cpu, bf16_ok=bf16_ok)
    check_outputs(plan.config)


@dataclass
class Setup:
    """What the checks decided, before any data or model is loaded."""

    config: FinetuneConfig  # the effective inputs: defaults chain, workers, alignments applied
    sources: dict[str, str]  # where each auto input came from, as shown and saved
    plan: Plan
    model_dir: Path
    metadata: dict[str, Any]  # of the model folder (model_selector_args.json)
    base_model: str | None


@dataclass
class _Run:
    """A run ready to train, and what saving it needs."""

    setup: Setup
    data: Any  # PreparedData
    args: Any  # TrainingArguments
    trainer: Any  # VisionTrainer
    pre: Any  # the resolved Preprocessing
    val_ds: Any
    checkpoint: Path | None  # to resume from


def finetune(cfg: FinetuneConfig, *, callbacks: Iterable[Any] = (), data=None,
             show: Callable[[str], None] | None = None) -> FinetuneResult:
    """Run the finetune component on a ``FinetuneConfig`` (``visiontune.config``): check,
    read the data, build the trainer, train, save. Returns the output folders and the best
    model's validation metrics; prints nothing.

    ``data``: the PreparedData of these inputs when the caller has read it already.
    ``show``: where the lines for the person running it go (the plan before training, a note
    found when the model is loaded); the CLI prints them, by default they are logged.

    Under torchrun or Azure ML's distribution every process calls this; each returns only after
    rank 0 has written every output (see training/distributed.py)."""
    show = show or log.info
    try:
        with contextlib.ExitStack() as stack:
            setup = check_finetune(cfg)
            if is_main_process():  # held until every output is written
                stack.enter_context(FolderLock(Path(setup.config.output_dir_pytorch), "output_dir_pytorch"))
                show(plan_text(setup.config, setup.sources, setup.plan.notes))
            # Data before model: a bad dataset fails before anything heavy is loaded.
            run = build_trainer(setup, read_data(setup.config) if data is None else data,
                                callbacks, show)
            train(run)
            return save(run)
    except BaseException:
        distributed.leave_after_failure()
        raise
    finally:
        distributed.end_one_process_world()


def check_finetune(cfg: FinetuneConfig) -> Setup:
    """Every input checked, the defaults chain applied and the training planned, before any
    data or model is loaded: a typo fails in a second."""
    model_dir = ModelFolder.open(cfg.model_path, "--model_path", MODEL_PATH_EXPECTED).path
    # Azure's import layout keeps the model in a subfolder and its metadata beside it
    metadata = ModelFolder(model_dir).metadata() or ModelFolder(Path(cfg.model_path)).metadata()
    base_model = _model_name(model_dir, metadata)
    cfg = apply_defaults(cfg, base_model, model_dir)
    distributed.check_launch_environment()
    use_cpu, bf16_ok = _device_flags()
    cfg = choose_workers(cfg, use_cpu)
    sources = defaults_sources(cfg)  # before the plan's alignments, which are notes instead
    plan = plan_training(cfg, use_cpu=use_cpu, bf16_ok=bf16_ok)
    if plan.config.apply_ort:
        check_apply_ort()  # missing packages fail here, before any data or model is loaded
    check_outputs(plan.config)
    return Setup(plan.config, sources, plan, model_dir, metadata, base_model)


def read_data(cfg):
    """The training and validation data of a finetune (or pipeline) config, every image
    checked."""
    return prepare_data(
        cfg.training_data, cfg.validation_data, task=cfg.task_name,
        image_column=cfg.image_column, label_column=cfg.label_column,
        validation_fraction=cfg.validation_fraction, seed=cfg.random_seed,
        skip_bad_rows=cfg.skip_bad_rows,
    )


def build_trainer(setup: Setup, data, callbacks: Iterable[Any],
                  show: Callable[[str], None]) -> _Run:
    """The output folder prepared (or the checkpoint to resume from chosen), the datasets, the
    model and the trainer."""
    cfg, plan = setup.config, setup.plan
    out = Path(cfg.output_dir_pytorch)
    show_lines = not sys.stderr.isatty()
    if plan.deepspeed_config is not None:
        distributed.start_one_process_world()  # a no-op under a launcher
    # Joins the process group (when there is one), which the output folder's preparation needs;
    # before the model is loaded, so that a folder the nodes do not share fails early.
    args = TrainingArguments(**plan.training_args, deepspeed=plan.deepspeed_config,
                             disable_tqdm=show_lines)
    distributed.prepare()
    checkpoint = _prepare_output_dir(out, cfg.resume_from_checkpoint)

    pre = resolve_preprocessing(loading.load_image_processor(setup.model_dir), cfg.image_height,
                                cfg.image_width)
    train_ds, val_ds = _datasets(cfg, data, pre, args, plan.normalise_on_device)
    model = _load_model(setup, data, pre, args, show)
    trainer = VisionTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
        compute_metrics=_scalar_metrics(cfg.task_name, cfg.multilabel_threshold, len(val_ds),
                                        plan.training_args["label_smoothing_factor"]),
        callbacks=[*_trainer_callbacks(cfg, plan, out, train_ds, show_lines), *callbacks],
        normalise=DeviceNormalize(pre) if plan.normalise_on_device else None,
    )
    if show_lines:
        trainer.remove_callback(PrinterCallback)  # MetricsLogCallback prints readable lines instead
    return _Run(setup, data, args, trainer, pre, val_ds, checkpoint)


def _datasets(cfg: FinetuneConfig, data, pre, args, on_device: bool):
    """The training and validation datasets. The node's first process decodes the images into
    the shared cache; the others then find them there instead of decoding the whole dataset
    again each."""
    with args.main_process_first(local=True, desc="filling the decoded-image cache"):
        train_ds = ImageDataset(data.train, data.classes, cfg.task_name,
                                train_transform(pre, cfg.apply_augmentations, on_device),
                                seed=cfg.random_seed)
        val_ds = ImageDataset(data.validation, data.classes, cfg.task_name,
                              eval_transform(pre, on_device))
    return train_ds, val_ds


def _load_model(setup: Setup, data, pre, args, show: Callable[[str], None]):
    """The model with a new head for the data's classes; a note (shown and saved) when some of
    its weights get no gradient."""
    if not is_main_process():
        hf_logging.set_verbosity_error()  # one log: rank 0's (loading reports, warnings)
    set_seed(setup.config.random_seed)  # the new head's initialisation is part of the run
    with whole_weights_while_loading(args):
        model = loading.load_for_finetune(setup.model_dir, data.classes, setup.config.task_name,
                                          (pre.height, pre.width))
    if setup.plan.deepspeed_config is None:  # DeepSpeed flattens the weights into its own buffers
        model = loading.prefer_channels_last(model)
    unused_note = plan_unused_parameters(model, args, pre.height, pre.width)
    if unused_note:
        setup.plan.notes.append(unused_note)
        if is_main_process():
            show(f"  note: {unused_note}")
    return model


def _trainer_callbacks(cfg: FinetuneConfig, plan: Plan, out: Path, train_ds, show_lines: bool) -> list[Any]:
    callbacks = [CompleteCheckpointCallback(), DatasetEpochCallback(train_ds), FrozenHeapCallback(),
                 MetricsLogCallback(out / METRICS_LOG, show_lines)]
    if cfg.early_stopping:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience))
    if plan.mlflow_tracking:
        callbacks.append(tracking_callback())
    return callbacks


def train(run: _Run) -> None:
    trainer, checkpoint = run.trainer, run.checkpoint
    malloc.release()  # what checking and caching the images freed, before the steps reuse it
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    malloc.release()


def _evaluate_best(run: _Run):
    """The best model (loaded at the end) evaluated once more on the whole validation set:
    its metrics, logits and the label ids."""
    cfg = run.setup.config
    prediction = run.trainer.predict(run.val_ds, metric_key_prefix="eval")
    logits = _first(prediction.predictions)
    metrics = compute_metrics(np.asarray(logits), np.asarray(prediction.label_ids), cfg.task_name,
                              threshold=cfg.multilabel_threshold, class_names=run.data.classes)
    metrics["loss"] = float(prediction.metrics.get("eval_loss", float("nan")))
    return metrics, logits, prediction.label_ids


def save(run: _Run) -> FinetuneResult:
    """The best model evaluated and saved with everything beside it (rank 0 writes; every rank
    returns once it has)."""
    metrics, logits, label_ids = _evaluate_best(run)
    setup, trainer, pre = run.setup, run.trainer, run.pre
    cfg = setup.config
    out = Path(cfg.output_dir_pytorch)
    # Every rank saves: under ZeRO-3 the weights are gathered from all of them (rank 0 writes).
    processor = processor_to_save(trainer.model.config, pre)
    if trainer.is_world_process_zero():
        ModelFolder(out).invalidate()  # an earlier run's record until this run's is written
    trainer.save_model(str(out))
    mlflow_dir = None
    if trainer.is_world_process_zero():
        with whole_weights_while_loading(run.args):  # reloaded whole, not into ZeRO-3 partitions
            loading.native_image_size(out, pre.height, pre.width)
        _write_outputs(out, setup=setup, data=run.data, pre=pre, processor=processor,
                       metrics=metrics, augmentations=describe_augmentations(
                           pre, cfg.apply_augmentations, setup.plan.normalise_on_device))
        onnx_dir = _onnx_export(run, out, logits, label_ids)
        if cfg.save_as_mlflow_model:
            from visiontune.serving.mlflow_model import save_mlflow_model

            mlflow_dir = save_mlflow_model(out, cfg.output_dir_mlflow, onnx_dir=onnx_dir)
    distributed.wait_for_main_process("writing the outputs")
    return FinetuneResult(out, mlflow_dir, metrics, run.data.classes)


def _onnx_export(run: _Run, out: Path, logits, label_ids) -> Path | None:
    """With apply_ort, the ONNX export checked against the PyTorch model's validation logits;
    without, an earlier run's export is removed (it would not match this model)."""
    cfg, args = run.setup.config, run.trainer.args
    if not cfg.apply_ort:
        shutil.rmtree(out / ONNX_SUBDIR, ignore_errors=True)
        return None
    return export_and_validate(
        out, run.data.validation, label_ids, logits, batch_size=cfg.validation_batch_size,
        mixed_precision=bool(args.fp16 or args.bf16
                             or autocast_16bit(run.setup.plan.deepspeed_config)))


def _write_outputs(out: Path, *, setup: Setup, data, pre, processor, metrics: dict[str, Any],
                   augmentations: dict[str, Any]) -> None:
    """Everything beside the weights (saved already); ``processor`` None: a timm-wrapper model,
    whose preprocessing lives in its config rather than in a processor file."""
    if processor is None:
        write_timm_processor_config(out)
    else:
        processor.save_pretrained(str(out))
    cfg, base_model = setup.config, setup.base_model
    values, sources, notes = shown_inputs(cfg), setup.sources, setup.plan.notes
    task = cfg.task_name
    folder = ModelFolder(out)
    folder.write_json(ARGS_FILE, {"values": values, "sources": sources, "notes": notes})
    folder.write_json(AUGMENTATIONS_FILE, augmentations)
    if data.validation_is_split:
        # The held-out rows, so that evaluation can be repeated on exactly them (URLs without
        # their query string: a SAS token never lands in an output).
        write_text_atomic(out / VALIDATION_SPLIT_FILE, "".join(
            json.dumps({cfg.image_column: redact(r.image),
                        cfg.label_column: list(r.label) if isinstance(r.label, tuple) else r.label}) + "\n"
            for r in data.validation))
    folder.write_json(EVAL_RESULTS_FILE, metrics, default=float)
    parent = setup.metadata.get("model_metadata", {})
    folder.write_metadata({  # last: the record describes the files written before it
        "model_name": base_model,
        "source": "finetune",
        "source_path": str(Path(cfg.model_path).resolve()),
        "pytorch_model_path": ".",
        "mlflow_model_path": None,
        "model_metadata": {
            "base_model_name": parent.get("base_model_name") or base_model,
            "finetuning_task": task,
            "is_finetuned_model": True,
            "id2label": {str(i): c for i, c in enumerate(data.classes)},
        },
        "preprocessing": pre.to_dict(),
        "multilabel_threshold": cfg.multilabel_threshold if task == MULTILABEL else None,
    })
    write_model_card(out, data=data)  # README.md, from the files above


def hf_image_processor(pre: Preprocessing):
    """A transformers image processor that computes ``eval_transform(pre)``: resize the whole
    image to (H, W), no crop, scale to 0..1, normalise (MobileViT's, for BGR models).

    The model's own processor class cannot always say this (ConvNeXt's needs a square
    ``shortest_edge`` and crops below 384 pixels), so the generic ViT processor is written
    for every RGB model: ``AutoImageProcessor`` reads the class from the saved file."""
    common = {"do_resize": True, "size": {"height": pre.height, "width": pre.width},
              "resample": PIL_CODES[pre.interpolation], "do_rescale": True,
              "rescale_factor": 1 / 255, "do_convert_rgb": True}
    if pre.channel_order == "BGR":
        if pre.mean != (0.0, 0.0, 0.0) or pre.std != (1.0, 1.0, 1.0):
            raise ValueError("a BGR model's processor cannot normalise; mean 0 and std 1 expected")
        return MobileViTImageProcessor(**common, do_center_crop=False, do_flip_channel_order=True)
    return ViTImageProcessor(**common, do_normalize=True, image_mean=list(pre.mean),
                             image_std=list(pre.std))


def processor_to_save(model_config, pre):
    """The image processor saved with the model: one that computes the evaluation transform
    at the trained size, so that transformers' ``pipeline`` scores as visiontune does.

    timm-wrapper models keep their preprocessing in ``config.pretrained_cfg`` (their processor
    saves nothing): that is rewritten instead, before the weights are saved, and None returned."""
    pretrained_cfg = getattr(model_config, "pretrained_cfg", None)
    if getattr(model_config, "model_type", None) == "timm_wrapper" and isinstance(pretrained_cfg, dict):
        model_config.pretrained_cfg = timm_pretrained_cfg(pre, pretrained_cfg)
        return None
    return hf_image_processor(pre)
