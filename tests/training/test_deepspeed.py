"""DeepSpeed on this CPU: ZeRO-2 over gloo under torchrun, and a plain ``python`` run (a
one-process group). The merge rule's unit tests need no deepspeed: tests/training/test_training_plan.py.

The first DeepSpeed run on a machine compiles a communication extension (about 30 s to 2 min,
then cached in ~/.cache/torch_extensions), so the runs are marked slow.
"""

import json
import sys

import pytest

pytest.importorskip("deepspeed")

from tests.training.test_distributed import (  # noqa: E402
    clean_env, cli_args, free_port, make_datasets, run_together, why,
)
from visiontune import inputs as I  # noqa: E402
from visiontune.config import resolve  # noqa: E402
from visiontune.inputs import MULTICLASS  # noqa: E402
from visiontune.training.arguments import plan_training  # noqa: E402
from visiontune.training.defaults import apply_defaults  # noqa: E402


@pytest.fixture(scope="module")
def datasets(demo_dir, tmp_path_factory):
    return make_datasets(demo_dir, tmp_path_factory.mktemp("ds_data"))


def test_the_trainer_accepts_the_merged_config_without_mismatches(tmp_path):
    from transformers import TrainingArguments

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 64,
                                "gradient_clipping": 5.0, "optimizer": {"type": "AdamW"}}))
    values = resolve(I.FINETUNE_INPUTS, {
        "model_path": str(tmp_path), "training_data": "d", "task_name": MULTICLASS,
        "output_dir_pytorch": str(tmp_path / "out"), "apply_deepspeed": "true",
        "deepspeed_config": str(user), "training_batch_size": "8", "max_grad_norm": "0.5",
        "learning_rate": "0.002"})
    values = apply_defaults(values, None)
    plan = plan_training(values, use_cpu=True, bf16_ok=False)
    assert any("train_micro_batch_size_per_gpu 64 replaced by 8" in n for n in plan.notes)
    assert any("gradient_clipping 5.0 replaced by 0.5" in n for n in plan.notes)
    assert any("without a distributed launcher" in n for n in plan.notes)
    args = TrainingArguments(**plan.training_args, deepspeed=plan.deepspeed_config)
    filled = args.hf_deepspeed_config.config
    assert args.hf_deepspeed_config.mismatches == []
    assert filled["train_micro_batch_size_per_gpu"] == 8 and filled["gradient_clipping"] == 0.5
    assert filled["optimizer"]["params"]["lr"] == 0.002
    assert filled["fp16"]["enabled"] is False and filled["bf16"]["enabled"] is False
    del args


@pytest.mark.slow
def test_zero2_over_gloo_with_two_processes(tiny_vit, datasets, tmp_path):
    out, config = tmp_path / "ds", tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                  "train_micro_batch_size_per_gpu": 32,
                                  "scheduler": {"type": "WarmupLR"}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "visiontune", "finetune",
           *cli_args(tiny_vit, datasets[MULTICLASS], MULTICLASS, out, 8, number_of_epochs=1,
                     apply_deepspeed=True, deepspeed_config=config, save_as_mlflow_model=True,
                     output_dir_mlflow=tmp_path / "mlflow")]
    codes, outputs, _ = run_together([(cmd, clean_env())], timeout=400)
    assert codes == [0], why(outputs)
    assert outputs[0].count("note: deepspeed_config: train_micro_batch_size_per_gpu 32 replaced by 8") == 1
    assert "note: deepspeed_config: scheduler WarmupLR removed" in outputs[0]
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h and "eval_loss" not in h] == [1, 2, 3]
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "global_step3").is_dir()  # DeepSpeed's own (partitioned) state
    assert (checkpoint / "visiontune_complete.json").is_file()
    for name in ("model.safetensors", "config.json", "eval_results.json", "finetune_args.json"):
        assert (out / name).is_file(), name
    assert (tmp_path / "mlflow" / "MLmodel").is_file()
    results = json.loads((out / "eval_results.json").read_text())
    assert sum(c["support"] for c in results["per_class"]) == 21


@pytest.mark.slow
def test_without_a_launcher_deepspeed_runs_as_one_process(tiny_vit, datasets, tmp_path):
    out = tmp_path / "one"
    cmd = [sys.executable, "-m", "visiontune", "finetune",
           *cli_args(tiny_vit, datasets[MULTICLASS], MULTICLASS, out, 16, number_of_epochs=1,
                     apply_deepspeed=True)]
    codes, outputs, _ = run_together([(cmd, clean_env())], timeout=400)
    assert codes == [0], why(outputs)
    assert "note: apply_deepspeed without a distributed launcher" in outputs[0]
    assert "note: deepspeed: built-in configuration (ZeRO stage 2" in outputs[0]
    assert (out / "model.safetensors").is_file() and (out / "eval_results.json").is_file()
    assert "mpi4py" not in outputs[0]


@pytest.mark.slow
def test_zero3_bf16_batch_norm_model_gets_its_new_head_and_float32_weights(datasets, tmp_path):
    """A CNN with batch norm under ZeRO-3 with precision 16 as bf16: it trains (DeepSpeed's bf16
    section would stop it: bf16 weights against float32 statistics), the head is initialised
    anew exactly as without DeepSpeed (zero.Init made that a no-op on empty partitions), and the
    saved weights are float32. Learning rate 0 keeps the weights as initialised."""
    import torch
    from safetensors.torch import load_file
    from tests.tiny_models import save_tiny_model
    from transformers import set_seed

    from visiontune.models.loading import load_for_finetune

    model = save_tiny_model("resnet", tmp_path / "resnet", num_labels=3, image_size=32)
    out, config = tmp_path / "out", tmp_path / "z3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cmd = [sys.executable, "-m", "visiontune", "finetune",
           *cli_args(model, datasets[MULTICLASS], MULTICLASS, out, 8, number_of_epochs=1, max_steps=2,
                     learning_rate=0, random_seed=7, precision=16, apply_deepspeed=True,
                     deepspeed_config=config)]
    codes, outputs, _ = run_together([(cmd, clean_env(VISIONTUNE_CPU_BF16=1))], timeout=400)
    assert codes == [0], why(outputs)
    assert "note: deepspeed: precision 16 runs as bf16 autocast (torch_autocast)" in outputs[0]
    saved = load_file(out / "model.safetensors")
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    classes = ["0", "1", "7"]
    set_seed(7)
    expected = load_for_finetune(model, classes, MULTICLASS).state_dict()
    checkpoint = load_file(model / "model.safetensors")
    head = [k for k in saved if k.startswith("classifier") and k.endswith("weight")]
    assert head and all(torch.equal(saved[k], expected[k]) for k in head)
    assert not any(torch.equal(saved[k], checkpoint[k]) for k in head)  # not the old head
