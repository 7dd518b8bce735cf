"""Data in object storage, against real local servers: moto's S3 server, Azurite's Blob
service and gcp-storage-emulator for Google Cloud Storage (tests/stores.py). Images and whole data folders read from s3:// and az:// as from
local files, and from Azure Blob URLs with a SAS (Azurite's path-style form of them);
credentials and SAS tokens never in a message or an output."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs

import pandas as pd
import pytest

import visiontune
from tests.helpers import subset
from tests.stores import (
    AZURITE_ACCOUNT, AZURITE_KEY, azurite_available, blob_server, gcs_server, s3_server,
)
from visiontune.data import storage
from visiontune.data.check import check_data
from visiontune.data.images import read_image_bytes
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


def upload_images(fs, folder: str, digits, named: str) -> list[str]:
    """The images into folder, and a JSON line for each naming it as named/<its name>."""
    rows = []
    for path, label in digits:
        fs.put_file(path, f"{folder}/{Path(path).name}")
        rows.append(json.dumps({"image_url": f"{named}/{Path(path).name}", "label": label}) + "\n")
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
    rows = upload_images(stores["s3"], f"{BUCKET}/shared", digits, f"s3://{BUCKET}/shared")
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


# ---------------------------------------------------------------------------------------------
# Azure Blob URLs with a SAS, as the portal's "Generate SAS" gives them
# ---------------------------------------------------------------------------------------------
def container_sas(expiry: timedelta = timedelta(hours=1)) -> str:
    """A read+list SAS for the test container, signed with Azurite's public key."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return generate_container_sas(AZURITE_ACCOUNT, CONTAINER, account_key=AZURITE_KEY,
                                  permission=ContainerSasPermissions(read=True, list=True),
                                  expiry=datetime.now(timezone.utc) + expiry)


@pytest.fixture
def sas(stores, monkeypatch):
    """(the container's URL in Azurite's path-style form, a SAS for it), with the account's
    connection string unset: only the SAS grants access."""
    import adlfs

    endpoint = stores["az"].connection_string.split("BlobEndpoint=")[1].split(";")[0]
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    adlfs.AzureBlobFileSystem.clear_instance_cache()
    yield f"{endpoint.rstrip('/')}/{CONTAINER}", container_sas()
    adlfs.AzureBlobFileSystem.clear_instance_cache()


def signatures(token: str) -> tuple[str, str]:
    """A SAS's signature as it stands in the URL and decoded."""
    return token.split("sig=")[1].split("&")[0], parse_qs(token)["sig"][0]


def test_blob_urls_are_told_apart_from_other_urls():
    blob = storage.blob_url("https://acct.blob.core.windows.net/c/a%20b/x.jsonl?sp=rl&sig=S%3D")
    assert (blob.endpoint, blob.account, blob.path, blob.sas) == (
        "https://acct.blob.core.windows.net", "acct", "c/a b/x.jsonl", "sp=rl&sig=S%3D")
    lake = storage.blob_url("https://acct.dfs.core.windows.net/c/folder")
    assert (lake.endpoint, lake.base, lake.path, lake.sas) == (
        "https://acct.blob.core.windows.net", "https://acct.dfs.core.windows.net", "c/folder", "")
    emulator = storage.blob_url("http://127.0.0.1:10000/devstoreaccount1/c/f?sv=1&sig=S")
    assert (emulator.endpoint, emulator.path) == ("http://127.0.0.1:10000/devstoreaccount1", "c/f")
    for other in ("http://127.0.0.1:10000/devstoreaccount1/c/f", "https://example.com/c/f?sig=S",
                  "http://acct.blob.core.windows.net/c/f", "https://.blob.core.windows.net/c"):
        assert storage.blob_url(other) is None and not storage.is_object_uri(other), other
    assert storage.is_object_uri("https://acct.blob.core.windows.net/c/f")
    fs, path = storage.filesystem("https://acct.blob.core.windows.net/c/a%20b/x.jsonl?sp=rl&sig=S")
    assert path == "c/a b/x.jsonl" and fs.service_client.account_name == "acct"
    assert fs.service_client.url == "https://acct.blob.core.windows.net/?sp=rl&sig=S"


def test_an_annotation_file_and_a_folder_by_sas_url(sas, stores, digits):
    """Relative image paths point into the folder and are read with its SAS (no other
    credentials are set); the rows name them without it."""
    base, token = sas
    rows = upload_folder(stores["az"], f"{CONTAINER}/sas-train", digits)
    stores["az"].put_file(digits[0][0], f"{CONTAINER}/sas-train/images/digit zero.png")
    rows.append({"image_url": "images/digit zero.png", "label": digits[0][1]})
    stores["az"].pipe(f"{CONTAINER}/sas-train/annotations.jsonl",
                      "".join(json.dumps(r) + "\n" for r in rows).encode())
    images = [f"{base}/sas-train/images/{Path(p).name}" for p, _ in digits]
    images.append(f"{base}/sas-train/images/digit%20zero.png")
    for source in (f"{base}/sas-train/annotations.jsonl?{token}", f"{base}/sas-train?{token}"):
        records, problems = load_records(source, MC)
        assert problems == [] and [r.image for r in records] == images
        assert records[2].where == f"{base}/sas-train/annotations.jsonl:3"
        report, ok = check_data(source, MC)
        assert ok, report
        assert f"data: {source.split('?')[0]}?***" in report
        assert not any(s in report for s in signatures(token))
    assert read_image_bytes(records[-1].image) == Path(digits[0][0]).read_bytes()
    with pytest.raises(DataError, match=f"data not found: {base}/nothing-here\\?\\*\\*\\*$"):
        load_records(f"{base}/nothing-here?{token}", MC)


def test_an_mltable_with_sas_urls_as_file_and_pattern(sas, stores, digits, tmp_path):
    """A local MLTable naming annotation files by SAS URL; their images are URLs below those
    folders without a query, read with the folders' SAS."""
    base, token = sas
    rows = upload_images(stores["az"], f"{CONTAINER}/sas-parts/images", digits,
                         f"{base}/sas-parts/images")
    stores["az"].pipe(f"{CONTAINER}/sas-parts/a.jsonl", "".join(rows[:4]).encode())
    stores["az"].pipe(f"{CONTAINER}/sas-parts/more/b.jsonl", "".join(rows[4:8]).encode())
    stores["az"].pipe(f"{CONTAINER}/sas-parts/more/c.jsonl", "".join(rows[8:]).encode())
    stores["az"].pipe(f"{CONTAINER}/sas-parts/more/notes.txt", b"not annotations")
    (tmp_path / "MLTable").write_text(
        f"paths:\n  - file: {base}/sas-parts/a.jsonl?{token}\n"
        f"  - pattern: {base}/sas-parts/more/*.jsonl?{token}\n"
        "transformations:\n  - read_json_lines: {}\n")
    records, problems = load_records(tmp_path, MC)
    assert problems == [] and [r.image for r in records] == [json.loads(r)["image_url"]
                                                             for r in rows]
    assert records[5].where == f"{base}/sas-parts/more/b.jsonl:2"
    report, ok = check_data(tmp_path, MC)
    assert ok, report
    (tmp_path / "MLTable").write_text(f"paths:\n  - pattern: {base}/sas-parts/none/*.jsonl?{token}\n")
    with pytest.raises(DataError, match="matches no files") as raised:
        load_records(tmp_path, MC)
    assert f"{base}/sas-parts/none/*.jsonl?***" in str(raised.value)
    assert not any(s in str(raised.value) for s in signatures(token))


def test_a_wrong_or_expired_sas_is_one_line_without_the_sas(sas, stores, digits):
    base, token = sas
    upload_folder(stores["az"], f"{CONTAINER}/sas-denied", digits[:2])
    sig = signatures(token)[0]
    wrong = token.replace(sig, ("B" if sig[0] == "A" else "A") + sig[1:])
    for bad in (wrong, container_sas(expiry=-timedelta(hours=1))):
        with pytest.raises(DataError) as raised:
            load_records(f"{base}/sas-denied?{bad}", MC)
        message = str(raised.value)
        assert message.startswith(f"cannot list {base}/sas-denied?***: ") and "\n" not in message
        assert "authenticate" in message
        assert not any(s in message for s in (*signatures(bad), *signatures(token)))


def test_finetune_evaluate_and_predict_from_a_sas_folder_leave_the_sas_nowhere(
        sas, stores, digits, tiny_vit, tmp_path, capfd, caplog):
    """Nothing the runs write (cache, model folder, report, predictions) nor anything they
    print or log holds the SAS's signature."""
    caplog.set_level(logging.DEBUG)
    base, token = sas
    upload_folder(stores["az"], f"{CONTAINER}/sas-fit", digits)
    source = f"{base}/sas-fit?{token}"
    result = visiontune.finetune(
        model_path=tiny_vit, training_data=source, validation_data=source, task_name=MC,
        output_dir_pytorch=tmp_path / "out", number_of_epochs=1, image_height=32,
        image_width=32, number_of_workers=0, save_as_mlflow_model=False)
    assert result.classes == ["0", "1", "2"]
    visiontune.evaluate(model=tmp_path / "out", test_data=source, output_dir=tmp_path / "report")
    predicted = visiontune.predict(model=tmp_path / "out", data=source,
                                   output=tmp_path / "p.jsonl")
    assert predicted.predicted == len(digits)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == storage.ORIGIN for p in written)  # the cache is under tmp_path too
    captured = capfd.readouterr()
    assert f"{base}/sas-fit?***" in captured.out + captured.err + caplog.text  # it was shown
    for secret in signatures(token):
        assert not [p for p in written if secret.encode() in p.read_bytes()], secret
        assert secret not in captured.out + captured.err + caplog.text
