"""A torch Dataset over Records: decode (or read the decoded-image cache), transform, encode
the label."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from visiontune import settings
from visiontune.data import cache as cache_settings
from visiontune.data.cache import DecodedImageCache
from visiontune.data.images import load_image
from visiontune.data.labels import check_task, encode_label
from visiontune.data.sources import Record
from visiontune.data.transforms import hwc_tensor
from visiontune.errors import DataError
from visiontune.tasks import MULTICLASS

log = logging.getLogger(__name__)


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``{"pixel_values": float32 CHW, "labels": ...}`` where labels is a long scalar
    (multi-class) or a float32 multi-hot vector over ``classes`` (multi-label).

    Images are read at each access (not kept in memory); labels are encoded up front so that
    a label outside ``classes`` fails at construction, not in the middle of an epoch.

    ``image_cache`` (default: ``$VISIONTUNE_IMAGE_CACHE``, on): for the transforms of
    ``visiontune.data.transforms``, decode every image once at construction into the
    decoded-image cache (``visiontune.data.cache``) and read it from there afterwards.

    ``seed`` (for random transforms): each item is transformed with torch's random state seeded
    from (seed, epoch, index) and then put back, so an item's augmentation does not depend on
    which process loads it or in what order, and loading draws nothing from the random state
    that training uses (dropout): a run resumed in the middle of an epoch sees the same
    augmentations and the same dropout as the run it continues. ``set_epoch`` before each
    epoch (persistent data-loader workers see it too: the epoch is in shared memory)."""

    def __init__(
        self, records: Sequence[Record], classes: list[str], task: str,
        transform: Callable[[torch.Tensor], torch.Tensor],
        *, image_cache: bool | None = None, cache_dir: str | None = None, seed: int | None = None,
    ) -> None:
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_() if seed is not None else None
        self.records = list(records)
        self.classes = list(classes)
        self.task = check_task(task)
        self.transform = transform
        plan = self._plan = _plan_for(transform)
        # Reduced-scale JPEG decoding only where the transform shrinks and crops at random
        # anyway; the exact (evaluation) plan always decodes in full.
        self._min_side = (plan.size[0] if plan is not None and plan.kind == "shrink"
                          and cache_settings.draft_enabled() else None)
        self._entries: list[str | None] | None = None
        class_to_id = {name: i for i, name in enumerate(self.classes)}
        labels = []
        for record in self.records:
            try:
                labels.append(encode_label(record.label, class_to_id, task))
            except DataError as exc:
                raise DataError(f"{record.where}: {exc}") from None
        if task == MULTICLASS:
            self._labels = torch.tensor(labels, dtype=torch.long)
        else:
            self._labels = (torch.from_numpy(np.stack(labels)) if labels
                            else torch.zeros((0, len(self.classes)), dtype=torch.float32))
        enabled = cache_settings.cache_enabled() if image_cache is None else bool(image_cache)
        if enabled and plan is not None and self.records:
            self._entries = self._fill_cache(cache_dir)

    def __len__(self) -> int:
        return len(self.records)

    def _fill_cache(self, cache_dir: str | None) -> list[str | None]:
        steps = getattr(self.transform, "transforms", [None])
        cache = DecodedImageCache(self._plan, cache_dir, first_step=steps[0])
        stats, present = cache.fill(r.image for r in self.records)
        log.info("image cache %s: %d image(s) reused, %d decoded now%s", cache.folder,
                 stats["cached"], stats["added"],
                 "".join(f", {n} {k.replace('_', ' ')}" for k, n in stats.items()
                         if k not in ("cached", "added") and n))
        if stats["added"] and os.environ.get("LOCAL_RANK", "0") != "0":
            log.warning("image cache: this process decoded %d image(s) that the node's first "
                        "process should have cached before it", stats["added"])
        return [str(present[r.image]) if r.image in present else None for r in self.records]

    def pixels(self, index: int) -> torch.Tensor:
        """The uint8 CHW image of item ``index`` before the transform: from the cache when it
        holds the image, else decoded (DataError naming the row when it cannot be read)."""
        if self._entries is not None and self._entries[index] is not None:
            tensor = DecodedImageCache.read(self._entries[index])
            if tensor is not None:
                return tensor
        record = self.records[index]
        try:
            image = load_image(record.image, min_side=self._min_side)
        except DataError as exc:
            raise DataError(f"{record.where}: {exc}") from None
        return hwc_tensor(image)

    def set_epoch(self, epoch: int) -> None:
        if self._epoch is not None:
            self._epoch.fill_(int(epoch))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self._item(index, self.pixels(index))

    def _item(self, index: int, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.seed is None:
            pixel_values = self.transform(pixels)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, int(self._epoch), index))
                pixel_values = self.transform(pixels)
        return {"pixel_values": pixel_values.contiguous(), "labels": self._labels[index]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """A batch's items (torch's data loader asks for a batch at once): the same items as
        ``__getitem__``, with the images read by several threads together. One read waits on
        the disk when its file is not in the page cache (a large dataset, a network mount),
        and the threads wait together instead of one after another; transforms then run in
        order, as ``__getitem__`` runs them."""
        threads = min(len(indices), int(settings.number("VISIONTUNE_BATCH_READ_THREADS")))
        if threads <= 1 or torch.utils.data.get_worker_info() is None:  # no threads beside training
            return [self[i] for i in indices]
        pixels = list(self._readers(threads).map(self.pixels, indices))
        return [self._item(index, image) for index, image in zip(indices, pixels)]

    def _readers(self, threads: int) -> ThreadPoolExecutor:
        """This process's reading threads, started on first use (in a data-loader worker: after
        the fork, which threads do not survive)."""
        pool = self.__dict__.get("_pool")
        if pool is None or pool[0] != os.getpid():
            pool = self.__dict__["_pool"] = (os.getpid(), ThreadPoolExecutor(
                threads, thread_name_prefix="visiontune-read"))
        return pool[1]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_pool"}


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one item of one epoch, distinct across items and epochs (SplitMix64 mixing)."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1  # torch.manual_seed takes up to 2**63


def _plan_for(transform):
    try:
        return cache_settings.plan_for(transform)
    except Exception:  # an unusual transform only loses the fast path
        return None
