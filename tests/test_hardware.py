"""The paths chosen from the CPU's kind (stated, not this machine's): precision 16 in bf16 only
with native bf16, the override both ways, and the line that tells the run which paths are on."""

import pytest

from visiontune.config import resolve
from visiontune.hardware import ENV_CPU_BF16, CpuKind, cpu_bf16, cpu_paths, fast_depthwise_applies
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS
from visiontune.training.arguments import plan_training

NATIVE, EMULATED = CpuKind("AVX512", True), CpuKind("AVX2", False)


def _plan(tmp_path, cpu, **given):
    values = resolve(FINETUNE_INPUTS, {"model_path": str(tmp_path), "training_data": "x.jsonl",
                                       "task_name": MULTICLASS,
                                       "output_dir_pytorch": str(tmp_path / "out"), **given})
    from visiontune.training.defaults import apply_defaults

    values = apply_defaults(values, None)
    return plan_training(values, use_cpu=True, bf16_ok=False, cpu=cpu)


@pytest.mark.parametrize("cpu,bf16", [(NATIVE, True), (EMULATED, False)])
def test_precision_16_is_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, cpu, bf16):
    monkeypatch.delenv(ENV_CPU_BF16, raising=False)
    plan = _plan(tmp_path, cpu, precision="16")
    assert plan.training_args["bf16"] is bf16 and not plan.training_args.get("fp16")
    assert any(("bf16 mixed precision" if bf16 else "runs as float32") in n for n in plan.notes)


def test_precision_32_never_autocasts(tmp_path):
    plan = _plan(tmp_path, NATIVE, precision="32")
    assert not plan.training_args.get("bf16") and not plan.training_args.get("fp16")
    assert any("bf16 autocast off (float32)" in n for n in plan.notes)


@pytest.mark.parametrize("setting,cpu,want", [
    ("1", EMULATED, True), ("0", NATIVE, False), ("true", EMULATED, True), ("junk", EMULATED, False),
    ("junk", NATIVE, True),
])
def test_the_environment_overrides_the_choice(monkeypatch, setting, cpu, want):
    monkeypatch.setenv(ENV_CPU_BF16, setting)
    on, note = cpu_bf16(cpu)
    assert on is want and f"{ENV_CPU_BF16}={setting}" in note


@pytest.mark.parametrize("cpu,bf16,deepspeed,want", [
    (NATIVE, True, False, "faster depthwise backward on"),
    (EMULATED, True, False, "faster depthwise backward off (needs native bf16)"),
    (NATIVE, False, False, "faster depthwise backward off (bf16 only)"),
    (NATIVE, True, True, "faster depthwise backward off (not under DeepSpeed)"),
])
def test_the_run_is_told_which_paths_are_on(monkeypatch, cpu, bf16, deepspeed, want):
    monkeypatch.delenv("VISIONTUNE_FAST_DEPTHWISE", raising=False)
    monkeypatch.delenv("VISIONTUNE_INPLACE_HARDTANH", raising=False)
    line = cpu_paths(cpu, bf16=bf16, deepspeed=deepspeed)
    assert line.startswith(f"CPU {cpu.capability}, ") and want in line and "in-place ReLU6 on" in line
    assert fast_depthwise_applies(cpu) is cpu.native_bf16


def test_a_switched_off_path_says_which_switch(monkeypatch):
    monkeypatch.setenv("VISIONTUNE_FAST_DEPTHWISE", "0")
    monkeypatch.setenv("VISIONTUNE_INPLACE_HARDTANH", "0")
    line = cpu_paths(NATIVE, bf16=True, deepspeed=False)
    assert "depthwise backward off (VISIONTUNE_FAST_DEPTHWISE=0)" in line
    assert "ReLU6 off (VISIONTUNE_INPLACE_HARDTANH=0)" in line


def test_this_machines_cpu_is_read_from_pytorch(stated_cpu):
    assert stated_cpu(True, "AVX512") == NATIVE
    assert stated_cpu(False, "AVX2") == EMULATED
