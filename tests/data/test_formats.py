"""Dataset formats: Parquet, Hugging Face datasets (save_to_disk, the Parquet that datasets
writes) and WebDataset tar shards, read against what ``datasets`` itself reads from the same
files, with bad rows reported by file and row."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import visiontune
from tests.helpers import subset
from visiontune.data.check import check_data
from visiontune.data.sources import load_records
from visiontune.errors import DataError

MC, ML = "image-classification", "image-classification-multilabel"
NAMES = ["zero", "one", "two"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def digits(demo_dir, tmp_path_factory):
    """Real digit images 0-2 (four of each) as (path, class index) pairs."""
    listing = subset(demo_dir / "digits" / "train", tmp_path_factory.mktemp("formats") / "d.jsonl",
                     4, per_class=True, labels=("0", "1", "2"))
    rows = [json.loads(l) for l in listing.read_text().splitlines()]
    return [(r["image_url"], int(r["label"])) for r in rows]


def classlabel_dataset(digits, embed: bool = True) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=NAMES)})
    images = [{"bytes": Path(p).read_bytes(), "path": Path(p).name} if embed else p
              for p, _ in digits]
    return datasets.Dataset.from_dict({"image": images, "label": [c for _, c in digits]},
                                      features=features)


def as_loaded_by_datasets(ds: datasets.Dataset) -> list[tuple[np.ndarray, str]]:
    names = ds.features["label"].int2str
    return [(np.asarray(row["image"].convert("RGB")), names(row["label"])) for row in ds]


def as_read_by_visiontune(records) -> list[tuple[np.ndarray, str]]:
    return [(np.asarray(Image.open(r.image).convert("RGB")), r.label) for r in records]


def test_a_saved_dataset_reads_as_datasets_reads_it(digits, tmp_path, cache):
    classlabel_dataset(digits).save_to_disk(str(tmp_path / "saved"))
    records, problems = load_records(tmp_path / "saved", MC)
    assert problems == [] and len(records) == len(digits)
    reloaded = datasets.load_from_disk(str(tmp_path / "saved"))
    for (ours, label), (theirs, name) in zip(as_read_by_visiontune(records),
                                             as_loaded_by_datasets(reloaded)):
        assert label == name and np.array_equal(ours, theirs)
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert [r.where for r in records] == [f"{arrow}:{i}" for i in range(1, len(digits) + 1)]
    # The stored bytes are written once, byte for byte, under the cache folder.
    assert all(Path(r.image).is_relative_to(cache / "embedded") for r in records)
    assert Path(records[0].image).read_bytes() == Path(digits[0][0]).read_bytes()


def test_embedded_images_are_written_once_and_follow_the_source_file(digits, tmp_path):
    classlabel_dataset(digits).to_parquet(str(tmp_path / "d.parquet"))
    first, _ = load_records(tmp_path / "d.parquet", MC)
    stamps = [os.stat(r.image).st_mtime_ns for r in first]
    again, _ = load_records(tmp_path / "d.parquet", MC)
    assert [r.image for r in again] == [r.image for r in first]
    assert [os.stat(r.image).st_mtime_ns for r in again] == stamps
    classlabel_dataset(digits[:3]).to_parquet(str(tmp_path / "d.parquet"))  # replaced
    replaced, _ = load_records(tmp_path / "d.parquet", MC)
    assert len(replaced) == 3 and Path(replaced[0].image).parent != Path(first[0].image).parent


def test_a_dataset_dict_folder_asks_for_one_split(digits, tmp_path):
    ds = classlabel_dataset(digits)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with the splits train, test; give one "
                                        r"split's folder, e\.g\. .*dd/train"):
        load_records(tmp_path / "dd", MC)
    records, _ = load_records(tmp_path / "dd" / "test", MC)
    assert [r.label for r in records] == ["zero"]


def test_multilabel_sequences_of_class_labels(digits, tmp_path):
    labels = [[0], [1, 2], [], [0, 2]]
    features = datasets.Features({"img": datasets.Image(),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=NAMES))})
    ds = datasets.Dataset.from_dict({"img": [p for p, _ in digits[:4]], "tags": labels},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "ml"))
    # The defaults (image_url, label) are absent: the only Image and ClassLabel columns are used.
    records, problems = load_records(tmp_path / "ml", ML)
    assert problems == []
    assert [r.label for r in records] == [("zero",), ("one", "two"), (), ("two", "zero")]


def test_parquet_written_by_datasets_keeps_class_names(digits, tmp_path):
    ds = classlabel_dataset(digits)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    records, problems = load_records(tmp_path / "train.parquet", MC)
    assert problems == []
    theirs = as_loaded_by_datasets(datasets.Dataset.from_parquet(str(tmp_path / "train.parquet")))
    for (ours, label), (image, name) in zip(as_read_by_visiontune(records), theirs):
        assert label == name and np.array_equal(ours, image)


def test_plain_parquet_with_paths_or_bytes_and_named_columns(digits, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for p, _ in digits[:2]:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    pd.DataFrame({"file": [Path(p).name for p, _ in digits[:2]], "cls": ["a", "b"]}).to_parquet(
        folder / "paths.parquet")
    records, _ = load_records(folder / "paths.parquet", MC, image_column="file", label_column="cls")
    assert [r.image for r in records] == [str(folder / Path(p).name) for p, _ in digits[:2]]
    pd.DataFrame({"data": [Path(p).read_bytes() for p, _ in digits[:2]], "cls": [3, 4]}).to_parquet(
        tmp_path / "bytes.parquet")
    records, _ = load_records(tmp_path / "bytes.parquet", MC, image_column="data",
                              label_column="cls")
    assert [r.label for r in records] == ["3", "4"]
    assert Path(records[1].image).read_bytes() == Path(digits[1][0]).read_bytes()
    # image_url at its default and absent: the only binary column holds the images.
    records, _ = load_records(tmp_path / "bytes.parquet", MC, label_column="cls")
    assert len(records) == 2
    with pytest.raises(DataError, match=r"no column 'class' \(columns: data, cls\); set "
                                        r"image_column/label_column"):
        load_records(tmp_path / "bytes.parquet", MC, label_column="class")


def test_mltable_read_parquet_with_a_pattern_and_take(digits, tmp_path):
    ds = classlabel_dataset(digits)
    ds.select(range(6)).to_parquet(str(tmp_path / "part-a.parquet"))
    ds.select(range(6, 12)).to_parquet(str(tmp_path / "part-b.parquet"))
    (tmp_path / "MLTable").write_text(
        "paths:\n  - pattern: ./part-*.parquet\ntransformations:\n  - read_parquet:\n"
        "      include_path_column: false\n  - take: 8\n")
    records, problems = load_records(tmp_path, MC, image_column="image")
    assert problems == [] and len(records) == 8
    assert [r.label for r in records] == [NAMES[c] for _, c in digits[:8]]
    assert records[7].where == f"{tmp_path / 'part-b.parquet'}:2"


def test_a_folder_of_parquet_files_with_several_splits_is_refused(digits, tmp_path):
    ds = classlabel_dataset(digits)
    ds.to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    ds.to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    with pytest.raises(DataError, match=r"holds the splits test, train .*pattern: ./test-\*"):
        load_records(tmp_path, MC)
    (tmp_path / "test-00000-of-00001.parquet").unlink()
    records, _ = load_records(tmp_path, MC)
    assert len(records) == len(digits)


def test_bad_rows_in_parquet_are_reported_with_their_row(digits, tmp_path):
    good = Path(digits[0][0]).read_bytes()
    images = [{"bytes": good, "path": "a.png"}, None, {"bytes": b"not an image", "path": "b.png"},
              {"bytes": good, "path": "c.png"}, {"bytes": good, "path": "d.png"}]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=NAMES)})
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, -1, 1]},
                               features=features).to_parquet(str(tmp_path / "bad.parquet"))
    report, ok = check_data(tmp_path / "bad.parquet", MC)
    file = tmp_path / "bad.parquet"
    assert not ok
    assert f"{file}:2: column 'image' holds no image (null or empty)" in report
    assert f"{file}:3:" in report and f"{file}:4: label -1" in report
    assert f"{file}:1:" not in report and f"{file}:5:" not in report


def shard(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for number, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"part/{path.stem}-{number:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_in_order_with_their_labels(digits, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    png = [Path(p).read_bytes() for p, _ in digits]
    shard(folder / "s0.tar", [{"png": png[0], "cls": b"0"}, {"png": png[1], "cls": b"2"}])
    shard(folder / "s1.tar", [{"png": png[2], "json": b'{"label": "1"}'}, {"cls": b"1"},
                              {"png": png[3], "txt": b"x"}])
    records, problems = load_records(folder, MC)
    assert [r.label for r in records] == ["0", "2", "1", "x"]
    assert [Path(r.image).read_bytes() for r in records] == png[:4]
    assert [str(p) for p in problems] == [
        f"{folder / 's1.tar'}:part/s1-0001: no image member (.jpg, .jpeg, .png, .webp, .bmp, "
        ".gif, .tif, .tiff, .ppm, .pgm); members: cls"]
    shard(tmp_path / "ml.tar", [{"png": png[0], "json": b'{"label": ["b", "a"]}'},
                                {"png": png[1], "cls": b"a;c"}])
    records, _ = load_records(tmp_path / "ml.tar", ML)
    assert [r.label for r in records] == [("a", "b"), ("a", "c")]


def test_finetune_and_predict_on_a_saved_dataset(tiny_vit, digits, tmp_path):
    ds = classlabel_dataset(digits)
    ds.save_to_disk(str(tmp_path / "train"))
    result = visiontune.finetune(
        model_path=tiny_vit, training_data=tmp_path / "train", validation_data=tmp_path / "train",
        image_column="image", task_name=MC, output_dir_pytorch=tmp_path / "out",
        number_of_epochs=1, image_height=32, image_width=32, number_of_workers=0,
        save_as_mlflow_model=False)
    assert result.classes == sorted(NAMES)
    predicted = visiontune.predict(model=tmp_path / "out", data=tmp_path / "train",
                                   output=tmp_path / "p.jsonl", image_column="image")
    rows = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    arrow = next((tmp_path / "train").glob("*.arrow"))
    assert predicted.predicted == len(digits)
    assert [r["image"] for r in rows] == [f"{arrow}:{i}" for i in range(1, len(digits) + 1)]
