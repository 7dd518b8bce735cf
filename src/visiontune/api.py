"""visiontune as a Python library: the commands as functions, their inputs as keywords.

    import visiontune

    imported = visiontune.import_model(model_name="efficientnet-lite0", output_dir="runs/model")
    result = visiontune.finetune(model_path=imported, training_data="demo/digits/train",
                                 task_name="image-classification", output_dir_pytorch="runs/pt")
    report = visiontune.evaluate(model=result.output_dir_pytorch, test_data="demo/digits/test",
                                 output_dir="runs/eval")
    run = visiontune.pipeline(model_name="efficientnet-lite0", training_data="demo/digits/train",
                              task_name="image-classification", output_dir_pytorch="runs/p")

The keywords are the command's inputs, by the names of the input table (``visiontune <command>
--help``, the README's tables); what is not given takes the same default as on the command line,
and is checked the same way before anything heavy loads (a ``UserError`` naming the input):
the keywords become the command's config (``visiontune.config``), which the library receives.
Paths may be ``str`` or ``os.PathLike``. Nothing here prints or sets up logging: the run's
plan and steps are logged, and the caller's logging configuration decides what is shown.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable

from visiontune import config as C
from visiontune.data.files import set_max_file_bytes
from visiontune.errors import UserError

__all__ = ["import_model", "finetune", "pipeline", "evaluate", "predict", "export_onnx"]


def _values(command: str, cls: type, given: dict[str, Any]):
    """The config of one command from its keywords, defaults filled in as the CLI does."""
    known = {spec.name: spec for spec in cls.INPUTS}
    unknown = sorted(set(given) - set(known))
    if unknown:
        hints = [f"{name} (did you mean {close[0]}?)" if close else name
                 for name in unknown
                 for close in [difflib.get_close_matches(name, known, n=1)]]
        raise UserError(f"visiontune.{command}(): unknown input(s) {', '.join(hints)}; "
                        f"its inputs: {', '.join(known)}")
    plain = {name: os.fspath(value) if isinstance(value, os.PathLike) else value
             for name, value in given.items()}
    cfg = C.resolve(cls, plain, given_as=C.KEYWORD)
    prepare_process(cfg)
    return cfg


def prepare_process(cfg, *, loads_torch: bool = True) -> None:
    """What a command's config sets for the whole process, CLI and API alike: the per-image
    byte limit (commands that read images), and triton left out on a machine without a GPU."""
    if hasattr(cfg, "max_image_mb"):
        set_max_file_bytes(cfg.max_image_mb << 20)
    if loads_torch:
        from visiontune import cpu_only

        cpu_only.skip_triton()  # before torchvision and transformers import torch._dynamo


def import_model(**inputs: Any) -> Path:
    """Import a model (hub id, local folder, ``efficientnet-lite0``, a PyTorch or MLflow
    folder) into ``output_dir``; returns that folder, ready for ``finetune(model_path=...)``."""
    from visiontune.models.importer import import_model as run

    cfg = _values("import_model", C.ImportConfig, inputs)
    return run(model_name=cfg.model_name, pytorch_model=cfg.pytorch_model,
               mlflow_model=cfg.mlflow_model, output_dir=cfg.output_dir)


def finetune(*, callbacks: Iterable[Any] = (), **inputs: Any):
    """Fine-tune an imported model; returns a ``FinetuneResult`` (the output folders, the best
    model's validation metrics and the classes). ``callbacks``: extra transformers
    ``TrainerCallback`` objects."""
    from visiontune.training.finetune import finetune as run

    return run(_values("finetune", C.FinetuneConfig, inputs), callbacks=callbacks)


def pipeline(*, callbacks: Iterable[Any] = (), **inputs: Any):
    """Import a model, check the data, fine-tune and evaluate (the ``pipeline`` command's
    inputs); returns a ``PipelineResult``: the ``FinetuneResult``, the evaluation report and
    its folder."""
    from visiontune.pipeline_run import run_pipeline

    return run_pipeline(_values("pipeline", C.PipelineConfig, inputs), callbacks=callbacks)


def evaluate(**inputs: Any) -> dict[str, Any]:
    """Evaluate a fine-tuned model on labelled ``test_data``; writes the report into
    ``output_dir`` and returns it (the metrics, the per-class table, the bad rows skipped)."""
    from visiontune.evaluation import evaluate as run

    report, _ = run(_values("evaluate", C.EvaluateConfig, inputs))
    return report


def predict(**inputs: Any):
    """Predict the images of ``data`` into ``output`` (.jsonl or .csv); returns a
    ``PredictionResult`` (the file, the counts, the error of each unreadable image)."""
    from visiontune.prediction import predict as run

    return run(_values("predict", C.PredictConfig, inputs))


def export_onnx(**inputs: Any) -> Path:
    """Export a fine-tuned model to ONNX in ``output_dir``; returns the ``.onnx`` file."""
    from visiontune.onnx_export import export_onnx as run

    cfg = _values("export_onnx", C.ExportOnnxConfig, inputs)
    return run(cfg.model, cfg.output_dir, cfg.opset)
