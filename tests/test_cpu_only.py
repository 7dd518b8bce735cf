"""Without a GPU the CLI leaves triton unloaded, the way a CPU-only torch install has it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from visiontune import cpu_only

# What the CLI does before a command, then the imports that load triton when it is present.
PROBE = r"""
import importlib.util, json, sys
from visiontune import cpu_only
marked = cpu_only.skip_triton()
import torchvision.transforms.v2
from transformers import Trainer
from torch.utils._triton import has_triton
print(json.dumps({"marked": marked, "loaded": sys.modules.get("triton") is not None,
                  "found": importlib.util.find_spec("triton") is not None,
                  "has_triton": has_triton()}))
"""

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")
no_gpu = pytest.mark.skipif(cpu_only._has_accelerator(), reason="this machine has a GPU")


def _probe(switch: str) -> dict:
    env = dict(os.environ, **{cpu_only.ENV_SWITCH: switch})
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
@no_gpu
def test_without_a_gpu_triton_stays_unloaded_and_reads_as_absent():
    assert _probe("1") == {"marked": True, "loaded": False, "found": False, "has_triton": False}
    # The switch keeps it: the same imports load it.
    kept = _probe("0")
    assert kept["marked"] is False and kept["loaded"] is True and kept["found"] is True


def test_with_a_gpu_or_triton_loaded_nothing_changes(monkeypatch):
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(cpu_only, "_has_accelerator", lambda: True)
    assert cpu_only.skip_triton() is False and "triton" not in sys.modules
    monkeypatch.setitem(sys.modules, "triton", object())  # loaded before the CLI ran
    monkeypatch.setattr(cpu_only, "_has_accelerator", lambda: False)
    assert cpu_only.skip_triton() is False


def test_the_cli_skips_triton_for_commands_that_load_torch(monkeypatch, tmp_path):
    from visiontune import cli

    calls = []
    monkeypatch.setattr(cpu_only, "skip_triton", lambda: calls.append("skip") or True)
    assert cli.main(["data", "check", "--data", str(tmp_path / "nope"),
                     "--task_name", "image-classification"]) == 2
    assert calls == []
    assert cli.main(["predict", "--model", str(tmp_path / "nope"),
                     "--data", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert calls == ["skip"]
