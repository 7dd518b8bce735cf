"""visiontune against the Hugging Face example recipe and against the compute ceiling, on the
same machine, data and model, in one run. See BENCHMARKS.md for what is measured and why.

    python -m benchmarks.run            # the default run (about 40 minutes on 2 CPU cores)
    python -m benchmarks.run --quick    # a smoke run: a few images, one step each
    python -m benchmarks.run --variants vt16,hf16 --repeats 5

Every measured command runs in a fresh process, as users run it: ``visiontune`` through its
CLI (``python -m visiontune``; ``python -m benchmarks.levers`` for the lever variants, which
turn one of its speed-ups off), the recipe through ``python -m benchmarks.hf_recipe``, the
ceiling through ``python -m benchmarks.ceiling``. Before each run the script waits for a quiet machine; a run during
which other processes took more than ``--max_foreign`` of the machine is repeated. Repeats
are interleaved (a, b, a, b...) and the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import make_data
from .measure import Measured, run_measured, wait_for_quiet

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the repository root, where the ``benchmarks`` package lives
PY = sys.executable


def module(name: str) -> list[str]:
    """The command that runs ``benchmarks/<name>.py`` as a module (``child_env`` puts the
    repository root on the child's path, whatever its working directory)."""
    return [PY, "-m", f"benchmarks.{name}"]


@dataclass
class Settings:
    image_size: int = 128
    batch_size: int = 32
    train_images: int = 1000
    val_images: int = 200
    epochs: int = 1
    logging_steps: int = 4
    vit_image_size: int = 224
    vit_hidden: int = 384  # ViT-Small: 384 wide, 12 layers, 6 heads, patch 16
    vit_layers: int = 12
    vit_heads: int = 6
    vit_batch_size: int = 16
    vit_steps: int = 6
    vit_val_images: int = 48
    predict_images: int = 1000
    ceiling_steps: int = 12
    repeats: int = 3
    vit_repeats: int = 1
    dataset_train: int = 1200  # photos generated (runs use subsets of them)
    dataset_val: int = 240
    max_foreign: float = 0.10
    quiet_wait_s: float = 900.0


QUICK = Settings(image_size=64, batch_size=8, train_images=16, val_images=8, epochs=1,
                 logging_steps=1, vit_image_size=64, vit_hidden=48, vit_layers=2, vit_heads=3,
                 vit_batch_size=2, vit_steps=1,
                 vit_val_images=8, predict_images=8, ceiling_steps=1, repeats=1, vit_repeats=1,
                 dataset_train=16, dataset_val=8,
                 max_foreign=1.0, quiet_wait_s=0.0)


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    side: str  # vt | hf | ceiling | predict
    model: str  # effnet | vit
    precision: int = 32
    workers: int | None = None  # None: the side's default
    levers: str = ""  # benchmarks.levers levers (vt), or ceiling flags
    env: dict[str, str] = field(default_factory=dict)
    warm_cache: bool = False
    describe: str = ""


CEILING_FILE = "ceiling_in_process.jsonl"  # written by levers.py ceiling_in_process
# The ceiling with the compute settings visiontune uses (the depthwise backward is bf16 only);
# torch.compile cannot trace the two training-pass modes, so it gets the settings without them.
CEIL_TRACEABLE = "--channels_last --fused_adamw --malloc_tuning"
CEIL_PLUS = f"{CEIL_TRACEABLE} --inplace_hardtanh"


def _variants() -> dict[str, Variant]:
    v: list[Variant] = [
        # a: visiontune finetune as users run it (its defaults: channels-last CNNs, fused AdamW,
        # the decoded-image cache, draft JPEG decoding, 0 data-loader workers on a CPU-only run).
        Variant("vt32", "vt", "effnet", 32, describe="visiontune finetune, precision 32"),
        Variant("vt16", "vt", "effnet", 16, describe="visiontune finetune, precision 16 (bf16 where "
                "the CPU has it natively, else float32)"),
        # b: the Hugging Face recipe, its defaults and its documented switches.
        Variant("hf32", "hf", "effnet", 32, describe="HF recipe defaults: fp32, 0 workers"),
        Variant("hf16", "hf", "effnet", 16, workers=2, describe="HF recipe --bf16 --dataloader_num_workers 2"),
        Variant("hf16w0", "hf", "effnet", 16, workers=0, describe="HF recipe --bf16, 0 workers"),
        Variant("hf32w2", "hf", "effnet", 32, workers=2, describe="HF recipe fp32 --dataloader_num_workers 2"),
        # c: the ceiling, plain and with the compute settings visiontune uses.
        Variant("ceil32", "ceiling", "effnet", 32, describe="synthetic step, fp32, NCHW, AdamW loop"),
        Variant("ceil16", "ceiling", "effnet", 16, describe="synthetic step, bf16, NCHW, AdamW loop"),
        Variant("ceil32+", "ceiling", "effnet", 32, levers=CEIL_PLUS,
                describe="synthetic step, fp32, channels-last, fused AdamW, malloc thresholds, "
                         "ReLU6 saving its output"),
        Variant("ceil16+", "ceiling", "effnet", 16, levers=f"{CEIL_PLUS} --fast_depthwise",
                describe="synthetic step, bf16, channels-last, fused AdamW, malloc thresholds, "
                         "ReLU6 saving its output, fast depthwise backward"),
        Variant("ceil16+native-dw", "ceiling", "effnet", 16, levers=CEIL_PLUS,
                describe="ceil16+ with PyTorch's depthwise backward"),
        Variant("ceil16+glibc", "ceiling", "effnet", 16,
                levers="--channels_last --fused_adamw --inplace_hardtanh --fast_depthwise",
                describe="ceil16+ with glibc's own malloc thresholds"),
        Variant("ceil16+compile", "ceiling", "effnet", 16, levers=f"{CEIL_TRACEABLE} --compile",
                describe="ceil16+native-dw, PyTorch's ReLU6, under torch.compile (compile time "
                         "reported apart)"),
        # Levers: each of visiontune's speed-ups turned off, or a loader setting changed.
        Variant("vt16-bf16", "vt", "effnet", 16, env={"VISIONTUNE_CPU_BF16": "1"},
                describe="vt16 in bf16 on any CPU (a CPU without native bf16 runs vt16 in float32)"),
        Variant("vt16-nchw", "vt", "effnet", 16, levers="nchw", describe="vt16, CNN left in NCHW"),
        Variant("vt16-native-dw", "vt", "effnet", 16, env={"VISIONTUNE_FAST_DEPTHWISE": "0"},
                describe="vt16 with PyTorch's depthwise-convolution backward"),
        Variant("vt16-relu6-copy", "vt", "effnet", 16, env={"VISIONTUNE_INPLACE_HARDTANH": "0"},
                describe="vt16 with PyTorch's in-place ReLU6 (keeps a copy of its input)"),
        Variant("vt32-relu6-copy", "vt", "effnet", 32, env={"VISIONTUNE_INPLACE_HARDTANH": "0"},
                describe="vt32 with PyTorch's in-place ReLU6 (keeps a copy of its input)"),
        Variant("vt16-glibc", "vt", "effnet", 16, env={"VISIONTUNE_MALLOC_TUNING": "0"},
                describe="vt16 with glibc's own malloc thresholds"),
        Variant("vt16-arenas", "vt", "effnet", 16, levers="glibc_arenas",
                describe="vt16 with glibc's own number of malloc arenas (thresholds still tuned)"),
        Variant("vt16-triton", "vt", "effnet", 16, env={"VISIONTUNE_SKIP_TRITON": "0"},
                describe="vt16 with triton loaded, as torch._dynamo's imports load it"),
        Variant("vt16-v2", "vt", "effnet", 16, levers="v2_transforms",
                describe="vt16 with the transforms run by torchvision's v2.Compose"),
        # a and c in one process: the ceiling's step timed right before and after training.
        Variant("vt16+c", "vt", "effnet", 16, levers="ceiling_in_process",
                describe="vt16, with the ceiling's step timed in the same process before and after "
                         "training (its peak memory includes the ceiling's)"),
        Variant("vt32+c", "vt", "effnet", 32, levers="ceiling_in_process",
                describe="vt32, with the ceiling's step timed in the same process"),
        Variant("vt16-foreach", "vt", "effnet", 16, levers="foreach_adamw",
                describe="vt16, AdamW as a loop over tensors (not fused)"),
        Variant("vt16-w1", "vt", "effnet", 16, workers=1, describe="vt16 with --number_of_workers 1"),
        Variant("vt16-w2", "vt", "effnet", 16, workers=2, describe="vt16 with --number_of_workers 2"),
        Variant("vt16-w2-nopersist", "vt", "effnet", 16, workers=2, levers="nopersist",
                describe="vt16-w2, workers not persistent"),
        Variant("vt16-w2-prefetch4", "vt", "effnet", 16, workers=2, levers="prefetch4",
                describe="vt16-w2, prefetch_factor 4"),
        Variant("vt16-nocache", "vt", "effnet", 16, env={"VISIONTUNE_IMAGE_CACHE": "0"},
                describe="vt16 without the decoded-image cache (draft decoding on)"),
        Variant("vt16-plain", "vt", "effnet", 16,
                env={"VISIONTUNE_IMAGE_CACHE": "0", "VISIONTUNE_JPEG_DRAFT": "0"},
                describe="vt16 without the cache and without draft decoding"),
        Variant("vt16-warm", "vt", "effnet", 16, warm_cache=True,
                describe="vt16 with the cache filled by an earlier run"),
        Variant("vt32-before", "vt", "effnet", 32, workers=8, levers="nchw,foreach_adamw,v2_transforms",
                env={"VISIONTUNE_IMAGE_CACHE": "0", "VISIONTUNE_JPEG_DRAFT": "0",
                     "VISIONTUNE_MALLOC_TUNING": "0", "VISIONTUNE_SKIP_TRITON": "0",
                     "VISIONTUNE_INPLACE_HARDTANH": "0"},
                describe="vt32 with every speed-up off and 8 workers (the earlier defaults)"),
        # ViT-Small (384 wide, 12 layers, 6 heads, patch 16), built from a config.
        Variant("vit-vt32", "vt", "vit", 32, describe="ViT-S: visiontune, precision 32"),
        Variant("vit-vt16", "vt", "vit", 16, describe="ViT-S: visiontune, precision 16"),
        Variant("vit-hf32", "hf", "vit", 32, describe="ViT-S: HF recipe defaults"),
        Variant("vit-hf16", "hf", "vit", 16, workers=2, describe="ViT-S: HF recipe --bf16, 2 workers"),
        Variant("vit-hf16w0", "hf", "vit", 16, workers=0, describe="ViT-S: HF recipe --bf16, 0 workers"),
        Variant("vit-ceil32", "ceiling", "vit", 32, describe="ViT-S: synthetic step, fp32"),
        Variant("vit-ceil16", "ceiling", "vit", 16, describe="ViT-S: synthetic step, bf16"),
        Variant("vit-ceil32+", "ceiling", "vit", 32, levers="--fused_adamw --malloc_tuning",
                describe="ViT-S: synthetic step, fp32, fused AdamW, malloc thresholds"),
        Variant("vit-ceil16+", "ceiling", "vit", 16, levers="--fused_adamw --malloc_tuning",
                describe="ViT-S: synthetic step, bf16, fused AdamW, malloc thresholds"),
        # Prediction.
        Variant("predict-vt", "predict", "effnet",
                describe="visiontune predict (CLI), model trained with --apply_ort true: ONNX Runtime"),
        Variant("predict-vt-pytorch", "predict", "effnet",
                describe="visiontune predict --runtime pytorch"),
        Variant("predict-pipeline", "predict", "effnet",
                describe="transformers pipeline('image-classification'), its defaults (batch 1)"),
        Variant("predict-pipeline-b32", "predict", "effnet",
                describe="transformers pipeline('image-classification', batch_size=32)"),
    ]
    return {x.name: x for x in v}


VARIANTS = _variants()
# Runs of a that also time the ceiling in their own process (levers.py ceiling_in_process).
IN_PROCESS_CEILING = [name for name, v in VARIANTS.items() if "ceiling_in_process" in v.levers.split(",")]
DEFAULT_SET = ["vt32", "hf32", "vt16", "hf16", "hf16w0", "hf32w2", "ceil32", "ceil16", "ceil32+",
               "ceil16+", "ceil16+native-dw", "vt32+c", "vt16+c", "vit-vt32", "vit-hf32", "vit-vt16", "vit-hf16w0", "vit-ceil32+",
               "vit-ceil16+", "predict-vt", "predict-vt-pytorch", "predict-pipeline",
               "predict-pipeline-b32"]
# The smoke run: every code path (levers launcher, bf16 flags, ceiling flags, ViT, predict).
QUICK_SET = ["vt32", "hf32", "vt16", "vt16-nchw", "vt16+c", "hf16", "ceil32", "ceil16+", "vit-vt32", "vit-hf32",
             "vit-ceil32", "predict-vt", "predict-pipeline"]
LEVER_SET = ["vt16", "vt16-native-dw", "vt16-relu6-copy", "vt16-glibc", "vt16-arenas", "vt16-triton", "vt16-v2", "vt16-nchw", "vt16-foreach", "vt16-w1", "vt16-w2", "vt16-w2-nopersist",
             "vt16-w2-prefetch4", "vt16-nocache", "vt16-plain", "vt16-warm", "vt32", "vt32-relu6-copy", "vt32-before",
             "ceil16+", "ceil16+native-dw", "ceil16+glibc", "ceil16+compile"]


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------
def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_MLFLOW_INTEGRATION": "TRUE"})
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def make_subset(root: Path, name: str, train: int, validation: int) -> Path:
    """A folder with the first ``train``/``validation`` images of each split (balanced: the
    generator cycles through the classes), hard-linked, as MLTable + imagefolder tree."""
    target = root.parent / f"{root.name}-subsets" / name
    marker = target / ".complete"
    if marker.is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    for split, count in (("train", train), ("validation", validation)):
        rows = [json.loads(l) for l in (root / split / "images.jsonl").read_text().splitlines() if l.strip()]
        rows = rows[:count]
        for row in rows:
            source = root / split / row["image_url"]
            dest = target / split / row["image_url"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)
        (target / split / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (target / split / "MLTable").write_text(make_data.MLTABLE)
    marker.write_text("ok")
    return target


def prepare_models(work: Path, settings: Settings, log) -> dict[str, Path]:
    models = work / "models"
    effnet = models / "effnet"
    if not (effnet / "config.json").is_file():
        log("importing the built-in efficientnet-lite0")
        result = run_measured([PY, "-m", "visiontune", "import-model", "--model_name",
                               "efficientnet-lite0", "--output_dir", str(effnet)],
                              work / "logs" / "import-effnet.log", env=child_env())
        if result.returncode:
            raise SystemExit(f"import-model failed; see {result.log_path}")
    size = settings.image_size
    processor = models / f"effnet-processor-{size}"
    vit = models / (f"vit-{settings.vit_hidden}x{settings.vit_layers}x{settings.vit_heads}"
                    f"-{settings.vit_image_size}")
    if not (processor / "preprocessor_config.json").is_file() or not (vit / "config.json").is_file():
        script = f"""
import sys
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
from PIL import Image
# The recipe reads size and mean/std from an image processor; the timm-wrapper processor of the
# built-in model has neither, so the HF side gets this one (its values: 0.5 mean and std).
ViTImageProcessor(size={{"height": {size}, "width": {size}}}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                  resample=Image.Resampling.BICUBIC).save_pretrained(sys.argv[1])
config = ViTConfig(hidden_size={settings.vit_hidden}, num_hidden_layers={settings.vit_layers},
                   num_attention_heads={settings.vit_heads}, intermediate_size={4 * settings.vit_hidden},
                   patch_size=16, image_size={settings.vit_image_size}, num_labels=8)
import torch
torch.manual_seed(0)
ViTForImageClassification(config).save_pretrained(sys.argv[2])
ViTImageProcessor(size={{"height": {settings.vit_image_size}, "width": {settings.vit_image_size}}},
                  image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(sys.argv[2])
"""
        result = run_measured([PY, "-c", script, str(processor), str(vit)],
                              work / "logs" / "make-models.log", env=child_env())
        if result.returncode:
            raise SystemExit(f"building the ViT / processor failed; see {result.log_path}")
    return {"effnet": effnet, "effnet_processor": processor, "vit": vit}


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    variant: Variant
    data: Path
    image_size: int
    batch_size: int
    epochs: int
    max_steps: int
    logging_steps: int


def vt_command(job: Job, models: dict[str, Path], out: Path, settings: Settings) -> list[str]:
    v = job.variant
    launcher = [*module("levers"), v.levers] if v.levers else [PY, "-m", "visiontune"]
    cmd = launcher + [
        "finetune", "--model_path", str(models[v.model]),
        "--training_data", str(job.data / "train"), "--validation_data", str(job.data / "validation"),
        "--task_name", "image-classification",
        "--image_height", str(job.image_size), "--image_width", str(job.image_size),
        "--training_batch_size", str(job.batch_size), "--validation_batch_size", str(job.batch_size),
        "--number_of_epochs", str(job.epochs), "--max_steps", str(job.max_steps),
        "--learning_rate", "1e-3", "--weight_decay", "1e-4", "--warmup_steps", "2",
        "--learning_rate_scheduler", "warmup_cosine", "--optimizer", "adamw",
        "--precision", str(v.precision), "--random_seed", "42",
        "--logging_strategy", "steps", "--logging_steps", str(job.logging_steps),
        "--save_as_mlflow_model", "false", "--output_dir_pytorch", str(out / "model"),
    ]
    if v.workers is not None:
        cmd += ["--number_of_workers", str(v.workers)]
    return cmd


def hf_command(job: Job, models: dict[str, Path], out: Path, settings: Settings) -> list[str]:
    v = job.variant
    model = models[v.model]
    processor = models["effnet_processor"] if v.model == "effnet" else model
    cmd = [*module("hf_recipe"),
           "--model_name_or_path", str(model), "--image_processor_name", str(processor),
           "--ignore_mismatched_sizes", "True",
           "--train_dir", str(job.data / "train" / "images"),
           "--validation_dir", str(job.data / "validation" / "images"),
           "--output_dir", str(out / "model"), "--cache_dir", str(out / "hf_cache"),
           "--remove_unused_columns", "False", "--do_train", "--do_eval",
           "--learning_rate", "1e-3", "--weight_decay", "1e-4", "--warmup_steps", "2",
           "--lr_scheduler_type", "cosine",
           "--num_train_epochs", str(job.epochs), "--max_steps", str(job.max_steps),
           "--per_device_train_batch_size", str(job.batch_size),
           "--per_device_eval_batch_size", str(job.batch_size),
           "--logging_strategy", "steps", "--logging_steps", str(job.logging_steps),
           "--eval_strategy", "epoch", "--save_strategy", "epoch",
           "--load_best_model_at_end", "True", "--save_total_limit", "3", "--seed", "42",
           "--report_to", "none", "--bench_timing_file", str(out / "step_times.json")]
    if v.precision == 16:
        # On a machine without a GPU the Trainer refuses --bf16 unless told to use the CPU.
        cmd += ["--bf16", "--use_cpu", "True"]
    if v.workers is not None:
        cmd += ["--dataloader_num_workers", str(v.workers)]
    return cmd


def ceiling_command(job: Job, models: dict[str, Path], settings: Settings) -> list[str]:
    v = job.variant
    cmd = [*module("ceiling"), "--model_path", str(models[v.model]),
           "--image_size", str(job.image_size), "--batch_size", str(job.batch_size),
           "--precision", str(v.precision), "--steps", str(settings.ceiling_steps)]
    return cmd + (v.levers.split() if v.levers else [])


# ---------------------------------------------------------------------------------------------
# Reading results
# ---------------------------------------------------------------------------------------------
def _steady_rate(records: list[dict], batch_size: int) -> float | None:
    """Images per second between consecutive training-step logs with no evaluation between
    them (so start-up, the first batches and evaluation are left out)."""
    steps = seconds = 0.0
    previous = None
    for record in records:
        keys = record.get("keys") or list(record)
        if any(k.startswith("eval_") for k in keys) or "train_runtime" in keys:
            previous = None
            continue
        if "loss" not in keys:
            continue
        if previous is not None and record["step"] > previous["step"]:
            steps += record["step"] - previous["step"]
            seconds += record["elapsed_s"] - previous["elapsed_s"]
        previous = record
    return steps * batch_size / seconds if seconds > 0 else None


def read_vt(out: Path, job: Job) -> dict[str, Any]:
    model = out / "model"
    records = [json.loads(l) for l in (model / "metrics.jsonl").read_text().splitlines() if l.strip()]
    final = next((r for r in reversed(records) if "train_runtime" in r), {})
    evals = json.loads((model / "eval_results.json").read_text())
    return {"train_runtime_s": final.get("train_runtime"),
            "train_images_per_s": final.get("train_samples_per_second"),
            "steady_images_per_s": _steady_rate(records, job.batch_size),
            "accuracy": evals.get("accuracy")}


def read_ceiling_in_process(out: Path, steady: float | None) -> dict[str, Any]:
    """The ceiling's rates timed before and after training in the run's own process
    (``levers.py ceiling_in_process``), and the run's steady rate over their mean."""
    path = out / CEILING_FILE
    if not path.is_file():
        return {}
    rates = {r["when"]: r["images_per_second"] for r in map(json.loads, path.read_text().splitlines())}
    ceiling = statistics.mean(rates.values())
    return {"ceiling_before_images_per_s": rates.get("before"),
            "ceiling_after_images_per_s": rates.get("after"),
            "ceiling_images_per_s": ceiling,
            "steady_over_ceiling": steady / ceiling if steady else None}


def read_hf(out: Path, job: Job) -> dict[str, Any]:
    model = out / "model"
    train = json.loads((model / "train_results.json").read_text())
    evals = json.loads((model / "eval_results.json").read_text())
    steps = json.loads((out / "step_times.json").read_text()) if (out / "step_times.json").is_file() else []
    return {"train_runtime_s": train.get("train_runtime"),
            "train_images_per_s": train.get("train_samples_per_second"),
            "steady_images_per_s": _steady_rate(steps, job.batch_size),
            "accuracy": evals.get("eval_accuracy")}


def _last_json(lines: list[tuple[float, str]]) -> dict[str, Any]:
    for _, line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def _progress_rate(lines: list[tuple[float, str]]) -> float | None:
    """Images per second between the first and the last 'predict: N/M images' line."""
    points = []
    for t, line in lines:
        if line.startswith("predict: ") and line.endswith(" images"):
            done = int(line.split()[1].split("/")[0])
            points.append((t, done))
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, settings: Settings, work: Path, data_root: Path, log: Callable[[str], None]):
        self.s, self.work, self.log = settings, work, log
        self.data_root = data_root
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.counter = 0

    def prepare(self) -> None:
        s = self.s
        need_train = max(s.train_images, s.predict_images, s.dataset_train)
        need_val = max(s.val_images, s.vit_val_images, s.dataset_val)
        self.log(f"data: {need_train} + {need_val} JPEG photos in {self.data_root}")
        root = make_data.write_dataset(self.data_root, train=need_train, validation=need_val)
        self.effnet_data = make_subset(root, f"t{s.train_images}-v{s.val_images}", s.train_images, s.val_images)
        vit_train = max(s.vit_steps * s.vit_batch_size, 8)
        self.vit_data = make_subset(root, f"t{vit_train}-v{s.vit_val_images}", vit_train, s.vit_val_images)
        rows = [json.loads(l) for l in (root / "train" / "images.jsonl").read_text().splitlines() if l.strip()]
        self.predict_list = self.work / "predict_images.txt"
        self.predict_list.write_text("".join(str(root / "train" / r["image_url"]) + "\n"
                                             for r in rows[:s.predict_images]))
        self.models = prepare_models(self.work, s, self.log)
        self.predict_model: Path | None = None

    def job(self, v: Variant) -> Job:
        s = self.s
        if v.model == "vit":
            # A log at every step: the few steps of a ViT run still give a steady rate.
            return Job(v, self.vit_data, s.vit_image_size, s.vit_batch_size, 1, s.vit_steps, 1)
        return Job(v, self.effnet_data, s.image_size, s.batch_size, s.epochs, -1, s.logging_steps)

    def measure(self, name: str) -> dict[str, Any]:
        v = VARIANTS[name]
        job = self.job(v)
        for attempt in range(3):
            self.counter += 1
            out = self.work / "runs" / f"{self.counter:03d}-{name}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            env = child_env({"VISIONTUNE_IMAGE_CACHE_DIR": str(out / "vt_cache"),
                             "HF_DATASETS_CACHE": str(out / "hf_cache"), **v.env})
            if name in IN_PROCESS_CEILING:
                env.update(BENCH_CEILING_FILE=str(out / CEILING_FILE),
                           BENCH_CEILING_STEPS=str(self.s.ceiling_steps))
            if v.side == "vt":
                cmd = vt_command(job, self.models, out, self.s)
                if v.warm_cache:  # an earlier run filled the cache; only the second is measured
                    warm = run_measured(cmd, out / "warmup.log", env=env)
                    if warm.returncode:
                        raise SystemExit(f"{name}: warm-up run failed; see {warm.log_path}")
                    shutil.rmtree(out / "model", ignore_errors=True)
            elif v.side == "hf":
                cmd = hf_command(job, self.models, out, self.s)
            elif v.side == "ceiling":
                cmd = ceiling_command(job, self.models, self.s)
            elif name.startswith("predict-vt"):
                cmd = [PY, "-m", "visiontune", "predict", "--model", str(self.prediction_model()),
                       "--data", str(self.predict_list), "--output", str(out / "predictions.jsonl"),
                       "--batch_size", "32",
                       "--runtime", "pytorch" if name.endswith("-pytorch") else "auto"]
            else:
                cmd = [*module("pipeline_predict"), "--model", str(self.prediction_model()),
                       "--images", str(self.predict_list), "--output", str(out / "predictions.jsonl")]
                if name.endswith("-b32"):
                    cmd += ["--batch_size", "32"]
            if self.s.quiet_wait_s > 0:
                wait_for_quiet(self.s.quiet_wait_s, self.log)
            m = run_measured(cmd, out / "run.log", env=env)
            if m.returncode:
                tail = "\n".join(line for _, line in m.lines[-15:])
                raise SystemExit(f"{name} failed (exit {m.returncode}); see {m.log_path}\n{tail}")
            row = self.read(v, job, out, m)
            if m.foreign_share <= self.s.max_foreign or attempt == 2:
                row["noisy"] = m.foreign_share > self.s.max_foreign
                self.results.setdefault(name, []).append(row)
                self.log(f"  {name}: " + ", ".join(f"{k}={_fmt(x)}" for k, x in row.items()
                                                  if k not in ("noisy",)))
                return row
            self.log(f"  {name}: other processes took {m.foreign_share:.0%} of the machine; again")
        raise AssertionError("unreachable")

    def read(self, v: Variant, job: Job, out: Path, m: Measured) -> dict[str, Any]:
        row: dict[str, Any] = {"wall_s": m.wall_s, "peak_tree_mb": m.peak_tree_mb,
                               "peak_rss_mb": m.peak_rss_mb, "foreign": m.foreign_share}
        if v.side in ("vt", "hf"):
            # Whole-command rate: start-up, data preparation (the cache fill), evaluation and
            # saving included, which the Trainer's own rate leaves out.
            trained = (job.max_steps * job.batch_size if job.max_steps > 0
                       else self.s.train_images * job.epochs)
            row["wall_images_per_s"] = trained / m.wall_s
        if v.side == "vt":
            row.update(read_vt(out, job))
            row.update(read_ceiling_in_process(out, row["steady_images_per_s"]))
            if v.model == "effnet" and self.predict_model is None and not v.levers:
                self.predict_model = out / "model"
        elif v.side == "hf":
            row.update(read_hf(out, job))
        elif v.side == "ceiling":
            row["steady_images_per_s"] = _last_json(m.lines)["images_per_second"]
        elif v.name.startswith("predict-vt"):
            row["score_images_per_s"] = _progress_rate(m.lines)
            row["images"] = self.s.predict_images
            row["predictions"] = str(out / "predictions.jsonl")
        else:
            info = _last_json(m.lines)
            row["score_images_per_s"] = info["images_per_second"]
            row["images"] = info["images"]
            row["predictions"] = str(out / "predictions.jsonl")
        if v.side == "predict":
            row["end_to_end_images_per_s"] = row["images"] / m.wall_s
        return row

    def prediction_model(self) -> Path:
        """The model of the first vt32 run, with the ONNX export that ``--apply_ort true``
        writes (made here once, not timed)."""
        if self.predict_model is None:
            self.measure("vt32")
        onnx_dir = self.predict_model / "onnx"
        if not (onnx_dir / "visiontune_onnx.json").is_file():
            result = run_measured([PY, "-m", "visiontune", "export-onnx", "--model", str(self.predict_model),
                                   "--output_dir", str(onnx_dir)], self.work / "logs" / "export-onnx.log",
                                  env=child_env())
            if result.returncode:
                raise SystemExit(f"export-onnx failed; see {result.log_path}")
        return self.predict_model

    def run(self, names: list[str]) -> None:
        effnet = [n for n in names if VARIANTS[n].model == "effnet" and VARIANTS[n].side != "predict"]
        vit = [n for n in names if VARIANTS[n].model == "vit"]
        predict = [n for n in names if VARIANTS[n].side == "predict"]
        for r in range(self.s.repeats):
            self.log(f"repeat {r + 1}/{self.s.repeats}: EfficientNet-Lite0")
            for name in effnet:
                self.measure(name)
            for name in predict:
                self.measure(name)
        for r in range(self.s.vit_repeats):
            if vit:
                self.log(f"repeat {r + 1}/{self.s.vit_repeats}: ViT-Small")
            for name in vit:
                self.measure(name)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def medians(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name, rows in results.items():
        keys = {k for row in rows for k, x in row.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
        table[name] = {k: statistics.median([row[k] for row in rows if isinstance(row.get(k), (int, float))])
                       for k in keys if any(isinstance(row.get(k), (int, float)) for row in rows)}
        table[name]["runs"] = len(rows)
        table[name]["noisy_runs"] = sum(bool(row.get("noisy")) for row in rows)
    return table


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratios(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def get(name: str, key: str) -> float | None:
        return table.get(name, {}).get(key)

    def best(names: list[str], key: str) -> tuple[str | None, float | None]:
        found = [(get(n, key), n) for n in names if get(n, key)]
        return (max(found)[1], max(found)[0]) if found else (None, None)

    out: dict[str, Any] = {}
    # What a user can choose on each side: precision, and the loader's workers.
    vt_best = ["vt32", "vt16", "vt16-w1", "vt16-w2"]
    hf_best = ["hf32", "hf16", "hf16w0", "hf32w2"]
    for key, label in (("train_images_per_s", "trainer"), ("steady_images_per_s", "steady"),
                       ("wall_images_per_s", "wall")):
        out[f"a/b fp32 defaults ({label}: vt32 vs hf32)"] = _ratio(get("vt32", key), get("hf32", key))
        b32_name, b32 = best(["hf32", "hf32w2"], key)
        out[f"a/b fp32 ({label}: vt32 vs {b32_name})"] = _ratio(get("vt32", key), b32)
        a_name, a_best = best(vt_best, key)
        b_name, b_best = best(hf_best, key)
        out[f"a/b best ({label}: {a_name} vs {b_name})"] = _ratio(a_best, b_best)
        out[f"vit a/b fp32 ({label}: vit-vt32 vs vit-hf32)"] = _ratio(get("vit-vt32", key), get("vit-hf32", key))
        va_name, va = best(["vit-vt32", "vit-vt16"], key)
        vb_name, vb = best(["vit-hf32", "vit-hf16", "vit-hf16w0"], key)
        out[f"vit a/b best ({label}: {va_name} vs {vb_name})"] = _ratio(va, vb)
        out[f"before/after fp32 ({label}: vt32 vs vt32-before)"] = _ratio(get("vt32", key), get("vt32-before", key))
    for a, c in (("vt32", "ceil32+"), ("vt16", "ceil16+"), ("vt32", "ceil32"), ("vt16", "ceil16"),
                 ("hf32", "ceil32"), ("hf16w0", "ceil16"),
                 ("vit-vt32", "vit-ceil32+"), ("vit-vt16", "vit-ceil16+")):
        out[f"{a}/{c} (steady)"] = _ratio(get(a, "steady_images_per_s"), get(c, "steady_images_per_s"))
    for name in IN_PROCESS_CEILING:
        # The median of each run's own ratio (not a ratio of medians): a and c share a process.
        out[f"{name}: a/c in one process (steady / ceiling)"] = get(name, "steady_over_ceiling")
    for a, b in (("predict-vt", "predict-pipeline"), ("predict-vt", "predict-pipeline-b32"),
                 ("predict-vt-pytorch", "predict-pipeline"), ("predict-vt-pytorch", "predict-pipeline-b32")):
        out[f"{a} / {b} (scoring)"] = _ratio(get(a, "score_images_per_s"), get(b, "score_images_per_s"))
        out[f"{a} / {b} (end to end)"] = _ratio(get(a, "end_to_end_images_per_s"),
                                                get(b, "end_to_end_images_per_s"))
    for a, b in (("vt32", "hf32"), ("vt16", "hf16"), ("vt16", "hf16w0"), ("vit-vt32", "vit-hf32"),
                 ("vit-vt16", "vit-hf16w0")):
        out[f"accuracy {a} - {b}"] = (get(a, "accuracy") - get(b, "accuracy")
                                      if get(a, "accuracy") is not None and get(b, "accuracy") is not None else None)
        out[f"peak memory {a} / {b}"] = _ratio(get(a, "peak_tree_mb"), get(b, "peak_tree_mb"))
    return {k: v for k, v in out.items() if v is not None}


# (a, b, key): ratios also read pair by pair, repeat i of a against repeat i of b, which ran
# next to each other: the machine's drift over the whole run moves both sides of a pair.
PAIRS = [("vt16", "hf16w0", "train_images_per_s"), ("vt32", "hf32", "train_images_per_s"),
         ("vt16", "ceil16+", "steady_images_per_s"), ("vt32", "ceil32+", "steady_images_per_s"),
         ("vt16", "hf16w0", "peak_tree_mb"), ("vt32", "hf32", "peak_tree_mb")]


def pair_ratios(results: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Each interleaved pair's ratio, for the PAIRS both of whose sides ran, and each in-process
    a/c."""
    out = {}
    for a, b, key in PAIRS:
        values = [x[key] / y[key] for x, y in zip(results.get(a, []), results.get(b, []))
                  if x.get(key) and y.get(key)]
        if values:
            out[f"{a} / {b} ({key})"] = values
    for name in IN_PROCESS_CEILING:  # a and c in one process: each run is its own pair
        values = [x["steady_over_ceiling"] for x in results.get(name, []) if x.get("steady_over_ceiling")]
        if values:
            out[f"{name}: steady / ceiling in process"] = values
    return out


def agreement(results: dict[str, list[dict[str, Any]]]) -> float | None:
    """Share of images where visiontune predict and the pipeline agree on the top class."""
    try:
        a = results["predict-vt"][-1]["predictions"]
        b = results["predict-pipeline"][-1]["predictions"]
    except (KeyError, IndexError):
        return None
    ours = {}
    for line in Path(a).read_text().splitlines():
        row = json.loads(line)
        ours[row["image"]] = row.get("predicted_label")
    theirs = [json.loads(line) for line in Path(b).read_text().splitlines()]
    same = sum(ours.get(str(Path(r["image"]).resolve())) == r["top"] or ours.get(r["image"]) == r["top"]
               for r in theirs)
    return same / len(theirs) if theirs else None


COLUMNS = [("train_images_per_s", "train img/s"), ("steady_images_per_s", "steady img/s"),
           ("wall_images_per_s", "wall img/s"),
           ("score_images_per_s", "score img/s"), ("ceiling_images_per_s", "c in process img/s"),
           ("wall_s", "wall s"),
           ("peak_tree_mb", "peak MB (PSS)"), ("peak_rss_mb", "max RSS MB"), ("accuracy", "val acc"),
           ("runs", "runs")]


def render(table: dict[str, dict[str, Any]], order: list[str], ratio_rows: dict[str, Any],
           pairs: dict[str, list[float]]) -> str:
    lines = ["| variant | " + " | ".join(label for _, label in COLUMNS) + " | what |",
             "|---|" + "---:|" * len(COLUMNS) + "---|"]
    for name in order:
        if name not in table:
            continue
        row = table[name]
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            cells.append("" if value is None else (f"{value:.3f}" if key == "accuracy" else _fmt(value)))
        noisy = f" ({row['noisy_runs']} noisy)" if row.get("noisy_runs") else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {VARIANTS[name].describe}{noisy} |")
    lines.append("")
    lines.append("| ratio | value |")
    lines.append("|---|---:|")
    for key, value in ratio_rows.items():
        lines.append(f"| {key} | {value:+.3f} |" if key.startswith("accuracy") else f"| {key} | {value:.2f} |")
    if pairs:
        lines += ["", "| interleaved pairs | median | lowest | highest | pairs |", "|---|---:|---:|---:|---:|"]
        for key, values in pairs.items():
            lines.append(f"| {key} | {statistics.median(values):.2f} | {min(values):.2f} | "
                         f"{max(values):.2f} | {len(values)} |")
    return "\n".join(lines)


def summarize(results: dict[str, list[dict[str, Any]]]) -> tuple[dict, dict, dict, str]:
    """Medians, ratios, pair ratios and the printed report of a run's results."""
    table = medians(results)
    ratio_rows = ratios(table)
    agree = agreement(results)
    if agree is not None:
        ratio_rows["predict top-1 agreement with pipeline"] = agree
    pairs = pair_ratios(results)
    return table, ratio_rows, pairs, render(table, list(VARIANTS), ratio_rows, pairs)


def machine_description() -> dict[str, Any]:
    """The CPU the rates were measured on: the kind decides visiontune's bf16 paths."""
    import platform

    from visiontune.hardware import cpu_kind

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kind = cpu_kind()
    return {"cpu": name, "cpus": os.cpu_count(), "capability": kind.capability,
            "native_bf16": kind.native_bf16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few images, one step each")
    parser.add_argument("--variants", default=None,
                        help="comma-separated names, 'default', 'levers' or 'all' (see VARIANTS); "
                             "default: 'default' ('quick' with --quick)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--vit_repeats", type=int)
    parser.add_argument("--image_size", type=int)
    parser.add_argument("--train_images", type=int)
    parser.add_argument("--val_images", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--data_dir", default=None, help="where the generated photos are cached")
    parser.add_argument("--work_dir", default=None, help="runs and models (default: a new temp folder)")
    parser.add_argument("--output", default=None, help="results JSON (default: WORK_DIR/results.json)")
    parser.add_argument("--no_wait", action="store_true", help="do not wait for a quiet machine")
    parser.add_argument("--from_results", default=None, metavar="JSON",
                        help="print the report of an earlier run's results file and exit")
    args = parser.parse_args(argv)
    if args.from_results:
        print(summarize(json.loads(Path(args.from_results).read_text())["runs"])[3])
        return 0

    settings = Settings() if not args.quick else Settings(**vars(QUICK))
    for key in ("repeats", "vit_repeats", "image_size", "train_images", "val_images", "epochs"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    if args.no_wait:
        settings.quiet_wait_s, settings.max_foreign = 0.0, 1.0
    if args.variants is None:
        args.variants = "quick" if args.quick else "default"
    if args.variants == "default":
        names = DEFAULT_SET
    elif args.variants == "quick":
        names = QUICK_SET
    elif args.variants == "levers":
        names = LEVER_SET
    elif args.variants == "all":
        names = list(VARIANTS)
    else:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="visiontune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    default_data = HERE / ".cache" / ("photos-quick" if args.quick else "photos")
    data_root = Path(args.data_dir) if args.data_dir else default_data

    def log(message: str) -> None:
        print(message, flush=True)

    started = time.monotonic()
    machine = machine_description()
    log(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, PyTorch's CPU level "
        f"{machine['capability']}, {'native' if machine['native_bf16'] else 'emulated'} bf16")
    bench = Bench(settings, work, data_root, log)
    bench.prepare()
    bench.run(names)
    table, ratio_rows, pairs, report = summarize(bench.results)
    print()
    print(report)
    result = {"settings": vars(settings), "machine": machine,
              "runs": bench.results, "medians": table, "ratios": ratio_rows, "pairs": pairs,
              "minutes": (time.monotonic() - started) / 60}
    output = Path(args.output) if args.output else work / "results.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nresults: {output} ({result['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
