"""Quality bars of the README's main jobs: the built-in EfficientNet-Lite0 on the demo data,
with the settings of examples/*.yaml (slow: a few minutes each on 2 CPU cores)."""

import json
from pathlib import Path

import pytest
import yaml

from visiontune.cli import main

ROOT = Path(__file__).resolve().parents[2]  # the repository (tests/promises/ is two below)


def _run_example(name, demo_dir, tmp_path):
    config = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    for key in ("training_data", "validation_data", "test_data"):
        config[key] = str(demo_dir / Path(config[key]).relative_to("demo"))
    for key in ("output_dir_pytorch", "output_dir_mlflow", "output_dir_evaluation"):
        config[key] = str(tmp_path / Path(config[key]).name)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(path)]) == 0
    validation = json.loads((tmp_path / "pytorch" / "eval_results.json").read_text())
    test = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    return validation, test


def _metric(report, name):
    """metrics.json may nest the scalar metrics; find the value by name."""
    if name in report:
        return report[name]
    for value in report.values():
        if isinstance(value, dict) and name in value:
            return value[name]
    raise KeyError(name)


@pytest.mark.slow
def test_digits_reach_095_accuracy(demo_dir, tmp_path):
    validation, test = _run_example("digits", demo_dir, tmp_path)
    assert validation["accuracy"] >= 0.95
    assert _metric(test, "accuracy") >= 0.95


@pytest.mark.slow
def test_mosaics_reach_08_iou(demo_dir, tmp_path):
    validation, test = _run_example("mosaics", demo_dir, tmp_path)
    assert validation["iou"] >= 0.8
    assert _metric(test, "iou") >= 0.8
