"""The MLflow model as its users' tools read it: MLflow's models-from-code (nothing unpickled),
a request and answer signature, an input example, Azure's metadata, no path of the machine that
wrote it; loaded in a fresh process without warnings, and (slow) in a fresh environment built
from its own requirements.txt, by ``mlflow.pyfunc.load_model`` and ``mlflow models serve``,
with the same answers as in-process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from huggingface_hub import ModelCard

from tests.serving.test_serving import LABELS, Server, finetuned
from visiontune.serving.mlflow_model import save_mlflow_model
from visiontune.tasks import MULTICLASS, MULTILABEL

LOAD_AND_PREDICT = textwrap.dedent("""
    import json, pathlib, sys
    import pandas as pd
    import mlflow.pyfunc
    model_dir, example, out = sys.argv[1:4]
    data = json.loads(pathlib.Path(example).read_text())["dataframe_split"]
    rows = mlflow.pyfunc.load_model(model_dir).predict(pd.DataFrame(data["data"], columns=data["columns"]))
    pathlib.Path(out).write_text(rows.to_json(orient="records"))
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(multi-class MLflow model, multi-label one), written from tiny fine-tuned folders."""
    root = tmp_path_factory.mktemp("mlflow-format")
    models = []
    for task, kind in ((MULTICLASS, "vit"), (MULTILABEL, "convnext")):
        folder = finetuned(kind, task, root / task, threshold=0.4 if task == MULTILABEL else None)
        models.append(save_mlflow_model(folder, root / f"{task}-mlflow"))
    return models


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_models_from_code_with_signature_example_and_metadata(saved):
    for model_dir, task in zip(saved, (MULTICLASS, MULTILABEL)):
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        pyfunc = mlmodel["flavors"]["python_function"]
        assert not list(model_dir.rglob("*.pkl")), "nothing is pickled"
        assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
        assert (model_dir / pyfunc["model_code_path"]).is_file()
        assert not [s for s in _strings(mlmodel) if s.startswith("/") or "visiontune-mlflow-" in s]
        inputs = json.loads(mlmodel["signature"]["inputs"])
        outputs = json.loads(mlmodel["signature"]["outputs"])
        assert [(c["name"], c["type"]) for c in inputs] == [("image", "string")]
        predicted = "predicted_labels" if task == MULTILABEL else "predicted_label"
        assert [c["name"] for c in outputs] == ["probs", "labels", predicted]
        assert mlmodel["metadata"]["task"] == task == mlmodel["metadata"]["finetuning_task"]
        assert mlmodel["metadata"]["is_finetuned_model"] is True
        assert "base_model_name" in mlmodel["metadata"]
        for name in ("input_example.json", "serving_input_example.json", "requirements.txt"):
            assert (model_dir / name).is_file(), name
        card = ModelCard.load(model_dir / "README.md")  # its own model card, for its own paths
        assert card.data.pipeline_tag == "image-classification"
        assert f'mlflow.pyfunc.load_model("{model_dir}")' in card.text
        assert str(model_dir / "artifacts" / "model") in card.text


def test_fresh_process_loads_without_warnings_and_answers_as_in_process(saved, tmp_path):
    from visiontune.inference import Classifier
    from visiontune.serving.payload import decode_payload_image

    for model_dir in saved:
        out = tmp_path / f"{model_dir.name}.json"
        done = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, str(model_dir),
                               str(model_dir / "serving_input_example.json"), str(out)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        for noise in ("pickle", "type hints", "input example", "Warning"):
            assert noise not in done.stderr, f"{noise!r} in:\n{done.stderr[-2000:]}"
        rows = json.loads(out.read_text())
        example = json.loads((model_dir / "serving_input_example.json").read_text())
        image = decode_payload_image(example["dataframe_split"]["data"][0][0])
        classifier = Classifier(model_dir, device="cpu")
        assert rows[0]["labels"] == LABELS
        np.testing.assert_allclose(rows[0]["probs"], classifier.probabilities([image])[0], atol=1e-6)


@pytest.mark.slow
def test_fresh_environment_from_its_own_requirements(saved, tmp_path):
    """A virtual environment holding only the model's requirements.txt (built once per
    requirements, then cached): ``load_model`` and ``mlflow models serve`` there answer the
    serving example as this process does."""
    from tests import azure_job

    model_dir = saved[1]
    requirements = (model_dir / "requirements.txt").read_text()
    key = "mlflow-" + hashlib.sha256(requirements.encode()).hexdigest()[:16]
    venv = azure_job.build_venv(key, ["-r", str(model_dir / "requirements.txt")],
                                f"requirements.txt of an MLflow model:\n{requirements}")
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import visiontune"], capture_output=True, text=True)
    assert probe.returncode != 0, "the environment must not see this checkout's visiontune"

    import mlflow.pyfunc

    example = json.loads((model_dir / "serving_input_example.json").read_text())
    frame = pd.DataFrame(example["dataframe_split"]["data"], columns=example["dataframe_split"]["columns"])
    want = mlflow.pyfunc.load_model(str(model_dir)).predict(frame)

    out = tmp_path / "fresh.json"
    done = subprocess.run([python, "-c", LOAD_AND_PREDICT, str(model_dir),
                           str(model_dir / "serving_input_example.json"), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    np.testing.assert_allclose(rows[0]["probs"], want.iloc[0]["probs"], atol=1e-6)
    assert rows[0]["predicted_labels"] == list(want.iloc[0]["predicted_labels"])

    server = Server(model_dir, tmp_path / "serve.log", python=python)
    try:
        server.wait_ready(time.monotonic() + 300)
        status, answer = server.post(example)
    finally:
        server.stop()
    assert status == 200, answer
    np.testing.assert_allclose(answer["predictions"][0]["probs"], want.iloc[0]["probs"], atol=1e-6)
