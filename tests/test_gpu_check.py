"""The GPU check script cannot rot: ``python -m benchmarks.gpu_check --dry`` runs its steps on
the CPU with tiny models. The quick test leaves out the DeepSpeed run and the speed comparison
(each a minute or more here; tests/training/test_deepspeed.py and tests/test_benchmark_smoke.py run those
paths); the slow one runs every step."""

import json
import subprocess
import sys

import pytest

from benchmarks.run import child_env  # offline, with the repository root on the path


def _dry(tmp_path, *extra, timeout=300):
    output = tmp_path / "check.json"
    env = child_env()
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry",
                             "--work_dir", str(tmp_path / "work"), "--output", str(output), *extra],
                            capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| step | status | result |" in result.stdout
    return json.loads(output.read_text())


def test_dry_check_reports_the_device_and_trains_a_few_steps(tmp_path):
    results = _dry(tmp_path, "--skip", "deepspeed,speed")
    device = results["device"]
    assert device["status"] == "ok" and device["onnx_providers"][-1] == "CPUExecutionProvider"
    assert device["options"]  # which paths a run takes
    assert results["fp16"]["status"] == "skipped"  # needs a GPU
    assert results["bf16"]["status"] == "ok" and set(results["bf16"]) >= {"cnn", "vit"}
    assert results["deepspeed"] == {"status": "skipped", "why": "--skip"}


def test_an_unknown_step_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry",
                             "--skip", "warp"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=child_env())
    assert result.returncode == 2 and "--skip: unknown step(s) warp" in result.stderr


@pytest.mark.slow
def test_dry_check_runs_every_step(tmp_path):
    results = _dry(tmp_path, timeout=900)
    assert results["deepspeed"]["status"] == "ok" and results["deepspeed"]["reloaded"] == "float32"
    assert results["speed"]["status"] == "ok" and results["speed"]["vt_over_hf"] > 0
