"""The GPU options, decided from a stated device (not this machine's): the warning for a GPU
torch cannot use, TF32, pinned memory and non-blocking copies, data-loader workers per process,
ONNX Runtime's provider, and auto_find_batch_size (off under several processes; halving in one)."""

import pytest
import torch

from tests.helpers import workers_config
from visiontune import hardware as H
from visiontune.config import resolve
from visiontune.errors import UserError
from visiontune.hardware import GpuKind
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS
from visiontune.training.arguments import auto_batch_size_applies, plan_training
from visiontune.training.defaults import apply_defaults
from visiontune.training.trainer import batch_size_after

A100 = GpuKind(True, 4, (8, 0), "NVIDIA A100", "13.0", ("sm_75", "sm_80", "sm_90"), "580.82.07", True)
T4 = GpuKind(True, 1, (7, 5), "Tesla T4", "13.0", ("sm_75", "sm_80", "sm_90"), "580.82.07", True)
V100_CU13 = GpuKind(True, 8, (7, 0), "Tesla V100", "13.0", ("sm_75", "sm_80"), "580.82.07", True)
OLD_DRIVER = GpuKind(False, torch_cuda="13.0", driver="535.104.05", nvidia_visible=True)
CPU_BUILD = GpuKind(False, torch_cuda=None, driver="580.82.07", nvidia_visible=True)
NO_DRIVER = GpuKind(False, torch_cuda="13.0", driver=None, nvidia_visible=True)
NO_GPU = GpuKind(False, torch_cuda="13.0")


def _plan(tmp_path, gpu, use_cpu=False, bf16_ok=False, **given):
    values = resolve(FINETUNE_INPUTS, {"model_path": str(tmp_path), "training_data": "x.jsonl",
                                       "task_name": MULTICLASS,
                                       "output_dir_pytorch": str(tmp_path / "out"), **given})
    values = apply_defaults(values, None)
    return plan_training(values, use_cpu=use_cpu, bf16_ok=bf16_ok, gpu=gpu)


@pytest.mark.parametrize("kind,words", [
    (OLD_DRIVER, ["built for CUDA 13.0", "needs NVIDIA driver 580.65 or newer", "driver 535.104.05",
                  "update the driver", "cu126"]),
    (CPU_BUILD, ["CPU-only build", "install a CUDA build of torch"]),
    (NO_DRIVER, ["driver not loaded", "(CUDA 13.0) cannot use it", "nvidia-smi"]),
    (V100_CU13, ["Tesla V100 (compute capability 7.0) has no kernels", "sm_75 and newer", "cu126"]),
])
def test_a_gpu_torch_cannot_use_is_one_line_saying_what_to_do(kind, words):
    line = H.gpu_warning(kind)
    assert line and "\n" not in line
    for word in words:
        assert word in line, (word, line)
    if not kind.cuda_available:
        assert "training runs on the CPU" in line


@pytest.mark.parametrize("kind", [A100, T4, NO_GPU, GpuKind(True, 1, (9, 0), "MI300", None, (), None, False, hip=True)])
def test_no_warning_when_the_gpu_is_usable_or_absent(kind):
    assert H.gpu_warning(kind) is None


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path):
    proprietary = tmp_path / "p"
    proprietary.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 "
                           "01:15:15 UTC 2023\nGCC version:  gcc version 12.2.0\n")
    open_module = tmp_path / "o"
    open_module.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  "
                           "Release Build\n")
    assert H._read_driver(str(proprietary)) == "535.104.05"
    assert H._read_driver(str(open_module)) == "580.65.06"
    assert H._read_driver(str(tmp_path / "absent")) is None


def test_a_cpu_run_on_a_machine_with_an_unusable_gpu_says_so_in_its_notes(tmp_path):
    plan = _plan(tmp_path, OLD_DRIVER, use_cpu=True)
    assert any("needs NVIDIA driver 580.65" in n for n in plan.notes)
    assert plan.training_args["dataloader_pin_memory"] is False
    assert not any("warning" in n or "NVIDIA" in n for n in _plan(tmp_path, NO_GPU, use_cpu=True).notes)


@pytest.mark.parametrize("kind,tf32", [(A100, True), (T4, False), (V100_CU13, False)])
def test_tf32_pinned_memory_and_non_blocking_copies_from_the_stated_gpu(tmp_path, monkeypatch, kind, tf32):
    monkeypatch.delenv(H.ENV_TF32, raising=False)
    plan = _plan(tmp_path, kind, precision="32")
    args = plan.training_args
    assert bool(args.get("tf32")) is tf32
    assert args["dataloader_pin_memory"] is True and args["accelerator_config"] == {"non_blocking": True}
    (line,) = [n for n in plan.notes if n.startswith("GPU ")]
    assert kind.name in line and "pinned memory and non-blocking copies on" in line
    want = "TF32 matrix products on" if tf32 else "TF32 matrix products off (needs compute capability 8.0)"
    assert want in line


@pytest.mark.parametrize("kind,use_cpu,on", [(A100, False, True), (T4, False, True), (NO_GPU, True, False)])
def test_uint8_batches_are_normalised_on_the_gpu_only(tmp_path, kind, use_cpu, on):
    plan = _plan(tmp_path, kind, use_cpu=use_cpu)
    assert plan.normalise_on_device is on
    assert H.normalise_on_device(kind) is on
    if on:
        (line,) = [n for n in plan.notes if n.startswith("GPU ")]
        assert "uint8 batches normalised on the GPU on" in line


def test_tf32_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv(H.ENV_TF32, "0")
    plan = _plan(tmp_path, A100)
    assert "tf32" not in plan.training_args
    assert any("TF32 matrix products off (VISIONTUNE_TF32=0)" in n for n in plan.notes)


@pytest.mark.parametrize("kind,bf16_ok,want", [(A100, True, "bf16"), (T4, False, "fp16")])
def test_precision_16_on_a_gpu(tmp_path, kind, bf16_ok, want):
    args = _plan(tmp_path, kind, bf16_ok=bf16_ok, precision="16").training_args
    assert args.get(want) is True and not args.get({"bf16": "fp16", "fp16": "bf16"}[want])


@pytest.mark.parametrize("env,kind,processes", [
    ({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "8"}, A100, 2),          # torchrun says
    ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}, A100, 4),    # Azure: one per GPU
    ({"WORLD_SIZE": "2"}, A100, 2),
    ({"WORLD_SIZE": "2"}, NO_GPU, 2),                                  # CPU: all on this node
    ({}, A100, 1),
])
def test_workers_are_divided_among_the_processes_of_a_node(env, kind, processes):
    assert H.local_processes(kind, env) == processes
    assert H.workers_per_process(16, kind, env) == 16 // processes


def test_choose_workers_without_local_world_size(monkeypatch):
    from visiontune.training.finetune import choose_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(H, "gpu_kind", lambda: A100)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    values = choose_workers(workers_config(8), use_cpu=False)
    assert values.number_of_workers == 4
    assert values.chosen_by("number_of_workers") == "reduced from 8 to the CPUs here per process"


@pytest.mark.parametrize("available,kind,want", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], A100, ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], NO_GPU, ["CPUExecutionProvider"]),
    (["AzureExecutionProvider", "CPUExecutionProvider"], A100, ["CPUExecutionProvider"]),
])
def test_onnx_runtime_uses_cuda_only_where_it_has_it_and_there_is_a_gpu(available, kind, want):
    assert H.onnx_providers(available, kind) == want


def test_this_machines_gpu_is_read_from_torch():
    kind = H.gpu_kind()
    assert kind.cuda_available == torch.cuda.is_available()
    assert kind.torch_cuda == torch.version.cuda


@pytest.mark.parametrize("world,ds,on,note", [
    (1, None, True, None),
    (2, None, False, "with 2 processes an out-of-memory error cannot be retried by every process"),
    (1, {"zero_optimization": {"stage": 3}}, False, "not support it under DeepSpeed ZeRO stage 3"),
    (1, {"zero_optimization": {"stage": 2}}, True, None),
])
def test_auto_find_batch_size_only_where_a_retry_cannot_hang(world, ds, on, note):
    applies, why = auto_batch_size_applies(True, world, ds)
    assert applies is on and (note is None and why is None or note in why)
    assert auto_batch_size_applies(False, world, ds) == (False, None)


def test_auto_find_batch_size_is_off_with_a_note_under_a_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = _plan(tmp_path, NO_GPU, use_cpu=True, auto_find_batch_size="true")
    assert plan.training_args["auto_find_batch_size"] is False
    assert any(n.startswith("auto_find_batch_size is off: with 2 processes") for n in plan.notes)


def test_each_retry_halves_the_batch_size():
    tried = []
    for offered in (64, 57, 51, 45, 41, 36, 32):  # what accelerate offers: 90 % each time
        tried.append(batch_size_after(tried, offered))
    assert tried == [64, 32, 16, 8, 4, 2, 1]
    with pytest.raises(UserError, match="--auto_find_batch_size: out of memory even at training batch size 1"):
        batch_size_after(tried, 28)


def test_the_trainer_retries_an_out_of_memory_error_at_half_the_batch(tiny_vit, tmp_path):
    """A model that runs out of memory above 2 images: the run goes on at 8, 4, then 2."""
    from transformers import AutoModelForImageClassification, TrainingArguments

    from visiontune.training.trainer import VisionTrainer

    model = AutoModelForImageClassification.from_pretrained(tiny_vit)
    forward = model.forward

    def limited(pixel_values=None, **kwargs):
        if len(pixel_values) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(pixel_values=pixel_values, **kwargs)

    model.forward = limited
    rows = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(8)]
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, auto_find_batch_size=True,
                             max_steps=2, use_cpu=True, report_to=[], save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = VisionTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert trainer.batch_sizes_tried == [8, 4, 2]
    assert trainer.state.global_step == 2 and trainer.state.train_batch_size == 2
