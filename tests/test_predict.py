"""``visiontune predict``: every --data form, both output formats, unreadable images."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import subset
from tests.test_evaluate import CLASSES, make_model, read_jsonl
from visiontune.cli import main
from visiontune.config import resolve
from visiontune.data.images import load_image
from visiontune.errors import UserError
from visiontune.inference import Classifier
from visiontune.inputs import MULTICLASS, MULTILABEL, PREDICT_INPUTS
from visiontune.prediction import run_predict

# mlflow's advice on input examples when a model is saved: not ours to act on.
pytestmark = pytest.mark.filterwarnings("ignore:.*input example:UserWarning")


@pytest.fixture(scope="module")
def images(demo_dir, tmp_path_factory):
    """Six digit images in a nested folder (names chosen so sorting is not insertion order)."""
    root = tmp_path_factory.mktemp("predict_images") / "images"
    rows = read_jsonl(subset(demo_dir / "digits" / "test", root.parent / "rows.jsonl", 6))
    names = ["b/2.png", "a.png", "b/1.png", "c/d/0.png", "z.png", "m.png"]
    for row, name in zip(rows, names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["image_url"], root / name)
    (root / "notes.md").write_text("not an image, not listed")
    (root / ".hidden").mkdir()
    shutil.copy(rows[0]["image_url"], root / ".hidden" / "x.png")
    return root, sorted(str((root / n).resolve()) for n in names)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("predict_model") / "m", MULTICLASS)


@pytest.fixture(scope="module")
def expected(digits_model, images):
    """What the model itself says for each image, by absolute path."""
    _, paths = images
    probs = Classifier(digits_model, device="cpu").probabilities([load_image(p) for p in paths])
    return dict(zip(paths, probs))


def predict(**given):
    return run_predict(resolve(PREDICT_INPUTS, {k: str(v) for k, v in given.items()}))


def _check_jsonl(path, expected, order):
    rows = read_jsonl(path)
    assert [r["image"] for r in rows] == order
    for row in rows:
        assert list(row["probs"]) == CLASSES
        probs = np.array([row["probs"][c] for c in CLASSES])
        assert np.allclose(probs, expected[row["image"]], atol=1e-6)
        assert row["predicted_label"] == CLASSES[int(np.argmax(probs))]
        assert "error" not in row


def _data_forms(root, paths, tmp):
    """The same images as each supported --data form; the row order each should give."""
    rel = [str(Path(p).relative_to(root)) for p in paths]
    shuffled = rel[::-1]  # listed forms keep the listing order
    listing = root / "list.txt"
    listing.write_text("# images to score\n" + "\n".join(shuffled) + "\n\n")
    jsonl = root / "images.jsonl"  # no label column: predict does not need one
    jsonl.write_text("".join(json.dumps({"image_url": r}) + "\n" for r in shuffled))
    table = root / "images.csv"
    table.write_text("image_url,extra\n" + "".join(f"{r},x\n" for r in shuffled))
    mltable = tmp / "mltable"
    mltable.mkdir()
    (mltable / "rows.jsonl").write_text(
        "".join(json.dumps({"img": str(root / r)}) + "\n" for r in shuffled))
    (mltable / "MLTable").write_text(
        "paths:\n  - file: ./rows.jsonl\ntransformations:\n  - read_json_lines:\n"
        "      encoding: utf8\n  - convert_column_types:\n      - columns: img\n"
        "        column_type: stream_info\n")
    listed = [str((root / r).resolve()) for r in shuffled]
    return [(root, {}, paths), (listing, {}, listed), (jsonl, {}, listed), (table, {}, listed),
            (mltable, {"image_column": "img"}, listed)]


def test_every_data_form(digits_model, images, expected, tmp_path, capsys):
    root, paths = images
    for i, (data, extra, order) in enumerate(_data_forms(root, paths, tmp_path)):
        out = tmp_path / f"out{i}.jsonl"
        assert predict(model=digits_model, data=data, output=out, batch_size=4, **extra) == 0, data
        _check_jsonl(out, expected, order)
    assert "predicted 6 of 6 image(s)" in capsys.readouterr().out


def test_csv_output_matches_jsonl(digits_model, images, expected, tmp_path):
    root, paths = images
    assert predict(model=digits_model, data=root, output=tmp_path / "p.csv") == 0
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "predicted", *(f"prob_{c}" for c in CLASSES), "error"]
    assert [r["image"] for r in rows] == paths
    for row in rows:
        probs = np.array([float(row[f"prob_{c}"]) for c in CLASSES])
        assert np.allclose(probs, expected[row["image"]], atol=1e-6)
        assert row["predicted"] == CLASSES[int(np.argmax(probs))] and row["error"] == ""


def test_unreadable_images_become_error_rows(digits_model, images, expected, tmp_path, capsys):
    root, paths = images
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[0]}\nbroken.png\nmissing.jpg\n{paths[1]}\n")
    out = tmp_path / "p.jsonl"
    assert predict(model=digits_model, data=listing, output=out, batch_size=2) == 0
    rows = read_jsonl(out)
    assert [r["image"] for r in rows] == [paths[0], str(tmp_path / "broken.png"),
                                          str(tmp_path / "missing.jpg"), paths[1]]
    for bad in rows[1:3]:
        assert bad["predicted_label"] is None and bad["probs"] is None and bad["error"]
    assert "not found" in rows[2]["error"]
    for row in (rows[0], rows[3]):
        assert np.allclose([row["probs"][c] for c in CLASSES], expected[row["image"]], atol=1e-6)
    printed = capsys.readouterr().out
    assert "predicted 2 of 4 image(s)" in printed and "2 image(s) could not be read" in printed

    # The CSV form keeps the row, with an empty prediction.
    assert predict(model=digits_model, data=listing, output=tmp_path / "p.csv") == 0
    with (tmp_path / "p.csv").open() as handle:
        bad = list(csv.DictReader(handle))[2]
    assert bad["predicted"] == "" and bad["prob_0"] == "" and "not found" in bad["error"]

    # Nothing readable: exit code 1, still one row per image.
    only_bad = tmp_path / "bad.txt"
    only_bad.write_text("broken.png\nmissing.jpg\n")
    assert predict(model=digits_model, data=only_bad, output=tmp_path / "none.jsonl") == 1
    assert len(read_jsonl(tmp_path / "none.jsonl")) == 2


def test_rows_without_an_image_are_error_rows(digits_model, images, tmp_path):
    _, paths = images
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"image_url": paths[0]}) + "\n" + json.dumps({"other": 1})
                    + "\n{broken\n")
    assert predict(model=digits_model, data=data, output=tmp_path / "p.jsonl") == 0
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert rows[0]["predicted_label"] in CLASSES
    assert "no image in column 'image_url'" in rows[1]["error"]
    assert "malformed JSON" in rows[2]["error"]


def test_multilabel_uses_stored_per_class_thresholds(tmp_path, images):
    from visiontune.model_folder import ModelFolder

    root, paths = images
    model = make_model(tmp_path / "ml", MULTILABEL)
    classifier = Classifier(model, device="cpu")
    probs = classifier.probabilities([load_image(p) for p in paths])
    # Thresholds between the images' probabilities, so that each class splits the images.
    thresholds = [float(np.median(probs[:, c])) for c in range(len(CLASSES))]
    meta_path = model / "model_selector_args.json"
    meta = json.loads(meta_path.read_text())
    ModelFolder(model).write_metadata({**meta, "multilabel_threshold": thresholds})

    assert predict(model=model, data=root, output=tmp_path / "p.jsonl") == 0
    rows = read_jsonl(tmp_path / "p.jsonl")
    want = [[c for c, p, t in zip(CLASSES, row, thresholds) if p >= t] for row in probs]
    assert [r["predicted_labels"] for r in rows] == want
    assert want != [[c for c, p in zip(CLASSES, row) if p >= 0.5] for row in probs]

    assert predict(model=model, data=root, output=tmp_path / "p.csv") == 0
    with (tmp_path / "p.csv").open() as handle:
        assert [r["predicted"] for r in csv.DictReader(handle)] == [";".join(w) for w in want]


def test_mlflow_model_folder(digits_model, images, expected, tmp_path):
    from visiontune.serving.mlflow_model import save_mlflow_model

    root, paths = images
    mlflow_dir = save_mlflow_model(digits_model, tmp_path / "mlflow")
    assert predict(model=mlflow_dir, data=root, output=tmp_path / "p.jsonl") == 0
    _check_jsonl(tmp_path / "p.jsonl", expected, paths)


def test_bad_output_extension_is_a_one_line_error(digits_model, images, tmp_path, capsys):
    root, _ = images
    code = main(["predict", "--model", str(digits_model), "--data", str(root),
                 "--output", str(tmp_path / "p.parquet")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert ".parquet" in err and ".jsonl or .csv" in err
    assert not (tmp_path / "p.parquet").exists()


def test_clear_errors_for_model_and_data(digits_model, tmp_path):
    with pytest.raises(UserError, match="--model: folder not found"):
        predict(model=tmp_path / "nope", data=tmp_path, output=tmp_path / "p.jsonl")
    with pytest.raises(UserError, match="no model in"):
        predict(model=tmp_path, data=tmp_path, output=tmp_path / "p.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        predict(model=digits_model, data=tmp_path / "empty", output=tmp_path / "p.jsonl")
    (tmp_path / "data.xlsx").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown data format"):
        predict(model=digits_model, data=tmp_path / "data.xlsx", output=tmp_path / "p.jsonl")
