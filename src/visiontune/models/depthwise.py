"""A faster backward pass for depthwise convolutions in bfloat16 on the CPU.

PyTorch's CPU backward of a depthwise convolution (``groups`` = channels) in bfloat16 leaves
oneDNN for a slow generic path in two cases, while the forward stays fast:

- the input gradient of a strided convolution;
- the weight gradient of a kernel larger than 3x3.

Together they were most of an EfficientNet-Lite0 training step (the times, per layer and for
the step: BENCHMARKS.md, *Levers*, and the history it links). Both gradients are
convolutions themselves, so they are computed here as forward depthwise convolutions, which
oneDNN runs fast:

- input gradient: the output gradient convolved with the flipped kernel; for a strided
  convolution, one such convolution per phase of the input grid (the rows and columns at each
  offset modulo the stride), with the kernel taps that reach it, written interleaved;
- weight gradient: each sample's input convolved with its own output gradient as the kernel
  (dilated by the stride, padded by the convolution itself), summed over the batch in float32.

Measured and accurate on CPUs with native bf16 (AVX-512 BF16 or AMX; BENCHMARKS.md); the
Trainer uses it only there (``hardware.py``). Float32 and everything else keep PyTorch's own
kernels, which are fast there: a float32 run is bit-identical with or without this.

Enabled while the model runs its training forward pass (``fast_depthwise()``), so the
convolutions it records get this backward; under ``torch.no_grad`` nothing changes. Switch it
off with ``VISIONTUNE_FAST_DEPTHWISE=0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visiontune.models.routing import RoutingMode, switched

ENV_SWITCH = "VISIONTUNE_FAST_DEPTHWISE"


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def input_grad(grad_out, weight, stride, padding, input_size):
    """The gradient of ``conv2d(x, weight, stride, padding, groups=C)`` for its input ``x``."""
    n, c, out_h, out_w = grad_out.shape
    (kh, kw), (sh, sw), (ph, pw) = weight.shape[-2:], stride, padding
    if (sh, sw) == (1, 1):
        return F.conv2d(grad_out, weight.flip(-1, -2), padding=(kh - 1 - ph, kw - 1 - pw), groups=c)
    # Strided: one convolution per phase of the input grid (the rows and columns at each offset
    # modulo the stride), each with the kernel taps that reach that phase. This is the
    # convolution of the output gradient spread out by the stride with zeros in between, without
    # making that stride-squared times larger tensor or multiplying its zeros.
    rows, cols = _phases(input_size[0], kh, sh, ph, out_h), _phases(input_size[1], kw, sw, pw, out_w)
    covered = all(got == count for *_, count, got in rows + cols)
    # channels-last like the gradient itself; zeros only where no tap reaches a row or column
    make = grad_out.new_empty if covered else grad_out.new_zeros
    grad_in = make((n, *input_size, c)).permute(0, 3, 1, 2)
    for tap_h, first_h, start_h, _, got_h in rows:
        for tap_w, first_w, start_w, _, got_w in cols:
            if not (got_h and got_w):
                continue
            taps = weight[:, :, tap_h::sh, tap_w::sw]
            phase = F.conv2d(grad_out, taps.flip(-1, -2), padding=(taps.shape[-2] - 1, taps.shape[-1] - 1),
                             groups=c)
            grad_in[:, :, first_h::sh, first_w::sw][:, :, :got_h, :got_w] = \
                phase[:, :, start_h:start_h + got_h, start_w:start_w + got_w]
    return grad_in


def _phases(size: int, kernel: int, stride: int, pad: int, out: int):
    """Per kernel tap offset ``r`` < stride, along one axis: (r, the first input index it
    reaches, the first row of its phase convolution to keep, how many input indices the
    phase holds, how many of them that convolution gives). Input index ``i`` takes taps
    ``r + stride * t`` with ``r = (i + pad) % stride``, from output ``(i + pad) // stride - t``."""
    plans = []
    for r in range(stride):
        first = (r - pad) % stride
        count = len(range(first, size, stride))
        taps = len(range(r, kernel, stride))
        start = (first + pad - r) // stride  # the output index of the phase's first input
        got = max(0, min(count, out + taps - 1 - start)) if taps else 0
        plans.append((r, first, start, count, got))
    return plans


def weight_grad(grad_out, inputs, stride, padding, kernel_size):
    """The gradient of ``conv2d(inputs, weight, stride, padding, groups=C)`` for ``weight``,
    in float32 (float64 for float64 inputs): one depthwise convolution over all samples and
    channels at once, each (sample, channel) input convolved with its own output gradient."""
    n, c, out_h, out_w = grad_out.shape
    planes = inputs.contiguous().reshape(1, n * c, inputs.shape[-2], inputs.shape[-1])
    kernels = grad_out.contiguous().reshape(n * c, 1, out_h, out_w)
    # the convolution's own zero padding: no padded copy of the inputs
    per_sample = F.conv2d(planes, kernels, dilation=stride, padding=padding, groups=n * c)
    # The window positions past the kernel (when the stride does not divide) are not weights.
    per_sample = per_sample.view(n, c, *per_sample.shape[-2:])[:, :, :kernel_size[0], :kernel_size[1]]
    total = torch.promote_types(per_sample.dtype, torch.float32)
    return per_sample.sum(0, dtype=total).unsqueeze(1)


class _DepthwiseConv2d(torch.autograd.Function):
    """A depthwise convolution (no dilation) whose backward computes the gradients that
    PyTorch computes slowly (``own_input``, ``own_weight``) as forward convolutions. The
    forward is PyTorch's own, bias included: the same outputs, bit for bit."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, stride, padding, own_input, own_weight):
        ctx.save_for_backward(inputs, weight)
        ctx.settings = stride, padding, own_input, own_weight
        return F.conv2d(inputs, weight, bias, stride, padding, 1, inputs.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        inputs, weight = ctx.saved_tensors
        stride, padding, own_input, own_weight = ctx.settings
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        native = [need_input and not own_input, need_weight and not own_weight, False]
        grad_input = grad_weight = grad_bias = None
        if any(native):
            grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_out, inputs, weight, None, list(stride), list(padding), [1, 1], False,
                [0, 0], inputs.shape[1], native)
        if need_input and own_input:
            grad_input = input_grad(grad_out, weight, stride, padding, inputs.shape[-2:])
        if need_weight and own_weight:
            grad_weight = weight_grad(grad_out, inputs, stride, padding, weight.shape[-2:]).to(weight.dtype)
        if need_bias:
            grad_bias = grad_out.sum((0, 2, 3), dtype=torch.float32).to(grad_out.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _bfloat16(inputs) -> bool:
    return inputs.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class FastDepthwise(RoutingMode):
    """Routes the CPU bfloat16 depthwise convolutions that are slow to differentiate through
    ``_DepthwiseConv2d``; every other call runs unchanged. ``routed`` counts the calls routed."""

    def route(self, func, args: tuple, kwargs: dict):
        return self._route(dict(zip(_CONV2D_ARGS, args), **kwargs)) if func is torch.conv2d else None

    @staticmethod
    def _route(call: dict):
        inputs, weight = call["input"], call["weight"]
        padding = call.get("padding", 0)
        if not (inputs.device.type == "cpu" and inputs.dim() == 4 and weight.dim() == 4
                and call.get("groups", 1) == inputs.shape[1] == weight.shape[0]
                and weight.shape[1] == 1 and _pair(call.get("dilation", 1)) == (1, 1)
                and not isinstance(padding, str) and _bfloat16(inputs)
                and (inputs.requires_grad or weight.requires_grad)):
            return None
        stride, padding = _pair(call.get("stride", 1)), _pair(padding)
        kernel = weight.shape[-2:]
        # What PyTorch differentiates slowly (module docstring); the input-gradient convolution
        # needs padding below the kernel size, as every "same" or "valid" padding is.
        own_input = stride != (1, 1) and padding[0] < kernel[0] and padding[1] < kernel[1]
        own_weight = kernel[0] * kernel[1] > 9
        if not (own_input or own_weight):
            return None
        bias = call.get("bias")
        with torch.autocast("cpu", enabled=False):  # the casts autocast would make, made here
            return _DepthwiseConv2d.apply(
                inputs.to(torch.bfloat16), weight.to(torch.bfloat16),
                None if bias is None else bias.to(torch.bfloat16),
                stride, padding, own_input, own_weight)


def fast_depthwise(active: bool = True):
    """Within: the faster depthwise backward for convolutions recorded on the CPU in bfloat16
    (``active`` and the environment switch permitting). Yields the mode, or None."""
    return switched(FastDepthwise, ENV_SWITCH, active)
