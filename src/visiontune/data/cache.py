"""A decoded-image cache: each image is decoded (and shrunk) once, then reused by every epoch.

Decoding a photo costs more than everything else the data loader does for it, and training
decodes every image once per epoch (validation too). The cache keeps, per image, an uint8
HWC array in a ``.npy`` file that later reads load instead of decoding. What is stored
depends on the dataset's transform, read from its first step:

* ``Resize((H, W))`` (evaluation, and training without augmentations): the exact output of
  that step on the full-size decode. The transform's own Resize is then a no-op, so cached
  and uncached items are bit-identical.
* ``RandomResizedCrop((H, W))`` (training with augmentations): the full decode shrunk (never
  enlarged) so that its shorter side is ``SHRINK_MARGIN`` x max(H, W), with the transform's
  interpolation and torchvision's antialiased resize. Crops come from this smaller image:
  close to, not equal to, crops of the full image.
* any other transform: no cache.

An entry is keyed by a hash of the image file's bytes, the very bytes it was decoded from, so
an edited or replaced file is never served stale, whatever its timestamps say (identical files
share one entry). Entries are written atomically (temporary file + rename), so parallel writers
(threads, data-loader workers, distributed ranks) are safe. Local files are cached, and remote
images (http(s), object stores) through their downloaded copies: filling the cache fetches them,
in parallel, before training starts.

The folder of a plan keeps its size limit with least-recently-used eviction: a fill marks the
entries it reuses as used (their modification time) and, when new entries do not fit, removes
the entries that went unused longest, never one the current data use. Data larger than the
limit are cached up to it; the rest is decoded from the source at each use (with reduced-scale
JPEG decoding where the transform crops at random), and one log line says so.

Switches (environment): ``VISIONTUNE_IMAGE_CACHE`` (1/0), ``VISIONTUNE_IMAGE_CACHE_DIR`` (where;
default ``~/.cache/visiontune/decoded``), ``VISIONTUNE_IMAGE_CACHE_MAX_GB`` (per folder of
entries, default 20), ``VISIONTUNE_JPEG_DRAFT`` (1/0: reduced-scale JPEG decoding for
augmented training images when the cache is off or full).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visiontune import settings
from visiontune.data import images
from visiontune.data.prepare import cpu_cores
from visiontune.data.transforms import PillowResize, hwc_tensor
from visiontune.errors import DataError

log = logging.getLogger(__name__)

ENV_SWITCH = "VISIONTUNE_IMAGE_CACHE"
ENV_DIR = "VISIONTUNE_IMAGE_CACHE_DIR"
ENV_MAX_GB = "VISIONTUNE_IMAGE_CACHE_MAX_GB"
ENV_DRAFT = "VISIONTUNE_JPEG_DRAFT"
FORMAT = 2  # bump when what an entry holds, or how it is keyed, changes
# Shorter side kept for random crops, relative to the larger output side. Twice the output
# size keeps crops down to a quarter of the image side at full output detail; smaller crops
# (RandomResizedCrop goes down to 8 % of the area) come out a little softer than from the
# full image. A smaller margin read no faster (see BENCHMARKS.md).
SHRINK_MARGIN = 2.0
FREE_SPACE_RESERVE = 1 << 30  # never fill the disk below this

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def cache_enabled() -> bool:
    return settings.flag(ENV_SWITCH)


def draft_enabled() -> bool:
    return settings.flag(ENV_DRAFT)


def cache_root() -> Path:
    configured = settings.text(ENV_DIR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "visiontune" / "decoded"


def max_bytes() -> int:
    return max(0, int(settings.number(ENV_MAX_GB) * (1 << 30)))


@dataclass(frozen=True)
class CachePlan:
    """What an entry holds: ``exact`` = the transform's first Resize applied to the full image
    (``size`` is (H, W)); ``shrink`` = shorter side ``size[0]``, aspect kept."""

    kind: str
    size: tuple[int, int]
    interpolation: str

    def folder_name(self) -> str:
        shape = f"{self.size[0]}x{self.size[1]}" if self.kind == "exact" else f"{self.size[0]}"
        return f"{self.kind}-{shape}-{self.interpolation}-v{FORMAT}"


def _interpolation_name(mode: Any) -> str | None:
    value = getattr(mode, "value", mode)
    return value if value in _INTERPOLATIONS else None


def plan_for(transform: Any) -> CachePlan | None:
    """The cache plan of a transform built by ``visiontune.data.transforms``; None when the
    transform does not start with a (random-resized-crop or plain) resize to a fixed size."""
    steps = getattr(transform, "transforms", None)
    if not steps:
        return None
    first = steps[0]
    size = getattr(first, "size", None)
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        return None
    height, width = int(size[0]), int(size[1])
    interpolation = _interpolation_name(getattr(first, "interpolation", None))
    if interpolation is None:
        return None
    if type(first) is v2.Resize:
        if getattr(first, "max_size", None) is not None or not first.antialias:
            return None
        return CachePlan("exact", (height, width), interpolation)
    if type(first) is PillowResize:  # its own entries: Pillow rounds apart from torchvision
        return CachePlan("exact", (height, width), f"{interpolation}-pillow")
    if type(first) is v2.RandomResizedCrop:
        side = int(math.ceil(SHRINK_MARGIN * max(height, width)))
        return CachePlan("shrink", (side, side), interpolation)
    return None


# The header ``np.save`` writes for an entry (format 1.0): magic, version, little-endian header
# length, then a padded dict literal.
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER_BYTES = 128
_HEADERS: dict[tuple, bytes] = {}
_NPY_HEADER = re.compile(
    rb"\{'descr': '\|u1', 'fortran_order': False, 'shape': \((\d+), (\d+), 3\), \} *\n")


def _npy_header(array: np.ndarray) -> bytes:
    """The header ``np.save`` writes for ``array`` (format 1.0), made once per shape."""
    header = _HEADERS.get(array.shape)
    if header is None:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer,
                                             np.lib.format.header_data_from_array_1_0(array))
        header = _HEADERS[array.shape] = buffer.getvalue()
    return header


def _read_entry(entry: Path) -> np.ndarray | None:
    """An entry's HWC uint8 array, read straight into a new array. Entries are written by
    ``np.save`` with one known header, so it is matched as bytes: ``np.load`` with a memory map
    spends several times the read itself parsing the header and mapping (BENCHMARKS.md, *Levers*).
    Anything else falls back to ``np.load``; None when the file does not hold an HWC RGB uint8
    array or is shorter than its header says."""
    with open(entry, "rb", buffering=0) as file:
        head = file.read(128)  # np.save pads the header to 128 bytes for shapes like these
        match = _NPY_HEADER.fullmatch(head, 10) if head.startswith(_NPY_MAGIC) else None
        if match is not None and int.from_bytes(head[8:10], "little") == len(head) - 10:
            array = np.empty((int(match[1]), int(match[2]), 3), np.uint8)
            view, done = memoryview(array).cast("B"), 0
            while done < array.nbytes:
                count = file.readinto(view[done:])
                if not count:
                    return None  # truncated
                done += count
            return array
    loaded = np.load(entry, allow_pickle=False)
    if loaded.dtype != np.uint8 or loaded.ndim != 3 or loaded.shape[2] != 3:
        return None
    return loaded


class DecodedImageCache:
    """The entries of one ``CachePlan`` under ``root``. Picklable (paths and numbers only), so
    data-loader workers read the same entries."""

    def __init__(self, plan: CachePlan, root: str | Path | None = None,
                 limit_bytes: int | None = None, first_step: Any = None):
        self.plan = plan
        self.folder = Path(root if root is not None else cache_root()) / plan.folder_name()
        self.limit_bytes = max_bytes() if limit_bytes is None else int(limit_bytes)
        self._folders: set[Path] = set()  # the entry folders known to exist
        # The exact plan stores the output of this step (the transform's own Resize).
        self.first_step = first_step

    # -- keys -------------------------------------------------------------------------------
    # Why the bytes and not the file's metadata: a same-size replacement can keep every stat
    # field a key could use. utime sets the modification time back; the change time cannot be
    # set, but it is as coarse as the file system's clock (a second on some), is the creation
    # time on Windows, and inode numbers are reused. Hashing costs one read of each file when a
    # dataset is built (not per epoch): small next to decoding the file, which it replaces.
    def entry_path(self, uri: str) -> Path | None:
        """Where the entry of ``uri`` lives; None when the image cannot be read (the plain path
        then reports the problem)."""
        data = _local_bytes(uri)
        return None if data is None else self.entry_for(data)

    def entry_for(self, data: bytes) -> Path:
        """The entry of an image file's bytes."""
        digest = hashlib.sha256(data).hexdigest()
        return self.folder / digest[:2] / f"{digest}.npy"

    # -- reading ----------------------------------------------------------------------------
    @staticmethod
    def read(entry: Path):
        """The CHW uint8 tensor (channels-last strides) of an entry, or None when absent or
        unreadable (then the caller decodes the image)."""
        try:
            array = _read_entry(entry)
        except (OSError, ValueError, EOFError):
            return None
        if array is None:
            return None
        return torch.from_numpy(array).permute(2, 0, 1)

    # -- writing ----------------------------------------------------------------------------
    def build(self, uri: str, data: bytes | None = None):
        """Decode ``uri`` (its bytes ``data`` when given; in full: a reduced-scale JPEG decode
        would differ more from the plain path, and this runs once per image) and return the CHW
        uint8 tensor this plan stores; DataError when the image cannot be read."""
        if data is None:
            data = images.read_image_bytes(uri)
        pixels = hwc_tensor(images.decode_image(data, where=uri))
        if self.plan.kind == "exact":
            return self.first_step(pixels)
        side = self.plan.size[0]
        height, width = pixels.shape[-2:]
        scale = side / min(height, width)
        if scale >= 1.0:
            return pixels  # never enlarged
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        # torchvision's resize, as the transform's own: the stored image is what its resize
        # would make of the full image at this size.
        return F.resize(pixels, size, interpolation=v2.InterpolationMode(self.plan.interpolation),
                        antialias=True)

    def write(self, entry: Path, tensor) -> int:
        """Store a CHW uint8 tensor atomically, as the bytes ``np.save`` writes; returns the
        bytes written. A name unique to the process and thread stands in for ``mkstemp``, and
        the header is made once per shape: for small images these were most of the cost."""
        array = np.ascontiguousarray(tensor.permute(1, 2, 0).numpy())
        if entry.parent not in self._folders:
            entry.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(entry.parent)
        tmp = entry.with_name(f".part-{os.getpid()}-{threading.get_ident()}-{entry.name}")
        try:
            with open(tmp, "wb") as out:
                out.write(_npy_header(array))
                out.write(array.data)
            os.replace(tmp, entry)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return array.nbytes

    def fill(self, uris: Iterable[str],
             workers: int | None = None) -> tuple[dict[str, int], dict[str, Path]]:
        """Create the missing entries of ``uris``, in threads (hashing, Pillow and torch release
        the GIL): each file is read once, and its entry is looked up by, or decoded from, those
        same bytes. Images that cannot be read are left to the plain path, which reports them.
        Stops adding entries at the size limit or when the disk is nearly full.

        Returns counts by outcome, and the entry of every URI that has one now."""
        stats = {"cached": 0, "added": 0, "uncachable": 0, "failed": 0, "over_limit": 0}
        present: dict[str, Path] = {}
        unique = list(dict.fromkeys(uris))
        if not unique:
            return stats, present
        # Entries used from now on are this run's: eviction never removes them.
        started = time.time() - 2.0  # file systems with coarse timestamps

        def locate(uri: str) -> tuple[str, Path | None]:
            data = _local_bytes(uri)
            if data is None:
                return "uncachable", None
            entry = self.entry_for(data)
            try:
                os.utime(entry)  # used now: the last to go
                return "cached", entry
            except FileNotFoundError:
                return "missing", entry
            except OSError:
                return ("cached" if entry.is_file() else "missing"), entry

        def add(uri: str) -> tuple[str, Path | None]:
            data = _local_bytes(uri)  # read again: the file may have changed since
            if data is None:
                return "uncachable", None
            entry = self.entry_for(data)
            if budget.exhausted():
                return budget.outcome, None
            try:
                tensor = self.build(uri, data)
            except Exception:  # DataError and friends: the plain path reports it in context
                return "failed", None
            if not budget.take(tensor.numel() + _NPY_HEADER_BYTES):
                return budget.outcome, None
            try:
                self.write(entry, tensor)
            except OSError:
                return "failed", None
            return "added", entry

        # One thread a core: more only contend for the GIL (small images) or the cores
        # (large ones), measured in BENCHMARKS.md ("Scale").
        workers = workers or cpu_cores()
        if len(unique) > 200:
            log.info("image cache: reading %d image(s), decoding those not yet in %s", len(unique),
                     self.folder)
        missing = []
        with ThreadPoolExecutor(max_workers=min(workers, len(unique))) as pool:
            for uri, (outcome, entry) in zip(unique, pool.map(locate, unique)):
                if outcome == "missing":
                    missing.append(uri)
                    continue
                stats[outcome] += 1
                if entry is not None:
                    present[uri] = entry
            budget = _Budget(self, len(missing), started)
            for uri, (outcome, entry) in zip(missing, pool.map(add, missing)):
                stats[outcome] += 1
                if entry is not None:
                    present[uri] = entry
        if stats["over_limit"]:
            log.warning("image cache: %d of %d image(s) not cached: they do not fit in %s "
                        "(%s=%s GB) beside the ones this data use, or the disk is nearly full; "
                        "they are decoded from the source at each use", stats["over_limit"],
                        len(unique), self.folder, ENV_MAX_GB,
                        f"{settings.number(ENV_MAX_GB):.3g}")
        return stats, present

    def evict(self, nbytes: int, used_since: float) -> int:
        """Remove the least recently used entries not used since ``used_since`` (a time stamp)
        until ``nbytes`` are freed or none is left; returns the bytes freed."""
        candidates = []
        for entry, info in self._entries():
            if info.st_mtime < used_since:
                candidates.append((info.st_mtime, info.st_size, entry))
        candidates.sort()
        freed = removed = 0
        for _, size, entry in candidates:
            if freed >= nbytes:
                break
            try:
                entry.unlink()
            except OSError:
                continue
            freed += size
            removed += 1
        if removed:
            log.info("image cache: removed %d least recently used entr%s (%.1f MB) from %s to "
                     "stay within %s=%s GB", removed, "y" if removed == 1 else "ies",
                     freed / 2**20, self.folder, ENV_MAX_GB, f"{settings.number(ENV_MAX_GB):.3g}")
        return freed

    def size_bytes(self) -> int:
        """Bytes held by this plan's entries (walks the folder once per fill that adds)."""
        return sum(info.st_size for _, info in self._entries())

    def _entries(self) -> Iterator[tuple[Path, os.stat_result]]:
        try:
            subs = [sub for sub in os.scandir(self.folder) if sub.is_dir()]
        except OSError:
            return
        for sub in subs:
            try:
                with os.scandir(sub.path) as files:
                    for item in files:
                        if item.name.endswith(".npy") and not item.name.startswith("."):
                            try:
                                yield Path(item.path), item.stat()
                            except OSError:
                                pass
            except OSError:
                pass


class _Budget:
    """The bytes a fill may still add, worked out when the first entry is about to be written
    (a fill that only reuses entries never touches the folder); thread-safe. When the ``count``
    new entries (estimated at the first one's size) do not fit under the limit, entries unused
    since ``used_since`` are evicted first."""

    def __init__(self, cache: DecodedImageCache, count: int, used_since: float):
        self._cache = cache
        self._count, self._used_since = count, used_since
        self._left: int | None = None
        self._lock = threading.Lock()
        self.outcome = "over_limit"  # what a refused entry counts as

    def _start(self, nbytes: int) -> None:
        if self._left is not None:
            return
        folder = self._cache.folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
        except OSError as exc:
            log.warning("image cache disabled: cannot use %s (%s)", folder, exc)
            self._left, self.outcome = 0, "failed"
            return
        left = self._cache.limit_bytes - self._cache.size_bytes()
        wanted = nbytes * self._count
        if wanted > left and nbytes:
            left += self._cache.evict(wanted - left, self._used_since)
        self._left = min(left, free - FREE_SPACE_RESERVE)

    def exhausted(self) -> bool:
        with self._lock:
            if self._left is None:
                return False  # decided at the first entry's size
            return self._left <= 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` for one entry; False (and nothing more after) when they do not fit."""
        with self._lock:
            self._start(nbytes)
            if self._left < nbytes:
                self._left = 0
                return False
            self._left -= nbytes
            return True


def _local_bytes(uri: str) -> bytes | None:
    """The bytes of an image, read as the plain path reads them (regular files only, within the
    size limit; a remote image from its downloaded copy, fetched now if needed); None when they
    cannot be read."""
    try:
        return images.read_image_bytes(uri)
    except DataError:
        return None
