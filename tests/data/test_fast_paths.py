"""Fast paths against the plain path: reduced-scale JPEG decoding, draft-mode verification,
the channels-last uint8 tensor, and prediction's threaded preprocessing."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.data.images import decode_image, load_image, verify_image
from visiontune.data.transforms import (
    Preprocessing, eval_transform, hwc_tensor, to_uint8_tensor, train_transform,
)
from visiontune.errors import DataError


def jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from sklearn.datasets import load_sample_images

    flower = load_sample_images().images[1]
    return Image.fromarray(flower).resize((1000, 667), Image.Resampling.BICUBIC)


def test_draft_decoding_keeps_the_requested_size(photo):
    data = jpeg(photo)
    assert decode_image(data).size == (1000, 667)
    reduced = decode_image(data, min_side=150)
    assert reduced.size == (250, 167)  # 1/4 scale: the smallest with both sides >= 150
    assert decode_image(data, min_side=300).size == (500, 334)  # 1/2
    assert decode_image(data, min_side=400).size == (1000, 667)  # no scale keeps 400
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert decode_image(png.getvalue(), min_side=100).size == (1000, 667)  # JPEG only


def test_draft_decoding_is_close_to_decoding_in_full(photo):
    """After the resize the caller does anyway, the two paths differ by little."""
    data = jpeg(photo)
    pre = Preprocessing(height=128, width=128)
    full = eval_transform(pre)(hwc_tensor(decode_image(data)))
    reduced = eval_transform(pre)(hwc_tensor(decode_image(data, min_side=160)))
    # Normalised with ImageNet's std (~0.22): 0.05 here is about 3 of 255 levels.
    assert (full - reduced).abs().mean() < 0.05
    assert torch.corrcoef(torch.stack([full.flatten(), reduced.flatten()]))[0, 1] > 0.99


def test_draft_decoding_applies_exif_orientation(photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg(photo, exif=exif)
    assert decode_image(data).size == (667, 1000)
    assert decode_image(data, min_side=150).size == (167, 250)


def test_verification_reports_the_full_oriented_size(photo, tmp_path):
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(jpeg(photo))
    assert verify_image(str(plain)) == (1000, 667)
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(jpeg(photo, exif=exif))
    assert verify_image(str(rotated)) == (667, 1000)
    gray = tmp_path / "gray.jpg"
    gray.write_bytes(jpeg(photo.convert("L")))
    assert verify_image(str(gray)) == (1000, 667)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_verification_still_finds_truncated_jpegs(photo, tmp_path, keep):
    data = jpeg(photo)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(DataError, match="truncated or corrupt"):
        verify_image(str(path))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_image(str(path))  # the plain path agrees


def _outcomes(path) -> list[str]:
    """What the fast check and the full decode say of one file."""
    outcomes = []
    for check in (verify_image, load_image):
        try:
            check(str(path))
            outcomes.append("ok")
        except DataError:
            outcomes.append("error")
    return outcomes


def test_verification_agrees_with_full_decoding_on_damaged_files(photo, tmp_path):
    data = bytearray(jpeg(photo))
    rng = np.random.default_rng(0)
    refused = []
    for case in range(6):
        damaged = bytearray(data)
        start = int(rng.integers(len(data) // 4, len(data) - 64))
        damaged[start:start + 32] = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
        path = tmp_path / f"damaged{case}.jpg"
        path.write_bytes(bytes(damaged))
        outcomes = _outcomes(path)
        assert outcomes[0] == outcomes[1], case
        refused += [case] if outcomes[0] == "error" else []
    # libjpeg conceals much random damage; agreeing is not enough, some must be found
    assert refused, "no damaged file was refused"


def test_verification_refuses_the_damage_the_decoder_reports(photo, tmp_path):
    """Damage libjpeg stops on, at known places: both checks refuse each file."""
    data = jpeg(photo)
    middle = len(data) // 2
    huffman = data.find(b"\xff\xc4")  # the first Huffman table's code counts follow its header
    cases = {
        "frame marker inside the image data": data[:middle] + b"\xff\xc0" + data[middle + 2:],
        "Huffman table marker inside the image data":
            data[:middle] + b"\xff\xc4\x00\x03\x00" + data[middle + 5:],
        "Huffman code counts emptied": data[:huffman + 5] + b"\0" * 16 + data[huffman + 21:],
    }
    for name, damaged in cases.items():
        path = tmp_path / "damaged.jpg"
        path.write_bytes(damaged)
        assert _outcomes(path) == ["error", "error"], name


def test_channels_last_tensor_feeds_the_same_values(photo):
    image = photo.resize((300, 200))
    a, b = to_uint8_tensor(image), hwc_tensor(image)
    assert torch.equal(a, b) and b.dtype == torch.uint8 and b.shape == (3, 200, 300)
    for interpolation in ("bilinear", "bicubic", "nearest"):
        pre = Preprocessing(height=64, width=80, interpolation=interpolation)
        assert torch.equal(eval_transform(pre)(a), eval_transform(pre)(b))
        augment = train_transform(pre, augment=True)
        for seed in range(3):
            torch.manual_seed(seed)
            x = augment(a)
            torch.manual_seed(seed)
            assert torch.equal(x, augment(b))


def test_prediction_scores_match_the_classifier(tmp_path):
    """score_images (threaded decoding and preprocessing, batches as they come) against
    Classifier.logits on the same images decoded one by one."""
    from tests.tiny_models import random_images, save_tiny_model
    from visiontune.inference import Classifier, score_images

    folder = save_tiny_model("timm", tmp_path / "model", num_labels=3, image_size=32)
    paths = []
    for i, image in enumerate(random_images(count=5, size=48, seed=3)):
        paths.append(tmp_path / f"{i}.jpg")
        image.save(paths[-1], quality=95)
    paths.append(tmp_path / "broken.jpg")
    paths[-1].write_bytes(b"not a jpeg")
    reference = Classifier(folder).logits([load_image(str(p)) for p in paths[:-1]])
    classifier = Classifier(folder)
    logits, errors = score_images(classifier, [str(p) for p in paths], batch_size=2)
    assert list(errors) == [5] and np.isnan(logits[5]).all()
    np.testing.assert_allclose(logits[:5], reference, rtol=1e-4, atol=1e-5)
