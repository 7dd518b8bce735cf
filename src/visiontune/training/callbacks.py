"""Trainer callbacks: complete-checkpoint markers, the dataset's epoch, the frozen heap, the
metrics log, plain progress lines."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from visiontune import settings
from visiontune.outputs import write_json_atomic
from visiontune.training import distributed

log = logging.getLogger("visiontune.training")

COMPLETE_MARKER = "visiontune_complete.json"
METRICS_LOG = "metrics.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CompleteCheckpointCallback(TrainerCallback):
    """Mark a checkpoint complete only after the Trainer has written all of it.

    The Trainer writes a checkpoint file by file; a crash part-way leaves a folder that its own
    ``get_last_checkpoint`` would pick. Resume here only trusts folders with this marker, which
    is written (atomically) after the last file, so a half checkpoint is never resumed from.
    In distributed runs every rank writes files of its own (its RNG state, DeepSpeed's optimizer
    partitions) after the Trainer's last barrier, so the ranks meet once more before the marker.
    """

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                files = sorted(p.name for p in folder.iterdir())
                write_json_atomic(folder / COMPLETE_MARKER, {"global_step": state.global_step,
                                                             "epoch": state.epoch, "files": files},
                                  sort_keys=True)
        return control


class DatasetEpochCallback(TrainerCallback):
    """Tells the training dataset which epoch begins (its per-item augmentation seeds use it),
    a resumed epoch included; accelerate's own ``set_epoch`` does not reach it under DDP."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is the epoch's index at its start, and index + fraction done on resume
        self.dataset.set_epoch(int((state.epoch or 0.0) + 1e-9))
        return control


class FrozenHeapCallback(TrainerCallback):
    """Moves the objects alive when training begins (the dataset's rows, the model's Python
    side) out of the garbage collector's reach until it ends, as Python's ``gc.freeze`` advises
    before a fork: the data-loader workers, forked at the first batch, then never walk the
    parent's objects in a full collection (which writes to each one and so copies every page
    of a large dataset's rows into each worker), and neither does the training process."""

    def on_train_begin(self, args, state, control, **kwargs):
        if settings.flag("VISIONTUNE_GC_FREEZE"):
            gc.collect()
            gc.freeze()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        gc.unfreeze()
        return control


def trim_metrics_log(path: Path, last_step: int) -> int:
    """Drop the lines of steps after ``last_step`` (trained again after a resume). Returns how
    many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            step = last_step + 1  # a torn line from a killed run
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped


class MetricsLogCallback(TrainerCallback):
    """Every log and evaluation as one JSON line, and a plain line on the console."""

    def __init__(self, path: Path, show_progress_lines: bool):
        self.path = Path(path)
        self.show = show_progress_lines
        self.started = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                  "elapsed_s": round(time.monotonic() - self.started, 2), **logs}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        if self.show:
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in logs.items() if not k.endswith(("_runtime", "_per_second", "flos"))
            )
            log.info("step %d/%d epoch %.2f: %s", state.global_step, state.max_steps,
                     state.epoch or 0.0, shown)
        return control


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = _CHECKPOINT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all((folder / name).exists() for name in marker.get("files", []))


def newest_complete_checkpoint(output_dir: Path) -> Path | None:
    for _, folder in reversed(list_checkpoints(output_dir)):
        if is_complete(folder):
            return folder
    return None


def remove_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    removed = []
    for _, folder in list_checkpoints(output_dir):
        if not is_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
