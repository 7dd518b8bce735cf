"""The Hugging Face Trainer, with checkpoint loading that keeps every weight.

transformers 5 writes some models' weights under legacy names (ViT: ``encoder.layer.0.attention
.attention.query`` for ``layers.0.attention.q_proj``) and renames them in ``from_pretrained``;
the Trainer's own resume and best-model loading call ``load_state_dict`` on the raw file, so
those weights are silently skipped ("missing keys" in the log) and the run continues from the
wrong weights. Loading through ``from_pretrained`` applies the renaming.
"""

from __future__ import annotations

import logging

from transformers import Trainer

log = logging.getLogger("visiontune.training")


class VisionTrainer(Trainer):
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
