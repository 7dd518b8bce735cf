"""Resume takes the newest *complete* checkpoint: one whose marker was written after its last
file and whose files are all still there; a half-written one is removed, never resumed from;
``metrics.jsonl`` keeps each step once. These are the choices made before training, without a
model (the trained steps and weights of a resumed run are in tests/training/test_finetune.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from visiontune.training.callbacks import COMPLETE_MARKER, METRICS_LOG, CompleteCheckpointCallback
from visiontune.training.finetune import _clean_output_dir

FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


def checkpoint(out: Path, step: int, marked: bool = True) -> Path:
    """``checkpoint-<step>`` as the Trainer writes it, marked complete by the callback."""
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in FILES:
        (folder / name).write_text(f"{name} {step}")
    if marked:
        CompleteCheckpointCallback().on_save(
            SimpleNamespace(output_dir=str(out)),
            SimpleNamespace(global_step=step, epoch=step / 4, is_world_process_zero=True), None)
    return folder


def metrics_log(out: Path, steps) -> Path:
    path = out / METRICS_LOG
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)
                    + '{"step": ')  # the line a kill tore
    return path


def test_the_marker_lists_every_file_of_the_checkpoint(tmp_path):
    folder = checkpoint(tmp_path, 3)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["global_step"] == 3 and sorted(marker["files"]) == sorted(FILES)


def test_resume_takes_the_newest_complete_checkpoint_and_removes_the_others(tmp_path):
    kept = [checkpoint(tmp_path, 2), checkpoint(tmp_path, 4)]
    unmarked = checkpoint(tmp_path, 6, marked=False)  # killed while the Trainer was saving
    gone_file = checkpoint(tmp_path, 8)  # marked, then a file lost (e.g. a partial copy)
    (gone_file / "optimizer.pt").unlink()
    assert _clean_output_dir(tmp_path, resume=True) == kept[1]
    assert not unmarked.exists() and not gone_file.exists()
    assert all(folder.is_dir() for folder in kept)


def test_resume_keeps_the_metrics_lines_up_to_the_checkpoint_once(tmp_path):
    checkpoint(tmp_path, 4)
    log = metrics_log(tmp_path, range(1, 7))
    assert _clean_output_dir(tmp_path, resume=True) == tmp_path / "checkpoint-4"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_without_a_complete_checkpoint_starts_over(tmp_path):
    checkpoint(tmp_path, 2, marked=False)
    log = metrics_log(tmp_path, range(1, 3))
    assert _clean_output_dir(tmp_path, resume=True) is None
    assert not (tmp_path / "checkpoint-2").exists()
    assert log.read_text() == ""  # every step is trained again


def test_without_resume_an_earlier_run_s_checkpoints_and_log_are_removed(tmp_path):
    checkpoint(tmp_path, 2)
    log = metrics_log(tmp_path, range(1, 3))
    assert _clean_output_dir(tmp_path, resume=False) is None
    assert not (tmp_path / "checkpoint-2").exists() and not log.exists()
