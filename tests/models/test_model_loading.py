"""load_for_finetune and load_image_processor on native and timm-wrapper models."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import KINDS, random_images, save_tiny_model, tiny_labels
from visiontune.errors import UserError
from visiontune.models.importer import import_model
from visiontune.models.loading import load_for_finetune, load_image_processor

MULTICLASS, MULTILABEL = "image-classification", "image-classification-multilabel"
HEAD_WEIGHT = {  # where each kind keeps its head, in the saved file
    "vit": "classifier.weight", "convnext": "classifier.weight", "resnet": "classifier.1.weight",
    "timm": "timm_model.classifier.weight",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny_model(kind, root / kind) for kind in KINDS}


def _head(model, kind):
    if kind == "timm":
        return model.timm_model.get_classifier()
    return model.classifier[1] if kind == "resnet" else model.classifier


def _pixels(folder):
    return load_image_processor(folder)(random_images(), return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("kind", KINDS)
def test_head_resized_for_new_classes(tiny, kind):
    classes = ["cat", "dog", "fish", "bird", "cow"]
    model = load_for_finetune(tiny[kind], classes, MULTICLASS)
    assert _head(model, kind).weight.shape[0] == 5
    assert model.config.num_labels == 5
    assert model.config.id2label == dict(enumerate(classes))
    assert model.config.label2id == {c: i for i, c in enumerate(classes)}
    assert model(pixel_values=_pixels(tiny[kind])).logits.shape == (2, 5)


@pytest.mark.parametrize("kind", KINDS)
def test_head_kept_for_the_same_classes(tiny, kind):
    saved = load_file(tiny[kind] / "model.safetensors")[HEAD_WEIGHT[kind]]
    model = load_for_finetune(tiny[kind], tiny_labels(3), MULTICLASS)
    torch.testing.assert_close(_head(model, kind).weight, saved, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_head_renewed_when_only_names_differ(tiny, kind):
    """Same count, other classes: the old rows belong to other classes and must not stay."""
    saved = load_file(tiny[kind] / "model.safetensors")[HEAD_WEIGHT[kind]]
    model = load_for_finetune(tiny[kind], ["x", "y", "z"], MULTICLASS)
    head = _head(model, kind)
    assert head.weight.shape == saved.shape and not torch.equal(head.weight, saved)
    assert torch.isfinite(head.weight).all() and 0 < head.weight.std() < 1


@pytest.mark.parametrize("kind", KINDS)
def test_head_rows_follow_a_new_class_order(tiny, kind):
    saved = load_file(tiny[kind] / "model.safetensors")[HEAD_WEIGHT[kind]]
    model = load_for_finetune(tiny[kind], ["class_2", "class_0", "class_1"], MULTICLASS)
    torch.testing.assert_close(_head(model, kind).weight, saved[[2, 0, 1]], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_problem_type_sets_the_loss(tiny, kind):
    pixels = _pixels(tiny[kind])
    multi = load_for_finetune(tiny[kind], ["a", "b", "c", "d"], MULTILABEL)
    assert multi.config.problem_type == "multi_label_classification"
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    out = multi(pixel_values=pixels, labels=targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets)
    torch.testing.assert_close(out.loss, expected)

    single = load_for_finetune(tiny[kind], ["a", "b", "c", "d"], MULTICLASS)
    assert single.config.problem_type == "single_label_classification"
    labels = torch.tensor([3, 0])
    out = single(pixel_values=pixels, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_builtin_timm_wrapper_gets_a_new_head(tmp_path):
    folder = import_model(model_name="efficientnet-lite0", output_dir=tmp_path / "b0")
    model = load_for_finetune(folder, ["daisy", "rose"], MULTILABEL)
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    head = model.timm_model.get_classifier()
    assert (head.out_features, head.in_features) == (2, 1280)
    assert model.config.problem_type == "multi_label_classification"
    # The backbone keeps its ImageNet weights.
    saved = load_file(folder / "model.safetensors")
    torch.testing.assert_close(model.timm_model.conv_stem.weight, saved["timm_model.conv_stem.weight"])
    processor = load_image_processor(folder)
    pixels = processor(random_images(1, size=64), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    assert model(pixel_values=pixels).logits.shape == (1, 2)


def test_timm_checkpoint_saved_after_finetune_reloads_its_classes(tiny, tmp_path):
    """What continual fine-tuning relies on: a saved timm wrapper keeps its new labels."""
    model = load_for_finetune(tiny["timm"], ["a", "b"], MULTICLASS)
    model.save_pretrained(tmp_path / "ft")
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "ft").id2label == {0: "a", 1: "b"}
    again = load_for_finetune(tmp_path / "ft", ["a", "b"], MULTICLASS)
    torch.testing.assert_close(again.timm_model.get_classifier().weight, model.timm_model.get_classifier().weight)
    # The processor of a timm folder lives in config.json, so it survives save_pretrained.
    assert load_image_processor(tmp_path / "ft") is not None


def test_image_processor_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_image_processor(tmp_path)
    folder = shutil.copytree(tiny["vit"], tmp_path / "no_processor")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(UserError, match="no usable image processor"):
        load_image_processor(folder)


def test_load_for_finetune_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_for_finetune(tmp_path / "missing", ["a"], MULTICLASS)
    with pytest.raises(UserError, match="unknown task"):
        load_for_finetune(tiny["vit"], ["a", "b"], "detection")
    with pytest.raises(UserError, match="unique"):
        load_for_finetune(tiny["vit"], ["a", "a"], MULTICLASS)


@pytest.mark.parametrize("kind", ["resnet", "vit", "timm"])
def test_16_bit_weights_reload_as_float32_for_training_and_scoring(kind, tmp_path):
    """What a DeepSpeed precision-16 run saves: bf16 weights. Prediction, evaluation and serving
    (Classifier) and a further fine-tune reload them as float32; a CNN would otherwise fail
    with 'Input type (float) and bias type (BFloat16)'."""
    import numpy as np
    from transformers import AutoModelForImageClassification

    from visiontune.inference import Classifier

    folder = save_tiny_model(kind, tmp_path / "model", image_size=32)
    reference = Classifier(folder, device="cpu").logits(random_images(2))
    bf16 = AutoModelForImageClassification.from_pretrained(str(folder)).to(torch.bfloat16)
    bf16.save_pretrained(str(folder))  # as DeepSpeed's precision-16 save leaves them
    classifier = Classifier(folder, device="cpu")
    assert {p.dtype for p in classifier.model.parameters()} == {torch.float32}
    logits = classifier.logits(random_images(2))
    assert logits.dtype == np.float32 and np.allclose(logits, reference, atol=0.1)
    trained = load_for_finetune(folder, ["a", "b", "c"], "image-classification")
    assert {p.dtype for p in trained.parameters()} == {torch.float32}


@pytest.mark.parametrize("size", [(32, 48), (48, 32), (64, 64)])
def test_a_vit_trained_at_another_size_is_saved_native_at_that_size(tiny, tmp_path, size):
    """The stored position embeddings are the ones the forward interpolated at every training
    step: the saved model gives the same logits at that size without interpolate_pos_encoding
    (transformers' pipeline, ONNX), and visiontune runs it as is."""
    from transformers import AutoModelForImageClassification

    from visiontune.models.loading import accept_any_image_size, native_image_size

    folder = tmp_path / "vit"
    shutil.copytree(tiny["vit"], folder)
    pixels = torch.randn(2, 3, *size)
    before = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = before(pixels, interpolate_pos_encoding=True).logits
    assert native_image_size(folder, *size)
    after = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert list(after.config.image_size) == list(size)
    with torch.no_grad():
        torch.testing.assert_close(after(pixels).logits, expected, rtol=1e-5, atol=1e-5)
        again = accept_any_image_size(after, size)  # no interpolation flag at its own size
        torch.testing.assert_close(again(pixels).logits, expected, rtol=1e-5, atol=1e-5)
    assert not native_image_size(folder, *size)  # already native: left alone


def test_models_without_position_embeddings_are_left_alone(tiny, tmp_path):
    from visiontune.models.loading import native_image_size

    folder = tmp_path / "convnext"
    shutil.copytree(tiny["convnext"], folder)
    weights = (folder / "model.safetensors").read_bytes()
    assert not native_image_size(folder, 32, 48)
    assert (folder / "model.safetensors").read_bytes() == weights
