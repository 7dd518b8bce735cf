"""A classifier that scores with ONNX Runtime, and the names of the export it reads (the
files, the graph's input and output, where a model keeps its export); ``visiontune.onnx_export``
writes the export and describes it.

``OnnxClassifier`` is a ``ClassifierBase`` whose logits come from ONNX Runtime: it preprocesses
with the same code (the saved eval transform, ``ClassifierBase.tensors``), so both score the
same pixels.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from visiontune.errors import UserError
from visiontune.inference.classifier import ClassifierBase, check_threshold
from visiontune.model_folder import ModelFolder

ONNX_FILE = "model.onnx"
EXPORT_METADATA_FILE = "visiontune_onnx.json"
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
ONNX_SUBDIR = "onnx"  # the export inside a PyTorch output folder (finetune --apply_ort true)
INSTALL_HINT = 'pip install "visiontune[onnx]"'


def require_packages(modules: Sequence[str], what: str) -> None:
    """A one-line UserError naming the modules of the ``onnx`` extra that ``what`` lacks."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)} (not installed): {INSTALL_HINT}")


class OnnxClassifier(ClassifierBase):
    """An exported folder, run by ONNX Runtime: on the GPU when this onnxruntime has CUDA
    (onnxruntime-gpu) and the machine has one, else on the CPU (``hardware.onnx_providers``).

    Only loading and ``logits`` differ: preprocessing (``tensors`` with the saved eval
    transform), probabilities and the scoring schema are the PyTorch classifier's own code, so
    the two cannot drift apart. There is no torch model: ``model`` and ``device`` are absent."""

    def __init__(self, onnx_dir: str | Path):
        require_packages(("onnxruntime",), "OnnxClassifier")
        import onnxruntime as ort

        from visiontune.data.transforms import Preprocessing

        path = Path(onnx_dir)
        folder = path.parent if path.suffix == ".onnx" else path
        meta_path = folder / EXPORT_METADATA_FILE
        if not meta_path.is_file():
            raise UserError(f"{folder} is not an ONNX export of visiontune (no {EXPORT_METADATA_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        super().__init__(folder, list(meta["classes"]), meta["task"],
                         Preprocessing.from_dict(meta["preprocessing"]), meta.get("multilabel_threshold"))
        from visiontune.hardware import gpu_kind, onnx_providers

        self.session = ort.InferenceSession(str(folder / meta.get("model_file", ONNX_FILE)),
                                            providers=onnx_providers(ort.get_available_providers(),
                                                                     gpu_kind()))

    def batch_logits(self, batch) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]


def open_onnx_classifier(onnx_dir: str | Path, model_dir: str | Path | None = None) -> OnnxClassifier:
    """ONNX Runtime scoring of an export; the multi-label threshold stays the model folder's
    (``model_dir``), which ``visiontune evaluate --tune_thresholds`` updates in place."""
    classifier = OnnxClassifier(onnx_dir)
    if not model_dir:
        return classifier
    classifier.model_dir = Path(model_dir)  # where evaluate writes tuned thresholds back
    meta = ModelFolder(classifier.model_dir).metadata()
    if "multilabel_threshold" in meta:
        classifier.threshold = check_threshold(meta["multilabel_threshold"], len(classifier.classes))
    return classifier


def find_export(model: str | Path) -> Path | None:
    """The ONNX export that belongs to a fine-tuned model, if it has one: ``onnx/`` in the
    PyTorch output folder (finetune --apply_ort true, or export-onnx into it), or
    ``artifacts/onnx`` in an MLflow model folder written with it."""
    path = Path(str(model)).expanduser()
    for candidate in (path / ONNX_SUBDIR, path / "artifacts" / ONNX_SUBDIR):
        if (candidate / EXPORT_METADATA_FILE).is_file():
            return candidate
    return None


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None
