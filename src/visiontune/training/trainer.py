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
pass instead of a copy of their input). BENCHMARKS.md has what each saves.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
from transformers import Trainer

from visiontune.hardware import cpu_kind, fast_depthwise_applies
from visiontune.inputs import MULTILABEL
from visiontune.models.depthwise import fast_depthwise
from visiontune.models.hardtanh import inplace_hardtanh

log = logging.getLogger("visiontune.training")


def mean_loss(logits, labels, task: str, label_smoothing: float = 0.0) -> float:
    """The validation loss over all rows at once (what the Trainer's per-batch average would be
    on one process), in float64: cross-entropy with the run's label smoothing, or BCE."""
    import torch
    import torch.nn.functional as F

    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    labels = torch.as_tensor(np.asarray(labels))
    if len(logits) == 0:
        return float("nan")
    if task == MULTILABEL:
        return float(F.binary_cross_entropy_with_logits(logits, labels.to(torch.float64)))
    return float(F.cross_entropy(logits, labels.long(), label_smoothing=label_smoothing))


class VisionTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # See the module docstring: mean loss per batch, divided by the accumulation steps.
        self.model_accepts_loss_kwargs = False

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
