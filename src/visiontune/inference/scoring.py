"""Scoring images with a fine-tuned model, as evaluation and prediction both do: opening the
model folder with the runtime asked for, and scoring image files in batches with a progress
report."""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from visiontune.data.images import load_image
from visiontune.errors import DataError, UserError
from visiontune.inference.classifier import Classifier, ClassifierBase, model_folder
from visiontune.inference.onnx_runtime import find_export, onnxruntime_available, open_onnx_classifier
from visiontune.tasks import MULTILABEL

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "pytorch", "onnxruntime")


def open_model(path: str | Path, runtime: str = "auto") -> ClassifierBase:
    """The classifier of a fine-tuned PyTorch output folder or MLflow model folder.

    ``runtime`` auto: ONNX Runtime when the model has an ONNX export (``find_export``; it
    passed the parity check against PyTorch when it was written), onnxruntime is installed and
    there is no GPU (faster than PyTorch on the CPU: BENCHMARKS.md, *Results*). Otherwise
    PyTorch."""
    import torch

    if runtime not in RUNTIMES:
        raise UserError(f"--runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
    model_dir = model_folder(path)
    export = find_export(path)
    if runtime == "onnxruntime":
        if export is None:
            raise UserError(f"--runtime onnxruntime: {path} has no ONNX export; fine-tune with "
                            f"--apply_ort true, or run visiontune export-onnx --model {path} "
                            f"--output_dir {Path(path) / 'onnx'}")
        if not onnxruntime_available():
            raise UserError('--runtime onnxruntime: onnxruntime is not installed; '
                            'pip install "visiontune[onnx]"')
    use_ort = runtime == "onnxruntime" or (
        runtime == "auto" and export is not None and onnxruntime_available()
        and not torch.cuda.is_available())
    try:
        if use_ort:
            log.info("scoring with ONNX Runtime (%s)", export)
            return open_onnx_classifier(export, model_dir)
        return Classifier(model_dir)
    except (OSError, ValueError, KeyError) as exc:  # the ONNX export (Classifier says its own)
        raise UserError(f"--model: cannot load the model in {export if use_ort else model_dir}: "
                        f"{exc}") from None


class Progress:
    """A tqdm bar on a terminal; in logs (Azure, CI) a plain line about every tenth."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
        self.step = max(1, -(-total // 10))
        self.next_line = self.step

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.done >= self.next_line or self.done == self.total:
            print(f"{self.desc}: {self.done}/{self.total} images", file=sys.stderr, flush=True)
            while self.next_line <= self.done:
                self.next_line += self.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _preprocessed(classifier: ClassifierBase, uri: str):
    """Read, decode and preprocess one image (in a loading thread: Pillow and torch release
    the GIL); (tensor, None), or (None, why) when the image cannot be used."""
    try:
        return classifier.preprocess(load_image(uri)), None
    except (DataError, OSError, ValueError) as exc:
        return None, str(exc)


def score_images(
    classifier: ClassifierBase, uris: Sequence[str], batch_size: int = 32, desc: str = "predict",
) -> tuple[np.ndarray, dict[int, str]]:
    """Logits for each image (a NaN row where it could not be read) and the read errors by
    position. Threads read, decode and preprocess the next batch while the model runs on the
    current one."""
    import torch

    logits = np.full((len(uris), len(classifier.classes)), np.nan, dtype=np.float64)
    errors: dict[int, str] = {}
    starts = range(0, len(uris), batch_size)
    progress = Progress(len(uris), desc)
    workers = min(16, (os.cpu_count() or 1) * 2, max(1, batch_size))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def submit(start: int):
                return [pool.submit(_preprocessed, classifier, u) for u in uris[start:start + batch_size]]

            pending = submit(starts[0]) if starts else []
            for i, start in enumerate(starts):
                loaded = [f.result() for f in pending]
                pending = submit(starts[i + 1]) if i + 1 < len(starts) else []
                items, positions = [], []
                for offset, (item, error) in enumerate(loaded):
                    if error is None:
                        items.append(item)
                        positions.append(start + offset)
                    else:
                        errors[start + offset] = error
                if items:
                    logits[positions] = classifier.batch_logits(torch.stack(items))
                progress.update(len(loaded))
    finally:
        progress.close()
    return logits, errors


def predicted(classifier: Classifier, probs: np.ndarray) -> str | list[str]:
    """The predicted label (multi-class) or labels at or above the stored threshold(s)."""
    if classifier.task == MULTILABEL:
        return classifier.labels_above_threshold(probs)
    return classifier.classes[int(np.argmax(probs))]
