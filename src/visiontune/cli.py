"""The ``visiontune`` command. Subcommands mirror the Azure ML components.

Options come from the input tables in ``inputs.py``; each handler receives the command's
resolved, checked config (``config.py``) and prints what the library returns. Errors a user
can fix print as one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Iterable

from visiontune import __version__
from visiontune import inputs as I
from visiontune import console, malloc
from visiontune.api import prepare_process
from visiontune.config import resolve
from visiontune.errors import UserError
from visiontune.ranks import is_main_process


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit code 2)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _show(text: str) -> None:
    """The library's lines for the console (it decides which rank shows them)."""
    print(text, flush=True)


def _import_model(cfg) -> int:
    from visiontune.models.importer import import_model

    out = import_model(
        model_name=cfg.model_name, pytorch_model=cfg.pytorch_model,
        mlflow_model=cfg.mlflow_model, output_dir=cfg.output_dir,
    )
    print(f"imported model written to {out}")
    return 0


def _data_check(cfg) -> int:
    from visiontune.data.check import check_data

    report, ok = check_data(
        cfg.data, cfg.task_name, image_column=cfg.image_column,
        label_column=cfg.label_column, skip_bad_rows=cfg.skip_bad_rows,
    )
    print(report)
    return 0 if ok else 1


def _demo_data(cfg) -> int:
    from visiontune.demo import write_demo_data

    paths = write_demo_data(cfg.output_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _finetune(cfg) -> int:
    from visiontune.training.finetune import finetune

    result = finetune(cfg, show=_show)
    if is_main_process():
        _print_validation_metrics(result)
        _print_models(result)
    return 0


def _pipeline(cfg) -> int:
    from visiontune.evaluation import show_report
    from visiontune.pipeline_run import run_pipeline

    result = run_pipeline(cfg, show=_show)
    if is_main_process():
        _print_validation_metrics(result.finetune)
        show_report(result.evaluation, result.evaluation_dir)
        _print_models(result.finetune)
        print(f"evaluation report: {result.evaluation_dir}", flush=True)
    return 0


def _print_validation_metrics(result) -> None:
    summary = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    print(f"validation metrics of the best model: {summary}", flush=True)


def _print_models(result) -> None:
    print(f"pytorch model: {result.output_dir_pytorch}", flush=True)
    if result.output_dir_mlflow:
        print(f"mlflow model: {result.output_dir_mlflow}", flush=True)


def _evaluate(cfg) -> int:
    from visiontune.evaluation import run_evaluate

    return run_evaluate(cfg)


def _predict(cfg) -> int:
    from visiontune.prediction import run_predict

    return run_predict(cfg)


def _export_onnx(cfg) -> int:
    from visiontune.onnx_export import run_export

    return run_export(cfg)


# name -> (help, inputs, handler, accepts --config)
COMMANDS: dict[str, tuple[str, Iterable[I.Input], Callable[[Any], int], bool]] = {
    "import-model": ("Import a model (hub id, local folder, built-in, PyTorch or MLflow folder).",
                     I.IMPORT_INPUTS, _import_model, True),
    "finetune": ("Fine-tune an imported model on image data (every input of Azure's finetune component).",
                 I.FINETUNE_INPUTS, _finetune, True),
    "pipeline": ("Import, validate data, fine-tune and evaluate in one run (Azure's pipeline "
                 "component, with a real validation and evaluation step).",
                 I.PIPELINE_INPUTS, _pipeline, True),
    "evaluate": ("Evaluate a fine-tuned model on labelled data: metrics, per-class table, plots.",
                 I.EVALUATE_INPUTS, _evaluate, True),
    "predict": ("Predict labels for images with a fine-tuned model.", I.PREDICT_INPUTS, _predict, True),
    "export-onnx": ("Export a fine-tuned model to ONNX with its labels and preprocessing.",
                    I.EXPORT_ONNX_INPUTS, _export_onnx, True),
    "data check": ("Read a dataset and report rows, classes, bad rows and image sizes.",
                   I.DATA_CHECK_INPUTS, _data_check, False),
    "demo-data": ("Write the demo datasets (handwritten digits; multi-label digit mosaics).",
                  I.DEMO_INPUTS, _demo_data, False),
}
WITHOUT_TORCH = {"data check", "demo-data"}  # the rest import torch anyway


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="visiontune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"visiontune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (help_text, specs, handler, has_config) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")  # "data check" -> group "data", command "check"
        if group and group not in groups:
            gp = sub.add_parser(group, help=f"{group} commands")
            groups[group] = gp.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
        p = (groups[group] if group else sub).add_parser(leaf, help=help_text, description=help_text)
        if has_config:
            p.add_argument("--config", default=None, metavar="FILE",
                           help="YAML or JSON file of inputs; the command line wins over it.")
        I.add_to_parser(p, specs)
        p.set_defaults(_handler=handler, _specs=tuple(specs), _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    # One log in distributed runs: the other ranks only say when something is wrong.
    console.setup(is_main_process())  # before any library logs or warns
    parser = build_parser()
    args = parser.parse_args(argv)
    malloc.tune()  # before the first tensor: training and prediction allocate large ones
    given = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "subcommand", "config")}
    try:
        config = I.read_config_file(getattr(args, "config", None))
        cfg = resolve(args._specs, given, config)
        prepare_process(cfg, loads_torch=args._name not in WITHOUT_TORCH)
        if args._name not in WITHOUT_TORCH:
            console.route_transformers()
        return int(args._handler(cfg) or 0)
    except UserError as exc:
        print(f"visiontune {args._name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("visiontune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
