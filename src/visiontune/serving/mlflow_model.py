"""The MLflow model: a pyfunc that takes a DataFrame column ``image`` and returns, per image,
``probs`` and ``labels`` (Azure's image scoring schema) and the predicted label(s).

The visiontune package travels inside the model (``code_paths``), so the model loads in a fresh
process with only its pip requirements installed, and preprocesses exactly as evaluation does.

A request is scored as one batch, decoded in memory (no temporary files). A cell that cannot be
used (not base64, not an image, empty, too large, a URL or path the model may not read) fails
the whole request with an ``MlflowException(INVALID_PARAMETER_VALUE)``: MLflow's scoring server
answers it with HTTP 400 and the message, and goes on serving. Any other exception would become
a 400 with a generic message and a traceback for the client, so none is let through.

Decoded pixels are limited as well as encoded bytes (a few KB of PNG can hold 80 million
pixels): each image's size is read from its header, and the request is refused before any
image is decoded when one image, or all of them together, hold too many.

MLflow's server parses the JSON body before the model sees it, and answers a body nested deeper
than Python's recursion limit, or holding an integer too long to convert, with a bare HTTP 500;
loading this model wraps that parser so that those get the 400 other unparsable JSON gets,
and a request without a Content-Type or with an unreadable Parquet body a 4xx without a
traceback (``_answer_bad_requests_with_400``). MLflow reads the whole body whatever its size: put a
body-size limit in front of a public server.

The limits and permissions are the pyfunc's ``model_config`` (stored in ``MLmodel``): set them
when saving, or override them when loading (``mlflow.pyfunc.load_model(path, model_config=...)``)
or serving (``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"allow_urls": true}' mlflow models serve ...``).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from PIL import Image

import visiontune
from visiontune.data.images import MAX_PIXELS
from visiontune.errors import UserError
from visiontune.inference import Classifier, open_onnx_classifier
from visiontune.inference.onnx_runtime import EXPORT_METADATA_FILE, ONNX_FILE
from visiontune.model_card import write_model_card
from visiontune.model_folder import CONFIG_FILE, METADATA_FILE, ModelFolder
from visiontune.outputs import MLFLOW_WRITER, check_folder, is_visiontune_mlflow_model, staged
from visiontune.serving.payload import (
    DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PIXELS_PER_REQUEST, PayloadError,
    decode_payload_bytes, payload_bytes, payload_pixels,
)
from visiontune.tasks import MULTILABEL

try:  # its request parsing is wrapped (``_answer_bad_requests_with_400``)
    from mlflow.pyfunc import scoring_server
except ImportError:  # an MLflow whose internals differ: its own answers stand
    scoring_server = None

log = logging.getLogger(__name__)

# What a served model needs; versions pinned to what trained it (written at save time).
_REQUIREMENTS = ("torch", "torchvision", "transformers", "timm", "safetensors", "pillow", "numpy",
                 "pandas", "mlflow")
_ONNX_REQUIREMENTS = ("onnxruntime",)  # preprocessing still runs on torch/torchvision
MODEL_FILES = (CONFIG_FILE, "model.safetensors", "preprocessor_config.json", METADATA_FILE)
IMAGE_COLUMN = "image"
DEFAULT_MAX_IMAGES = 256
ERRORS_SHOWN = 5
DECODE_THREADS = 8
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")  # the model's code (models-from-code)


@dataclass(frozen=True)
class ServingConfig:
    """What a request may contain. Stored as the pyfunc's ``model_config``.

    ``max_image_pixels`` and ``max_pixels_per_request`` bound the decoded size (width x height,
    from each image's header) of one image and of all images of a request; the first cannot
    exceed the decompression-bomb limit that every decode applies.
    ``batch_size`` 0 scores each request as one batch (at most ``max_images_per_request``
    images); a positive value caps the images per forward pass, to bound memory."""

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_images_per_request: int = DEFAULT_MAX_IMAGES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_pixels_per_request: int = DEFAULT_MAX_PIXELS_PER_REQUEST
    allow_urls: bool = False
    allow_local_paths: bool = False
    batch_size: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ServingConfig":
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown serving setting(s): {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        config = cls(**values)
        for name in ("allow_urls", "allow_local_paths"):
            if not isinstance(getattr(config, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(config, name)!r}")
        for name, low in (("max_image_bytes", 1), ("max_images_per_request", 1),
                          ("max_image_pixels", 1), ("max_pixels_per_request", 1), ("batch_size", 0)):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        if config.max_image_pixels > MAX_PIXELS:
            raise ValueError(f"max_image_pixels must be at most {MAX_PIXELS:,} (the decompression-"
                             f"bomb limit), got {config.max_image_pixels!r}")
        return config


def _bad_request(message: str):
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.config = ServingConfig.from_dict(getattr(context, "model_config", None))
        _answer_bad_requests_with_400()
        artifacts = context.artifacts
        if "onnx" in artifacts:
            self.classifier = open_onnx_classifier(artifacts["onnx"], artifacts.get("model"))
        else:
            self.classifier = Classifier(artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        values = _image_column(model_input)
        config = getattr(self, "config", None) or ServingConfig()
        if not values:
            raise _bad_request(f"the request holds no images: send one or more rows in the "
                               f"'{IMAGE_COLUMN}' column")
        if len(values) > config.max_images_per_request:
            raise _bad_request(f"the request holds {len(values)} images, over the limit of "
                               f"{config.max_images_per_request} per request "
                               "(max_images_per_request); split it into smaller requests")
        images = _decode_all(values, config)
        batch = config.batch_size or len(images)
        probs = self.classifier.probabilities(images, batch_size=batch)
        return pd.DataFrame(self.classifier.describe(probs))


def _image_column(model_input) -> list[Any]:
    """The cells of the ``image`` column; a 400 for input that is not such a table."""
    if isinstance(model_input, (list, tuple, pd.Series)) and all(
            isinstance(v, (str, bytes)) for v in model_input):
        return list(model_input)  # in-process use: a plain list of images
    try:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    except Exception as exc:  # pandas refuses ragged, nested or scalar input in many ways
        raise _bad_request(f"the input must be a table with a column named '{IMAGE_COLUMN}' "
                           f"(base64-encoded image bytes); got {type(model_input).__name__} that "
                           f"is not one ({type(exc).__name__})") from None
    if IMAGE_COLUMN not in frame.columns:
        raise _bad_request(f"the input needs a column named '{IMAGE_COLUMN}' (base64-encoded image "
                           f"bytes); got columns {[str(c) for c in frame.columns][:ERRORS_SHOWN]}")
    return frame[IMAGE_COLUMN].tolist()


def _in_threads(function, values: list[Any]) -> list[Any]:
    """``function`` over ``values``, in threads when there are several (Pillow and downloads
    release the GIL)."""
    if len(values) == 1:
        return [function(values[0])]
    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, len(values))) as pool:
        return list(pool.map(function, values))


def _refuse_failed_rows(results: list[tuple[Any, str | None]]) -> list[Any]:
    """The values of ``(value, error)`` pairs, or one 400 naming the rows that failed."""
    errors = [(row, error) for row, (_, error) in enumerate(results) if error is not None]
    if errors:
        shown = "; ".join(f"row {row}: {error}" for row, error in errors[:ERRORS_SHOWN])
        more = f"; and {len(errors) - ERRORS_SHOWN} more" if len(errors) > ERRORS_SHOWN else ""
        raise _bad_request(f"{len(errors)} of {len(results)} image(s) cannot be used: {shown}{more}")
    return [value for value, _ in results]


def _decode_all(values: list[Any], config: ServingConfig) -> list[Any]:
    """Every image of the request, or one 400 naming the rows that cannot be used. Decoding
    starts only once every image's bytes are at hand and their pixels (from the headers) are
    within both limits, so that no request decodes more than ``max_pixels_per_request``."""
    def read(value):
        try:
            data = payload_bytes(value, allow_paths=config.allow_local_paths,
                                 allow_urls=config.allow_urls, max_bytes=config.max_image_bytes)
            return (data, payload_pixels(data, config.max_image_pixels)), None
        except PayloadError as exc:
            return None, str(exc)

    def decode(data):
        try:
            return decode_payload_bytes(data), None
        except PayloadError as exc:
            return None, str(exc)

    encoded = _refuse_failed_rows(_in_threads(read, values))
    pixels = sum(count for _, count in encoded)
    if pixels > config.max_pixels_per_request:
        raise _bad_request(f"the request's {len(values)} image(s) hold {pixels:,} pixels together, "
                           f"over the limit of {config.max_pixels_per_request:,} per request "
                           "(max_pixels_per_request); send smaller images or fewer per request")
    return _refuse_failed_rows(_in_threads(decode, [data for data, _ in encoded]))


def _answer_bad_requests_with_400() -> None:
    """MLflow's scoring server reads the request before the model sees it, and answers some
    malformed requests with a bare 500 or with its own traceback: JSON nested deeper than
    Python's recursion limit (RecursionError) or holding an integer too long to convert
    (ValueError), a request without a Content-Type, a body that is not the Parquet its
    Content-Type says. Wrap those steps once so that each is a 4xx with one message; where
    MLflow's internals differ, nothing is changed and MLflow's own answers stand."""
    if scoring_server is None:
        return

    def wrap(name: str, make):
        original = getattr(scoring_server, name, None)
        if callable(original) and not getattr(original, "_visiontune_wrapped", False):
            wrapped = functools.wraps(original)(make(original))
            wrapped._visiontune_wrapped = True
            setattr(scoring_server, name, wrapped)

    def json_or_400(parse):
        def parse_or_400(*args, **kwargs):
            try:
                return parse(*args, **kwargs)
            except RecursionError:
                raise MlflowException("Invalid input: the JSON is nested too deeply to be read",
                                      error_code=BAD_REQUEST) from None
            except ValueError as exc:  # the JSON syntax errors MLflow already turns into a 400
                raise MlflowException(f"Invalid input: the JSON cannot be read ({exc})",
                                      error_code=BAD_REQUEST) from None
        return parse_or_400

    def parquet_or_400(parse):
        def parse_or_400(parquet_input):
            try:
                return pd.read_parquet(parquet_input)
            except Exception as exc:  # noqa: BLE001 - any unreadable body is the client's error
                raise MlflowException(f"Invalid input: the body is not a Parquet table "
                                      f"({type(exc).__name__})", error_code=BAD_REQUEST) from None
        return parse_or_400

    def content_type_or_415(invocations):
        def invocations_or_415(data, content_type, *args, **kwargs):
            if not (content_type or "").strip():
                return scoring_server.InvocationsResponse(
                    response=json.dumps({"error_code": "BAD_REQUEST", "message":
                                         "the request needs a Content-Type: application/json, "
                                         "text/csv or application/vnd.apache.parquet"}),
                    status=415, mimetype="application/json")
            return invocations(data, content_type, *args, **kwargs)
        return invocations_or_415

    wrap("_decode_json_input", json_or_400)
    wrap("parse_parquet_input", parquet_or_400)
    wrap("invocations", content_type_or_415)


def _requirements(names) -> list[str]:
    reqs = []
    for name in names:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def _stage_onnx(onnx_dir: Path, target: Path) -> None:
    meta_path = onnx_dir / EXPORT_METADATA_FILE
    if not meta_path.is_file():
        raise UserError(f"{onnx_dir} is not an ONNX export of visiontune (no {EXPORT_METADATA_FILE})")
    model_file = json.loads(meta_path.read_text(encoding="utf-8")).get("model_file", ONNX_FILE)
    target.mkdir()
    for name in (model_file, model_file + ".data", EXPORT_METADATA_FILE):
        if (onnx_dir / name).exists():
            shutil.copy2(onnx_dir / name, target / name)


def _input_example():
    """One small PNG, base64-encoded, in the ``image`` column: what MLflow and Azure's test
    tab show as a sample request."""
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)),
                       np.full((32, 32), 128, np.uint8)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def _signature(task: str | None):
    """The request and answer schemas: one base64 image per row in; per image, every class's
    probability and name and the predicted label (multi-label: the labels over threshold)."""
    predicted = (ColSpec(Array(DataType.string), "predicted_labels") if task == MULTILABEL
                 else ColSpec(DataType.string, "predicted_label"))
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(Array(DataType.double), "probs"),
                        ColSpec(Array(DataType.string), "labels"), predicted]))


def _relative_paths_only(folder: Path) -> None:
    """MLflow records where the model's code and artifacts were copied from (this machine's
    package and a temporary folder); loading reads only the copies inside the model, so
    ``MLmodel`` keeps their names and no path of the machine that wrote it."""
    mlmodel = Model.load(str(folder / "MLmodel"))
    pyfunc = mlmodel.flavors["python_function"]
    for artifact in pyfunc.get("artifacts", {}).values():
        artifact.pop("uri", None)
    pyfunc["model_code_path"] = Path(pyfunc["model_code_path"]).name
    mlmodel.save(str(folder / "MLmodel"))


def save_mlflow_model(model_dir: str | Path, output_dir: str | Path, *,
                      onnx_dir: str | Path | None = None, allow_urls: bool = False,
                      allow_local_paths: bool = False,
                      max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                      max_images_per_request: int = DEFAULT_MAX_IMAGES,
                      max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                      max_pixels_per_request: int = DEFAULT_MAX_PIXELS_PER_REQUEST,
                      batch_size: int = 0) -> Path:
    """Write the MLflow model for a fine-tuned model folder (checkpoints are left out).

    The model is MLflow's models-from-code (``pyfunc_entry.py``; no pickle), with the request
    and answer signature, an input example and the metadata Azure's scoring reads.
    ``onnx_dir``: an ``export_onnx`` folder of the same model; the pyfunc then scores with ONNX
    Runtime. The other keywords are the ServingConfig stored with the model."""
    config = ServingConfig.from_dict({
        "max_image_bytes": max_image_bytes, "max_images_per_request": max_images_per_request,
        "max_image_pixels": max_image_pixels, "max_pixels_per_request": max_pixels_per_request,
        "allow_urls": allow_urls, "allow_local_paths": allow_local_paths, "batch_size": batch_size,
    })
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    meta = ModelFolder(model_dir).metadata()
    task = meta.get("model_metadata", {}).get("finetuning_task")
    # Never a folder visiontune did not write; the folder itself is kept (it may be a mount
    # point) and filled in place, MLmodel last.
    check_folder(output_dir, "output_dir_mlflow", replaceable=is_visiontune_mlflow_model, create=False)
    with tempfile.TemporaryDirectory(prefix="visiontune-mlflow-") as tmp, \
            staged(output_dir, complete_marker="MLmodel") as staging:
        staged_model = Path(tmp) / "model"
        staged_model.mkdir()
        for name in MODEL_FILES:
            if (model_dir / name).exists():
                shutil.copy2(model_dir / name, staged_model / name)
        artifacts = {"model": str(staged_model)}
        requirements = _REQUIREMENTS
        if onnx_dir is not None:
            _stage_onnx(Path(onnx_dir), Path(tmp) / "onnx")
            artifacts["onnx"] = str(Path(tmp) / "onnx")
            requirements = _REQUIREMENTS + _ONNX_REQUIREMENTS
        saved = staging / "mlflow"  # save_model wants a new folder
        mlflow.pyfunc.save_model(
            path=str(saved),
            python_model=str(ENTRY_FILE),
            artifacts=artifacts,
            code_paths=[str(Path(visiontune.__file__).parent)],
            pip_requirements=_requirements(requirements),
            signature=_signature(task),
            input_example=_input_example(),
            model_config=asdict(config),
            metadata={
                "task": task,
                "finetuning_task": task,
                "base_model_name": meta.get("model_metadata", {}).get("base_model_name"),
                "is_finetuned_model": True,
                "inference_backend": "onnxruntime" if onnx_dir is not None else "pytorch",
                "written_by": MLFLOW_WRITER,
            },
        )
        _relative_paths_only(saved)
        write_model_card(saved, model_dir=model_dir, mlflow_model=True, location=output_dir)
        for entry in saved.iterdir():
            entry.rename(staging / entry.name)
        saved.rmdir()
    return output_dir
