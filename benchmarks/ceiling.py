"""The ceiling: a model's training step on synthetic tensors already in memory.

No data loading, no Trainer: forward, loss, backward, gradient clipping (the Trainer's
``max_grad_norm`` 1.0) and an AdamW step, at the given precision and batch size. Whatever a
real run loses against this is data loading and framework overhead. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--num_labels", type=int, default=8)
    parser.add_argument("--image_size", type=int, required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--precision", type=int, choices=(16, 32), default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--fused_adamw", action="store_true")
    parser.add_argument("--fast_depthwise", action="store_true",
                        help="visiontune's depthwise-convolution backward (bfloat16 on the CPU)")
    parser.add_argument("--inplace_hardtanh", action="store_true",
                        help="visiontune's in-place ReLU6 that saves its output, not a copy of its input")
    parser.add_argument("--malloc_tuning", action="store_true",
                        help="visiontune's glibc malloc thresholds (visiontune.malloc)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (the "
                        "first, compiling steps are reported apart)")
    args = parser.parse_args(argv)
    if args.compile and (args.fast_depthwise or args.inplace_hardtanh):
        parser.error("--compile cannot trace --fast_depthwise or --inplace_hardtanh (TorchFunctionModes)")

    if args.malloc_tuning:
        from visiontune import malloc

        malloc.tune()
    import torch
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    model = AutoModelForImageClassification.from_pretrained(
        args.model_path, num_labels=args.num_labels, ignore_mismatched_sizes=True).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = adamw(model, args.fused_adamw)
    forward = torch.compile(model) if args.compile else model
    pixels, labels = synthetic_batch(args.batch_size, (3, args.image_size, args.image_size), args.num_labels)

    step = make_step(model, forward, optimizer, pixels, labels, args.precision == 16, args.fast_depthwise,
                     args.inplace_hardtanh)
    print(json.dumps(time_steps(step, args.warmup, args.steps, args.batch_size)))
    return 0


def adamw(model, fused: bool):
    """AdamW with the benchmark runs' learning rate and weight decay: fused, or a loop over
    tensors."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4,
                             **({"fused": True} if fused else {"foreach": False}))


def synthetic_batch(batch_size: int, shape: tuple[int, ...], num_labels: int):
    """The same random pixels (``batch_size`` images of ``shape``) and labels in every run."""
    import torch

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, *shape, generator=generator)
    return pixels, torch.randint(0, num_labels, (batch_size,), generator=generator)


def make_step(model, forward, optimizer, pixels, labels, bf16: bool, fast_depthwise_on: bool,
              inplace_hardtanh_on: bool):
    """One training step on fixed tensors: forward and loss (bf16 autocast when asked), backward,
    clipping to norm 1.0, the optimizer's step."""
    import torch

    from visiontune.models.depthwise import fast_depthwise
    from visiontune.models.hardtanh import inplace_hardtanh

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), fast_depthwise(fast_depthwise_on), \
                inplace_hardtanh(inplace_hardtanh_on):
            loss = forward(pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step, warmup: int, steps: int, batch_size: int) -> dict:
    """Runs ``warmup`` untimed steps, then ``steps`` timed ones; the rate and the timings."""
    warmup_start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_seconds = time.perf_counter() - warmup_start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"images_per_second": steps * batch_size / seconds, "seconds": seconds, "steps": steps,
            "batch_size": batch_size, "warmup_steps": warmup, "warmup_seconds": warmup_seconds}


if __name__ == "__main__":
    raise SystemExit(main())
