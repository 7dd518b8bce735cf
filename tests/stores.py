"""Loopback ports for the tests' servers, and object stores as real local servers: moto's S3 server (PyPI ``moto[server]``),
Azurite's Blob service (npm ``azurite``) and gcp-storage-emulator for Google Cloud Storage (PyPI). Each binds to 127.0.0.1, is given a bounded time
to answer, and is stopped by its own process id. Imports nothing from the test suite, so the
benchmarks import it too (``tests.stores``, from the repository root)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

START_S = 60
# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port for a server the test starts by name (torchrun, mlflow): outside the
    range the kernel hands out for outgoing connections and port 0 (so that nothing else on the
    machine takes it between now and the server's start), never the same twice in a session,
    and bindable now."""
    import random
    import socket

    low, high = 20000, 32000
    try:
        ephemeral = [int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split()]
        if ephemeral[0] > 10000:
            high = min(high, ephemeral[0])
    except (OSError, ValueError):
        pass
    draw = random.Random()
    for _ in range(1000):
        port = draw.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port")


def _wait(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (with an error for an anonymous request): it is up
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"no answer from {url} within {START_S} s: {log.read_text()[-2000:]}")


@contextmanager
def _server(command: list[str], url: str, log: Path) -> Iterator[None]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait(url, process, log)
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@contextmanager
def s3_server(folder: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server; yields the environment an S3 client needs to reach it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                 url, folder / "moto.log"):
        yield {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def azurite_available() -> str | None:
    return shutil.which("azurite-blob")


@contextmanager
def blob_server(folder: Path) -> Iterator[dict[str, str]]:
    """Azurite's Blob service; yields the environment an Azure Blob client needs to reach it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    command = [azurite_available() or "azurite-blob", "--blobHost", "127.0.0.1", "--blobPort",
               str(port), "--location", str(folder / "azurite"), "--silent", "--skipApiVersionCheck"]
    with _server(command, url, folder / "azurite.log"):
        yield {"AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={url};")}


@contextmanager
def gcs_server(folder: Path) -> Iterator[dict[str, str]]:
    """gcp-storage-emulator (in memory); yields the environment gcsfs needs to reach it. gcsfs's
    experimental bucket-type probe speaks gRPC, which the emulator does not: it is turned off."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
               "--port", str(port), "--in-memory"]
    with _server(command, f"{url}/storage/v1/b", folder / "gcs.log"):
        yield {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
