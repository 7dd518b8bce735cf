"""visiontune: fine-tune image classifiers with the inputs of Azure ML's image components.

The commands are also functions (``visiontune.api``): ``import_model``, ``finetune``,
``pipeline``, ``evaluate``, ``predict`` and ``export_onnx``, loaded on first use, so that
``import visiontune`` stays light."""

__version__ = "0.1.0"

_API = ("import_model", "finetune", "pipeline", "evaluate", "predict", "export_onnx")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from visiontune import api

        return getattr(api, name)
    raise AttributeError(f"module 'visiontune' has no attribute {name!r}")
