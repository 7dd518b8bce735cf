"""Load an imported model folder (or any Hugging Face image-classification folder) for training."""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

from visiontune import settings
from visiontune.errors import UserError, first_line
from visiontune.tasks import PROBLEM_TYPES, check_task

log = logging.getLogger(__name__)


def _model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path} holds no Hugging Face model (no config.json); pass the output folder of "
            "`visiontune import-model` or a folder written by save_pretrained"
        )
    return path


def load_config(model_dir: str | Path, **kwargs):
    """The model's ``PretrainedConfig``; a UserError when it is missing or not a model config."""
    path = _model_dir(model_dir)
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read the model config in {path}: {first_line(exc)}") from None


def checkpoint_labels(config) -> list[str]:
    """The checkpoint's class names in index order (timm folders store them as label_names)."""
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label, key=int)]


def load_image_processor(model_dir: str | Path):
    """``AutoImageProcessor.from_pretrained(model_dir)`` with a one-line error when there is none.

    For timm-wrapper folders transformers reads the preprocessing from ``pretrained_cfg`` in
    config.json, not from preprocessor_config.json."""
    path = _model_dir(model_dir)
    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"no usable image processor in {path} (preprocessor_config.json): {first_line(exc)}"
        ) from None


def _heads(model, num_labels: int) -> list:
    """The classification head(s): the last Linear layers that produce the logits.

    Native models name them ``classifier`` (a few add a distillation head); timm models say
    which module is theirs through ``get_classifier()``."""
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "get_classifier"):
        head = timm_model.get_classifier()
        layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        return layers[-1:]
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not any(p.startswith("classifier") or p in ("head", "fc") for p in parts):
            continue
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            found.append(module)
        elif isinstance(module, nn.Conv2d) and module.out_channels == num_labels and module.kernel_size == (1, 1):
            found.append(module)
    return found


def _reinit_heads(model, num_labels: int) -> None:
    """Fresh head weights, drawn by the model's own initialiser as for a resized head."""
    heads = _heads(model, num_labels)
    if not heads:
        log.warning(
            "could not find the classification head of %s to re-initialise it; the checkpoint's "
            "head (trained on other classes) is kept as a starting point", type(model).__name__,
        )
        return
    with torch.no_grad():
        for head in heads:
            before = head.weight.detach().clone()
            # from_pretrained marks loaded tensors as initialised; the init helpers skip those.
            for tensor in head.parameters(recurse=False):
                tensor._is_hf_initialized = False
            head._is_hf_initialized = False
            model._init_weights(head)
            if torch.equal(before, head.weight):  # an initialiser that ignores this layer
                head.weight.normal_(mean=0.0, std=float(getattr(model.config, "initializer_range", 0.02) or 0.02))
                if head.bias is not None:
                    head.bias.zero_()


def _reorder_heads(model, order: list[int]) -> bool:
    """Put the trained head's rows in the new class order; False when the head is not found."""
    heads = _heads(model, len(order))
    if not heads:
        return False
    index = torch.tensor(order)
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(head.weight[index])
            if head.bias is not None:
                head.bias.copy_(head.bias[index])
    return True


def load_float32_classifier(path: str | Path, option: str, **kwargs):
    """``AutoModelForImageClassification.from_pretrained`` in float32, whatever dtype the weights
    were saved in (transformers keeps the saved one: a DeepSpeed precision-16 run saves 16-bit
    weights); weights that cannot be read, damaged or cut short included, are one line naming
    ``option``."""
    try:
        return AutoModelForImageClassification.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{option}: cannot load the model in {path}: {first_line(exc)}") from None


def load_for_finetune(model_dir: str | Path, classes: list[str], task: str,
                      size: tuple[int, int] | None = None):
    """The model with a head for ``classes`` and the loss of ``task``.

    - Same classes as the checkpoint (continual fine-tuning): the trained head is kept, its
      rows reordered if the classes come in another order.
    - Otherwise the head is new: resized by transformers when the class count differs, and
      re-initialised here when only the names differ (transformers would otherwise keep
      rows that belong to other classes).
    The problem type chooses the loss, for native and timm-wrapper models alike
    (cross-entropy for single-label, BCE-with-logits for multi-label)."""
    check_task(task)
    classes = [str(c) for c in classes]
    if not classes:
        raise UserError("no classes to train on")
    if len(set(classes)) != len(classes):
        raise UserError("class names must be unique")
    path = _model_dir(model_dir)
    config = load_config(path)
    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        raise UserError(
            f"{path}: model type {config.model_type!r} has no image-classification model in transformers"
        )
    old_labels = checkpoint_labels(config)
    model = load_float32_classifier(
        path, "--model_path",
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={name: i for i, name in enumerate(classes)},
        ignore_mismatched_sizes=True,
        problem_type=PROBLEM_TYPES[task],
    )
    if old_labels == classes:
        log.info("classes match the checkpoint's: keeping its trained head (%d classes)", len(classes))
    elif sorted(old_labels) == sorted(classes) and _reorder_heads(model, [old_labels.index(c) for c in classes]):
        log.info("classes match the checkpoint's in another order: its head rows were reordered")
    else:
        if len(old_labels) == len(classes):
            _reinit_heads(model, len(classes))
        log.info("new classification head: %d classes (checkpoint had %d)", len(classes), len(old_labels))
    model.config.label2id = {name: i for i, name in enumerate(classes)}
    if getattr(model.config, "model_type", None) == "timm_wrapper":
        # TimmWrapperConfig saves labels as ``label_names`` but keeps the checkpoint's stale
        # list when loaded with new labels; saved as is, the fine-tuned model would reload with
        # LABEL_0.. names (or the old classes). Make it follow id2label.
        model.config.label_names = list(classes)
    return accept_any_image_size(model, size)


def _size_pair(value) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def accept_any_image_size(model, size: tuple[int, int] | None = None):
    """Let position-embedding models (ViT, DeiT, BEiT, ...) take ``image_height`` x
    ``image_width`` inputs other than their pre-training size.

    Their forward interpolates the position embeddings only when asked
    (``interpolate_pos_encoding``), and refuses other sizes otherwise; it is a no-op at the
    pre-training size. Set on the instance, so training, evaluation and ONNX export all use it;
    not when the model's own size is ``size`` (a fine-tuned model made native at its size by
    ``native_image_size``), which it runs as is.
    """
    if size is not None and _size_pair(getattr(model.config, "image_size", None)) == tuple(size):
        return model
    forward = model.forward
    if "interpolate_pos_encoding" in inspect.signature(forward).parameters:
        model.forward = functools.partial(forward, interpolate_pos_encoding=True)
    return model


def native_image_size(folder: str | Path, height: int, width: int) -> bool:
    """Make a saved position-embedding model that was trained at (``height``, ``width``), not
    at its config's size, a model OF that size: its position embeddings interpolated once, as
    its forward did at every training step, stored, and ``config.image_size`` set. Tools that
    run it without ``interpolate_pos_encoding`` (transformers' pipeline, ONNX, Azure's scoring)
    then take the trained size and give the trained logits. Returns whether it changed."""
    size = _size_pair(getattr(load_config(Path(folder)), "image_size", None))
    if size is None or size == (height, width):  # nothing to bake: not loaded at all
        return False
    model = load_float32_classifier(folder, "output_dir_pytorch")
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    embeddings = getattr(base, "embeddings", None)
    position = getattr(embeddings, "position_embeddings", None)
    patches = getattr(embeddings, "patch_embeddings", None)
    if (not isinstance(position, torch.nn.Parameter) or position.ndim != 3 or not hasattr(embeddings, "interpolate_pos_encoding")
            or not hasattr(patches, "num_patches") or not hasattr(patches, "patch_size")
            or "interpolate_pos_encoding" not in inspect.signature(model.forward).parameters):
        return False
    extra = position.shape[1] - patches.num_patches  # class (and distillation) tokens
    patch = _size_pair(patches.patch_size)
    count = (height // patch[0]) * (width // patch[1])
    with torch.no_grad():
        resized = embeddings.interpolate_pos_encoding(
            torch.zeros(1, extra + count, position.shape[-1]), height, width)
    if resized.shape != (1, extra + count, position.shape[-1]):
        return False
    embeddings.position_embeddings = torch.nn.Parameter(resized.detach().clone())
    patches.image_size, patches.num_patches = (height, width), count
    model.config.image_size = [height, width]
    model.save_pretrained(folder)
    return True


def is_cnn(model) -> bool:
    """Built of convolutions: a CNN (or a hybrid), not a ViT, DeiT, BEiT or Swin, whose one
    convolution is the patch embedding."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) >= 2


def prefer_channels_last(model):
    """A CNN in channels-last memory format; other models as they are.

    oneDNN (CPU) and cuDNN (GPU, with mixed precision) run convolutions fastest on NHWC
    tensors; in the default NCHW format every convolution reorders its input and output.
    What it is worth in training: BENCHMARKS.md, *Levers*.
    Values equal the NCHW model's up to float rounding, and ``save_pretrained`` writes the same
    tensors. Not for a model with a strided 1x1 convolution of fewer than 16 input channels:
    oneDNN's channels-last backward of those crashes the process on AVX-512 CPUs (torch 2.14;
    ResNet-style shortcuts of small models)."""
    if (not settings.flag("VISIONTUNE_CHANNELS_LAST") or not is_cnn(model)
            or any(_crashes_channels_last(m) for m in model.modules())):
        return model
    return model.to(memory_format=torch.channels_last)


def _crashes_channels_last(module) -> bool:
    return (isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and max(module.stride) > 1 and module.in_channels < 16)


