"""prepare_data, check_data, classes and labels, the validation split, the Dataset, the CLI."""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.cli import main
from visiontune.data.check import check_data
from visiontune.data.dataset import ImageDataset
from visiontune.data.labels import build_classes, encode_label
from visiontune.data.prepare import prepare_data
from visiontune.data.sources import Record
from visiontune.data.split import stratified_split
from visiontune.data.transforms import Preprocessing, eval_transform
from visiontune.errors import DataError

MC, ML = "image-classification", "image-classification-multilabel"


def make_dataset(root: Path, labels, name="train.jsonl", mltable=True, extra_rows=()) -> Path:
    """One small PNG per row (colour by row) and a JSON Lines file, in an MLTable folder."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(labels):
        Image.new("RGB", (10 + i % 5, 8 + i % 3), (i * 7 % 256, 50, 90)).save(root / "images" / f"{i}.png")
        rows.append({"image_url": f"images/{i}.png", "label": label})
    lines = [json.dumps(r) for r in rows] + [r if isinstance(r, str) else json.dumps(r) for r in extra_rows]
    (root / name).write_text("\n".join(lines) + "\n")
    if mltable:
        (root / "MLTable").write_text(
            f"paths:\n  - file: ./{name}\ntransformations:\n  - read_json_lines:\n"
            "      encoding: utf8\n      invalid_lines: error\n"
            "  - convert_column_types:\n      - columns: image_url\n        column_type: stream_info\n")
        return root
    return root / name


# ---------------------------------------------------------------------------------------------
# Classes and labels
# ---------------------------------------------------------------------------------------------
def test_classes_sort_numerically_when_all_integers():
    records = [Record("x", label, "w") for label in ("10", "2", "1", "2")]
    assert build_classes(records) == ["1", "2", "10"]
    assert build_classes(records, [Record("x", "b", "w")]) == ["1", "10", "2", "b"]
    multi = [Record("x", ("b", "a"), "w"), Record("x", (), "w")]
    assert build_classes(multi, [Record("x", ("c",), "w")]) == ["a", "b", "c"]


def test_encode_label():
    class_to_id = {"a": 0, "b": 1, "c": 2}
    assert encode_label("b", class_to_id, MC) == 1
    vector = encode_label(("a", "c"), class_to_id, ML)
    assert vector.dtype == np.float32 and vector.tolist() == [1.0, 0.0, 1.0]
    assert encode_label((), class_to_id, ML).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(DataError, match="'z' is not one of the classes"):
        encode_label("z", class_to_id, MC)


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------
def _records(labels):
    return [Record(f"/img/{i}.png", label, f"a.jsonl:{i + 1}") for i, label in enumerate(labels)]


def test_split_is_deterministic_stratified_and_keeps_every_class():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 10 + ["d"] * 2 + ["e"]
    records = _records(labels)
    train, val = stratified_split(records, 0.2, seed=7, task=MC)
    again = stratified_split(records, 0.2, seed=7, task=MC)
    assert (train, val) == again
    assert len(val) == round(len(records) * 0.2)
    assert sorted(train + val, key=lambda r: r.where) == sorted(records, key=lambda r: r.where)
    counts = Counter(r.label for r in val)
    assert counts["a"] == 10 and counts["b"] == 6 and counts["c"] == 2
    assert {r.label for r in train} == {"a", "b", "c", "d", "e"}  # "e" has 1 row: stays
    assert [r for r in records if r in train] == train  # input order kept
    other = stratified_split(records, 0.2, seed=8, task=MC)[1]
    assert other != val


def test_split_multilabel_keeps_every_label_in_training():
    labels = [("a",)] * 20 + [("a", "b")] * 6 + [("c",), ("a", "c")] + [()] * 5 + [("d", "a")] * 2
    records = _records(labels)
    train, val = stratified_split(records, 0.25, seed=1, task=ML)
    assert len(val) >= 5
    in_train = {label for r in train for label in r.label}
    assert in_train == {"a", "b", "c", "d"}
    assert stratified_split(records, 0.25, seed=1, task=ML) == (train, val)


def test_split_moves_a_row_back_when_a_label_would_be_only_in_validation():
    # "l" is never a row's rarest label, so stratification alone cannot protect it.
    labels = [("k1", "l"), ("k1",), ("k2", "l"), ("k2",), ("k3", "l"), ("k3",)] + [("z",)] * 4
    records = _records(labels)
    for seed in range(40):
        train, val = stratified_split(records, 0.5, seed=seed, task=ML)
        assert any("l" in r.label for r in train), seed
        assert val


def test_split_of_tiny_data():
    assert stratified_split(_records(["a"]), 0.2, 0, MC) == (_records(["a"]), [])
    train, val = stratified_split(_records(["a", "a", "b", "b"]), 0.2, 0, MC)
    assert len(val) == 1 and {r.label for r in train} == {"a", "b"}
    assert stratified_split(_records(["a", "b"]), 0.2, 0, MC)[1] == []
    with pytest.raises(ValueError):
        stratified_split(_records(["a", "b"]), 1.0, 0, MC)


# ---------------------------------------------------------------------------------------------
# prepare_data
# ---------------------------------------------------------------------------------------------
def test_prepare_with_split(tmp_path):
    labels = ["cat", "dog", "bird"] * 10
    data = prepare_data(make_dataset(tmp_path / "train", labels), task=MC, seed=3)
    assert data.classes == ["bird", "cat", "dog"]
    assert len(data.train) == 24 and len(data.validation) == 6 and data.validation_is_split
    assert Counter(r.label for r in data.validation) == {"bird": 2, "cat": 2, "dog": 2}
    assert data.skipped == []
    assert data.image_sizes == {"min_width": 10, "max_width": 14, "min_height": 8, "max_height": 10}
    again = prepare_data(tmp_path / "train", task=MC, seed=3)
    assert again.validation == data.validation


def test_prepare_with_validation_merges_classes(tmp_path):
    train = make_dataset(tmp_path / "train", ["1", "10", "2", "1"])
    val = make_dataset(tmp_path / "val", [3, "1"], name="v.jsonl", mltable=False)
    data = prepare_data(train, val, task=MC, extra_classes=["20"])
    assert data.classes == ["1", "2", "3", "10", "20"]
    assert not data.validation_is_split and len(data.train) == 4 and len(data.validation) == 2


def test_bad_rows_stop_by_default_with_file_and_line(tmp_path):
    root = make_dataset(tmp_path / "train", ["a", "b"] * 5, extra_rows=[
        "{broken", {"image_url": "images/missing.png", "label": "a"},
        {"image_url": "images/0.png", "label": ["a"]},
    ])
    (root / "images" / "empty.png").write_bytes(b"")
    (root / "images" / "text.png").write_text("not an image")
    (root / "images" / "cut.png").write_bytes((root / "images" / "0.png").read_bytes()[:40])
    with open(root / "train.jsonl", "a") as f:
        for name in ("empty", "text", "cut"):
            f.write(json.dumps({"image_url": f"images/{name}.png", "label": "b"}) + "\n")
    with pytest.raises(DataError) as info:
        prepare_data(root, task=MC)
    message = str(info.value)
    assert "6 bad row(s) of 16" in message
    assert "train.jsonl:11: malformed JSON" in message
    assert f"train.jsonl:12: image not found: {root / 'images' / 'missing.png'}" in message
    assert "train.jsonl:13: label" in message and "is a list" in message
    assert "train.jsonl:14:" in message and "empty file" in message
    assert "train.jsonl:15:" in message and "not an image file" in message
    assert "... and 1 more" in message  # the truncated image, 6th
    assert "skip_bad_rows" in message and "\n" not in message


def test_skip_bad_rows_keeps_going_and_counts(tmp_path, caplog):
    root = make_dataset(tmp_path / "train", ["a", "b"] * 5, extra_rows=[
        "{broken", {"image_url": "images/missing.png", "label": "a"}, {"image_url": "images/1.png"},
    ])
    with caplog.at_level(logging.WARNING):
        data = prepare_data(root, task=MC, skip_bad_rows=True)
    assert len(data.train) + len(data.validation) == 10
    assert [p.where.rsplit(":", 1)[1] for p in data.skipped] == ["11", "12", "13"]
    assert "skipped 3 of 13 rows" in caplog.text


def test_test_data_bad_rows_follow_the_training_rules(tmp_path):
    """Evaluation's labelled data: bad rows and unreadable images stop with file and line, or
    are skipped and counted; none is lost silently."""
    from visiontune.data.prepare import prepare_test_data

    root = make_dataset(tmp_path / "test", ["a", "b"] * 3, extra_rows=[
        "{broken", {"image_url": "images/missing.png", "label": "a"}])
    (root / "images" / "cut.png").write_bytes((root / "images" / "0.png").read_bytes()[:40])
    with open(root / "train.jsonl", "a") as f:
        f.write(json.dumps({"image_url": "images/cut.png", "label": "b"}) + "\n")
    with pytest.raises(DataError) as info:
        prepare_test_data(root, task=MC, classes=["a", "b"])
    message = str(info.value)
    assert "3 bad row(s) of 9" in message
    assert "train.jsonl:7: malformed JSON" in message and "train.jsonl:8: image not found" in message
    assert "train.jsonl:9:" in message
    good, skipped = prepare_test_data(root, task=MC, classes=["a", "b"], skip_bad_rows=True)
    assert (len(good), skipped) == (6, 3)


def test_dataset_level_problems_always_stop(tmp_path):
    with pytest.raises(DataError, match="only the class 'a'"):
        prepare_data(make_dataset(tmp_path / "one", ["a"] * 5), task=MC, skip_bad_rows=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        prepare_data(empty, task=MC, skip_bad_rows=True)
    bad_only = make_dataset(tmp_path / "bad", [], extra_rows=["{x"])
    with pytest.raises(DataError, match="no usable rows"):
        prepare_data(bad_only, task=MC, skip_bad_rows=True)
    with pytest.raises(DataError, match="too few rows"):
        prepare_data(make_dataset(tmp_path / "two", ["a", "b"]), task=MC)


def test_prepare_without_verification_reads_no_images(tmp_path):
    rows = [{"image_url": f"nowhere/{i}.png", "label": "ab"[i % 2]} for i in range(10)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = prepare_data(path, task=MC, verify_images=False)
    assert len(data.train) == 8 and data.image_sizes == {}


def test_prepare_multilabel(tmp_path):
    labels = [["a", "b"], ["b"], ["c", "a"], [], ["a"]] * 4
    data = prepare_data(make_dataset(tmp_path / "ml", labels), task=ML)
    assert data.classes == ["a", "b", "c"]
    assert len(data.validation) == 4
    assert {label for r in data.train for label in r.label} == {"a", "b", "c"}


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------
def test_image_dataset_items(tmp_path):
    root = make_dataset(tmp_path / "d", [["a"], ["b", "c"]])
    data = prepare_data(root, tmp_path / "d" / "train.jsonl", task=ML)
    pre = Preprocessing(height=16, width=12, mean=(0, 0, 0), std=(1, 1, 1))
    dataset = ImageDataset(data.train, data.classes, ML, eval_transform(pre))
    item = dataset[1]
    assert item["pixel_values"].shape == (3, 16, 12) and item["pixel_values"].dtype == torch.float32
    assert torch.allclose(item["pixel_values"][:, 0, 0], torch.tensor([7, 50, 90]) / 255.0)
    assert item["labels"].dtype == torch.float32 and item["labels"].tolist() == [0.0, 1.0, 1.0]

    multiclass = [Record(r.image, r.label[0], r.where) for r in data.train]
    dataset = ImageDataset(multiclass, ["a", "b"], MC, eval_transform(pre))
    assert len(dataset) == 2
    assert dataset[1]["labels"].dtype == torch.long and dataset[1]["labels"].item() == 1
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["pixel_values"].shape == (2, 3, 16, 12) and batch["labels"].tolist() == [0, 1]

    gone = ImageDataset([Record(str(tmp_path / "x.png"), "a", "t.jsonl:4")], ["a", "b"], MC,
                        eval_transform(pre))
    with pytest.raises(DataError, match="t.jsonl:4: image not found"):
        gone[0]
    with pytest.raises(DataError, match="t.jsonl:4: label 'z'"):
        ImageDataset([Record("x", "z", "t.jsonl:4")], ["a", "b"], MC, eval_transform(pre))


# ---------------------------------------------------------------------------------------------
# data check and the CLI
# ---------------------------------------------------------------------------------------------
def test_check_data_report(tmp_path):
    extra = [{"image_url": f"images/missing{i}.png", "label": "a"} for i in range(55)]
    root = make_dataset(tmp_path / "c", ["a", "b", "b"], extra_rows=extra)
    report, ok = check_data(root, MC)
    assert not ok
    assert "rows: 58 read, 3 usable, 55 bad" in report
    assert "  a  1\n  b  2" in report
    assert "image sizes: width 10-12 px, height 8-10 px" in report
    assert "train.jsonl:4: image not found" in report and "train.jsonl:53:" in report
    assert "train.jsonl:54:" not in report and "... and 5 more" in report
    assert "NOT USABLE as is" in report
    report, ok = check_data(root, MC, skip_bad_rows=True)
    assert ok and "55 bad row(s) will be skipped" in report
    report, ok = check_data(make_dataset(tmp_path / "one", ["a", "a"]), MC)
    assert not ok and "at least 2" in report


def test_cli_data_check(tmp_path, capsys):
    root = make_dataset(tmp_path / "c", ["x", "y"] * 3)
    assert main(["data", "check", "--data", str(root), "--task_name", MC]) == 0
    assert "result: usable" in capsys.readouterr().out
    assert main(["data", "check", "--data", str(tmp_path / "nope"), "--task_name", MC]) == 2
    assert "data not found" in capsys.readouterr().err


def test_an_earlier_check_is_reused_only_when_asked_and_only_for_unchanged_images(
        tmp_path, monkeypatch):
    import os

    import visiontune.data.prepare as prepare

    monkeypatch.setenv("VISIONTUNE_CACHE_DIR", str(tmp_path / "cache"))
    root = make_dataset(tmp_path / "d", ["a", "b"] * 4)
    (root / "images" / "3.png").write_bytes(b"damaged")
    first, ok = check_data(root, MC)
    assert not ok and "train.jsonl:4" in first
    decoded = []
    real = prepare.verify_image

    def counting(uri, where=""):
        decoded.append(Path(uri).name)
        return real(uri, where=where)

    monkeypatch.setattr(prepare, "verify_image", counting)
    assert check_data(root, MC)[0] == first and len(decoded) == 8  # by default: every image
    monkeypatch.setenv("VISIONTUNE_REUSE_IMAGE_CHECK", "1")
    decoded.clear()
    assert check_data(root, MC)[0] == first and decoded == []  # the damaged one stays bad
    # A changed file (new bytes, new time) is decoded again; so is one of the same size whose
    # modification time moved.
    Image.new("RGB", (12, 9), (1, 2, 3)).save(root / "images" / "3.png")
    same_size = root / "images" / "5.png"
    info = same_size.stat()
    os.utime(same_size, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    report, ok = check_data(root, MC)
    assert ok and sorted(decoded) == ["3.png", "5.png"]
