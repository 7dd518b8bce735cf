"""Tiny randomly initialised image classifiers saved as Hugging Face folders, for fast tests.

Each folder loads with ``AutoModelForImageClassification`` and ``AutoImageProcessor`` alone and
a forward pass on a few 32x32 images takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("vit", "convnext", "resnet", "timm")


def tiny_labels(num_labels: int) -> list[str]:
    return [f"class_{i}" for i in range(num_labels)]


def _label_maps(labels: list[str]) -> dict:
    return {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}


def build_tiny_model(kind: str, num_labels: int = 3, image_size: int = 32, labels: list[str] | None = None,
                     seed: int = 0):
    """(model, image_processor) for ``kind`` in KINDS, with ``id2label`` set."""
    import torch

    labels = list(labels) if labels is not None else tiny_labels(num_labels)
    maps = _label_maps(labels)
    torch.manual_seed(seed)
    if kind == "vit":
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        config = ViTConfig(
            image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, **maps,
        )
        model = ViTForImageClassification(config)
        processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    elif kind in ("convnext", "resnet"):
        from transformers import ConvNextImageProcessor

        if kind == "convnext":
            from transformers import ConvNextConfig, ConvNextForImageClassification

            config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **maps)
            model = ConvNextForImageClassification(config)
        else:
            from transformers import ResNetConfig, ResNetForImageClassification

            config = ResNetConfig(
                # 16 channels: the smallest width real ResNets' channels-last path runs at
                embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", **maps,
            )
            model = ResNetForImageClassification(config)
        # ResNet checkpoints on the hub use the ConvNeXt processor too.
        processor = ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=1.0)
    elif kind == "timm":
        from transformers import TimmWrapperForImageClassification

        from visiontune.models.builtin import timm_wrapper_config

        pretrained_cfg = {
            "architecture": "test_efficientnet", "input_size": (3, image_size, image_size),
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "classifier": "classifier",
        }
        import timm

        model = TimmWrapperForImageClassification(
            timm_wrapper_config("test_efficientnet", labels, pretrained_cfg)
        )
        # The wrapper's initialiser draws every conv from N(0, 0.02), which makes an untrained
        # net's eval-mode output vanish; timm's own initialisation keeps the logits informative.
        model.timm_model.load_state_dict(
            timm.create_model("test_efficientnet", num_classes=len(labels)).state_dict()
        )
        processor = None  # lives in config.json (pretrained_cfg)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    return model.eval(), processor


def save_tiny_model(kind: str, path, num_labels: int = 3, image_size: int = 32,
                    labels: list[str] | None = None, seed: int = 0) -> Path:
    """Save a tiny ``kind`` classifier and its image processor into ``path``; return the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_model(kind, num_labels, image_size, labels, seed)
    if kind == "timm":
        from visiontune.models.builtin import save_timm_wrapper

        save_timm_wrapper(model, path)
    else:
        model.save_pretrained(path)
        processor.save_pretrained(path)
    return path


def random_images(count: int = 2, size: int = 40, seed: int = 0):
    """RGB PIL images of random noise (not square, so resizing is exercised)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(count)]
