"""Helpers the tests share (fixtures are in conftest.py): demo-data subsets, the CPU-kind guard,
loopback ports."""

import json
from pathlib import Path

import pytest

from tests.stores import free_port  # noqa: F401  (one import place for the tests)


def subset(split_dir: Path, out: Path, n: int, per_class: bool = False,
           labels: tuple[str, ...] | None = None) -> Path:
    """The first ``n`` rows of a demo split as a JSON Lines file with absolute image paths
    (``per_class``: ``n`` rows of each class, for balanced tiny datasets; ``labels``: only
    rows of these classes)."""
    rows = [json.loads(l) for l in (split_dir / "images.jsonl").read_text().splitlines() if l.strip()]
    if labels is not None:
        rows = [row for row in rows if row["label"] in labels]
    chosen, counts = [], {}
    for row in rows:
        key = json.dumps(row["label"])
        if per_class:
            if counts.get(key, 0) >= n:
                continue
            counts[key] = counts.get(key, 0) + 1
        elif len(chosen) >= n:
            break
        chosen.append({**row, "image_url": str((split_dir / row["image_url"]).resolve())})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return out


def native_cpu_bf16() -> bool:
    from visiontune.hardware import cpu_kind

    return cpu_kind().native_bf16


# For tests of the bf16 paths' speed-motivated numerics, which run (and were measured) only on
# CPUs with native bf16; elsewhere visiontune trains precision 16 in float32 (hardware.py).
needs_native_bf16 = pytest.mark.skipif(
    not native_cpu_bf16(),
    reason="needs a CPU with native bf16 (AVX-512 BF16 or AMX), where visiontune's bf16 paths run; "
           "this CPU emulates bf16")


def workers_config(number_of_workers: int | None = None):
    """A finetune config (placeholder paths) whose number_of_workers is given, or chosen by the
    defaults chain (8) when None."""
    from visiontune.config import FinetuneConfig, resolve
    from visiontune.training.defaults import apply_defaults

    given = {"model_path": "m", "training_data": "d", "task_name": "image-classification",
             "output_dir_pytorch": "o"}
    if number_of_workers is not None:
        return resolve(FinetuneConfig, {**given, "number_of_workers": number_of_workers})
    return apply_defaults(resolve(FinetuneConfig, given), None)
