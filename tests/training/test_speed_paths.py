"""The training and inference fast paths against the plain ones: channels-last CNNs, the fused
AdamW step, and the data-loader worker choice. Each fast path must give the plain path's
numbers (up to float rounding) and reach the real Trainer."""

import copy
import gc
import json

import pytest
import torch
from transformers import AutoModelForImageClassification, TrainerCallback

from tests.helpers import subset, workers_config
from tests.tiny_models import build_tiny_model, random_images, save_tiny_model
from visiontune.config import resolve
from visiontune.inference import Classifier
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS
from visiontune.models.loading import is_cnn, prefer_channels_last
from visiontune.training.defaults import defaults_sources
from visiontune.training.finetune import choose_workers, finetune


def _is_channels_last(model) -> bool:
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)


@pytest.mark.parametrize("kind", ["resnet", "timm"])
def test_cnns_go_channels_last_and_vits_stay(kind):
    cnn, _ = build_tiny_model(kind)
    vit, _ = build_tiny_model("vit")
    assert is_cnn(cnn) and not is_cnn(vit)
    assert _is_channels_last(prefer_channels_last(cnn))
    patch = vit.vit.embeddings.patch_embeddings.projection.weight
    prefer_channels_last(vit)
    assert patch.is_contiguous()  # untouched


def test_a_strided_1x1_convolution_of_few_channels_keeps_the_model_nchw():
    """oneDNN's channels-last backward of such a convolution crashes on AVX-512 CPUs."""
    import transformers as T

    narrow = T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3))
    convs = [m.weight for m in prefer_channels_last(narrow).modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous() for w in convs)
    wide, _ = build_tiny_model("resnet")  # 16 channels and more
    assert _is_channels_last(prefer_channels_last(wide))


@pytest.mark.parametrize("kind", ["resnet", "timm"])
def test_channels_last_fused_training_steps_match_the_plain_path(kind):
    """Three AdamW steps: NCHW + the per-tensor loop against channels-last + the fused kernel.

    In float64: Adam's first step moves each weight by about lr * sign(gradient), so in float32
    a weight whose true gradient is zero moves by +-lr on rounding noise alone, in either path.
    In float64 that noise is far below Adam's eps, and the paths must agree to rounding."""
    plain, _ = build_tiny_model(kind, image_size=32)
    plain.double()
    fast = prefer_channels_last(copy.deepcopy(plain))
    plain.train(), fast.train()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    opt_fast = torch.optim.AdamW(fast.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        pixels = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 3, (4,), generator=generator)
        for model, opt in ((plain, opt_plain), (fast, opt_fast)):
            torch.manual_seed(step)  # the same dropout draws for both
            model(pixel_values=pixels, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    moved = 0
    for (name, a), (_, b) in zip(plain.state_dict().items(), fast.state_dict().items()):
        assert torch.allclose(a.double(), b.double(), atol=1e-7, rtol=0), name
        moved += 1
    assert moved > 5
    # and the weights did change: the comparison is not between two untouched models
    untouched, _ = build_tiny_model(kind, image_size=32)
    assert any(not torch.equal(a.double(), b) for a, b in zip(untouched.parameters(), plain.parameters()))


def test_a_channels_last_model_saves_the_same_weights(tmp_path):
    model, _ = build_tiny_model("resnet")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    prefer_channels_last(model).save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_classifier_runs_cnns_channels_last_with_the_plain_models_logits(tmp_path):
    folder = save_tiny_model("resnet", tmp_path / "m", image_size=32)
    classifier = Classifier(folder, device="cpu")
    assert _is_channels_last(classifier.model)
    images = random_images(3, size=40)
    batch = classifier.tensors(images)
    plain = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        expected = plain(pixel_values=batch).logits.numpy()
    assert torch.allclose(torch.from_numpy(classifier.logits(images)), torch.from_numpy(expected),
                          atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Data-loader workers
# ---------------------------------------------------------------------------------------------
def test_workers_default_to_the_main_process_on_a_cpu_only_run():
    values = choose_workers(workers_config(), use_cpu=True)  # 8 from the defaults chain
    sources = defaults_sources(values)
    assert values.number_of_workers == 0 and "CPU-only" in sources["number_of_workers"]


def test_workers_the_user_gives_are_kept_up_to_the_cpu_count(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    values = choose_workers(workers_config(2), use_cpu=True)
    assert values.number_of_workers == 2
    values = choose_workers(workers_config(), use_cpu=False)  # with a GPU: the default, capped
    sources = defaults_sources(values)
    assert values.number_of_workers == 4 and "reduced from 8" in sources["number_of_workers"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    values = choose_workers(workers_config(8), use_cpu=False)
    sources = defaults_sources(values)
    assert values.number_of_workers == 2 and "per process" in sources["number_of_workers"]


# ---------------------------------------------------------------------------------------------
# The real Trainer gets them
# ---------------------------------------------------------------------------------------------
class Inspect(TrainerCallback):
    seen: dict = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        Inspect.seen = {"args": args, "optimizer": optimizer, "channels_last": _is_channels_last(model)}


def test_finetune_trains_a_cnn_channels_last_with_fused_adamw_in_the_main_process(demo_dir, tmp_path):
    model = save_tiny_model("resnet", tmp_path / "model", image_size=32)
    train = subset(demo_dir / "digits" / "train", tmp_path / "train.jsonl", 2, per_class=True)
    given = {"model_path": str(model), "training_data": str(train), "task_name": MULTICLASS,
             "output_dir_pytorch": str(tmp_path / "out"), "image_height": "32", "image_width": "32",
             "max_steps": "2", "optimizer": "adamw", "save_as_mlflow_model": "false"}
    finetune(resolve(FINETUNE_INPUTS, given), callbacks=[Inspect()])
    seen = Inspect.seen
    opt = getattr(seen["optimizer"], "optimizer", seen["optimizer"])  # accelerate wraps it
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert seen["channels_last"]
    assert seen["args"].dataloader_num_workers == 0
    saved = json.loads((tmp_path / "out" / "finetune_args.json").read_text())
    assert saved["values"]["number_of_workers"] == 0
    # the saved model reloads and predicts
    assert Classifier(tmp_path / "out", device="cpu").logits(random_images(1)).shape == (1, 10)


def test_the_channels_last_and_direct_transform_switches_turn_their_paths_off(monkeypatch):
    import torch

    from visiontune.data.transforms import Preprocessing, train_transform

    cnn, _ = build_tiny_model("resnet")
    assert _is_channels_last(prefer_channels_last(build_tiny_model("resnet")[0]))
    monkeypatch.setenv("VISIONTUNE_CHANNELS_LAST", "0")
    assert not _is_channels_last(prefer_channels_last(cnn))
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    transforms = []
    for value in ("1", "0"):
        monkeypatch.setenv("VISIONTUNE_DIRECT_TRANSFORMS", value)
        transforms.append(train_transform(Preprocessing(height=32, width=32), augment=True))
    assert [t.direct for t in transforms] == [True, False]
    outputs = []
    for transform in transforms:
        torch.manual_seed(7)
        outputs.append(transform(image))
    assert torch.equal(*outputs)  # v2.Compose's dispatch gives the same pixels


class FreezeSeen(TrainerCallback):
    """What the garbage collector leaves out while training steps run."""

    frozen: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        FreezeSeen.frozen.append(gc.get_freeze_count())


@pytest.mark.parametrize("switch", ["1", "0"])
def test_the_objects_alive_at_the_start_of_training_are_frozen_until_its_end(demo_dir, tmp_path,
                                                                             monkeypatch, switch):
    """Frozen before the data-loader workers fork (at the first batch), so that neither they nor
    the training process walk a large dataset's rows in a full collection."""
    monkeypatch.setenv("VISIONTUNE_GC_FREEZE", switch)
    model = save_tiny_model("vit", tmp_path / "model", image_size=32)
    train = subset(demo_dir / "digits" / "train", tmp_path / "train.jsonl", 2, per_class=True)
    given = {"model_path": str(model), "training_data": str(train), "task_name": MULTICLASS,
             "output_dir_pytorch": str(tmp_path / "out"), "image_height": "32", "image_width": "32",
             "max_steps": "2", "save_as_mlflow_model": "false"}
    FreezeSeen.frozen = []
    finetune(resolve(FINETUNE_INPUTS, given), callbacks=[FreezeSeen()])
    assert len(FreezeSeen.frozen) == 2
    if switch == "1":
        assert min(FreezeSeen.frozen) > 10_000  # the model, the rows, the libraries' objects
    else:
        assert FreezeSeen.frozen == [0, 0]
    assert gc.get_freeze_count() == 0  # handed back to the collector when training ends
