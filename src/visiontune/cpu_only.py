"""Leave triton unloaded on a machine without a GPU.

torchvision's v2 transforms and transformers' ``Trainer`` import ``torch._dynamo``, which
imports triton whenever it is installed (the CUDA wheels of torch install it). That maps
triton's compiler library and its Python modules into every process (the memory it costs:
BENCHMARKS.md, *Levers*), for a compiler of GPU kernels. Without a GPU nothing visiontune
runs uses it (torch.compile's CPU backend writes C++), so the CLI marks triton as absent
there, the way a CPU-only torch install has it: ``import triton`` raises
``ModuleNotFoundError`` and ``importlib.util.find_spec("triton")`` returns None, and torch and
transformers take their paths for a missing triton. ``VISIONTUNE_SKIP_TRITON=0`` keeps it;
with a GPU it stays.
"""

from __future__ import annotations

import logging
import sys

import torch

from visiontune import settings

log = logging.getLogger(__name__)

ENV_SWITCH = "VISIONTUNE_SKIP_TRITON"


def _has_accelerator() -> bool:
    if torch.cuda.is_available():  # NVIDIA and ROCm builds
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def skip_triton() -> bool:
    """Mark triton absent for this process when it has no GPU and triton is not loaded yet.
    True when it was marked (now or earlier)."""
    if "triton" in sys.modules:  # loaded already, or marked by an earlier call
        return sys.modules["triton"] is None
    if not settings.flag(ENV_SWITCH) or _has_accelerator():
        return False
    sys.modules["triton"] = None
    log.debug("no GPU: triton left unloaded")
    return True
