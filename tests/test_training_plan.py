"""Defaults chain and the mapping of inputs onto TrainingArguments (no data, no model)."""

import json

import pytest
from transformers import TrainingArguments

from visiontune import inputs as I
from visiontune.errors import UserError
from visiontune.training.arguments import parse_extra_optim_args, plan_training, read_deepspeed_config
from visiontune.training.defaults import apply_defaults

MC, ML = I.TASKS


def values(tmp_path, **over):
    given = {"model_path": str(tmp_path), "training_data": "d", "task_name": MC,
             "output_dir_pytorch": str(tmp_path / "out"), **over}
    return I.resolve(I.FINETUNE_INPUTS, given)


def planned(tmp_path, model=None, **over):
    v = values(tmp_path, **over)
    v, sources = apply_defaults(v, v["task_name"], model, tmp_path)
    plan = plan_training(v, use_cpu=True, bf16_ok=False)
    return v, sources, plan


def test_defaults_precedence_user_over_model_file_over_model_over_task_over_base(tmp_path):
    (tmp_path / "model_defaults.json").write_text(json.dumps({"learning_rate": 0.01}))
    v, src = apply_defaults(values(tmp_path, warmup_steps="3"), MC, "google/vit-base-patch16-224", tmp_path)
    assert (v["warmup_steps"], src["warmup_steps"]) == (3, "user")
    assert (v["learning_rate"], src["learning_rate"]) == (0.01, "model_defaults.json")
    assert (v["training_batch_size"], src["training_batch_size"]) == (72, "model google/vit-base-patch16-224")
    assert (v["number_of_epochs"], src["number_of_epochs"]) == (15, f"task {MC}")
    assert (v["max_grad_norm"], src["max_grad_norm"]) == (1.0, "base")
    assert v["metric_for_best_model"] == "loss"  # the ViT row overrides the task's accuracy


def test_task_defaults_pick_the_primary_metric(tmp_path):
    assert apply_defaults(values(tmp_path), MC, None)[0]["metric_for_best_model"] == "accuracy"
    assert apply_defaults(values(tmp_path, task_name=ML), ML, None)[0]["metric_for_best_model"] == "iou"


def test_mobilevit_label_smoothing_is_zero_for_multilabel(tmp_path):
    assert apply_defaults(values(tmp_path), MC, "apple/mobilevit-small")[0]["label_smoothing_factor"] == 0.1
    v = apply_defaults(values(tmp_path, task_name=ML), ML, "apple/mobilevit-small")[0]
    assert v["label_smoothing_factor"] == 0.0


def test_bad_model_defaults_file_is_a_clear_error(tmp_path):
    (tmp_path / "model_defaults.json").write_text('{"optimizer": "adam"}')
    with pytest.raises(UserError, match="--optimizer"):
        apply_defaults(values(tmp_path), MC, None, tmp_path)


def test_names_map_onto_the_trainer_and_build_real_training_arguments(tmp_path):
    _, _, plan = planned(tmp_path, learning_rate_scheduler="warmup_constant", optimizer="adamw_hf",
                         save_total_limit="-1", max_steps="7", precision="16")
    args = TrainingArguments(**plan.training_args)
    assert args.lr_scheduler_type.value == "constant_with_warmup"
    assert args.optim.value == "adamw_torch"
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
