"""In-place ReLU6 (hardtanh) that keeps its output for the backward pass, not a copy of its input.

PyTorch differentiates ``hardtanh_`` (what ``nn.ReLU6(inplace=True)`` and
``F.relu6(x, inplace=True)`` run) from the input it is about to overwrite, so autograd first
clones that input: an activation-sized copy per layer, kept until the backward pass. The mask
can be read from the output just as well: ``y = clamp(x, lo, hi)`` lies strictly between
``lo`` and ``hi`` exactly where ``x`` does (``y == x`` there, ``y`` is ``lo`` or ``hi``
elsewhere, and NaN stays NaN), so ``hardtanh_backward(grad, y, lo, hi)`` is PyTorch's gradient,
bit for bit. This is what PyTorch's own in-place ReLU (``relu_``) already does.

EfficientNet-Lite and timm's MobileNets run an in-place ReLU6 after every batch norm (33 in
EfficientNet-Lite0): without the copies, its training step holds less memory at its peak
(BENCHMARKS.md, *Levers*) and skips a read and a write of every activation.

As with any in-place activation whose output is saved (``relu_`` included), code that modifies
that output in place again before the backward pass gets autograd's "modified by an inplace
operation" error. Enabled while the model runs its training forward pass
(``inplace_hardtanh()``); switch it off with ``VISIONTUNE_INPLACE_HARDTANH=0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visiontune.models.routing import RoutingMode, switched

ENV_SWITCH = "VISIONTUNE_INPLACE_HARDTANH"


class _InplaceHardtanh(torch.autograd.Function):
    """``x.clamp_(lo, hi)``, differentiated from its output."""

    @staticmethod
    def forward(ctx, inputs, low, high):
        inputs.clamp_(low, high)
        ctx.mark_dirty(inputs)
        ctx.save_for_backward(inputs)
        ctx.bounds = low, high
        return inputs

    @staticmethod
    def backward(ctx, grad_out):
        (outputs,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad_out, outputs, *ctx.bounds), None, None


def _bounds(func, args: tuple, kwargs: dict):
    """(input, low, high) of an in-place hardtanh or relu6 call, or None for any other call."""
    if func is F.hardtanh:
        call = dict(zip(("input", "min_val", "max_val", "inplace"), args), **kwargs)
        if call.get("inplace"):
            return call["input"], call.get("min_val", -1.0), call.get("max_val", 1.0)
    elif func is F.relu6:
        call = dict(zip(("input", "inplace"), args), **kwargs)
        if call.get("inplace"):
            return call["input"], 0.0, 6.0
    return None


def _recorded(inputs) -> bool:
    """A floating tensor computed by recorded operations, not a view: leaves and views keep
    PyTorch's own checks and view bookkeeping."""
    return (isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and inputs.requires_grad
            and inputs.grad_fn is not None and inputs._base is None)


class InplaceHardtanh(RoutingMode):
    """Routes in-place hardtanh and relu6 calls that autograd records through
    ``_InplaceHardtanh``; every other call runs unchanged. ``routed`` counts the calls routed."""

    def route(self, func, args: tuple, kwargs: dict):
        call = _bounds(func, args, kwargs)
        return _InplaceHardtanh.apply(*call) if call is not None and _recorded(call[0]) else None


def inplace_hardtanh(active: bool = True):
    """Within: in-place hardtanh and relu6 keep their output, not a copy of their input, for
    the backward pass (``active`` and the environment switch permitting). Yields the mode, or
    None."""
    return switched(InplaceHardtanh, ENV_SWITCH, active)
