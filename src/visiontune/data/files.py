"""What the data layer reads and where it keeps what it fetches: the file names and suffixes
each reader takes, the cache folder for downloads and images stored inside data files, and
reading bytes under the per-image limit (the ``max_image_mb`` input). The bottom of the data
layer: it imports nothing of visiontune's but the settings and the errors."""

from __future__ import annotations

import time
from pathlib import Path

from visiontune import settings
from visiontune.errors import DataError

MLTABLE_FILE = "MLTable"

JSON_LINES_SUFFIXES = (".jsonl", ".json", ".jsonlines", ".ndjson")
DELIMITED_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".parq")
# The files each format reads, and how they are named in messages.
FORMAT_SUFFIXES = {"json_lines": JSON_LINES_SUFFIXES, "delimited": DELIMITED_SUFFIXES,
                   "parquet": PARQUET_SUFFIXES}
SHARD_SUFFIXES = (".tar",)  # WebDataset shards

# Larger than the serving limit per image (serving.payload.DEFAULT_MAX_IMAGE_BYTES): a photo within
# MAX_PIXELS can legitimately take more as PNG or TIFF. The limit bounds the memory one read
# may take (a device, a runaway file, an endless download); the max_image_mb input sets it.
DEFAULT_MAX_FILE_MB = 256  # the max_image_mb input's default
_max_file = {"bytes": DEFAULT_MAX_FILE_MB << 20}


def cache_dir() -> Path:
    """Where downloaded images (and, under ``embedded/``, images stored inside data files) are
    kept: $VISIONTUNE_CACHE_DIR or ~/.cache/visiontune/images."""
    configured = settings.text("VISIONTUNE_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "visiontune" / "images"


def max_file_bytes() -> int:
    """The most bytes one image file or download may hold (the ``max_image_mb`` input)."""
    return _max_file["bytes"]


def set_max_file_bytes(limit: int) -> None:
    """Set the limit for this process (commands call it with their ``max_image_mb`` input)."""
    _max_file["bytes"] = max(1, int(limit))


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n:,} bytes"


class ImageTooLarge(DataError):
    """An image file or download over the byte limit. ``size``: its size when known (a file's,
    a declared download's); None when reading stopped at the limit."""

    def __init__(self, what: str, size: int | None, limit: int):
        self.size, self.limit = size, limit
        held = f"is {_size(size)}, over" if size is not None else "holds more than"
        super().__init__(f"image too large: {what} {held} the limit of {_size(limit)} per image "
                         "(the max_image_mb input raises it)")


def read_at_most(read, limit: int, what: str, first: int = 1 << 20,
                 deadline: float | None = None) -> bytes:
    """Call ``read(n)`` until it returns nothing; ImageTooLarge naming ``what`` as soon as more
    than ``limit`` bytes have come (at most ``limit`` + 1 are read). ``first``: the size of the
    first read (a file's size + 1 reads a whole file in one call). TimeoutError when
    ``deadline`` (time.monotonic()) passes."""
    chunks, total, want = [], 0, first
    while total <= limit:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the download took too long")
        chunk = read(max(1, min(want, limit + 1 - total)))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = 1 << 20
    if total > limit:
        raise ImageTooLarge(what, None, limit)
    return b"".join(chunks)
