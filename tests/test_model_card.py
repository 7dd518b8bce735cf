"""The model card (README.md) a fine-tune writes: the hub's metadata parses, and the text says
what a user of the folder needs."""

import json
import os
import shutil

import pytest
from huggingface_hub import ModelCard

from tests.helpers import subset
from visiontune.cli import main
from visiontune.config import resolve
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS, MULTILABEL
from visiontune.model_card import (
    CARD_FILE, FACTS_FILE, hub_base_model, read_facts, write_card, write_model_card,
)
from visiontune.training.finetune import finetune

FAST = {"number_of_epochs": 1, "training_batch_size": 8, "validation_batch_size": 16,
        "image_height": 32, "image_width": 32, "number_of_workers": 0, "learning_rate": 1e-3,
        "save_as_mlflow_model": False}


def _two_digits(source, out, n):
    return subset(source, out, n, per_class=True, labels=("0", "1"))


@pytest.fixture(scope="module")
def data(demo_dir, tmp_path_factory):
    """Digits 0 and 1 (the tiny model has 3 classes: a new head), one bad training row."""
    root = tmp_path_factory.mktemp("carddata")
    train = _two_digits(demo_dir / "digits" / "train", root / "train.jsonl", 8)
    with train.open("a") as fh:
        fh.write(json.dumps({"image_url": str(root / "missing.png"), "label": "0"}) + "\n")
    return (train, _two_digits(demo_dir / "digits" / "validation", root / "val.jsonl", 4),
            _two_digits(demo_dir / "digits" / "test", root / "test.jsonl", 3))


@pytest.fixture(scope="module")
def model(tiny_vit, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "pytorch"
    finetune(resolve(FINETUNE_INPUTS, {
        "model_path": str(tiny_vit), "training_data": str(data[0]), "validation_data": str(data[1]),
        "task_name": MULTICLASS, "output_dir_pytorch": str(out), "skip_bad_rows": True, **FAST}))
    return out


def test_finetune_writes_a_card_the_hub_reads(model, data):
    card = ModelCard.load(model / CARD_FILE)  # parses the metadata and validates the model-index
    meta = card.data
    assert meta.library_name == "transformers" and meta.pipeline_tag == "image-classification"
    assert "image-classification" in meta.tags and "visiontune" in meta.tags
    assert meta.base_model is None  # a local folder: no hub id to link
    evaluation = json.loads((model / "eval_results.json").read_text())
    shown = {r.metric_type: r.metric_value for r in meta.eval_results}
    assert shown["accuracy"] == round(evaluation["accuracy"], 4)
    assert shown["f1"] == round(evaluation["f1_score_macro"], 4)
    assert {r.dataset_split for r in meta.eval_results} == {"validation"}
    assert all(r.task_type == "image-classification" for r in meta.eval_results)


def test_the_card_says_task_labels_data_inputs_metrics_and_how_to_load(model, data):
    text = (model / CARD_FILE).read_text()
    assert "multi-class (one label per image)" in text and "0: `0`, 1: `1`" in text
    assert "| training | " in text and "| 16 |" in text  # 8 per class read, the bad row skipped
    assert "Bad rows skipped: 1" in text and "missing.png" in text
    for row in ("| learning_rate | 0.001 |", "| number_of_epochs | 1 |", "| image_height | 32 |",
                "| random_seed | 42 |", "| precision | "):
        assert row in text, row
    assert "output_dir_pytorch" not in text  # where things are is not an input that shaped the model
    assert "Training augmentations: " in text
    assert "| accuracy | " in text and "Per class (validation)" in text
    assert f'pipeline("image-classification", model="{model}")' in text
    assert f"visiontune predict --model {model}" in text
    assert "mlflow.pyfunc.load_model" not in text  # no MLflow model was saved


def test_the_cards_transformers_snippet_loads_the_model(model, data):
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(model))
    image = json.loads(data[2].read_text().splitlines()[0])["image_url"]
    assert {r["label"] for r in classifier(image)} <= {"0", "1"}


def test_a_rewrite_is_whole_or_not_at_all(model, monkeypatch):
    import visiontune.model_card as mc

    before = (model / CARD_FILE).read_text()
    monkeypatch.setattr(mc, "render", lambda facts: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_model_card(model)
    assert (model / CARD_FILE).read_text() == before
    assert not [p for p in os.listdir(model) if p.endswith(".tmp")]


def test_test_metrics_join_the_card_and_an_mlflow_folder_gets_its_own(model, tmp_path):
    folder = tmp_path / "pytorch"
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    report = {"task": MULTICLASS, "number_of_images": 6, "accuracy": 0.5, "f1_score_macro": 0.25,
              "precision_score_macro": 0.5, "recall_score_macro": 0.5, "test_data": "data/digits/test",
              "bad_rows_skipped": 0, "per_class": [{"class": "0", "precision": 0.5, "recall": 1.0,
                                                     "f1": 0.6667, "support": 3}]}
    write_model_card(folder, test=report)
    card = ModelCard.load(folder / CARD_FILE)
    test = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_split == "test"}
    assert test == {"accuracy": 0.5, "f1": 0.25, "precision": 0.5, "recall": 0.5}
    assert "| test | `data/digits/test` | 6 |" in card.text and "Per class (test)" in card.text
    assert "Bad rows skipped: 1" in card.text  # the data summary is kept

    write_model_card(folder)  # written again from the folder alone: the test metrics stay
    assert "Per class (test)" in (folder / CARD_FILE).read_text()

    mlflow_dir = tmp_path / "mlflow"
    (mlflow_dir / "artifacts" / "model").mkdir(parents=True)
    (mlflow_dir / "MLmodel").write_text("flavors: {}\n")
    shutil.copy(folder / "model_selector_args.json", mlflow_dir / "artifacts" / "model")
    write_model_card(mlflow_dir, model_dir=folder)
    text = ModelCard.load(mlflow_dir / CARD_FILE).text
    assert f'mlflow.pyfunc.load_model("{mlflow_dir}")' in text
    assert f'model="{mlflow_dir / "artifacts" / "model"}"' in text and "Per class (test)" in text
    assert not (mlflow_dir / FACTS_FILE).exists()  # the facts stay with the model's files

    # Written into a staging folder that is moved into place afterwards.
    write_model_card(mlflow_dir, model_dir=folder, location=tmp_path / "runs" / "mlflow")
    text = (mlflow_dir / CARD_FILE).read_text()
    assert f'model="{tmp_path / "runs" / "mlflow" / "artifacts" / "model"}"' in text
    assert str(mlflow_dir) not in text and "\n# runs\n" in text


def test_a_new_finetune_drops_the_earlier_runs_test_metrics(model, tmp_path):
    folder = tmp_path / "again"
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    write_model_card(folder, test={"test_data": "t", "number_of_images": 1, "accuracy": 1.0})
    assert read_facts(folder)["test"]
    from visiontune.data.prepare import PreparedData

    write_model_card(folder, data=PreparedData(train=[], validation=[], classes=["0", "1"]))
    assert read_facts(folder)["test"] is None


def test_multilabel_card_from_plain_data(tmp_path):
    facts = {
        "name": "mosaics", "base_model": "google/vit-base-patch16-224", "task": MULTILABEL,
        "classes": ["a", "b|c"], "multilabel_threshold": [0.3, 0.6],
        "inputs": {"task_name": MULTILABEL, "multilabel_threshold": 0.5, "learning_rate": 5e-5,
                   "output_dir_pytorch": "runs/m"},
        "validation": {"accuracy": 0.5, "iou": 0.75, "iou_micro": 0.7, "loss": 0.2},
        "validation_per_class": [{"class": "a", "precision": 0.5, "recall": 1.0, "iou": 0.5},
                                 {"class": "b|c", "precision": 1.0, "recall": 1.0, "iou": 1.0}],
        "paths": {"transformers": "runs/m", "mlflow": "runs/m/mlflow_model", "visiontune": "runs/m"},
    }
    card = ModelCard.load(write_card(tmp_path, facts))
    assert card.data.base_model == "google/vit-base-patch16-224"
    assert "multi-label-classification" in card.data.tags
    names = {r.metric_name for r in card.data.eval_results}
    assert {"Accuracy (exact match)", "IoU (samples)", "IoU (micro)"} <= names
    assert "(per class: a 0.3, b|c 0.6;" in card.text
    assert "| b\\|c | 1.0000 | 1.0000 | 1.0000 |" in card.text  # a "|" in a label keeps the table
    assert 'threshold = {"a": 0.3, "b|c": 0.6}' in card.text and 'top_k=None' in card.text
    assert 'mlflow.pyfunc.load_model("runs/m/mlflow_model")' in card.text


@pytest.mark.parametrize("name, hub", [("google/vit-base-patch16-224", True), ("efficientnet-lite0", False),
                                       ("/tmp/models/vit", False), ("tiny_vit0", False), (None, False)])
def test_only_hub_ids_become_base_model(name, hub):
    assert hub_base_model(name) == (name if hub else None)


def test_the_pipeline_adds_the_test_metrics(tiny_vit, data, tmp_path):
    out = tmp_path / "out"
    assert main(["pipeline", "--pytorch_model", str(tiny_vit), "--training_data", str(data[0]),
                 "--validation_data", str(data[1]), "--test_data", str(data[2]),
                 "--task_name", MULTICLASS, "--output_dir_pytorch", str(out), "--skip_bad_rows", "true",
                 *[x for k, v in FAST.items() for x in (f"--{k}", str(v))]]) == 0
    card = ModelCard.load(out / CARD_FILE)
    report = json.loads((out / "evaluation" / "metrics.json").read_text())
    test = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_split == "test"}
    assert test["accuracy"] == round(report["accuracy"], 4)
    assert f"Test: {report['number_of_images']} images of `{data[2]}`" in card.text
