"""ONNX export of a fine-tuned model.

``export_onnx`` writes ``model.onnx`` (input ``pixel_values``: float32 N x 3 x H x W with a
dynamic batch; output ``logits``) and ``visiontune_onnx.json`` (classes in index order, task,
preprocessing, multi-label threshold(s), opset). The JSON is written last, so a folder that has
it holds a complete export. ``visiontune.inference.OnnxClassifier`` scores with it.

Exporter: torch's ``torch.export``-based exporter (``dynamo=True``). Both exporters give ORT
logits within ~1e-7 of PyTorch for ViT, ConvNeXt and the timm wrapper (EfficientNet), but the
legacy TorchScript exporter traces Python values (ViT and ConvNeXt raise TracerWarnings about
tensors turned into Python booleans, which get frozen into the graph), is deprecated and is
being removed from torch. ``torch.export`` captures the graph symbolically and refuses an
export in which the batch dimension would not stay dynamic. Its operators are written for
opset 18 and newer; it cannot convert these graphs down to older opsets, so those are refused.
Every export is checked: ORT must load it and match PyTorch on a batch of another size.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontune import __version__
from visiontune.data.transforms import describe_augmentations
from visiontune.errors import UserError
from visiontune.inference import Classifier, model_folder
from visiontune.inference.onnx_runtime import (
    EXPORT_METADATA_FILE, INPUT_NAME, ONNX_FILE, OUTPUT_NAME, require_packages,
)
from visiontune.outputs import check_folder
from visiontune.tasks import MULTILABEL

log = logging.getLogger(__name__)

MIN_OPSET = 18  # the torch.export-based exporter's own operators
EXAMPLE_BATCH = 2  # not 1: a batch of one invites the batch dimension to be specialised
CHECK_BATCH = 3  # the post-export check uses another size, so a fixed batch would show


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
    require_packages(("onnx", "onnxscript", "onnxruntime"), "export-onnx")

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
