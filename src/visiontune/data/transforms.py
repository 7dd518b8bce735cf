"""Image transforms (torchvision.transforms.v2 on uint8 CHW tensors), their settings, and the
tensors of decoded images they take (``hwc_tensor``).

Validation, evaluation and serving share ONE transform, ``eval_transform``: resize to
(H, W) with the base model's own interpolation and normalise, with no center crop, so a model
scores the same pixels everywhere. Training uses it too unless augmentations are on.
``Preprocessing`` is the small, saved description that rebuilds these transforms anywhere
(e.g. inside an MLflow model); ``timm_pretrained_cfg`` and ``training.finetune``'s
``hf_image_processor`` write it in the forms transformers' ``AutoImageProcessor`` and
``pipeline`` read, so they score the same.

Both are ``Compose``: torchvision's, run faster on a single image tensor (see its docstring).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visiontune import settings
from visiontune.data import color
from visiontune.data.images import to_rgb

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
# PIL's resampling codes, as processors store them (``resample``). Lanczos, box and hamming
# become their nearest kin among the three every backend (torchvision, ONNX, PIL) shares.
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear",
                 5: "bilinear"}
PIL_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}


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
    # Whose resize kernel evaluation uses: the one the model's transformers processor runs,
    # so both round alike ("pillow" for timm models, whose processor has no other backend).
    resampler: str = "torchvision"

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
        if self.resampler not in ("torchvision", "pillow"):
            raise ValueError("resampler must be 'torchvision' or 'pillow'")

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


def _interpolation_of(value: Any) -> str:
    """A processor's interpolation (a PIL code or enum, a torchvision mode, timm's name) as
    one of ``_INTERPOLATIONS``; bilinear when it names none."""
    if isinstance(value, str):
        name = value.lower()
        return name if name in _INTERPOLATIONS else "bicubic" if name == "lanczos" else "bilinear"
    if isinstance(value, v2.InterpolationMode):
        return _interpolation_of(value.value)
    try:
        return _PIL_RESAMPLE.get(int(value), "bilinear")
    except (TypeError, ValueError):
        return "bilinear"


def resolve_preprocessing(
    image_processor: Any, image_height: int = -1, image_width: int = -1,
) -> Preprocessing:
    """Size, mean, std and interpolation for a model: the user's size when both are given,
    else the processor's (``crop_size`` when it center-crops, else ``size``; timm:
    ``input_size``), and the interpolation the base model was trained with."""
    data_config = getattr(image_processor, "data_config", None)
    size: tuple[int, int] | None = None
    mean = std = None
    channel_order = "RGB"
    interpolation, resampler = "bilinear", "torchvision"
    if isinstance(data_config, dict):  # transformers' TimmWrapperImageProcessor: Pillow only
        resampler = "pillow"
        input_size = data_config.get("input_size")
        if input_size and len(input_size) == 3:
            size = int(input_size[1]), int(input_size[2])
        mean, std = data_config.get("mean"), data_config.get("std")
        interpolation = _interpolation_of(data_config.get("interpolation"))
    elif image_processor is not None:
        interpolation = _interpolation_of(getattr(image_processor, "resample", None))
        if getattr(image_processor, "do_center_crop", False):
            size = _size_of(getattr(image_processor, "crop_size", None))
        if size is None:
            size = _size_of(getattr(image_processor, "size", None))
        # MobileViT's processor flips channels and never normalises, whatever it stores.
        if getattr(image_processor, "do_flip_channel_order", False):
            channel_order = "BGR"
        if channel_order == "BGR" or (hasattr(image_processor, "do_normalize")
                                      and not image_processor.do_normalize):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # the model expects plain 0..1 input
        else:
            mean = getattr(image_processor, "image_mean", None)
            std = getattr(image_processor, "image_std", None)

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
                         interpolation=interpolation, channel_order=channel_order,
                         resampler=resampler)


def timm_pretrained_cfg(pre: Preprocessing, pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """A timm ``pretrained_cfg`` whose evaluation transform is ``eval_transform(pre)`` (timm's
    "squash" resizes the whole image to the input size; crop_pct 1 keeps all of it)."""
    if pre.channel_order != "RGB":
        raise ValueError("timm models take RGB input")
    return {**pretrained_cfg, "input_size": [3, pre.height, pre.width], "crop_pct": 1.0,
            "crop_mode": "squash", "interpolation": pre.interpolation,
            "mean": list(pre.mean), "std": list(pre.std)}


def to_uint8_tensor(image: Image.Image):
    """A CHW uint8 torch tensor of an image (converted to RGB when it is not)."""
    if image.mode != "RGB":
        image = to_rgb(image)
    array = np.array(image, dtype=np.uint8, copy=True)  # writable: torch warns otherwise
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def hwc_tensor(image: Image.Image):
    """A CHW uint8 view of an HWC copy of the pixels (channels-last strides).

    Same values as ``to_uint8_tensor`` with one copy fewer; torchvision's uint8 resize works
    on this layout natively, so the data loader skips a transpose per image."""
    if image.mode != "RGB":
        image = to_rgb(image)
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


class PillowResize(torch.nn.Module):
    """Resize a uint8 CHW tensor to ``size`` (H, W) with Pillow's antialiased kernels, which
    round differently from torchvision's by a level or a few on some pixels."""

    def __init__(self, size: tuple[int, int], interpolation: str):
        super().__init__()
        self.size, self.interpolation = list(size), interpolation

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pixels = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        resized = pixels.resize((self.size[1], self.size[0]), PIL_CODES[self.interpolation])
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


class FlipChannels(torch.nn.Module):
    """RGB <-> BGR on a CHW tensor (a module, so DataLoader workers can pickle it)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(-3)


class Compose(v2.Compose):
    """``v2.Compose`` that runs its steps on one plain image tensor by calling torchvision's
    kernels directly, with the random parameters drawn by each step's own ``make_params`` (or
    ``torch.rand``) in torchvision's order, and the hue shift of ``visiontune.data.color``.

    The output is the same, to the bit and for the same random state, as ``v2.Compose``'s
    (``tests/data/test_transforms.py``), in less time: it leaves out v2's per-call dispatch
    (flattening the inputs, type checks, kernel lookup) at every step and image, and v2's hue
    kernel (the times: BENCHMARKS.md, *Levers*). Any other input, or a step this class does
    not know, goes through torchvision as usual."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        super().__init__(transforms)
        self.direct = settings.flag("VISIONTUNE_DIRECT_TRANSFORMS")

    def forward(self, *inputs: Any) -> Any:
        if not self.direct or len(inputs) != 1 or type(inputs[0]) is not torch.Tensor:
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


def _finish(pre: Preprocessing, on_device: bool = False) -> list:
    if on_device:  # DeviceNormalize does the rest on the batch, on the GPU
        return []
    steps: list = [v2.ToDtype(torch.float32, scale=True)]
    if pre.channel_order == "BGR":
        steps.append(FlipChannels())
    steps.append(v2.Normalize(mean=list(pre.mean), std=list(pre.std)))
    return steps


class DeviceNormalize(torch.nn.Module):
    """The last steps of the transforms (scale to 0..1, BGR, normalise) on a uint8 NCHW batch
    where it lies: a GPU run's loader sends a quarter of the bytes, and the GPU does in
    microseconds what costs the loader's cores about a millisecond an image. The very steps of
    the per-image transform (``_finish``), whose kernels take a batch too, so the values are
    the same."""

    def __init__(self, pre: Preprocessing):
        super().__init__()
        self.steps = _finish(pre)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            return batch  # already normalised (a float batch from elsewhere)
        for step in self.steps:
            batch = _run_step(step, batch)
        return batch


def eval_transform(pre: Preprocessing, on_device: bool = False) -> Compose:
    """uint8 CHW -> float32 CHW: resize to (H, W), scale to 0..1, normalise. ``on_device``:
    resize only (uint8 out), for ``DeviceNormalize`` on the batch."""
    if pre.resampler == "pillow":
        resize = PillowResize((pre.height, pre.width), pre.interpolation)
    else:
        resize = v2.Resize((pre.height, pre.width),
                           interpolation=_INTERPOLATIONS[pre.interpolation], antialias=True)
    return Compose([resize, *_finish(pre, on_device)])


def train_transform(pre: Preprocessing, augment: bool, on_device: bool = False) -> Compose:
    """With ``augment``: random resized crop, horizontal flip, colour jitter; else eval's.
    ``on_device``: as ``eval_transform``'s."""
    if not augment:
        return eval_transform(pre, on_device)
    return Compose([
        v2.RandomResizedCrop((pre.height, pre.width), scale=CROP_SCALE, ratio=CROP_RATIO,
                             interpolation=_INTERPOLATIONS[pre.interpolation], antialias=True),
        v2.RandomHorizontalFlip(p=FLIP_P),
        v2.RandomApply([v2.ColorJitter(JITTER, JITTER, JITTER, JITTER)], p=JITTER_P),
        *_finish(pre, on_device),
    ])


def describe_augmentations(pre: Preprocessing, augment: bool,
                           on_device: bool = False) -> dict[str, Any]:
    """What the training and evaluation transforms do, for saving beside the model
    (``on_device``: the last steps ran on the GPU, on each batch)."""
    resize = {"name": "Resize", "size": [pre.height, pre.width],
              "interpolation": pre.interpolation, "antialias": True, "resampler": pre.resampler}
    finish: list[dict[str, Any]] = [{"name": "ToDtype", "dtype": "float32", "scale": True}]
    if pre.channel_order == "BGR":
        finish.append({"name": "FlipChannels", "to": "BGR"})
    finish.append({"name": "Normalize", "mean": list(pre.mean), "std": list(pre.std)})
    if on_device:
        finish = [{**step, "on": "device"} for step in finish]
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
