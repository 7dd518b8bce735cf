"""How visiontune scales with the number of images: the same small-image dataset at several
sizes, each measured as users run it (``visiontune data check``, then ``visiontune finetune``
for a fixed number of steps), in fresh processes. See BENCHMARKS.md ("Scale").

    python -m benchmarks.scale --sizes 10000,100000,1000000 --root /tmp/vt-scale

With ``--remote N``, the size-N dataset is also uploaded to a local S3 server (moto, as in the
tests) and fine-tuned from there: the same measures, for a ratio against local files. With
``--uncached N``, the size-N dataset is fine-tuned again with the decoded-image cache limited
to a tenth of what it needs, so that most images are decoded from their files at each use.
With ``--again N``, the size-N dataset is measured once more with the caches the first
measurement left and ``VISIONTUNE_REUSE_IMAGE_CHECK=1``: a user's second run.

Per size: the data check's throughput (images read and decoded per second, whole command)
and peak memory; the fine-tune's time from start to its first training step, its steady
training throughput (steps ``--steps``/2 .. ``--steps``), its peak memory (PSS of the process
tree, data-loader workers included) and the disk the decoded-image cache took. Images are
32x32 JPEGs of 10 colour classes with noise, 1000 to a folder, written once per size (about
1 KB each) and reused.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .measure import run_measured

CLASSES = 10
SIDE = 32
PER_FOLDER = 1000
VALIDATION = 500
MARKER = ".scale-data.json"
FORMAT = 1
STEP_LINE = re.compile(r"step (\d+)/(\d+) ")


def _render(index: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    label = index % CLASSES
    hue = np.array([np.cos(label * 0.63) + 1, np.sin(label * 0.63) + 1, (label % 3) / 2],
                   dtype=np.float32) * 110
    pixels = hue + rng.normal(0, 25, size=(SIDE, SIDE, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _write_chunk(job: tuple[str, int, int]) -> list[str]:
    folder, start, stop = job
    lines = []
    for index in range(start, stop):
        name = f"images/{index // PER_FOLDER:05d}/{index:07d}.jpg"
        (Path(folder) / name).write_bytes(_render(index))
        lines.append(json.dumps({"image_url": name, "label": f"c{index % CLASSES}"}))
    return lines


def write_split(folder: Path, first: int, count: int) -> Path:
    """``count`` images numbered from ``first`` and ``images.jsonl``; reused when complete."""
    marker = folder / MARKER
    params = {"format": FORMAT, "first": first, "count": count}
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for sub in range(first // PER_FOLDER, (first + count - 1) // PER_FOLDER + 1):
        (folder / "images" / f"{sub:05d}").mkdir(parents=True, exist_ok=True)
    step = 5000
    jobs = [(str(folder), s, min(s + step, first + count)) for s in range(first, first + count, step)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool, \
            (folder / "images.jsonl").open("w", encoding="utf-8") as out:
        for lines in pool.map(_write_chunk, jobs):
            out.write("".join(line + "\n" for line in lines))
    marker.write_text(json.dumps(params))
    return folder


def folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            total += path.stat().st_blocks * 512
    return total


def upload(folder: Path, bucket: str) -> str:
    """The split folder (images and images.jsonl) copied into ``bucket``; its S3 URI."""
    import s3fs

    fs = s3fs.S3FileSystem()
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(folder / "images"), f"{bucket}/data/images", recursive=True)
    fs.put_file(str(folder / "images.jsonl"), f"{bucket}/data/images.jsonl")
    return f"s3://{bucket}/data/images.jsonl"


def seconds_per_step(metrics: Path, first: int, last: int) -> float:
    """Training time per step between two logged steps, from the training log's own clock
    (the evaluation and saving at the last step come after its line)."""
    elapsed = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            elapsed.setdefault(row["step"], row["elapsed_s"])
    return (elapsed[last] - elapsed[first]) / (last - first)


def measure_size(root: Path, n: int, steps: int, batch: int, model: Path,
                 remote_env: dict | None = None, cache_gb: float | None = None,
                 again: bool = False) -> dict:
    data = write_split(root / f"train-{n}", 0, n) / "images.jsonl"
    data_mb = round(folder_bytes(data.parent) / 2**20)
    validation = write_split(root / "validation", 10_000_000, VALIDATION) / "images.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "VISIONTUNE_IMAGE_CACHE_DIR": str(root / f"decoded-{n}"),
           "VISIONTUNE_CACHE_DIR": str(root / f"downloads-{n}")}
    if again:
        env["VISIONTUNE_REUSE_IMAGE_CHECK"] = "1"
    else:
        shutil.rmtree(root / f"decoded-{n}", ignore_errors=True)
        shutil.rmtree(root / f"downloads-{n}", ignore_errors=True)
    if remote_env is not None:
        env.update(remote_env)
        data = upload(data.parent, f"scale-{n}")
    if cache_gb is not None:
        env["VISIONTUNE_IMAGE_CACHE_MAX_GB"] = str(cache_gb)
    cli = [sys.executable, "-m", "visiontune"]

    check = run_measured(cli + ["data", "check", "--data", str(data), "--task_name",
                                "image-classification"], root / f"check-{n}.log", env=env)
    out = root / (f"out-{n}-s3" if remote_env is not None else
                  f"out-{n}-uncached" if cache_gb is not None else
                  f"out-{n}-again" if again else f"out-{n}")
    shutil.rmtree(out, ignore_errors=True)
    run = run_measured(cli + [
        "finetune", "--model_path", str(model), "--training_data", str(data),
        "--validation_data", str(validation), "--task_name", "image-classification",
        "--output_dir_pytorch", str(out), "--save_as_mlflow_model", "false",
        "--image_height", str(SIDE), "--image_width", str(SIDE), "--max_steps", str(steps),
        "--training_batch_size", str(batch), "--validation_batch_size", "128",
        "--logging_strategy", "steps", "--logging_steps", "10", "--evaluation_strategy", "steps",
        "--evaluation_steps", str(steps), "--save_strategy", "steps", "--save_steps", str(steps),
        "--number_of_workers", "2", "--apply_augmentations", "true"],
        root / f"finetune-{n}.log", env=env)
    if check.returncode != 0 or run.returncode != 0:
        raise SystemExit(f"size {n}: a command failed; see {root}/check-{n}.log and "
                         f"{root}/finetune-{n}.log")
    first_t, first_step = next((t, int(m[1])) for t, line in run.lines
                               if (m := STEP_LINE.search(line)))
    per_step = seconds_per_step(out / "metrics.jsonl", steps // 2, steps)
    return {
        "images": (f"{n} (S3)" if remote_env is not None
                   else f"{n} (cache {cache_gb:.3g} GB)" if cache_gb is not None
                   else f"{n} (again)" if again else n),
        "check_images_per_s": round(n / check.wall_s, 1),
        "check_peak_mb": round(check.peak_tree_mb),
        # The first step line comes at step 10: take back the steps before it.
        "first_step_s": round(first_t - (first_step - 1) * per_step, 1),
        "train_images_per_s": round(batch / per_step, 1),
        "finetune_peak_mb": round(run.peak_tree_mb),
        "decoded_cache_mb": round(folder_bytes(root / f"decoded-{n}") / 2**20),
        "data_mb": data_mb,
        "finetune_wall_s": round(run.wall_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--root", default="/tmp/vt-scale")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--remote", type=int, help="also train this size from a local S3 server")
    parser.add_argument("--uncached", type=int,
                        help="also train this size with the cache limited to a tenth of it")
    parser.add_argument("--again", type=int,
                        help="also measure this size again, with its caches and the check reused")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    model = root / "model"
    if not (model / "model_selector_args.json").is_file():
        import visiontune

        visiontune.import_model(model_name="efficientnet-lite0", output_dir=model)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        started = time.monotonic()
        results.append(measure_size(root, n, args.steps, args.batch, model))
        print(json.dumps(results[-1]), f"({time.monotonic() - started:.0f} s)", flush=True)
    if args.remote:
        from tests.stores import s3_server  # the test suite's local S3 server

        with s3_server(root) as remote_env:
            os.environ.update(remote_env)
            results.append(measure_size(root, args.remote, args.steps, args.batch, model,
                                        remote_env))
        print(json.dumps(results[-1]), flush=True)
    if args.uncached:
        # A shrink-plan entry of a 32 px image holds 32*32*3 bytes and a 128-byte header.
        tenth = args.uncached * (SIDE * SIDE * 3 + 128) / 10 / 2**30
        results.append(measure_size(root, args.uncached, args.steps, args.batch, model,
                                    cache_gb=tenth))
        print(json.dumps(results[-1]), flush=True)
    if args.again:
        results.append(measure_size(root, args.again, args.steps, args.batch, model, again=True))
        print(json.dumps(results[-1]), flush=True)
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---:|" * len(keys))
    for row in results:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
