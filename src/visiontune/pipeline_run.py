"""The pipeline component: model import -> data validation -> finetune -> evaluation.

Azure's pipeline has a stub validation step and never uses its test data; here the data is
read and every image decoded before any model is imported or downloaded, so a bad dataset
fails in seconds, and the test data gets a real evaluation report.

Under torchrun or Azure ML's distribution every process runs the pipeline: each reads the data and
imports the model into its own temporary folder (fine-tuning needs both on every process), all
fine-tune together, then rank 0 alone evaluates and prints while the others wait for it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from visiontune import inputs as I
from visiontune.errors import UserError
from visiontune.training import distributed

log = logging.getLogger("visiontune.pipeline")


def _say(text: str) -> None:
    if distributed.is_main_process():
        print(text, flush=True)


def run_pipeline(values: dict[str, Any]) -> int:
    try:
        return _run_pipeline(values)
    except BaseException:
        distributed.leave_after_failure()  # exit with this error, not an abort at exit
        raise


def _run_pipeline(values: dict[str, Any]) -> int:
    from visiontune.data.prepare import prepare_data, prepare_test_data
    from visiontune.evaluation import evaluate, show_report
    from visiontune.models.importer import import_model
    from visiontune.training.finetune import VALIDATION_SPLIT_FILE, check_finetune_inputs, finetune

    sources = [values[k] for k in ("model_name", "pytorch_model", "mlflow_model")]
    if not any(sources):
        raise UserError("one of --model_name, --pytorch_model or --mlflow_model is required")
    out = Path(values["output_dir_pytorch"])
    evaluation_dir = Path(values["output_dir_evaluation"] or out / "evaluation")

    # 1. Inputs: every cross-input rule and output that does not need the model itself.
    check_finetune_inputs({**values, "model_path": None}, model_name=values["model_name"])
    if distributed.is_main_process() and values["output_dir_evaluation"]:
        from visiontune.evaluation import check_report_folder

        check_report_folder(evaluation_dir, "output_dir_evaluation")

    # 2. Data, before any model is imported.
    _say("[1/4] validating data")
    data = prepare_data(
        values["training_data"], values["validation_data"], task=values["task_name"],
        image_column=values["image_column"], label_column=values["label_column"],
        validation_fraction=values["validation_fraction"], seed=values["random_seed"],
        skip_bad_rows=values["skip_bad_rows"],
    )
    if values["test_data"]:
        # Unknown labels and unreadable images in the test data fail now, not after training.
        prepare_test_data(values["test_data"], task=values["task_name"], classes=data.classes,
                          image_column=values["image_column"], label_column=values["label_column"],
                          skip_bad_rows=values["skip_bad_rows"])

    with tempfile.TemporaryDirectory(prefix="visiontune-import-") as tmp:
        _say("[2/4] importing the model")
        model_dir = import_model(model_name=values["model_name"], pytorch_model=values["pytorch_model"],
                                 mlflow_model=values["mlflow_model"], output_dir=Path(tmp) / "model")
        _say("[3/4] fine-tuning")
        finetune_values = {k: values[k] for k in I.by_name(I.FINETUNE_INPUTS) if k != "model_path"}
        result = finetune({**finetune_values, "model_path": str(model_dir)}, data=data)

    # Test data, else the validation data, else the held-out split the run wrote out.
    test_data = values["test_data"] or values["validation_data"] or str(out / VALIDATION_SPLIT_FILE)
    if distributed.is_main_process():
        print(f"[4/4] evaluating on {test_data}", flush=True)
        report, classifier = evaluate(I.resolve(I.EVALUATE_INPUTS, {
            "model": str(result.output_dir_pytorch), "test_data": test_data,
            "output_dir": str(evaluation_dir), "image_column": values["image_column"],
            "label_column": values["label_column"], "skip_bad_rows": values["skip_bad_rows"],
            "batch_size": values["validation_batch_size"] or 32,
        }))
        show_report(report, classifier, evaluation_dir)
        if values["test_data"]:
            _add_test_metrics(result, report)
        print(f"pytorch model: {result.output_dir_pytorch}")
        if result.output_dir_mlflow:
            print(f"mlflow model: {result.output_dir_mlflow}")
        print(f"evaluation report: {evaluation_dir}")
    distributed.wait_for_main_process("evaluating")
    return 0


def _add_test_metrics(result, report: dict[str, Any]) -> None:
    """The test metrics into the model card of the PyTorch folder, and of the MLflow model
    when it has one."""
    from visiontune.model_card import CARD_FILE, write_model_card

    write_model_card(result.output_dir_pytorch, test=report)
    mlflow_dir = result.output_dir_mlflow
    if mlflow_dir and (Path(mlflow_dir) / CARD_FILE).is_file():
        write_model_card(mlflow_dir, model_dir=result.output_dir_pytorch, mlflow_model=True)
