"""glibc malloc thresholds: freed tensor memory is reused without new page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from visiontune import malloc

# A training step in miniature: 40 tensors of 1-24 MB allocated, written and freed, ten times;
# prints the minor page faults per step after two warm-up steps.
STEPS = r"""
import json, resource, sys, torch
from visiontune import malloc
tuned = malloc.tune()
g = torch.Generator().manual_seed(0)
sizes = torch.randint(1 << 18, 6 << 20, (40,), generator=g).tolist()  # float32 elements
def step():
    kept = [torch.empty(n).fill_(1) for n in sizes]
    del kept
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"tuned": tuned, "faults": faults, "pages": sum(sizes) * 4 / 4096}))
"""

needs_glibc = pytest.mark.skipif(malloc._glibc() is None, reason="glibc only")


def _run(switch: str, script: str = STEPS) -> dict:
    env = dict(os.environ, **{malloc.ENV_SWITCH: switch})
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_tuned_steps_reuse_memory_and_glibcs_own_fault_it_in_again():
    tuned, plain = _run("1"), _run("0")
    assert tuned["tuned"] is True and plain["tuned"] is False
    # A step allocates about 130,000 pages: glibc's own thresholds return many of them to the
    # kernel and fault them in again (how many depends on the order of the process's first
    # allocations); the tuned heap keeps them. Relative to the pages a step allocates.
    assert plain["faults"] > 0.015 * plain["pages"]
    assert tuned["faults"] < 0.0075 * tuned["pages"]
    assert tuned["faults"] * 5 < plain["faults"]


def test_tune_runs_once_and_reports_the_same(monkeypatch):
    monkeypatch.setattr(malloc, "_tuned", None)
    monkeypatch.setenv(malloc.ENV_SWITCH, "0")
    assert malloc.tune() is False
    monkeypatch.setenv(malloc.ENV_SWITCH, "1")
    assert malloc.tune() is False  # decided once per process


RELEASE = r"""
import json, torch
from visiontune import malloc
malloc.tune()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
kept = [torch.ones(1 << 20) for _ in range(50)]  # 50 tensors of 4 MB, kept in the heap
del kept
held = rss_mb()
malloc.release()
print(json.dumps({"held": held, "released": rss_mb()}))
"""


@needs_glibc
def test_release_returns_the_kept_heap_to_the_kernel():
    done = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True,
                          timeout=120, check=True)
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert rss["held"] - rss["released"] > 150  # of the 200 MB freed


def test_the_cli_tunes_malloc_before_running_a_command(monkeypatch, tmp_path):
    from visiontune import cli

    calls = []
    monkeypatch.setattr(malloc, "tune", lambda: calls.append("tune") or True)
    assert cli.main(["data", "check", "--data", str(tmp_path / "nope"),
                     "--task_name", "image-classification"]) == 2
    assert calls == ["tune"]


# Another thread allocates and frees 120 MB; then the main thread allocates as much again.
ARENAS = r"""
import json, threading, torch
from visiontune import malloc
malloc.tune()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
def churn():
    kept = [torch.ones(1 << 20) for _ in range(30)]  # 30 tensors of 4 MB
    del kept
worker = threading.Thread(target=churn)
worker.start()
worker.join()
before = rss_mb()
kept = [torch.ones(1 << 20) for _ in range(30)]
print(json.dumps({"grew": rss_mb() - before, "allocated": 30 * 4}))
"""


@needs_glibc
def test_memory_another_thread_freed_serves_the_main_thread():
    # glibc's own arenas: the thread's freed blocks are unmapped or stay in its own arena, so
    # the main thread's 120 MB are new pages; one arena hands it the thread's blocks.
    runs = {switch: _run(switch, ARENAS) for switch in ("1", "0")}
    assert runs["0"]["grew"] > 0.8 * runs["0"]["allocated"]  # MB
    assert runs["1"]["grew"] < 0.2 * runs["1"]["allocated"]
