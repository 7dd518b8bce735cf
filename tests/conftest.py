"""Shared test setup: everything offline, nothing downloaded at run time."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The caches of this run (decoded images; downloads, extracted images and check records) go to
# temporary folders, not ~/.cache.
for _name in ("VISIONTUNE_IMAGE_CACHE_DIR", "VISIONTUNE_CACHE_DIR"):
    if _name not in os.environ:
        import atexit
        import shutil
        import tempfile

        os.environ[_name] = tempfile.mkdtemp(prefix="visiontune-test-cache-")
        atexit.register(shutil.rmtree, os.environ[_name], ignore_errors=True)

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo datasets (real digit images), written once per test session."""
    from visiontune.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root)
    return root


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    from tests.tiny_models import save_tiny_model

    return save_tiny_model("vit", tmp_path_factory.mktemp("tiny_vit"), num_labels=3, image_size=32)


@pytest.fixture
def stated_cpu(monkeypatch):
    """``stated_cpu(native_bf16)``: this process sees a CPU of that kind, as visiontune's
    ``hardware.cpu_kind`` reads it (PyTorch's own capability checks answer accordingly)."""
    import torch

    from visiontune import hardware

    def state(native_bf16: bool, capability: str = "AVX512"):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.delenv(hardware.ENV_CPU_BF16, raising=False)
        hardware.cpu_kind.cache_clear()
        return hardware.cpu_kind()

    yield state
    hardware.cpu_kind.cache_clear()


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(read_only=False)``: a fresh tmpfs mounted on a new folder, as Azure ML mounts each
    output (a mount point of its own file system); unmounted after the test. Skipped where
    mounts are not permitted (they need root)."""
    import subprocess

    mounted = []

    def mount(read_only: bool = False) -> Path:
        point = tmp_path / f"mount{len(mounted)}"
        point.mkdir()
        options = "size=64m" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); "
                        "the mounted-output tests need root")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def refused_port():
    """A loopback port that refuses connections for the whole test (bound, never listening),
    rather than one assumed to be closed."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
