"""Demo datasets built from real handwritten digits that ship with scikit-learn.

``digits`` (multi-class) holds scikit-learn's 1,797 8x8 digits upscaled to 32x32 grayscale PNGs.
``mosaics`` (multi-label) places 1 to 3 of those digits, each tinted a random colour, in the cells
of a 2x2 grid; the label is the sorted list of distinct digits shown. Both come as Azure-style
MLTable folders (``MLTable`` + ``images.jsonl`` + ``images/``) with train, validation and test
splits, so every command can be tried offline on real data.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from visiontune.errors import UserError
from visiontune.outputs import check_folder

log = logging.getLogger(__name__)

# Bump when the written bytes change, so that an older demo folder is rewritten, not reused.
DEMO_FORMAT = 1
MARKER = ".visiontune-demo.json"
SPLITS = ("train", "validation", "test")
DATASETS = ("digits", "mosaics")
MOSAIC_COUNTS = {"train": 1500, "validation": 300, "test": 300}
DIGIT_SIZE = 32  # one digit, and one mosaic cell
GRID = 2  # mosaics are GRID x GRID cells
MAX_DIGITS_PER_MOSAIC = 3
BACKGROUND = 255  # white; digits are drawn dark on it

MLTABLE = """\
paths:
  - file: ./images.jsonl
transformations:
  - read_json_lines:
        encoding: utf8
        invalid_lines: error
        include_path_column: false
  - convert_column_types:
      - columns: image_url
        column_type: stream_info
"""


@dataclass(frozen=True)
class Placement:
    """One digit in a mosaic: grid cell (row-major, 0..3), source digit index, ink colour."""

    cell: int
    digit: int  # index into load_digits()
    colour: tuple[int, int, int]


def split_digits(targets: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified 60/20/20 split of digit indices; each split sorted for stable file order."""
    indices = np.arange(len(targets))
    rest, test = train_test_split(indices, test_size=0.2, stratify=targets, random_state=seed)
    # 0.25 of the remaining 80 % is 20 % of the whole.
    train, validation = train_test_split(
        rest, test_size=0.25, stratify=targets[rest], random_state=seed
    )
    return {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)}


def digit_pixels(image_8x8: np.ndarray) -> np.ndarray:
    """A 32x32 uint8 rendering of one 8x8 digit (values 0..16), dark ink on white."""
    ink = np.clip(np.rint(np.asarray(image_8x8, dtype=np.float64) * (255.0 / 16.0)), 0, 255)
    small = Image.fromarray((255 - ink).astype(np.uint8), mode="L")
    return np.asarray(small.resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BICUBIC))


def plan_mosaics(
    split_indices: np.ndarray, count: int, rng: np.random.Generator
) -> list[list[Placement]]:
    """Choose cells, digits (only from ``split_indices``) and colours for ``count`` mosaics."""
    cells = GRID * GRID
    plans = []
    for _ in range(count):
        k = int(rng.integers(1, MAX_DIGITS_PER_MOSAIC + 1))
        chosen_cells = np.sort(rng.choice(cells, size=k, replace=False))
        digits = rng.choice(split_indices, size=k, replace=False)
        # Channels up to 160 keep every colour dark enough to read on white.
        colours = rng.integers(0, 161, size=(k, 3))
        plans.append([
            Placement(int(c), int(d), tuple(int(v) for v in col))
            for c, d, col in zip(chosen_cells, digits, colours)
        ])
    return plans


def render_mosaic(plan: list[Placement], digits: dict[int, np.ndarray]) -> np.ndarray:
    """A (64, 64, 3) uint8 mosaic; ``digits`` maps a digit index to its 32x32 rendering."""
    size = GRID * DIGIT_SIZE
    canvas = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    for p in plan:
        ink = (255 - digits[p.digit].astype(np.int32))[..., None]  # 0 = no ink, 255 = full
        colour = np.asarray(p.colour, dtype=np.int32)
        # Blend white towards the colour by the ink amount, in integers so bytes are stable.
        cell = 255 - ((255 - colour) * ink + 127) // 255
        top, left = (DIGIT_SIZE * v for v in divmod(p.cell, GRID))
        canvas[top:top + DIGIT_SIZE, left:left + DIGIT_SIZE] = cell
    return canvas


def mosaic_label(plan: list[Placement], targets: np.ndarray) -> list[str]:
    return sorted({str(int(targets[p.digit])) for p in plan})


def mosaic_rng(seed: int, split: str) -> np.random.Generator:
    """One generator per split, so a split's mosaics do not depend on the other splits."""
    return np.random.default_rng([seed, SPLITS.index(split)])


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _write_split(folder: Path, records: list[tuple[str, bytes, object]]) -> None:
    """One MLTable folder: ``records`` are (file name, PNG bytes, label)."""
    images = folder / "images"
    images.mkdir(parents=True)
    lines = []
    for name, data, label in records:
        (images / name).write_bytes(data)
        lines.append(json.dumps({"image_url": f"images/{name}", "label": label}))
    (folder / "images.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
    (folder / "MLTable").write_text(MLTABLE, encoding="utf-8", newline="\n")


def _marker(seed: int, counts: dict[str, int]) -> dict:
    return {"format": DEMO_FORMAT, "seed": seed, "counts": counts}


def _is_complete(folder: Path, seed: int, counts: dict[str, int]) -> bool:
    """True when ``folder`` is a finished demo dataset of this format and seed."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker != _marker(seed, counts):
        return False
    for split, n in counts.items():
        part = folder / split
        if not (part / "MLTable").is_file() or not (part / "images.jsonl").is_file():
            return False
        if sum(1 for _ in (part / "images").glob("*.png")) != n:
            return False
    return True


def _is_ours(folder: Path) -> bool:
    """Only a folder that a previous demo run wrote (or an empty one) may be replaced."""
    return (folder / MARKER).is_file() or (folder.is_dir() and not any(folder.iterdir()))


def write_demo_data(output_dir, seed: int = 0) -> dict[str, Path]:
    """Write ``digits`` and ``mosaics`` under ``output_dir``; return {"digits/train": folder, ...}.

    The same seed gives byte-identical files. Everything is written to a temporary folder inside
    ``output_dir`` and renamed into place, so an interrupted run never leaves a half dataset. A
    complete dataset of the same format and seed already there is reused.
    """
    out = check_folder(Path(output_dir).expanduser().resolve(), "output_dir", create=False)
    bunch = load_digits()
    images, targets = bunch.images, bunch.target
    splits = split_digits(targets, seed)
    n_digits = {s: len(idx) for s, idx in splits.items()}
    counts = {"digits": n_digits, "mosaics": dict(MOSAIC_COUNTS)}
    result = {f"{d}/{s}": out / d / s for d in DATASETS for s in SPLITS}

    todo = [d for d in DATASETS if not _is_complete(out / d, seed, counts[d])]
    for dataset in DATASETS:
        if dataset not in todo:
            log.info("reusing the complete demo dataset in %s (seed %d)", out / dataset, seed)
    if not todo:
        return result
    for dataset in todo:
        if (out / dataset).exists() and not _is_ours(out / dataset):
            raise UserError(
                f"--output_dir: {out / dataset} exists and is not a visiontune demo dataset; "
                "choose another output_dir or remove it"
            )

    out.mkdir(parents=True, exist_ok=True)
    rendered = {int(i): digit_pixels(images[i]) for i in range(len(images))}
    tmp = Path(tempfile.mkdtemp(prefix=".demo-tmp-", dir=out))
    try:
        if "digits" in todo:
            for split in SPLITS:
                _write_split(tmp / "digits" / split, [
                    (f"digit_{i:04d}.png", _png_bytes(rendered[int(i)]), str(int(targets[i])))
                    for i in splits[split]
                ])
            (tmp / "digits" / MARKER).write_text(json.dumps(_marker(seed, counts["digits"])))
        if "mosaics" in todo:
            for split in SPLITS:
                plans = plan_mosaics(splits[split], MOSAIC_COUNTS[split], mosaic_rng(seed, split))
                _write_split(tmp / "mosaics" / split, [
                    (f"{split}_{n:05d}.png", _png_bytes(render_mosaic(plan, rendered)),
                     mosaic_label(plan, targets))
                    for n, plan in enumerate(plans)
                ])
            (tmp / "mosaics" / MARKER).write_text(json.dumps(_marker(seed, counts["mosaics"])))
        # Each marker above is written after its images, so a dataset without one is unfinished.
        for dataset in todo:
            target = out / dataset
            if target.exists():
                target.rename(tmp / f"old-{dataset}")  # replaced only once the new one is whole
            (tmp / dataset).rename(target)
            log.info("wrote demo dataset %s (seed %d)", target, seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
