"""Write the benchmark's photo dataset: realistic-size JPEGs made from scikit-learn's two photos.

Each class is one quadrant of one of ``load_sample_images()``'s photos (china, flower): 8
classes. An image is a random crop around a point of its quadrant (so neighbouring classes
overlap a little), scaled to a long side of 400-1000 px, with random brightness, contrast,
saturation, sensor noise and JPEG quality. Everything is drawn from a generator seeded by
(seed, split, index), so the same arguments give byte-identical files.

Layout (an MLTable folder per split that is also an ``imagefolder`` tree for ``datasets``)::

    ROOT/train/MLTable, ROOT/train/images.jsonl, ROOT/train/images/<class>/<name>.jpg
    ROOT/validation/...

A folder holding a complete dataset of the same parameters is reused, not rewritten.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from visiontune.demo import MLTABLE  # the demo data's: JSON Lines with image_url

FORMAT = 1  # bump when the written bytes change
MARKER = ".bench-data.json"
SPLITS = ("train", "validation")
PHOTOS = ("china", "flower")
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")
CLASSES = tuple(f"{p}_{q}" for p in PHOTOS for q in QUADRANTS)
MIN_SIDE, MAX_SIDE = 400, 1000  # long side of the written images

_PHOTOS: dict[str, np.ndarray] = {}


def _photo(name: str) -> np.ndarray:
    if not _PHOTOS:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for file, image in zip(bunch.filenames, bunch.images):
            _PHOTOS[Path(file).stem] = np.asarray(image, dtype=np.uint8)
    return _PHOTOS[name]


def render(seed: int, split: str, index: int) -> tuple[str, bytes]:
    """(class name, JPEG bytes) of one image; a pure function of its arguments."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    label = CLASSES[index % len(CLASSES)]  # balanced classes
    photo_name, quadrant = label.split("_", 1)
    photo = _photo(photo_name)
    height, width = photo.shape[:2]
    qh, qw = height // 2, width // 2
    top0 = qh if quadrant.startswith("bottom") else 0
    left0 = qw if quadrant.endswith("right") else 0
    # A crop centred inside the quadrant, 55-100 % of its size, of a random aspect ratio.
    cy = top0 + rng.uniform(0.25, 0.75) * qh
    cx = left0 + rng.uniform(0.25, 0.75) * qw
    scale = rng.uniform(0.55, 1.0)
    aspect = np.exp(rng.uniform(np.log(0.75), np.log(1.5)))
    ch = min(height, scale * qh / np.sqrt(aspect) * 1.2)
    cw = min(width, scale * qw * np.sqrt(aspect))
    top = int(np.clip(cy - ch / 2, 0, height - ch))
    left = int(np.clip(cx - cw / 2, 0, width - cw))
    crop = Image.fromarray(photo[top:top + int(ch), left:left + int(cw)])
    long_side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    factor = long_side / max(crop.size)
    size = (max(1, round(crop.size[0] * factor)), max(1, round(crop.size[1] * factor)))
    image = crop.resize(size, Image.Resampling.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(2.0, 8.0), size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(80, 96)))
    return label, buffer.getvalue()


def _render_job(job: tuple[int, str, int]) -> tuple[str, bytes]:
    return render(*job)


def _params(seed: int, counts: dict[str, int]) -> dict:
    return {"format": FORMAT, "seed": seed, "counts": counts}


def is_complete(root: Path, seed: int, counts: dict[str, int]) -> bool:
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker != _params(seed, counts):
        return False
    for split, n in counts.items():
        if sum(1 for _ in (root / split / "images").rglob("*.jpg")) != n:
            return False
    return True


def write_dataset(root: str | Path, train: int = 1200, validation: int = 240, seed: int = 0,
                  workers: int | None = None) -> Path:
    """Write (or reuse) the dataset under ``root``; return ``root``."""
    root = Path(root).expanduser().resolve()
    counts = {"train": int(train), "validation": int(validation)}
    if is_complete(root, seed, counts):
        return root
    if root.exists():
        if not (root / MARKER).is_file() and any(root.iterdir()):
            raise SystemExit(f"{root} exists and is not a benchmark dataset; choose another folder")
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-data-", dir=root.parent))
    try:
        jobs = [(seed, split, i) for split in SPLITS for i in range(counts[split])]
        workers = workers or max(1, min(4, os.cpu_count() or 1))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_render_job, jobs, chunksize=16))
        lines: dict[str, list[str]] = {s: [] for s in SPLITS}
        for (_, split, i), (label, data) in zip(jobs, results):
            name = f"images/{label}/{split}_{i:05d}.jpg"
            path = tmp / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            lines[split].append(json.dumps({"image_url": name, "label": label}))
        for split in SPLITS:
            (tmp / split / "images.jsonl").write_text("\n".join(lines[split]) + "\n", encoding="utf-8")
            (tmp / split / "MLTable").write_text(MLTABLE, encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(_params(seed, counts)), encoding="utf-8")
        tmp.rename(root)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.make_data",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / ".cache" / "photos"))
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--validation", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_dataset(args.output_dir, args.train, args.validation, args.seed)
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
