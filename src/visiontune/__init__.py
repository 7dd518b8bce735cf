"""visiontune: fine-tune image classifiers with the inputs of Azure ML's image components.

The commands are also functions (``visiontune.api``): ``import_model``, ``finetune``,
``pipeline``, ``evaluate``, ``predict`` and ``export_onnx``, loaded on first use, so that
``import visiontune`` stays light.

Where an input goes, in the order the data flows:

- ``inputs.py`` declares every input once; ``config.py`` turns a command's inputs into a frozen,
  typed config (``FinetuneConfig``...), which ``cli.py`` and ``api.py`` build and every library
  function takes; ``settings.py`` lists the environment switches.
- ``models/`` imports a model (``import-model``) and loads it for fine-tuning;
- ``data/`` reads the data (MLTable, JSON Lines, CSV, Parquet, datasets, shards; local or in a
  store), checks the images and turns them into tensors;
- ``training/`` maps the config onto the Trainer (``arguments.py``), trains (``finetune.py``:
  build, train, save) and writes the outputs (``outputs.py``; ``model_folder.py``, whose
  ``ModelFolder`` opens any model folder and owns its record; ``model_card.py``,
  ``serving/mlflow_model.py``);
- ``inference/`` opens a fine-tuned model for ``evaluation.py``, ``prediction.py``,
  ``serving/`` and ``onnx_export.py``; ``pipeline_run.py`` chains import, finetune and evaluate;
  ``components.py`` writes the Azure ML component specs from the same input table.

To follow one input, find its row in ``inputs.py`` and search for ``.<name>`` (see
``config.py``)."""

__version__ = "0.1.0"

_API = ("import_model", "finetune", "pipeline", "evaluate", "predict", "export_onnx")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from visiontune import api

        return getattr(api, name)
    raise AttributeError(f"module 'visiontune' has no attribute {name!r}")
