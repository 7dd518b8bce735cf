"""Run ``visiontune`` (``visiontune.cli.main``, in this fresh process) with one of its speed-ups
turned off or a loader setting changed, to measure what each is worth.

    python -m benchmarks.levers nchw,foreach_adamw finetune --model_path ... (CLI args)

Levers (comma-separated, or ``none``), each one of visiontune's declared switches
(``visiontune.settings.SETTINGS``, docs/performance.md) set in this process's environment:

* ``nchw``: ``VISIONTUNE_CHANNELS_LAST=0``, CNNs stay in the default NCHW memory format.
* ``foreach_adamw``: ``VISIONTUNE_FUSED_ADAMW=0``, the ``adamw``/``adamw_hf`` inputs run as
  the Trainer's ``adamw_torch`` (a loop over tensors) instead of ``adamw_torch_fused``.
* ``prefetch4``: ``VISIONTUNE_LOADER_PREFETCH=4``, 4 batches per worker in flight instead of 2.
* ``nopersist``: ``VISIONTUNE_PERSISTENT_WORKERS=0``, workers are not kept between loaders.
* ``v2_transforms``: ``VISIONTUNE_DIRECT_TRANSFORMS=0``, images go through torchvision's
  ``v2.Compose`` (its dispatch and its hue kernel) instead of direct kernel calls.
* ``glibc_arenas``: ``VISIONTUNE_MALLOC_ONE_ARENA=0``, malloc keeps glibc's own arena count;
  its thresholds stay tuned.
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

import os
import sys

SWITCHES = {"nchw": ("VISIONTUNE_CHANNELS_LAST", "0"),
            "foreach_adamw": ("VISIONTUNE_FUSED_ADAMW", "0"),
            "prefetch4": ("VISIONTUNE_LOADER_PREFETCH", "4"),
            "nopersist": ("VISIONTUNE_PERSISTENT_WORKERS", "0"),
            "v2_transforms": ("VISIONTUNE_DIRECT_TRANSFORMS", "0"),
            "glibc_arenas": ("VISIONTUNE_MALLOC_ONE_ARENA", "0")}
LEVERS = (*SWITCHES, "ceiling_in_process")


def apply(levers: list[str]) -> None:
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise SystemExit(f"unknown lever(s): {', '.join(unknown)}; known: {', '.join(LEVERS)}")
    for lever in levers:
        if lever in SWITCHES:
            name, value = SWITCHES[lever]
            os.environ[name] = value
    if "ceiling_in_process" in levers:
        _time_ceiling_around_training()


def _time_ceiling_around_training() -> None:
    import copy
    import gc
    import json

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
