"""The CUDA paths in one command (under 8 minutes on one GPU), for the first run on a GPU.

    python -m benchmarks.gpu_check                 # on a GPU machine
    python -m benchmarks.gpu_check --dry           # the same steps, tiny, on the CPU

Steps, each reported as ok, failed (with its first error line) or skipped:

1. ``device``: what torch sees (GPU, compute capability, CUDA build, driver), the warning for
   a GPU torch cannot use, and which GPU options a run takes (TF32, pinned memory and
   non-blocking copies, ONNX Runtime's provider, workers per process).
2. ``fp16`` and ``bf16``: a few fine-tune steps of a CNN with batch norm and of a ViT through
   visiontune's trainer at each precision (finite losses); bf16 needs compute capability 8.0.
3. ``deepspeed``: a precision-16 DeepSpeed fine-tune (ZeRO-3, a batch-norm CNN), its output
   reloaded as float32 and scored.
4. ``speed``: images per second of ``visiontune finetune`` against the Hugging Face recipe
   (``benchmarks.hf_recipe``) on the same data, model and batch, precision 16.

The results go to ``--output`` (JSON) and a table on stdout. ``--dry`` runs on the CPU with
tiny sizes (seconds to a minute), so the script cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from . import run as bench

STEPS = ("device", "fp16", "bf16", "deepspeed", "speed")


def device_report(dry: bool) -> dict[str, Any]:
    import onnxruntime
    import torch

    from visiontune import hardware as H

    gpu = H.gpu_kind()
    report: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": gpu.torch_cuda,
                              "gpu": gpu.describe(), "driver": gpu.driver,
                              "warning": H.gpu_warning(gpu),
                              "onnx_providers": H.onnx_providers(onnxruntime.get_available_providers(), gpu),
                              "workers_per_process": H.workers_per_process(os.cpu_count() or 1, gpu)}
    if gpu.cuda_available:
        report["options"] = H.gpu_paths(gpu, H.gpu_training_options(gpu))
    else:
        report["options"] = H.cpu_paths(H.cpu_kind(), bf16=False, deepspeed=False)
    if not gpu.cuda_available and not dry:
        raise RuntimeError(report["warning"] or "no usable GPU (use --dry on a CPU)")
    return report


def _tiny_models(work: Path) -> dict[str, Path]:
    from tests.tiny_models import save_tiny_model

    return {"cnn": save_tiny_model("resnet", work / "models" / "cnn", image_size=32),
            "vit": save_tiny_model("vit", work / "models" / "vit", image_size=32)}


def train_steps(model_dir: Path, precision: str, steps: int, batch: int, size: int, out: Path) -> list[float]:
    """``steps`` optimizer steps of visiontune's trainer on random images; the logged losses."""
    import torch
    from transformers import AutoModelForImageClassification, TrainingArguments

    from visiontune.training.trainer import VisionTrainer

    gpu = torch.cuda.is_available()
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    rows = [{"pixel_values": torch.randn(3, size, size), "labels": i % model.config.num_labels}
            for i in range(steps * batch)]
    args = TrainingArguments(str(out), per_device_train_batch_size=batch, max_steps=steps,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=not gpu,
                             remove_unused_columns=False, disable_tqdm=True,
                             dataloader_pin_memory=gpu, **{precision: True})
    trainer = VisionTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{precision}: losses {losses}")
    return losses


def precision_check(precision: str, dry: bool, work: Path, models: dict[str, Path]) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        if precision == "fp16":
            return {"skipped": "fp16 mixed precision needs a GPU"}
    elif precision == "bf16" and torch.cuda.get_device_capability()[0] < 8:
        return {"skipped": "bf16 needs compute capability 8.0 (visiontune trains fp16 there)"}
    batch, size, steps = (4, 32, 2) if dry else (64, 224, 20)
    result = {}
    for name, model in models.items():
        start = time.perf_counter()
        losses = train_steps(model, precision, steps, batch, size, work / f"{precision}-{name}")
        result[name] = {"losses": [round(x, 4) for x in losses],
                        "seconds": round(time.perf_counter() - start, 2)}
    return result


def _cli(args: list[str], log: Path, env: dict[str, str]) -> None:
    with log.open("w") as fh:
        code = subprocess.call([sys.executable, "-m", "visiontune", *args], stdout=fh,
                               stderr=subprocess.STDOUT, env=env)
    if code:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"visiontune {args[0]} exited {code}: {' | '.join(tail)}")


def deepspeed_check(dry: bool, work: Path, data: Path, models: dict[str, Path]) -> dict[str, Any]:
    import importlib.util

    import torch

    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "deepspeed is not installed"}
    from safetensors.torch import load_file

    from visiontune.models.loading import load_float32_classifier

    out, config = work / "ds-out", work / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    env = bench.child_env({"VISIONTUNE_CPU_BF16": "1"} if dry else {})
    _cli(["finetune", "--model_path", str(models["cnn"]), "--training_data", str(data / "train"),
          "--validation_data", str(data / "validation"), "--task_name", "image-classification",
          "--output_dir_pytorch", str(out), "--image_height", "32", "--image_width", "32",
          "--training_batch_size", "4", "--validation_batch_size", "4", "--max_steps", "2",
          "--precision", "16", "--apply_deepspeed", "true", "--deepspeed_config", str(config),
          "--number_of_workers", "0", "--save_as_mlflow_model", "false"], work / "ds.log", env)
    saved = {str(v.dtype) for v in load_file(out / "model.safetensors").values() if v.is_floating_point()}
    model = load_float32_classifier(out, "gpu_check")
    dtypes = {str(p.dtype) for p in model.parameters()}
    if dtypes != {"torch.float32"}:
        raise RuntimeError(f"reloaded weights are {dtypes}, not float32")
    _cli(["evaluate", "--model", str(out), "--test_data", str(data / "validation"),
          "--output_dir", str(work / "ds-eval")], work / "ds-eval.log", env)
    return {"saved_dtypes": sorted(saved), "reloaded": "float32", "evaluated": True,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def speed_check(dry: bool, work: Path, data: Path, models: dict[str, Path]) -> dict[str, Any]:
    import torch

    settings = bench.QUICK if dry else bench.Settings(image_size=224, batch_size=64, epochs=1,
                                                     logging_steps=4)
    gpu = torch.cuda.is_available()
    steps = 2 if dry else 40
    job_models = bench.prepare_models(work / "bench", settings, lambda message: None)
    rates: dict[str, Any] = {}
    for side in ("vt", "hf"):
        variant = bench.Variant(f"{side}16", side, "effnet", precision=16, workers=None if gpu else 0)
        job = bench.Job(variant, data, settings.image_size, settings.batch_size, 1, steps,
                        settings.logging_steps)
        out = work / f"speed-{side}"
        out.mkdir(parents=True, exist_ok=True)
        if side == "vt":
            cmd = bench.vt_command(job, job_models, out, settings)
        else:
            cmd = bench.hf_command(job, job_models, out, settings)
            if gpu:  # the recipe on the GPU: bf16 or fp16 as visiontune chooses
                flag = cmd.index("--use_cpu")
                cmd = cmd[:flag] + cmd[flag + 2:]
                if torch.cuda.get_device_capability()[0] < 8:
                    cmd = ["--fp16" if c == "--bf16" else c for c in cmd]
        with (out / "log.txt").open("w") as fh:
            code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=bench.child_env())
        if code:
            raise RuntimeError(f"{side} exited {code}; see {out / 'log.txt'}")
        read = bench.read_vt if side == "vt" else bench.read_hf
        rates[side] = read(out, job)
    vt, hf = rates["vt"].get("train_images_per_s"), rates["hf"].get("train_images_per_s")
    rates["vt_over_hf"] = round(vt / hf, 3) if vt and hf else None
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--skip", default="", help=f"comma-separated steps to leave out ({', '.join(STEPS)})")
    parser.add_argument("--work_dir", default=None, help="where data, models and runs go (default: a temporary folder)")
    parser.add_argument("--output", default="gpu_check.json")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(STEPS)
    if unknown:
        parser.error(f"--skip: unknown step(s) {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    os.environ.update(bench.child_env())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {"dry": args.dry}
        state: dict[str, Any] = {}

        def data() -> Path:
            if "data" not in state:
                s = bench.QUICK if args.dry else bench.Settings()
                count = (s.train_images, s.val_images) if args.dry else (1000, 200)
                root = bench.make_data.write_dataset(work / "photos", train=count[0], validation=count[1])
                state["data"] = bench.make_subset(root, "check", *count)
            return state["data"]

        def models() -> dict[str, Path]:
            if "models" not in state:
                state["models"] = _tiny_models(work)
            return state["models"]

        checks: dict[str, Callable[[], dict[str, Any]]] = {
            "device": lambda: device_report(args.dry),
            "fp16": lambda: precision_check("fp16", args.dry, work, models()),
            "bf16": lambda: precision_check("bf16", args.dry, work, models()),
            "deepspeed": lambda: deepspeed_check(args.dry, work, data(), models()),
            "speed": lambda: speed_check(args.dry, work, data(), models()),
        }
        for name in STEPS:
            if name in skip:
                results[name] = {"status": "skipped", "why": "--skip"}
                continue
            start = time.perf_counter()
            try:
                result = checks[name]()
                status = "skipped" if "skipped" in result else "ok"
                results[name] = {"status": status, **result}
            except Exception as exc:  # every step is reported; the next one still runs
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {first}",
                                 "traceback": traceback.format_exc(limit=5)}
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(f"{name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("| step | status | result |\n|---|---|---|")
    for name in STEPS:
        row = {k: v for k, v in results[name].items() if k not in ("status", "traceback")}
        print(f"| {name} | {results[name]['status']} | {json.dumps(row, default=str)[:200]} |")
    return 1 if any(results[n]["status"] == "failed" for n in STEPS) else 0


if __name__ == "__main__":
    raise SystemExit(main())
