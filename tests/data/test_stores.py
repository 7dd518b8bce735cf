"""Data in object storage, against real local servers: moto's S3 server, Azurite's Blob
service and gcp-storage-emulator for Google Cloud Storage (tests/stores.py). Images and whole data folders read from s3:// and az:// as from
local files; credentials and SAS tokens never in a message or an output."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pandas as pd
import pytest

import visiontune
from tests.helpers import subset
from tests.stores import azurite_available, blob_server, gcs_server, s3_server
from visiontune.data.check import check_data
from visiontune.data.sources import load_records
from visiontune.errors import DataError

MC = "image-classification"
BUCKET, CONTAINER, GCS_BUCKET = "vt-bucket", "vt-container", "vt-gcs"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Both servers for the module, with the environment their clients read."""
    import adlfs
    import s3fs

    if not azurite_available():
        pytest.skip("azurite is not installed (npm install -g azurite; .ci/run installs it)")
    folder = tmp_path_factory.mktemp("stores")
    with s3_server(folder) as s3_env, blob_server(folder) as blob_env, \
            pytest.MonkeyPatch.context() as patch:
        for name, value in {**s3_env, **blob_env}.items():
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        adlfs.AzureBlobFileSystem.clear_instance_cache()
        s3, blob = s3fs.S3FileSystem(), adlfs.AzureBlobFileSystem()
        s3.mkdir(BUCKET)
        blob.mkdir(CONTAINER)
        yield {"s3": s3, "az": blob}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """Google Cloud Storage's emulator for the module; gcsfs imported once its variables are set."""
    folder = tmp_path_factory.mktemp("gcs")
    with gcs_server(folder) as env, pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
        fs = gcsfs.GCSFileSystem()
        fs.mkdir(GCS_BUCKET)
        yield fs
        gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONTUNE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits(demo_dir, tmp_path_factory):
    """Digits 0-2, four of each: (image path, label)."""
    listing = subset(demo_dir / "digits" / "train", tmp_path_factory.mktemp("d") / "d.jsonl", 4,
                     per_class=True, labels=("0", "1", "2"))
    return [(json.loads(l)["image_url"], json.loads(l)["label"])
            for l in listing.read_text().splitlines()]


def upload_folder(fs, root: str, digits) -> list[dict]:
    """images/<name> and annotations.jsonl with relative paths, plus an MLTable, under root."""
    rows = []
    for path, label in digits:
        fs.put_file(path, f"{root}/images/{Path(path).name}")
        rows.append({"image_url": f"images/{Path(path).name}", "label": label})
    fs.pipe(f"{root}/annotations.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    fs.pipe(f"{root}/MLTable", b"paths:\n  - file: ./annotations.jsonl\ntransformations:\n"
                               b"  - read_json_lines: {}\n")
    return rows


def test_images_in_s3_and_blob_storage_read_like_local_files(stores, digits, tmp_path):
    rows = []
    for number, (path, label) in enumerate(digits):
        scheme = "s3" if number % 2 else "az"
        key = f"{BUCKET if scheme == 's3' else CONTAINER}/loose/{Path(path).name}"
        stores[scheme].put_file(path, key)
        rows.append({"image_url": f"{scheme}://{key}", "label": label})
    listing = tmp_path / "remote.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report, ok = check_data(listing, MC)
    assert ok, report
    records, problems = load_records(listing, MC)
    assert problems == [] and [r.image for r in records] == [r["image_url"] for r in rows]
    from visiontune.data.images import read_image_bytes

    assert read_image_bytes(records[1].image) == Path(digits[1][0]).read_bytes()
    # Fetched once: the check put every image in the cache, so the stores are not needed again.
    stores["s3"].rm(f"{BUCKET}/loose", recursive=True)
    assert read_image_bytes(records[1].image) == Path(digits[1][0]).read_bytes()


def test_a_data_folder_in_s3_with_relative_image_paths(stores, digits):
    upload_folder(stores["s3"], f"{BUCKET}/train", digits)
    records, problems = load_records(f"s3://{BUCKET}/train", MC)
    assert problems == []
    assert [r.image for r in records] == [f"s3://{BUCKET}/train/images/{Path(p).name}"
                                          for p, _ in digits]
    assert records[2].where == f"s3://{BUCKET}/train/annotations.jsonl:3"
    stores["s3"].pipe(f"{BUCKET}/train/annotations.jsonl",
                      b'{"image_url": "images/missing.png", "label": "0"}\n')
    report, ok = check_data(f"s3://{BUCKET}/train/", MC)  # changed in the store: read again
    assert not ok
    assert f"s3://{BUCKET}/train/annotations.jsonl:1: image not found: " \
           f"s3://{BUCKET}/train/images/missing.png" in report


def test_mltable_paths_in_stores_as_file_folder_and_pattern(stores, digits, tmp_path):
    """A local MLTable whose annotation files are in the stores; their image URIs absolute."""
    rows = []
    for path, label in digits:
        stores["s3"].put_file(path, f"{BUCKET}/shared/{Path(path).name}")
        rows.append(json.dumps({"image_url": f"s3://{BUCKET}/shared/{Path(path).name}",
                                "label": label}) + "\n")
    stores["s3"].pipe(f"{BUCKET}/parts/a.jsonl", "".join(rows[:4]).encode())
    stores["s3"].pipe(f"{BUCKET}/parts/b.jsonl", "".join(rows[4:8]).encode())
    stores["s3"].pipe(f"{BUCKET}/parts/notes.txt", b"not annotations")
    stores["az"].pipe(f"{CONTAINER}/more/c.jsonl", "".join(rows[8:]).encode())
    (tmp_path / "MLTable").write_text(
        f"paths:\n  - pattern: s3://{BUCKET}/parts/*.jsonl\n"
        f"  - folder: az://{CONTAINER}/more\ntransformations:\n  - read_json_lines: {{}}\n")
    records, problems = load_records(tmp_path, MC)
    assert problems == [] and len(records) == len(digits)
    assert [r.image for r in records] == [json.loads(r)["image_url"] for r in rows]
    assert records[5].where == f"s3://{BUCKET}/parts/b.jsonl:2"
    (tmp_path / "MLTable").write_text(f"paths:\n  - pattern: s3://{BUCKET}/nothing/*.jsonl\n")
    with pytest.raises(DataError, match="matches no files"):
        load_records(tmp_path, MC)


def test_a_parquet_file_with_embedded_images_in_blob_storage(stores, digits):
    frame = pd.DataFrame({"image": [Path(p).read_bytes() for p, _ in digits],
                          "label": [label for _, label in digits]})
    with stores["az"].open(f"{CONTAINER}/tables/train.parquet", "wb") as handle:
        frame.to_parquet(handle)
    records, problems = load_records(f"az://{CONTAINER}/tables/train.parquet", MC)
    assert problems == [] and [r.label for r in records] == [label for _, label in digits]
    assert Path(records[0].image).read_bytes() == Path(digits[0][0]).read_bytes()
    assert records[0].where == f"az://{CONTAINER}/tables/train.parquet:1"


def test_finetune_on_data_in_blob_storage_and_s3(stores, digits, tiny_vit, tmp_path):
    upload_folder(stores["az"], f"{CONTAINER}/train", digits)
    upload_folder(stores["s3"], f"{BUCKET}/validation", digits[::2])
    result = visiontune.finetune(
        model_path=tiny_vit, training_data=f"az://{CONTAINER}/train",
        validation_data=f"s3://{BUCKET}/validation", task_name=MC,
        output_dir_pytorch=tmp_path / "out", number_of_epochs=1, image_height=32,
        image_width=32, number_of_workers=0, save_as_mlflow_model=False)
    assert result.classes == ["0", "1", "2"]
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["accuracy"] == result.metrics["accuracy"] and 0.0 <= saved["accuracy"] <= 1.0


def test_google_cloud_storage_images_folders_and_finetune(gcs, digits, tiny_vit, tmp_path):
    """gs:// as the other stores: image references, a data folder with relative paths (read
    again when it changes in the store), and a fine-tune from it."""
    two = list({label: path for path, label in digits}.items())[:2]  # two classes
    listing = tmp_path / "loose.jsonl"
    for label, path in two:
        gcs.put_file(path, f"{GCS_BUCKET}/loose/{Path(path).name}")
        with listing.open("a") as out:
            out.write(json.dumps({"image_url": f"gs://{GCS_BUCKET}/loose/{Path(path).name}",
                                  "label": label}) + "\n")
    report, ok = check_data(listing, MC)
    assert ok, report
    from visiontune.data.images import read_image_bytes

    assert read_image_bytes(f"gs://{GCS_BUCKET}/loose/{Path(path).name}") == Path(path).read_bytes()
    upload_folder(gcs, f"{GCS_BUCKET}/train", digits)
    records, problems = load_records(f"gs://{GCS_BUCKET}/train", MC)
    assert problems == [] and [r.image for r in records] == [
        f"gs://{GCS_BUCKET}/train/images/{Path(p).name}" for p, _ in digits]
    assert records[2].where == f"gs://{GCS_BUCKET}/train/annotations.jsonl:3"
    result = visiontune.finetune(
        model_path=tiny_vit, training_data=f"gs://{GCS_BUCKET}/train", task_name=MC,
        output_dir_pytorch=tmp_path / "out", number_of_epochs=1, image_height=32,
        image_width=32, number_of_workers=0, save_as_mlflow_model=False)
    assert result.classes == ["0", "1", "2"]
    gcs.pipe(f"{GCS_BUCKET}/train/annotations.jsonl", b'{"image_url": "images/gone.png", "label": "0"}\n')
    report, ok = check_data(f"gs://{GCS_BUCKET}/train", MC)
    assert not ok and f"image not found: gs://{GCS_BUCKET}/train/images/gone.png" in report
    with pytest.raises(DataError, match=f"data not found: gs://{GCS_BUCKET}/nothing-here"):
        load_records(f"gs://{GCS_BUCKET}/nothing-here", MC)


def test_missing_data_and_bad_credentials_are_one_line_without_secrets(stores, monkeypatch):
    with pytest.raises(DataError, match=f"data not found: s3://{BUCKET}/nothing-here"):
        load_records(f"s3://{BUCKET}/nothing-here", MC)
    import adlfs

    secret = "c2VjcmV0LWtleS1mb3ItdGhlLXRlc3Q="
    connection = stores["az"].connection_string.replace(
        stores["az"].connection_string.split("AccountKey=")[1].split(";")[0], secret)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection)
    adlfs.AzureBlobFileSystem.clear_instance_cache()
    try:
        with pytest.raises(DataError) as raised:
            load_records(f"az://{CONTAINER}/train", MC)
    finally:
        adlfs.AzureBlobFileSystem.clear_instance_cache()
    message = str(raised.value)
    assert message.startswith(f"cannot list az://{CONTAINER}/train: ") and "\n" not in message
    assert secret not in message


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_a_sas_token_never_reaches_a_message_or_an_output(tiny_vit, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = (f"http://127.0.0.1:{server.server_address[1]}/container/a.png"
               "?sv=2024-01-01&sp=r&sig=TOPSECRETSIGNATURE")
        listing = tmp_path / "images.txt"
        listing.write_text(url + "\n")
        result = visiontune.predict(model=tiny_vit, data=listing, output=tmp_path / "p.jsonl")
        report, ok = check_data(_annotations(tmp_path, url), MC)
    finally:
        server.shutdown()
    written = (tmp_path / "p.jsonl").read_text()
    assert result.predicted == 0 and "TOPSECRETSIGNATURE" not in written + str(result.errors)
    assert "/container/a.png?***" in written and "HTTP 404" in written
    assert not ok and "TOPSECRETSIGNATURE" not in report and "HTTP 404" in report


def _annotations(folder: Path, url: str) -> Path:
    path = folder / "a.jsonl"
    path.write_text(json.dumps({"image_url": url, "label": "0"}) + "\n")
    return path
