"""Image reading (local, file://, http(s) with cache, azureml) and decoding to 8-bit RGB."""

import http.server
import io
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.data import files, images
from visiontune.data.images import (
    decode_image, load_image, read_image_bytes, verify_image,
)
from visiontune.data.transforms import to_uint8_tensor
from visiontune.errors import DataError


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------
def test_grayscale_and_bilevel():
    gray = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8))
    assert pixels(decode_image(encode(gray)))[0].tolist() == [[0] * 3, [100] * 3, [255] * 3]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert pixels(decode_image(encode(bilevel)))[0].tolist() == [[0] * 3, [255] * 3]


def test_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    image = Image.fromarray(values)
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = pixels(decode_image(data))[0, :, 0]
    assert out.tolist() == [0, 128, 255, 4]  # 1000 / 257 = 3.9; clipping would give 255


def test_32_bit_int_and_float_modes():
    wide = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert pixels(images.to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    narrow = Image.fromarray(np.array([[0, 17, 255]], dtype=np.int32))
    assert pixels(images.to_rgb(narrow))[0, :, 0].tolist() == [0, 17, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert pixels(images.to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]


def test_palette_with_transparency_goes_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    data = encode(image, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert pixels(decode_image(data))[0].tolist() == [[255, 255, 255], [255, 0, 0]]
    opaque = encode(image)
    assert pixels(decode_image(opaque))[0].tolist() == [[0, 0, 0], [255, 0, 0]]


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 255, 0), (0, 0, 255, 255), (255, 0, 0, 128)])
    out = pixels(decode_image(encode(rgba)))[0]
    assert out[0].tolist() == [255, 255, 255]
    assert out[1].tolist() == [0, 0, 255]
    assert out[2, 0] == 255 and 125 <= out[2, 1] <= 129 and out[2, 1] == out[2, 2]
    la = Image.new("LA", (1, 1), (0, 0))
    assert pixels(decode_image(encode(la)))[0, 0].tolist() == [255, 255, 255]


def test_cmyk():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    assert pixels(decode_image(encode(cmyk, "TIFF")))[0, 0].tolist() == [255, 0, 0]
    out = pixels(decode_image(encode(cmyk, "JPEG", quality=95)))
    assert out[..., 0].min() > 240 and out[..., 1:].max() < 15


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    out = pixels(decode_image(data))
    assert out.shape == (40, 20, 3)
    top, bottom = out[5, 10], out[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_verify_image_reports_displayed_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "r.jpg"
    Image.new("RGB", (30, 10)).save(path, exif=exif.tobytes())
    assert verify_image(str(path)) == (10, 30)
    Image.new("RGB", (30, 10)).save(tmp_path / "n.png")
    assert verify_image(str(tmp_path / "n.png")) == (30, 10)


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------
def _png_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("1", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("size", [(10_000, 9_000), (20_000, 20_000)])
def test_decompression_bomb_is_refused(size, recwarn):
    with pytest.raises(DataError, match=r"bomb.png: image too large .*decompression bomb"):
        decode_image(_png_with_size(*size), where="bomb.png")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decompression_bomb_refused_even_when_pillow_limit_is_off(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(DataError, match="bomb.png: image too large"):
        decode_image(_png_with_size(10_000, 9_000), where="bomb.png")


def test_bad_files_name_the_image(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    png = encode(noise)
    jpg = encode(noise, "JPEG")
    with pytest.raises(DataError, match="x.png: empty file"):
        decode_image(b"", where="x.png")
    with pytest.raises(DataError, match="x.png: not an image file"):
        decode_image(b"hello, I am text", where="x.png")
    with pytest.raises(DataError, match="x.png: truncated or corrupt image"):
        decode_image(png[: len(png) // 2], where="x.png")
    with pytest.raises(DataError, match="x.jpg: truncated or corrupt image"):
        decode_image(jpg[: len(jpg) // 2], where="x.jpg")
    with pytest.raises(DataError, match=f"image not found: {tmp_path / 'missing.png'}"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(DataError, match="image path is a folder"):
        load_image(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Reading: local, file://, http(s), azureml
# ---------------------------------------------------------------------------------------------
def test_local_and_file_uri(tmp_path):
    path = tmp_path / "a b.png"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(path)
    assert read_image_bytes(str(path)) == path.read_bytes()
    assert read_image_bytes(path.as_uri()) == path.read_bytes()  # percent-encoded space
    assert load_image(path.as_uri()).size == (3, 2)


@pytest.fixture
def http_server():
    files = {"/a.png": encode(Image.new("RGB", (5, 4), (9, 8, 7)))}
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            hits.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files, hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_http_is_fetched_once_then_cached(http_server, tmp_path, monkeypatch):
    base, files, hits = http_server
    monkeypatch.setenv("VISIONTUNE_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{base}/a.png"
    assert read_image_bytes(url) == files["/a.png"]
    assert hits == ["/a.png"]
    image = load_image(url)  # second read: from the cache
    assert image.size == (5, 4) and image.getpixel((0, 0)) == (9, 8, 7)
    assert hits == ["/a.png"]
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and len(cached[0].name) == 64  # sha256 hex, no partial files left


def test_http_failure_is_clear(http_server, tmp_path, monkeypatch, refused_port):
    base, _, hits = http_server
    monkeypatch.setenv("VISIONTUNE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"cannot download .*/missing.png: HTTP 404"):
        read_image_bytes(f"{base}/missing.png")
    with pytest.raises(DataError, match="cannot download"):
        read_image_bytes(f"http://127.0.0.1:{refused_port}/x.png")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("VISIONTUNE_CACHE_DIR", raising=False)
    assert images.cache_dir() == Path.home() / ".cache" / "visiontune" / "images"


def test_azureml_needs_azureml_fsspec():
    try:
        import azureml.fsspec  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("azureml-fsspec is installed here")
    with pytest.raises(DataError, match="azureml-fsspec"):
        read_image_bytes("azureml://subscriptions/s/resourcegroups/r/workspaces/w/datastores/d/paths/a.jpg")


def test_to_uint8_tensor():
    image = Image.new("RGB", (3, 2), (10, 20, 30))
    image.putpixel((2, 1), (200, 100, 0))
    tensor = to_uint8_tensor(image)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 2, 3)
    assert tensor[:, 0, 0].tolist() == [10, 20, 30] and tensor[:, 1, 2].tolist() == [200, 100, 0]
    assert to_uint8_tensor(Image.new("L", (4, 5), 7)).shape == (3, 5, 4)


def test_urls_in_annotations_are_verified_and_cached(http_server, tmp_path, monkeypatch):
    import json

    from visiontune.data.prepare import prepare_data

    base, _, hits = http_server
    monkeypatch.setenv("VISIONTUNE_CACHE_DIR", str(tmp_path / "cache"))
    local = tmp_path / "b.png"
    Image.new("RGB", (6, 6)).save(local)
    rows = [{"image_url": f"{base}/a.png", "label": "a"}, {"image_url": "b.png", "label": "b"},
            {"image_url": f"{base}/gone.png", "label": "a"}]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"a\.jsonl:3: cannot download .*/gone.png: HTTP 404"):
        prepare_data(path, path, task="image-classification")
    data = prepare_data(path, path, task="image-classification", skip_bad_rows=True)
    assert [r.image for r in data.train] == [f"{base}/a.png", str(local)]
    assert data.image_sizes == {"min_width": 5, "max_width": 6, "min_height": 4, "max_height": 6}
    load_image(data.train[0].image)
    assert hits.count("/a.png") == 1  # verified once, then every read came from the cache


# ---------------------------------------------------------------------------------------------
# Bounded reads: regular files only, a size limit, downloads with a deadline
# ---------------------------------------------------------------------------------------------
def _read_within(uri: str, seconds: float = 10.0):
    """read_image_bytes in a thread, so that a read that blocks fails the test instead of
    hanging it, and with a small limit, so that one that never ends (a device) stops soon:
    the DataError it raised, or the bytes."""
    outcome = []

    def run():
        try:
            outcome.append(read_image_bytes(uri, max_bytes=1 << 20))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"reading {uri} did not return in {seconds} s"
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_only_regular_files_are_read(tmp_path):
    import socket

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        cases = {str(fifo): "a named pipe (FIFO)", "/dev/zero": "a character device",
                 str(sock_path): "a socket"}
        for uri, kind in cases.items():
            error = _read_within(uri)
            assert isinstance(error, DataError), (uri, error)
            assert str(error) == f"image path is {kind}, not a regular file: {uri}"
    assert str(_read_within(str(tmp_path))) == f"image path is a folder: {tmp_path}"
    with pytest.raises(DataError, match="named pipe"):
        verify_image(str(fifo))  # what data check and finetune call


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_path_replaced_by_a_fifo_after_its_check_is_refused_on_the_open_file(tmp_path, monkeypatch):
    """The path is checked, then opened without waiting for a writer and checked again: a
    FIFO put in its place in between is found on the open file, never read from."""
    regular = tmp_path / "a.png"
    regular.write_bytes(encode(Image.new("RGB", (2, 2))))
    fifo = tmp_path / "b.png"
    os.mkfifo(fifo)
    real_stat = os.stat

    def stat_sees_the_old_file(path, *args, **kwargs):
        return real_stat(regular if str(path) == str(fifo) else path, *args, **kwargs)

    monkeypatch.setattr(images.os, "stat", stat_sees_the_old_file)
    error = _read_within(str(fifo))
    assert isinstance(error, DataError) and "named pipe (FIFO)" in str(error)


def test_file_size_limit_at_and_over(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("RGB", (5, 4), (1, 2, 3))))
    size = path.stat().st_size
    assert read_image_bytes(str(path), max_bytes=size) == path.read_bytes()
    with pytest.raises(images.ImageTooLarge,
                       match=rf"image too large: {re.escape(str(path))} is {size:,} bytes, over the "
                             rf"limit of {size - 1:,} bytes per image \(the max_image_mb input raises it"):
        read_image_bytes(str(path), max_bytes=size - 1)
    # The default limit, on a sparse file (no disk spent): refused from its size, never read.
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as out:
        out.truncate(images.max_file_bytes() + 1)
    with pytest.raises(DataError, match=r"huge.png is 256.0 MB, over the limit of 256.0 MB per image"):
        load_image(str(huge))
    monkeypatch.setitem(files._max_file, "bytes", size)  # what --max_image_mb sets
    assert images.max_file_bytes() == size
    assert load_image(str(path)).size == (5, 4)


def test_a_file_growing_past_the_limit_while_read_is_refused(tmp_path, monkeypatch):
    """Reading stops after limit + 1 bytes even when the file's size said less (a file being
    written, or one whose size the file system does not know, as in /proc)."""
    path = tmp_path / "a.png"
    path.write_bytes(b"x" * 100)
    real_fstat = os.fstat

    def fstat_of_an_emptier_file(fd):
        info = real_fstat(fd)
        return os.stat_result((info.st_mode, *info[1:6], 10, *info[7:]))

    monkeypatch.setattr(images.os, "fstat", fstat_of_an_emptier_file)
    assert read_image_bytes(str(path), max_bytes=100) == b"x" * 100
    with pytest.raises(DataError, match=r"a.png holds more than the limit of 99 bytes per image"):
        read_image_bytes(str(path), max_bytes=99)


@pytest.fixture
def slow_server():
    """Serves /big (2,000 bytes, with or without Content-Length) and /trickle (a byte every
    50 ms)."""
    body = encode(Image.new("RGB", (5, 4))) + b"\0" * 2000

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):  # noqa: N802 - http.server API
            self.send_response(200)
            if self.path == "/big":
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/trickle":
                for byte in body[:200]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", len(body)
    finally:
        server.shutdown()
        server.server_close()


def test_downloads_have_a_size_limit_and_a_deadline(slow_server, tmp_path, monkeypatch):
    base, size = slow_server
    monkeypatch.setenv("VISIONTUNE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=rf"/big is {size:,} bytes, over the limit of {size - 1:,}"):
        read_image_bytes(f"{base}/big", max_bytes=size - 1)  # from Content-Length, nothing read
    with pytest.raises(DataError, match=rf"/undeclared holds more than the limit of {size - 1:,}"):
        read_image_bytes(f"{base}/undeclared", max_bytes=size - 1)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert len(read_image_bytes(f"{base}/undeclared", max_bytes=size)) == size
    monkeypatch.setattr(images, "HTTP_DEADLINE_S", 0.5)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cannot download .*/trickle: timed out"):
        read_image_bytes(f"{base}/trickle")
    assert time.monotonic() - started < 5
