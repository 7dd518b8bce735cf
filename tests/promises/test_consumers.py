"""One model, the same answers everywhere: a fine-tuned model read by the tools users load it
with (transformers' ``pipeline`` on the PyTorch folder, ``visiontune predict``, the MLflow model
in a fresh process, the ONNX export) scores every image alike.

Each processor family is built tiny, with the processor its hub checkpoints ship (sizes,
crops, interpolations), fine-tuned at its default size and at a non-square one, and scored
on images of mixed aspect ratios, where resizing and cropping change the pixels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from visiontune.config import resolve
from visiontune.data.transforms import Preprocessing, eval_transform
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS
from visiontune.training.finetune import finetune, hf_image_processor

LABELS = ["red", "green", "blue"]
TOLERANCE = 1e-4  # probabilities; top-1 labels must be equal
NON_SQUARE = (64, 96)  # (height, width)
# (height, width) of the scored images: wide, tall, square, small and large
SHAPES = [(37, 53), (120, 41), (64, 64), (130, 200), (31, 90), (90, 31), (256, 180), (45, 45)]
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def _maps() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}


def build_family(family: str):
    """(model, processor) of a tiny ``family`` model with the processor its checkpoints use
    (None for timm-wrapper models, whose preprocessing is in the config)."""
    import transformers as T

    vit = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64}
    if family == "vit":
        return (T.ViTForImageClassification(T.ViTConfig(image_size=224, patch_size=16, **vit, **_maps())),
                T.ViTImageProcessor())
    if family == "deit":
        return (T.DeiTForImageClassification(T.DeiTConfig(image_size=224, patch_size=16, **vit, **_maps())),
                T.DeiTImageProcessor())
    if family == "beit":
        return (T.BeitForImageClassification(T.BeitConfig(image_size=224, patch_size=16, **vit, **_maps())),
                T.BeitImageProcessor())
    if family in ("swin", "swinv2"):
        config = (T.SwinConfig if family == "swin" else T.Swinv2Config)(
            image_size=224, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
            window_size=7, **_maps())
        model = (T.SwinForImageClassification if family == "swin"
                 else T.Swinv2ForImageClassification)(config)
        return model, T.ViTImageProcessor(resample=3, **IMAGENET)
    if family == "convnext":
        return (T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **_maps())), T.ConvNextImageProcessor())
    if family in ("resnet", "regnet"):
        if family == "resnet":
            model = T.ResNetForImageClassification(T.ResNetConfig(
                embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", **_maps()))
        else:
            model = T.RegNetForImageClassification(T.RegNetConfig(
                embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, **_maps()))
        return model, T.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, resample=3)
    if family == "mobilevit":
        config = T.MobileViTConfig(image_size=256, hidden_sizes=[16, 16, 16],
                                   neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_attention_heads=2,
                                   **_maps())
        return T.MobileViTForImageClassification(config), T.MobileViTImageProcessor()
    if family == "dinov2":
        return (T.Dinov2ForImageClassification(T.Dinov2Config(image_size=224, patch_size=14, **vit, **_maps())),
                T.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                    do_center_crop=True, resample=3, **IMAGENET))
    raise ValueError(family)


def save_family(family: str, folder: Path, builtin: Path | None = None) -> Path:
    """The base model folder of ``family``: a tiny model saved with its processor, or for
    "timm" a tiny timm-wrapper model with the built-in model's preprocessing (bicubic, a
    centre crop of 87.5 %), or for "builtin" the imported EfficientNet-Lite0."""
    if family == "builtin":
        return builtin
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if family == "timm":
        import timm
        from transformers import TimmWrapperForImageClassification

        from visiontune.models.builtin import save_timm_wrapper, timm_wrapper_config

        pretrained_cfg = {"architecture": "test_efficientnet", "input_size": (3, 64, 64),
                          "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "classifier": "classifier"}
        model = TimmWrapperForImageClassification(timm_wrapper_config("test_efficientnet", LABELS, pretrained_cfg))
        model.timm_model.load_state_dict(
            timm.create_model("test_efficientnet", num_classes=len(LABELS)).state_dict())
        save_timm_wrapper(model, folder)
        return folder
    model, processor = build_family(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _image(shape, tint: int, seed: int):
    """A smooth RGB image (low-resolution noise, enlarged) tinted towards one channel."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 120, (max(2, shape[0] // 6), max(2, shape[1] // 6), 3)).astype(np.uint8)
    low[..., tint] += 120
    return Image.fromarray(low).resize((shape[1], shape[0]), Image.BICUBIC)


def write_images(folder: Path, count: int, seed: int) -> list[tuple[Path, str]]:
    """``count`` images of mixed shapes and formats (PNG and JPEG) with their tint labels."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        tint = i % len(LABELS)
        path = folder / f"{seed}_{i}.{'jpg' if i % 4 == 3 else 'png'}"
        _image(SHAPES[i % len(SHAPES)], tint, seed * 1000 + i).save(path, quality=90)
        written.append((path, LABELS[tint]))
    return written


def _jsonl(rows, path: Path) -> Path:
    path.write_text("".join(json.dumps({"image_url": str(p), "label": label}) + "\n" for p, label in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("consumers")
    train = _jsonl(write_images(root / "train", 24, seed=1), root / "train.jsonl")
    val = _jsonl(write_images(root / "val", 9, seed=2), root / "val.jsonl")
    scored = [p for p, _ in write_images(root / "scored", 24, seed=3)]
    return train, val, scored


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    from visiontune.models.importer import import_model

    return import_model(model_name="efficientnet-lite0",
                        output_dir=tmp_path_factory.mktemp("builtin") / "model")


# The scoring that runs in a fresh process: transformers' pipeline on the PyTorch folder and the
# MLflow model, as users load them, each returning probabilities in LABELS order.
FRESH = textwrap.dedent("""
    import base64, json, sys
    import pandas as pd
    labels, images, pytorch_dir, mlflow_dir, out = json.loads(sys.argv[1])
    from transformers import pipeline
    classify = pipeline("image-classification", model=pytorch_dir, top_k=None, device="cpu")
    answers = classify(images)
    hf = [[next(a["score"] for a in answer if a["label"] == l) for l in labels] for answer in answers]
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(mlflow_dir)
    frame = pd.DataFrame({"image": [base64.b64encode(open(p, "rb").read()).decode() for p in images]})
    rows = model.predict(frame)
    ml = [[dict(zip(r["labels"], r["probs"]))[l] for l in labels] for _, r in rows.iterrows()]
    json.dump({"pipeline": hf, "mlflow": ml}, open(out, "w"))
""")


def _predict(model: Path, images: list[Path], out: Path, runtime: str) -> np.ndarray:
    """Probabilities from ``visiontune predict`` (in LABELS order)."""
    from visiontune.cli import main

    listing = out.with_suffix(".txt")
    listing.write_text("".join(f"{p}\n" for p in images))
    assert main(["predict", "--model", str(model), "--data", str(listing), "--output", str(out),
                 "--runtime", runtime]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return np.array([[row["probs"][label] for label in LABELS] for row in rows])


def check_consumers(family: str, size, data, tmp_path, builtin=None) -> None:
    from visiontune.onnx_export import export_onnx

    train, val, scored = data
    base = save_family(family, tmp_path / "base", builtin)
    out, mlflow_dir = tmp_path / "pt", tmp_path / "mlflow"
    height, width = size or (-1, -1)
    finetune(resolve(FINETUNE_INPUTS, {
        "model_path": str(base), "training_data": str(train), "validation_data": str(val),
        "task_name": MULTICLASS, "output_dir_pytorch": str(out), "output_dir_mlflow": str(mlflow_dir),
        "number_of_epochs": 2, "learning_rate": 5e-3, "training_batch_size": 8,
        "validation_batch_size": 16, "number_of_workers": 0, "image_height": height,
        "image_width": width, "apply_augmentations": False}))
    pre = Preprocessing.from_dict(json.loads((out / "model_selector_args.json").read_text())["preprocessing"])
    if size:
        assert (pre.height, pre.width) == size

    fresh = tmp_path / "fresh.json"
    subprocess.run([sys.executable, "-c", FRESH, json.dumps(
        [LABELS, [str(p) for p in scored], str(out), str(mlflow_dir), str(fresh)])],
        check=True, timeout=600)
    answers = {name: np.array(probs) for name, probs in json.loads(fresh.read_text()).items()}
    reference = _predict(out, scored, tmp_path / "predict.jsonl", "pytorch")
    export_onnx(out, out / "onnx")
    answers["onnx"] = _predict(out, scored, tmp_path / "onnx.jsonl", "onnxruntime")

    assert reference.shape == (len(scored), len(LABELS))
    for name, probs in answers.items():
        assert np.array_equal(probs.argmax(1), reference.argmax(1)), f"{family} {name}: top-1 differs"
        worst = float(np.abs(probs - reference).max())
        assert worst <= TOLERANCE, f"{family} {name}: probabilities differ by {worst:.2e}"


FAMILIES = ("vit", "deit", "beit", "swin", "swinv2", "convnext", "resnet", "regnet", "mobilevit",
            "dinov2", "timm", "builtin")
# The default run scores a few cases end to end (every consumer, every kind of processor
# rewrite); the slow stage runs the whole matrix.
QUICK = {("convnext", NON_SQUARE), ("timm", None), ("mobilevit", NON_SQUARE), ("deit", None)}


@pytest.mark.parametrize("family,size", [
    pytest.param(f, s, marks=() if (f, s) in QUICK else pytest.mark.slow,
                 id=f"{f}-{'default' if s is None else 'x'.join(map(str, s))}")
    for f in FAMILIES for s in (None, NON_SQUARE)])
def test_every_consumer_scores_alike(family, size, data, tmp_path, request):
    check_consumers(family, size, data, tmp_path,
                    request.getfixturevalue("builtin") if family == "builtin" else None)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("timm", "builtin")])
def test_saved_processor_computes_the_evaluation_transform(family, tmp_path):
    """Every family's preprocessing, written by ``hf_image_processor`` and read back by
    ``AutoImageProcessor``, gives the pixels of ``eval_transform``: at the family's size and
    at a non-square one, with its mean, std, interpolation and channel order."""
    from torchvision.transforms.v2 import functional as F
    from transformers import AutoImageProcessor

    from visiontune.data.transforms import resolve_preprocessing

    _, processor = build_family(family)
    images = [_image(shape, i % 3, i) for i, shape in enumerate(SHAPES)]
    images.append(images[0].convert("L"))  # a grey image is read as RGB by both
    for height, width in ((-1, -1), NON_SQUARE):
        pre = resolve_preprocessing(processor, height, width)
        hf_image_processor(pre).save_pretrained(tmp_path)
        read = AutoImageProcessor.from_pretrained(tmp_path)
        got = read(images=images, return_tensors="pt")["pixel_values"]
        want = torch.stack([eval_transform(pre)(F.pil_to_tensor(im.convert("RGB"))) for im in images])
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-5, family
