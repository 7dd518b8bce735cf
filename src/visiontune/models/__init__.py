"""Model import (``import-model``) and loading models for fine-tuning.

- ``importer``: turns a built-in name, hub id, local, PyTorch or MLflow folder into one
  Hugging Face model folder with its record (``visiontune.model_folder``).
- ``builtin``: models available offline (``efficientnet-lite0``).
- ``loading``: the image processor and the model with a head for the training classes.
- ``depthwise``: a faster backward for depthwise convolutions in bfloat16 on the CPU.

Names are imported lazily, so that one submodule (the depthwise switch, for the run's notes)
loads without the importer's libraries.
"""

from importlib import import_module

_EXPORTS = {"import_model": "importer", "load_for_finetune": "loading",
            "load_image_processor": "loading"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
