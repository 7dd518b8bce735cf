"""A torch Dataset over Records: decode, transform, encode the label."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from visiontune.data.images import load_image, to_uint8_tensor
from visiontune.data.labels import check_task, encode_label
from visiontune.data.sources import Record
from visiontune.errors import DataError
from visiontune.inputs import MULTICLASS


class ImageDataset(torch.utils.data.Dataset):
    """Items are ``{"pixel_values": float32 CHW, "labels": ...}`` where labels is a long scalar
    (multi-class) or a float32 multi-hot vector over ``classes`` (multi-label).

    Images are read at each access (not kept in memory); labels are encoded up front so that
    a label outside ``classes`` fails at construction, not in the middle of an epoch."""

    def __init__(
        self, records: Sequence[Record], classes: list[str], task: str,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.records = list(records)
        self.classes = list(classes)
        self.task = check_task(task)
        self.transform = transform
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

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        try:
            image = load_image(record.image)
        except DataError as exc:
            raise DataError(f"{record.where}: {exc}") from None
        return {"pixel_values": self.transform(to_uint8_tensor(image)), "labels": self._labels[index]}
