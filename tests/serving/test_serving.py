"""The MLflow model behind a real ``mlflow models serve`` on 127.0.0.1: the payload forms MLflow
accepts, answers equal to in-process predictions, and a 400 with a clear message for every bad
payload, after which the server goes on serving. Two servers for the module, started together:
a multi-class PyTorch model with small limits, and a multi-label ONNX Runtime model with
``allow_urls`` turned on at serve time."""

import base64
import http.server
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers import free_port
from tests.tiny_models import random_images, save_tiny_model
from visiontune.inference import Classifier
from visiontune.model_folder import ModelFolder
from visiontune.serving.mlflow_model import ImageClassifierModel, ServingConfig, save_mlflow_model
from visiontune.serving.payload import (
    DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PIXELS_PER_REQUEST, PayloadError, decode_payload_image,
    payload_bytes,
)
from visiontune.tasks import MULTICLASS, MULTILABEL

LABELS = ["cat", "dog", "fox"]
PREPROCESSING = {"height": 32, "width": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                 "interpolation": "bilinear"}
MAX_BYTES, MAX_IMAGES = 100_000, 8
READY_TIMEOUT_S = 180  # a hang detector, not a speed check


def finetuned(kind, task, path, threshold=None):
    save_tiny_model(kind, path, num_labels=len(LABELS), image_size=32, labels=LABELS)
    ModelFolder(path).write_metadata({
        "model_metadata": {"finetuning_task": task, "id2label": dict(enumerate(LABELS)),
                           "is_finetuned_model": True},
        "preprocessing": PREPROCESSING, "multilabel_threshold": threshold,
    })
    return path


def png_bytes(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def split(values, columns=("image",)):
    return {"dataframe_split": {"columns": list(columns), "data": [[v] for v in values]}}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` and that holds no pixel data: refused by
    its size before decoding, or else by decoding as truncated."""
    data = bytearray(png_bytes(Image.new("1", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def png_81_megapixels():
    """A real, fully decodable 9000 x 9000 bilevel PNG of about 10 KB."""
    data = png_bytes(Image.new("1", (9000, 9000)))
    assert len(data) < 20_000
    return data


class Server:
    """``mlflow models serve`` of ``python``'s environment (this one by default)."""

    def __init__(self, model_dir: Path, log: Path, env_extra=None, python: str = sys.executable):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(env_extra or {})
        self.log = log
        self.proc = subprocess.Popen(
            [python, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def ping(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=5) as r:
                return r.status
        except (urllib.error.URLError, OSError):
            return 0

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if self.ping() == 200:
                return
            time.sleep(0.5)
        pytest.fail(f"the server did not answer /ping in {READY_TIMEOUT_S} s:\n"
                    f"{self.log.read_text()[-3000:]}")

    def post(self, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + "/invocations", data=data,
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(multi-class server, its model folder), (multi-label ONNX server, its model folder)."""
    pytest.importorskip("onnxruntime")
    from visiontune.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("serving")
    mc = finetuned("vit", MULTICLASS, root / "mc")
    save_mlflow_model(mc, root / "mc-mlflow", max_image_bytes=MAX_BYTES,
                      max_images_per_request=MAX_IMAGES)
    ml = finetuned("convnext", MULTILABEL, root / "ml", threshold=[0.3, 0.5, 0.7])
    export_onnx(ml, root / "ml-onnx")
    save_mlflow_model(ml, root / "ml-mlflow", onnx_dir=root / "ml-onnx")
    servers = []
    try:
        servers.append(Server(root / "mc-mlflow", root / "mc.log"))
        servers.append(Server(root / "ml-mlflow", root / "ml.log",
                              {"MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"allow_urls": True})}))
        for server in servers:  # each its own time: two start together on 2 cores
            server.wait_ready(time.monotonic() + READY_TIMEOUT_S)
        yield (servers[0], mc), (servers[1], ml)
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def images():
    """Three small PNGs and one JPEG, as PIL images and as their encoded bytes."""
    pil = random_images(3, seed=3) + random_images(1, size=52, seed=4)
    encoded = [png_bytes(im) for im in pil[:3]] + [png_bytes(pil[3], "JPEG")]
    decoded = [decode_payload_image(b64(data)) for data in encoded]  # JPEG: as the server sees it
    return encoded, decoded


def expected_rows(model_dir, decoded):
    classifier = Classifier(model_dir, device="cpu")
    return classifier, classifier.probabilities(decoded)


def check_answer(answer, model_dir, decoded):
    classifier, probs = expected_rows(model_dir, decoded)
    rows = answer["predictions"]
    assert len(rows) == len(decoded)
    np.testing.assert_allclose(np.array([r["probs"] for r in rows]), probs, atol=1e-5)
    assert all(r["labels"] == LABELS for r in rows)
    if classifier.task == MULTILABEL:
        assert [r["predicted_labels"] for r in rows] == [
            classifier.labels_above_threshold(p) for p in probs]
    else:
        assert [r["predicted_label"] for r in rows] == [LABELS[i] for i in probs.argmax(axis=1)]


def forms(values):
    return {
        "dataframe_split": (split(values), "application/json"),
        "dataframe_split, flat data": ({"dataframe_split": {"columns": ["image"], "data": values}},
                                       "application/json"),
        "dataframe_records": ({"dataframe_records": [{"image": v} for v in values]}, "application/json"),
        "inputs, column dict": ({"inputs": {"image": values}}, "application/json"),
        "inputs, list of strings": ({"inputs": values}, "application/json"),
        "instances, records": ({"instances": [{"image": v} for v in values]}, "application/json"),
        "instances, list of strings": ({"instances": values}, "application/json"),
        "csv": (("image\n" + "\n".join(values) + "\n").encode(), "text/csv"),
    }


def test_every_payload_form_scores_the_request_like_the_classifier(served, images):
    (server, model_dir), _ = served
    encoded, decoded = images
    values = [b64(d) for d in encoded]
    for name, (body, content_type) in forms(values).items():
        status, answer = server.post(body, content_type)
        assert status == 200, (name, answer)
        check_answer(answer, model_dir, decoded)


def test_multilabel_onnx_server_fetches_urls_when_allowed(served, images, tmp_path):
    _, (server, model_dir) = served
    encoded, decoded = images
    (tmp_path / "a.png").write_bytes(encoded[0])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{web.server_address[1]}"
        status, answer = server.post(split([f"{base}/a.png", b64(encoded[1])]))
        assert status == 200, answer
        check_answer(answer, model_dir, decoded[:2])
        assert "predicted_labels" in answer["predictions"][0]

        status, answer = server.post(split([f"{base}/missing.png"]))
        assert status == 400 and "HTTP 404" in answer["message"]
    finally:
        web.shutdown()
        web.server_close()
    assert server.ping() == 200


def _bad_cases(values, png_81mp):
    good = values[0]
    too_large = b64(b"\xff" * (MAX_BYTES + 1))
    request_pixels = 5 * 8000 * 7000  # each image within the per-image limit, together over
    nested = b"[" * 100_000 + b"]" * 100_000  # deeper than Python's recursion limit
    long_int = b'{"dataframe_split": {"columns": ["image"], "data": [[' + b"7" * 5000 + b"]]}}"
    return {
        "81 megapixels in a tiny png": (
            split([b64(png_81mp)]),
            f"row 0: image is 9000x9000 = 81,000,000 pixels, over the limit of "
            f"{DEFAULT_MAX_IMAGE_PIXELS:,} pixels per image (max_image_pixels)"),
        "too many pixels in the request": (
            split([b64(png_header(8000, 7000))] * 5),
            f"the request's 5 image(s) hold {request_pixels:,} pixels together, over the limit "
            f"of {DEFAULT_MAX_PIXELS_PER_REQUEST:,} per request (max_pixels_per_request)"),
        "json nested too deeply": (nested, "the JSON is nested too deeply to be read"),
        "json integer too long": (long_int, "the JSON cannot be read"),
        "oversized json": (split([b64(b"\xff" * 6_000_000)]),
                           f"over the limit of {MAX_BYTES:,} bytes per image"),
        "not base64": (split(["%%% not base64 %%%"]), "row 0: image is not valid base64"),
        "not an image": (split([b64(b"just some text, no picture")]), "row 0: image: not an image file"),
        "empty string": (split([""]), "row 0: empty image value"),
        "null": (split([None]), "row 0: no image (null)"),
        "second row bad": (split([good, "@@@@"]), "1 of 2 image(s) cannot be used: row 1:"),
        "missing column": (split([good], columns=["picture"]), "missing inputs ['image']"),
        "no rows": (split([]), "the request holds no images"),
        "too large": (split([too_large]), f"over the limit of {MAX_BYTES:,} bytes per image"),
        "too many": (split([good] * (MAX_IMAGES + 1)),
                     f"holds {MAX_IMAGES + 1} images, over the limit of {MAX_IMAGES} per request"),
        "url not allowed": (split(["https://example.com/cat.png"]),
                            "image URLs are not fetched by this model (allow_urls is off)"),
        "local path": (split([str(Path(__file__).resolve())]),
                       "local file paths are not read by this model (allow_local_paths is off)"),
        "azure input_data": ({"input_data": {"columns": ["image"], "data": [[good]]}},
                             "exactly one of the input fields"),
    }


def test_bad_payloads_get_400_with_the_reason_and_the_server_goes_on(served, images,
                                                                   png_81_megapixels):
    (server, model_dir), _ = served
    encoded, decoded = images
    values = [b64(d) for d in encoded]
    for name, (body, wanted) in _bad_cases(values, png_81_megapixels).items():
        status, answer = server.post(body)
        assert status == 400, (name, status, answer)
        assert wanted in answer.get("message", ""), (name, answer)
        assert "Traceback" not in json.dumps(answer), name
        assert server.ping() == 200, name
        status, answer = server.post(split(values[:1]))
        assert status == 200, (name, answer)
        check_answer(answer, model_dir, decoded[:1])


# ---------------------------------------------------------------------------------------------
# In process
# ---------------------------------------------------------------------------------------------
def test_a_request_is_one_batch_and_the_cap_splits_it(served, images, monkeypatch):
    (_, model_dir), _ = served
    encoded, _ = images
    model = ImageClassifierModel()
    model.classifier = Classifier(model_dir, device="cpu")
    seen = []
    original = model.classifier.logits

    def spy(batch_images, batch_size=32):
        seen.append(batch_size)
        return original(batch_images, batch_size)

    monkeypatch.setattr(model.classifier, "logits", spy)
    frame = pd.DataFrame({"image": [b64(d) for d in encoded]})
    model.config = ServingConfig()
    whole = model.predict(None, frame)
    model.config = ServingConfig(batch_size=3)
    capped = model.predict(None, frame)
    assert seen == [len(encoded), 3]
    np.testing.assert_allclose(np.array(capped["probs"].tolist()),
                               np.array(whole["probs"].tolist()), atol=1e-6)


def test_model_config_is_stored_and_overridable_at_load(served, images, tmp_path):
    import mlflow.pyfunc
    import yaml

    (_, model_dir), _ = served
    encoded, decoded = images
    mlflow_dir = save_mlflow_model(model_dir, tmp_path / "m")
    mlmodel = yaml.safe_load((mlflow_dir / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["config"] == {
        "max_image_bytes": 20 * 1024 * 1024, "max_images_per_request": 256,
        "max_image_pixels": 8192 * 8192, "max_pixels_per_request": 4 * 8192 * 8192,
        "allow_urls": False, "allow_local_paths": False, "batch_size": 0}
    assert mlmodel["metadata"]["inference_backend"] == "pytorch"
    assert mlmodel["metadata"]["is_finetuned_model"] is True

    path = tmp_path / "cat.png"
    path.write_bytes(encoded[0])
    frame = pd.DataFrame({"image": [str(path)]})
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="allow_local_paths is off"):
        mlflow.pyfunc.load_model(str(mlflow_dir)).predict(frame)
    allowed = mlflow.pyfunc.load_model(str(mlflow_dir), model_config={"allow_local_paths": True})
    got = allowed.predict(frame)
    np.testing.assert_allclose(np.array(got["probs"].tolist()),
                               expected_rows(model_dir, decoded[:1])[1], atol=1e-5)


def test_serving_config_is_checked():
    with pytest.raises(ValueError, match="max_image_bytes must be an integer >= 1"):
        ServingConfig.from_dict({"max_image_bytes": 0})
    with pytest.raises(ValueError, match="allow_urls must be true or false"):
        ServingConfig.from_dict({"allow_urls": "yes"})
    with pytest.raises(ValueError, match="unknown serving setting"):
        ServingConfig.from_dict({"max_bytes": 1})
    with pytest.raises(ValueError, match="max_image_pixels must be an integer >= 1"):
        ServingConfig.from_dict({"max_image_pixels": 0})
    with pytest.raises(ValueError, match="max_pixels_per_request must be an integer >= 1"):
        ServingConfig.from_dict({"max_pixels_per_request": "many"})
    with pytest.raises(ValueError, match="max_image_pixels must be at most 89,478,485"):
        ServingConfig.from_dict({"max_image_pixels": 89_478_486})
    assert ServingConfig.from_dict({"max_image_pixels": 89_478_485}).max_image_pixels == 89_478_485


def test_payload_forms_decode_from_memory(images):
    encoded, _ = images
    data = encoded[0]
    text = base64.b64encode(data).decode()
    wrapped = base64.encodebytes(data).decode()  # line breaks every 76 characters
    assert payload_bytes(wrapped) == data
    assert payload_bytes(f"data:image/png;base64,{text}") == data
    assert payload_bytes(base64.urlsafe_b64encode(data).decode()) == data
    assert payload_bytes(data) == data
    with pytest.raises(PayloadError, match="over the limit of 10 bytes"):
        payload_bytes(text, max_bytes=10)
    with pytest.raises(PayloadError, match="data: URL must hold base64"):
        payload_bytes("data:text/plain,hello")
    with pytest.raises(PayloadError, match="allow_urls is off"):
        payload_bytes("HTTP://example.com/a.png")
    with pytest.raises(PayloadError, match="allow_local_paths is off"):
        payload_bytes("file:///etc/hostname")


# ---------------------------------------------------------------------------------------------
# Pixel limits and unreadable requests, in process
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scoring_model(tmp_path_factory):
    """An ImageClassifierModel over a tiny multi-class model, without a server."""
    model = ImageClassifierModel()
    model.classifier = Classifier(finetuned("vit", MULTICLASS, tmp_path_factory.mktemp("px") / "mc"),
                                  device="cpu")
    return model


def _predict(model, values, **config):
    model.config = ServingConfig(**config)
    return model.predict(None, pd.DataFrame({"image": values}))


def _refused(model, values, **config) -> str:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as caught:
        _predict(model, values, **config)
    assert caught.value.get_http_status_code() == 400
    return caught.value.message


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding any image fails the test: the limits must refuse a request before it."""
    def fail(data):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr("visiontune.serving.mlflow_model.decode_payload_bytes", fail)


def test_pixels_per_image_below_at_and_over_the_limit(scoring_model, images):
    encoded, decoded = images
    value = b64(encoded[0])  # 48 x 40 = 1,920 pixels
    for limit in (1921, 1920):
        answer = _predict(scoring_model, [value], max_image_pixels=limit)
        np.testing.assert_allclose(np.array(answer["probs"].tolist()),
                                   scoring_model.classifier.probabilities(decoded[:1]), atol=1e-6)
    assert _refused(scoring_model, [value], max_image_pixels=1919) == (
        "1 of 1 image(s) cannot be used: row 0: image is 48x40 = 1,920 pixels, over the limit of "
        "1,919 pixels per image (max_image_pixels)")


def test_pixels_per_request_below_at_and_over_the_limit(scoring_model, images):
    encoded, _ = images
    values = [b64(d) for d in encoded[:3]]  # 3 x 1,920 pixels
    for limit in (5761, 5760):
        assert len(_predict(scoring_model, values, max_pixels_per_request=limit)) == 3
    assert _refused(scoring_model, values, max_pixels_per_request=5759) == (
        "the request's 3 image(s) hold 5,760 pixels together, over the limit of 5,759 per "
        "request (max_pixels_per_request); send smaller images or fewer per request")


def test_the_limits_refuse_before_any_image_is_decoded(scoring_model, images, png_81_megapixels,
                                                       no_decoding):
    encoded, _ = images
    message = _refused(scoring_model, [b64(encoded[0]), b64(png_81_megapixels)])
    assert message == ("1 of 2 image(s) cannot be used: row 1: image is 9000x9000 = 81,000,000 "
                       f"pixels, over the limit of {DEFAULT_MAX_IMAGE_PIXELS:,} pixels per image "
                       "(max_image_pixels)")
    many = [b64(png_header(8192, 8192))] * 4 + [b64(encoded[0])]  # one image over, 1,920 pixels
    assert "hold 268,437,376 pixels together" in _refused(scoring_model, many)
    # Over Pillow's own decompression-bomb limit: refused from the header too.
    assert "over the limit of 67,108,864 pixels per image" in _refused(
        scoring_model, [b64(png_header(20_000, 20_000))])


def test_nested_and_malformed_input_to_predict_is_a_400(scoring_model, images):
    encoded, _ = images
    good = b64(encoded[0])
    deep = good
    for _ in range(5000):
        deep = [deep]
    model = scoring_model
    model.config = ServingConfig()
    cases = {
        "nested cell": (pd.DataFrame({"image": [[[[good]]]]}), "got list"),
        "deeply nested cell": (pd.DataFrame({"image": [deep]}), "got list"),
        "deeply nested input": (deep, "needs a column named 'image'"),
        "object cell": (pd.DataFrame({"image": [{"a": {"b": good}}]}), "got dict"),
        "ragged columns": ({"image": [good], "other": [1, 2]}, "must be a table"),
        "a bare string": ("not a table", "must be a table"),
    }
    from mlflow.exceptions import MlflowException

    for name, (value, wanted) in cases.items():
        with pytest.raises(MlflowException) as caught:
            model.predict(None, value)
        assert caught.value.get_http_status_code() == 400, name
        assert wanted in caught.value.message, (name, caught.value.message)
    assert len(model.predict(None, pd.DataFrame({"image": [good]}))) == 1


def test_loading_the_model_makes_unreadable_json_a_400(served):
    """MLflow's server parses the body before the model sees it; loading the model wraps that
    parser (what the real server answers is in test_bad_payloads_get_400_...)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    (_, model_dir), _ = served
    mlflow.pyfunc.load_model(str(model_dir.parent / "mc-mlflow"))
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"inputs": [' + b"7" * 5000 + b"]}"):
        with pytest.raises(MlflowException) as caught:
            scoring_server._decode_json_input(body)
        assert caught.value.get_http_status_code() == 400
    assert scoring_server._decode_json_input(b'{"inputs": ["x"]}') == {"inputs": ["x"]}

