"""apply_ort: training stays in PyTorch (said in one line), the model is exported to ONNX, the
validation set is scored again with ONNX Runtime, and the MLflow model serves with it."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from tests.helpers import subset
from visiontune.cli import main
from visiontune.config import resolve
from visiontune.errors import UserError
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS
from visiontune.training.finetune import finetune

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FAST = {"number_of_epochs": 1, "training_batch_size": 8, "validation_batch_size": 16,
        "image_height": 32, "image_width": 32, "number_of_workers": 0, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def digits(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort-digits")
    return (subset(demo_dir / "digits" / "train", root / "train.jsonl", 4, per_class=True),
            subset(demo_dir / "digits" / "validation", root / "val.jsonl", 2, per_class=True))


def test_apply_ort_exports_checks_parity_and_serves_with_onnx_runtime(tiny_vit, digits, tmp_path,
                                                                      caplog):
    out, mlf = tmp_path / "pt", tmp_path / "mlflow"
    given = {"model_path": str(tiny_vit), "training_data": str(digits[0]),
             "validation_data": str(digits[1]), "task_name": MULTICLASS,
             "output_dir_pytorch": str(out), "output_dir_mlflow": str(mlf), "apply_ort": True,
             "save_as_mlflow_model": True, **FAST}
    with caplog.at_level(logging.INFO):
        result = finetune(resolve(FINETUNE_INPUTS, given))

    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("apply_ort:")]
    assert len(said) == 1 and "training runs in PyTorch" in said[0], said
    assert "ONNX Runtime training is unavailable with this torch" in said[0]

    onnx_dir = out / "onnx"
    assert (onnx_dir / "model.onnx").is_file() and (onnx_dir / "visiontune_onnx.json").is_file()
    report = json.loads((onnx_dir / "eval_results.json").read_text())
    assert report["number_of_images"] == 20
    assert report["parity"]["max_abs_probability_difference"] <= 1e-4
    assert report["metrics"]["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert any("ONNX Runtime matches PyTorch on the 20 validation images" in r.getMessage()
               for r in caplog.records)

    mlmodel = yaml.safe_load((mlf / "MLmodel").read_text())
    assert mlmodel["metadata"]["inference_backend"] == "onnxruntime"
    assert (mlf / "artifacts" / "onnx" / "model.onnx").is_file()
    assert any(l.startswith("onnxruntime") for l in (mlf / "requirements.txt").read_text().split())

    script = textwrap.dedent(f"""
        import base64, json
        import mlflow.pyfunc, pandas as pd
        rows = [json.loads(l) for l in open({str(digits[1])!r})]
        images = [base64.b64encode(open(r["image_url"], "rb").read()).decode() for r in rows]
        model = mlflow.pyfunc.load_model({str(mlf)!r})
        out = model.predict(pd.DataFrame({{"image": images}}))
        backend = type(model.unwrap_python_model().classifier).__name__
        print(json.dumps({{"probs": out["probs"].tolist(), "backend": backend}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served["backend"] == "OnnxClassifier"

    from visiontune.data.images import load_image
    from visiontune.inference import Classifier

    rows = [json.loads(l) for l in digits[1].read_text().splitlines()]
    expected = Classifier(out, device="cpu").probabilities([load_image(r["image_url"]) for r in rows])
    np.testing.assert_allclose(np.array(served["probs"]), expected, atol=1e-5)

    # predict and evaluate pick the export up (runtime auto), from either folder, and score
    # like PyTorch; --runtime pytorch keeps PyTorch.
    from visiontune.inference import open_model

    assert type(open_model(out)).__name__ == "OnnxClassifier"
    assert type(open_model(mlf)).__name__ == "OnnxClassifier"
    assert type(open_model(out, "pytorch")).__name__ == "Classifier"
    scored = {}
    for runtime in ("auto", "pytorch"):
        target = tmp_path / f"{runtime}.jsonl"
        assert main(["predict", "--model", str(out), "--data", str(digits[1]), "--output", str(target),
                     "--runtime", runtime]) == 0
        scored[runtime] = [list(json.loads(l)["probs"].values()) for l in target.read_text().splitlines()]
    assert len(scored["auto"]) == 20
    np.testing.assert_allclose(scored["auto"], scored["pytorch"], atol=1e-5)

    # A later run without apply_ort must not leave this export beside a different model.
    finetune(resolve(FINETUNE_INPUTS, {**given, "apply_ort": False, "save_as_mlflow_model": False}))
    assert not onnx_dir.exists()
    assert type(open_model(out)).__name__ == "Classifier"
    with pytest.raises(UserError, match="--runtime onnxruntime: .* has no ONNX export"):
        open_model(out, "onnxruntime")


def test_without_the_onnx_packages_apply_ort_fails_before_training(tiny_vit, digits, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    out = tmp_path / "pt"
    code = main(["finetune", "--model_path", str(tiny_vit), "--training_data", str(digits[0]),
                 "--validation_data", str(digits[1]), "--task_name", MULTICLASS,
                 "--output_dir_pytorch", str(out), "--apply_ort", "true"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().count("\n") == 0
    assert 'apply_ort needs onnxscript (not installed): pip install "visiontune[onnx]"' in captured.err
    assert not out.exists()
