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

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo datasets (real digit images), written once per test session."""
    from visiontune.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root)
    return root


def subset(split_dir: Path, out: Path, n: int, per_class: bool = False,
           labels: tuple[str, ...] | None = None) -> Path:
    """The first ``n`` rows of a demo split as a JSON Lines file with absolute image paths
    (``per_class``: ``n`` rows of each class, for balanced tiny datasets; ``labels``: only
    rows of these classes)."""
    rows = [json.loads(l) for l in (split_dir / "images.jsonl").read_text().splitlines() if l.strip()]
    if labels is not None:
        rows = [row for row in rows if row["label"] in labels]
    chosen, counts = [], {}
    for row in rows:
        key = json.dumps(row["label"])
        if per_class:
            if counts.get(key, 0) >= n:
                continue
            counts[key] = counts.get(key, 0) + 1
        elif len(chosen) >= n:
            break
        chosen.append({**row, "image_url": str((split_dir / row["image_url"]).resolve())})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return out


def workers_config(number_of_workers: int | None = None):
    """A finetune config (placeholder paths) whose number_of_workers is given, or chosen by the
    defaults chain (8) when None."""
    from visiontune.config import FinetuneConfig, resolve
    from visiontune.training.defaults import apply_defaults

    given = {"model_path": "m", "training_data": "d", "task_name": "image-classification",
             "output_dir_pytorch": "o"}
    if number_of_workers is not None:
        return resolve(FinetuneConfig, {**given, "number_of_workers": number_of_workers})
    return apply_defaults(resolve(FinetuneConfig, given), None)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    return save_tiny_model("vit", tmp_path_factory.mktemp("tiny_vit"), num_labels=3, image_size=32)


def native_cpu_bf16() -> bool:
    from visiontune.hardware import cpu_kind

    return cpu_kind().native_bf16


# For tests of the bf16 paths' speed-motivated numerics, which run (and were measured) only on
# CPUs with native bf16; elsewhere visiontune trains precision 16 in float32 (hardware.py).
needs_native_bf16 = pytest.mark.skipif(
    not native_cpu_bf16(),
    reason="needs a CPU with native bf16 (AVX-512 BF16 or AMX), where visiontune's bf16 paths run; "
           "this CPU emulates bf16")


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


@pytest.fixture
def refused_port():
    """A loopback port that refuses connections for the whole test (bound, never listening),
    rather than one assumed to be closed."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
