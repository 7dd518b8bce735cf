"""``apply_ort``: ONNX Runtime for the fine-tuned model's inference (training stays in PyTorch).

Before training, ``check_apply_ort`` checks the packages and says in one line what the input
does here. After it, ``export_and_validate`` exports the model to ``onnx/`` in the PyTorch
output folder and scores the validation set again with ONNX Runtime, reporting its metrics and
its largest difference from PyTorch's probabilities.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from visiontune.errors import DataError, UserError
from visiontune.inference import OnnxClassifier, score_images
from visiontune.inference.onnx_runtime import ONNX_SUBDIR, require_packages
from visiontune.metrics import compute_metrics, probabilities
from visiontune.onnx_export import export_onnx
from visiontune.ranks import is_main_process
from visiontune.training.arguments import ort_training_available

log = logging.getLogger(__name__)

ONNX_EVAL_FILE = "eval_results.json"
PARITY_TOLERANCE = 1e-4  # largest |ORT - PyTorch| probability accepted without a warning


def check_apply_ort() -> None:
    """Before training: the packages, then one line saying what apply_ort does here."""
    require_packages(("onnx", "onnxscript", "onnxruntime"), "apply_ort")
    if not is_main_process():
        return
    what = ("training runs in PyTorch; ONNX Runtime is used for inference: the fine-tuned model "
            f"is exported to ONNX ({ONNX_SUBDIR}/ in output_dir_pytorch), the validation set is "
            "scored again with ONNX Runtime, and the MLflow model (when saved) serves with it")
    if ort_training_available():
        log.warning("apply_ort: visiontune does not train with ONNX Runtime, so %s", what)
    else:
        log.warning("apply_ort: ONNX Runtime training is unavailable with this torch (%s), so %s",
                    torch.__version__.split("+")[0], what)


def export_and_validate(model_dir: str | Path, records, label_ids: np.ndarray,
                        pytorch_logits: np.ndarray, *, batch_size: int = 32,
                        mixed_precision: bool = False,
                        tolerance: float = PARITY_TOLERANCE) -> Path:
    """Export the fine-tuned model in ``model_dir`` to ``model_dir/onnx``, then repeat the final
    validation evaluation with ONNX Runtime: its metrics, and the largest probability difference
    from PyTorch's (``pytorch_logits``, same records, same order), go to
    ``onnx/eval_results.json``. Returns the ONNX folder."""
    model_dir = Path(model_dir)
    onnx_dir = model_dir / ONNX_SUBDIR
    try:
        export_onnx(model_dir, onnx_dir)
    except UserError as exc:
        raise UserError(f"apply_ort: training finished and the PyTorch model is in {model_dir}, "
                        f"but the ONNX export failed: {exc}") from None
    classifier = OnnxClassifier(onnx_dir)
    logits, errors = score_images(classifier, [r.image for r in records], batch_size,
                                  "validation (ONNX Runtime)")
    if errors:  # the images were read during training, so only a file changed meanwhile
        first = min(errors)
        raise DataError(f"apply_ort: {records[first].where}: {errors[first]}")
    ort_probs = probabilities(logits, classifier.task)
    torch_probs = probabilities(np.asarray(pytorch_logits, dtype=np.float32), classifier.task)
    diff = float(np.max(np.abs(ort_probs - torch_probs))) if ort_probs.size else 0.0
    metrics = compute_metrics(logits, np.asarray(label_ids), classifier.task,
                              threshold=classifier.threshold, class_names=classifier.classes)
    report = {
        "backend": "onnxruntime",
        "number_of_images": len(records),
        "parity": {"max_abs_probability_difference": diff, "tolerance": tolerance,
                   "compared_with": "the PyTorch probabilities of the final validation evaluation",
                   "pytorch_mixed_precision": mixed_precision},
        "metrics": metrics,
    }
    (onnx_dir / ONNX_EVAL_FILE).write_text(json.dumps(report, indent=2, default=float) + "\n",
                                           encoding="utf-8")
    scalars = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    if diff > tolerance:
        why = (" (the PyTorch evaluation ran in mixed precision, ONNX Runtime in float32)"
               if mixed_precision else "")
        log.warning("ONNX Runtime probabilities differ from PyTorch's by up to %.3g on the %d "
                    "validation images, above %g%s", diff, len(records), tolerance, why)
    else:
        log.info("ONNX Runtime matches PyTorch on the %d validation images (largest probability "
                 "difference %.3g)", len(records), diff)
    log.info("validation metrics with ONNX Runtime: %s", scalars)
    return onnx_dir
