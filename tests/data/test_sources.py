"""Readers: MLTable (file/folder/pattern, read_json_lines, read_delimited), JSON Lines, CSV,
folder trees; image reference forms; row problems with file and line."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from visiontune.data.labels import normalize_label, parse_text_label
from visiontune.data.mltable import read_mltable
from visiontune.data.sources import Problem, Record, load_records
from visiontune.errors import DataError, UserError

MC, ML = "image-classification", "image-classification-multilabel"

JSONL_MLTABLE = """\
paths:
  - file: ./train_annotations.jsonl
transformations:
  - read_json_lines:
        encoding: utf8
        invalid_lines: error
        include_path_column: false
  - convert_column_types:
      - columns: image_url
        column_type: stream_info
"""


def png(path: Path, color=(255, 0, 0), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def mltable_dir(tmp_path):
    root = tmp_path / "train"
    png(root / "images" / "a.png")
    png(root / "images" / "b.png")
    write_jsonl(root / "train_annotations.jsonl", [
        {"image_url": "images/a.png", "image_details": {"format": "png"}, "label": "can"},
        {"image_url": "./images/b.png", "label": 7},
    ])
    (root / "MLTable").write_text(JSONL_MLTABLE)
    return root


def test_mltable_json_lines_with_stream_info(mltable_dir):
    records, problems = load_records(mltable_dir, MC)
    assert problems == []
    assert records == [
        Record(str(mltable_dir / "images" / "a.png"), "can", f"{mltable_dir / 'train_annotations.jsonl'}:1"),
        Record(str(mltable_dir / "images" / "b.png"), "7", f"{mltable_dir / 'train_annotations.jsonl'}:2"),
    ]
    # The MLTable file itself may be given too.
    assert load_records(mltable_dir / "MLTable", MC)[0] == records


def test_mltable_folder_and_pattern_paths(tmp_path):
    root = tmp_path / "t"
    png(root / "img" / "x.png")
    write_jsonl(root / "ann" / "part1.jsonl", [{"image_url": "img/x.png", "label": "a"}])
    write_jsonl(root / "ann" / "part2.jsonl", [{"image_url": "img/x.png", "label": "b"}])
    png(root / "ann" / "beside.png")  # images next to annotations are not read as JSON
    (root / "MLTable").write_text("paths:\n  - folder: ./ann\ntransformations:\n  - read_json_lines\n")
    records, problems = load_records(root, MC)
    assert problems == [] and [r.label for r in records] == ["a", "b"]
    assert records[1].where == f"{root / 'ann' / 'part2.jsonl'}:1"

    (root / "MLTable").write_text(
        "paths:\n  - pattern: ./ann/*2.jsonl\ntransformations:\n  - read_json_lines: {}\n")
    records, _ = load_records(root, MC)
    assert [r.label for r in records] == ["b"]

    (root / "MLTable").write_text("paths:\n  - pattern: ./**/*.jsonl\n")  # format from suffix
    assert len(load_records(root, MC)[0]) == 2


def test_mltable_read_delimited(tmp_path):
    root = tmp_path / "t"
    png(root / "x.png")
    (root / "labels.tsv").write_text("path\ttags\nx.png\t\"[\"\"a\"\", \"\"b\"\"]\"\nx.png\tc;d\n")
    (root / "MLTable").write_text(
        "paths:\n  - file: labels.tsv\ntransformations:\n"
        "  - read_delimited:\n      delimiter: \"\\t\"\n      header: all_files_same_headers\n"
        "      encoding: utf8\n"
        "  - convert_column_types:\n      - columns: [path]\n        column_type: stream_info\n")
    records, problems = load_records(root, ML, image_column="path", label_column="tags")
    assert problems == []
    assert [r.label for r in records] == [("a", "b"), ("c", "d")]
    assert [r.where for r in records] == [f"{root / 'labels.tsv'}:2", f"{root / 'labels.tsv'}:3"]


def test_mltable_errors_are_clear(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    (root / "MLTable").write_text("paths: [\n  - file: x\n")
    with pytest.raises(DataError, match=r"MLTable:\d+: the MLTable file is not valid YAML"):
        load_records(root, MC)
    (root / "MLTable").write_text("paths:\n  - file: ./missing.jsonl\n")
    with pytest.raises(DataError, match="file './missing.jsonl' not found"):
        load_records(root, MC)
    write_jsonl(root / "a.jsonl", [])
    (root / "MLTable").write_text("paths:\n  - file: a.jsonl\ntransformations:\n  - read_delta_lake: {}\n")
    with pytest.raises(DataError, match="transformation 'read_delta_lake' is not supported"):
        load_records(root, MC)
    (root / "MLTable").write_text("paths:\n  - file: a.jsonl\ntransformations:\n  - read_parquet: {}\n")
    with pytest.raises(DataError, match=r"a\.jsonl: cannot read as Parquet"):
        load_records(root, MC)
    (root / "MLTable").write_text("paths:\n  - file: azureml://datastores/x/paths/a.jsonl\n")
    with pytest.raises(DataError, match="is remote"):
        load_records(root, MC)


def test_mltable_take_skip_and_invalid_lines_drop(tmp_path, caplog):
    root = tmp_path / "t"
    write_jsonl(root / "a.jsonl", [{"image_url": f"{i}.png", "label": str(i)} for i in range(5)]
                + ["{oops"])
    (root / "MLTable").write_text(
        "paths:\n  - file: a.jsonl\ntransformations:\n"
        "  - read_json_lines: {invalid_lines: drop}\n  - skip: 1\n  - take: 2\n")
    records, problems = load_records(root, MC)
    assert [r.label for r in records] == ["1", "2"] and problems == []
    (root / "MLTable").write_text(
        "paths:\n  - file: a.jsonl\ntransformations:\n"
        "  - read_json_lines: {invalid_lines: drop}\n  - take: 2\n  - skip: 1\n")
    assert [r.label for r in load_records(root, MC)[0]] == ["1"]
    (root / "MLTable").write_text(
        "paths:\n  - file: a.jsonl\ntransformations:\n  - read_json_lines: {invalid_lines: drop}\n")
    records, problems = load_records(root, MC)
    assert len(records) == 5 and problems == []
    assert "dropped 1 malformed JSON line" in caplog.text and "a.jsonl:6" in caplog.text


def test_spec_is_parsed(mltable_dir):
    spec = read_mltable(mltable_dir)
    assert spec.format == "json_lines" and spec.stream_columns == ["image_url"]
    assert spec.files == [mltable_dir / "train_annotations.jsonl"]


def test_direct_jsonl_and_every_image_reference_form(tmp_path):
    image = png(tmp_path / "data" / "pics" / "a.png")
    rows = [
        {"image_url": "pics/a.png", "label": "rel"},
        {"image_url": str(image), "label": "abs"},
        {"image_url": image.as_uri(), "label": "uri"},
        {"image_url": "https://example.com/x.jpg", "label": "http"},
        {"image_url": "azureml://subscriptions/s/workspaces/w/datastores/d/paths/x.jpg", "label": "aml"},
        {"image_url": "s3://bucket/x.jpg", "label": "s3"},
        {"image_url": "ftp://host/x.jpg", "label": "ftp"},
    ]
    records, problems = load_records(write_jsonl(tmp_path / "data" / "a.jsonl", rows), MC)
    assert [r.image for r in records] == [str(image)] * 3 + [r["image_url"] for r in rows[3:6]]
    assert len(problems) == 1 and problems[0].where.endswith("a.jsonl:7")
    assert "unsupported URI scheme 'ftp://'" in problems[0].message


AZURE_JOB = {"AZUREML_ARM_SUBSCRIPTION": "sub-1", "AZUREML_ARM_RESOURCEGROUP": "rg-1",
             "AZUREML_ARM_WORKSPACE_NAME": "ws-1"}


def test_datastore_references_become_the_job_workspaces_azureml_uris(tmp_path, monkeypatch):
    """Azure's data labeling exports: AmlDatastore://<datastore>/<path>, as text or as a
    stream_info object; inside a job they name the job's workspace."""
    for name, value in AZURE_JOB.items():
        monkeypatch.setenv(name, value)
    rows = [
        {"image_url": "AmlDatastore://workspaceblobstore/UI/2026/a b.jpg", "label": "text"},
        {"image_url": {"resourceIdentifier": "AmlDatastore://workspaceblobstore/UI/2026/c.png",
                       "arguments": {"datastoreName": "workspaceblobstore"}}, "label": "object"},
        {"image_url": {"resourceIdentifier": "azureml://subscriptions/s/workspaces/w/datastores/d/paths/x.jpg"},
         "label": "aml-object"},
        {"image_url": "AmlDatastore://workspaceblobstore", "label": "no-path"},
        {"image_url": {"arguments": {}}, "label": "object-without-uri"},
    ]
    records, problems = load_records(write_jsonl(tmp_path / "a.jsonl", rows), MC)
    workspace = "azureml://subscriptions/sub-1/resourcegroups/rg-1/workspaces/ws-1/datastores/workspaceblobstore/paths"
    assert [r.image for r in records] == [f"{workspace}/UI/2026/a b.jpg", f"{workspace}/UI/2026/c.png",
                                          rows[2]["image_url"]["resourceIdentifier"]]
    assert [p.where.rsplit(":", 1)[1] for p in problems] == ["4", "5"]
    assert "expected AmlDatastore://<datastore>/<path>" in problems[0].message


def test_a_datastore_reference_outside_a_job_is_one_line_saying_what_to_use(tmp_path, monkeypatch):
    for name in AZURE_JOB:
        monkeypatch.delenv(name, raising=False)
    path = write_jsonl(tmp_path / "a.jsonl", [{"image_url": "AmlDatastore://store/x.jpg", "label": "a"}])
    with pytest.raises(DataError) as err:
        load_records(path, MC)
    message = str(err.value)
    assert "\n" not in message and "AZUREML_ARM_SUBSCRIPTION" in message
    assert "azureml://subscriptions/<id>/resourcegroups/<group>/workspaces/" in message


def test_direct_csv_multiclass_and_multilabel(tmp_path):
    png(tmp_path / "x.png")
    csv_file = tmp_path / "a.csv"
    csv_file.write_text(
        "image_url,label,extra\n"
        "x.png,cat,1\n"
        "\n"
        "x.png,\"multi\nline\",2\n"
        "x.png,dog,3\n"
    )
    records, problems = load_records(csv_file, MC)
    assert [r.label for r in records] == ["cat", "multi\nline", "dog"]
    # Lines are those of the file, where each row starts.
    assert [r.where.rsplit(":", 1)[1] for r in records] == ["2", "4", "6"]

    csv_file.write_text('image_url,label\nx.png,"[""a"", ""b"", ""a""]"\nx.png,"a, c"\nx.png,b;a\nx.png,\n')
    records, problems = load_records(csv_file, ML)
    assert problems == []
    assert [r.label for r in records] == [("a", "b"), ("a", "c"), ("a", "b"), ()]


def test_csv_header_without_the_column_stops(tmp_path):
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("path,label\nx.png,cat\n")
    with pytest.raises(DataError, match=r"a\.csv:1: no column 'image_url' in the header \(columns: path, label\)"):
        load_records(csv_file, MC)
    assert load_records(csv_file, MC, image_column="path")[0][0].label == "cat"


def test_csv_row_problems_have_lines(tmp_path):
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("image_url,label\nx.png,a,b\nx.png\n,cat\nx.png,[\"a\"\n")
    records, problems = load_records(csv_file, MC)
    assert [r.label for r in records] == ['["a"']  # multi-class takes the cell as written
    got = {p.where.rsplit(":", 1)[1]: p.message for p in problems}
    assert "row has 3 fields but the header has 2" in got["2"]
    assert "missing column 'label'" in got["3"]
    assert "image_url is empty" in got["4"]
    records, problems = load_records(csv_file, ML)
    assert any(p.where.endswith(":5") and "not a JSON list" in p.message for p in problems)


def test_jsonl_row_problems_have_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"image_url": "a.png", "label": "ok"},
        "{not json",
        "[1, 2]",
        {"label": "x"},
        {"image_url": "a.png"},
        {"image_url": "a.png", "label": ["a", "b"]},
        {"image_url": "a.png", "label": True},
        {"image_url": "a.png", "label": 1.5},
        {"image_url": "a.png", "label": None},
        {"image_url": "a.png", "label": {"k": 1}},
        {"image_url": "", "label": "x"},
        {"image_url": 5, "label": "x"},
        {"image_url": "a.png", "label": "  "},
    ])
    records, problems = load_records(path, MC)
    assert len(records) == 1
    by_line = {int(p.where.rsplit(":", 1)[1]): p.message for p in problems}
    assert all(p.where.startswith(str(path)) for p in problems)
    assert sorted(by_line) == list(range(2, 14))
    assert by_line[2].startswith("malformed JSON")
    assert "expected a JSON object" in by_line[3]
    assert "missing column 'image_url'" in by_line[4]
    assert "missing column 'label'" in by_line[5]
    assert "is a list" in by_line[6] and "image-classification-multilabel" in by_line[6]
    assert "boolean" in by_line[7]
    assert "fraction" in by_line[8]
    assert "null" in by_line[9]
    assert "object" in by_line[10]
    assert "image_url is empty" in by_line[11]
    assert "image_url is not text (5)" in by_line[12]
    assert "empty label" in by_line[13]


def test_multilabel_shapes(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"image_url": "a.png", "label": ["b", "a", "b", 3]},
        {"image_url": "a.png", "label": []},
        {"image_url": "a.png", "label": "a"},
        {"image_url": "a.png", "label": ["a", None]},
    ])
    records, problems = load_records(path, ML)
    assert [r.label for r in records] == [("3", "a", "b"), ()]
    assert [p.where.rsplit(":", 1)[1] for p in problems] == ["3", "4"]
    assert "single value" in problems[0].message
    assert "null" in problems[1].message


def test_label_helpers():
    assert normalize_label(12, MC) == "12"
    assert normalize_label(" cat ", MC) == "cat"
    assert parse_text_label("", ML) == ()
    with pytest.raises(ValueError):
        normalize_label(False, MC)


def test_folder_tree(tmp_path):
    root = tmp_path / "tree"
    png(root / "cat" / "1.png")
    png(root / "cat" / "sub" / "2.jpg")
    png(root / "dog" / "3.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    png(root / ".hidden" / "4.png")
    records, problems = load_records(root, MC)
    assert problems == []
    assert [(Path(r.image).name, r.label) for r in records] == [("1.png", "cat"), ("2.jpg", "cat"), ("3.png", "dog")]
    assert records[0].where == str(root / "cat" / "1.png")
    with pytest.raises(DataError, match="multi-class|one class per image"):
        load_records(root, ML)


def test_unusable_sources(tmp_path):
    with pytest.raises(DataError, match="data not found"):
        load_records(tmp_path / "nope.jsonl", MC)
    (tmp_path / "a.xlsx").write_bytes(b"x")
    with pytest.raises(DataError, match="unknown data format"):
        load_records(tmp_path / "a.xlsx", MC)
    (tmp_path / "arr.json").write_text('[{"image_url": "a.png", "label": "x"}]')
    with pytest.raises(DataError, match="JSON array"):
        load_records(tmp_path / "arr.json", MC)
    with pytest.raises(DataError, match="local folder or file"):
        load_records("azureml://datastores/x/paths/train", MC)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match="no MLTable file and no class subfolders"):
        load_records(empty, MC)
    with pytest.raises(UserError, match="unknown task"):
        load_records(tmp_path, "detection")


def test_bad_encoding_names_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"image_url": "a.png", "label": "x"}\n{"image_url": "\xff.png", "label": "y"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid utf-8"):
        load_records(path, MC)
    root = tmp_path / "t"
    root.mkdir()
    (root / "a.jsonl").write_bytes(path.read_bytes())
    (root / "MLTable").write_text("paths:\n  - file: a.jsonl\ntransformations:\n  - read_json_lines: {encoding: latin1}\n")
    assert [r.label for r in load_records(root, MC)[0]] == ["x", "y"]


def test_problem_str():
    assert str(Problem("a.jsonl:3", "bad")) == "a.jsonl:3: bad"


def test_relative_source_path(tmp_path, monkeypatch):
    png(tmp_path / "x.png")
    write_jsonl(tmp_path / "a.jsonl", [{"image_url": "x.png", "label": "a"}])
    monkeypatch.chdir(tmp_path)
    records, _ = load_records("a.jsonl", MC)
    assert records[0].image == os.path.join(str(tmp_path), "x.png")


def test_file_uri_forms(tmp_path):
    image = png(tmp_path / "pics" / "a.png")
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"image_url": "file:pics/a.png", "label": "relative"},
        {"image_url": "file://localhost" + image.as_uri()[len("file://"):], "label": "localhost"},
        {"image_url": "file://pics/a.png", "label": "host"},
    ])
    records, problems = load_records(path, MC)
    assert [r.image for r in records] == [str(image), str(image)]
    assert len(problems) == 1 and problems[0].where.endswith(":3")
    assert "file URI with a host ('pics')" in problems[0].message


def test_mltable_csv_header_modes(tmp_path):
    root = tmp_path / "t"
    png(root / "x.png")
    (root / "a.csv").write_text("image_url,label\nx.png,a\n")
    (root / "b.csv").write_text("x.png,b\n")
    table = "paths:\n  - pattern: ./*.csv\ntransformations:\n  - read_delimited:\n      header: {}\n"
    (root / "MLTable").write_text(table.format("from_first_file"))
    records, problems = load_records(root, MC)
    assert [(r.label, r.where.rsplit("/", 1)[1]) for r in records] == [("a", "a.csv:2"), ("b", "b.csv:1")]

    (root / "b.csv").write_text("label,image_url\nb,x.png\n")
    (root / "MLTable").write_text(table.format("all_files_different_headers"))
    assert [r.label for r in load_records(root, MC)[0]] == ["a", "b"]
    (root / "MLTable").write_text(table.format("all_files_same_headers"))
    with pytest.raises(DataError, match=r"b\.csv:1: the header differs"):
        load_records(root, MC)

    (root / "b.csv").unlink()
    (root / "MLTable").write_text(table.format("no_header"))
    records, problems = load_records(root, MC, image_column="Column1", label_column="Column2")
    assert [r.label for r in records] == ["label", "a"]  # no header: the first line is data
    with pytest.raises(DataError, match="Column1..Column2"):
        load_records(root, MC)
