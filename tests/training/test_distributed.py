"""Distributed runs on this CPU over gloo: torchrun with 2 processes on one node, 2 single-process
"nodes" on 127.0.0.1, and Azure ML's environment variables without torchrun.

Each distributed run is compared with one process at the same global batch (8 per process x 2
against 16 x 1), augmentations off and the same seed. Tolerance: every logged training loss, every
validation loss and the final validation loss agree within a relative 1e-4 (measured: about 1e-7,
the order of float sums), and the validation metrics (accuracy, F1, IoU...) are equal to 1e-6.
The validation sets hold 21 rows: not a multiple of 2 processes x 4 rows per batch, so the
Trainer pads the last batch and must drop the padding again.
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port, needs_native_bf16, subset
from visiontune.cli import main
from visiontune.config import resolve
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS, MULTILABEL
from visiontune.training.finetune import finetune

TIMEOUT = 240  # seconds, for each group of processes
RTOL_LOSS, ATOL_METRIC = 1e-4, 1e-6
RUN = {"number_of_epochs": 2, "validation_batch_size": 4, "image_height": 32, "image_width": 32,
       "number_of_workers": 0, "learning_rate": 5e-3, "apply_augmentations": False,
       "logging_strategy": "steps", "logging_steps": 1, "save_as_mlflow_model": False}
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def make_datasets(demo_dir: Path, root: Path) -> dict:
    """48 training rows (3 steps of 16), 21 validation rows, for each task."""
    def digits(split, out, n):
        return subset(demo_dir / "digits" / split, out, n, per_class=True, labels=("0", "1", "7"))

    return {
        MULTICLASS: (digits("train", root / "mc_train.jsonl", 16),
                     digits("validation", root / "mc_val.jsonl", 7)),
        MULTILABEL: (subset(demo_dir / "mosaics" / "train", root / "ml_train.jsonl", 48),
                     subset(demo_dir / "mosaics" / "validation", root / "ml_val.jsonl", 21)),
    }


@pytest.fixture(scope="module")
def datasets(demo_dir, tmp_path_factory):
    return make_datasets(demo_dir, tmp_path_factory.mktemp("dist_data"))


def cli_args(model, data, task, out, batch, **over) -> list[str]:
    values = {"model_path": str(model), "training_data": str(data[0]),
              "validation_data": str(data[1]), "task_name": task, "output_dir_pytorch": str(out),
              "training_batch_size": batch, **RUN, **over}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


def run_together(commands: list[tuple[list[str], dict[str, str]]], timeout: int = TIMEOUT):
    """Start every command, wait for all; on timeout end them (their own process groups).
    Returns the exit codes, the outputs and when each process ended (each watched by a thread
    of its own, so a process that ends early gets its own, earlier time)."""
    import threading

    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for cmd, env in commands]
    outputs, ended = [""] * len(procs), [0.0] * len(procs)

    def watch(i: int) -> None:
        outputs[i] = procs[i].stdout.read()
        procs[i].wait()
        ended[i] = time.time()

    watchers = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(len(procs))]
    for watcher in watchers:
        watcher.start()
    deadline = time.monotonic() + timeout
    for watcher in watchers:
        watcher.join(max(0.0, deadline - time.monotonic()))
    if any(watcher.is_alive() for watcher in watchers):
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"distributed run took more than {timeout} s")
    return [p.returncode for p in procs], outputs, ended


@pytest.fixture(scope="module")
def one_process(tiny_vit, datasets, tmp_path_factory):
    """The reference: one process, batch 16 (run in this process, once per task)."""
    results = {}
    for task, data in datasets.items():
        out = tmp_path_factory.mktemp(f"one_{task}")
        given = {"model_path": str(tiny_vit), "training_data": str(data[0]),
                 "validation_data": str(data[1]), "task_name": task, "output_dir_pytorch": str(out),
                 "training_batch_size": 16, **RUN}
        finetune(resolve(FINETUNE_INPUTS, given))
        results[task] = out
    return results


def history(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def why(outputs: list[str]) -> str:
    """The workers' own last lines (torchrun's summary alone does not say what failed)."""
    keep = []
    for output in outputs:
        lines = [l for l in output.splitlines() if l.strip() and not l.startswith("  ")]
        keep += [l for l in lines if "Error" in l or "error:" in l][-10:] + lines[-15:]
    return "\n".join(keep)


def assert_same_training(one: Path, two: Path, data, task) -> None:
    h1, h2 = history(one), history(two)
    assert [h["step"] for h in h1] == [h["step"] for h in h2]  # same optimizer steps and evaluations
    for a, b in zip(h1, h2):
        assert set(a) == set(b)
        for key in a:
            if key.endswith("loss"):
                assert b[key] == pytest.approx(a[key], rel=RTOL_LOSS), (a["step"], key)
            elif key.startswith("eval_") and not key.endswith(("_runtime", "_per_second")):
                assert b[key] == pytest.approx(a[key], abs=ATOL_METRIC), (a["step"], key)
    r1 = json.loads((one / "eval_results.json").read_text())
    r2 = json.loads((two / "eval_results.json").read_text())
    assert r2["loss"] == pytest.approx(r1["loss"], rel=RTOL_LOSS)
    for key, value in r1.items():
        if isinstance(value, float) and key != "loss":
            assert r2[key] == pytest.approx(value, abs=ATOL_METRIC), key
    # Every validation row counted exactly once (no row of the padded last batch twice).
    rows = [json.loads(l)["label"] for l in data[1].read_text().splitlines()]
    support = {c["class"]: c["support"] for c in r2["per_class"]}
    if task == MULTICLASS:
        assert sum(support.values()) == len(rows) == 21
        assert support == {c: rows.count(c) for c in support}
    else:
        assert support == {c: sum(c in r for r in rows) for c in support}
    assert [c["support"] for c in r1["per_class"]] == [c["support"] for c in r2["per_class"]]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json",
                 "finetune_args.json", "eval_results.json"):
        assert (two / name).is_file(), name
    assert sorted(p.name for p in two.glob("checkpoint-*")) == sorted(p.name for p in one.glob("checkpoint-*"))
    assert not list(two.glob(".visiontune*")), "the shared-folder check leaves nothing behind"


def torchrun_two_processes(model, data, task, out, **over) -> list[str]:
    """``visiontune finetune`` under torchrun with 2 processes of batch 8; their output, once
    both succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "visiontune", "finetune", *cli_args(model, data, task, out, 8, **over)]
    codes, outputs, _ = run_together([(cmd, clean_env())])
    assert codes == [0], why(outputs)
    return outputs


def assert_one_log(output: str) -> None:
    assert output.count("effective inputs") == 1, output[-3000:]
    assert output.count("validation metrics of the best model") == 1, output[-3000:]


def test_gradient_accumulation_matches_one_larger_batch(tiny_vit, datasets, one_process, tmp_path):
    """8 x 2 accumulated steps train like 16 at once (the multi-label loss used to double)."""
    task = MULTILABEL
    out = tmp_path / "accumulated"
    given = {"model_path": str(tiny_vit), "training_data": str(datasets[task][0]),
             "validation_data": str(datasets[task][1]), "task_name": task,
             "output_dir_pytorch": str(out), "training_batch_size": 8,
             "gradient_accumulation_step": 2, **RUN}
    finetune(resolve(FINETUNE_INPUTS, given))
    assert_same_training(one_process[task], out, datasets[task], task)


def test_the_node_decodes_the_images_into_the_cache_once(tiny_vit, datasets, tmp_path):
    """Two processes of one node, an empty decoded-image cache: the first fills it, the other
    waits and reads it (it would say so if it had decoded any image itself)."""
    task, cache = MULTICLASS, tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "visiontune", "finetune",
           *cli_args(tiny_vit, datasets[task], task, tmp_path / "out", 8, number_of_epochs=1)]
    codes, outputs, _ = run_together([(cmd, clean_env(VISIONTUNE_IMAGE_CACHE_DIR=cache))])
    assert codes == [0], why(outputs)
    images = sum(len(Path(p).read_text().splitlines()) for p in datasets[task][:2])
    assert len([p for p in cache.rglob("*") if p.is_file()]) >= images  # it was filled
    assert "should have cached" not in outputs[0], outputs[0][-3000:]
    assert_one_log(outputs[0])


@pytest.mark.parametrize("task", [MULTICLASS, MULTILABEL])
def test_torchrun_two_processes_match_one_process(task, tiny_vit, datasets, one_process, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "visiontune", "finetune", *cli_args(tiny_vit, datasets[task], task, out, 8)]
    codes, outputs, _ = run_together([(cmd, clean_env())])
    assert codes == [0], why(outputs)
    assert_one_log(outputs[0])
    assert_same_training(one_process[task], out, datasets[task], task)


@pytest.mark.parametrize("task,rendezvous", [(MULTICLASS, "static"), (MULTILABEL, "c10d")])
def test_two_nodes_on_loopback_match_one_process(task, rendezvous, tiny_vit, datasets, one_process,
                                                 tmp_path):
    """Two single-process "nodes": --node_rank with --master_addr/--master_port, or c10d."""
    out, port = tmp_path / "nodes", free_port()

    def launch(node):
        if rendezvous == "static":
            return [f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        return ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=visiontune"]

    commands = [([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                  *launch(node), "-m", "visiontune", "finetune",
                  *cli_args(tiny_vit, datasets[task], task, out, 8)], clean_env()) for node in (0, 1)]
    codes, outputs, _ = run_together(commands)
    assert codes == [0, 0], why(outputs)
    assert_one_log(outputs[0] + outputs[1])
    assert_same_training(one_process[task], out, datasets[task], task)


def azure_env(rank: int, port: int) -> dict[str, str]:
    """What Azure ML's distribution: pytorch sets for each process (1 node, 2 processes)."""
    return clean_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, NODE_RANK=0,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


def test_azure_ml_environment_without_torchrun_runs_the_pipeline(tiny_vit, datasets, tmp_path):
    """Plain ``python -m visiontune`` per process, as Azure ML starts it: the processes form one
    group, rank 0 writes the model, the MLflow model and the evaluation, and both return only
    after that."""
    task, out, port = MULTILABEL, tmp_path / "az", free_port()
    args = cli_args(tiny_vit, datasets[task], task, out, 8, save_as_mlflow_model=True,
                    number_of_epochs=1)
    args[args.index("--model_path")] = "--pytorch_model"
    commands = [([sys.executable, "-m", "visiontune", "pipeline", *args], azure_env(rank, port))
                for rank in (0, 1)]
    codes, outputs, ended = run_together(commands)
    assert codes == [0, 0], why(outputs)
    assert "[4/4] evaluating" in outputs[0] and "evaluation report:" in outputs[0]
    assert "[1/4]" not in outputs[1] and "validation metrics" not in outputs[1]
    steps = [h["step"] for h in history(out) if "loss" in h and "eval_loss" not in h]
    assert steps == [1, 2, 3]  # 48 rows, 8 per process x 2: the data was split between them
    mlmodel, report = out / "mlflow_model" / "MLmodel", out / "evaluation" / "metrics.json"
    assert mlmodel.is_file() and report.is_file()
    # each process returned only after rank 0 had written (rank 1's own exit time included)
    assert all(t >= max(mlmodel.stat().st_mtime, report.stat().st_mtime) for t in ended), ended


def test_output_folder_not_shared_by_every_process_fails_before_training(tiny_vit, datasets, tmp_path):
    """Two "nodes" whose output folders differ (as with Azure's upload mode): both stop at once."""
    task, port = MULTICLASS, free_port()
    commands = [([sys.executable, "-m", "visiontune", "finetune",
                  *cli_args(tiny_vit, datasets[task], task, tmp_path / f"node{rank}", 8)],
                 {**azure_env(rank, port), "VISIONTUNE_SHARED_FOLDER_WAIT_S": "1"})
                for rank in (0, 1)]
    codes, outputs, _ = run_together(commands)
    assert codes == [2, 2], outputs
    for output in outputs:
        assert "is not shared by all processes (rank 1 on" in output
        assert "mount" in output
    assert not list((tmp_path / "node0").glob("checkpoint-*"))


WAIT_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch.distributed as dist
    from visiontune.training import distributed
    dist.init_process_group("gloo")
    distributed.prepare()
    marker = Path(sys.argv[1])
    if distributed.is_main_process():
        time.sleep(1.5)
        marker.write_text("written")
    distributed.wait_for_main_process("writing")
    print("SAW:", marker.is_file(), flush=True)
    if distributed.is_main_process():
        time.sleep(0.5)
        raise SystemExit(3)  # rank 0 fails while the others wait
    try:
        distributed.wait_for_main_process("evaluating")
    except distributed.RankZeroFailed as exc:
        print("FAILED:", exc, flush=True)
        raise SystemExit(exc.exit_code)
""")


def test_other_ranks_wait_for_rank_zero_and_stop_when_it_dies(tmp_path):
    port, marker = free_port(), tmp_path / "marker"
    commands = [([sys.executable, "-c", WAIT_SCRIPT, str(marker)], azure_env(rank, port))
                for rank in (0, 1)]
    codes, outputs, _ = run_together(commands, timeout=60)
    assert "SAW: True" in outputs[1]  # rank 1 went on only after rank 0 had written
    assert codes == [3, 1], outputs
    # noticed because rank 0 is gone, not after a timeout (run_together's 60 s would end it)
    assert "FAILED: rank 1: stopped waiting for rank 0 (evaluating)" in outputs[1]


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "without MASTER_ADDR, MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "1"}, "RANK=2 is not within WORLD_SIZE=2"),
])
def test_half_described_process_group_is_one_line(env, message, tiny_vit, datasets, tmp_path,
                                                  monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["finetune", *cli_args(tiny_vit, datasets[MULTICLASS], MULTICLASS, tmp_path / "o", 8)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_one_process_world_is_described_and_taken_away_again(monkeypatch):
    from visiontune.training import distributed

    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.start_one_process_world()
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    distributed.end_one_process_world()
    assert not any(name in os.environ for name in LAUNCH_VARS)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert not distributed.start_one_process_world()  # a launcher described the group already


@needs_native_bf16
def test_torchrun_bf16_cnn_with_the_fast_depthwise_backward(datasets, tmp_path):
    """precision 16 on the CPU under DDP: the depthwise convolutions' own backward feeds DDP's
    gradient all-reduce, and the run trains and finishes on every rank."""
    from tests.tiny_models import save_tiny_model

    model = save_tiny_model("timm", tmp_path / "cnn", num_labels=3, image_size=32)
    out, task = tmp_path / "bf16", MULTICLASS
    outputs = torchrun_two_processes(model, datasets[task], task, out, precision=16)
    assert_one_log(outputs[0])
    losses = [row["loss"] for row in history(out) if "loss" in row]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)  # 2 epochs of 3 steps
    assert losses[-1] < losses[0]


def test_torchrun_resumed_in_the_middle_of_an_epoch_ends_like_the_uninterrupted_run(tiny_vit, datasets, tmp_path):
    """Two processes, killed (SIGKILL to the whole launch) right after a checkpoint inside an
    epoch, then resumed: the same weights, bit for bit, as two processes never stopped, with
    augmentations on (each rank's random state and the per-image augmentation seeds restored)."""
    from safetensors.torch import load_file

    task = MULTICLASS
    steps = {"save_strategy": "steps", "save_steps": 2, "evaluation_strategy": "steps",
             "evaluation_steps": 2, "apply_augmentations": True, "save_total_limit": -1}

    def launch(out, resume=False):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "visiontune",
                "finetune", *cli_args(tiny_vit, datasets[task], task, out, 8, **steps,
                                      resume_from_checkpoint=resume)]

    whole = tmp_path / "whole"
    codes, outputs, _ = run_together([(launch(whole), clean_env())])
    assert codes == [0], why(outputs)

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(launch(stopped), env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = stopped / "checkpoint-2" / "visiontune_complete.json"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert marker.exists(), "no mid-epoch checkpoint was written"
    assert not (stopped / "model.safetensors").exists(), "the run ended before it was stopped"

    codes, outputs, _ = run_together([(launch(stopped, resume=True), clean_env())])
    assert codes == [0], why(outputs)
    assert "resuming from" in outputs[0]
    a, b = load_file(whole / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps_logged = [h["step"] for h in history(stopped) if "loss" in h and "eval_loss" not in h]
    assert steps_logged == sorted(set(steps_logged)) == [h["step"] for h in history(whole)
                                                         if "loss" in h and "eval_loss" not in h]


def save_tiny_dinov2(path: Path) -> Path:
    """A tiny DINOv2 classifier: its ``mask_token`` (masked-image pretraining only) gets no
    gradient from the classification loss."""
    from transformers import Dinov2Config, Dinov2ForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    labels = ["0", "1", "7"]
    config = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, mlp_ratio=2, id2label=dict(enumerate(labels)),
                          label2id={c: i for i, c in enumerate(labels)})
    Dinov2ForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_the_weights_without_a_gradient_are_found_without_side_effects(tmp_path):
    from tests.tiny_models import build_tiny_model
    from transformers import AutoModelForImageClassification

    from visiontune.training.trainer import unused_parameters

    model = AutoModelForImageClassification.from_pretrained(save_tiny_dinov2(tmp_path / "d")).eval()
    assert unused_parameters(model, 32, 32) == ["dinov2.embeddings.mask_token"]
    assert not model.training and all(p.grad is None for p in model.parameters())
    resnet, _ = build_tiny_model("resnet")  # batch norm: its running statistics stay as they were
    before = {n: b.clone() for n, b in resnet.named_buffers()}
    state = torch.random.get_rng_state()
    assert unused_parameters(resnet, 32, 32) == []
    assert all(torch.equal(before[n], b) for n, b in resnet.named_buffers())
    assert torch.equal(state, torch.random.get_rng_state())


def test_torchrun_trains_a_model_with_weights_that_get_no_gradient(datasets, tmp_path):
    """DINOv2 under DDP: without looking for unused weights, the second step fails with
    "Expected to have finished reduction"; the run says it looks for them."""
    model = save_tiny_dinov2(tmp_path / "dinov2")
    out, task = tmp_path / "out", MULTICLASS
    outputs = torchrun_two_processes(model, datasets[task], task, out, number_of_epochs=1)
    assert outputs[0].count("note: DDP looks for weights without a gradient at every step: "
                            "dinov2.embeddings.mask_token") == 1
    steps = [h["step"] for h in history(out) if "loss" in h and "eval_loss" not in h]
    assert steps == [1, 2, 3]
    notes = json.loads((out / "finetune_args.json").read_text())["notes"]
    assert any("mask_token" in n for n in notes)
