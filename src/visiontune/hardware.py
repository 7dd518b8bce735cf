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
import logging
import os
import re
from dataclasses import dataclass

import torch

from visiontune import settings
from visiontune.models.depthwise import ENV_SWITCH as DEPTHWISE
from visiontune.models.hardtanh import ENV_SWITCH as HARDTANH
from visiontune.ranks import local_rank

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
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return CpuKind(torch.backends.cpu.get_cpu_capability(), bool(native))


def cpu_bf16(kind: CpuKind) -> tuple[bool, str]:
    """Whether ``--precision 16`` trains in bf16 on a CPU of this kind, and a note saying why."""
    if settings.is_set(ENV_CPU_BF16):
        forced = settings.text(ENV_CPU_BF16)
        on = settings.flag(ENV_CPU_BF16, kind.native_bf16)
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
    def state(on: bool, why_off: str) -> str:
        return "on" if on else f"off ({why_off})"

    if not bf16:
        depthwise = state(False, "bf16 only")
    elif deepspeed:
        depthwise = state(False, "not under DeepSpeed")
    elif not fast_depthwise_applies(kind):
        depthwise = state(False, "needs native bf16")
    else:
        depthwise = state(settings.flag(DEPTHWISE), f"{DEPTHWISE}=0")
    return (f"CPU {kind.describe()}: bf16 autocast {state(bf16, 'float32')}, faster depthwise "
            f"backward {depthwise}, in-place ReLU6 {state(settings.flag(HARDTANH), f'{HARDTANH}=0')}")


# ---------------------------------------------------------------------------------------------
# GPUs: what torch can use, and the options chosen from it
# ---------------------------------------------------------------------------------------------
ENV_TF32 = "VISIONTUNE_TF32"
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"
NVIDIA_DEVICE_FILE = "/dev/nvidia0"
ONNX_CUDA, ONNX_CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# The oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA release notes, table 3).
MIN_DRIVER = {11: (450, 80), 12: (525, 60), 13: (580, 65)}
WHEEL_HINT = ("pip install torch --index-url https://download.pytorch.org/whl/cu126 "
              "(a CUDA 12.6 build, for older drivers and GPUs)")


@dataclass(frozen=True)
class GpuKind:
    """What torch sees of the GPUs, with what the operating system shows of an NVIDIA GPU.

    ``capability``: this process's GPU's compute capability (None without a usable GPU);
    ``torch_cuda``: the CUDA version torch was built for (None: a CPU-only build);
    ``arch_list``: the GPU architectures this torch has kernels for (``sm_75``, ...);
    ``driver``: the NVIDIA driver's version from the kernel module, when it is loaded;
    ``nvidia_visible``: an NVIDIA device or driver is present (``/dev/nvidia0``,
    ``/proc/driver/nvidia``), whether or not torch can use it."""

    cuda_available: bool = False
    device_count: int = 0
    capability: tuple[int, int] | None = None
    name: str = ""
    torch_cuda: str | None = None
    arch_list: tuple[str, ...] = ()
    driver: str | None = None
    nvidia_visible: bool = False
    hip: bool = False

    def describe(self) -> str:
        if not self.cuda_available:
            return "no usable GPU"
        cc = f"compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        build = "ROCm build" if self.hip else f"CUDA {self.torch_cuda}"
        return f"{self.name or 'GPU'} ({', '.join(filter(None, [cc, build]))}; " \
               f"{self.device_count} on this node)"


def _read_driver(path: str = NVIDIA_DRIVER_FILE) -> str | None:
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None


@functools.lru_cache(maxsize=1)
def gpu_kind() -> GpuKind:
    """This machine's GPUs as torch sees them (the GPU asked about is this process's own, so
    that no rank touches GPU 0 before its device is set)."""
    driver = _read_driver()
    visible = driver is not None or os.path.exists(NVIDIA_DEVICE_FILE)
    hip = bool(getattr(torch.version, "hip", None))
    if not torch.cuda.is_available():
        return GpuKind(torch_cuda=torch.version.cuda, driver=driver, nvidia_visible=visible, hip=hip)
    count = torch.cuda.device_count()
    device = local_rank() % count
    return GpuKind(True, count, tuple(torch.cuda.get_device_capability(device)),
                   torch.cuda.get_device_name(device), torch.version.cuda,
                   tuple(torch.cuda.get_arch_list()), driver, visible or not hip, hip)


def _version(text: str | None) -> tuple[int, ...]:
    parts = []
    for part in (text or "").split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def gpu_warning(kind: GpuKind) -> str | None:
    """One line when an NVIDIA GPU is there but torch cannot use it (or has no kernels for it),
    naming torch's CUDA build and what to do; None when all is well or there is no GPU."""
    build = f"torch {torch.__version__.split('+')[0]}"
    if kind.cuda_available:
        if kind.hip or not kind.capability or not kind.arch_list:
            return None
        sm = kind.capability[0] * 10 + kind.capability[1]
        archs = [int(a.split("_")[1]) for a in kind.arch_list if a.startswith("sm_") and a[3:].isdigit()]
        if archs and sm < min(archs):
            return (f"{kind.name or 'this GPU'} (compute capability {kind.capability[0]}."
                    f"{kind.capability[1]}) has no kernels in {build} (built for CUDA "
                    f"{kind.torch_cuda}: sm_{min(archs)} and newer); {WHEEL_HINT}")
        return None
    if not kind.nvidia_visible:
        return None
    driver = f"driver {kind.driver}" if kind.driver else "driver not loaded"
    if kind.torch_cuda is None:
        return (f"an NVIDIA GPU is present ({driver}) but {build} is a CPU-only build: training "
                "runs on the CPU; install a CUDA build of torch to use the GPU")
    need = MIN_DRIVER.get((_version(kind.torch_cuda) or (0,))[0])
    if need and kind.driver and _version(kind.driver)[:2] < need:
        return (f"an NVIDIA GPU is present but {build} is built for CUDA {kind.torch_cuda}, which "
                f"needs NVIDIA driver {need[0]}.{need[1]} or newer ({driver}): training runs on "
                f"the CPU; update the driver, or {WHEEL_HINT}")
    return (f"an NVIDIA GPU is present ({driver}) but {build} (CUDA {kind.torch_cuda}) cannot "
            "use it: training runs on the CPU; check nvidia-smi and that the driver supports CUDA "
            f"{kind.torch_cuda}, or {WHEEL_HINT}")


@functools.lru_cache(maxsize=None)
def warn_unusable_gpu(kind: GpuKind) -> str | None:
    """``gpu_warning``, logged once per process (a run plans more than once)."""
    line = gpu_warning(kind)
    if line:
        logging.getLogger("visiontune").warning(line)
    return line


def tf32_applies(kind: GpuKind) -> bool:
    """TF32 matrix products (the Trainer's ``tf32``): GPUs of compute capability 8.0 and newer,
    unless ``VISIONTUNE_TF32=0``."""
    on_ampere = kind.cuda_available and not kind.hip and bool(kind.capability) and kind.capability[0] >= 8
    return on_ampere and settings.flag(ENV_TF32)


def local_processes(kind: GpuKind, environ=os.environ) -> int:
    """How many processes of this run share this node: LOCAL_WORLD_SIZE (torchrun), else, under a
    launcher that does not set it (Azure ML's), one per GPU up to WORLD_SIZE, and on a CPU-only
    node every process of the run."""
    given = (environ.get("LOCAL_WORLD_SIZE") or "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    world = (environ.get("WORLD_SIZE") or "").strip()
    world_size = int(world) if world.isdigit() and int(world) > 0 else 1
    if kind.cuda_available and kind.device_count:
        return max(1, min(world_size, kind.device_count))
    return world_size


def workers_per_process(cpus: int, kind: GpuKind, environ=os.environ) -> int:
    """This process's share of the node's CPUs, for data-loader workers."""
    return max(1, cpus // local_processes(kind, environ))


def gpu_training_options(kind: GpuKind) -> dict:
    """TrainingArguments keywords for a GPU run: TF32 where it applies, pinned host memory and
    non-blocking host-to-device copies (the next batch is copied while the step computes)."""
    options: dict = {"dataloader_pin_memory": True, "accelerator_config": {"non_blocking": True}}
    if tf32_applies(kind):
        options["tf32"] = True
    return options


def normalise_on_device(kind: GpuKind) -> bool:
    """A GPU run's loader sends uint8 batches and the GPU scales and normalises them
    (``data.transforms.DeviceNormalize``): a quarter of the bytes to copy, and the loader's
    cores freed of per-pixel float work. Not on the CPU, where it would only move the work."""
    return bool(kind.cuda_available)


def gpu_paths(kind: GpuKind, options: dict, on_device: bool = False) -> str:
    """One line for the run's notes: the GPU and which of its options the run takes."""
    def state(on: bool, why_off: str) -> str:
        return "on" if on else f"off ({why_off})"

    if not kind.capability or kind.capability[0] < 8 or kind.hip:
        tf32_off = "needs compute capability 8.0"
    else:
        tf32_off = f"{ENV_TF32}=0"
    return (f"GPU {kind.describe()}: TF32 matrix products {state(bool(options.get('tf32')), tf32_off)}, "
            f"pinned memory and non-blocking copies {state(options['dataloader_pin_memory'], 'CPU')}, "
            f"uint8 batches normalised on the GPU {state(on_device, 'no CUDA device')}")


def onnx_providers(available, kind: GpuKind) -> list[str]:
    """ONNX Runtime's execution providers for scoring: CUDA first on a GPU machine when this
    onnxruntime has it (onnxruntime-gpu), the CPU otherwise and as the fallback."""
    if ONNX_CUDA in set(available) and (kind.cuda_available or kind.nvidia_visible) and not kind.hip:
        return [ONNX_CUDA, ONNX_CPU]
    return [ONNX_CPU]
