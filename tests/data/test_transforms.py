"""Transforms, Preprocessing and its resolution from real image processors."""

import logging
import pickle

import numpy as np

import pytest
import torch
from transformers import (
    ConvNextImageProcessor, MobileViTImageProcessor, TimmWrapperImageProcessor, ViTImageProcessor,
)

from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visiontune.data.color import adjust_hue
from visiontune.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, Preprocessing, describe_augmentations, eval_transform,
    resolve_preprocessing, train_transform,
)


def image(height=50, width=70, value=None, seed=0):
    if value is not None:
        return torch.full((3, height, width), value, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


PRE = Preprocessing(height=32, width=24, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1))


def test_eval_transform_resizes_and_normalises_exactly():
    out = eval_transform(PRE)(image(value=255))
    assert out.dtype == torch.float32 and out.shape == (3, 32, 24)
    expected = [(1 - 0.5) / 0.25, (1 - 0.4) / 0.2, (1 - 0.3) / 0.1]
    assert torch.allclose(out[:, 0, 0], torch.tensor(expected))
    zero = eval_transform(PRE)(image(value=0))
    assert torch.allclose(zero[:, 5, 5], torch.tensor([-2.0, -2.0, -3.0]))


def test_eval_transform_is_deterministic_and_has_no_crop():
    # A bright stripe at the left edge survives a plain resize (a center crop would cut it).
    picture = torch.zeros((3, 40, 100), dtype=torch.uint8)
    picture[:, :, :10] = 255
    transform = eval_transform(Preprocessing(height=20, width=50, mean=(0, 0, 0), std=(1, 1, 1)))
    out = transform(picture)
    assert out.shape == (3, 20, 50)
    assert out[:, :, :4].min() > 0.99 and out[:, :, 6:].max() < 0.01
    assert torch.equal(out, transform(picture))


def test_train_transform_shapes_and_randomness():
    augmented = train_transform(PRE, augment=True)
    torch.manual_seed(0)
    first = augmented(image())
    second = augmented(image())
    assert first.dtype == torch.float32 and first.shape == (3, 32, 24)
    assert not torch.equal(first, second)
    plain = train_transform(PRE, augment=False)
    assert torch.equal(plain(image()), eval_transform(PRE)(image()))


def test_transforms_pickle_for_dataloader_workers():
    for transform in (train_transform(PRE, True), eval_transform(PRE)):
        clone = pickle.loads(pickle.dumps(transform))
        assert clone(image()).shape == (3, 32, 24)


def test_preprocessing_round_trip_and_checks():
    data = PRE.to_dict()
    assert data == {"height": 32, "width": 24, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.1],
                    "interpolation": "bilinear", "resize": "resize", "channel_order": "RGB",
                    "resampler": "torchvision"}
    assert Preprocessing.from_dict({**data, "future_key": 1}) == PRE
    with pytest.raises(ValueError):
        Preprocessing(height=0, width=5)
    with pytest.raises(ValueError):
        Preprocessing(height=5, width=5, interpolation="lanczos")
    with pytest.raises(ValueError):
        Preprocessing(height=5, width=5, resampler="opencv")


def test_describe_augmentations():
    on = describe_augmentations(PRE, True)
    assert on["apply_augmentations"] is True
    assert [s["name"] for s in on["train"]] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "ToDtype", "Normalize"]
    assert on["train"][0]["scale"] == [0.08, 1.0] and on["train"][0]["size"] == [32, 24]
    assert on["train"][2]["p"] == 0.5 and on["train"][2]["transforms"][0]["hue"] == 0.4
    assert [s["name"] for s in on["eval"]] == ["Resize", "ToDtype", "Normalize"]
    off = describe_augmentations(PRE, False)
    assert off["train"] == off["eval"] and off["preprocessing"]["height"] == 32
    import json
    json.dumps(on)  # serialisable


def test_vit_processor():
    pre = resolve_preprocessing(ViTImageProcessor())
    assert (pre.height, pre.width) == (224, 224)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    custom = ViTImageProcessor(size={"height": 160, "width": 128}, image_mean=[0.1, 0.2, 0.3],
                               image_std=[0.4, 0.5, 0.6])
    pre = resolve_preprocessing(custom)
    assert (pre.height, pre.width, pre.mean, pre.std) == (160, 128, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_convnext_processor_shortest_edge():
    processor = ConvNextImageProcessor(size={"shortest_edge": 288})
    pre = resolve_preprocessing(processor)
    assert (pre.height, pre.width) == (288, 288)
    assert pre.mean == tuple(float(m) for m in processor.image_mean)


def test_center_crop_processor_uses_crop_size():
    processor = ViTImageProcessor(size={"height": 256, "width": 256}, do_center_crop=True,
                                  crop_size={"height": 224, "width": 200})
    if not getattr(processor, "do_center_crop", False):
        pytest.skip("this ViT processor has no center crop")
    pre = resolve_preprocessing(processor)
    assert (pre.height, pre.width) == (224, 200)


def test_timm_wrapper_processor():
    processor = TimmWrapperImageProcessor(pretrained_cfg={
        "input_size": [3, 240, 260], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "crop_pct": 0.875, "interpolation": "bicubic",
    })
    pre = resolve_preprocessing(processor)
    assert (pre.height, pre.width) == (240, 260)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.25, 0.25, 0.25)
    assert pre.interpolation == "bicubic"  # the interpolation the base model was trained with


def test_explicit_size_wins_only_when_both_are_given():
    processor = ViTImageProcessor()
    assert (resolve_preprocessing(processor, 100, 120).height,
            resolve_preprocessing(processor, 100, 120).width) == (100, 120)
    pre = resolve_preprocessing(processor, 100, -1)
    assert (pre.height, pre.width) == (224, 224)


def test_missing_mean_falls_back_to_imagenet_with_warning(caplog):
    class Bare:
        size = {"height": 64, "width": 48}

    with caplog.at_level(logging.WARNING):
        pre = resolve_preprocessing(Bare())
    assert (pre.height, pre.width) == (64, 48)
    assert pre.mean == IMAGENET_MEAN and pre.std == IMAGENET_STD
    assert "ImageNet" in caplog.text
    with pytest.raises(ValueError, match="image_height and image_width"):
        resolve_preprocessing(object())
    assert resolve_preprocessing(None, 10, 20).width == 20


def test_processor_without_normalisation_and_bgr():
    # MobileViT only rescales to 0..1 and feeds BGR.
    pre = resolve_preprocessing(MobileViTImageProcessor())
    assert (pre.height, pre.width) == (256, 256)
    assert pre.mean == (0, 0, 0) and pre.std == (1, 1, 1) and pre.channel_order == "BGR"
    red = torch.zeros((3, 8, 8), dtype=torch.uint8)
    red[0] = 255
    out = eval_transform(pre)(red)
    assert out[:, 0, 0].tolist() == [0.0, 0.0, 1.0]


# -- the fast paths against torchvision ------------------------------------------------------
def rgb_grid(step=3):
    """Every RGB triple on a grid (both ends included), as a (3, N, 86) uint8 image."""
    values = torch.arange(0, 256, step, dtype=torch.uint8)
    return torch.cartesian_prod(values, values, values).T.reshape(3, -1, 86)


@pytest.mark.parametrize("hue_factor", [-0.5, -0.37, -1e-7, -1e-9, 0.0, 1e-9, 0.05, 0.2, 1 / 3, 0.5])
def test_hue_shift_is_torchvisions_to_the_bit(hue_factor):
    """On every colour of a dense grid, greys and the saturated edges included; tiny negative
    shifts round hues of 0 up to a full turn, which torchvision takes modulo 6 sectors."""
    grid = rgb_grid()
    assert torch.equal(adjust_hue(grid, hue_factor), F.adjust_hue_image(grid, hue_factor))
    strided = grid.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # channels-last strides
    assert torch.equal(adjust_hue(strided, hue_factor), F.adjust_hue_image(grid, hue_factor))


def test_hue_shift_checks_its_input():
    with pytest.raises(ValueError, match="hue_factor"):
        adjust_hue(image(), 0.6)
    with pytest.raises(TypeError, match="uint8"):
        adjust_hue(image().float(), 0.1)
    empty = torch.zeros((3, 0, 4), dtype=torch.uint8)
    assert adjust_hue(empty, 0.1).shape == (3, 0, 4)


def photo_crops():
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in load_sample_images().images]
    # Contiguous and channels-last (as the image cache returns them), large and small.
    return [photos[0], photos[1].contiguous(), photos[0][:, 100:180, 200:330].contiguous(),
            image(40, 30, seed=3)]


@pytest.mark.parametrize("augment", [True, False])
def test_compose_is_torchvisions_compose_to_the_bit(augment):
    """Same random state in, same pixels out, same random state left: over 40 draws per image,
    which cover crops, flips and every order of the four colour jitters."""
    fast = train_transform(PRE, augment)
    plain = v2.Compose(list(fast.transforms))
    assert type(fast) is not v2.Compose  # the fast path is the one used
    for index, picture in enumerate(photo_crops()):
        for seed in range(40):
            torch.manual_seed(1000 * index + seed)
            expected = plain(picture)
            after_plain = torch.rand(1)
            torch.manual_seed(1000 * index + seed)
            got = fast(picture)
            assert torch.equal(got, expected) and got.dtype == expected.dtype
            assert torch.equal(torch.rand(1), after_plain)


def test_compose_leaves_other_inputs_to_torchvision():
    fast = train_transform(PRE, augment=True)
    plain = v2.Compose(list(fast.transforms))
    picture = tv_tensors.Image(image(60, 80))
    torch.manual_seed(0)
    expected = plain(picture)
    torch.manual_seed(0)
    got = fast(picture)
    assert isinstance(got, tv_tensors.Image) and torch.equal(got, expected)
    pair = (image(60, 80), torch.tensor(3))  # more than one input: v2's own path
    torch.manual_seed(0)
    expected = plain(*pair)
    torch.manual_seed(0)
    got = fast(*pair)
    assert torch.equal(got[0], expected[0]) and int(got[1]) == 3


def test_seeded_training_items_do_not_depend_on_order_or_the_random_state(tmp_path):
    """Each item's augmentation comes from (seed, epoch, index): the same in any order, new each
    epoch, and the caller's random state (dropout's) is left as it was."""
    from PIL import Image

    from visiontune.data.dataset import ImageDataset
    from visiontune.data.sources import Record

    records = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(image(40, 40, seed=i).permute(1, 2, 0).numpy()).save(path)
        records.append(Record(str(path), "a", f"{path}"))
    dataset = ImageDataset(records, ["a"], "image-classification", train_transform(PRE, augment=True),
                           image_cache=False, seed=7)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    forward = [dataset[i]["pixel_values"] for i in range(4)]
    assert torch.equal(torch.rand(3), expected_next)  # loading drew nothing from it
    backward = [dataset[i]["pixel_values"] for i in reversed(range(4))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert not torch.equal(forward[0], forward[1])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["pixel_values"], forward[0])
    dataset.set_epoch(0)
    assert torch.equal(dataset[0]["pixel_values"], forward[0])


def test_pillow_resampler_rounds_as_pillow_and_caches_apart():
    """timm models are scored by transformers through Pillow, whose rounding differs from
    torchvision's: their evaluation transform resizes with Pillow too, cached apart."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from visiontune.data.cache import plan_for

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).resize((180, 256))
    base = Preprocessing(height=64, width=96, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bicubic")
    pillow = Preprocessing(**{**base.to_dict(), "resampler": "pillow"})
    want = torch.from_numpy(np.asarray(image.resize((96, 64), Image.BICUBIC))).permute(2, 0, 1) / 255
    tensor = F.pil_to_tensor(image)
    assert float((eval_transform(pillow)(tensor) - want).abs().max()) < 1e-6
    assert float((eval_transform(base)(tensor) - want).abs().max()) > 0.5 / 255  # a level apart
    assert plan_for(eval_transform(pillow)).folder_name() != plan_for(eval_transform(base)).folder_name()


# -- uint8 batches normalised on the device ---------------------------------------------------
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_uint8_batches_normalised_on_the_device_equal_the_per_image_transform(augment, order):
    """A GPU run's loader stops at uint8 and DeviceNormalize finishes the batch: the values
    are the per-image float transform's, to the bit, in either channel order."""
    from visiontune.data.transforms import DeviceNormalize

    pre = Preprocessing(height=32, width=24, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1),
                        channel_order=order)
    images = [image(50 + 7 * i, 70 - 5 * i, seed=i) for i in range(4)]
    full, short = train_transform(pre, augment), train_transform(pre, augment, on_device=True)
    expected, sent = [], []
    for i, img in enumerate(images):
        torch.manual_seed(i)
        expected.append(full(img))
        torch.manual_seed(i)
        sent.append(short(img))
    assert all(s.dtype == torch.uint8 for s in sent)  # a quarter of the bytes to copy
    batch = torch.stack(sent)
    got = DeviceNormalize(pre)(batch)
    assert got.dtype == torch.float32 and torch.equal(got, torch.stack(expected))
    assert torch.equal(DeviceNormalize(pre)(got), got)  # a float batch passes unchanged
    steps = describe_augmentations(pre, augment, on_device=True)["eval"]
    assert [s.get("on") for s in steps if s["name"] == "Normalize"] == ["device"]
