"""Image transforms (torchvision.transforms.v2 on uint8 CHW tensors) and their settings.

Validation, evaluation and serving share ONE transform, ``eval_transform``: resize to
(H, W) and normalise, with no center crop, so a model scores the same pixels everywhere.
Training uses it too unless augmentations are on. ``Preprocessing`` is the small, saved
description that rebuilds these transforms anywhere (e.g. inside an MLflow model).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torchvision.transforms import v2

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Azure ML's components train with these; kept as constants so they are saved and reported.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
JITTER = 0.4  # brightness, contrast, saturation and hue
JITTER_P = 0.5

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


@dataclass
class Preprocessing:
    """How images become model inputs. ``channel_order`` "BGR" is for processors that flip
    channels (e.g. MobileViT's ``do_flip_channel_order``)."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize: str = "resize"  # resize to exactly (height, width); no crop
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        self.height, self.width = int(self.height), int(self.width)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, not {self.height}x{self.width}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std positive")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}")
        if self.resize != "resize":
            raise ValueError("resize must be 'resize'")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError("channel_order must be 'RGB' or 'BGR'")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _size_of(value: Any) -> tuple[int, int] | None:
    """(height, width) from a processor size: {"height","width"}, {"shortest_edge"}, an int."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    get = value.get if isinstance(value, dict) else lambda k, d=None: getattr(value, k, d)
    height, width = get("height", None), get("width", None)
    if height and width:
        return int(height), int(width)
    shortest = get("shortest_edge", None)
    if shortest:
        return int(shortest), int(shortest)
    return None


def resolve_preprocessing(
    image_processor: Any, image_height: int = -1, image_width: int = -1,
) -> Preprocessing:
    """Size, mean and std for a model: the user's size when both are given, else the
    processor's (``crop_size`` when it center-crops, else ``size``; timm: ``input_size``)."""
    data_config = getattr(image_processor, "data_config", None)
    size: tuple[int, int] | None = None
    mean = std = None
    channel_order = "RGB"
    if isinstance(data_config, dict):  # transformers' TimmWrapperImageProcessor
        input_size = data_config.get("input_size")
        if input_size and len(input_size) == 3:
            size = int(input_size[1]), int(input_size[2])
        mean, std = data_config.get("mean"), data_config.get("std")
    elif image_processor is not None:
        if getattr(image_processor, "do_center_crop", False):
            size = _size_of(getattr(image_processor, "crop_size", None))
        if size is None:
            size = _size_of(getattr(image_processor, "size", None))
        if hasattr(image_processor, "do_normalize") and not image_processor.do_normalize:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # the model expects plain 0..1 input
        else:
            mean = getattr(image_processor, "image_mean", None)
            std = getattr(image_processor, "image_std", None)
        if getattr(image_processor, "do_flip_channel_order", False):
            channel_order = "BGR"

    if image_height == -1 or image_width == -1:
        if size is None:
            raise ValueError(
                "the image processor does not say the input size; set image_height and image_width"
            )
        height, width = size
    else:
        height, width = int(image_height), int(image_width)

    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        log.warning("the image processor has no 3-channel mean/std; using ImageNet's")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return Preprocessing(height=height, width=width, mean=tuple(mean), std=tuple(std),
                         channel_order=channel_order)


class FlipChannels(torch.nn.Module):
    """RGB <-> BGR on a CHW tensor (a module, so DataLoader workers can pickle it)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(-3)


def _finish(pre: Preprocessing) -> list:
    steps: list = [v2.ToDtype(torch.float32, scale=True)]
    if pre.channel_order == "BGR":
        steps.append(FlipChannels())
    steps.append(v2.Normalize(mean=list(pre.mean), std=list(pre.std)))
    return steps


def eval_transform(pre: Preprocessing) -> v2.Compose:
    """uint8 CHW -> float32 CHW: resize to (H, W), scale to 0..1, normalise."""
    return v2.Compose([
        v2.Resize((pre.height, pre.width), interpolation=_INTERPOLATIONS[pre.interpolation],
                  antialias=True),
        *_finish(pre),
    ])


def train_transform(pre: Preprocessing, augment: bool) -> v2.Compose:
    """With ``augment``: random resized crop, horizontal flip, colour jitter; else eval's."""
    if not augment:
        return eval_transform(pre)
    return v2.Compose([
        v2.RandomResizedCrop((pre.height, pre.width), scale=CROP_SCALE, ratio=CROP_RATIO,
                             interpolation=_INTERPOLATIONS[pre.interpolation], antialias=True),
        v2.RandomHorizontalFlip(p=FLIP_P),
        v2.RandomApply([v2.ColorJitter(JITTER, JITTER, JITTER, JITTER)], p=JITTER_P),
        *_finish(pre),
    ])


def describe_augmentations(pre: Preprocessing, augment: bool) -> dict[str, Any]:
    """What the training and evaluation transforms do, for saving beside the model."""
    resize = {"name": "Resize", "size": [pre.height, pre.width],
              "interpolation": pre.interpolation, "antialias": True}
    finish: list[dict[str, Any]] = [{"name": "ToDtype", "dtype": "float32", "scale": True}]
    if pre.channel_order == "BGR":
        finish.append({"name": "FlipChannels", "to": "BGR"})
    finish.append({"name": "Normalize", "mean": list(pre.mean), "std": list(pre.std)})
    if augment:
        train = [
            {"name": "RandomResizedCrop", "size": [pre.height, pre.width],
             "scale": list(CROP_SCALE), "ratio": list(CROP_RATIO),
             "interpolation": pre.interpolation, "antialias": True},
            {"name": "RandomHorizontalFlip", "p": FLIP_P},
            {"name": "RandomApply", "p": JITTER_P, "transforms": [
                {"name": "ColorJitter", "brightness": JITTER, "contrast": JITTER,
                 "saturation": JITTER, "hue": JITTER}]},
            *finish,
        ]
    else:
        train = [resize, *finish]
    return {
        "apply_augmentations": bool(augment),
        "preprocessing": pre.to_dict(),
        "train": train,
        "eval": [resize, *finish],
    }
