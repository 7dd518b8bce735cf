"""A model folder: the Hugging Face files (``config.json``, weights, preprocessing) and
visiontune's record of them, ``model_selector_args.json``.

``ModelFolder.open`` finds the model in any folder a user may pass (visiontune's outputs, a
Hugging Face folder, an MLflow model, Azure's import output) with one-line errors; the record is
read, validated and written here only, every write whole or not at all. Import writes the record
(where the model came from, Azure's layout), finetune rewrites it last, after the files it
describes (task, labels, preprocessing, threshold), evaluation updates the tuned threshold;
fine-tuning, prediction, serving and the model card read it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontune.errors import UserError
from visiontune.outputs import write_json_atomic

CONFIG_FILE = "config.json"
METADATA_FILE = "model_selector_args.json"
MLMODEL_FILE = "MLmodel"
MLFLOW_MODEL_SUBDIR = Path("artifacts") / "model"  # the Hugging Face files in an MLflow model
# What finetune writes beside the weights, for the model card and for people: the resolved
# inputs and their sources, the augmentations, the best model's validation metrics.
ARGS_FILE = "finetune_args.json"
AUGMENTATIONS_FILE = "augmentations.json"
EVAL_RESULTS_FILE = "eval_results.json"
# Where a record may name the model folder, relative to the record (Azure's import output).
_NAMED_BY = ("pytorch_model_path", "mlflow_model_path")


@dataclass(frozen=True)
class ModelFolder:
    """The folder holding a model's ``config.json`` (and its record, when it has one)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def open(cls, given: str | Path, option: str, expected: str = "") -> "ModelFolder":
        """The model in the folder ``given`` for the input ``option``: the folder itself,
        ``artifacts/model`` of an MLflow model, or the folder its record names (Azure's import
        output: ``pytorch_model_path`` / ``mlflow_model_path``). A UserError naming ``option``
        otherwise; ``expected`` says what to pass instead."""
        folder = Path(str(given)).expanduser()
        if not folder.exists():
            raise UserError(f"{option}: folder not found: {given}")
        if not folder.is_dir():
            raise UserError(f"{option}: {given} is a file; expected a model folder")
        try:
            found = cls.within(folder)
        except FileNotFoundError as exc:
            raise UserError(f"{option}: {exc}") from None
        if found is None:
            found = cls._named_by_record(folder, option)
        if found is None:
            raise UserError(f"{option}: no model in {given}: it is not a model folder (no "
                            f"{CONFIG_FILE}){'; ' + expected if expected else ''}")
        return found

    @classmethod
    def within(cls, folder: str | Path) -> "ModelFolder | None":
        """The model a visiontune output holds: ``folder`` itself or, for an MLflow model
        folder, its ``artifacts/model`` (FileNotFoundError when that has no model); None when
        ``folder`` holds no ``config.json``."""
        folder = Path(folder)
        if (folder / MLMODEL_FILE).is_file():
            inner = folder / MLFLOW_MODEL_SUBDIR
            if not (inner / CONFIG_FILE).is_file():
                raise FileNotFoundError(
                    f"{folder} is an MLflow model folder, but {inner} holds no model "
                    f"({CONFIG_FILE}); it was not written by visiontune")
            return cls(inner)
        return cls(folder) if (folder / CONFIG_FILE).is_file() else None

    @classmethod
    def holding_record(cls, folder: str | Path) -> "ModelFolder":
        """The folder with the record: ``folder`` itself, or the shallowest one inside it (the
        Hugging Face files an MLflow model carries); ``folder`` when there is none."""
        folder = Path(folder)
        if (folder / METADATA_FILE).is_file():
            return cls(folder)
        inner = shallowest_first((p.parent for p in folder.rglob(METADATA_FILE)
                                  if not under_checkpoint(p, folder)), folder)
        return cls(inner[0] if inner else folder)

    @classmethod
    def _named_by_record(cls, folder: Path, option: str) -> "ModelFolder | None":
        """The model folder an import output's record points to; None when there is no record.
        An import output without model files (Azure's import of a hub model leaves the
        download to its finetune) fails with what to do instead."""
        record = cls(folder)
        if not record.record_path.is_file():
            return None
        try:
            args = record.metadata()
        except UserError as exc:
            raise UserError(f"{option}: {exc}") from None
        named = []
        for key in _NAMED_BY:
            value = args.get(key)
            if not isinstance(value, str) or value.strip() in ("", "."):
                continue
            inner = (folder / value.strip()).resolve()
            named.append(f"{key} {value!r}")
            if not inner.is_relative_to(folder.resolve()):
                raise UserError(f"{option}: {record.record_path}: {key} {value!r} points outside {folder}")
            if (inner / CONFIG_FILE).is_file():
                return cls(inner)
            # An MLflow model copied whole keeps the Hugging Face files in a subfolder.
            configs = shallowest_first((p for p in inner.rglob(CONFIG_FILE)
                                        if not under_checkpoint(p, inner)), inner)
            if configs:
                return cls(configs[0].parent)
        if named:
            raise UserError(f"{option}: {folder} names its model in {METADATA_FILE} "
                            f"({', '.join(named)}) but holds no {CONFIG_FILE} there")
        name = args.get("model_name")
        if name:
            raise UserError(
                f"{option}: {folder} is a model import output that names the model {name!r} but "
                "holds no model files (Azure's import leaves a hub model to be downloaded by its "
                "finetune); import it with visiontune's model import (model_name "
                f"{name}) and pass that output")
        return None

    # ----- the record ------------------------------------------------------------------------
    @property
    def record_path(self) -> Path:
        return self.path / METADATA_FILE

    def metadata(self) -> dict[str, Any]:
        """The record; ``{}`` when there is none (a plain Hugging Face folder), a UserError
        naming the file when it is not a JSON object."""
        return _read_object(self.record_path, required=True) or {}

    def write_metadata(self, metadata: dict[str, Any]) -> Path:
        """Replace the record, whole or not at all."""
        return write_json_atomic(self.record_path, metadata)

    def update_metadata(self, **changes: Any) -> Path:
        """The record with ``changes`` applied, written whole."""
        return self.write_metadata({**self.metadata(), **changes})

    def invalidate(self) -> None:
        """Remove the record while the files it describes are rewritten: a folder left half
        written by a crash carries no record that describes another model."""
        self.record_path.unlink(missing_ok=True)

    # ----- the files beside it ---------------------------------------------------------------
    def write_json(self, name: str, data: Any, **dumps: Any) -> Path:
        return write_json_atomic(self.path / name, data, **dumps)

    def read_json(self, name: str) -> Any:
        """A JSON file of the folder; None when it is missing or unreadable (these files are
        for people and the model card, never needed to load the model)."""
        return _read_object(self.path / name, required=False)


def _read_object(path: Path, *, required: bool) -> Any:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if not required:
            return None
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if required and not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def under_checkpoint(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in a training checkpoint's folder below ``root``."""
    return any(part.startswith("checkpoint-") for part in path.relative_to(root).parts)


def shallowest_first(paths, root: Path) -> list[Path]:
    """``paths`` below ``root``, the fewest folders deep first (then by name)."""
    return sorted(paths, key=lambda p: (len(p.relative_to(root).parts), str(p)))
