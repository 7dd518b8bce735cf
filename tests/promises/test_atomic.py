"""Outputs are written whole or not at all: each atomic write, interrupted, leaves the earlier
output as it was, or (a first write) nothing, and never a folder that readers take as complete
with a mix of old and new files. Covered: the predictions file, the MLflow model folder, the
ONNX export, an imported model folder, and the staging helper behind the folders
(``outputs.staged``; its SIGKILL case is in tests/test_outputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_models import save_tiny_model
from visiontune.inference import ClassifierBase
from visiontune.model_folder import ModelFolder
from visiontune.outputs import STAGING_PREFIX, staged
from visiontune.tasks import MULTICLASS


class Interrupted(Exception):
    """Stands for anything that stops a write midway (an error, a full disk, Ctrl-C)."""


def contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_old_or_nothing(folder: Path, old: dict[str, bytes] | None, marker: str) -> None:
    """After an interrupted write: the old contents, byte for byte, or (marker gone) no output
    a reader takes as complete; no staging folder left by this process either way."""
    if folder.is_dir():
        assert not [p.name for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX)]
    if old is None:
        assert not folder.exists() or not (folder / marker).exists(), sorted(contents(folder))
        return
    if (folder / marker).exists():
        assert contents(folder) == old, "a complete-looking folder that is not the old output"


LABELS = ["cat", "dog", "fox"]
PREPROCESSING = {"height": 32, "width": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                 "interpolation": "bilinear"}


def finetuned(path: Path, labels=LABELS, seed=0) -> Path:
    save_tiny_model("vit", path, num_labels=len(labels), image_size=32, labels=labels, seed=seed)
    ModelFolder(path).write_metadata({
        "model_metadata": {"finetuning_task": MULTICLASS, "id2label": dict(enumerate(labels)),
                           "is_finetuned_model": True},
        "preprocessing": PREPROCESSING, "multilabel_threshold": None})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different fine-tuned models (other weights, other class names)."""
    root = tmp_path_factory.mktemp("atomic")
    return finetuned(root / "a"), finetuned(root / "b", labels=["x", "y", "z"], seed=1)


# ---------------------------------------------------------------------------------------------
# The staging helper
# ---------------------------------------------------------------------------------------------
def _staged_write(folder: Path, files: dict[str, str], fail: bool = False) -> None:
    """Write ``files`` (the marker DONE among them) through the staging helper."""
    with staged(folder, complete_marker="DONE") as staging:
        for name, text in files.items():
            if name == "DONE" and fail:
                raise Interrupted
            (staging / name).write_text(text)


@pytest.mark.parametrize("exists", [False, True], ids=["new-folder", "empty-mount-point"])
def test_an_interrupted_first_write_leaves_nothing(tmp_path, exists):
    folder = tmp_path / "out"
    if exists:
        folder.mkdir()  # e.g. a mount point: it stays, empty
    with pytest.raises(Interrupted):
        _staged_write(folder, {"data": "one", "DONE": "one"}, fail=True)
    assert folder.is_dir() == exists
    if exists:
        assert list(folder.iterdir()) == []


def test_an_interrupted_rewrite_keeps_the_old_output_and_a_later_one_replaces_it(tmp_path):
    folder = tmp_path / "out"
    _staged_write(folder, {"data": "one", "only-in-one": "one", "DONE": "one"})
    old = contents(folder)
    with pytest.raises(Interrupted):
        _staged_write(folder, {"data": "two", "DONE": "two"}, fail=True)
    assert contents(folder) == old
    _staged_write(folder, {"data": "three", "DONE": "three"})
    assert contents(folder) == {"DONE": b"three", "data": b"three"}  # nothing of the old one


# ---------------------------------------------------------------------------------------------
# The predictions file
# ---------------------------------------------------------------------------------------------
def _rows(count: int, interrupt_at: int | None = None):
    probs = np.array([0.2, 0.5, 0.3])
    for i in range(count):
        if i == interrupt_at:
            raise Interrupted
        yield f"/images/{i}.png", probs, None


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_interrupted_predictions_file_keeps_the_old_one_or_none(fmt, tmp_path):
    from visiontune.data.transforms import Preprocessing
    from visiontune.prediction import write_predictions

    classifier = ClassifierBase(Path("."), LABELS, MULTICLASS, Preprocessing(**PREPROCESSING), None)
    output = tmp_path / f"predictions.{fmt}"
    with pytest.raises(Interrupted):  # a first write: nothing
        write_predictions(output, fmt, classifier, _rows(50, interrupt_at=20))
    assert not output.exists()
    write_predictions(output, fmt, classifier, _rows(5))
    old = output.read_bytes()
    assert len(old.splitlines()) == 5 + (fmt == "csv")
    with pytest.raises(Interrupted):  # a rewrite: the old file, byte for byte
        write_predictions(output, fmt, classifier, _rows(50, interrupt_at=20))
    assert output.read_bytes() == old
    write_predictions(output, fmt, classifier, _rows(7))
    assert len(output.read_bytes().splitlines()) == 7 + (fmt == "csv")


# ---------------------------------------------------------------------------------------------
# The MLflow model folder
# ---------------------------------------------------------------------------------------------
def _interrupt_at_the_nth_replace(monkeypatch, n: int):
    """Interrupt the move of the staged entries into the folder at the ``n``-th entry."""
    import visiontune.outputs as outputs

    real, seen = outputs.os.replace, []

    def replace(src, dst):
        seen.append(dst)
        if len(seen) == n:
            raise Interrupted
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)


@pytest.mark.parametrize("moment", ["while-saving", "first-entry-moved", "before-the-marker"])
def test_an_interrupted_mlflow_model_keeps_the_old_one_or_none(models, moment, tmp_path, monkeypatch):
    import mlflow.pyfunc

    from visiontune.serving.mlflow_model import save_mlflow_model

    a, b = models
    target = tmp_path / "mlflow"
    save_mlflow_model(a, target)
    old = contents(target)
    count = len(list(target.iterdir()))
    with monkeypatch.context() as patch:
        if moment == "while-saving":
            real = mlflow.pyfunc.save_model

            def save_then_fail(*args, **kwargs):
                real(*args, **kwargs)
                raise Interrupted

            patch.setattr(mlflow.pyfunc, "save_model", save_then_fail)
        else:
            _interrupt_at_the_nth_replace(patch, 1 if moment == "first-entry-moved" else count)
        with pytest.raises(Interrupted):
            save_mlflow_model(b, target)
    assert_old_or_nothing(target, old, "MLmodel")
    if moment == "while-saving":  # nothing was moved yet: the old model, whole
        assert contents(target) == old
        assert mlflow.pyfunc.load_model(str(target)).metadata.metadata["written_by"] == "visiontune"
        save_mlflow_model(b, target)  # and the next run replaces it
        assert json.loads((target / "artifacts" / "model" / "model_selector_args.json").read_text())[
            "model_metadata"]["id2label"] == {"0": "x", "1": "y", "2": "z"}


def test_an_interrupted_first_mlflow_model_leaves_nothing(models, tmp_path, monkeypatch):
    import mlflow.pyfunc

    from visiontune.serving.mlflow_model import save_mlflow_model

    def fail(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(mlflow.pyfunc, "save_model", fail)
    with pytest.raises(Interrupted):
        save_mlflow_model(models[0], tmp_path / "mlflow")
    assert not (tmp_path / "mlflow").exists()


# ---------------------------------------------------------------------------------------------
# The ONNX export
# ---------------------------------------------------------------------------------------------
def test_an_interrupted_onnx_export_leaves_the_old_export_or_none(models, tmp_path, monkeypatch):
    """Model b's export into model a's export folder, interrupted after its graph is in place
    and before its metadata is written: never a's metadata beside b's graph."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from visiontune import onnx_export

    a, b = models
    folder = tmp_path / "onnx"
    onnx_export.export_onnx(a, folder)
    old = contents(folder)

    def fail(*args, **kwargs):
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "export_metadata", fail)
        with pytest.raises(Interrupted):
            onnx_export.export_onnx(b, folder)
    assert_old_or_nothing(folder, old, onnx_export.EXPORT_METADATA_FILE)


# ---------------------------------------------------------------------------------------------
# An imported model folder
# ---------------------------------------------------------------------------------------------
def test_an_interrupted_import_keeps_the_old_model_or_none(models, tmp_path, monkeypatch):
    from visiontune.models import importer

    a, b = models
    target = tmp_path / "imported"
    real = importer._assemble

    def assemble_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise Interrupted

    with monkeypatch.context() as patch:  # a first import: nothing
        patch.setattr(importer, "_assemble", assemble_then_fail)
        with pytest.raises(Interrupted):
            importer.import_model(pytorch_model=str(a), output_dir=target)
    assert_old_or_nothing(target, None, importer.METADATA_FILE)
    importer.import_model(pytorch_model=str(a), output_dir=target)
    old = contents(target)
    with monkeypatch.context() as patch:
        patch.setattr(importer, "_assemble", assemble_then_fail)
        with pytest.raises(Interrupted):
            importer.import_model(pytorch_model=str(b), output_dir=target)
    assert contents(target) == old


def test_an_interrupted_fine_tune_save_leaves_no_record_of_the_earlier_model(demo_dir, tiny_vit,
                                                                             tmp_path, monkeypatch):
    """The fine-tune output is written in place (it may be a mount point), so its record goes
    first and comes back last: a save stopped midway leaves no record describing another
    model's classes and preprocessing."""
    from tests.helpers import subset
    from visiontune import finetune
    from visiontune.model_folder import EVAL_RESULTS_FILE, METADATA_FILE

    train = subset(demo_dir / "digits" / "train", tmp_path / "train.jsonl", 2, per_class=True)
    out = tmp_path / "out"
    quick = dict(model_path=str(tiny_vit), task_name=MULTICLASS, training_data=str(train),
                 validation_data=str(train),
                 output_dir_pytorch=str(out), save_as_mlflow_model=False, number_of_workers=0,
                 number_of_epochs=1, image_height=32, image_width=32, training_batch_size=8)
    finetune(**quick)
    first = ModelFolder(out).metadata()
    assert first["model_metadata"]["id2label"] == {str(d): str(d) for d in range(10)}
    real = ModelFolder.write_json

    def fail_at_the_metrics(folder, name, *args, **kwargs):
        if name == EVAL_RESULTS_FILE:
            raise Interrupted
        return real(folder, name, *args, **kwargs)

    monkeypatch.setattr(ModelFolder, "write_json", fail_at_the_metrics)
    with pytest.raises(Interrupted):
        finetune(**{**quick, "learning_rate": 0.01})
    assert (out / "model.safetensors").is_file() and not (out / METADATA_FILE).exists()
    monkeypatch.undo()
    finetune(**quick)
    assert ModelFolder(out).metadata()["model_metadata"] == first["model_metadata"]
