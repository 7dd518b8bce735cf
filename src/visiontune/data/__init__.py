"""Reading, checking and transforming image-classification data.

Submodules: ``sources`` (annotation files, MLTable folders, folder trees -> Records),
``mltable`` (the MLTable file), ``columnar`` (Parquet, Hugging Face datasets, WebDataset shards),
``images`` (reading and decoding), ``labels``, ``split``, ``transforms``, ``dataset``,
``prepare`` (all of it for training) and ``check`` (``visiontune data check``).
Names are imported lazily so that reading data does not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "Record": "sources", "Problem": "sources", "load_records": "sources",
    "read_image_bytes": "images", "decode_image": "images", "load_image": "images",
    "to_uint8_tensor": "transforms",
    "build_classes": "labels", "encode_label": "labels",
    "stratified_split": "split",
    "Preprocessing": "transforms", "resolve_preprocessing": "transforms",
    "train_transform": "transforms", "eval_transform": "transforms",
    "describe_augmentations": "transforms",
    "ImageDataset": "dataset",
    "PreparedData": "prepare", "prepare_data": "prepare",
    "check_data": "check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
