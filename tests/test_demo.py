"""The demo datasets: real digits, correct labels, clean splits, stable bytes."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from visiontune import demo
from visiontune.errors import UserError

SPLITS = ("train", "validation", "test")
TARGETS = load_digits().target


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    paths = demo.write_demo_data(root, seed=0)
    assert set(paths) == {f"{d}/{s}" for d in ("digits", "mosaics") for s in SPLITS}
    for key, path in paths.items():
        assert path == root.resolve() / key
    return root


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "images.jsonl").read_text("utf-8").splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.mark.parametrize("dataset,size,mode", [("digits", 32, "L"), ("mosaics", 64, "RGB")])
def test_images_are_real_pngs_of_the_right_size_and_mode(out, dataset, size, mode):
    for split in SPLITS:
        folder = out / dataset / split
        listed = rows(folder)
        assert len({r["image_url"] for r in listed}) == len(listed)
        # Every listed image exists, and nothing unlisted sits beside them.
        assert sorted(r["image_url"] for r in listed) == sorted(
            f"images/{p.name}" for p in (folder / "images").iterdir()
        )
        for r in listed:
            path = folder / r["image_url"]
            assert not Path(r["image_url"]).is_absolute()
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(path) as im:
                assert (im.format, im.size, im.mode) == ("PNG", (size, size), mode)


def test_mltable_files_have_the_azure_form(out):
    expected = {
        "paths": [{"file": "./images.jsonl"}],
        "transformations": [
            {"read_json_lines": {"encoding": "utf8", "invalid_lines": "error",
                                 "include_path_column": False}},
            {"convert_column_types": [{"columns": "image_url", "column_type": "stream_info"}]},
        ],
    }
    for dataset in ("digits", "mosaics"):
        for split in SPLITS:
            text = (out / dataset / split / "MLTable").read_text("utf-8")
            assert yaml.safe_load(text) == expected


def test_split_counts(out):
    digits = {s: len(rows(out / "digits" / s)) for s in SPLITS}
    assert sum(digits.values()) == 1797
    assert digits == {"train": 1077, "validation": 360, "test": 360}
    assert {s: len(rows(out / "mosaics" / s)) for s in SPLITS} == {
        "train": 1500, "validation": 300, "test": 300,
    }


def test_digit_splits_are_stratified(out):
    total = Counter(str(t) for t in TARGETS)
    for split, share in (("train", 0.6), ("validation", 0.2), ("test", 0.2)):
        labels = [r["label"] for r in rows(out / "digits" / split)]
        assert all(isinstance(label, str) for label in labels)
        counts = Counter(labels)
        assert set(counts) == {str(d) for d in range(10)}
        for cls, n in counts.items():
            # Stratification keeps each class within one or two images of its share.
            assert abs(n - share * total[cls]) <= 2, (split, cls, n)


def test_digit_images_show_the_labelled_digit(out):
    images = load_digits().images
    for split in SPLITS:
        for r in rows(out / "digits" / split):
            index = int(Path(r["image_url"]).stem.split("_")[1])
            assert r["label"] == str(TARGETS[index])
            ink = 255 - pixels(out / "digits" / split / r["image_url"]).astype(int)
            # Downscaled back to 8x8, the rendering follows the source digit closely.
            small = ink.reshape(8, 4, 8, 4).mean(axis=(1, 3))
            assert np.corrcoef(small.ravel(), images[index].ravel())[0, 1] > 0.9


def non_blank_cells(image: np.ndarray) -> list[int]:
    cells = []
    for cell in range(4):
        row, col = divmod(cell, 2)
        if (image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32] != 255).any():
            cells.append(cell)
    return cells


def test_mosaic_labels_are_sorted_unique_and_match_the_cells(out):
    for split in SPLITS:
        for r in rows(out / "mosaics" / split):
            label = r["label"]
            assert isinstance(label, list) and 1 <= len(label) <= 3
            assert label == sorted(set(label))
            assert all(x in {str(d) for d in range(10)} for x in label)
            # At least one cell per distinct digit, at most three digits.
            image = pixels(out / "mosaics" / split / r["image_url"])
            assert len(label) <= len(non_blank_cells(image)) <= 3


def test_mosaics_follow_their_plan(out):
    """Rebuild each mosaic's placements and check cells, ink and label against them."""
    splits = demo.split_digits(TARGETS, seed=0)
    rendered = {}
    for split in SPLITS:
        plans = demo.plan_mosaics(splits[split], 300 if split != "train" else 1500,
                                  demo.mosaic_rng(0, split))
        listed = rows(out / "mosaics" / split)
        assert len(plans) == len(listed)
        used = Counter()
        for plan, r in zip(plans, listed):
            image = pixels(out / "mosaics" / split / r["image_url"])
            assert non_blank_cells(image) == sorted(p.cell for p in plan)
            assert r["label"] == sorted({str(TARGETS[p.digit]) for p in plan})
            for p in plan:
                # No leakage: a mosaic's digits come from the same split of the digits dataset.
                assert p.digit in splits[split]
                assert (out / "digits" / split / "images" / f"digit_{p.digit:04d}.png").is_file()
                if p.digit not in rendered:
                    rendered[p.digit] = pixels(
                        out / "digits" / split / "images" / f"digit_{p.digit:04d}.png"
                    ).astype(int)
                ink = 255 - rendered[p.digit]
                row, col = divmod(p.cell, 2)
                cell = image[row * 32:(row + 1) * 32, col * 32:(col + 1) * 32]
                coloured = (cell != 255).any(axis=2)
                assert not (coloured & (ink == 0)).any()  # no colour where the digit has no ink
                assert coloured[ink >= 128].all()  # strong ink always shows
                used[len(plan)] += 1
        assert set(used) == {1, 2, 3}


def test_no_image_is_shared_between_splits(out):
    for dataset in ("digits", "mosaics"):
        names, hashes = {}, {}
        for split in SPLITS:
            folder = out / dataset / split / "images"
            names[split] = {p.name for p in folder.iterdir()}
            hashes[split] = {
                hashlib.sha256(pixels(p).tobytes()).hexdigest() for p in folder.iterdir()
            }
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            assert not names[a] & names[b]
            assert not hashes[a] & hashes[b]


def test_same_seed_gives_identical_bytes(out, tmp_path):
    demo.write_demo_data(tmp_path, seed=0)
    assert tree_bytes(tmp_path) == tree_bytes(out)


def test_other_seed_gives_other_splits():
    a = demo.split_digits(TARGETS, seed=0)
    b = demo.split_digits(TARGETS, seed=1)
    assert not np.array_equal(a["test"], b["test"])


def test_complete_dataset_is_reused(out, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    with caplog.at_level(logging.INFO, logger="visiontune.demo"):
        demo.write_demo_data(copy, seed=0)
    assert "reusing" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before


def test_incomplete_or_other_seed_dataset_is_rewritten(out, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    next((copy / "digits" / "test" / "images").iterdir()).unlink()
    demo.write_demo_data(copy, seed=0)
    assert tree_bytes(copy) == tree_bytes(out)

    demo.write_demo_data(copy, seed=1)
    assert json.loads((copy / "mosaics" / demo.MARKER).read_text())["seed"] == 1
    assert tree_bytes(copy) != tree_bytes(out)
    assert [p.name for p in copy.iterdir() if p.name.startswith(".")] == []


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a visiontune demo dataset"):
        demo.write_demo_data(tmp_path)
    assert (tmp_path / "digits" / "mine.txt").read_text() == "keep me"


def test_interrupted_run_leaves_no_half_dataset(tmp_path, monkeypatch):
    real = demo._png_bytes
    calls = []

    def failing(image):
        calls.append(1)
        if len(calls) > 2500:  # digits done, mosaics half written
            raise KeyboardInterrupt
        return real(image)

    monkeypatch.setattr(demo, "_png_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        demo.write_demo_data(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_demo_data(tmp_path):
    target = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "visiontune", "demo-data", "--output_dir", str(target)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mosaics/test" in proc.stdout
    assert (target / "mosaics" / "test" / "MLTable").is_file()
    assert len(rows(target / "digits" / "train")) == 1077
