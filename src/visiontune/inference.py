"""A fine-tuned model ready to predict: shared by evaluation, prediction and serving.

It preprocesses with the evaluation transform saved with the model, the same one used on the
validation data during training, so the three cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from visiontune.model_folder import read_metadata
from visiontune.tasks import MULTICLASS, MULTILABEL, TASKS, task_of  # noqa: F401 (re-exported)

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


def model_folder(model: str | Path) -> Path:
    """The Hugging Face folder of the ``--model`` input (a finetune PyTorch output folder, or an
    MLflow model folder); one-line UserErrors for anything else."""
    from visiontune.errors import UserError

    path = Path(str(model)).expanduser()
    if not path.exists():
        raise UserError(f"--model: folder not found: {model}")
    if not path.is_dir():
        raise UserError(f"--model: {model} is a file; expected a model folder")
    try:
        folder = resolve_model_dir(path)
    except FileNotFoundError as exc:
        raise UserError(f"--model: {exc}") from None
    if not (folder / "config.json").is_file():
        raise UserError(f"--model: no model in {model} (no config.json nor MLmodel); expected the "
                        "finetune output_dir_pytorch or output_dir_mlflow folder")
    return folder


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
        from visiontune.data.transforms import eval_transform

        self.model_dir = model_dir
        self.classes = classes
        self.task = task
        self.preprocessing = preprocessing
        try:
            self.threshold = check_threshold(threshold, len(classes))
        except ValueError as exc:
            from visiontune.errors import UserError

            raise UserError(f"--model: {model_dir}: the saved {exc}") from None
        self.transform = eval_transform(preprocessing)

    def batch_logits(self, batch) -> np.ndarray:
        """Logits of one preprocessed batch (N x C x H x W float tensor); backends implement it."""
        raise NotImplementedError

    def preprocess(self, image):
        """One PIL image -> its normalised CHW tensor, by the saved evaluation transform.
        Thread-safe, so callers may preprocess the next batch while the model runs."""
        from visiontune.data.images import hwc_tensor

        return self.transform(hwc_tensor(image))

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

        from visiontune.data.transforms import Preprocessing, resolve_preprocessing

        folder = resolve_model_dir(model_dir)
        meta = read_metadata(folder)
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


# ---------------------------------------------------------------------------------------------
# Scoring requests: one cell of the ``image`` column -> an RGB image, decoded in memory
# ---------------------------------------------------------------------------------------------
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Decoded pixels, which the encoded size does not bound: a few KB of PNG can hold 80 million.
# One image: an 8192 x 8192 image, more than any common camera takes. One request: four such
# images, under a gigabyte as 8-bit RGB.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
DEFAULT_MAX_PIXELS_PER_REQUEST = 4 * DEFAULT_MAX_IMAGE_PIXELS
URL_TIMEOUT_S = 30.0  # per network operation
URL_DEADLINE_S = 60.0  # a whole download: a server sending a trickle cannot stall a request


class PayloadError(ValueError):
    """A request cell that cannot be used; the message says why, for the client."""


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n:,} bytes"


def _too_large(n: int, limit: int) -> PayloadError:
    return PayloadError(f"image is {_size(n)}, over the limit of {_size(limit)} per image "
                        "(max_image_bytes)")


def _looks_like_path(text: str) -> bool:
    """Only for the error message: base64 never holds '.', '\\', '~' or ':'."""
    return text.startswith(("/", "~", ".")) or any(c in text for c in ".\\:")


def _fetch_url(url: str, max_bytes: int) -> bytes:
    """Download into memory (never to disk), reading at most ``max_bytes`` + 1 bytes; each
    network operation times out, and so does the whole download."""
    from visiontune.data.images import ImageTooLarge, download
    from visiontune.errors import DataError

    try:
        return download(url, max_bytes, timeout=URL_TIMEOUT_S, deadline_s=URL_DEADLINE_S)
    except ImageTooLarge as exc:
        raise _too_large(exc.size if exc.size is not None else max_bytes + 1, max_bytes) from None
    except DataError as exc:
        raise PayloadError(str(exc)) from None


def _read_path(text: str, max_bytes: int) -> bytes:
    """A server-local regular file (never a named pipe or device: they could block or never
    end), at most ``max_bytes``."""
    from visiontune.data.images import ImageTooLarge, read_local_file
    from visiontune.data.mltable import local_path
    from visiontune.errors import DataError

    try:
        return read_local_file(local_path(text, Path.cwd()), max_bytes)
    except ImageTooLarge as exc:
        raise _too_large(exc.size if exc.size is not None else max_bytes + 1, max_bytes) from None
    except DataError as exc:
        raise PayloadError(str(exc)) from None
    except FileNotFoundError:
        raise PayloadError(f"image file not found: {text}") from None
    except (OSError, ValueError) as exc:
        raise PayloadError(f"cannot read image file {text}: {exc}") from None


def payload_bytes(value: Any, *, allow_paths: bool = False, allow_urls: bool = False,
                  max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The encoded image bytes of one request cell.

    Accepted: base64 text (standard or URL-safe alphabet, line breaks allowed, optionally a
    ``data:...;base64,`` URL) and raw bytes; an http(s) URL only with ``allow_urls``; a local
    path or ``file://`` URI only with ``allow_paths``. The size limit is checked before
    decoding or downloading the whole image."""
    import base64
    import binascii
    import math

    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) > max_bytes:
            raise _too_large(len(data), max_bytes)
        return data
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise PayloadError("no image (null): send base64-encoded image bytes")
    if not isinstance(value, str):
        raise PayloadError(f"expected base64-encoded image bytes as text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise PayloadError("empty image value: send base64-encoded image bytes")
    head = text[:8].lower()
    if head.startswith(("http://", "https://")):
        if not allow_urls:
            raise PayloadError("image URLs are not fetched by this model (allow_urls is off); "
                               "send base64-encoded image bytes")
        return _fetch_url(text, max_bytes)
    if head.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header.lower():
            raise PayloadError("a data: URL must hold base64 (data:image/...;base64,...)")
    elif allow_paths and (head.startswith("file:") or (len(text) < 4096 and Path(text).is_file())):
        return _read_path(text, max_bytes)
    compact = "".join(text.split())  # encoders often wrap lines at 76 characters
    padding = len(compact) - len(compact.rstrip("="))
    if len(compact) * 3 // 4 - padding > max_bytes:
        raise _too_large(len(compact) * 3 // 4 - padding, max_bytes)
    urlsafe = "-" in compact or "_" in compact
    try:
        data = base64.b64decode(compact, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        if _looks_like_path(text) and not allow_paths:
            raise PayloadError("image is not valid base64; local file paths are not read by this "
                               "model (allow_local_paths is off)") from None
        raise PayloadError("image is not valid base64") from None
    if not data:
        raise PayloadError("empty image value: send base64-encoded image bytes")
    return data


def payload_pixels(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> int:
    """The pixels (width x height) of encoded image bytes, read from the image's header before
    any pixel is decoded; PayloadError over ``max_pixels``. 0 when Pillow does not recognise
    the bytes: decoding them then says why."""
    import io

    from PIL import Image

    from visiontune.data.images import MAX_PIXELS, refuse_bombs

    refuse_bombs()  # Pillow's own check on opening then raises instead of warning
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadError(f"image is over {Image.MAX_IMAGE_PIXELS or MAX_PIXELS:,} pixels, over "
                           f"the limit of {max_pixels:,} pixels per image (max_image_pixels)") from None
    except Exception:
        return 0
    if width * height > max_pixels:
        raise PayloadError(f"image is {width}x{height} = {width * height:,} pixels, over the limit "
                           f"of {max_pixels:,} pixels per image (max_image_pixels)")
    return width * height


def decode_payload_bytes(data: bytes):
    """Encoded image bytes of a request as an 8-bit RGB PIL image, decoded like training and
    evaluation decode files (EXIF orientation, modes, bomb check)."""
    from visiontune.data.images import decode_image
    from visiontune.errors import DataError

    try:
        return decode_image(data, where="image")
    except DataError as exc:
        raise PayloadError(str(exc)) from None


def decode_payload_image(value: Any, *, allow_paths: bool = False, allow_urls: bool = False,
                         max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                         max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """One cell of a scoring request as an 8-bit RGB PIL image (see ``payload_bytes``); its
    pixels are checked against ``max_pixels`` before it is decoded."""
    data = payload_bytes(value, allow_paths=allow_paths, allow_urls=allow_urls, max_bytes=max_bytes)
    payload_pixels(data, max_pixels)
    return decode_payload_bytes(data)
