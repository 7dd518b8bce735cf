"""Image transforms (torchvision.transforms.v2 on uint8 CHW tensors) and their settings.

Validation, evaluation and serving share ONE transform, ``eval_transform``: resize to
(H, W) and normalise, with no center crop, so a model scores the same pixels everywhere.
Training uses it too unless augmentations are on. ``Preprocessing`` is the small, saved
description that rebuilds these transforms anywhere (e.g. inside an MLflow model).

Both are ``Compose``: torchvision's, run faster on a single image tensor (see its docstring).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visiontune.data import color

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


class Compose(v2.Compose):
    """``v2.Compose`` that runs its steps on one plain image tensor by calling torchvision's
    kernels directly, with the random parameters drawn by each step's own ``make_params`` (or
    ``torch.rand``) in torchvision's order, and the hue shift of ``visiontune.data.color``.

    The output is the same, to the bit and for the same random state, as ``v2.Compose``'s
    (``tests/test_data_transforms.py``), in about two thirds of the time for a 128 x 128 crop:
    v2's per-call dispatch (flattening the inputs, type checks, kernel lookup) costs 20-250 us
    per step and image, and its hue kernel 1.4 ms. Any other input, or a step this class does
    not know, goes through torchvision as usual."""

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) != 1 or type(inputs[0]) is not torch.Tensor:
            return super().forward(*inputs)
        image = inputs[0]
        for step in self.transforms:
            image = _run_step(step, image)
        return image


def _run_step(step: Any, image: torch.Tensor) -> torch.Tensor:
    """``step(image)`` for a plain CHW tensor, without v2's dispatch where the step is known."""
    kind = type(step)
    if kind is v2.RandomResizedCrop:
        return F.resized_crop_image(image, **step.make_params([image]), size=step.size,
                                    interpolation=step.interpolation, antialias=step.antialias)
    if kind is v2.RandomHorizontalFlip:
        return image if torch.rand(1) >= step.p else F.horizontal_flip_image(image)
    if kind is v2.RandomApply:
        if torch.rand(1) >= step.p:
            return image
        for inner in step.transforms:
            image = _run_step(inner, image)
        return image
    if kind is v2.ColorJitter:
        return _color_jitter(image, step.make_params([image]))
    if kind is v2.Resize:
        return F.resize_image(image, step.size, interpolation=step.interpolation,
                              max_size=step.max_size, antialias=step.antialias)
    if kind is v2.ToDtype and isinstance(step.dtype, torch.dtype):
        return F.to_dtype_image(image, step.dtype, scale=step.scale)
    if kind is v2.Normalize:
        return F.normalize_image(image, mean=step.mean, std=step.std, inplace=step.inplace)
    return step(image)


def _color_jitter(image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """``ColorJitter.transform`` with the kernels called directly (same order, same factors)."""
    for fn_id in params["fn_idx"].tolist():
        if fn_id == 0 and params["brightness_factor"] is not None:
            image = F.adjust_brightness_image(image, params["brightness_factor"])
        elif fn_id == 1 and params["contrast_factor"] is not None:
            image = F.adjust_contrast_image(image, params["contrast_factor"])
        elif fn_id == 2 and params["saturation_factor"] is not None:
            image = F.adjust_saturation_image(image, params["saturation_factor"])
        elif fn_id == 3 and params["hue_factor"] is not None:
            if color.supports(image):
                image = color.adjust_hue(image, params["hue_factor"])
            else:
                image = F.adjust_hue_image(image, params["hue_factor"])
    return image


def _finish(pre: Preprocessing) -> list:
    steps: list = [v2.ToDtype(torch.float32, scale=True)]
    if pre.channel_order == "BGR":
        steps.append(FlipChannels())
    steps.append(v2.Normalize(mean=list(pre.mean), std=list(pre.std)))
    return steps


def eval_transform(pre: Preprocessing) -> Compose:
    """uint8 CHW -> float32 CHW: resize to (H, W), scale to 0..1, normalise."""
    return Compose([
        v2.Resize((pre.height, pre.width), interpolation=_INTERPOLATIONS[pre.interpolation],
                  antialias=True),
        *_finish(pre),
    ])


def train_transform(pre: Preprocessing, augment: bool) -> Compose:
    """With ``augment``: random resized crop, horizontal flip, colour jitter; else eval's."""
    if not augment:
        return eval_transform(pre)
    return Compose([
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
