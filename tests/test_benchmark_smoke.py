"""The benchmark cannot rot: its smoke run (``python -m benchmarks.run --quick``: a few images,
one step each) goes through every kind of run and writes its table. No timing is checked."""

import json
import subprocess
import sys

from benchmarks import make_data
from benchmarks import run as bench


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


def test_ceiling_in_process_ratio_is_the_runs_rate_over_the_mean_of_both_ceilings(tmp_path):
    lines = [{"when": "before", "images_per_second": 60.0}, {"when": "after", "images_per_second": 40.0}]
    (tmp_path / bench.CEILING_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    row = bench.read_ceiling_in_process(tmp_path, steady=45.0)
    assert row["ceiling_images_per_s"] == 50.0 and row["steady_over_ceiling"] == 0.9
    assert (row["ceiling_before_images_per_s"], row["ceiling_after_images_per_s"]) == (60.0, 40.0)
    assert bench.read_ceiling_in_process(tmp_path / "elsewhere", steady=45.0) == {}


def test_pair_ratios_match_repeat_i_of_a_with_repeat_i_of_b():
    results = {"vt16": [{"train_images_per_s": 40.0}, {"train_images_per_s": 60.0}],
               "hf16w0": [{"train_images_per_s": 20.0}, {"train_images_per_s": 20.0}],
               "vt16+c": [{"steady_over_ceiling": 0.9}, {"steady_over_ceiling": 1.1}]}
    pairs = bench.pair_ratios(results)
    assert pairs == {"vt16 / hf16w0 (train_images_per_s)": [2.0, 3.0],
                     "vt16+c: steady / ceiling in process": [0.9, 1.1]}


def test_quick_benchmark_runs_end_to_end(tmp_path):
    output = tmp_path / "results.json"
    env = bench.child_env()  # offline, with the repository root on the path for ``-m benchmarks.run``
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--no_wait",
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
    # a and c timed in one process: the ceiling before and after training, and the ratio.
    in_process = medians["vt16+c"]
    assert in_process["ceiling_before_images_per_s"] > 0 and in_process["ceiling_after_images_per_s"] > 0
    # ... without changing the training: the same losses as vt16's, step for step.
    def losses(name: str) -> list[float]:
        (run_dir,) = (tmp_path / "work" / "runs").glob(f"*-{name}")
        records = map(json.loads, (run_dir / "model" / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in records if "loss" in r]

    assert losses("vt16") and losses("vt16+c") == losses("vt16")
    ratios = data["ratios"]
    assert ratios["vt16+c: a/c in one process (steady / ceiling)"] == in_process["steady_over_ceiling"] > 0
    assert any(key.startswith("a/b fp32 defaults") for key in ratios)
    assert "predict-vt / predict-pipeline (end to end)" in ratios
    assert any("/ceil" in key for key in ratios)  # a/c
    assert "| variant |" in result.stdout and "| ratio | value |" in result.stdout
    assert data["pairs"]["vt16+c: steady / ceiling in process"] == [in_process["steady_over_ceiling"]]
    # The report again, from the results file alone.
    again = subprocess.run([sys.executable, "-m", "benchmarks.run", "--from_results", str(output)],
                           capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "| vt16+c |" in again.stdout and "| interleaved pairs |" in again.stdout
