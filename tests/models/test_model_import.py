"""import-model: the built-in model, local / PyTorch / MLflow folders, the hub, bad inputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import KINDS, random_images, save_tiny_model
from visiontune.errors import UserError
from visiontune.model_folder import METADATA_FILE, ModelFolder
from visiontune.models.importer import import_model

MODEL_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", METADATA_FILE}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny_model(kind, root / kind) for kind in KINDS}


def _logits(folder: Path) -> torch.Tensor:
    """Logits of the folder's model on fixed images, loaded with the Auto classes only."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        return model(**processor(random_images(), return_tensors="pt")).logits


def _no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".importing-" in p.name]


# ---------------------------------------------------------------------------------------------
# Built-in efficientnet-lite0
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    return import_model(model_name="efficientnet-lite0", output_dir=tmp_path_factory.mktemp("b") / "model")


def test_builtin_predicts_imagenet_classes(builtin):
    from sklearn.datasets import load_sample_images
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(builtin).eval()
    processor = AutoImageProcessor.from_pretrained(builtin)
    china, flower = load_sample_images().images
    with torch.no_grad():
        probs = model(**processor([flower, china], return_tensors="pt")).logits.softmax(-1)
    top = [[model.config.id2label[int(i)] for i in row.topk(3).indices] for row in probs]
    assert top[0][0] == "daisy"
    assert any("palace" in name for name in top[1]) and any("bell cote" in name for name in top[1])


def test_builtin_folder_layout(builtin):
    assert {p.name for p in builtin.iterdir()} == MODEL_FILES
    config = json.loads((builtin / "config.json").read_text())
    assert config["model_type"] == "timm_wrapper" and config["architecture"] == "tf_efficientnet_lite0"
    assert "num_classes" not in (config.get("model_args") or {})
    cfg = config["pretrained_cfg"]
    assert cfg["mean"] == cfg["std"] == [0.5, 0.5, 0.5]
    assert (cfg["interpolation"], cfg["input_size"], cfg["crop_pct"], cfg["crop_mode"]) == (
        "bicubic", [3, 224, 224], 0.875, "center")
    assert len(config["label_names"]) == 1000 and len(set(config["label_names"])) == 1000
    processor = json.loads((builtin / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "TimmWrapperImageProcessor"
    assert processor["pretrained_cfg"] == cfg
    meta = ModelFolder(builtin).metadata()
    assert meta["model_name"] == "efficientnet-lite0" and meta["source"] == "builtin"
    assert meta["pytorch_model_path"] == "." and meta["mlflow_model_path"] is None
    assert meta["model_metadata"] == {
        "base_model_name": "efficientnet-lite0", "finetuning_task": None, "id2label": None,
        "is_finetuned_model": False,
    }
    assert meta["visiontune_version"]


def test_builtin_shape_check_fails_loudly():
    from visiontune.models.builtin import _map_by_position

    source = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    with pytest.raises(UserError, match="does not match"):
        _map_by_position(source, {"x.weight": torch.zeros(3, 3), "x.bias": torch.zeros(2)})
    with pytest.raises(UserError, match="tensors"):
        _map_by_position(source, {"x.weight": torch.zeros(2, 3)})


# ---------------------------------------------------------------------------------------------
# Local folders and continual fine-tuning
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_import_local_folder(tiny, tmp_path, kind):
    out = import_model(model_name=str(tiny[kind]), output_dir=tmp_path / "out")
    assert {p.name for p in out.iterdir()} == MODEL_FILES
    torch.testing.assert_close(_logits(out), _logits(tiny[kind]))
    meta = ModelFolder(out).metadata()
    assert meta["source"] == "local_folder" and meta["source_path"] == str(tiny[kind].resolve())
    assert meta["model_metadata"]["is_finetuned_model"] is False
    assert meta["model_metadata"]["base_model_name"] == kind
    assert _no_leftovers(tmp_path)


def _fake_finetune_output(src: Path, dst: Path, problem_type: str | None = None) -> Path:
    """A folder as a fine-tune leaves it: the model at the top, training state beside it."""
    shutil.copytree(src, dst)
    if problem_type:
        config = json.loads((dst / "config.json").read_text())
        config["problem_type"] = problem_type
        (dst / "config.json").write_text(json.dumps(config))
    (dst / "trainer_state.json").write_text("{}")
    (dst / "checkpoint-2").mkdir()
    shutil.copy2(dst / "config.json", dst / "checkpoint-2" / "config.json")
    return dst


@pytest.mark.parametrize("kind", KINDS)
def test_import_pytorch_model(tiny, tmp_path, kind):
    src = _fake_finetune_output(tiny[kind], tmp_path / "ft", "multi_label_classification")
    out = import_model(pytorch_model=str(src), output_dir=tmp_path / "out")
    assert {p.name for p in out.iterdir()} == MODEL_FILES
    torch.testing.assert_close(_logits(out), _logits(tiny[kind]))
    meta = ModelFolder(out).metadata()
    assert meta["source"] == "pytorch_model" and meta["source_path"] == str(src.resolve())
    assert meta["model_metadata"] == {
        "base_model_name": "ft", "finetuning_task": "image-classification-multilabel",
        "id2label": {"0": "class_0", "1": "class_1", "2": "class_2"}, "is_finetuned_model": True,
    }


def test_continual_finetuning_metadata_is_carried_over(tiny, tmp_path):
    first = import_model(model_name=str(tiny["vit"]), output_dir=tmp_path / "imported")
    # What a fine-tune of that import writes: the model plus metadata that says so.
    trained = tmp_path / "trained"
    shutil.copytree(first, trained)
    meta = ModelFolder(trained).metadata()
    meta["model_name"] = "google/vit-base-patch16-224"
    meta["model_metadata"].update(
        base_model_name="google/vit-base-patch16-224", finetuning_task="image-classification",
        is_finetuned_model=True,
    )
    ModelFolder(trained).write_metadata(meta)

    again = import_model(pytorch_model=trained, output_dir=tmp_path / "again",
                         model_name="ignored-because-a-folder-wins")
    got = ModelFolder(again).metadata()["model_metadata"]
    assert got["base_model_name"] == "google/vit-base-patch16-224"
    assert got["finetuning_task"] == "image-classification" and got["is_finetuned_model"] is True
    assert got["id2label"] == {"0": "class_0", "1": "class_1", "2": "class_2"}
    # And once more from that output: nothing is lost on the way.
    third = import_model(pytorch_model=again, output_dir=tmp_path / "third")
    assert ModelFolder(third).metadata()["model_metadata"] == got
    torch.testing.assert_close(_logits(third), _logits(tiny["vit"]))


def test_stale_metadata_does_not_hide_training(tiny, tmp_path):
    """A fine-tune output that copied the import's metadata (is_finetuned_model false)."""
    imported = import_model(model_name=str(tiny["resnet"]), output_dir=tmp_path / "imported")
    trained = _fake_finetune_output(imported, tmp_path / "trained")
    meta = ModelFolder(import_model(pytorch_model=trained, output_dir=tmp_path / "out")).metadata()
    assert meta["model_metadata"]["is_finetuned_model"] is True


def test_import_mlflow_model(tiny, tmp_path):
    """MLflow transformers layout: model/ with config and weights, the processor apart."""
    root = tmp_path / "mlflow"
    (root / "model").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(tiny["convnext"] / name, root / "model" / name)
    (root / "components" / "image_processor").mkdir(parents=True)
    shutil.copy2(tiny["convnext"] / "preprocessor_config.json", root / "components" / "image_processor")
    (root / "MLmodel").write_text(
        "flavors:\n  transformers:\n    model_binary: model\n"
        "metadata:\n  base_model_name: facebook/convnext-tiny-224\n"
        "  finetuning_task: image-classification\n  is_finetuned_model: true\n"
    )
    out = import_model(mlflow_model=root, output_dir=tmp_path / "out")
    assert {p.name for p in out.iterdir()} == MODEL_FILES
    torch.testing.assert_close(_logits(out), _logits(tiny["convnext"]))
    meta = ModelFolder(out).metadata()
    assert meta["source"] == "mlflow_model" and meta["mlflow_model_path"] is None
    assert meta["model_metadata"]["base_model_name"] == "facebook/convnext-tiny-224"
    assert meta["model_metadata"]["finetuning_task"] == "image-classification"
    assert meta["model_metadata"]["is_finetuned_model"] is True


def test_mlflow_model_in_a_deeper_subfolder(tiny, tmp_path):
    root = tmp_path / "mlflow"
    shutil.copytree(tiny["vit"], root / "data" / "model")
    (root / "MLmodel").write_text("flavors: {}\n")
    out = import_model(mlflow_model=root, output_dir=tmp_path / "out")
    torch.testing.assert_close(_logits(out), _logits(tiny["vit"]))


def test_pytorch_bin_is_converted_to_safetensors(tiny, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    shutil.copytree(tiny["vit"], src)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = import_model(model_name=str(src), output_dir=tmp_path / "out")
    assert {p.name for p in out.iterdir()} == MODEL_FILES
    torch.testing.assert_close(_logits(out), _logits(tiny["vit"]))


def test_sharded_safetensors_are_copied(tmp_path):
    from tests.tiny_models import build_tiny_model

    model, processor = build_tiny_model("vit")
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="60KB")
    processor.save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    out = import_model(pytorch_model=src, output_dir=tmp_path / "out")
    assert (out / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(out), _logits(src))


def test_timm_model_args_num_classes_is_dropped(tiny, tmp_path):
    src = tmp_path / "timm"
    shutil.copytree(tiny["timm"], src)
    config = json.loads((src / "config.json").read_text())
    config["model_args"] = {"num_classes": 3}
    (src / "config.json").write_text(json.dumps(config))
    (src / "preprocessor_config.json").unlink()
    out = import_model(model_name=str(src), output_dir=tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_args"] is None
    assert (out / "preprocessor_config.json").is_file()
    torch.testing.assert_close(_logits(out), _logits(tiny["timm"]))


def test_hub_download(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tiny["vit"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = import_model(model_name="google/vit-base-patch16-224", output_dir=tmp_path / "out")
    meta = ModelFolder(out).metadata()
    assert calls == ["google/vit-base-patch16-224"]
    assert meta["source"] == "hub" and meta["source_path"] == "google/vit-base-patch16-224"
    assert meta["model_metadata"]["base_model_name"] == "google/vit-base-patch16-224"


def test_earlier_import_is_replaced(tiny, tmp_path):
    out = import_model(model_name=str(tiny["vit"]), output_dir=tmp_path / "out")
    import_model(model_name=str(tiny["resnet"]), output_dir=out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "resnet"
    assert {p.name for p in out.iterdir()} == MODEL_FILES


def test_empty_existing_output_dir_is_fine(tiny, tmp_path):
    (tmp_path / "out").mkdir()  # Azure creates output folders before the job starts
    import_model(model_name=str(tiny["vit"]), output_dir=tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == MODEL_FILES


def test_folder_wins_over_model_name(tiny, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="visiontune.models.importer"):
        out = import_model(model_name="efficientnet-lite0", pytorch_model=tiny["resnet"],
                           output_dir=tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == "resnet"
    assert ModelFolder(out).metadata()["model_name"] == "efficientnet-lite0"
    assert "--pytorch_model is given" in caplog.text


def test_metadata_roundtrip(tmp_path):
    assert ModelFolder(tmp_path).metadata() == {}
    ModelFolder(tmp_path).write_metadata({"model_name": "x", "model_metadata": {"a": 1}})
    assert ModelFolder(tmp_path).metadata() == {"model_name": "x", "model_metadata": {"a": 1}}
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ModelFolder(tmp_path).metadata()


# ---------------------------------------------------------------------------------------------
# Bad inputs: one UserError each, and nothing that looks like a model left behind
# ---------------------------------------------------------------------------------------------
def _no_config(tmp_path: Path) -> Path:
    folder = tmp_path / "empty_model"
    folder.mkdir()
    (folder / "readme.txt").write_text("no model here")
    return folder


def _no_weights(tmp_path: Path, tiny) -> Path:
    folder = tmp_path / "no_weights"
    shutil.copytree(tiny["vit"], folder)
    (folder / "model.safetensors").unlink()
    return folder


def _no_processor(tmp_path: Path, tiny) -> Path:
    folder = tmp_path / "no_processor"
    shutil.copytree(tiny["vit"], folder)
    (folder / "preprocessor_config.json").unlink()
    return folder


def _text_model(tmp_path: Path) -> Path:
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(folder)
    shutil.copy2(Path(__file__), folder / "model.safetensors")  # never read: the type is refused first
    return folder


def _only_checkpoints(tmp_path: Path, tiny) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(tiny["vit"], folder / "checkpoint-10")
    shutil.copytree(tiny["vit"], folder / "checkpoint-20")
    return folder


BAD_INPUTS = {
    "hub id while offline": (lambda t, m: {"model_name": "someone/not-a-model"}, "unreachable"),
    "nothing given": (lambda t, m: {}, "no model given"),
    "pytorch and mlflow": (
        lambda t, m: {"pytorch_model": m["vit"], "mlflow_model": m["vit"]}, "not both"),
    "folder without config": (lambda t, m: {"model_name": str(_no_config(t))}, "no config.json"),
    "pytorch folder without config": (lambda t, m: {"pytorch_model": _no_config(t)}, "no config.json"),
    "pytorch folder missing": (lambda t, m: {"pytorch_model": t / "missing"}, "folder not found"),
    "mlflow without MLmodel": (lambda t, m: {"mlflow_model": m["vit"]}, "no MLmodel"),
    "neither folder nor hub id": (lambda t, m: {"model_name": "not a model!"}, "neither a folder"),
    "missing path": (lambda t, m: {"model_name": "./no/such/folder"}, "folder not found"),
    "no weights": (lambda t, m: {"model_name": str(_no_weights(t, m))}, "no PyTorch weights"),
    "no image processor": (lambda t, m: {"pytorch_model": _no_processor(t, m)}, "no image processor"),
    "not an image model": (lambda t, m: {"model_name": str(_text_model(t))}, "not an image-classification"),
    "only checkpoints": (lambda t, m: {"pytorch_model": _only_checkpoints(t, m)}, "only training checkpoints"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(tiny, tmp_path, case, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # whatever the shell says
    make, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message) as info:
        import_model(output_dir=out, **make(tmp_path, tiny))
    assert "\n" not in str(info.value)
    assert not out.exists() and _no_leftovers(tmp_path)


def test_non_empty_output_dir_is_refused(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        import_model(model_name=str(tiny["vit"]), output_dir=out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_output_inside_input_is_refused(tiny, tmp_path):
    src = shutil.copytree(tiny["vit"], tmp_path / "src")
    with pytest.raises(UserError, match="must not be the input"):
        import_model(pytorch_model=src, output_dir=src / "imported")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "visiontune", "import-model", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_imports_a_folder(tiny, tmp_path):
    run = _cli("--model_name", str(tiny["convnext"]), "--output_dir", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == MODEL_FILES
    assert str(tmp_path / "out") in run.stdout


@pytest.mark.parametrize("args, words", [
    (["--model_name", "someone/not-a-model"], "unreachable"),
    (["--pytorch_model", "{empty}"], "no config.json"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, words):
    empty = _no_config(tmp_path)
    args = [a.format(empty=empty) for a in args]
    run = _cli(*args, "--output_dir", str(tmp_path / "out"))
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert words in run.stderr and "Traceback" not in run.stderr


def test_import_into_a_mount_point_fills_it_in_place(tiny, tmpfs):
    """An output that is a file system of its own (Azure ML mounts each output): nothing is
    moved in from another file system and the folder itself stays; an import there replaces
    an earlier one."""
    out = tmpfs()
    for kind in ("vit", "resnet"):
        import_model(model_name=str(tiny[kind]), output_dir=out)
        assert out.is_mount() and ModelFolder(out).metadata()["model_name"] == str(tiny[kind])
        torch.testing.assert_close(_logits(out), _logits(tiny[kind]), rtol=0, atol=0)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
