"""Hugging Face's example recipe for image classification, run as a user runs it.

A re-implementation, for this benchmark, of transformers' Trainer example
``examples/pytorch/image-classification/run_image_classification.py``: the same command-line
arguments (ModelArguments, DataTrainingArguments and all of TrainingArguments), the same data
path (``datasets``' ``imagefolder`` loader; every image decoded with PIL when its sample is
drawn, through ``set_transform``), the same torchvision transforms (RandomResizedCrop,
RandomHorizontalFlip, ToTensor, Normalize for training; Resize, CenterCrop, ToTensor,
Normalize for evaluation), the same collate function and the Trainer's defaults.

Where it has to differ, offline:

* accuracy is computed with numpy: the recipe's ``evaluate.load("accuracy")`` downloads the
  metric script from the hub (same formula: mean of argmax == label);
* without the ``datasets`` package, an ``ImageFolderDataset`` below lists the same folder tree
  and decodes each image with PIL when it is drawn (the recipe's behaviour, without Arrow);
* ``--bench_timing_file``: measurement only; a callback writes when each logged step ended.

Example (the recipe's README flags)::

    python -m benchmarks.hf_recipe --model_name_or_path MODEL --train_dir DATA/train/images \\
        --validation_dir DATA/validation/images --output_dir out --remove_unused_columns False \\
        --do_train --do_eval --eval_strategy epoch --save_strategy epoch \\
        --load_best_model_at_end True --save_total_limit 3 --ignore_mismatched_sizes True
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import (
    CenterCrop, Compose, Lambda, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize,
    ToTensor,
)

import transformers
from transformers import (
    AutoConfig, AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser, Trainer,
    TrainerCallback, TrainingArguments, set_seed,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A hub dataset name."})
    dataset_config_name: Optional[str] = field(default=None)
    train_dir: Optional[str] = field(default=None, metadata={"help": "A folder of training images."})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "A folder of validation images."})
    train_val_split: Optional[float] = field(default=0.15, metadata={"help": "Validation share when no validation_dir."})
    max_train_samples: Optional[int] = field(default=None)
    max_eval_samples: Optional[int] = field(default=None)
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    bench_timing_file: Optional[str] = field(default=None, metadata={"help": "Measurement only."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None and self.validation_dir is None:
            raise ValueError("You must specify either a dataset name from the hub or a train and/or validation directory.")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="google/vit-base-patch16-224-in21k")
    model_type: Optional[str] = field(default=None)
    config_name: Optional[str] = field(default=None)
    cache_dir: Optional[str] = field(default=None)
    model_revision: str = field(default="main")
    image_processor_name: Optional[str] = field(default=None)
    token: Optional[str] = field(default=None)
    trust_remote_code: bool = field(default=False)
    ignore_mismatched_sizes: bool = field(default=False)


class ImageFolderDataset(torch.utils.data.Dataset):
    """``imagefolder`` without ``datasets``: class = sub-folder name, images decoded per sample."""

    def __init__(self, root: str):
        root_path = Path(root)
        self.names = sorted(p.name for p in root_path.iterdir() if p.is_dir())
        self.files = [(str(f), i) for i, name in enumerate(self.names)
                      for f in sorted((root_path / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        self._transform = None

    def set_transform(self, transform) -> None:
        self._transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path, label = self.files[index]
        batch = {"image": [Image.open(path)], "label": [label]}
        if self._transform is not None:
            batch = self._transform(batch)
        return {k: v[0] for k, v in batch.items()}


def load_image_folders(data_args, model_args) -> tuple[dict, list[str]]:
    try:
        from datasets import load_dataset
    except ImportError:
        dataset = {}
        if data_args.train_dir is not None:
            dataset["train"] = ImageFolderDataset(data_args.train_dir)
        if data_args.validation_dir is not None:
            dataset["validation"] = ImageFolderDataset(data_args.validation_dir)
        return dataset, dataset["train"].names
    if data_args.dataset_name is not None:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name,
                               cache_dir=model_args.cache_dir, token=model_args.token)
    else:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    # Split off a share of the training data when there is no validation split.
    split_share = None if "validation" in dataset.keys() else data_args.train_val_split
    if isinstance(split_share, float) and split_share > 0.0:
        split = dataset["train"].train_test_split(split_share)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    return dataset, dataset["train"].features[data_args.label_column_name].names


class StepTimes(TrainerCallback):
    """Measurement only: (global step, seconds since training began) at each log."""

    def __init__(self, path: str):
        self.path, self.records, self.start = path, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.start is not None and logs:
            self.records.append({"step": state.global_step, "elapsed_s": time.monotonic() - self.start,
                                 "keys": sorted(logs)})

    def on_train_end(self, args, state, control, **kwargs):
        Path(self.path).write_text(json.dumps(self.records), encoding="utf-8")


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info(f"Training/evaluation parameters {training_args}")

    set_seed(training_args.seed)
    dataset, labels = load_image_folders(data_args, model_args)
    label2id = {label: str(i) for i, label in enumerate(labels)}
    id2label = {str(i): label for i, label in enumerate(labels)}

    def compute_metrics(p):
        """Accuracy on a batch of predictions."""
        return {"accuracy": float(np.mean(np.argmax(p.predictions, axis=1) == p.label_ids))}

    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path, num_labels=len(labels),
        label2id=label2id, id2label=id2label, finetuning_task="image-classification",
        cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
        token=model_args.token, trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )

    # Torchvision transforms, applied to each image when its sample is drawn.
    if "shortest_edge" in image_processor.size:
        size = image_processor.size["shortest_edge"]
    else:
        size = (image_processor.size["height"], image_processor.size["width"])
    normalize = (
        Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
        if hasattr(image_processor, "image_mean") and hasattr(image_processor, "image_std")
        else Lambda(lambda x: x)
    )
    _train_transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
    _val_transforms = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

    def train_transforms(example_batch):
        example_batch["pixel_values"] = [
            _train_transforms(image.convert("RGB")) for image in example_batch[data_args.image_column_name]
        ]
        return example_batch

    def val_transforms(example_batch):
        example_batch["pixel_values"] = [
            _val_transforms(image.convert("RGB")) for image in example_batch[data_args.image_column_name]
        ]
        return example_batch

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels_ = torch.tensor([example[data_args.label_column_name] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels_}

    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train requires a train dataset")
        if data_args.max_train_samples is not None:
            dataset["train"] = dataset["train"].shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
        dataset["train"].set_transform(train_transforms)
    if training_args.do_eval:
        if "validation" not in dataset:
            raise ValueError("--do_eval requires a validation dataset")
        if data_args.max_eval_samples is not None:
            dataset["validation"] = dataset["validation"].shuffle(seed=training_args.seed).select(range(data_args.max_eval_samples))
        dataset["validation"].set_transform(val_transforms)

    callbacks = [StepTimes(data_args.bench_timing_file)] if data_args.bench_timing_file else None
    trainer = Trainer(
        model=model, args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics, processing_class=image_processor, data_collator=collate_fn,
        callbacks=callbacks,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
