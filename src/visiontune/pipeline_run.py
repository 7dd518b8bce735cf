"""The pipeline component: model import -> data validation -> finetune -> evaluation.

Azure's pipeline has a stub validation step and never uses its test data; here the data is
read and every image decoded before any model is imported or downloaded, so a bad dataset
fails in seconds, and the test data gets a real evaluation report.

Under torchrun or Azure ML's distribution every process runs the pipeline: each reads the data and
imports the model into its own temporary folder (fine-tuning needs both on every process), all
fine-tune together, then rank 0 alone evaluates while the others wait for it. ``run_pipeline``
returns a ``PipelineResult`` and prints nothing: the CLI shows the steps and the result.
(The module is not named ``pipeline``: ``visiontune.pipeline`` is the API's function.)
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from visiontune.config import EvaluateConfig, FinetuneConfig, PipelineConfig, config_from
from visiontune.data.prepare import prepare_test_data
from visiontune.data.storage import redact
from visiontune.errors import UserError
from visiontune.evaluation import check_report_folder, evaluate
from visiontune.model_card import CARD_FILE, write_model_card
from visiontune.models.importer import import_model
from visiontune.ranks import is_main_process
from visiontune.training import distributed
from visiontune.training.finetune import (
    VALIDATION_SPLIT_FILE, check_finetune_inputs, finetune, read_data,
)

log = logging.getLogger("visiontune.pipeline")


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline run made: the fine-tuned model (a ``FinetuneResult``), the evaluation
    report (as its metrics.json holds it; None on the ranks other than 0), the report's folder
    and the data evaluated."""

    finetune: Any
    evaluation: dict[str, Any] | None
    evaluation_dir: Path
    test_data: str


def run_pipeline(cfg: PipelineConfig, *, callbacks: Iterable[Any] = (),
                 show: Callable[[str], None] | None = None) -> PipelineResult:
    """Run the pipeline on a ``PipelineConfig``. ``show``: where the step lines and the
    finetune's plan go (the CLI prints them; by default they are logged)."""
    try:
        return _run_pipeline(cfg, callbacks, show or log.info)
    except BaseException:
        distributed.leave_after_failure()  # exit with this error, not an abort at exit
        raise


def _run_pipeline(cfg: PipelineConfig, callbacks: Iterable[Any], show: Callable[[str], None]) -> PipelineResult:
    def step(text: str) -> None:
        if is_main_process():
            show(text)

    if not any((cfg.model_name, cfg.pytorch_model, cfg.mlflow_model)):
        raise UserError("one of --model_name, --pytorch_model or --mlflow_model is required")
    out = Path(cfg.output_dir_pytorch)
    evaluation_dir = Path(cfg.output_dir_evaluation or out / "evaluation")

    # 1. Inputs: every cross-input rule and output that does not need the model itself.
    check_finetune_inputs(config_from(FinetuneConfig, cfg, "not imported yet", model_path=None),
                          model_name=cfg.model_name)
    if is_main_process() and cfg.output_dir_evaluation:
        check_report_folder(evaluation_dir, "output_dir_evaluation")

    # 2. Data, before any model is imported.
    step("[1/4] validating data")
    data = read_data(cfg)
    if cfg.test_data:
        # Unknown labels and unreadable images in the test data fail now, not after training.
        prepare_test_data(cfg.test_data, task=cfg.task_name, classes=data.classes,
                          image_column=cfg.image_column, label_column=cfg.label_column,
                          skip_bad_rows=cfg.skip_bad_rows)

    with tempfile.TemporaryDirectory(prefix="visiontune-import-") as tmp:
        step("[2/4] importing the model")
        model_dir = import_model(model_name=cfg.model_name, pytorch_model=cfg.pytorch_model,
                                 mlflow_model=cfg.mlflow_model, output_dir=Path(tmp) / "model")
        step("[3/4] fine-tuning")
        result = finetune(config_from(FinetuneConfig, cfg, "the imported model",
                                      model_path=str(model_dir)),
                          callbacks=callbacks, data=data, show=show)

    # Test data, else the validation data, else the held-out split the run wrote out.
    test_data = cfg.test_data or cfg.validation_data or str(out / VALIDATION_SPLIT_FILE)
    report = None
    if is_main_process():
        show(f"[4/4] evaluating on {redact(test_data)}")
        batch = {"batch_size": cfg.validation_batch_size} if cfg.validation_batch_size else {}
        report, _ = evaluate(config_from(
            EvaluateConfig, cfg, "the pipeline's evaluation step", model=str(result.output_dir_pytorch),
            test_data=test_data, output_dir=str(evaluation_dir), **batch))
        if cfg.test_data:
            _add_test_metrics(result, report)
    distributed.wait_for_main_process("evaluating")
    return PipelineResult(result, report, evaluation_dir, test_data)


def _add_test_metrics(result, report: dict[str, Any]) -> None:
    """The test metrics into the model card of the PyTorch folder, and of the MLflow model
    when it has one."""
    write_model_card(result.output_dir_pytorch, test=report)
    mlflow_dir = result.output_dir_mlflow
    if mlflow_dir and (Path(mlflow_dir) / CARD_FILE).is_file():
        write_model_card(mlflow_dir, model_dir=result.output_dir_pytorch, mlflow_model=True)
