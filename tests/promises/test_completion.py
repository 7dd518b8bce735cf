"""Every process returns only after rank 0 has written all the outputs: the last time a
process waits for rank 0 (``distributed.wait_for_main_process``, a barrier under a launcher)
comes after the last file of the fine-tuned model, the MLflow model and the evaluation report
was written. Checked in one process, by what the output folders hold at each wait; the
multi-process runs are in tests/training/test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import save_tiny_model
from visiontune.outputs import LOCK_FILE, STAGING_PREFIX
from visiontune.training import distributed

MC = "image-classification"
FAST = ["--max_steps", "2", "--number_of_epochs", "1", "--training_batch_size", "4",
        "--image_height", "16", "--image_width", "16", "--number_of_workers", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ViT and 3 classes x 4 random 16x16 images (training = validation = test)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("completion")
    model = save_tiny_model("vit", root / "model", num_labels=3, image_size=16)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        rows.append({"image_url": str(path), "label": str(i % 3)})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folders`` (but the run's lock and staging) with size and mtime."""
    seen = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            parts = path.relative_to(folder).parts
            if path.is_file() and parts[0] != LOCK_FILE and not parts[0].startswith(STAGING_PREFIX):
                stat = path.stat()
                seen[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return seen


@pytest.fixture
def waits(monkeypatch):
    """Each call of wait_for_main_process: (what it waits for, the folders' files then)."""
    calls: list[tuple[str, dict]] = []
    watched: list[Path] = []

    def wait(what):
        calls.append((what, snapshot(*watched)))

    monkeypatch.setattr(distributed, "wait_for_main_process", wait)
    return calls, watched


def _check_last_wait_after_every_write(calls, watched, must_exist):
    assert calls, "no process waited for rank 0"
    final = snapshot(*watched)
    for path in must_exist:
        assert str(path) in final, f"{path} was not written"
    last_what, last_seen = calls[-1]
    written_later = sorted(set(final.items()) - set(last_seen.items()))
    assert not written_later, (f"written after the last wait for rank 0 ({last_what!r}): "
                               f"{[p for p, _ in written_later][:10]}")


@pytest.fixture(scope="module")
def finetune_run(tiny, tmp_path_factory):
    """One fine-tune, with its waits for rank 0 recorded: (waits, watched folders, stdout,
    output folder, MLflow folder)."""
    import contextlib
    import io

    from visiontune.cli import main

    model, data = tiny
    root = tmp_path_factory.mktemp("finetune_run")
    out, mlflow_dir = root / "pt", root / "mlflow"
    ignored = root / "ds.json"
    ignored.write_text("{}")
    calls, watched, printed = [], [out, mlflow_dir], io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(distributed, "wait_for_main_process",
                      lambda what: calls.append((what, snapshot(*watched))))
        code = main(["finetune", "--model_path", str(model), "--training_data", str(data),
                     "--validation_data", str(data), "--task_name", MC,
                     "--output_dir_pytorch", str(out), "--output_dir_mlflow", str(mlflow_dir),
                     "--deepspeed_config", str(ignored), *FAST])
    assert code == 0, printed.getvalue()[-2000:]
    return calls, watched, printed.getvalue(), out, mlflow_dir


def test_finetune_waits_for_rank_zero_after_its_last_output(finetune_run):
    calls, watched, _, out, mlflow_dir = finetune_run
    _check_last_wait_after_every_write(calls, watched, [
        out / "model.safetensors", out / "model_selector_args.json", out / "eval_results.json",
        out / "finetune_args.json", mlflow_dir / "MLmodel"])


def test_the_notes_printed_at_start_are_the_notes_saved(finetune_run):
    """Decisions taken for the user are printed as notes and saved in finetune_args.json."""
    _, _, printed, out, _ = finetune_run
    saved = json.loads((out / "finetune_args.json").read_text())["notes"]
    shown = [line.strip()[len("note: "):] for line in printed.splitlines()
             if line.strip().startswith("note: ")]
    assert shown == saved
    assert "deepspeed_config is ignored: apply_deepspeed is false" in saved
    assert any(note.startswith(("CPU ", "GPU ")) for note in saved), saved  # the device's kind


def test_pipeline_waits_for_rank_zero_after_the_evaluation_report(tiny, waits, tmp_path, capsys):
    from visiontune.cli import main

    model, data = tiny
    calls, watched = waits
    out = tmp_path / "pt"
    watched.append(out)
    code = main(["pipeline", "--pytorch_model", str(model), "--training_data", str(data),
                 "--validation_data", str(data), "--test_data", str(data), "--task_name", MC,
                 "--output_dir_pytorch", str(out), *FAST])
    assert code == 0, capsys.readouterr().err[-2000:]
    report = out / "evaluation"
    _check_last_wait_after_every_write(calls, watched, [
        out / "model.safetensors", out / "mlflow_model" / "MLmodel", report / "metrics.json",
        report / "per_class.csv", report / "predictions.jsonl"])
