"""ONNX export: ONNX Runtime scores like the PyTorch classifier, the metadata describes the
model, and the CLI works (and fails in one line)."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tests.tiny_models import random_images, save_tiny_model  # noqa: E402

from visiontune.cli import main  # noqa: E402
from visiontune.errors import UserError  # noqa: E402
from visiontune.inference import Classifier, OnnxClassifier  # noqa: E402
from visiontune.inference.onnx_runtime import EXPORT_METADATA_FILE, ONNX_FILE  # noqa: E402
from visiontune.model_folder import ModelFolder  # noqa: E402
from visiontune.onnx_export import EXAMPLE_BATCH, export_onnx  # noqa: E402
from visiontune.tasks import MULTICLASS, MULTILABEL  # noqa: E402

PREPROCESSING = {"height": 32, "width": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                 "interpolation": "bilinear"}
LABELS = ["cat", "dog", "fox"]
THRESHOLDS = {MULTICLASS: None, MULTILABEL: [0.3, 0.5, 0.7]}


def finetuned(kind: str, task: str, path):
    """A tiny model folder that looks like the output of visiontune finetune."""
    save_tiny_model(kind, path, num_labels=len(LABELS), image_size=32, labels=LABELS)
    ModelFolder(path).write_metadata({
        "model_metadata": {"finetuning_task": task, "id2label": dict(enumerate(LABELS)),
                           "is_finetuned_model": True},
        "preprocessing": PREPROCESSING,
        "multilabel_threshold": THRESHOLDS[task],
    })
    return path


CASES = [("vit", MULTICLASS), ("convnext", MULTILABEL), ("timm", MULTILABEL)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model folder, export folder) per case, exported once for the module."""
    cache = {}

    def get(kind: str, task: str):
        if (kind, task) not in cache:
            root = tmp_path_factory.mktemp(f"{kind}-{task}")
            model = finetuned(kind, task, root / "model")
            export_onnx(model, root / "onnx")
            cache[kind, task] = model, root / "onnx"
        return cache[kind, task]

    return get


@pytest.mark.parametrize("kind,task", CASES)
def test_onnx_runtime_scores_like_pytorch(exported, kind, task):
    model, onnx_dir = exported(kind, task)
    torch_clf, onnx_clf = Classifier(model, device="cpu"), OnnxClassifier(onnx_dir)
    images = random_images(EXAMPLE_BATCH + 3, seed=1)  # a batch size the export never saw
    expected = torch_clf.probabilities(images)
    np.testing.assert_allclose(onnx_clf.logits(images), torch_clf.logits(images), atol=1e-5)
    np.testing.assert_allclose(onnx_clf.probabilities(images), expected, atol=1e-5)
    np.testing.assert_allclose(onnx_clf.probabilities(images, batch_size=1), expected, atol=1e-5)
    assert onnx_clf.classes == torch_clf.classes == LABELS and onnx_clf.task == task
    np.testing.assert_array_equal(onnx_clf.threshold, torch_clf.threshold)
    got = onnx_clf.describe(expected)
    assert got == torch_clf.describe(expected)
    assert ("predicted_labels" if task == MULTILABEL else "predicted_label") in got[0]
    assert onnx_clf.probabilities([]).shape == (0, len(LABELS))


def test_metadata_and_graph(exported):
    import onnx

    _, onnx_dir = exported("convnext", MULTILABEL)
    meta = json.loads((onnx_dir / EXPORT_METADATA_FILE).read_text())
    assert meta["classes"] == LABELS and meta["task"] == MULTILABEL
    assert meta["multilabel_threshold"] == THRESHOLDS[MULTILABEL]
    assert {k: meta["preprocessing"][k] for k in PREPROCESSING} == PREPROCESSING
    assert meta["opset"] == 18 and meta["model_file"] == ONNX_FILE
    assert meta["input"] == {"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}
    assert meta["output"]["name"] == "logits"
    assert [s["name"] for s in meta["preprocessing_steps"]] == ["Resize", "ToDtype", "Normalize"]

    graph = onnx.load(str(onnx_dir / ONNX_FILE))
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 18
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert inp.name == "pixel_values" and out.name == "logits"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    multiclass = json.loads((exported("vit", MULTICLASS)[1] / EXPORT_METADATA_FILE).read_text())
    assert multiclass["task"] == MULTICLASS and multiclass["multilabel_threshold"] is None


def test_cli_exports_an_mlflow_model(exported, tmp_path):
    from visiontune.serving.mlflow_model import save_mlflow_model

    model, _ = exported("convnext", MULTILABEL)
    mlflow_dir = save_mlflow_model(model, tmp_path / "mlflow")
    out = tmp_path / "onnx"
    run = subprocess.run(
        [sys.executable, "-m", "visiontune", "export-onnx", "--model", str(mlflow_dir),
         "--output_dir", str(out), "--opset", "18"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert (out / ONNX_FILE).is_file() and (out / EXPORT_METADATA_FILE).is_file()
    images = random_images(3, seed=2)
    np.testing.assert_allclose(OnnxClassifier(out).probabilities(images),
                               Classifier(model, device="cpu").probabilities(images), atol=1e-5)


def test_missing_model_folder_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["export-onnx", "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "--model: folder not found" in err
    assert not (tmp_path / "o").exists()


def test_opsets_below_18_are_refused(exported, tmp_path):
    model, _ = exported("vit", MULTICLASS)
    with pytest.raises(UserError, match="--opset: 13"):
        export_onnx(model, tmp_path / "o", opset=13)


def test_without_onnxruntime_the_error_says_what_to_install(monkeypatch, exported, tmp_path):
    model, onnx_dir = exported("vit", MULTICLASS)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    for call in (lambda: export_onnx(model, tmp_path / "o"), lambda: OnnxClassifier(onnx_dir)):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert 'pip install "visiontune[onnx]"' in message and "\n" not in message
