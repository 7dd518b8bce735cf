"""Run ``visiontune`` (``visiontune.cli.main``, in this fresh process) with one of its speed-ups
turned off or a loader setting changed, to measure what each is worth.

    python -m benchmarks.levers nchw,foreach_adamw finetune --model_path ... (CLI args)

Levers (comma-separated, or ``none``):

* ``nchw``: CNNs stay in the default NCHW memory format (visiontune trains and predicts with
  CNNs in channels-last format, ``models.loading.prefer_channels_last``).
* ``foreach_adamw``: the ``adamw``/``adamw_hf`` inputs run as Trainer's ``adamw_torch`` (a
  loop over tensors) instead of ``adamw_torch_fused``.
* ``prefetch4``: the data loader keeps 4 batches per worker in flight instead of 2.
* ``nopersist``: data-loader workers are not kept between loaders.
* ``v2_transforms``: images go through torchvision's ``v2.Compose`` (its dispatch and its hue
  kernel) instead of ``visiontune.data.transforms.Compose``'s direct kernel calls.
* ``glibc_arenas``: malloc keeps glibc's own arena count (``visiontune.malloc`` sets one
  arena); its thresholds stay tuned.
* ``ceiling_in_process``: not a speed-up turned off but a measurement added. Right before and
  right after training, this same process times the ceiling's step (``ceiling.py``) on a copy
  of the model being trained, with visiontune's compute settings, synthetic tensors of the
  training batch's shape and a fused AdamW of its own; the rates go, one JSON line each, to
  the file named by ``BENCH_CEILING_FILE``. Training is unchanged (the timing draws from a
  forked random state; the copy and its optimizer are dropped and the heap trimmed before the
  first step), so the run's own rate over the two ceiling rates is an a/c that the machine's
  drift between processes does not move.
"""

from __future__ import annotations

import sys

LEVERS = ("nchw", "foreach_adamw", "prefetch4", "nopersist", "v2_transforms", "glibc_arenas",
          "ceiling_in_process")


def apply(levers: list[str]) -> None:
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise SystemExit(f"unknown lever(s): {', '.join(unknown)}; known: {', '.join(LEVERS)}")
    if "nchw" in levers:
        from visiontune.models import loading

        loading.prefer_channels_last = lambda model: model
    if "foreach_adamw" in levers:
        from visiontune.training import arguments

        for name in ("adamw", "adamw_hf"):
            arguments.OPTIMIZER_NAMES[name] = "adamw_torch"
        arguments.EXTRA_OPTIM_KEYS["adamw_torch"] = arguments.EXTRA_OPTIM_KEYS["adamw_torch_fused"]
    if "v2_transforms" in levers:
        from torchvision.transforms import v2

        from visiontune.data import transforms

        transforms.Compose.forward = v2.Compose.forward
    if "glibc_arenas" in levers:
        from visiontune import malloc

        malloc.ARENA_MAX = 0  # glibc's mallopt ignores 0 for M_ARENA_MAX (and reports success)
    if "ceiling_in_process" in levers:
        _time_ceiling_around_training()
    if "prefetch4" in levers or "nopersist" in levers:
        from visiontune.training import arguments

        original_plan = arguments.plan_training

        def plan_training(*args, **kwargs):
            plan = original_plan(*args, **kwargs)
            if plan.training_args.get("dataloader_num_workers", 0) > 0:
                if "prefetch4" in levers:
                    plan.training_args["dataloader_prefetch_factor"] = 4
                if "nopersist" in levers:
                    plan.training_args["dataloader_persistent_workers"] = False
            return plan

        arguments.plan_training = plan_training
        import visiontune.training.finetune as finetune_module

        finetune_module.plan_training = plan_training


def _time_ceiling_around_training() -> None:
    import copy
    import gc
    import json
    import os

    from visiontune import malloc

    from . import ceiling
    from visiontune.training import trainer as trainer_module

    target = os.environ["BENCH_CEILING_FILE"]
    steps = int(os.environ.get("BENCH_CEILING_STEPS", "12"))
    original_train = trainer_module.VisionTrainer.train

    def time_ceiling(trainer, when: str) -> None:
        import torch

        # The sample's augmentation and the copy's dropout draw from torch's random state;
        # training starts from the state it would have had.
        with torch.random.fork_rng(devices=[]):
            result = _time(trainer)
        with open(target, "a") as f:
            f.write(json.dumps({"when": when, **result}) + "\n")
        gc.collect()
        malloc.release()

    def _time(trainer) -> dict:
        model = copy.deepcopy(trainer.model).train()  # channels-last stays channels-last
        batch = trainer.args.per_device_train_batch_size
        shape = trainer.train_dataset[0]["pixel_values"].shape
        pixels, labels = ceiling.synthetic_batch(batch, shape, model.config.num_labels)
        optimizer = ceiling.adamw(model, fused=True)
        bf16 = bool(trainer.args.bf16)
        step = ceiling.make_step(model, model, optimizer, pixels, labels, bf16,
                                 bf16 and trainer.args.device.type == "cpu", inplace_hardtanh_on=True)
        return ceiling.time_steps(step, 2, steps, batch)

    def train(self, *args, **kwargs):
        time_ceiling(self, "before")
        output = original_train(self, *args, **kwargs)
        time_ceiling(self, "after")
        return output

    trainer_module.VisionTrainer.train = train


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    levers = [] if argv[0] in ("", "none") else argv[0].split(",")
    apply(levers)
    from visiontune.cli import main as cli_main

    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
