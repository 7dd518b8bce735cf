"""Model import (``import-model``) and loading models for fine-tuning.

- ``importer``: turns a built-in name, hub id, local, PyTorch or MLflow folder into one
  Hugging Face model folder with its record (``visiontune.model_folder``).
- ``builtin``: models available offline (``efficientnet-lite0``).
- ``loading``: the image processor and the model with a head for the training classes.
- ``depthwise``: a faster backward for depthwise convolutions in bfloat16 on the CPU.
"""

from visiontune.models.importer import import_model
from visiontune.models.loading import load_for_finetune, load_image_processor

__all__ = ["import_model", "load_for_finetune", "load_image_processor"]
