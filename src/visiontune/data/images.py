"""Read and decode images into 8-bit RGB, the one form the transforms expect.

Conversions (after EXIF orientation is applied, so pixels are as a viewer shows them):

* grayscale ``1``/``L`` -> RGB by repeating the channel;
* 16-bit grayscale (``I;16*``) -> 8-bit by scaling 0..65535 to 0..255 (not by clipping);
  ``I`` (32-bit) is scaled the same way when its values exceed 255, else taken as 8-bit;
  ``F`` (float) is scaled from 0..1 when it lies in that range, else clipped to 0..255;
* palette ``P`` -> RGB, through RGBA when the palette has transparency;
* images with alpha (``RGBA``, ``LA``, ``PA``...) are composited onto white, because fully
  transparent pixels often hold arbitrary colours that dropping alpha would reveal;
* ``CMYK``, ``YCbCr`` and the rest -> RGB with Pillow's conversion (ICC profiles ignored).

Images over MAX_PIXELS pixels are refused as possible decompression bombs. Only regular files
are read (a named pipe, device, socket or folder is refused without being read), and no read
takes more than max_file_bytes() bytes (the max_image_mb input), whatever the source.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visiontune.data import storage
from visiontune.console import AZURE_LIBRARIES, silenced
from visiontune.data.files import ImageTooLarge, cache_dir, max_file_bytes, read_at_most
from visiontune.data.mltable import local_path
from visiontune.errors import DataError

# Pillow's own default; we check it ourselves so that a changed Image.MAX_IMAGE_PIXELS
# elsewhere in the process does not switch the protection off.
MAX_PIXELS = 89_478_485
HTTP_TIMEOUT_S = 30.0  # per network operation (connect, each read)
HTTP_DEADLINE_S = 300.0  # for a whole download, so that a server sending a trickle cannot stall it
_EXIF_ORIENTATION = 0x0112
# Opening a named pipe without O_NONBLOCK waits for a writer, forever; a regular file ignores it.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
               | getattr(os, "O_CLOEXEC", 0))

# Pillow only warns between MAX_IMAGE_PIXELS and twice that; a huge image is never wanted here,
# so that warning becomes an error. Checked before each open, because any warnings.catch_warnings()
# block around our import (test runners, notebooks) would have removed a filter set only once.
_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


def refuse_bombs() -> None:
    """Make Pillow's decompression-bomb warning an error in this process (again, if needed)."""
    if _BOMB_FILTER not in warnings.filters:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def read_image_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a local path, file:// URI, http(s) URL (cached) or azureml:// URI; at most
    ``max_bytes`` (default ``max_file_bytes()``), else DataError."""
    limit = max_file_bytes() if max_bytes is None else int(max_bytes)
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):  # below a Blob folder read as data: with its SAS
        store = storage.folder_sas(uri) is not None
        return _read_cached(uri, limit, storage.read_object if store else download)
    if storage.is_object_uri(uri):
        return _read_cached(uri, limit, storage.read_object)
    if scheme == "azureml":
        return _read_azureml(uri, limit)
    try:
        path = local_path(uri, Path.cwd())
    except ValueError as exc:
        raise DataError(str(exc)) from None
    try:
        return read_local_file(path, limit)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"image path is a folder: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _require_regular(path: Path, info: os.stat_result) -> None:
    if stat.S_ISREG(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"image path is a folder: {path}")
    kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
    raise DataError(f"image path is {kind}, not a regular file: {path}")


def read_local_file(path: Path, limit: int) -> bytes:
    """A regular file's bytes, checked before it is opened and again on the open file (it may
    have been replaced in between); DataError for anything else, ImageTooLarge over ``limit``
    bytes (at most ``limit`` + 1 are read); OSError when it cannot be read."""
    _require_regular(path, os.stat(path))
    fd = os.open(path, _OPEN_FLAGS)
    with open(fd, "rb", buffering=0) as handle:
        info = os.fstat(fd)
        _require_regular(path, info)
        if info.st_size > limit:
            raise ImageTooLarge(str(path), info.st_size, limit)
        if _OPEN_FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        # ImageTooLarge too when it grew while being read
        return read_at_most(handle.read, limit, str(path), first=info.st_size + 1)


def _read_cached(url: str, limit: int, fetch: Callable[[str, int], bytes]) -> bytes:
    """Fetch once (an http(s) URL or an object in a store), then serve from the cache; the file
    appears atomically so that parallel readers (threads, data-loading processes) never see half
    a download. No more than ``limit`` bytes are read."""
    folder = cache_dir()
    target = folder / hashlib.sha256(url.encode("utf-8")).hexdigest()
    try:
        return read_local_file(target, limit)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise DataError(f"cannot read the cached download of {storage.redact(url)} ({target}): "
                        f"{exc.strerror or exc}") from None
    data = fetch(url, limit)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return data


def download(url: str, limit: int, *, timeout: float | None = None,
             deadline_s: float | None = None) -> bytes:
    """An http(s) URL's bytes, in memory: each network operation times out after ``timeout``
    seconds (default HTTP_TIMEOUT_S) and the whole download after ``deadline_s`` (default
    HTTP_DEADLINE_S), so that a server sending a trickle cannot stall it; ImageTooLarge over
    ``limit`` bytes, declared or read; DataError for anything else."""
    timeout = HTTP_TIMEOUT_S if timeout is None else timeout
    deadline_s = HTTP_DEADLINE_S if deadline_s is None else deadline_s
    request = urllib.request.Request(url, headers={"User-Agent": "visiontune"})
    shown = storage.redact(url)  # a SAS token or signature never reaches a message
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise ImageTooLarge(shown, int(declared), limit)
            return read_at_most(response.read1, limit, shown, deadline=time.monotonic() + deadline_s)
    except DataError:
        raise
    except urllib.error.HTTPError as exc:
        raise DataError(f"cannot download {shown}: HTTP {exc.code} {exc.reason}") from None
    except TimeoutError:
        raise DataError(f"cannot download {shown}: timed out (each read may take "
                        f"{timeout:g} s, the whole download {deadline_s:g} s)") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"cannot download {shown}: {storage.redact(str(reason))}") from None


def _read_azureml(uri: str, limit: int) -> bytes:
    try:
        import azureml.fsspec  # noqa: F401  (registers the azureml:// protocol with fsspec)
        import fsspec
    except ImportError:
        raise DataError(
            f"cannot read {uri}: azureml:// URIs need the azureml-fsspec package "
            "(pip install azureml-fsspec) and Azure credentials; or download the images and "
            "use local paths"
        ) from None
    try:
        with silenced(AZURE_LIBRARIES), fsspec.open(uri, "rb") as handle:
            return read_at_most(handle.read, limit, uri)
    except DataError:
        raise
    except Exception as exc:  # the filesystem raises many kinds; the message is what counts
        raise DataError(f"cannot read {uri}: {storage.reason(exc)}") from None


def _open_sized(
    data: bytes, where: str, draft: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode, refusing empty files, non-images, truncation and bombs; return
    the image and its full (width, height), which a draft-scaled image no longer has.

    ``draft``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale while both sides stay at least
    this many pixels (libjpeg's DCT scaling: every byte is still entropy-decoded, so a
    truncated or corrupt file fails as it would at full size; only the inverse DCT shrinks)."""
    label = where or "image"
    if not data:
        raise DataError(f"{label}: empty file")
    refuse_bombs()
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{label}: image too large (over {MAX_PIXELS:,} pixels; refused as a "
                        "possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise DataError(f"{label}: not an image file (or an unsupported format)") from None
    except Exception as exc:
        raise DataError(f"{label}: cannot open image ({exc})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise DataError(f"{label}: image too large ({width}x{height} is over {MAX_PIXELS:,} "
                        "pixels; refused as a possible decompression bomb)")
    if width == 0 or height == 0:
        raise DataError(f"{label}: image has no pixels ({width}x{height})")
    if draft is not None and image.format == "JPEG" and min(width, height) >= 2 * max(1, draft):
        try:
            image.draft(image.mode, (max(1, draft), max(1, draft)))
        except Exception:
            pass  # a decoder that cannot scale decodes at full size, which is always right
    try:
        image.load()
    except OSError as exc:
        text = str(exc)
        reason = "truncated or corrupt image" if "truncat" in text.lower() else f"cannot decode image ({text})"
        raise DataError(f"{label}: {reason}") from None
    except Exception as exc:  # decoders raise SyntaxError, ValueError, struct.error...
        raise DataError(f"{label}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return image, (width, height)


def decode_image(data: bytes, where: str = "", min_side: int | None = None) -> Image.Image:
    """8-bit RGB with EXIF orientation applied; DataError naming ``where`` otherwise.

    ``min_side``: the caller shrinks the image to about this size anyway, so a large JPEG may
    be decoded at a reduced scale that keeps both sides >= ``min_side`` (several times faster;
    close to, not equal to, decoding in full and shrinking). None decodes at full size."""
    image = _orient(_open_sized(data, where, draft=min_side)[0])
    try:
        return to_rgb(image)
    except Exception as exc:
        raise DataError(f"{where or 'image'}: cannot convert mode {image.mode} to RGB ({exc})") from None


def _orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; skipped (no copy) for the usual upright image."""
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (1, None):
            return image
        return ImageOps.exif_transpose(image)
    except Exception:
        return image  # a broken EXIF block should not cost the image; the pixels are fine


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("1", "L"):
        return image.convert("L").convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_wide_to_uint8(image)).convert("RGB")  # 2-D uint8 -> "L"
    if mode == "P":
        if "transparency" in image.info:
            return _on_white(image.convert("RGBA"))
        return image.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "A" in image.getbands():
        return _on_white(image.convert("RGBA"))
    return image.convert("RGB")


def _wide_to_uint8(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    if image.mode == "F":
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        return np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    values = array.astype(np.int64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        # 65535 / 257 == 255 exactly, so white stays white and black stays black.
        return np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return np.clip(values, 0, 255).astype(np.uint8)


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(uri: str, min_side: int | None = None) -> Image.Image:
    """read_image_bytes + decode_image."""
    return decode_image(read_image_bytes(uri), where=uri, min_side=min_side)


# Orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def verify_image(uri: str, where: str = "") -> tuple[int, int]:
    """Read and decode the image as training will (so truncation, corruption and unusable
    modes are found now); return its full (width, height) as the model sees it, after EXIF
    orientation. JPEGs are decoded at 1/8 scale: all of the file is still entropy-decoded,
    which is what finds damage, at a fraction of the cost of the full inverse DCT."""
    label = where or uri
    image, (width, height) = _open_sized(read_image_bytes(uri), label, draft=1)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        orientation = 1
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    try:
        to_rgb(_orient(image))
    except Exception as exc:
        raise DataError(f"{label}: cannot convert mode {image.mode} to RGB ({exc})") from None
    return width, height
