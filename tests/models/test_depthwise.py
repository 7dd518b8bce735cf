"""The faster depthwise-convolution backward (bfloat16 on the CPU) against PyTorch's own:
the same gradients in float64, PyTorch's outputs bit for bit, gradients within bfloat16
rounding in training (on CPUs with native bf16, the only ones it runs on), and only where
PyTorch is slow."""

import copy
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from tests.helpers import needs_native_bf16, subset
from tests.tiny_models import build_tiny_model, random_images, save_tiny_model
from visiontune.config import resolve
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS
from visiontune.models import depthwise, hardtanh
from visiontune.models.depthwise import FastDepthwise, fast_depthwise, input_grad, weight_grad
from visiontune.models.hardtanh import InplaceHardtanh, inplace_hardtanh

CASES = list(itertools.product((1, 2, 3, 5, 7), (1, 2, 3), ("same", "valid"), (11, 12)))


def _pytorch_grads(grad_out, inputs, weight, stride, padding):
    """PyTorch's input and weight gradients of a depthwise convolution; stride and padding
    are (height, width) pairs."""
    return torch.ops.aten.convolution_backward(
        grad_out, inputs, weight, None, list(stride), list(padding), [1, 1], False, [0, 0],
        inputs.shape[1], [True, True, False])[:2]


@pytest.mark.parametrize("kernel,stride,padding,size", CASES)
def test_the_gradients_are_pytorchs_in_float64(kernel, stride, padding, size):
    """Exact math: every kernel size, stride (dividing the input or not) and padding."""
    pad = kernel // 2 if padding == "same" else 0
    generator = torch.Generator().manual_seed(kernel * 100 + stride * 10 + size)
    inputs = torch.randn(3, 5, size, size + 1, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 1, kernel, kernel, generator=generator, dtype=torch.float64)
    out = F.conv2d(inputs, weight, None, stride, pad, 1, 5)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    want_input, want_weight = _pytorch_grads(grad_out, inputs, weight, (stride, stride), (pad, pad))
    got_input = input_grad(grad_out, weight, (stride, stride), (pad, pad), inputs.shape[-2:])
    got_weight = weight_grad(grad_out, inputs, (stride, stride), (pad, pad), (kernel, kernel))
    assert got_input.shape == inputs.shape and got_weight.shape == weight.shape
    torch.testing.assert_close(got_input, want_input, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_weight, want_weight, rtol=0, atol=1e-12)


def test_the_gradients_are_pytorchs_for_uneven_kernels_strides_and_paddings():
    """Height and width differ in kernel, stride, padding and size (200 drawn cases), float64:
    every phase layout of the strided input gradient, including phases no tap reaches."""
    draw, generator = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(200):
        kernel = draw.randint(1, 7), draw.randint(1, 7)
        stride = draw.randint(1, 4), draw.randint(1, 4)
        padding = draw.randint(0, kernel[0] - 1), draw.randint(0, kernel[1] - 1)
        size = draw.randint(kernel[0], 14), draw.randint(kernel[1], 14)
        inputs = torch.randn(2, 3, *size, generator=generator, dtype=torch.float64)
        weight = torch.randn(3, 1, *kernel, generator=generator, dtype=torch.float64)
        out = F.conv2d(inputs, weight, None, stride, padding, 1, 3)
        grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        want_input, want_weight = _pytorch_grads(grad_out, inputs, weight, stride, padding)
        case = (kernel, stride, padding, size)
        torch.testing.assert_close(input_grad(grad_out, weight, stride, padding, size), want_input,
                                   rtol=0, atol=1e-12, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(weight_grad(grad_out, inputs, stride, padding, kernel), want_weight,
                                   rtol=0, atol=1e-12, msg=lambda m: f"{case}: {m}")


def _bf16_step(inputs, weight, bias, stride, padding, grad_out, fast: bool):
    """Outputs, gradients (input, weight, bias) and the routed count of one autocast step."""
    leaves = [t.clone().requires_grad_() for t in (inputs, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16), fast_depthwise(fast) as mode:
        out = F.conv2d(*leaves, stride, padding, 1, inputs.shape[1])
    (out.float() * grad_out).sum().backward()
    return out, [t.grad for t in leaves], mode.routed if mode else 0


def _relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@needs_native_bf16
@pytest.mark.parametrize("kernel,stride,channels_last", [
    (5, 1, False), (5, 1, True), (3, 2, True), (5, 2, True), (7, 1, True), (7, 2, False),
])
def test_bfloat16_training_gives_pytorchs_outputs_and_gradients_within_rounding(
        kernel, stride, channels_last):
    generator = torch.Generator().manual_seed(kernel + stride)
    inputs = torch.randn(4, 8, 12, 12, generator=generator)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    weight = 0.2 * torch.randn(8, 1, kernel, kernel, generator=generator)
    bias = torch.randn(8, generator=generator)
    pad = kernel // 2
    grad_out = torch.randn(F.conv2d(inputs, weight, bias, stride, pad, 1, 8).shape, generator=generator)
    plain_out, plain_grads, plain_routed = _bf16_step(inputs, weight, bias, stride, pad, grad_out, False)
    fast_out, fast_grads, routed = _bf16_step(inputs, weight, bias, stride, pad, grad_out, True)
    assert (plain_routed, routed) == (0, 1)
    assert torch.equal(fast_out, plain_out)  # the forward is PyTorch's own
    # float64 gradients of the bfloat16-rounded operands: what both paths approximate
    leaves = [t.to(torch.bfloat16).double().requires_grad_() for t in (inputs, weight, bias)]
    (F.conv2d(*leaves, stride, pad, 1, 8) * grad_out.double()).sum().backward()
    for name, plain, fast, leaf in zip(("input", "weight", "bias"), plain_grads, fast_grads, leaves):
        assert fast.dtype == plain.dtype and fast.shape == plain.shape, name
        plain_error, fast_error = _relative_error(plain, leaf.grad), _relative_error(fast, leaf.grad)
        # bfloat16 keeps 8 bits: a few 1e-3 for both; the weight gradient rounds once more
        # (per sample) here, so allow it 3x PyTorch's error
        assert fast_error < 1e-2 and fast_error <= 3 * plain_error + 1e-4, (name, fast_error, plain_error)


def _routed(call, *, dtype_autocast=True, grad=True):
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_autocast):
        with FastDepthwise() as mode:
            call()
    return mode.routed


def test_only_the_cases_pytorch_differentiates_slowly_are_routed():
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    dw3, dw5 = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 5, 5, requires_grad=True)
    assert _routed(lambda: F.conv2d(x, dw5, padding=2, groups=4)) == 1   # 5x5: weight gradient
    assert _routed(lambda: F.conv2d(x, dw3, stride=2, groups=4)) == 1    # strided: input gradient
    assert _routed(lambda: F.conv2d(x, dw3, padding=1, groups=4)) == 0   # 3x3, stride 1: fast already
    assert _routed(lambda: F.conv2d(x, torch.randn(4, 4, 5, 5), groups=1)) == 0   # not depthwise
    assert _routed(lambda: F.conv2d(x, torch.randn(8, 2, 5, 5), groups=2)) == 0   # grouped, not depthwise
    assert _routed(lambda: F.conv2d(x, dw5, dilation=2, groups=4)) == 0
    assert _routed(lambda: F.conv2d(x, dw5, padding="same", groups=4)) == 0
    assert _routed(lambda: F.conv2d(x, dw5, padding=2, groups=4), grad=False) == 0   # inference
    assert _routed(lambda: F.conv2d(x, dw5, padding=2, groups=4), dtype_autocast=False) == 0  # float32
    assert _routed(lambda: F.conv2d(x.detach(), dw5.detach(), padding=2, groups=4)) == 0  # no gradient
    # a bfloat16 model without autocast is routed too
    assert _routed(lambda: F.conv2d(x.bfloat16(), dw5.bfloat16(), padding=2, groups=4),
                   dtype_autocast=False) == 1


@pytest.mark.parametrize("module,context,mode_type", [
    (depthwise, fast_depthwise, FastDepthwise),
    (hardtanh, inplace_hardtanh, InplaceHardtanh),
], ids=["fast_depthwise", "inplace_hardtanh"])
def test_the_environment_switch_turns_it_off(monkeypatch, module, context, mode_type):
    """Both modes of the training forward pass: on by default, off by their switch or argument."""
    with context() as mode:
        assert isinstance(mode, mode_type)
    monkeypatch.setenv(module.ENV_SWITCH, "0")
    with context() as mode:
        assert mode is None
    monkeypatch.delenv(module.ENV_SWITCH)
    with context(active=False) as mode:
        assert mode is None


def _train_grads(model, pixels, labels, fast: bool, autocast: bool = True):
    model = copy.deepcopy(model).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), fast_depthwise(fast) as mode:
        loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}, mode.routed if mode else 0


def _tiny_cnn_step_inputs(kind):
    from visiontune.models.loading import prefer_channels_last

    model = prefer_channels_last(build_tiny_model(kind, image_size=32)[0])
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 32, 32, generator=generator)
    return model, pixels, torch.randint(0, 3, (4,), generator=generator)


@needs_native_bf16
@pytest.mark.parametrize("kind", ["timm", "convnext"])
def test_a_models_training_step_keeps_its_loss_and_gradients(kind):
    """A tiny EfficientNet (strided 3x3 depthwise) and ConvNeXt (7x7 depthwise), channels-last
    as visiontune trains them: the same loss, gradients within bfloat16 rounding."""
    model, pixels, labels = _tiny_cnn_step_inputs(kind)
    torch.manual_seed(0)
    plain_loss, plain, _ = _train_grads(model, pixels, labels, fast=False)
    torch.manual_seed(0)
    fast_loss, fast, routed = _train_grads(model, pixels, labels, fast=True)
    assert routed >= 2
    assert torch.equal(plain_loss, fast_loss)
    for name, grad in plain.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (fast[name] - grad).abs().max().item() <= 0.05 * scale, name


@pytest.mark.parametrize("kind", ["timm", "convnext"])
def test_in_float32_nothing_is_routed_and_every_gradient_is_pytorchs(kind):
    model, pixels, labels = _tiny_cnn_step_inputs(kind)
    torch.manual_seed(0)
    _, plain32, _ = _train_grads(model, pixels, labels, fast=False, autocast=False)
    torch.manual_seed(0)
    _, fast32, routed32 = _train_grads(model, pixels, labels, fast=True, autocast=False)
    assert routed32 == 0 and all(torch.equal(plain32[n], fast32[n]) for n in plain32)


@pytest.fixture
def own_gradients(monkeypatch):
    """The names of the gradients computed here (not by PyTorch), in call order."""
    calls = []
    for name in ("input_grad", "weight_grad"):
        original = getattr(depthwise, name)
        monkeypatch.setattr(depthwise, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    return calls


@pytest.mark.parametrize("bf16,native", [(True, True), (False, True), (True, False)],
                         ids=["bf16-native", "fp32-native", "bf16-emulated"])
def test_the_trainer_runs_its_bf16_training_forward_pass_with_it(tmp_path, own_gradients, stated_cpu,
                                                                 bf16, native):
    """Only in bf16, and only on a CPU with native bf16 (a stated CPU kind)."""
    from visiontune.training.trainer import VisionTrainer

    stated_cpu(native)
    model = build_tiny_model("timm", image_size=32)[0].train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=bf16, report_to=[])
    trainer = VisionTrainer(model=model, args=args)
    # (accelerate adds the autocast to the model's forward when training starts; a bf16 model
    # without it would be routed too, so the switch must come from the Trainer's settings)
    with trainer.compute_loss_context_manager(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss
    loss.backward()
    # test_efficientnet's two strided depthwise convolutions
    assert own_gradients.count("input_grad") == (2 if bf16 and native else 0)


def test_finetune_at_precision_16_uses_it_and_saves_a_working_model(demo_dir, tmp_path, own_gradients,
                                                                     stated_cpu):
    """Through the whole finetune job on a CPU with native bf16 (stated): the faster gradients
    are computed, and the model trains and saves as on the plain path."""
    from visiontune.inference import Classifier
    from visiontune.training.finetune import finetune

    model = save_tiny_model("timm", tmp_path / "model", image_size=32)
    train = subset(demo_dir / "digits" / "train", tmp_path / "train.jsonl", 2, per_class=True)
    given = {"model_path": str(model), "training_data": str(train), "task_name": MULTICLASS,
             "output_dir_pytorch": str(tmp_path / "out"), "image_height": "32", "image_width": "32",
             "max_steps": "2", "precision": "16", "save_as_mlflow_model": "false"}
    stated_cpu(True)
    finetune(resolve(FINETUNE_INPUTS, given))
    assert "input_grad" in own_gradients
    logits = Classifier(tmp_path / "out", device="cpu").logits(random_images(2))
    assert logits.shape == (2, 10) and torch.isfinite(torch.as_tensor(logits)).all()
