"""The benchmark cannot rot: its smoke run (``benchmarks/run.py --quick``: a few images, one
step each) goes through every kind of run and writes its table. No timing is checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import make_data  # noqa: E402
import run as bench  # noqa: E402


def test_generated_photos_are_deterministic():
    first = make_data.render(0, "train", 5)
    assert first == make_data.render(0, "train", 5)
    assert first != make_data.render(1, "train", 5)
    label, data = first
    assert label in make_data.CLASSES and data[:2] == b"\xff\xd8"  # a JPEG


def test_steady_rate_leaves_out_evaluations():
    records = [{"step": 4, "elapsed_s": 10.0, "loss": 1.0}, {"step": 8, "elapsed_s": 12.0, "loss": 1.0},
               {"step": 8, "elapsed_s": 20.0, "eval_loss": 1.0},
               {"step": 12, "elapsed_s": 22.0, "loss": 1.0}, {"step": 16, "elapsed_s": 24.0, "loss": 1.0}]
    assert bench._steady_rate(records, batch_size=2) == 4 * 2 * 2 / 4.0


def test_quick_benchmark_runs_end_to_end(tmp_path):
    output = tmp_path / "results.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no_wait",
         "--work_dir", str(tmp_path / "work"), "--data_dir", str(tmp_path / "photos"),
         "--output", str(output)],
        capture_output=True, text=True, timeout=840, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads(output.read_text())
    medians = data["medians"]
    assert set(bench.QUICK_SET) <= set(medians)
    for name in bench.QUICK_SET:
        row = medians[name]
        assert row["wall_s"] > 0 and row["peak_tree_mb"] > 0, name
        side = bench.VARIANTS[name].side
        if side in ("vt", "hf"):
            assert row["train_images_per_s"] > 0 and 0 <= row["accuracy"] <= 1, name
        elif side == "ceiling":
            assert row["steady_images_per_s"] > 0, name
        else:
            assert row["end_to_end_images_per_s"] > 0, name
    ratios = data["ratios"]
    assert any(key.startswith("a/b fp32 defaults") for key in ratios)
    assert "predict-vt / predict-pipeline (end to end)" in ratios
    assert any("/ceil" in key for key in ratios)  # a/c
    assert "| variant |" in result.stdout and "| ratio | value |" in result.stdout
