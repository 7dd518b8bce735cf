"""The MLflow model: a pyfunc that takes a DataFrame column ``image`` and returns, per image,
``probs`` and ``labels`` (Azure's image scoring schema) and the predicted label(s).

The visiontune package travels inside the model (``code_paths``), so the model loads in a fresh
process with only its pip requirements installed, and preprocesses exactly as evaluation does.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

log = logging.getLogger(__name__)

# What a served model needs; versions pinned to what trained it (written at save time).
_REQUIREMENTS = ("torch", "torchvision", "transformers", "timm", "safetensors", "pillow", "numpy",
                 "pandas", "mlflow")
MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "model_selector_args.json")


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from visiontune.inference import Classifier

        self.classifier = Classifier(context.artifacts["model"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from visiontune.inference import decode_payload_image

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError("the input needs a column named 'image' (base64-encoded image bytes)")
        images = [decode_payload_image(v) for v in frame["image"].tolist()]
        probs = self.classifier.probabilities(images)
        return pd.DataFrame(self.classifier.describe(probs))


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in _REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def save_mlflow_model(model_dir: str | Path, output_dir: str | Path) -> Path:
    """Write the MLflow model for a fine-tuned model folder (checkpoints are left out)."""
    import json

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import visiontune

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    meta = json.loads((model_dir / "model_selector_args.json").read_text(encoding="utf-8"))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=".mlflow-") as tmp:
        staged_model = Path(tmp) / "model"
        staged_model.mkdir()
        for name in MODEL_FILES:
            if (model_dir / name).exists():
                shutil.copy2(model_dir / name, staged_model / name)
        target = Path(tmp) / "out"
        mlflow.pyfunc.save_model(
            path=str(target),
            python_model=ImageClassifierModel(),
            artifacts={"model": str(staged_model)},
            code_paths=[str(Path(visiontune.__file__).parent)],
            pip_requirements=_requirements(),
            signature=ModelSignature(inputs=Schema([ColSpec("string", "image")])),
            metadata={
                "finetuning_task": meta.get("model_metadata", {}).get("finetuning_task"),
                "base_model_name": meta.get("model_metadata", {}).get("base_model_name"),
                "is_finetuned_model": True,
            },
        )
        if output_dir.exists():
            shutil.rmtree(output_dir)
        shutil.move(str(target), str(output_dir))
    return output_dir
