"""The documented size limits, each at, below and above its boundary, in every form that reaches
it: a served model's ``max_image_bytes`` (base64 text of every padding, wrapped lines, a data:
URL, raw bytes, a local path, a URL with and without a declared length) and
``max_images_per_request``, and the data layer's per-image byte limit (``--max_image_mb``) for
files and downloads. Everything in process; the real server is tests/serving/test_serving.py."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from tests.serving.test_serving import LABELS, scoring_model  # noqa: F401 (a fixture)
from tests.serving.test_serving import _predict as predict
from tests.serving.test_serving import _refused as refused
from visiontune.data import files as data_files
from visiontune.data import images as data_images
from visiontune.errors import DataError


def png_with_size_mod3(residue: int) -> bytes:
    """A small PNG whose length leaves ``residue`` when divided by 3 (so its base64 ends with
    no, two or one '='); trailing bytes after the PNG's end are ignored by decoders."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(residue).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data + b"\0" * ((residue - len(data)) % 3)


def expected_probs(model, data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return model.classifier.probabilities([image.convert("RGB")])


class _Files(http.server.BaseHTTPRequestHandler):
    """GET /declared/NAME sends a Content-Length; GET /streamed/NAME does not (the body ends
    when the connection closes), so that both of the download's checks are reached."""

    files: dict[str, bytes] = {}
    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802 - http.server API
        kind, _, name = self.path.strip("/").partition("/")
        body = self.files.get(name)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if kind == "declared":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web():
    """(base URL, files served by name)."""
    files: dict[str, bytes] = {}
    handler = type("Handler", (_Files,), {"files": files})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# Serving: max_image_bytes
# ---------------------------------------------------------------------------------------------
def _encoded_forms(data: bytes, tmp_path, base: str, files: dict) -> dict:
    path = tmp_path / f"image-{len(data)}.png"
    path.write_bytes(data)
    files[path.name] = data
    text = base64.b64encode(data).decode()
    return {
        "base64": (text, {}),
        "base64, wrapped lines": (base64.encodebytes(data).decode(), {}),
        "base64, URL-safe": (base64.urlsafe_b64encode(data).decode(), {}),
        "data: URL": (f"data:image/png;base64,{text}", {}),
        "raw bytes": (data, {}),
        "local path": (str(path), {"allow_local_paths": True}),
        "file:// URI": (path.as_uri(), {"allow_local_paths": True}),
        "URL, declared length": (f"{base}/declared/{path.name}", {"allow_urls": True}),
        "URL, streamed": (f"{base}/streamed/{path.name}", {"allow_urls": True}),
    }


@pytest.mark.parametrize("residue", [0, 1, 2], ids=["no-padding", "two-pad", "one-pad"])
def test_max_image_bytes_below_at_and_over_the_limit_in_every_form(scoring_model, residue, tmp_path, web):
    base, files = web
    data = png_with_size_mod3(residue)
    size = len(data)
    assert size % 3 == residue
    want = expected_probs(scoring_model, data)
    for name, (value, allowed) in _encoded_forms(data, tmp_path, base, files).items():
        for limit in (size + 1, size):
            answer = predict(scoring_model, [value], max_image_bytes=limit, **allowed)
            np.testing.assert_allclose(np.array(answer["probs"].tolist()), want, atol=1e-6,
                                       err_msg=f"{name}, limit {limit}")
        message = refused(scoring_model, [value], max_image_bytes=size - 1, **allowed)
        assert "row 0: image is" in message and "(max_image_bytes)" in message, (name, message)
        assert f"over the limit of {size - 1:,} bytes per image" in message, (name, message)


def test_max_image_bytes_is_checked_for_every_row_of_a_request(scoring_model):
    small, large = png_with_size_mod3(0), png_with_size_mod3(0) + b"\0" * 3
    values = [base64.b64encode(d).decode() for d in (small, large, small)]
    message = refused(scoring_model, values, max_image_bytes=len(small))
    assert message.startswith("1 of 3 image(s) cannot be used: row 1: image is"), message
    assert len(predict(scoring_model, values, max_image_bytes=len(large))) == 3


# ---------------------------------------------------------------------------------------------
# Serving: max_images_per_request
# ---------------------------------------------------------------------------------------------
def test_max_images_per_request_below_at_and_over_the_limit(scoring_model):
    value = base64.b64encode(png_with_size_mod3(0)).decode()
    for count in (2, 3):
        answer = predict(scoring_model, [value] * count, max_images_per_request=3)
        assert len(answer) == count and answer["labels"].tolist() == [LABELS] * count
    assert refused(scoring_model, [value] * 4, max_images_per_request=3) == (
        "the request holds 4 images, over the limit of 3 per request (max_images_per_request); "
        "split it into smaller requests")
    assert len(predict(scoring_model, [value], max_images_per_request=1)) == 1
    assert "holds 2 images" in refused(scoring_model, [value] * 2, max_images_per_request=1)


# ---------------------------------------------------------------------------------------------
# Data layer: the per-image byte limit of --max_image_mb, for files and downloads
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def download_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("where", ["path", "file-uri", "declared", "streamed"])
def test_data_byte_limit_below_at_and_over(where, tmp_path, web, download_cache, monkeypatch):
    base, files = web
    data = png_with_size_mod3(1)
    size = len(data)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    files["image.png"] = data
    uri = {"path": str(path), "file-uri": path.as_uri(), "declared": f"{base}/declared/image.png",
           "streamed": f"{base}/streamed/image.png"}[where]
    # over first: a refused download is not cached, so the later reads download again
    for limit in (size - 1, 1):
        with pytest.raises(DataError, match="image too large"):
            data_images.read_image_bytes(uri, max_bytes=limit)
    for limit in (size, size + 1):
        assert data_images.read_image_bytes(uri, max_bytes=limit) == data
    # the limit of the max_image_mb input, as commands set it (a cached download included)
    monkeypatch.setitem(data_files._max_file, "bytes", size)
    assert data_images.read_image_bytes(uri) == data
    monkeypatch.setitem(data_files._max_file, "bytes", size - 1)
    with pytest.raises(DataError, match="image too large"):
        data_images.read_image_bytes(uri)


def test_data_byte_limit_makes_a_bad_row_not_a_crash(tmp_path, monkeypatch):
    from visiontune.data.prepare import check_images

    data = png_with_size_mod3(2)
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data + b"\0")
    records = [type("R", (), {"image": str(tmp_path / n)})() for n in ("a.png", "b.png")]
    monkeypatch.setitem(data_files._max_file, "bytes", len(data))
    results = check_images(records)
    assert results[str(tmp_path / "a.png")] == (24, 20)
    assert "image too large" in results[str(tmp_path / "b.png")]
