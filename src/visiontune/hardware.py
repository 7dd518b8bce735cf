"""What this machine's CPU runs natively, and the training paths chosen from it.

bfloat16 is fast on a CPU only with AVX-512 BF16 or AMX instructions. Elsewhere (AVX2 only,
common on laptops and cloud VMs) PyTorch emulates it, several times slower than float32, and
the faster depthwise backward (``models/depthwise.py``) leaves its accuracy bound: there
``--precision 16`` trains in float32 and that path stays off, each with a note in the run's
log. BENCHMARKS.md has the measurements on both kinds of CPU.

``VISIONTUNE_CPU_BF16`` overrides the choice: ``1`` trains ``--precision 16`` in bf16 on any
CPU (the depthwise path still needs native bf16), ``0`` in float32 on every CPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

ENV_CPU_BF16 = "VISIONTUNE_CPU_BF16"


@dataclass(frozen=True)
class CpuKind:
    """``capability``: PyTorch's vector instruction level (``AVX2``, ``AVX512``, ...);
    ``native_bf16``: bfloat16 arithmetic in hardware (AVX-512 BF16 or AMX)."""

    capability: str
    native_bf16: bool

    def describe(self) -> str:
        return f"{self.capability}, " + ("native bf16" if self.native_bf16 else "bf16 emulated")


@functools.lru_cache(maxsize=1)
def cpu_kind() -> CpuKind:
    """This machine's CPU, as PyTorch sees it."""
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return CpuKind(torch.backends.cpu.get_cpu_capability(), bool(native))


def cpu_bf16(kind: CpuKind) -> tuple[bool, str]:
    """Whether ``--precision 16`` trains in bf16 on a CPU of this kind, and a note saying why."""
    from visiontune.inputs import env_flag

    forced = os.environ.get(ENV_CPU_BF16, "").strip()
    if forced:
        on = env_flag(ENV_CPU_BF16, kind.native_bf16)
        return on, (f"precision 16 runs as {'bf16 mixed precision' if on else 'float32'} on the "
                    f"CPU ({ENV_CPU_BF16}={forced}; this CPU: {kind.describe()})")
    if kind.native_bf16:
        return True, f"precision 16 runs as bf16 mixed precision on the CPU ({kind.describe()})"
    return False, (f"precision 16 runs as float32: this CPU has no native bf16 ({kind.capability}), "
                   f"where bf16 is several times slower; {ENV_CPU_BF16}=1 runs bf16 anyway")


def fast_depthwise_applies(kind: CpuKind) -> bool:
    """The faster bf16 depthwise backward: measured faster and within its accuracy bound only
    on CPUs with native bf16 (its tests state the same)."""
    return kind.native_bf16


def cpu_paths(kind: CpuKind, *, bf16: bool, deepspeed: bool) -> str:
    """One line for the run's notes: the CPU and which of its speed paths a training run takes."""
    from visiontune.models.depthwise import ENV_SWITCH as DEPTHWISE
    from visiontune.models.hardtanh import ENV_SWITCH as HARDTANH
    from visiontune.inputs import env_flag

    def state(on: bool, why_off: str) -> str:
        return "on" if on else f"off ({why_off})"

    if not bf16:
        depthwise = state(False, "bf16 only")
    elif deepspeed:
        depthwise = state(False, "not under DeepSpeed")
    elif not fast_depthwise_applies(kind):
        depthwise = state(False, "needs native bf16")
    else:
        depthwise = state(env_flag(DEPTHWISE, True), f"{DEPTHWISE}=0")
    return (f"CPU {kind.describe()}: bf16 autocast {state(bf16, 'float32')}, faster depthwise "
            f"backward {depthwise}, in-place ReLU6 {state(env_flag(HARDTANH, True), f'{HARDTANH}=0')}")
