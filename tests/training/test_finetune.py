"""The finetune component end to end on tiny models and real digit images (fast), and the
quality bars of the built-in model on the demo data (slow)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from tests.helpers import subset
from visiontune.cli import main
from visiontune.config import resolve
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS, MULTILABEL
from visiontune.training.finetune import finetune

FAST = {"number_of_epochs": 2, "training_batch_size": 8, "validation_batch_size": 16,
        "image_height": 32, "image_width": 32, "number_of_workers": 0, "learning_rate": 1e-3,
        "save_as_mlflow_model": False}


@pytest.fixture(scope="module")
def digits(demo_dir, tmp_path_factory):
    """Three digit classes, 16 training and 8 validation images each."""
    root = tmp_path_factory.mktemp("digits3")
    return (subset(demo_dir / "digits" / "train", root / "train.jsonl", 16, per_class=True,
                   labels=("0", "1", "7")),
            subset(demo_dir / "digits" / "validation", root / "val.jsonl", 8, per_class=True,
                   labels=("0", "1", "7")))


@pytest.fixture(scope="module")
def mosaics(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mosaics")
    return (subset(demo_dir / "mosaics" / "train", root / "train.jsonl", 48),
            subset(demo_dir / "mosaics" / "validation", root / "val.jsonl", 24))


def run(model_dir, data, out, task=MULTICLASS, callbacks=(), **over):
    given = {"model_path": str(model_dir), "training_data": str(data[0]),
             "validation_data": str(data[1]), "task_name": task,
             "output_dir_pytorch": str(out), **FAST, **over}
    return finetune(resolve(FINETUNE_INPUTS, given), callbacks=callbacks)


def _state(folder):
    return json.loads((Path(folder) / "trainer_state.json").read_text())


def test_multiclass_outputs_and_cli(tiny_vit, digits, tmp_path):
    out, mlf = tmp_path / "pt", tmp_path / "mlflow"
    code = main(["finetune", "--model_path", str(tiny_vit), "--training_data", str(digits[0]),
                 "--validation_data", str(digits[1]), "--task_name", MULTICLASS,
                 "--output_dir_pytorch", str(out), "--output_dir_mlflow", str(mlf),
                 *[x for k, v in FAST.items() if k != "save_as_mlflow_model" for x in (f"--{k}", str(v))]])
    assert code == 0
    for name in ("config.json", "model.safetensors", "preprocessor_config.json",
                 "model_selector_args.json", "finetune_args.json", "augmentations.json",
                 "metrics.jsonl", "eval_results.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "model_selector_args.json").read_text())
    assert meta["model_metadata"]["id2label"] == {"0": "0", "1": "1", "2": "7"}
    assert meta["model_metadata"]["finetuning_task"] == MULTICLASS
    assert meta["preprocessing"]["height"] == 32
    proc = json.loads((out / "preprocessor_config.json").read_text())
    assert proc["size"] == {"height": 32, "width": 32}
    args = json.loads((out / "finetune_args.json").read_text())
    assert args["sources"]["optimizer"] == "base" and args["values"]["optimizer"] == "adamw_hf"
    assert args["sources"]["learning_rate"] == "user"
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [round(h["epoch"]) for h in history if "eval_accuracy" in h] == [1, 2]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 2 and all((c / "visiontune_complete.json").is_file() for c in checkpoints)
    assert all((c / "optimizer.pt").is_file() and (c / "rng_state.pth").is_file() for c in checkpoints)
    assert (mlf / "MLmodel").is_file()
    # The saved model is the best checkpoint's, every weight of it (legacy-named ViT keys too).
    from transformers import AutoModelForImageClassification

    best = _state(checkpoints[-1])["best_model_checkpoint"]
    saved = AutoModelForImageClassification.from_pretrained(out).state_dict()
    for key, value in AutoModelForImageClassification.from_pretrained(best).state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)

    # The saved metrics are the reloaded model's, recomputed with scikit-learn in a fresh process.
    results = json.loads((out / "eval_results.json").read_text())
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        from visiontune.inference import Classifier
        from visiontune.data.sources import load_records
        from visiontune.data.images import load_image
        clf = Classifier({str(out)!r}, device="cpu")
        records, problems = load_records({str(digits[1])!r}, {MULTICLASS!r})
        probs = clf.probabilities([load_image(r.image) for r in records])
        print(json.dumps({{"probs": probs.tolist(), "labels": [r.label for r in records]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    classes = ["0", "1", "7"]
    y_true = [classes.index(l) for l in got["labels"]]
    y_pred = np.argmax(np.array(got["probs"]), axis=1)
    assert results["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-9)
    assert len(results["per_class"]) == 3


def test_multilabel_run_reports_iou(tiny_vit, mosaics, tmp_path):
    result = run(tiny_vit, mosaics, tmp_path / "ml", task=MULTILABEL)
    assert {"iou", "iou_micro", "iou_macro", "iou_weighted", "accuracy"} <= set(result.metrics)
    config = json.loads((tmp_path / "ml" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert len(result.classes) == 10
    args = json.loads((tmp_path / "ml" / "finetune_args.json").read_text())
    assert args["values"]["metric_for_best_model"] == "iou"


def test_same_seed_same_metrics(tiny_vit, digits, tmp_path):
    a = run(tiny_vit, digits, tmp_path / "a", number_of_epochs=1)
    b = run(tiny_vit, digits, tmp_path / "b", number_of_epochs=1)
    assert a.metrics["loss"] == b.metrics["loss"] and a.metrics["accuracy"] == b.metrics["accuracy"]


def test_normalising_uint8_batches_on_the_device_trains_the_same_model(tiny_vit, digits, tmp_path,
                                                                       monkeypatch):
    """The GPU's loader path (uint8 batches, normalised by the trainer after the copy), run on
    the CPU: the same weights and metrics as the per-image float path."""
    from safetensors.torch import load_file

    import visiontune.training.finetune as ft

    plain = run(tiny_vit, digits, tmp_path / "plain", number_of_epochs=1, apply_augmentations=True)
    planned = ft.plan_training
    seen = []

    def on_device(*args, **kwargs):
        plan = planned(*args, **kwargs)
        plan.normalise_on_device = True
        return plan

    def batch_dtype(self, inputs):
        seen.append(inputs["pixel_values"].dtype)
        return original(self, inputs)

    from visiontune.training.trainer import VisionTrainer

    original = VisionTrainer._prepare_inputs
    monkeypatch.setattr(ft, "plan_training", on_device)
    monkeypatch.setattr(VisionTrainer, "_prepare_inputs", batch_dtype)
    device = run(tiny_vit, digits, tmp_path / "device", number_of_epochs=1, apply_augmentations=True)
    assert seen and set(seen) == {torch.uint8}  # training and evaluation batches alike
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "device" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.metrics["loss"] == device.metrics["loss"]
    steps = json.loads((tmp_path / "device" / "augmentations.json").read_text())["train"]
    assert steps[-1] == {"name": "Normalize", "mean": steps[-1]["mean"], "std": steps[-1]["std"], "on": "device"}


def test_resume_equals_an_uninterrupted_run(tiny_vit, digits, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            control.should_training_stop = True

    whole = run(tiny_vit, digits, tmp_path / "whole", number_of_epochs=2)
    run(tiny_vit, digits, tmp_path / "resumed", number_of_epochs=2, callbacks=[Stop()])
    # A half-written newer checkpoint (crash while saving) must not be picked.
    half = tmp_path / "resumed" / "checkpoint-999"
    half.mkdir()
    (half / "config.json").write_text("{}")
    trained = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            trained.append(state.global_step)

    resumed = run(tiny_vit, digits, tmp_path / "resumed", number_of_epochs=2,
                  resume_from_checkpoint=True, callbacks=[Steps()])
    assert not half.exists()
    first = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "resumed").glob("checkpoint-*"))[0]
    assert trained == list(range(first + 1, 2 * first + 1))  # only the steps after the checkpoint
    assert _state(sorted((tmp_path / "resumed").glob("checkpoint-*"))[-1])["global_step"] == \
        _state(sorted((tmp_path / "whole").glob("checkpoint-*"))[-1])["global_step"]
    w1 = load_file(tmp_path / "whole" / "model.safetensors")
    w2 = load_file(tmp_path / "resumed" / "model.safetensors")
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=0, atol=0)
    assert resumed.metrics["loss"] == whole.metrics["loss"]
    assert resumed.metrics["accuracy"] == whole.metrics["accuracy"]


@pytest.fixture(scope="module")
def tiny_vit_dropout(tiny_vit, tmp_path_factory):
    """The tiny ViT with dropout, so that resuming must also restore the training's random state."""
    import shutil

    folder = tmp_path_factory.mktemp("vit_dropout") / "model"
    shutil.copytree(tiny_vit, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("accumulation,augment,stop_at", [(1, True, 8), (2, True, 4), (1, False, 8)],
                         ids=["augmented", "accumulated", "plain"])
def test_resume_in_the_middle_of_an_epoch_equals_an_uninterrupted_run(
        tiny_vit_dropout, digits, tmp_path, accumulation, augment, stop_at):
    """48 images in batches of 8: stopped at a checkpoint inside the second epoch, resumed, and
    the same weights, the same losses at every step, each step logged once; the resumed run
    trains exactly the steps after the checkpoint."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= stop_at

    class Steps(TrainerCallback):
        trained: list[int] = []

        def on_step_end(self, args, state, control, **kw):
            self.trained.append(state.global_step)

    common = dict(number_of_epochs=2, apply_augmentations=augment, gradient_accumulation_step=accumulation,
                  save_strategy="steps", save_steps=2, evaluation_strategy="steps", evaluation_steps=2,
                  logging_strategy="steps", logging_steps=1, save_total_limit=-1)
    whole = run(tiny_vit_dropout, digits, tmp_path / "whole", **common)
    run(tiny_vit_dropout, digits, tmp_path / "resumed", callbacks=[Stop()], **common)
    assert _state(tmp_path / "resumed" / f"checkpoint-{stop_at}")["epoch"] % 1 != 0  # mid-epoch
    # as if killed later: a step logged after the checkpoint, and a line torn by the kill
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as log:
        log.write(json.dumps({"step": stop_at + 1, "loss": 123.0}) + '\n{"step": ')
    steps = Steps()
    resumed = run(tiny_vit_dropout, digits, tmp_path / "resumed", resume_from_checkpoint=True,
                  callbacks=[steps], **common)
    total = 12 // accumulation
    assert steps.trained == list(range(stop_at + 1, total + 1))
    w1, w2 = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for key in w1:
        assert torch.equal(w1[key], w2[key]), key
    assert resumed.metrics == whole.metrics

    def history(folder):
        rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows if "loss" in r or "eval_loss" in r]

    assert history(tmp_path / "resumed") == history(tmp_path / "whole")
    logged = [step for step, loss, _ in history(tmp_path / "resumed") if loss is not None]
    assert logged == list(range(1, total + 1))


def test_max_steps_overrides_epochs_and_accumulation_counts_updates(tiny_vit, digits, tmp_path):
    run(tiny_vit, digits, tmp_path / "a", max_steps=3, number_of_epochs=50)
    assert _state(sorted((tmp_path / "a").glob("checkpoint-*"))[-1])["global_step"] == 3
    # 48 images, batch 8: 6 batches an epoch; accumulating 2 makes 3 optimizer steps an epoch.
    run(tiny_vit, digits, tmp_path / "b", number_of_epochs=1, gradient_accumulation_step=2)
    assert _state(sorted((tmp_path / "b").glob("checkpoint-*"))[-1])["global_step"] == 3


def test_early_stopping_stops_when_the_metric_stalls(tiny_vit, digits, tmp_path):
    # lr 0: nothing changes, so the second evaluation does not improve and patience 1 stops it.
    run(tiny_vit, digits, tmp_path / "es", number_of_epochs=6, learning_rate=0.0,
        early_stopping=True, early_stopping_patience=1, metric_for_best_model="loss")
    history = [json.loads(l) for l in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()]
    assert max(h["epoch"] for h in history) == pytest.approx(2.0)


def test_steps_strategies_warmup_and_save_limit(tiny_vit, digits, tmp_path):
    out = tmp_path / "steps"
    run(tiny_vit, digits, out, number_of_epochs=2, evaluation_strategy="steps", evaluation_steps=4,
        logging_strategy="steps", logging_steps=1, save_strategy="steps", save_steps=4,
        save_total_limit=1, warmup_steps=6, learning_rate_scheduler="warmup_linear")
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [h["step"] for h in history if "eval_loss" in h]
    assert evals[:3] == [4, 8, 12]
    lrs = [h["learning_rate"] for h in history if "learning_rate" in h]
    assert lrs[0] < lrs[4] < lrs[5]  # warming up over the first 6 steps
    assert lrs[-1] < lrs[5]  # then decaying linearly
    # At most the newest and the best checkpoint survive a limit of 1.
    assert 1 <= len(list(out.glob("checkpoint-*"))) <= 2


def test_auto_find_batch_size_halves_on_out_of_memory(tiny_vit, digits, tmp_path, monkeypatch):
    import visiontune.models.loading as loading

    real = loading.load_for_finetune
    seen = []

    def load(*a, **kw):
        model = real(*a, **kw)
        forward = model.forward

        def limited(pixel_values=None, **kwargs):
            seen.append(pixel_values.shape[0])
            if model.training and pixel_values.shape[0] > 4:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(pixel_values=pixel_values, **kwargs)

        model.forward = limited
        return model

    monkeypatch.setattr(loading, "load_for_finetune", load)
    run(tiny_vit, digits, tmp_path / "oom", number_of_epochs=1, training_batch_size=16,
        auto_find_batch_size=True)
    assert seen[0] == 16 and 8 in seen and 4 in seen
    assert _state(sorted((tmp_path / "oom").glob("checkpoint-*"))[-1])["train_batch_size"] == 4


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_precision_16_trains_in_bf16_only_on_a_cpu_with_native_bf16(tiny_vit, digits, tmp_path,
                                                                      stated_cpu, native):
    """The CPU kind is stated; the Trainer's own arguments and the saved notes say the same."""
    from transformers import TrainerCallback

    seen = {}

    class Precision(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(bf16=args.bf16, fp16=args.fp16)

    stated_cpu(native, "AVX512" if native else "AVX2")
    result = run(tiny_vit, digits, tmp_path / "p16", number_of_epochs=1, precision=16,
                 callbacks=[Precision()])
    assert seen == {"bf16": native, "fp16": False}
    notes = json.loads((tmp_path / "p16" / "finetune_args.json").read_text())["notes"]
    want = "runs as bf16 mixed precision" if native else "runs as float32: this CPU has no native bf16 (AVX2)"
    assert any(want in n for n in notes), notes
    assert any(n.startswith("CPU ") and f"bf16 autocast {'on' if native else 'off'}" in n for n in notes)
    assert np.isfinite(result.metrics["loss"])


def test_mlflow_model_matches_pytorch_in_a_fresh_process(tiny_vit, digits, tmp_path):
    out, mlf = tmp_path / "pt", tmp_path / "mlflow"
    run(tiny_vit, digits, out, number_of_epochs=1, save_as_mlflow_model=True, output_dir_mlflow=str(mlf))
    script = textwrap.dedent(f"""
        import base64, json, sys
        import mlflow.pyfunc, pandas as pd
        rows = [json.loads(l) for l in open({str(digits[1])!r})]
        images = [base64.b64encode(open(r["image_url"], "rb").read()).decode() for r in rows]
        model = mlflow.pyfunc.load_model({str(mlf)!r})
        out = model.predict(pd.DataFrame({{"image": images}}))
        import visiontune
        print(json.dumps({{"probs": out["probs"].tolist(), "labels": out["labels"].tolist(),
                          "visiontune": visiontune.__file__}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served["labels"][0] == ["0", "1", "7"]

    from visiontune.data.images import load_image
    from visiontune.inference import Classifier

    rows = [json.loads(l) for l in digits[1].read_text().splitlines()]
    expected = Classifier(out, device="cpu").probabilities([load_image(r["image_url"]) for r in rows])
    np.testing.assert_allclose(np.array(served["probs"]), expected, atol=1e-5)


def test_bad_inputs_stop_before_loading_anything(tmp_path, tiny_vit, capsys):
    base = ["finetune", "--model_path", str(tiny_vit), "--training_data", str(tmp_path / "nope.jsonl"),
            "--task_name", MULTICLASS, "--output_dir_pytorch", str(tmp_path / "o")]
    assert main(base + ["--metric_for_best_model", "iou"]) == 2
    assert "--metric_for_best_model: iou is for multi-label" in capsys.readouterr().err
    assert main(base[:2] + [str(tmp_path)] + base[3:]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


AZURE_TRACKING = ("azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/0000/resourceGroups/rg/"
                  "providers/Microsoft.MachineLearningServices/workspaces/ws")


def test_tracking_that_cannot_be_used_never_fails_the_run(tiny_vit, digits, tmp_path, monkeypatch, caplog):
    """Azure's azureml:// URI without its plugin: a note, and training as usual. A server that
    does not answer: one warning, and training as usual."""
    import socket

    monkeypatch.setenv("MLFLOW_TRACKING_URI", AZURE_TRACKING)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    result = run(tiny_vit, digits, tmp_path / "azure", number_of_epochs=1)
    notes = json.loads((tmp_path / "azure" / "finetune_args.json").read_text())["notes"]
    assert any("MLflow tracking is off: MLFLOW_TRACKING_URI is a azureml:// URI" in n
               and "azureml-mlflow" in n and "0000" not in n for n in notes), notes
    assert np.isfinite(result.metrics["loss"])
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{closed.getsockname()[1]}")
        monkeypatch.delenv("MLFLOW_RUN_ID")
        with caplog.at_level("WARNING", logger="visiontune.training"):
            result = run(tiny_vit, digits, tmp_path / "down", number_of_epochs=1)
    warnings = [r.getMessage() for r in caplog.records if "MLflow tracking failed" in r.getMessage()]
    assert len(warnings) == 1 and "secret" not in warnings[0]
    assert np.isfinite(result.metrics["loss"]) and (tmp_path / "down" / "model.safetensors").is_file()


def test_metrics_go_to_mlflow_tracking_when_configured(tiny_vit, digits, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "visiontune-test")
    run(tiny_vit, digits, tmp_path / "tracked", number_of_epochs=1)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("visiontune-test")
    runs = client.search_runs([experiment.experiment_id])
    assert runs and "eval_accuracy" in runs[0].data.metrics


def test_a_tracking_plugin_s_own_log_lines_give_way_to_one_warning(monkeypatch, caplog):
    """azureml-mlflow and the Azure identity chain log each credential they try before they
    raise: the run shows one warning instead, and the loggers keep their levels afterwards."""
    import logging

    from transformers.integrations.integration_utils import MLflowCallback

    from visiontune.training.tracking import tracking_callback

    def failing_setup(self, args, state, model):
        logging.getLogger("azure.identity").error("InteractiveBrowserCredential.get_token failed")
        logging.getLogger("azureml.mlflow").warning("unable to load cloud metadata")
        raise RuntimeError("ChainedTokenCredential failed to retrieve a token\nAttempted credentials: ...")

    monkeypatch.setattr(MLflowCallback, "setup", failing_setup)
    callback = tracking_callback()
    with caplog.at_level("DEBUG"):
        callback.setup(None, None, None)
        callback.setup(None, None, None)  # off after the first failure: no second warning
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("MLflow tracking failed (RuntimeError: "
                                                         "ChainedTokenCredential failed"), messages
    assert "Attempted credentials" not in messages[0]
    assert logging.getLogger("azure").level == logging.NOTSET
