"""ONNX export of a fine-tuned model, and a classifier that scores with ONNX Runtime.

``export_onnx`` writes ``model.onnx`` (input ``pixel_values``: float32 N x 3 x H x W with a
dynamic batch; output ``logits``) and ``visiontune_onnx.json`` (classes in index order, task,
preprocessing, multi-label threshold(s), opset). The JSON is written last, so a folder that has
it holds a complete export.

Exporter: torch's ``torch.export``-based exporter (``dynamo=True``). Both exporters give ORT
logits within ~1e-7 of PyTorch for ViT, ConvNeXt and the timm wrapper (EfficientNet), but the
legacy TorchScript exporter traces Python values (ViT and ConvNeXt raise TracerWarnings about
tensors turned into Python booleans, which get frozen into the graph), is deprecated and is
being removed from torch. ``torch.export`` captures the graph symbolically and refuses an
export in which the batch dimension would not stay dynamic. Its operators are written for
opset 18 and newer; it cannot convert these graphs down to older opsets, so those are refused.
Every export is checked: ORT must load it and match PyTorch on a batch of another size.

``OnnxClassifier`` is an ``inference.ClassifierBase`` whose logits come from ONNX Runtime: it
preprocesses with the same code (the saved eval transform, ``ClassifierBase.tensors``), so both
score the same pixels.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from visiontune import __version__
from visiontune.errors import UserError
from visiontune.inference import Classifier, ClassifierBase, model_folder
from visiontune.outputs import check_folder
from visiontune.tasks import MULTILABEL

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
EXPORT_METADATA_FILE = "visiontune_onnx.json"
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
MIN_OPSET = 18  # the torch.export-based exporter's own operators
EXAMPLE_BATCH = 2  # not 1: a batch of one invites the batch dimension to be specialised
CHECK_BATCH = 3  # the post-export check uses another size, so a fixed batch would show
INSTALL_HINT = 'pip install "visiontune[onnx]"'


def _require(modules: Sequence[str], what: str) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)} (not installed): {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
@contextmanager
def _quiet_exporter():
    """Keep the exporter's pass-by-pass INFO lines out of the command's output, and the
    tracebacks its version converter logs when it cannot reach an opset: the opset of the
    result is checked here instead, with a one-line error."""
    levels = {"onnxscript": logging.ERROR, "onnx_ir": logging.WARNING}
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _logits_module(model):
    import torch

    class LogitsOnly(torch.nn.Module):
        """``pixel_values -> logits``: one named tensor out instead of a ModelOutput."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).logits

    return LogitsOnly(model).eval()


def _opset_of(path: Path) -> int | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _check_with_ort(path: Path, module, height: int, width: int) -> float:
    """Largest |ORT - PyTorch| logit difference on a batch of CHECK_BATCH random images,
    relative to the largest logit (at least 1)."""
    import onnxruntime as ort
    import torch

    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(CHECK_BATCH, 3, height, width, generator=generator)
    with torch.inference_mode():
        expected = module(batch).float().numpy()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    except Exception as exc:  # ORT reports graph problems with its own exception types
        raise UserError(f"ONNX Runtime cannot run the exported model: {str(exc).splitlines()[0]}") from None
    if got.shape != expected.shape:
        raise UserError(f"the exported model returns logits of shape {got.shape} for a batch of "
                        f"{CHECK_BATCH}, not {expected.shape}")
    if not got.size:
        return 0.0
    return float(np.max(np.abs(got - expected)) / max(1.0, float(np.max(np.abs(expected)))))


def _earlier_export(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return EXPORT_METADATA_FILE in names and all(
        n in (EXPORT_METADATA_FILE, ONNX_FILE, ONNX_FILE + ".data") or n.startswith(".onnx-export-")
        for n in names)


def export_onnx(model_dir: str | Path, output_dir: str | Path, opset: int = 18) -> Path:
    """Export the fine-tuned model in ``model_dir`` (PyTorch or MLflow folder) into
    ``output_dir``; return the path of ``model.onnx``."""
    _require(("onnx", "onnxscript", "onnxruntime"), "export-onnx")
    import torch

    opset = int(opset)
    if opset < MIN_OPSET:
        raise UserError(f"--opset: {opset} is not supported; torch's ONNX exporter writes opset "
                        f"{MIN_OPSET} or newer (ONNX Runtime 1.14 and later run it)")
    source = model_folder(model_dir)
    # before the model loads; an earlier export there may be replaced, nothing else
    output_dir = check_folder(output_dir, "output_dir", replaceable=_earlier_export, create=False)
    classifier = Classifier(source, device="cpu")
    output_dir.mkdir(parents=True, exist_ok=True)
    pre = classifier.preprocessing
    module = _logits_module(classifier.model.float())
    example = torch.randn(EXAMPLE_BATCH, 3, pre.height, pre.width,
                          generator=torch.Generator().manual_seed(0))

    (output_dir / EXPORT_METADATA_FILE).unlink(missing_ok=True)  # the folder is incomplete until the end
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".onnx-export-") as tmp:
        staged = Path(tmp) / ONNX_FILE
        try:
            with _quiet_exporter():
                torch.onnx.export(
                    module, (example,), str(staged), dynamo=True, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
                    # One file; torch still moves the weights to model.onnx.data above 1.5 GB.
                    external_data=False, verbose=False,
                )
        except Exception as exc:  # torch.export and the translator raise many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(f"cannot export {source} to ONNX: {type(exc).__name__}: {first}") from None
        written = _opset_of(staged)
        if written != opset:
            raise UserError(f"--opset: the exporter could not convert this model to opset {opset} "
                            f"(it wrote {written}); try --opset {MIN_OPSET}")
        diff = _check_with_ort(staged, module, pre.height, pre.width)
        if diff > 1e-3:
            raise UserError(f"the exported model differs from PyTorch (largest relative logit "
                            f"difference {diff:.3g}); the model uses operations the exporter gets wrong")
        log.info("ONNX Runtime matches PyTorch (largest relative logit difference %.2g)", diff)
        data = staged.with_name(ONNX_FILE + ".data")
        os.replace(staged, output_dir / ONNX_FILE)
        if data.exists():
            os.replace(data, output_dir / data.name)
        else:
            (output_dir / data.name).unlink(missing_ok=True)  # left by an earlier, larger export

    metadata = export_metadata(classifier, opset, source)
    (output_dir / EXPORT_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return output_dir / ONNX_FILE


def export_metadata(classifier: Classifier, opset: int, source: Path) -> dict[str, Any]:
    """What a consumer needs besides the graph: labels, task, preprocessing, thresholds."""
    import torch

    from visiontune.data.transforms import describe_augmentations

    pre = classifier.preprocessing
    multilabel = classifier.task == MULTILABEL
    threshold = classifier.threshold.tolist() if multilabel else None
    return {
        "format_version": 1,
        "model_file": ONNX_FILE,
        "input": {"name": INPUT_NAME, "dtype": "float32",
                  "shape": ["batch", 3, pre.height, pre.width]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32",
                   "shape": ["batch", len(classifier.classes)]},
        "classes": list(classifier.classes),  # logit i is classes[i]
        "task": classifier.task,
        "probabilities": "sigmoid" if multilabel else "softmax",
        "multilabel_threshold": threshold,
        "preprocessing": pre.to_dict(),
        # The same steps as visiontune's eval transform, for consumers in other languages.
        "preprocessing_steps": describe_augmentations(pre, augment=False)["eval"],
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "visiontune_version": __version__,
        "source_model": str(source.resolve()),
    }


def run_export(cfg) -> int:
    """``visiontune export-onnx``."""
    path = export_onnx(cfg.model, cfg.output_dir, cfg.opset)
    print(f"ONNX model written to {path} (metadata: {path.with_name(EXPORT_METADATA_FILE)})")
    return 0


# ---------------------------------------------------------------------------------------------
# Scoring with ONNX Runtime
# ---------------------------------------------------------------------------------------------
class OnnxClassifier(ClassifierBase):
    """An exported folder, run by ONNX Runtime: on the GPU when this onnxruntime has CUDA
    (onnxruntime-gpu) and the machine has one, else on the CPU (``hardware.onnx_providers``).

    Only loading and ``logits`` differ: preprocessing (``tensors`` with the saved eval
    transform), probabilities and the scoring schema are the PyTorch classifier's own code, so
    the two cannot drift apart. There is no torch model: ``model`` and ``device`` are absent."""

    def __init__(self, onnx_dir: str | Path):
        _require(("onnxruntime",), "OnnxClassifier")
        import onnxruntime as ort

        from visiontune.data.transforms import Preprocessing

        path = Path(onnx_dir)
        folder = path.parent if path.suffix == ".onnx" else path
        meta_path = folder / EXPORT_METADATA_FILE
        if not meta_path.is_file():
            raise UserError(f"{folder} is not an ONNX export of visiontune (no {EXPORT_METADATA_FILE})")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        super().__init__(folder, list(meta["classes"]), meta["task"],
                         Preprocessing.from_dict(meta["preprocessing"]), meta.get("multilabel_threshold"))
        from visiontune.hardware import gpu_kind, onnx_providers

        self.session = ort.InferenceSession(str(folder / meta.get("model_file", ONNX_FILE)),
                                            providers=onnx_providers(ort.get_available_providers(),
                                                                     gpu_kind()))

    def batch_logits(self, batch) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]


def open_onnx_classifier(onnx_dir: str | Path, model_dir: str | Path | None = None) -> OnnxClassifier:
    """ONNX Runtime scoring of an export; the multi-label threshold stays the model folder's
    (``model_dir``), which ``visiontune evaluate --tune_thresholds`` updates in place."""
    from visiontune.inference import check_threshold
    from visiontune.model_folder import read_metadata

    classifier = OnnxClassifier(onnx_dir)
    if not model_dir:
        return classifier
    classifier.model_dir = Path(model_dir)  # where evaluate writes tuned thresholds back
    meta = read_metadata(classifier.model_dir)
    if "multilabel_threshold" in meta:
        classifier.threshold = check_threshold(meta["multilabel_threshold"], len(classifier.classes))
    return classifier


def find_export(model: str | Path) -> Path | None:
    """The ONNX export that belongs to a fine-tuned model, if it has one: ``onnx/`` in the
    PyTorch output folder (finetune --apply_ort true, or export-onnx into it), or
    ``artifacts/onnx`` in an MLflow model folder written with it."""
    path = Path(str(model)).expanduser()
    for candidate in (path / ONNX_SUBDIR, path / "artifacts" / ONNX_SUBDIR):
        if (candidate / EXPORT_METADATA_FILE).is_file():
            return candidate
    return None


def onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


# ---------------------------------------------------------------------------------------------
# apply_ort: ONNX Runtime for the fine-tuned model's inference
# ---------------------------------------------------------------------------------------------
ONNX_SUBDIR = "onnx"
ONNX_EVAL_FILE = "eval_results.json"
PARITY_TOLERANCE = 1e-4  # largest |ORT - PyTorch| probability accepted without a warning


def check_apply_ort() -> None:
    """Before training: the packages, then one line saying what apply_ort does here."""
    import torch

    from visiontune.training import distributed
    from visiontune.training.arguments import ort_training_available

    _require(("onnx", "onnxscript", "onnxruntime"), "apply_ort")
    if not distributed.is_main_process():
        return
    what = ("training runs in PyTorch; ONNX Runtime is used for inference: the fine-tuned model "
            f"is exported to ONNX ({ONNX_SUBDIR}/ in output_dir_pytorch), the validation set is "
            "scored again with ONNX Runtime, and the MLflow model (when saved) serves with it")
    if ort_training_available():
        log.warning("apply_ort: visiontune does not train with ONNX Runtime, so %s", what)
    else:
        log.warning("apply_ort: ONNX Runtime training is unavailable with this torch (%s), so %s",
                    torch.__version__.split("+")[0], what)


def export_and_validate(model_dir: str | Path, records, label_ids: np.ndarray,
                        pytorch_logits: np.ndarray, *, batch_size: int = 32,
                        mixed_precision: bool = False,
                        tolerance: float = PARITY_TOLERANCE) -> Path:
    """Export the fine-tuned model in ``model_dir`` to ``model_dir/onnx``, then repeat the final
    validation evaluation with ONNX Runtime: its metrics, and the largest probability difference
    from PyTorch's (``pytorch_logits``, same records, same order), go to
    ``onnx/eval_results.json``. Returns the ONNX folder."""
    from visiontune.errors import DataError
    from visiontune.metrics import compute_metrics, probabilities
    from visiontune.prediction import score_images

    model_dir = Path(model_dir)
    onnx_dir = model_dir / ONNX_SUBDIR
    try:
        export_onnx(model_dir, onnx_dir)
    except UserError as exc:
        raise UserError(f"apply_ort: training finished and the PyTorch model is in {model_dir}, "
                        f"but the ONNX export failed: {exc}") from None
    classifier = OnnxClassifier(onnx_dir)
    logits, errors = score_images(classifier, [r.image for r in records], batch_size,
                                  "validation (ONNX Runtime)")
    if errors:  # the images were read during training, so only a file changed meanwhile
        first = min(errors)
        raise DataError(f"apply_ort: {records[first].where}: {errors[first]}")
    ort_probs = probabilities(logits, classifier.task)
    torch_probs = probabilities(np.asarray(pytorch_logits, dtype=np.float32), classifier.task)
    diff = float(np.max(np.abs(ort_probs - torch_probs))) if ort_probs.size else 0.0
    metrics = compute_metrics(logits, np.asarray(label_ids), classifier.task,
                              threshold=classifier.threshold, class_names=classifier.classes)
    report = {
        "backend": "onnxruntime",
        "number_of_images": len(records),
        "parity": {"max_abs_probability_difference": diff, "tolerance": tolerance,
                   "compared_with": "the PyTorch probabilities of the final validation evaluation",
                   "pytorch_mixed_precision": mixed_precision},
        "metrics": metrics,
    }
    (onnx_dir / ONNX_EVAL_FILE).write_text(json.dumps(report, indent=2, default=float) + "\n",
                                           encoding="utf-8")
    scalars = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    if diff > tolerance:
        why = (" (the PyTorch evaluation ran in mixed precision, ONNX Runtime in float32)"
               if mixed_precision else "")
        log.warning("ONNX Runtime probabilities differ from PyTorch's by up to %.3g on the %d "
                    "validation images, above %g%s", diff, len(records), tolerance, why)
    else:
        log.info("ONNX Runtime matches PyTorch on the %d validation images (largest probability "
                 "difference %.3g)", len(records), diff)
    log.info("validation metrics with ONNX Runtime: %s", scalars)
    return onnx_dir
