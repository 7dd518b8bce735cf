"""Reliability: the promise that bad input gets one clear line naming the input (or the file)
and what is allowed, and a non-zero exit, before anything heavy loads: never a traceback, a
hang, a silently dropped row or a deleted file.

1. A table of bad inputs across every command, run in process through ``visiontune.cli.main``:
   the exit code, exactly one ``error:`` line naming the input or file, no traceback, and
   nothing written, changed or deleted (the case's folder and the shared models are compared
   file by file before and after).
2. SIGKILL at seeded random moments of a fine-tune (one while a checkpoint is being written),
   each followed by ``--resume_from_checkpoint true``: the final weights are bit-identical to an
   uninterrupted run and metrics.jsonl holds each step once (slow).
3. 100 malformed scoring requests against a real ``mlflow models serve`` of a fine-tuned tiny
   model: each a 4xx (never a 5xx, never a hang), and every 10 requests a good one is still
   answered with the same probabilities.

Exit codes (errors.py, cli.py): a UserError (DataError included) prints
``visiontune <command>: error: ...`` and exits 2; argparse usage errors print one
``visiontune: error: ...`` line and exit 2. ``data check`` exits 1, with its report on stdout
and no error line, when the data can be read but is not usable (bad rows, no rows, one class),
and 2 when the source itself cannot be read (docs/commands.md, *data check and demo-data*).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers import subset
from visiontune.cli import main

MULTICLASS, MULTILABEL = "image-classification", "image-classification-multilabel"
DIGITS = [str(d) for d in range(10)]
PREPROCESSING = {"height": 32, "width": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                 "interpolation": "bilinear"}

# mlflow's advice on input examples when a model is saved: not ours to act on.
pytestmark = pytest.mark.filterwarnings("ignore:.*input example:UserWarning")


# =============================================================================================
# 1. The table of bad inputs
# =============================================================================================
@dataclass
class Shared:
    """Read-only inputs shared by the cases (compared before and after each case)."""

    train: Path  # 20 digit rows, 2 per class (multi-class)
    test: Path  # 10 digit rows, 1 per class
    mosaics: Path  # 12 mosaic rows (multi-label)
    base: Path  # the tiny ViT, as import-model would leave it (3 classes, not fine-tuned)
    mc: Path  # a "fine-tuned" multi-class digits model (tiny ViT + model_selector_args.json)
    ml: Path  # the same, multi-label
    base_damaged: Path  # the tiny ViT with its weights file cut in half
    mc_damaged: Path

    def folders(self) -> list[Path]:
        return [self.train.parent, self.base, self.mc, self.ml, self.base_damaged, self.mc_damaged]


def _finetuned_like(path: Path, task: str) -> Path:
    from tests.tiny_models import save_tiny_model
    from visiontune.model_folder import ModelFolder

    save_tiny_model("vit", path, image_size=32, labels=DIGITS)
    ModelFolder(path).write_metadata({
        "model_metadata": {"finetuning_task": task, "is_finetuned_model": True,
                           "id2label": {str(i): c for i, c in enumerate(DIGITS)}},
        "preprocessing": PREPROCESSING, "multilabel_threshold": 0.5 if task == MULTILABEL else None,
    })
    return path


def _damaged(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


@pytest.fixture(scope="module")
def shared(demo_dir, tiny_vit, tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("reliability")
    data = root / "data"
    models = root / "models"
    mc = _finetuned_like(models / "mc", MULTICLASS)
    return Shared(
        train=subset(demo_dir / "digits" / "train", data / "train.jsonl", 2, per_class=True),
        test=subset(demo_dir / "digits" / "test", data / "test.jsonl", 1, per_class=True),
        mosaics=subset(demo_dir / "mosaics" / "train", data / "mosaics.jsonl", 12),
        base=tiny_vit, mc=mc, ml=_finetuned_like(models / "ml", MULTILABEL),
        base_damaged=_damaged(tiny_vit, models / "base_damaged"),
        mc_damaged=_damaged(mc, models / "mc_damaged"),
    )


class Ctx:
    """What a case builds its command line from: the shared inputs, and a folder of its own
    (the working directory) for the bad files it needs and the outputs it names."""

    def __init__(self, tmp: Path, shared: Shared, request):
        self.tmp, self.s, self._request = tmp, shared, request
        self.out = tmp / "out"
        self.inputs = tmp / "in"
        self.inputs.mkdir()

    def file(self, name: str, content: str | bytes) -> str:
        path = self.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return str(path)

    def folder(self, name: str, **files: str | bytes) -> str:
        path = self.inputs / name
        path.mkdir(parents=True)
        for file_name, content in files.items():
            self.file(f"{name}/{file_name}", content)
        return str(path)

    def fifo(self, name: str) -> str:
        """A named pipe nobody writes to: reading it would block forever."""
        path = self.inputs / name
        os.mkfifo(path)
        return str(path)

    def rows(self, source: Path | None = None) -> list[dict]:
        text = (source or self.s.train).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def jsonl(self, name: str, rows: list, raw: dict[int, str] | None = None) -> str:
        lines = [json.dumps(r) for r in rows]
        for index, line in (raw or {}).items():
            lines[index] = line
        return self.file(name, "".join(line + "\n" for line in lines))

    def copy(self, source: Path, name: str, **files: str | bytes) -> str:
        path = self.inputs / name
        shutil.copytree(source, path)
        for file_name, content in files.items():
            self.file(f"{name}/{file_name}", content)
        return str(path)

    def read_only(self) -> Path:
        """A read-only tmpfs mounted inside the case folder (skips where mounts need root)."""
        return self._request.getfixturevalue("tmpfs")(read_only=True)


def without(argv: list[str], option: str) -> list[str]:
    i = argv.index(option)
    return argv[:i] + argv[i + 2:]


# Command lines that work (each case adds or replaces inputs: argparse keeps the last value).
def ft(c: Ctx, *extra) -> list[str]:
    return ["finetune", "--model_path", str(c.s.base), "--training_data", str(c.s.train),
            "--task_name", MULTICLASS, "--output_dir_pytorch", str(c.out), "--max_steps", "1",
            "--image_height", "32", "--image_width", "32", *extra]


def pl(c: Ctx, *extra) -> list[str]:
    return ["pipeline", "--model_name", str(c.s.base), "--training_data", str(c.s.train),
            "--task_name", MULTICLASS, "--output_dir_pytorch", str(c.out), "--max_steps", "1",
            "--image_height", "32", "--image_width", "32", "--save_as_mlflow_model", "false", *extra]


def ev(c: Ctx, *extra) -> list[str]:
    return ["evaluate", "--model", str(c.s.mc), "--test_data", str(c.s.test), "--output_dir",
            str(c.out), *extra]


def pr(c: Ctx, *extra) -> list[str]:
    return ["predict", "--model", str(c.s.mc), "--data", str(c.s.test), "--output",
            str(c.tmp / "predictions.jsonl"), *extra]


def ex(c: Ctx, *extra) -> list[str]:
    return ["export-onnx", "--model", str(c.s.mc), "--output_dir", str(c.out), *extra]


def im(c: Ctx, *extra) -> list[str]:
    return ["import-model", "--pytorch_model", str(c.s.base), "--output_dir", str(c.out), *extra]


def dc(c: Ctx, *extra) -> list[str]:
    return ["data", "check", "--data", str(c.s.train), "--task_name", MULTICLASS, *extra]


def dd(c: Ctx, *extra) -> list[str]:
    return ["demo-data", "--output_dir", str(c.out), *extra]


@dataclass(frozen=True)
class Case:
    id: str
    # (command line, words the error line must hold); "{x}" in a word is the case's path x
    build: Callable[[Ctx], tuple[list[str], list[str]]]
    code: int = 2
    report: bool = False  # data check, exit 1: the verdict is in the report on stdout
    xfail: str | None = None

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=self.id, marks=marks)


def _png(width=8, height=6, colour=(10, 20, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows_with(c: Ctx, index: int, **changes) -> list[dict]:
    rows = c.rows()
    rows[index] = {**rows[index], **changes}
    return rows


def _mltable(c: Ctx, name: str, body: str) -> str:
    rows = c.rows()
    return c.folder(name, **{"a.jsonl": "".join(json.dumps(r) + "\n" for r in rows), "MLTable": body})


def _with_threshold(c: Ctx, threshold) -> str:
    """The multi-label model with another stored multilabel_threshold."""
    meta = json.loads((c.s.ml / "model_selector_args.json").read_text())
    return c.copy(c.s.ml, "model", **{"model_selector_args.json": json.dumps({**meta, "multilabel_threshold": threshold})})


DEEPSPEED = ["--apply_deepspeed", "true", "--deepspeed_config"]

CASES = [
    # ---- finetune: types, ranges, enums ------------------------------------------------------
    Case("finetune-learning_rate-not-a-number",
         lambda c: (ft(c, "--learning_rate", "fast"), ["--learning_rate", "'fast'", "a number >= 0"])),
    Case("finetune-learning_rate-negative",
         lambda c: (ft(c, "--learning_rate", "-0.1"), ["--learning_rate", "out of range", ">= 0"])),
    Case("finetune-learning_rate-nan",
         lambda c: (ft(c, "--learning_rate", "nan"), ["--learning_rate", "'nan'", "a number"])),
    Case("finetune-learning_rate-infinite",
         lambda c: (ft(c, "--learning_rate", "inf"), ["--learning_rate", "'inf'", "a number"])),
    Case("finetune-number_of_epochs-zero",
         lambda c: (ft(c, "--number_of_epochs", "0"), ["--number_of_epochs", "an integer >= 1"])),
    Case("finetune-number_of_epochs-fraction",
         lambda c: (ft(c, "--number_of_epochs", "2.5"), ["--number_of_epochs", "'2.5'", "an integer"])),
    Case("finetune-training_batch_size-zero",
         lambda c: (ft(c, "--training_batch_size", "0"), ["--training_batch_size", "an integer >= 1"])),
    Case("finetune-validation_batch_size-text",
         lambda c: (ft(c, "--validation_batch_size", "many"), ["--validation_batch_size", "'many'"])),
    Case("finetune-max_steps-zero",
         lambda c: (ft(c, "--max_steps", "0"), ["--max_steps", "out of range", "(or -1)"])),
    Case("finetune-image_height-minus-two",
         lambda c: (ft(c, "--image_height", "-2"), ["--image_height", ">= 1 (or -1)"])),
    Case("finetune-image_width-text",
         lambda c: (ft(c, "--image_width", "wide"), ["--image_width", "'wide'"])),
    Case("finetune-label_smoothing_factor-one",
         lambda c: (ft(c, "--label_smoothing_factor", "1"), ["--label_smoothing_factor", "< 1"])),
    Case("finetune-validation_fraction-zero",
         lambda c: (ft(c, "--validation_fraction", "0"), ["--validation_fraction", ">= 0.01 and < 1"])),
    Case("finetune-validation_fraction-one",
         lambda c: (ft(c, "--validation_fraction", "1"), ["--validation_fraction", "out of range"])),
    Case("finetune-multilabel_threshold-over-one",
         lambda c: (ft(c, "--multilabel_threshold", "1.5"), ["--multilabel_threshold", "< 1"])),
    Case("finetune-weight_decay-negative",
         lambda c: (ft(c, "--weight_decay", "-0.5"), ["--weight_decay", ">= 0"])),
    # argparse takes "-1e-4" for an option: still one line naming the input, and exit 2
    Case("finetune-weight_decay-negative-exponent",
         lambda c: (ft(c, "--weight_decay", "-1e-4"), ["--weight_decay"])),
    Case("finetune-warmup_steps-fraction",
         lambda c: (ft(c, "--warmup_steps", "1.5"), ["--warmup_steps", "an integer >= 0"])),
    Case("finetune-gradient_accumulation_step-zero",
         lambda c: (ft(c, "--gradient_accumulation_step", "0"), ["--gradient_accumulation_step"])),
    Case("finetune-max_grad_norm-negative",
         lambda c: (ft(c, "--max_grad_norm", "-1"), ["--max_grad_norm", ">= 0"])),
    Case("finetune-number_of_workers-negative",
         lambda c: (ft(c, "--number_of_workers", "-1"), ["--number_of_workers", ">= 0"])),
    Case("finetune-random_seed-negative",
         lambda c: (ft(c, "--random_seed", "-1"), ["--random_seed", ">= 0"])),
    Case("finetune-save_total_limit-zero",
         lambda c: (ft(c, "--save_total_limit", "0"), ["--save_total_limit", "(or -1)"])),
    Case("finetune-evaluation_steps-zero",
         lambda c: (ft(c, "--evaluation_steps", "0"), ["--evaluation_steps", ">= 1"])),
    Case("finetune-early_stopping_patience-zero",
         lambda c: (ft(c, "--early_stopping_patience", "0"), ["--early_stopping_patience", ">= 1"])),
    Case("finetune-precision-8",
         lambda c: (ft(c, "--precision", "8"), ["--precision", "'8'", "one of 16, 32"])),
    Case("finetune-task_name-unknown",
         lambda c: (ft(c, "--task_name", "image-classification-multiclass"),
                    ["--task_name", "image-classification-multilabel"])),
    Case("finetune-optimizer-unknown",
         lambda c: (ft(c, "--optimizer", "adam"), ["--optimizer", "'adam'", "adamw_hf"])),
    Case("finetune-scheduler-unknown",
         lambda c: (ft(c, "--learning_rate_scheduler", "cosine"),
                    ["--learning_rate_scheduler", "'cosine'", "warmup_cosine"])),
    Case("finetune-metric-unknown",
         lambda c: (ft(c, "--metric_for_best_model", "auc"), ["--metric_for_best_model", "'auc'"])),
    Case("finetune-evaluation_strategy-no",
         lambda c: (ft(c, "--evaluation_strategy", "no"), ["--evaluation_strategy", "one of epoch, steps"])),
    Case("finetune-apply_augmentations-not-a-boolean",
         lambda c: (ft(c, "--apply_augmentations", "maybe"), ["--apply_augmentations", "true or false"])),
    Case("finetune-max_image_mb-zero",
         lambda c: (ft(c, "--max_image_mb", "0"), ["--max_image_mb", ">= 1"])),
    Case("finetune-misspelt-option",
         lambda c: (ft(c, "--learning-rate", "0.1"), ["unrecognized arguments", "--learning-rate"])),
    # ---- finetune: missing and contradicting inputs ------------------------------------------
    Case("finetune-missing-training_data",
         lambda c: (without(ft(c), "--training_data"), ["--training_data is required"])),
    Case("finetune-missing-model_path",
         lambda c: (without(ft(c), "--model_path"), ["--model_path is required"])),
    Case("finetune-missing-task_name",
         lambda c: (without(ft(c), "--task_name"), ["--task_name is required"])),
    Case("finetune-missing-output_dir_pytorch",
         lambda c: (without(ft(c), "--output_dir_pytorch"), ["--output_dir_pytorch is required"])),
    Case("finetune-iou-metric-for-multiclass",
         lambda c: (ft(c, "--metric_for_best_model", "iou"), ["--metric_for_best_model", "multi-label"])),
    Case("finetune-ort-optimizer-without-apply_ort",
         lambda c: (ft(c, "--optimizer", "adamw_ort_fused"), ["--optimizer", "--apply_ort true"])),
    Case("finetune-output-is-the-model-folder",
         lambda c: (ft(c, "--output_dir_pytorch", str(c.s.base)), ["--output_dir_pytorch", "--model_path"])),
    Case("finetune-mlflow-output-is-the-model-folder",
         lambda c: (ft(c, "--output_dir_mlflow", str(c.s.base)),
                    ["--output_dir_mlflow", str(c.s.base), "did not write"])),
    Case("finetune-mlflow-output-is-the-pytorch-output",
         lambda c: (ft(c, "--output_dir_mlflow", str(c.out)), ["--output_dir_mlflow", "--output_dir_pytorch"])),
    # ---- finetune: extra_optim_args and DeepSpeed config files -------------------------------
    Case("finetune-extra_optim_args-no-value",
         lambda c: (ft(c, "--optimizer", "sgd", "--extra_optim_args", "momentum"),
                    ["--extra_optim_args", "'momentum'", "key=value"])),
    Case("finetune-extra_optim_args-not-a-number",
         lambda c: (ft(c, "--optimizer", "sgd", "--extra_optim_args", "momentum=fast"),
                    ["--extra_optim_args", "momentum='fast'"])),
    Case("finetune-extra_optim_args-key-of-another-optimizer",
         lambda c: (ft(c, "--optimizer", "adamw", "--extra_optim_args", "momentum=0.9"),
                    ["--extra_optim_args", "momentum", "allowed: beta1"])),
    Case("finetune-deepspeed_config-not-found",
         lambda c: (ft(c, *DEEPSPEED, str(c.tmp / "ds.json")), ["--deepspeed_config", "not found"])),
    Case("finetune-deepspeed_config-invalid-json",
         lambda c: (ft(c, *DEEPSPEED, c.file("ds.json", '{"zero_optimization": {"stage": 2}')),
                    ["--deepspeed_config", "{inputs}/ds.json", "invalid JSON"])),
    Case("finetune-deepspeed_config-a-list",
         lambda c: (ft(c, *DEEPSPEED, c.file("ds.json", "[1, 2]")), ["--deepspeed_config", "a JSON object"])),
    Case("finetune-deepspeed_config-no-deepspeed-keys",
         lambda c: (ft(c, *DEEPSPEED, c.file("ds.json", '{"batch": 8}')),
                    ["--deepspeed_config", "not a DeepSpeed configuration"])),
    Case("finetune-deepspeed_config-zero-stage-5",
         lambda c: (ft(c, *DEEPSPEED, c.file("ds.json", '{"zero_optimization": {"stage": 5}}')),
                    ["--deepspeed_config", "zero_optimization.stage", "0, 1, 2 or 3"])),
    Case("finetune-deepspeed_config-micro-batch-zero",
         lambda c: (ft(c, *DEEPSPEED, c.file("ds.json", '{"train_micro_batch_size_per_gpu": 0}')),
                    ["--deepspeed_config", "train_micro_batch_size_per_gpu", "positive integer"])),
    # ---- --config files ----------------------------------------------------------------------
    Case("finetune-config-not-found",
         lambda c: (ft(c, "--config", str(c.tmp / "inputs.yaml")), ["--config", "not found"])),
    Case("finetune-config-malformed-yaml",
         lambda c: (ft(c, "--config", c.file("inputs.yaml", "learning_rate: [1, 2\nseed: 3\n")),
                    ["--config", "{inputs}/inputs.yaml", "not valid YAML or JSON"])),
    Case("finetune-config-malformed-json",
         lambda c: (ft(c, "--config", c.file("inputs.json", '{"learning_rate": 0.1')),
                    ["--config", "{inputs}/inputs.json", "not valid YAML or JSON"])),
    Case("finetune-config-not-a-mapping",
         lambda c: (ft(c, "--config", c.file("inputs.yaml", "- learning_rate\n- 0.1\n")),
                    ["--config", "must hold a mapping"])),
    Case("finetune-config-unknown-key",
         lambda c: (ft(c, "--config", c.file("inputs.yaml", "learning_rat: 0.1\n")),
                    ["--config", "unknown input(s) learning_rat", "known inputs"])),
    Case("finetune-config-bad-value",
         lambda c: (ft(c, "--config", c.file("inputs.yaml", "learning_rate: {a: 1}\n")),
                    ["--learning_rate", "a number >= 0"])),
    Case("finetune-config-not-utf8",
         lambda c: (ft(c, "--config", c.file("inputs.yaml", b"learning_rate: 0.1  # \xff\xfe\n")),
                    ["--config", "{inputs}/inputs.yaml"])),
    Case("evaluate-config-a-png",
         lambda c: (ev(c, "--config", c.file("inputs.yaml", _png())), ["--config", "{inputs}/inputs.yaml"])),
    Case("predict-config-unknown-key",
         lambda c: (pr(c, "--config", c.file("inputs.yaml", "learning_rate: 0.1\n")),
                    ["--config", "unknown input(s) learning_rate"])),
    Case("import-model-config-scalar",
         lambda c: (im(c, "--config", c.file("inputs.yaml", "just text\n")), ["--config", "must hold a mapping"])),
    Case("data-check-takes-no-config",
         lambda c: (dc(c, "--config", c.file("inputs.yaml", "task_name: x\n")),
                    ["unrecognized arguments", "--config"])),
    # ---- finetune: output folders ------------------------------------------------------------
    Case("finetune-output-holds-the-users-files",
         lambda c: (ft(c, "--output_dir_pytorch", c.folder("mine", **{"thesis.pdf": "%PDF"})),
                    ["--output_dir_pytorch", "{inputs}/mine", "thesis.pdf", "did not write"])),
    Case("finetune-mlflow-output-holds-the-users-files",
         lambda c: (ft(c, "--output_dir_mlflow", c.folder("mine", **{"notes.txt": "keep"})),
                    ["--output_dir_mlflow", "notes.txt"])),
    Case("finetune-output-is-a-file",
         lambda c: (ft(c, "--output_dir_pytorch", c.file("out.txt", "x")), ["--output_dir_pytorch", "is a file"])),
    Case("finetune-output-on-read-only-fs",
         lambda c: (ft(c, "--output_dir_pytorch", str(c.read_only() / "out")),
                    ["--output_dir_pytorch", "Read-only file system"])),
    Case("finetune-mlflow-output-on-read-only-fs",
         lambda c: (ft(c, "--output_dir_mlflow", str(c.read_only() / "m")),
                    ["--output_dir_mlflow", "Read-only file system"])),
    # ---- finetune: model folders -------------------------------------------------------------
    Case("finetune-model_path-not-found",
         lambda c: (ft(c, "--model_path", str(c.tmp / "model")), ["--model_path", "not found"])),
    Case("finetune-model_path-is-a-file",
         lambda c: (ft(c, "--model_path", c.file("model.bin", "x")), ["--model_path", "{inputs}/model.bin"])),
    Case("finetune-model_path-without-config.json",
         lambda c: (ft(c, "--model_path", c.folder("model", **{"model.safetensors": "x"})),
                    ["--model_path", "no config.json"])),
    Case("finetune-model_path-damaged-weights",
         lambda c: (ft(c, "--model_path", str(c.s.base_damaged)), ["--model_path", "cannot load"])),
    Case("finetune-model_defaults-invalid-json",
         lambda c: (ft(c, "--model_path", c.copy(c.s.base, "model", **{"model_defaults.json": "{"})),
                    ["--model_path", "model_defaults.json", "not valid JSON"])),
    Case("finetune-model_defaults-unknown-input",
         lambda c: (ft(c, "--model_path", c.copy(c.s.base, "model", **{"model_defaults.json": '{"seed": 1}'})),
                    ["--model_path", "model_defaults.json", "sets seed"])),
    # ---- finetune: data ----------------------------------------------------------------------
    Case("finetune-training_data-not-found",
         lambda c: (ft(c, "--training_data", str(c.tmp / "train.jsonl")), ["data not found", "{tmp}/train.jsonl"])),
    Case("finetune-training_data-a-named-pipe",  # never opened: it would block forever
         lambda c: (ft(c, "--training_data", c.fifo("train.jsonl")), ["{inputs}/train.jsonl"])),
    Case("finetune-config-a-named-pipe",
         lambda c: (ft(c, "--config", c.fifo("inputs.yaml")), ["--config", "{inputs}/inputs.yaml"])),
    Case("finetune-training_data-remote-url",
         lambda c: (ft(c, "--training_data", "https://example.com/train.jsonl"),
                    ["https://example.com/train.jsonl", "local folder or file"])),
    Case("finetune-training_data-unknown-format",
         lambda c: (ft(c, "--training_data", c.file("train.xlsx", b"PK")),
                    ["{inputs}/train.xlsx", "unknown data format"])),
    Case("finetune-training_data-empty-file",
         lambda c: (ft(c, "--training_data", c.file("train.jsonl", "")), ["{inputs}/train.jsonl", "no usable rows"])),
    Case("finetune-training_data-empty-folder",
         lambda c: (ft(c, "--training_data", c.folder("images")), ["{inputs}/images", "no class subfolders"])),
    Case("finetune-training_data-malformed-json-line",
         lambda c: (ft(c, "--training_data", c.jsonl("train.jsonl", c.rows(), {3: '{"image_url": "a.png", "label": '})),
                    ["{inputs}/train.jsonl:4", "malformed JSON", "--skip_bad_rows true"])),
    Case("finetune-training_data-line-not-an-object",
         lambda c: (ft(c, "--training_data", c.jsonl("train.jsonl", c.rows(), {0: "[1, 2]"})),
                    ["{inputs}/train.jsonl:1", "expected a JSON object"])),
    Case("finetune-training_data-one-json-array",
         lambda c: (ft(c, "--training_data", c.file("train.jsonl", json.dumps(c.rows()))),
                    ["{inputs}/train.jsonl", "one JSON array"])),
    Case("finetune-training_data-missing-label-column",
         lambda c: (ft(c, "--training_data", c.jsonl("train.jsonl", [{"image_url": r["image_url"]} for r in c.rows()])),
                    ["{inputs}/train.jsonl:1", "missing column 'label'"])),
    Case("finetune-image_column-names-no-column",
         lambda c: (ft(c, "--image_column", "picture"), ["{train}:1", "missing column 'picture'"])),
    Case("finetune-training_data-csv-without-image-column",
         lambda c: (ft(c, "--training_data", c.file("train.csv", "img,label\n" + "".join(
             f"{r['image_url']},{r['label']}\n" for r in c.rows()))),
                    ["{inputs}/train.csv:1", "no column 'image_url'"])),
    Case("finetune-training_data-a-single-class",
         lambda c: (ft(c, "--training_data", c.jsonl("train.jsonl", [{**r, "label": "3"} for r in c.rows()])),
                    ["{inputs}/train.jsonl", "at least 2 classes"])),
    Case("finetune-training_data-lists-for-multiclass",
         lambda c: (ft(c, "--training_data", c.jsonl("train.jsonl", [{**r, "label": [r["label"]]} for r in c.rows()])),
                    ["{inputs}/train.jsonl:1", "is a list", MULTILABEL])),
    Case("finetune-training_data-single-labels-for-multilabel",
         lambda c: (ft(c, "--task_name", MULTILABEL), ["{train}:1", "single value", "needs a list"])),
    Case("finetune-training_data-boolean-label",
         lambda c: (ft(c, "--training_data", c.jsonl("train.jsonl", _rows_with(c, 2, label=True))),
                    ["{inputs}/train.jsonl:3", "boolean"])),
    Case("finetune-training_data-folder-tree-for-multilabel",
         lambda c: (ft(c, "--task_name", MULTILABEL, "--training_data",
                       c.folder("tree", **{"a/1.png": _png(), "b/2.png": _png()})),
                    ["{inputs}/tree", "list of labels"])),
    Case("finetune-training_data-unreadable-image",
         lambda c: (ft(c, "--skip_bad_rows", "false", "--training_data", c.jsonl(
             "train.jsonl", _rows_with(c, 5, image_url=c.file("fake.png", "not an image")))),
                    ["{inputs}/train.jsonl:6", "{inputs}/fake.png", "not an image file"])),
    Case("finetune-training_data-truncated-png",
         lambda c: (ft(c, "--training_data", c.jsonl(
             "train.jsonl", _rows_with(c, 0, image_url=c.file("cut.png", _png(64, 64)[:60])))),
                    ["{inputs}/train.jsonl:1", "{inputs}/cut.png"])),
    Case("finetune-training_data-missing-image",
         lambda c: (ft(c, "--training_data", c.jsonl("train.jsonl", _rows_with(c, 7, image_url="gone.png"))),
                    ["{inputs}/train.jsonl:8", "{inputs}/gone.png"])),
    Case("finetune-skip_bad_rows-but-every-row-bad",
         lambda c: (ft(c, "--skip_bad_rows", "true", "--training_data",
                       c.jsonl("train.jsonl", [{**r, "label": [r["label"]]} for r in c.rows()])),
                    ["{inputs}/train.jsonl", "no usable rows", "all 20 row(s) are bad"])),
    Case("finetune-validation_data-labels-of-the-wrong-shape",
         lambda c: (ft(c, "--validation_data", str(c.s.mosaics)), ["{mosaics}:1", "is a list"])),
    Case("finetune-mltable-unsupported-transformation",
         lambda c: (ft(c, "--training_data", _mltable(c, "table", "paths:\n  - file: ./a.jsonl\n"
                                                       "transformations:\n  - read_delta_lake: {}\n")),
                    ["{inputs}/table/MLTable", "read_delta_lake", "not supported"])),
    Case("finetune-mltable-malformed-yaml",
         lambda c: (ft(c, "--training_data", _mltable(c, "table", "paths: [\n  - file: ./a.jsonl\n")),
                    ["{inputs}/table/MLTable", "not valid YAML"])),
    Case("finetune-mltable-missing-file",
         lambda c: (ft(c, "--training_data", _mltable(c, "table", "paths:\n  - file: ./b.jsonl\n")),
                    ["{inputs}/table/MLTable", "./b.jsonl", "not found"])),
    Case("finetune-mltable-negative-take",
         lambda c: (ft(c, "--training_data", _mltable(c, "table", "paths:\n  - file: ./a.jsonl\n"
                                                       "transformations:\n  - take: -1\n")),
                    ["{inputs}/table/MLTable", "'take'", "non-negative"])),
    Case("finetune-mltable-drops-the-label-column",
         lambda c: (ft(c, "--training_data", _mltable(c, "table", "paths:\n  - file: ./a.jsonl\n"
                                                       "transformations:\n  - drop_columns: label\n")),
                    ["{inputs}/table/MLTable", "drops column 'label'"])),
    # ---- pipeline ----------------------------------------------------------------------------
    Case("pipeline-no-model-source",
         lambda c: (without(pl(c), "--model_name"), ["--model_name, --pytorch_model or --mlflow_model"])),
    Case("pipeline-number_of_epochs-zero",
         lambda c: (pl(c, "--number_of_epochs", "0"), ["--number_of_epochs", ">= 1"])),
    Case("pipeline-iou-metric-for-multiclass",
         lambda c: (pl(c, "--metric_for_best_model", "iou_macro"), ["--metric_for_best_model", "multi-label"])),
    Case("pipeline-model_name-folder-not-found",
         lambda c: (pl(c, "--model_name", str(c.tmp / "model")), ["--model_name", "not found"])),
    Case("pipeline-hub-model-offline",
         lambda c: (pl(c, "--model_name", "google/vit-base-patch16-224"), ["--model_name", "unreachable"])),
    Case("pipeline-pytorch-and-mlflow-model",
         lambda c: (pl(c, "--pytorch_model", str(c.s.base), "--mlflow_model", str(c.s.base)),
                    ["--pytorch_model", "--mlflow_model", "not both"])),
    Case("pipeline-test_data-not-found",
         lambda c: (pl(c, "--test_data", str(c.tmp / "test.jsonl")), ["data not found", "{tmp}/test.jsonl"])),
    Case("pipeline-test_data-labels-of-the-wrong-shape",
         lambda c: (pl(c, "--test_data", str(c.s.mosaics)), ["{mosaics}:1", "is a list"])),
    Case("pipeline-test_data-unknown-labels",
         lambda c: (pl(c, "--test_data", c.jsonl("test.jsonl", [{**r, "label": "cat"} for r in c.rows()])),
                    ["{inputs}/test.jsonl", "does not know: cat"])),
    Case("pipeline-output-holds-the-users-files",
         lambda c: (pl(c, "--output_dir_pytorch", c.folder("mine", **{"notes.txt": "keep"})),
                    ["--output_dir_pytorch", "notes.txt"])),
    Case("pipeline-evaluation-output-is-a-file",
         lambda c: (pl(c, "--output_dir_evaluation", c.file("report", "x")),
                    ["--output_dir_evaluation", "{inputs}/report", "is a file"])),
    # ---- evaluate ----------------------------------------------------------------------------
    Case("evaluate-model-not-found",
         lambda c: (ev(c, "--model", str(c.tmp / "model")), ["--model", "folder not found"])),
    Case("evaluate-model-is-a-file",
         lambda c: (ev(c, "--model", c.file("model.bin", "x")), ["--model", "is a file"])),
    Case("evaluate-model-without-config.json",
         lambda c: (ev(c, "--model", c.folder("model", **{"notes.txt": "x"})), ["--model", "no config.json"])),
    Case("evaluate-model-damaged-weights",
         lambda c: (ev(c, "--model", str(c.s.mc_damaged)), ["--model", "cannot load the model"])),
    Case("evaluate-mlflow-folder-without-model",
         lambda c: (ev(c, "--model", c.folder("mlflow", MLmodel="flavors: {}\n")),
                    ["--model", "MLflow model folder", "holds no model"])),
    Case("evaluate-test_data-not-found",
         lambda c: (ev(c, "--test_data", str(c.tmp / "test.jsonl")), ["data not found", "{tmp}/test.jsonl"])),
    Case("evaluate-test_data-unknown-labels",
         lambda c: (ev(c, "--model", str(c.s.base)), ["{test}", "label(s) the model does not know"])),
    Case("evaluate-test_data-lists-for-a-multiclass-model",
         lambda c: (ev(c, "--test_data", str(c.s.mosaics)), ["{mosaics}:1", "is a list"])),
    Case("evaluate-test_data-single-labels-for-a-multilabel-model",
         lambda c: (ev(c, "--model", str(c.s.ml)), ["{test}:1", "single value"])),
    Case("evaluate-test_data-unreadable-image",
         lambda c: (ev(c, "--test_data", c.jsonl("test.jsonl", _rows_with(
             c, 4, image_url=c.file("fake.png", "not an image")))), ["{inputs}/test.jsonl:5", "not an image file"])),
    Case("evaluate-tune_thresholds-for-a-multiclass-model",
         lambda c: (ev(c, "--tune_thresholds", "global"), ["--tune_thresholds", "only for multi-label"])),
    Case("evaluate-tune_thresholds-unknown",
         lambda c: (ev(c, "--tune_thresholds", "best"), ["--tune_thresholds", "'best'", "per_class"])),
    Case("evaluate-threshold_metric-unknown",
         lambda c: (ev(c, "--threshold_metric", "accuracy"), ["--threshold_metric", "'accuracy'", "iou_micro"])),
    Case("evaluate-tuning_data-of-the-wrong-shape",  # the model's stored threshold stays as it was
         lambda c: (ev(c, "--model", str(c.s.ml), "--test_data", str(c.s.mosaics), "--tune_thresholds",
                       "per_class", "--tuning_data", str(c.s.test)), ["{test}:1", "single value"])),
    Case("evaluate-stored-thresholds-of-the-wrong-count",
         lambda c: (ev(c, "--model", _with_threshold(c, [0.5, 0.5, 0.5]), "--test_data", str(c.s.mosaics)),
                    ["--model", "multilabel_threshold", "10 numbers"])),
    Case("evaluate-batch_size-zero",
         lambda c: (ev(c, "--batch_size", "0"), ["--batch_size", ">= 1"])),
    Case("evaluate-runtime-unknown",
         lambda c: (ev(c, "--runtime", "tensorrt"), ["--runtime", "'tensorrt'", "onnxruntime"])),
    Case("evaluate-runtime-onnxruntime-without-export",
         lambda c: (ev(c, "--runtime", "onnxruntime"), ["--runtime onnxruntime", "no ONNX export"])),
    Case("evaluate-output-is-a-file",
         lambda c: (ev(c, "--output_dir", c.file("report", "x")), ["--output_dir", "is a file"])),
    Case("evaluate-output-on-read-only-fs",
         lambda c: (ev(c, "--output_dir", str(c.read_only() / "report")), ["--output_dir", "Read-only file system"])),
    Case("evaluate-output-holds-the-users-files",
         lambda c: (ev(c, "--output_dir", c.folder("mine", **{"metrics.json": '{"mine": 1}'})),
                    ["--output_dir", "{inputs}/mine", "metrics.json"])),
    Case("evaluate-missing-test_data",
         lambda c: (without(ev(c), "--test_data"), ["--test_data is required"])),
    # ---- predict -----------------------------------------------------------------------------
    Case("predict-output-unknown-suffix",
         lambda c: (pr(c, "--output", str(c.tmp / "p.txt")), ["--output", "'.txt'", ".jsonl or .csv"])),
    Case("predict-output-is-a-folder",
         lambda c: (pr(c, "--output", c.folder("p.jsonl")), ["--output", "{inputs}/p.jsonl", "folder"])),
    Case("predict-output-on-read-only-fs",
         lambda c: (pr(c, "--output", str(c.read_only() / "p.jsonl")), ["--output", "Read-only file system"])),
    Case("predict-data-not-found",
         lambda c: (pr(c, "--data", str(c.tmp / "images")), ["--data", "not found"])),
    Case("predict-data-a-named-pipe",
         lambda c: (pr(c, "--data", c.fifo("images.txt")), ["--data", "{inputs}/images.txt"])),
    Case("predict-data-unknown-format",
         lambda c: (pr(c, "--data", c.file("data.xlsx", b"PK")), ["--data", "unknown data format"])),
    Case("predict-data-folder-without-images",
         lambda c: (pr(c, "--data", c.folder("images", **{"notes.txt": "x"})), ["--data", "no images found"])),
    Case("predict-mltable-drops-the-image-column",
         lambda c: (pr(c, "--data", _mltable(c, "table", "paths:\n  - file: ./a.jsonl\n"
                                              "transformations:\n  - drop_columns: image_url\n")),
                    ["{inputs}/table/MLTable", "drops the image column"])),
    Case("predict-mltable-unsupported-transformation",
         lambda c: (pr(c, "--data", _mltable(c, "table", "paths:\n  - file: ./a.jsonl\n"
                                              "transformations:\n  - read_delta_lake: {}\n")),
                    ["{inputs}/table/MLTable", "not supported"])),
    Case("predict-batch_size-negative",
         lambda c: (pr(c, "--batch_size", "-1"), ["--batch_size", ">= 1"])),
    Case("predict-model-damaged-weights",
         lambda c: (pr(c, "--model", str(c.s.mc_damaged)), ["--model", "cannot load the model"])),
    Case("predict-stored-threshold-out-of-range",
         lambda c: (pr(c, "--model", _with_threshold(c, 1.5)), ["--model", "multilabel_threshold", "[0, 1]"])),
    Case("predict-stored-threshold-not-a-number",
         lambda c: (pr(c, "--model", _with_threshold(c, "high")), ["--model", "multilabel_threshold"])),
    Case("predict-missing-output",
         lambda c: (without(pr(c), "--output"), ["--output is required"])),
    # ---- export-onnx -------------------------------------------------------------------------
    Case("export-onnx-opset-17",
         lambda c: (ex(c, "--opset", "17"), ["--opset", ">= 18"])),
    Case("export-onnx-opset-text",
         lambda c: (ex(c, "--opset", "latest"), ["--opset", "'latest'"])),
    Case("export-onnx-model-not-found",
         lambda c: (ex(c, "--model", str(c.tmp / "model")), ["--model", "folder not found"])),
    Case("export-onnx-model-without-config.json",
         lambda c: (ex(c, "--model", c.folder("model")), ["--model", "no config.json"])),
    Case("export-onnx-output-is-a-file",
         lambda c: (ex(c, "--output_dir", c.file("onnx", "x")), ["--output_dir", "is a file"])),
    Case("export-onnx-stored-threshold-out-of-range",
         lambda c: (ex(c, "--model", _with_threshold(c, 1.5)), ["--model", "multilabel_threshold", "[0, 1]"])),
    Case("export-onnx-model-damaged-weights",
         lambda c: (ex(c, "--model", str(c.s.mc_damaged)), ["--model", "cannot load"])),
    Case("export-onnx-output-on-read-only-fs",
         lambda c: (ex(c, "--output_dir", str(c.read_only() / "onnx")), ["--output_dir", "Read-only file system"])),
    Case("export-onnx-output-holds-the-users-files",
         lambda c: (ex(c, "--output_dir", c.folder("mine", **{"model.onnx": "my own model"})),
                    ["--output_dir", "{inputs}/mine", "model.onnx"])),
    # ---- import-model ------------------------------------------------------------------------
    Case("import-model-no-source",
         lambda c: (without(im(c), "--pytorch_model"), ["no model given", "--model_name", "--pytorch_model"])),
    Case("import-model-pytorch-and-mlflow",
         lambda c: (im(c, "--mlflow_model", str(c.s.base)), ["--pytorch_model", "--mlflow_model", "not both"])),
    Case("import-model-pytorch_model-not-found",
         lambda c: (im(c, "--pytorch_model", str(c.tmp / "model")), ["--pytorch_model", "folder not found"])),
    Case("import-model-pytorch_model-is-a-file",
         lambda c: (im(c, "--pytorch_model", c.file("model.bin", "x")), ["--pytorch_model", "is a file"])),
    Case("import-model-mlflow_model-without-MLmodel",
         lambda c: (without(im(c, "--mlflow_model", str(c.s.base)), "--pytorch_model"),
                    ["--mlflow_model", "no MLmodel file"])),
    Case("import-model-model_name-path-not-found",
         lambda c: (without(im(c, "--model_name", "./no/such/model"), "--pytorch_model"),
                    ["--model_name", "folder not found"])),
    Case("import-model-model_name-not-a-hub-id",
         lambda c: (without(im(c, "--model_name", "not a hub id!"), "--pytorch_model"),
                    ["--model_name", "neither a folder nor a Hugging Face hub id"])),
    Case("import-model-hub-offline",
         lambda c: (without(im(c, "--model_name", "google/vit-base-patch16-224"), "--pytorch_model"),
                    ["--model_name", "hub is unreachable"])),
    Case("import-model-output-inside-the-input",
         lambda c: (im(c, "--pytorch_model", c.copy(c.s.base, "model"), "--output_dir", str(c.inputs / "model" / "sub")),
                    ["--output_dir", "must not be the input folder or inside it"])),
    Case("import-model-output-holds-the-users-files",
         lambda c: (im(c, "--output_dir", c.folder("mine", **{"notes.txt": "keep"})), ["--output_dir", "notes.txt"])),
    Case("import-model-output-is-a-file",
         lambda c: (im(c, "--output_dir", c.file("model", "x")), ["--output_dir", "is a file"])),
    Case("import-model-output-on-read-only-fs",
         lambda c: (im(c, "--output_dir", str(c.read_only() / "model")), ["--output_dir", "Read-only file system"])),
    Case("import-model-folder-without-config.json",
         lambda c: (im(c, "--pytorch_model", c.folder("model", **{"notes.txt": "x"})),
                    ["--pytorch_model", "no Hugging Face model"])),
    Case("import-model-config.json-not-a-model-config",
         lambda c: (im(c, "--pytorch_model", c.folder("model", **{"config.json": '{"foo": 1}'})),
                    ["--pytorch_model", "not a Hugging Face model config"])),
    Case("import-model-config.json-malformed",
         lambda c: (im(c, "--pytorch_model", c.folder("model", **{"config.json": "{not json"})),
                    ["--pytorch_model", "config.json"])),
    Case("import-model-without-weights",
         lambda c: (im(c, "--pytorch_model", c.folder("model", **{
             "config.json": (c.s.base / "config.json").read_text(),
             "preprocessor_config.json": (c.s.base / "preprocessor_config.json").read_text()})),
                    ["--pytorch_model", "no PyTorch weights"])),
    Case("import-model-damaged-weights",
         lambda c: (im(c, "--pytorch_model", str(c.s.base_damaged)),
                    ["--pytorch_model", "{base_damaged}", "model.safetensors"])),
    Case("import-model-missing-output_dir",
         lambda c: (without(im(c), "--output_dir"), ["--output_dir is required"])),
    # ---- data check (2: the source cannot be read; 1: read, but not usable) -------------------
    Case("data-check-data-not-found",
         lambda c: (dc(c, "--data", str(c.tmp / "train.jsonl")), ["data not found", "{tmp}/train.jsonl"])),
    Case("data-check-missing-task_name",
         lambda c: (without(dc(c), "--task_name"), ["--task_name is required"])),
    Case("data-check-task_name-unknown",
         lambda c: (dc(c, "--task_name", "cats"), ["--task_name", "'cats'"])),
    Case("data-check-skip_bad_rows-not-a-boolean",
         lambda c: (dc(c, "--skip_bad_rows", "perhaps"), ["--skip_bad_rows", "true or false"])),
    Case("data-check-mltable-unsupported-transformation",
         lambda c: (dc(c, "--data", _mltable(c, "table", "paths:\n  - file: ./a.jsonl\n"
                                              "transformations:\n  - read_delta_lake: {}\n")),
                    ["{inputs}/table/MLTable", "not supported"])),
    Case("data-check-one-json-array",
         lambda c: (dc(c, "--data", c.file("train.jsonl", json.dumps(c.rows()))), ["{inputs}/train.jsonl", "JSON array"])),
    Case("data-check-empty-dataset",
         lambda c: (dc(c, "--data", c.file("train.jsonl", "")), ["{inputs}/train.jsonl", "NOT USABLE: no usable rows"]),
         code=1, report=True),
    Case("data-check-a-single-class",
         lambda c: (dc(c, "--data", c.jsonl("train.jsonl", [{**r, "label": "3"} for r in c.rows()])),
                    ["{inputs}/train.jsonl", "NOT USABLE: 1 class(es)"]), code=1, report=True),
    Case("data-check-malformed-json-line",
         lambda c: (dc(c, "--data", c.jsonl("train.jsonl", c.rows(), {3: "{"})),
                    ["{inputs}/train.jsonl:4: malformed JSON", "NOT USABLE as is"]), code=1, report=True),
    Case("data-check-missing-label-column",
         lambda c: (dc(c, "--data", c.jsonl("train.jsonl", [{"image_url": r["image_url"]} for r in c.rows()])),
                    ["{inputs}/train.jsonl:1: missing column 'label'", "NOT USABLE"]), code=1, report=True),
    Case("data-check-lists-for-multiclass",
         lambda c: (dc(c, "--data", str(c.s.mosaics)), ["{mosaics}:1: label", "is a list", "NOT USABLE"]),
         code=1, report=True),
    Case("data-check-unreadable-image",
         lambda c: (dc(c, "--data", c.jsonl("train.jsonl", _rows_with(c, 5, image_url=c.file("fake.png", "x")))),
                    ["{inputs}/train.jsonl:6: {inputs}/fake.png: not an image file", "NOT USABLE as is"]),
         code=1, report=True),
    # ---- demo-data ---------------------------------------------------------------------------
    Case("demo-data-missing-output_dir",
         lambda c: (without(dd(c), "--output_dir"), ["--output_dir is required"])),
    Case("demo-data-output-is-a-file",
         lambda c: (dd(c, "--output_dir", c.file("demo", "x")), ["--output_dir", "not a folder"])),
    Case("demo-data-output-holds-the-users-digits-folder",
         lambda c: (dd(c, "--output_dir", str(Path(c.folder("demo/digits", **{"mine.txt": "keep"})).parent)),
                    ["--output_dir", "{inputs}/demo/digits", "not a visiontune demo dataset"])),
    Case("demo-data-output-on-read-only-fs",
         lambda c: (dd(c, "--output_dir", str(c.read_only() / "demo")), ["--output_dir", "Read-only file system"])),
    Case("demo-data-takes-no-config",
         lambda c: (dd(c, "--config", c.file("c.yaml", "output_dir: x\n")), ["unrecognized arguments", "--config"])),
]

COMMANDS = ("import-model", "finetune", "pipeline", "evaluate", "predict", "export-onnx", "data-check",
            "demo-data")


def test_the_table_covers_every_command():
    assert len(CASES) >= 70 and len({case.id for case in CASES}) == len(CASES)
    for command in COMMANDS:
        assert sum(case.id.startswith(command + "-") for case in CASES) >= 5, command


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: folders, and files by size and digest."""
    seen: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            seen[os.path.relpath(os.path.join(dirpath, name), root)] = ("dir",)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                seen[os.path.relpath(path, root)] = ("other",)
                continue
            data = Path(path).read_bytes()
            seen[os.path.relpath(path, root)] = ("file", len(data), hashlib.sha1(data).hexdigest())
    return seen


def run_cli(argv: list[str]) -> int | str:
    """The command in process; an exception that escapes ``main`` is what a user would see as
    a traceback, returned as text so that the assertion says what it was."""
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - exactly what the test looks for
        return f"Traceback: uncaught {type(exc).__name__}: {str(exc)[:300]}"




@pytest.mark.timeout(120)  # a case that hangs fails alone
@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, shared, tmp_path, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)
    c = Ctx(tmp_path, shared, request)
    argv, words = case.build(c)
    names = {"tmp": str(tmp_path), "inputs": str(c.inputs), "train": str(shared.train),
             "test": str(shared.test), "mosaics": str(shared.mosaics),
             "base_damaged": str(shared.base_damaged)}
    words = [w.format(**names) for w in words]
    before = _tree(tmp_path)
    shared_before = {str(f): _tree(f) for f in shared.folders()}
    capsys.readouterr()

    code = run_cli(argv)
    seen = capsys.readouterr()

    context = f"{' '.join(argv)}\n--- stderr:\n{seen.err[-3000:]}\n--- stdout:\n{seen.out[-1500:]}"
    assert not (isinstance(code, str) and code.startswith("Traceback")), f"{code}\n{context}"
    assert "Traceback" not in seen.err + seen.out, context
    assert code == case.code, f"exit code {code!r}, expected {case.code}\n{context}"
    error_lines = [line for line in seen.err.splitlines() if "error:" in line]
    if case.report:
        assert error_lines == [], context
        message = seen.out
        assert "result: NOT USABLE" in message, context
    else:
        assert len(error_lines) == 1, context
        message = error_lines[0]
        assert message.startswith("visiontune"), context
    for word in words:
        assert word in message, f"{word!r} not in the message: {message}"

    after = _tree(tmp_path)
    added = sorted(set(after) - set(before))
    assert added == [], f"written: {added}\n{context}"
    assert sorted(set(before) - set(after)) == [], f"deleted\n{context}"
    assert [p for p in before if before[p] != after[p]] == [], f"changed\n{context}"
    for folder, tree in shared_before.items():
        assert _tree(Path(folder)) == tree, f"shared input {folder} changed\n{context}"


@pytest.mark.parametrize("why", ["data-not-found", "mlflow-output-refused"])
def test_a_refused_finetune_leaves_no_output_folder_behind(why, shared, tmp_path, capsys):
    out = tmp_path / "out"
    extra = (["--training_data", str(tmp_path / "missing.jsonl")] if why == "data-not-found" else
             ["--output_dir_mlflow", str(shared.base)])
    argv = ["finetune", "--model_path", str(shared.base), "--training_data", str(shared.train),
            "--task_name", MULTICLASS, "--output_dir_pytorch", str(out), "--max_steps", "1", *extra]
    assert run_cli(argv) == 2
    assert len([l for l in capsys.readouterr().err.splitlines() if "error:" in l]) == 1
    assert not out.exists(), sorted(os.listdir(out))


# =============================================================================================
# 2. SIGKILL at random moments of a fine-tune, each followed by a resume
# =============================================================================================
KILL_SEED = 20261203
TOTAL_STEPS = 10  # 20 images in batches of 4, 2 epochs
SAVE_EVERY = 2
RUN_TIMEOUT_S = 240  # one process, start to end; a hang fails the test instead of the suite
COMPLETE_MARKER = "visiontune_complete.json"


@pytest.fixture(scope="module")
def killable(demo_dir, tiny_vit, tmp_path_factory):
    """(model, training data, validation data): the tiny ViT with dropout (so a resume must also
    restore the random state) and 2 + 1 digit images per class."""
    root = tmp_path_factory.mktemp("killed")
    model = root / "model"
    shutil.copytree(tiny_vit, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (model / "config.json").write_text(json.dumps(config))
    return (model, subset(demo_dir / "digits" / "train", root / "train.jsonl", 2, per_class=True),
            subset(demo_dir / "digits" / "validation", root / "val.jsonl", 1, per_class=True))


def _finetune_argv(killable, out: Path, resume: bool) -> list[str]:
    model, train, val = killable
    return ["finetune", "--model_path", str(model), "--training_data", str(train),
            "--validation_data", str(val), "--task_name", MULTICLASS, "--output_dir_pytorch", str(out),
            "--image_height", "32", "--image_width", "32", "--training_batch_size", "4",
            "--validation_batch_size", "10", "--number_of_epochs", "2", "--learning_rate", "1e-3",
            "--apply_augmentations", "true", "--random_seed", "7", "--number_of_workers", "0",
            "--save_strategy", "steps", "--save_steps", str(SAVE_EVERY),
            "--evaluation_strategy", "steps", "--evaluation_steps", str(SAVE_EVERY),
            "--logging_strategy", "steps", "--logging_steps", "1", "--save_total_limit", "-1",
            "--save_as_mlflow_model", "false", "--resume_from_checkpoint", str(resume).lower()]


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VISIONTUNE_LOG_LEVEL="INFO")
    return env


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def _logged_steps(out: Path) -> list[int]:
    """Steps of the whole lines of metrics.jsonl (a line being written is skipped)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except OSError:
        return []
    steps = []
    for line in text.splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            pass
    return steps


def _incomplete_checkpoints(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name.startswith("checkpoint-") and not (p / COMPLETE_MARKER).exists())


@dataclass
class Moment:
    """When to kill: ``startup`` (``delay`` s after the run takes its output folder's lock),
    ``step`` (once step ``step`` is logged) or ``checkpoint`` (while checkpoint ``step``, or a
    later one, is being written: its folder exists without the completeness marker)."""

    kind: str
    step: int = 0
    delay: float = 0.0

    def due(self, out: Path, state: dict) -> bool:
        if self.kind == "startup":
            if (out / ".visiontune.lock").exists():
                state.setdefault("locked_at", time.monotonic())
            return "locked_at" in state and time.monotonic() >= state["locked_at"] + self.delay
        if self.kind == "step":
            return max(_logged_steps(out), default=0) >= self.step
        return any(int(name.split("-")[1]) >= self.step for name in _incomplete_checkpoints(out))

    def __str__(self):
        return {"startup": f"startup+{self.delay:.2f}s", "step": f"step {self.step}",
                "checkpoint": f"writing checkpoint-{self.step}"}[self.kind]


def draw_moments(seed: int = KILL_SEED) -> list[Moment]:
    """Five moments across the run, in the order of the training's progress: one while the run
    starts, three after logged steps, one while a checkpoint is being written. The steps and
    checkpoints come after the first complete checkpoint: a kill before it is the case of
    test_a_kill_before_the_first_checkpoint_then_resume_logs_each_step_once."""
    rng = random.Random(seed)
    moments = [Moment("startup", delay=rng.uniform(0.0, 0.2))]
    thirds = (range(3, 6), range(6, 8), range(8, TOTAL_STEPS + 1))  # one step kill in each
    moments += [Moment("step", step=rng.choice(third)) for third in thirds]
    moments.append(Moment("checkpoint", step=rng.choice(range(2 * SAVE_EVERY, TOTAL_STEPS + 1, SAVE_EVERY))))
    return sorted(moments, key=lambda m: (m.step, m.kind == "checkpoint"))


def run_finetune(argv: list[str], out: Path, log: Path, moment: Moment | None = None):
    """``python -m visiontune finetune ...``; with a moment, SIGKILLed when it is due. The
    process is frozen (SIGSTOP) while the moment is checked, so that what is seen is what the
    kill leaves. Returns (exit code, what was seen at the kill)."""
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "visiontune", *argv], stdout=sink,
                                stderr=subprocess.STDOUT, env=_child_env())
    state: dict = {}
    seen = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"{' '.join(argv[:1])} did not finish in {RUN_TIMEOUT_S} s:\n"
                            f"{log.read_text()[-3000:]}")
            if moment is not None:
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    frozen_by = time.monotonic() + 5
                    while _state(proc.pid) not in ("T", "t", "Z", "X") and time.monotonic() < frozen_by:
                        time.sleep(0.0002)
                    if moment.due(out, state):
                        seen = {"steps": _logged_steps(out), "incomplete": _incomplete_checkpoints(out)}
                        os.kill(proc.pid, signal.SIGKILL)
                        proc.wait(timeout=30)
                        break
                finally:
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.002 if moment is not None else 0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode, seen


def _history(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows if "loss" in r or "eval_loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(killable, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    code, _ = run_finetune(_finetune_argv(killable, out, resume=False), out, out.parent / "run.log")
    assert code == 0, (out.parent / "run.log").read_text()[-3000:]
    return out


def test_the_moments_are_spread_over_the_run():
    moments = draw_moments()
    assert [m.kind for m in moments].count("checkpoint") == 1 and moments[0].kind == "startup"
    assert len(moments) == 5 and len({str(m) for m in moments}) == 5
    assert [m.step for m in moments] == sorted(m.step for m in moments)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(killable, uninterrupted, tmp_path):
    from safetensors.torch import load_file
    import torch

    out = tmp_path / "out"
    kills = []
    resume = False
    for number, moment in enumerate(draw_moments()):
        log = tmp_path / f"run{number}.log"
        code, seen = run_finetune(_finetune_argv(killable, out, resume), out, log, moment)
        assert code == -signal.SIGKILL, f"run {number} was to be killed at {moment} but ended with " \
                                        f"{code}:\n{log.read_text()[-3000:]}"
        kills.append((str(moment), seen))
        if moment.kind == "checkpoint":
            assert seen["incomplete"], seen  # killed while a checkpoint was being written
            torn = seen["incomplete"]
        resume = True
    log = tmp_path / "final.log"
    code, _ = run_finetune(_finetune_argv(killable, out, resume=True), out, log)
    assert code == 0, log.read_text()[-3000:]

    # The checkpoint killed midway was never resumed from: removed, then written again whole.
    written = "\n".join((tmp_path / f"run{n}.log").read_text() for n in range(1, 5)) + log.read_text()
    assert all(f"removed incomplete checkpoint {out / name}" in written for name in torn), kills
    assert _incomplete_checkpoints(out) == []
    assert not [p.name for p in out.iterdir() if p.name.startswith((".visiontune", "tmp-"))]

    expected, got = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), (key, kills)

    history = _history(out)
    trained = [step for step, loss, _ in history if loss is not None]
    evaluated = [step for step, _, eval_loss in history if eval_loss is not None]
    assert trained == list(range(1, TOTAL_STEPS + 1)), (trained, kills)
    assert evaluated == list(range(SAVE_EVERY, TOTAL_STEPS + 1, SAVE_EVERY)), (evaluated, kills)
    assert history == _history(uninterrupted), kills


@pytest.mark.slow
def test_a_kill_before_the_first_checkpoint_then_resume_logs_each_step_once(killable, tmp_path):
    out = tmp_path / "out"
    code, seen = run_finetune(_finetune_argv(killable, out, resume=False), out, tmp_path / "run0.log",
                              Moment("step", step=1))
    assert code == -signal.SIGKILL and not (out / "checkpoint-2" / COMPLETE_MARKER).exists(), seen
    code, _ = run_finetune(_finetune_argv(killable, out, resume=True), out, tmp_path / "run1.log")
    assert code == 0, (tmp_path / "run1.log").read_text()[-3000:]
    trained = [step for step, loss, _ in _history(out) if loss is not None]
    assert trained == list(range(1, TOTAL_STEPS + 1)), trained


# =============================================================================================
# 3. Malformed scoring requests against a real `mlflow models serve`
# =============================================================================================
REQUEST_TIMEOUT_S = 60
MAX_IMAGES = 256  # the MLflow model's default max_images_per_request (serving/mlflow_model.py)
MAX_IMAGE_BYTES = 20 * 1024 * 1024


def _encoded(image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height and that holds no pixel data."""
    from PIL import Image

    data = bytearray(_encoded(Image.new("1", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _images():
    """(good PNG, good JPEG, a 9000 x 9000 bilevel PNG of a few KB)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    return _encoded(picture), _encoded(picture, "JPEG"), _encoded(Image.new("1", (9000, 9000)))


GOOD_PNG, GOOD_JPEG, PNG_81MP = _images()
GOOD = _b64(GOOD_PNG)


def _split(values, columns=("image",)) -> bytes:
    return json.dumps({"dataframe_split": {"columns": list(columns), "data": [[v] for v in values]}}).encode()


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _corrupt_idat(data: bytes) -> bytes:
    start = data.index(b"IDAT") + 4
    body = bytearray(data)
    for i in range(start + 2, min(start + 40, len(body) - 12)):
        body[i] ^= 0x5A
    return bytes(body)


JSON, CSV = "application/json", "text/csv"

# (id, body, content type or None for no header, method, path)
BAD_REQUESTS: list[tuple[str, bytes, str | None, str, str]] = [
    # content types
    ("ct-text-plain", _split([GOOD]), "text/plain", "POST", "/invocations"),
    ("ct-xml", b"<image>" + GOOD.encode() + b"</image>", "application/xml", "POST", "/invocations"),
    ("ct-image-png", GOOD_PNG, "image/png", "POST", "/invocations"),
    ("ct-octet-stream", GOOD_PNG, "application/octet-stream", "POST", "/invocations"),
    ("ct-form-urlencoded", b"image=" + GOOD.encode(), "application/x-www-form-urlencoded", "POST", "/invocations"),
    ("ct-multipart", b"--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n" + GOOD.encode()
     + b"\r\n--x--\r\n", "multipart/form-data; boundary=x", "POST", "/invocations"),
    ("ct-missing", _split([GOOD]), None, "POST", "/invocations"),
    ("ct-empty", _split([GOOD]), "", "POST", "/invocations"),
    ("ct-json-latin1-charset", _split([GOOD]), "application/json; charset=latin-1", "POST", "/invocations"),
    ("ct-json-unknown-parameter", _split([GOOD]), "application/json; format=pandas-split", "POST", "/invocations"),
    ("ct-parquet-not-parquet", b"this is not parquet", "application/vnd.apache.parquet", "POST", "/invocations"),
    ("ct-csv-holding-json", _split([GOOD]), CSV, "POST", "/invocations"),
    # bodies that are not JSON
    ("json-empty-body", b"", JSON, "POST", "/invocations"),
    ("json-whitespace", b"  \n ", JSON, "POST", "/invocations"),
    ("json-open-brace", b"{", JSON, "POST", "/invocations"),
    ("json-close-brace", b"}", JSON, "POST", "/invocations"),
    ("json-nul", b"nul", JSON, "POST", "/invocations"),
    ("json-single-quotes", b"{'inputs': ['x']}", JSON, "POST", "/invocations"),
    ("json-trailing-comma", b'{"inputs": ["x",]}', JSON, "POST", "/invocations"),
    ("json-trailing-garbage", _split([GOOD]) + b" garbage", JSON, "POST", "/invocations"),
    ("json-unterminated-string", b'{"inputs": ["abc', JSON, "POST", "/invocations"),
    ("json-control-character", b'{"inputs": ["a\x01b"]}', JSON, "POST", "/invocations"),
    ("json-not-utf8", b'{"inputs": ["\xff\xfe"]}', JSON, "POST", "/invocations"),
    ("json-nan-cell", b'{"inputs": [NaN]}', JSON, "POST", "/invocations"),
    ("json-nested-too-deeply", b"[" * 100_000 + b"]" * 100_000, JSON, "POST", "/invocations"),
    ("json-integer-too-long", b'{"inputs": [' + b"7" * 5000 + b"]}", JSON, "POST", "/invocations"),
    # wrong top-level shapes and keys
    ("top-list", _json([GOOD]), JSON, "POST", "/invocations"),
    ("top-string", _json(GOOD), JSON, "POST", "/invocations"),
    ("top-number", b"42", JSON, "POST", "/invocations"),
    ("top-null", b"null", JSON, "POST", "/invocations"),
    ("top-true", b"true", JSON, "POST", "/invocations"),
    ("top-empty-object", b"{}", JSON, "POST", "/invocations"),
    ("top-unknown-key", _json({"data": [[GOOD]]}), JSON, "POST", "/invocations"),
    ("top-two-input-keys", _json({"inputs": [GOOD], "instances": [GOOD]}), JSON, "POST", "/invocations"),
    ("top-azure-input_data", _json({"input_data": {"columns": ["image"], "data": [[GOOD]]}}), JSON, "POST",
     "/invocations"),
    ("split-not-a-mapping", _json({"dataframe_split": "image"}), JSON, "POST", "/invocations"),
    ("split-without-data", _json({"dataframe_split": {"columns": ["image"]}}), JSON, "POST", "/invocations"),
    ("split-data-a-string", _json({"dataframe_split": {"columns": ["image"], "data": "x"}}), JSON, "POST",
     "/invocations"),
    ("split-no-rows", _split([]), JSON, "POST", "/invocations"),
    ("records-an-object", _json({"dataframe_records": {"image": GOOD}}), JSON, "POST", "/invocations"),
    ("inputs-empty-list", _json({"inputs": []}), JSON, "POST", "/invocations"),
    ("instances-a-string", _json({"instances": GOOD}), JSON, "POST", "/invocations"),
    ("inputs-dict-without-image", _json({"inputs": {"picture": [GOOD]}}), JSON, "POST", "/invocations"),
    # wrong column names
    ("column-img", _split([GOOD], ["img"]), JSON, "POST", "/invocations"),
    ("column-Image", _split([GOOD], ["Image"]), JSON, "POST", "/invocations"),
    ("column-image_url", _split([GOOD], ["image_url"]), JSON, "POST", "/invocations"),
    ("column-empty-name", _split([GOOD], [""]), JSON, "POST", "/invocations"),
    ("columns-fewer-than-values", _json({"dataframe_split": {"columns": [], "data": [[GOOD]]}}), JSON, "POST",
     "/invocations"),
    ("columns-two-others", _json({"dataframe_split": {"columns": ["a", "b"], "data": [[GOOD, GOOD]]}}), JSON,
     "POST", "/invocations"),
    ("records-key-picture", _json({"dataframe_records": [{"picture": GOOD}]}), JSON, "POST", "/invocations"),
    ("instances-key-images", _json({"instances": [{"images": GOOD}]}), JSON, "POST", "/invocations"),
    ("csv-header-img", b"img\n" + GOOD.encode() + b"\n", CSV, "POST", "/invocations"),
    ("csv-no-header", GOOD.encode() + b"\n" + GOOD.encode() + b"\n", CSV, "POST", "/invocations"),
    # cells that are not an image
    ("cell-not-base64", _split(["%%% not base64 %%%"]), JSON, "POST", "/invocations"),
    ("cell-words", _split(["hello world"]), JSON, "POST", "/invocations"),
    ("cell-base64-of-text", _split([_b64(b"just some text, no picture")]), JSON, "POST", "/invocations"),
    ("cell-base64-of-random-bytes", _split([_b64(random.Random(1).randbytes(1024))]), JSON, "POST",
     "/invocations"),
    ("cell-truncated-png", _split([_b64(GOOD_PNG[: len(GOOD_PNG) // 2])]), JSON, "POST", "/invocations"),
    ("cell-truncated-jpeg", _split([_b64(GOOD_JPEG[: len(GOOD_JPEG) // 2])]), JSON, "POST", "/invocations"),
    ("cell-png-signature-only", _split([_b64(GOOD_PNG[:8])]), JSON, "POST", "/invocations"),
    ("cell-png-header-without-pixels", _split([_b64(_png_header(32, 32))]), JSON, "POST", "/invocations"),
    ("cell-png-corrupt-pixel-data", _split([_b64(_corrupt_idat(GOOD_PNG))]), JSON, "POST", "/invocations"),
    ("cell-png-zero-size", _split([_b64(_png_header(0, 0))]), JSON, "POST", "/invocations"),
    ("cell-jpeg-start-only", _split([_b64(b"\xff\xd8\xff")]), JSON, "POST", "/invocations"),
    ("cell-gif-header-only", _split([_b64(b"GIF89a" + b"\x00" * 20)]), JSON, "POST", "/invocations"),
    ("cell-bmp-garbage", _split([_b64(b"BM" + b"\x00" * 60)]), JSON, "POST", "/invocations"),
    ("cell-tiff-header-only", _split([_b64(b"II*\x00")]), JSON, "POST", "/invocations"),
    ("cell-webp-riff-only", _split([_b64(b"RIFF\x10\x00\x00\x00WEBPVP8 ")]), JSON, "POST", "/invocations"),
    ("cell-svg", _split([_b64(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>')]), JSON,
     "POST", "/invocations"),
    ("cell-empty-string", _split([""]), JSON, "POST", "/invocations"),
    ("cell-whitespace", _split(["   "]), JSON, "POST", "/invocations"),
    ("cell-null", _split([None]), JSON, "POST", "/invocations"),
    ("cell-integer", _split([5]), JSON, "POST", "/invocations"),
    ("cell-float", _split([3.14]), JSON, "POST", "/invocations"),
    ("cell-boolean", _split([True]), JSON, "POST", "/invocations"),
    ("cell-nested-list", _split([[GOOD]]), JSON, "POST", "/invocations"),
    ("cell-object", _split([{"b64": GOOD}]), JSON, "POST", "/invocations"),
    ("cell-bad-padding", _split(["abc"]), JSON, "POST", "/invocations"),
    ("cell-only-padding", _split(["===="]), JSON, "POST", "/invocations"),
    ("cell-data-url-not-base64", _split(["data:text/plain,hello"]), JSON, "POST", "/invocations"),
    ("cell-data-url-of-text", _split(["data:image/png;base64," + _b64(b"hello")]), JSON, "POST",
     "/invocations"),
    # refused unfetched (allow_urls is off); .invalid never resolves, should it ever be fetched
    ("cell-http-url", _split(["http://images.invalid/cat.png"]), JSON, "POST", "/invocations"),
    ("cell-local-path", _split(["/etc/hostname"]), JSON, "POST", "/invocations"),
    ("cell-file-uri", _split(["file:///etc/hostname"]), JSON, "POST", "/invocations"),
    ("cell-81-megapixels-in-a-tiny-png", _split([_b64(PNG_81MP)]), JSON, "POST", "/invocations"),
    ("cell-header-says-10-gigapixels", _split([_b64(_png_header(100_000, 100_000))]), JSON, "POST",
     "/invocations"),
    ("cell-over-20-mb", _split([_b64(b"\xff" * (MAX_IMAGE_BYTES + 1))]), JSON, "POST", "/invocations"),
    # too much in one request
    ("too-many-images", _split([GOOD] * (MAX_IMAGES + 1)), JSON, "POST", "/invocations"),
    ("too-many-pixels-together", _split([_b64(_png_header(8000, 7000))] * 5), JSON, "POST", "/invocations"),
    # good and bad rows mixed
    ("mixed-good-then-not-base64", _split([GOOD, "%%%"]), JSON, "POST", "/invocations"),
    ("mixed-good-then-null", _split([GOOD, None]), JSON, "POST", "/invocations"),
    ("mixed-empty-then-good", _split(["", GOOD]), JSON, "POST", "/invocations"),
    ("mixed-two-good-then-truncated", _split([GOOD, GOOD, _b64(GOOD_PNG[:40])]), JSON, "POST", "/invocations"),
    ("mixed-good-then-url", _split([GOOD, "https://example.com/a.png"]), JSON, "POST", "/invocations"),
    ("mixed-good-then-ten-texts", _split([GOOD] + [_b64(b"text %d" % i) for i in range(10)]), JSON, "POST",
     "/invocations"),
    ("mixed-records-missing-key", _json({"dataframe_records": [{"image": GOOD}, {"picture": GOOD}]}), JSON,
     "POST", "/invocations"),
    ("mixed-instances-good-and-number", _json({"instances": [GOOD, 5]}), JSON, "POST", "/invocations"),
    ("mixed-csv-good-and-bad-row", b"image\n" + GOOD.encode() + b"\n%%%\n", CSV, "POST", "/invocations"),
    # not a scoring call
    ("get-invocations", b"", None, "GET", "/invocations"),
    ("post-wrong-path", _split([GOOD]), JSON, "POST", "/invocation"),
]

# Requests that MLflow's scoring server answers wrongly before the model sees them.
SERVER_ERRORS: dict[str, str] = {}  # requests MLflow's server answers wrongly (none now)


def _send(port: int, body: bytes, content_type: str | None, method: str = "POST",
          path: str = "/invocations") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        headers = {} if content_type is None else {"Content-Type": content_type}
        conn.request(method, path, body=body if method != "GET" else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _probabilities(status: int, body: bytes) -> list[list[float]]:
    assert status == 200, (status, body[:2000])
    return [row["probs"] for row in json.loads(body)["predictions"]]


@pytest.fixture(scope="module")
def scoring_server(demo_dir, tiny_vit, tmp_path_factory):
    """A tiny ViT fine-tuned for two steps by ``visiontune finetune``, its MLflow model served
    by ``mlflow models serve`` on 127.0.0.1, and the probabilities of its first good answer."""
    from tests.serving.test_serving import READY_TIMEOUT_S, Server

    root = tmp_path_factory.mktemp("served")
    train = subset(demo_dir / "digits" / "train", root / "train.jsonl", 2, per_class=True)
    code = main(["finetune", "--model_path", str(tiny_vit), "--training_data", str(train),
                 "--task_name", MULTICLASS, "--output_dir_pytorch", str(root / "pytorch"),
                 "--output_dir_mlflow", str(root / "mlflow"), "--image_height", "32",
                 "--image_width", "32", "--max_steps", "2", "--apply_augmentations", "false"])
    assert code == 0
    server = Server(root / "mlflow", root / "server.log")
    try:
        server.wait_ready(time.monotonic() + max(READY_TIMEOUT_S, 180))
        first = _probabilities(*_send(server.port, _split([GOOD]), JSON))
        yield server, first
    finally:
        server.stop()


def test_the_malformed_requests_are_100_and_distinct():
    assert len(BAD_REQUESTS) == 100 and len({r[0] for r in BAD_REQUESTS}) == 100


def _request_params():
    for number, (name, *_) in enumerate(BAD_REQUESTS):
        marks = [pytest.mark.xfail(strict=True, reason=SERVER_ERRORS[name])] if name in SERVER_ERRORS else []
        yield pytest.param(number, id=name, marks=marks)


@pytest.mark.parametrize("number", _request_params())
def test_a_malformed_request_gets_a_4xx_and_the_server_goes_on(number, scoring_server):
    import numpy as np

    name, body, content_type, method, path = BAD_REQUESTS[number]
    server, first = scoring_server
    status, answer = _send(server.port, body, content_type, method, path)
    assert 400 <= status < 500, (name, status, answer[:1000])
    assert b"Traceback" not in answer, (name, answer[:2000])
    if number % 10 == 9:  # after every 10 bad requests, a good one is answered as the first was
        np.testing.assert_allclose(_probabilities(*_send(server.port, _split([GOOD]), JSON)), first,
                                   rtol=0, atol=1e-6)
