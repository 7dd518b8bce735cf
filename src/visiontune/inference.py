"""A fine-tuned model ready to predict: shared by evaluation, prediction and serving.

It preprocesses with the evaluation transform saved with the model, the same one used on the
validation data during training, so the three cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

MULTILABEL = "image-classification-multilabel"
MULTICLASS = "image-classification"
METADATA_FILE = "model_selector_args.json"
MLMODEL_FILE = "MLmodel"
MLFLOW_MODEL_SUBDIR = Path("artifacts") / "model"


def resolve_model_dir(model_dir: str | Path) -> Path:
    """The Hugging Face model folder of a fine-tuned model: the folder itself, or
    ``artifacts/model`` of an MLflow model folder (the one holding ``MLmodel``)."""
    folder = Path(model_dir)
    if (folder / MLMODEL_FILE).is_file():
        inner = folder / MLFLOW_MODEL_SUBDIR
        if not (inner / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} is an MLflow model folder, but {inner} holds no model (config.json); "
                "it was not written by visiontune"
            )
        return inner
    return folder


def check_threshold(value: Any, num_classes: int) -> np.ndarray:
    """The saved multi-label threshold as an array: a scalar (one for all classes, 0.5 when
    unset) or one value per class, in class order."""
    threshold = np.asarray(0.5 if value is None else value, dtype=np.float64)
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
        from visiontune.data.transforms import eval_transform

        self.model_dir = model_dir
        self.classes = classes
        self.task = task
        self.preprocessing = preprocessing
        self.threshold = check_threshold(threshold, len(classes))
        self.transform = eval_transform(preprocessing)

    def logits(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        raise NotImplementedError

    def _batched(self, images: Sequence[Any], batch_size: int, run) -> np.ndarray:
        out = [run(self.tensors(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def tensors(self, images: Sequence[Any]):
        """PIL images -> one normalised batch tensor."""
        import torch

        from visiontune.data.images import to_uint8_tensor

        return torch.stack([self.transform(to_uint8_tensor(img)) for img in images])

    def probabilities(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        from visiontune.metrics import probabilities

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
        from transformers import AutoModelForImageClassification

        from visiontune.data.transforms import Preprocessing, resolve_preprocessing

        folder = resolve_model_dir(model_dir)
        meta_path = folder / METADATA_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForImageClassification.from_pretrained(str(folder)).to(self.device).eval()
        config = self.model.config
        task = meta.get("model_metadata", {}).get("finetuning_task")
        if task not in (MULTICLASS, MULTILABEL):
            task = MULTILABEL if config.problem_type == "multi_label_classification" else MULTICLASS
        if meta.get("preprocessing"):
            preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        else:
            from transformers import AutoImageProcessor

            preprocessing = resolve_preprocessing(AutoImageProcessor.from_pretrained(str(folder)))
        super().__init__(folder, [config.id2label[i] for i in range(config.num_labels)], task,
                         preprocessing, meta.get("multilabel_threshold"))

    def logits(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        import torch

        def run(batch):
            return self.model(pixel_values=batch.to(self.device)).logits.float().cpu().numpy()

        with torch.inference_mode():
            return self._batched(images, batch_size, run)


def decode_payload_image(value: Any, allow_paths: bool = True):
    """One cell of a scoring request: base64 text (optionally a data: URL), raw bytes or a path."""
    from visiontune.data.images import decode_image, load_image

    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value), where="request image")
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty image value: send base64-encoded image bytes")
    text = value.strip()
    if allow_paths and len(text) < 4096 and Path(text).is_file():
        return load_image(text)
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64 (nor a local file path)") from None
    return decode_image(data, where="request image")
