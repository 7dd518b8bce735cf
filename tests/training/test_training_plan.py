"""Defaults chain and the mapping of inputs onto TrainingArguments (no data, no model)."""

import json
import re

import pytest
from transformers import TrainingArguments

from visiontune import inputs as I
from visiontune.config import resolve
from visiontune.errors import UserError
from visiontune.hardware import CpuKind
from visiontune.training.arguments import parse_extra_optim_args, plan_training, read_deepspeed_config
from visiontune.training.defaults import apply_defaults, defaults_sources

MC, ML = I.TASKS


def values(tmp_path, **over):
    given = {"model_path": str(tmp_path), "training_data": "d", "task_name": MC,
             "output_dir_pytorch": str(tmp_path / "out"), **over}
    return resolve(I.FINETUNE_INPUTS, given)


NATIVE_BF16 = CpuKind("AVX512", native_bf16=True)


def planned(tmp_path, model=None, cpu=NATIVE_BF16, **over):
    """The plan on a CPU-only machine of a stated kind (default: one with native bf16)."""
    v = values(tmp_path, **over)
    v = apply_defaults(v, model, tmp_path)
    sources = defaults_sources(v)
    plan = plan_training(v, use_cpu=True, bf16_ok=False, cpu=cpu)
    return v, sources, plan


def test_defaults_precedence_user_over_model_file_over_model_over_task_over_base(tmp_path):
    (tmp_path / "model_defaults.json").write_text(json.dumps({"learning_rate": 0.01}))
    v = apply_defaults(values(tmp_path, warmup_steps="3"), "google/vit-base-patch16-224", tmp_path)
    src = defaults_sources(v)
    assert (v.warmup_steps, src["warmup_steps"]) == (3, "user")
    assert (v.learning_rate, src["learning_rate"]) == (0.01, "model_defaults.json")
    assert (v.training_batch_size, src["training_batch_size"]) == (72, "model google/vit-base-patch16-224")
    assert (v.number_of_epochs, src["number_of_epochs"]) == (15, f"task {MC}")
    assert (v.max_grad_norm, src["max_grad_norm"]) == (1.0, "base")
    assert v.metric_for_best_model == "loss"  # the ViT row overrides the task's accuracy


def test_task_defaults_pick_the_primary_metric(tmp_path):
    assert apply_defaults(values(tmp_path), None).metric_for_best_model == "accuracy"
    assert apply_defaults(values(tmp_path, task_name=ML), None).metric_for_best_model == "iou"


def test_mobilevit_label_smoothing_is_zero_for_multilabel(tmp_path):
    assert apply_defaults(values(tmp_path), "apple/mobilevit-small").label_smoothing_factor == 0.1
    v = apply_defaults(values(tmp_path, task_name=ML), "apple/mobilevit-small")
    assert v.label_smoothing_factor == 0.0


def test_bad_model_defaults_file_is_a_clear_error(tmp_path):
    (tmp_path / "model_defaults.json").write_text('{"optimizer": "adam"}')
    with pytest.raises(UserError, match="--optimizer"):
        apply_defaults(values(tmp_path), None, tmp_path)


def test_names_map_onto_the_trainer_and_build_real_training_arguments(tmp_path):
    _, _, plan = planned(tmp_path, learning_rate_scheduler="warmup_constant", optimizer="adamw_hf",
                         save_total_limit="-1", max_steps="7", precision="16")
    args = TrainingArguments(**plan.training_args)
    assert args.lr_scheduler_type.value == "constant_with_warmup"
    assert args.optim.value == "adamw_torch_fused"
    assert args.save_total_limit is None and args.max_steps == 7
    assert args.load_best_model_at_end and args.metric_for_best_model == "accuracy"
    assert args.greater_is_better and args.bf16 and not args.fp16
    assert args.average_tokens_across_devices is False


def test_loss_is_lower_is_better(tmp_path):
    _, _, plan = planned(tmp_path, metric_for_best_model="loss")
    assert plan.training_args["greater_is_better"] is False


def test_iou_metric_refused_for_multiclass(tmp_path):
    with pytest.raises(UserError, match="--metric_for_best_model: iou_micro is for multi-label"):
        planned(tmp_path, metric_for_best_model="iou_micro")


def test_label_smoothing_reset_for_multilabel_with_a_note(tmp_path):
    v, _, plan = planned(tmp_path, task_name=ML, label_smoothing_factor="0.2")
    assert plan.training_args["label_smoothing_factor"] == 0.0
    assert any("label_smoothing_factor 0.2 reset to 0" in n for n in plan.notes)


def test_mismatched_strategies_are_aligned_and_stated(tmp_path):
    _, _, plan = planned(tmp_path, evaluation_strategy="steps", evaluation_steps="10",
                         save_strategy="epoch", save_steps="15")
    a = plan.training_args
    assert (a["save_strategy"], a["save_steps"]) == ("steps", 10)
    TrainingArguments(**a)  # the Trainer accepts what we made of it
    _, _, plan = planned(tmp_path, evaluation_strategy="steps", evaluation_steps="10",
                         save_strategy="steps", save_steps="15")
    assert plan.training_args["save_steps"] == 20
    assert any("raised to 20" in n for n in plan.notes)
    TrainingArguments(**plan.training_args)


def test_extra_optim_args_parse_and_win(tmp_path):
    assert parse_extra_optim_args('"momentum=0.5; nesterov=True"') == {"momentum": 0.5, "nesterov": True}
    _, _, plan = planned(tmp_path, optimizer="sgd", weight_decay="0.1",
                         extra_optim_args="momentum=0.9; nesterov=true; weight_decay=0.01")
    a = plan.training_args
    assert a["weight_decay"] == 0.01 and a["optim"] == "sgd"
    assert a["optim_args"] == "momentum=0.9,nesterov=True"


def test_extra_optim_args_reach_the_real_optimizer(tmp_path):
    import torch
    from transformers import Trainer

    _, _, plan = planned(tmp_path, optimizer="sgd", extra_optim_args="momentum=0.5; nesterov=True")
    model = torch.nn.Linear(2, 2)
    trainer = Trainer(model=model, args=TrainingArguments(**plan.training_args), eval_dataset=[0])
    opt = trainer.create_optimizer()
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("text,match", [
    ("momentum", "cannot read 'momentum'"),
    ("momentum=fast", "not a number"),
])
def test_unparsable_extra_optim_args(text, match):
    with pytest.raises(UserError, match=match):
        parse_extra_optim_args(text)


def test_extra_optim_args_keys_checked_against_optimizer(tmp_path):
    with pytest.raises(UserError, match="momentum not accepted for this optimizer"):
        planned(tmp_path, optimizer="adamw", extra_optim_args="momentum=0.9")


def test_adamw_ort_fused_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="adamw_ort_fused needs --apply_ort true"):
        planned(tmp_path, optimizer="adamw_ort_fused")
    with pytest.raises(UserError, match="ONNX Runtime training"):
        planned(tmp_path, optimizer="adamw_ort_fused", apply_ort="true")


def test_deepspeed_config_must_be_json(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{stage: 2")
    with pytest.raises(UserError, match="invalid JSON in deepspeed config file"):
        planned(tmp_path, apply_deepspeed="true", deepspeed_config=str(bad))
    bad.write_text("[1]")
    with pytest.raises(UserError, match="must hold a JSON object"):
        read_deepspeed_config(str(bad))


# DeepSpeed: the configuration's checks and the rule "the component's inputs win" (no deepspeed
# package needed; tests/training/test_deepspeed.py runs it).
from visiontune.training import deepspeed as ds  # noqa: E402


def ds_args(tmp_path, **over):
    return planned(tmp_path, **over)[2].training_args


def test_builtin_deepspeed_config_is_zero2_with_everything_from_the_inputs(tmp_path):
    config, notes = ds.merge(None, ds_args(tmp_path), world_size=2)
    assert config == ds.DEFAULT_CONFIG and config is not ds.DEFAULT_CONFIG and notes == []
    assert config["zero_optimization"] == {"stage": 2}
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert config[key] == "auto"
    assert config["fp16"] == {"enabled": "auto"} and config["bf16"] == {"enabled": "auto"}
    assert "optimizer" not in config and "scheduler" not in config  # the inputs' are used


def test_deepspeed_config_values_that_differ_from_the_inputs_are_replaced_with_a_note(tmp_path):
    user = {
        "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
        "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 4,
        "train_batch_size": 256, "gradient_clipping": 1.0,
        "fp16": {"enabled": True, "loss_scale": 0}, "bf16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "betas": [0.9, 0.999], "eps": "auto",
                                                  "weight_decay": 0.5}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
    }
    args = ds_args(tmp_path, training_batch_size="8", gradient_accumulation_step="2",
                   learning_rate="0.001", max_grad_norm="1.0")
    config, notes = ds.merge(user, args, world_size=2)
    text = "\n".join(notes)
    assert "train_micro_batch_size_per_gpu 32 replaced by 8 (training_batch_size)" in text
    assert "gradient_accumulation_steps 4 replaced by 2 (gradient_accumulation_step)" in text
    assert ("train_batch_size 256 replaced by 32 (training_batch_size 8 x gradient_accumulation_step "
            "2 x 2 process(es))") in text
    assert "gradient_clipping" not in text  # equal to max_grad_norm: nothing to say
    assert "fp16.enabled true replaced by false (precision 32)" in text
    assert "optimizer.params.lr 0.1 replaced by 0.001" in text
    assert "optimizer.params.weight_decay 0.5 replaced by 0.0" in text
    assert "betas" not in text  # equal to the inputs' (0.9, 0.999)
    assert "scheduler WarmupLR removed: learning_rate_scheduler (cosine)" in text
    assert len(notes) == 7
    # Replaced values become "auto": the Trainer fills them from the inputs.
    assert config["train_micro_batch_size_per_gpu"] == config["train_batch_size"] == "auto"
    assert config["fp16"] == {"enabled": "auto", "loss_scale": 0}
    assert config["optimizer"]["params"] == {"lr": "auto", "betas": "auto", "eps": "auto",
                                             "weight_decay": "auto"}
    assert "scheduler" not in config
    # What the inputs do not decide stays the configuration's.
    assert config["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    assert user["train_micro_batch_size_per_gpu"] == 32  # the caller's dict is left alone


def test_deepspeed_optimizer_of_another_kind_gives_way_to_the_optimizer_input(tmp_path):
    user = {"optimizer": {"type": "Lamb", "params": {"lr": 0.01}}, "zero_optimization": {"stage": 2}}
    config, notes = ds.merge(user, ds_args(tmp_path, optimizer="sgd"), world_size=1)
    assert "optimizer" not in config
    assert notes == ["deepspeed_config: optimizer Lamb removed: the optimizer input (sgd) decides; "
                     "the Trainer builds it and ZeRO partitions it"]
    # Adam in DeepSpeed's AdamW mode runs adamw; with weight decay the note says how it differs.
    user = {"optimizer": {"type": "Adam", "params": {}}}
    config, notes = ds.merge(user, ds_args(tmp_path, optimizer="adamw", weight_decay="0.01"), 1)
    assert config["optimizer"]["type"] == "Adam"
    assert any("applies weight_decay to every weight" in n for n in notes)


def test_deepspeed_precision_follows_the_precision_input(tmp_path):
    user = {"bf16": {"enabled": True}, "fp16": {"enabled": False}}
    gpu_fp16 = planned(tmp_path, precision="16")[2].training_args | {"bf16": False, "fp16": True}
    _, notes = ds.merge(user, gpu_fp16, 1)
    assert notes == ["deepspeed_config: fp16.enabled false replaced by true (precision 16)",
                     "deepspeed_config: bf16.enabled true replaced by false (precision 16 runs as fp16)",
                     "deepspeed: precision 16 runs as DeepSpeed's fp16 (its loss scaling): weights and "
                     "buffers, batch norm's included, in fp16"]
    cpu = ds_args(tmp_path, precision="16")  # bf16 on the CPU
    config, notes = ds.merge({"fp16": {"enabled": True}}, cpu, 1)
    assert notes == ["deepspeed_config: fp16.enabled true replaced by false (precision 16 runs as bf16)",
                     "deepspeed: precision 16 runs as bf16 autocast (torch_autocast): the weights, "
                     "batch norm's included, stay float32"]
    assert config["bf16"] == config["fp16"] == {"enabled": False}
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    emulated = ds_args(tmp_path, precision="16", cpu=CpuKind("AVX2", native_bf16=False))
    assert not emulated["bf16"] and not emulated.get("fp16")  # float32 there (hardware.py)


def test_zero3_saves_whole_weights(tmp_path):
    config, notes = ds.merge({"zero_optimization": {"stage": 3}}, ds_args(tmp_path), 1)
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save set to true" in notes[0]


@pytest.mark.parametrize("config,match", [
    ({"model": "resnet", "lr": 0.1}, "not a DeepSpeed configuration (it sets lr, model"),
    ({}, "not a DeepSpeed configuration"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage must be 0, 1, 2 or 3 (got 5)"),
    ({"zero_optimization": {"stage": "2"}}, 'zero_optimization.stage must be 0, 1, 2 or 3 (got "2")'),
    ({"zero_optimization": True}, 'zero_optimization must be an object like {"stage": 2}'),
    ({"train_micro_batch_size_per_gpu": 0}, 'must be a positive integer or "auto" (got 0)'),
    ({"train_batch_size": "16"}, 'train_batch_size must be a positive integer or "auto"'),
    ({"gradient_clipping": -1}, "gradient_clipping must be a number >= 0"),
    ({"fp16": {"enabled": "yes"}}, 'fp16.enabled must be true, false or "auto"'),
    ({"optimizer": {"params": {}}}, 'optimizer needs a "type"'),
])
def test_a_file_that_is_not_a_deepspeed_config_is_one_line_before_training(tmp_path, config, match):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=re.escape(match)):
        planned(tmp_path, apply_deepspeed="true", deepspeed_config=str(path))


def test_unknown_deepspeed_keys_are_reported(tmp_path):
    notes = ds.validate({"zero_optimisation": {"stage": 2}, "fp16": {"enabled": "auto"}}, "x.json")
    assert notes == ["deepspeed_config: zero_optimisation not DeepSpeed setting(s) (a typo?); "
                     "DeepSpeed ignores them"]


def test_missing_deepspeed_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(UserError) as info:
        planned(tmp_path, apply_deepspeed="true")
    assert str(info.value) == 'apply_deepspeed needs the deepspeed package: pip install "visiontune[deepspeed]"'


@pytest.mark.parametrize("user", [None, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}])
def test_deepspeed_bf16_keeps_float32_weights_through_torch_autocast(tmp_path, user):
    """Precision 16 as bf16 under DeepSpeed: its engine autocasts and the Trainer's bf16 is off
    (DeepSpeed's bf16 section would cast batch norm's weights but not its statistics)."""
    from visiontune.training.deepspeed import autocast_16bit

    args = ds_args(tmp_path, precision="16")
    config, _ = ds.merge(user, args, 1)
    assert autocast_16bit(config) and config["bf16"]["enabled"] is False
    assert not autocast_16bit(ds.merge(user, ds_args(tmp_path), 1)[0])  # precision 32
    config, notes = ds.merge({"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True}},
                             ds_args(tmp_path), 1)
    assert config["torch_autocast"]["enabled"] is False
    assert "torch_autocast.enabled true replaced by false (precision 32)" in notes[0]


def test_deepspeed_fp16_casts_the_buffers_with_the_weights(tmp_path):
    gpu_fp16 = planned(tmp_path, precision="16")[2].training_args | {"bf16": False, "fp16": True}
    config, _ = ds.merge(None, gpu_fp16, 1)
    assert config["data_types"] == {"buffer_dtype": "fp16"} and "torch_autocast" not in config
    config, _ = ds.merge({"data_types": {"buffer_dtype": "fp32"}}, gpu_fp16, 1)
    assert config["data_types"] == {"buffer_dtype": "fp32"}  # the file's own choice


def test_the_loader_and_optimizer_switches_reach_the_training_arguments(tmp_path, monkeypatch):
    """VISIONTUNE_FUSED_ADAMW, _LOADER_PREFETCH and _PERSISTENT_WORKERS: the benchmark's levers
    are the declared switches, and each one changes what the Trainer gets."""
    _, _, plan = planned(tmp_path, optimizer="adamw", number_of_workers="2")
    args = plan.training_args
    assert (args["optim"], args["dataloader_prefetch_factor"], args["dataloader_persistent_workers"]) \
        == ("adamw_torch_fused", 2, True)
    monkeypatch.setenv("VISIONTUNE_FUSED_ADAMW", "0")
    monkeypatch.setenv("VISIONTUNE_LOADER_PREFETCH", "4")
    monkeypatch.setenv("VISIONTUNE_PERSISTENT_WORKERS", "0")
    _, _, plan = planned(tmp_path, optimizer="adamw", number_of_workers="2",
                         extra_optim_args="beta2=0.99")
    args = plan.training_args
    assert (args["optim"], args["dataloader_prefetch_factor"], args["dataloader_persistent_workers"]) \
        == ("adamw_torch", 4, False)
    assert args["adam_beta2"] == 0.99  # the fused optimizer's extra keys hold for the loop too
    _, _, plan = planned(tmp_path, number_of_workers="0")
    assert plan.training_args["dataloader_prefetch_factor"] is None  # torch refuses it without workers
