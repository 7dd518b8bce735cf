"""A fine-tuned model ready to predict: shared by evaluation, prediction and serving.

It preprocesses with the evaluation transform saved with the model, the same one used on the
validation data during training, so the three cannot drift apart. ``ClassifierBase`` is what
every backend shares; ``Classifier`` runs the PyTorch model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from visiontune.errors import UserError
from visiontune.metrics import probabilities
from visiontune.model_folder import ModelFolder
from visiontune.tasks import MULTILABEL, TASKS, task_of

MODEL_EXPECTED = "expected the finetune output_dir_pytorch or output_dir_mlflow folder"


def model_folder(model: str | Path) -> Path:
    """The Hugging Face folder of the ``--model`` input (a finetune PyTorch output folder, or an
    MLflow model folder); one-line UserErrors for anything else."""
    return ModelFolder.open(model, "--model", MODEL_EXPECTED).path


def check_threshold(value: Any, num_classes: int) -> np.ndarray:
    """The saved multi-label threshold as an array: a scalar (one for all classes, 0.5 when
    unset) or one value per class, in class order."""
    try:
        threshold = np.asarray(0.5 if value is None else value, dtype=np.float64)
    except (TypeError, ValueError):
        threshold = np.zeros((0, 0))  # reported below
    if threshold.ndim > 1 or (threshold.ndim == 1 and threshold.shape[0] != num_classes):
        raise ValueError(
            f"multilabel_threshold must be a number or a list of {num_classes} numbers (one per "
            f"class), got {value!r}"
        )
    if not np.all((threshold >= 0) & (threshold <= 1)):
        raise ValueError(f"multilabel_threshold values must lie in [0, 1], got {value!r}")
    return threshold


class ClassifierBase:
    """What every backend shares: classes, task, the saved evaluation preprocessing, the
    threshold(s), batching and the scoring schema. Backends implement ``logits``."""

    def __init__(self, model_dir: Path, classes: list[str], task: str, preprocessing,
                 threshold: Any):
        from visiontune.data import transforms  # loads torch: when a model is opened

        self.model_dir = model_dir
        self.classes = classes
        self.task = task
        self.preprocessing = preprocessing
        try:
            self.threshold = check_threshold(threshold, len(classes))
        except ValueError as exc:
            raise UserError(f"--model: {model_dir}: the saved {exc}") from None
        self.transform = transforms.eval_transform(preprocessing)
        self.to_tensor = transforms.hwc_tensor

    def batch_logits(self, batch) -> np.ndarray:
        """Logits of one preprocessed batch (N x C x H x W float tensor); backends implement it."""
        raise NotImplementedError

    def preprocess(self, image):
        """One PIL image -> its normalised CHW tensor, by the saved evaluation transform.
        Thread-safe, so callers may preprocess the next batch while the model runs."""
        return self.transform(self.to_tensor(image))

    def tensors(self, images: Sequence[Any]):
        """PIL images -> one normalised batch tensor."""
        import torch

        return torch.stack([self.preprocess(img) for img in images])

    def logits(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        batch_size = max(1, int(batch_size))
        out = [self.batch_logits(self.tensors(images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def probabilities(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        return probabilities(self.logits(images, batch_size), self.task)

    def describe(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """Azure's image scoring schema: every class's probability and name, plus the prediction."""
        rows = []
        for p in probs:
            row: dict[str, Any] = {"probs": [float(x) for x in p], "labels": list(self.classes)}
            if self.task == MULTILABEL:
                row["predicted_labels"] = self.labels_above_threshold(p)
            else:
                row["predicted_label"] = self.classes[int(np.argmax(p))]
            rows.append(row)
        return rows

    def labels_above_threshold(self, probs: np.ndarray) -> list[str]:
        """Multi-label prediction for one image: the classes at or above their threshold."""
        thresholds = np.broadcast_to(self.threshold, probs.shape)
        return [c for c, x, t in zip(self.classes, probs, thresholds) if x >= t]


class Classifier(ClassifierBase):
    """A fine-tuned PyTorch model folder (or an MLflow model folder written by visiontune)."""

    def __init__(self, model_dir: str | Path, device: str | None = None):
        import torch

        from visiontune.data.transforms import Preprocessing, resolve_preprocessing

        folder = ModelFolder.within(model_dir) or ModelFolder(Path(model_dir))
        meta = folder.metadata()
        folder = folder.path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from visiontune.models.loading import (
            accept_any_image_size, load_float32_classifier, prefer_channels_last,
        )

        if meta.get("preprocessing"):
            preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        else:
            from transformers import AutoImageProcessor

            preprocessing = resolve_preprocessing(AutoImageProcessor.from_pretrained(str(folder)))
        loaded = load_float32_classifier(folder, "--model")
        self.model = accept_any_image_size(prefer_channels_last(loaded.to(self.device).eval()),
                                           (preprocessing.height, preprocessing.width))
        config = self.model.config
        task = meta.get("model_metadata", {}).get("finetuning_task")
        if task not in TASKS:
            task = task_of(config.problem_type)
        super().__init__(folder, [config.id2label[i] for i in range(config.num_labels)], task,
                         preprocessing, meta.get("multilabel_threshold"))

    def batch_logits(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(pixel_values=batch.to(self.device)).logits.float().cpu().numpy()
