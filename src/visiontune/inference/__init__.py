"""A fine-tuned model ready to predict, for evaluation, prediction, serving and the ONNX export.

- ``classifier``: the PyTorch classifier and what every backend shares (``ClassifierBase``),
  the model folder of a ``--model`` input, the saved multi-label threshold's check.
- ``onnx_runtime``: the classifier of an ONNX export, run by ONNX Runtime; the export's layout
  and where a model keeps its export.
- ``scoring``: opening a model with the runtime asked for, and scoring image files in batches
  with a progress report.

Importing this package loads neither torch nor onnxruntime: they load when a model does.
"""

from visiontune.inference.classifier import (
    Classifier, ClassifierBase, check_threshold, model_folder,
)
from visiontune.inference.onnx_runtime import (
    OnnxClassifier, find_export, onnxruntime_available, open_onnx_classifier,
)
from visiontune.inference.scoring import RUNTIMES, Progress, open_model, predicted, score_images

__all__ = [
    "Classifier", "ClassifierBase", "OnnxClassifier", "Progress", "RUNTIMES", "check_threshold",
    "find_export", "model_folder", "onnxruntime_available", "open_model", "open_onnx_classifier",
    "predicted", "score_images",
]
