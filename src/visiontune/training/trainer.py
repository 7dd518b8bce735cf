"""The Hugging Face Trainer, with checkpoint loading that keeps every weight and a loss that
means the same for every batch layout.

transformers 5 writes some models' weights under legacy names (ViT: ``encoder.layer.0.attention
.attention.query`` for ``layers.0.attention.q_proj``) and renames them in ``from_pretrained``;
the Trainer's own resume and best-model loading call ``load_state_dict`` on the raw file, so
those weights are silently skipped ("missing keys" in the log) and the run continues from the
wrong weights. Loading through ``from_pretrained`` applies the renaming.

The loss is the mean over each batch, divided by the gradient accumulation steps, for every model:
the Trainer otherwise passes ``num_items_in_batch`` to models whose ``forward`` takes ``**kwargs``
and then skips that division, expecting a summed loss; the multi-label (BCE) loss ignores it and
stays a mean, so accumulating k batches multiplied the loss and the gradient by k. With equal
batches, the mean-then-divide loss equals the loss of one batch k times larger, and under DDP
(gradients averaged over ranks) that of one batch world-size times larger: the same global batch
trains the same way however it is split.

On the CPU the training forward pass runs under ``models.depthwise.fast_depthwise`` (in bf16,
on CPUs with native bf16: a faster depthwise-convolution backward) and
``models.hardtanh.inplace_hardtanh`` (in-place ReLU6 layers keep their output for the backward
pass instead of a copy of their input). BENCHMARKS.md, *Levers*, has what each saves.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.training_args import ParallelMode

from visiontune.errors import UserError
from visiontune.hardware import cpu_kind, fast_depthwise_applies
from visiontune.models.depthwise import fast_depthwise
from visiontune.models.hardtanh import inplace_hardtanh
from visiontune.tasks import MULTILABEL

log = logging.getLogger("visiontune.training")


def mean_loss(logits, labels, task: str, label_smoothing: float = 0.0) -> float:
    """The validation loss over all rows at once (what the Trainer's per-batch average would be
    on one process), in float64: cross-entropy with the run's label smoothing, or BCE."""
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    labels = torch.as_tensor(np.asarray(labels))
    if len(logits) == 0:
        return float("nan")
    if task == MULTILABEL:
        return float(F.binary_cross_entropy_with_logits(logits, labels.to(torch.float64)))
    return float(F.cross_entropy(logits, labels.long(), label_smoothing=label_smoothing))


def unused_parameters(model, height: int, width: int, device=None) -> list[str]:
    """The trainable weights that a training forward pass leaves out of the logits (DINOv2's
    ``mask_token``, used only for masked-image pretraining), found with one forward and backward
    pass on a batch of two blank images. Gradients are not accumulated; the model's buffers
    (batch-norm statistics), mode and random state are as before."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        return []
    device = torch.device(device) if device is not None else params[0][1].device
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    was_training = model.training
    dtype = params[0][1].dtype if params[0][1].is_floating_point() else torch.float32
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            model.train()
            logits = model(pixel_values=torch.zeros(2, 3, height, width, device=device,
                                                    dtype=dtype)).logits
            grads = torch.autograd.grad(logits.float().sum(), [p for _, p in params],
                                        allow_unused=True)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])
    return [name for (name, _), grad in zip(params, grads) if grad is None]


def plan_unused_parameters(model, args, height: int, width: int) -> str | None:
    """Under DDP, gradients are reduced as weights receive them; a weight that never receives
    one stalls the reduction ("Expected to have finished reduction" on the second step) unless
    DDP searches the graph for unused weights, which costs time at every step. So it searches
    only for a model that has such weights (decided once, here), and says so."""
    if args.parallel_mode != ParallelMode.DISTRIBUTED or args.deepspeed:
        return None
    model.to(args.device)  # where the Trainer puts it anyway
    unused = unused_parameters(model, height, width)
    if not unused:
        return None
    args.ddp_find_unused_parameters = True
    shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
    return (f"DDP looks for weights without a gradient at every step: {shown} get none from "
            "the classification loss")


def batch_size_after(tried: list[int], offered: int) -> int:
    """auto_find_batch_size: the first try is the batch size given (``offered``); each retry
    after an out-of-memory error halves the last one tried, as the input's help says (the
    Trainer's own retry, accelerate's, offers 90 % of it)."""
    if not tried:
        return offered
    if tried[-1] <= 1:
        raise UserError("--auto_find_batch_size: out of memory even at training batch size 1 per "
                        "process; use a smaller model or image size")
    return tried[-1] // 2


class VisionTrainer(Trainer):
    """``normalise``: a ``DeviceNormalize`` for uint8 batches, applied after they reach the
    device (training, evaluation and prediction steps alike)."""

    def __init__(self, *args, normalise=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.normalise = normalise
        # See the module docstring: mean loss per batch, divided by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.batch_sizes_tried: list[int] = []

    def train(self, *args, **kwargs):
        self.batch_sizes_tried = []
        return super().train(*args, **kwargs)

    def _inner_training_loop(self, batch_size=None, *args, **kwargs):
        # The Trainer calls this again after an out-of-memory error when auto_find_batch_size
        # is on (a one-process run only: arguments.auto_batch_size_applies).
        if self.args.auto_find_batch_size and batch_size is not None:
            batch_size = batch_size_after(self.batch_sizes_tried, batch_size)
            if self.batch_sizes_tried:
                log.warning("out of memory at training batch size %d per process: trying %d "
                            "(auto_find_batch_size)", self.batch_sizes_tried[-1], batch_size)
            self.batch_sizes_tried.append(batch_size)
        return super()._inner_training_loop(batch_size, *args, **kwargs)

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        if self.normalise is not None and "pixel_values" in inputs:
            inputs["pixel_values"] = self.normalise(inputs["pixel_values"])
        return inputs

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        # Entered for the forward pass of each training and evaluation step; only training
        # steps (the model in train mode) record a backward. CPU only, where both were measured;
        # the depthwise backward only in bf16 on a CPU with native bf16 (hardware.py), and not
        # under DeepSpeed or FSDP, which manage the weights the backward reads.
        stack = super().compute_loss_context_manager()
        on_cpu = self.model.training and self.args.device.type == "cpu"
        stack.enter_context(fast_depthwise(
            on_cpu and self._plain() and self.args.bf16 and fast_depthwise_applies(cpu_kind())))
        stack.enter_context(inplace_hardtanh(on_cpu))
        return stack

    def _load_weights(self, folder: str, model=None) -> None:
        model = model if model is not None else self.model
        loaded = type(model).from_pretrained(folder, config=model.config)
        # strict: a key that fails to match is an error, not a warning in the log.
        model.load_state_dict(loaded.state_dict(), strict=True)

    def _plain(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._plain():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        log.info("loading weights from %s", resume_from_checkpoint)
        self._load_weights(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._plain():
            return super()._load_best_model()
        log.info("loading the best model from %s (%s = %s)", self.state.best_model_checkpoint,
                 self.args.metric_for_best_model, self.state.best_metric)
        self._load_weights(self.state.best_model_checkpoint)
