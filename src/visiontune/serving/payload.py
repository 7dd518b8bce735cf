"""One cell of a scoring request's ``image`` column -> an RGB image, decoded in memory.

Base64 text (or a ``data:`` URL) and raw bytes; an http(s) URL or a server-local file only when
the model's serving config allows it. Sizes are checked before decoding: the encoded bytes
before the whole image is read, the pixels from the image's header.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from pathlib import Path
from typing import Any

from PIL import Image

from visiontune.data.images import (
    ImageTooLarge, MAX_PIXELS, decode_image, download, read_local_file, refuse_bombs,
)
from visiontune.data.mltable import local_path
from visiontune.errors import DataError

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
    try:
        return download(url, max_bytes, timeout=URL_TIMEOUT_S, deadline_s=URL_DEADLINE_S)
    except ImageTooLarge as exc:
        raise _too_large(exc.size if exc.size is not None else max_bytes + 1, max_bytes) from None
    except DataError as exc:
        raise PayloadError(str(exc)) from None


def _read_path(text: str, max_bytes: int) -> bytes:
    """A server-local regular file (never a named pipe or device: they could block or never
    end), at most ``max_bytes``."""
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
