"""Each training input reaches the real Trainer: one tiny run with non-default values, and a
callback that looks at the optimizer, schedule, data loaders and arguments the Trainer built."""

import json

import pytest
import torch
from transformers import TrainerCallback

from tests.helpers import subset
from visiontune.config import resolve
from visiontune.inputs import FINETUNE_INPUTS, MULTICLASS
from visiontune.training.finetune import finetune


class Inspect(TrainerCallback):
    seen: dict = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, eval_dataloader=None, **kwargs):
        Inspect.seen = {"args": args, "optimizer": optimizer, "train_dataloader": train_dataloader,
                        "eval_dataloader": eval_dataloader, "lr_scheduler": lr_scheduler}


@pytest.fixture(scope="module")
def data(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return (subset(demo_dir / "digits" / "train", root / "train.jsonl", 3, per_class=True),
            subset(demo_dir / "digits" / "validation", root / "val.jsonl", 2, per_class=True))


def test_inputs_reach_the_trainer(tiny_vit, data, tmp_path):
    given = {
        "model_path": str(tiny_vit), "training_data": str(data[0]), "validation_data": str(data[1]),
        "task_name": MULTICLASS, "output_dir_pytorch": str(tmp_path / "out"),
        "image_height": 24, "image_width": 40, "number_of_epochs": 1, "number_of_workers": 1,
        "training_batch_size": 6, "validation_batch_size": 5, "optimizer": "sgd",
        "learning_rate": 0.02, "weight_decay": 0.3, "extra_optim_args": "momentum=0.7",
        "learning_rate_scheduler": "warmup_polynomial", "warmup_steps": 2, "max_grad_norm": 0.25,
        "label_smoothing_factor": 0.2, "apply_augmentations": False, "random_seed": 7,
        "save_as_mlflow_model": False,
    }
    finetune(resolve(FINETUNE_INPUTS, {k: str(v) for k, v in given.items()}), callbacks=[Inspect()])
    seen = Inspect.seen
    opt = seen["optimizer"]
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps it
    assert isinstance(opt, torch.optim.SGD)
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    assert decays == [0.0, 0.3]  # biases and norms are not decayed
    assert opt.param_groups[0]["momentum"] == 0.7
    args = seen["args"]
    assert args.max_grad_norm == 0.25 and args.label_smoothing_factor == 0.2
    assert args.lr_scheduler_type.value == "polynomial" and args.warmup_steps == 2
    assert args.seed == 7 and args.dataloader_num_workers == 1
    assert args.per_device_eval_batch_size == 5
    out = tmp_path / "out"
    batch = next(iter(seen["train_dataloader"]))
    assert batch["pixel_values"].shape[0] == 6
    assert tuple(batch["pixel_values"].shape[2:]) == (24, 40)  # image_height x image_width
    aug = json.loads((out / "augmentations.json").read_text())
    assert aug["apply_augmentations"] is False and aug["train"] == aug["eval"]
    assert not (tmp_path / "out" / "mlflow_model").exists()  # save_as_mlflow_model false
