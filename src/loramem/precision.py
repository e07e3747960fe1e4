"""Numeric precision: which one a run uses, the autocast that applies it, and what hardware it ran on.

"auto" means bf16 where the hardware multiplies bf16 natively (a GPU with bf16, a CPU with AVX-512 BF16 or
AMX; there a bf16 matmul ran 4.4x faster than fp32) and fp32 elsewhere (an AVX2 CPU only emulates bf16,
~100x slower). LORAMEM_PRECISION=bf16|fp32 forces one precision for a whole run wherever "auto" is asked.
On a CPU, bf16 means autocast over fp32 weights; on a GPU the weights themselves are bf16 (models.load_base).
"""

from __future__ import annotations

import functools
import os
import platform
from contextlib import contextmanager

import torch

from loramem.config import PRECISIONS
from loramem.errors import LoramemError

ENV = "LORAMEM_PRECISION"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # the CPU features of a native bf16 matmul


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise LoramemError(f"precision must be {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def requested(precision: str = "auto") -> str:
    """The precision asked for: an explicit one, else LORAMEM_PRECISION, else auto."""
    if check_precision(precision) == "auto":
        precision = os.environ.get(ENV) or "auto"
        if precision not in PRECISIONS:
            raise LoramemError(f"{ENV} must be {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve(precision: str = "auto", device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> str:
    """'bf16' or 'fp32': what a run asking for `precision` uses on `device` with weights of `dtype`."""
    device = device or torch.device("cpu")
    precision = requested(precision)
    if dtype == torch.bfloat16:  # bf16 weights (a GPU's) run in bf16 whatever autocast says
        if precision == "fp32":
            raise LoramemError(f"fp32 asked for, but the model's weights are bf16; load it with {ENV}=fp32")
        return "bf16"
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise LoramemError(f"bf16 asked for on {torch.cuda.get_device_name(device)}, which cannot run it")
    return precision


def use_bf16(precision: str, model: torch.nn.Module) -> bool:
    """Whether `model` runs a `precision` request in bf16 (its weights' device and dtype decide auto)."""
    weight = next(model.parameters())
    return resolve(precision, weight.device, weight.dtype) == "bf16"


def weights_dtype(device: torch.device) -> torch.dtype:
    """The dtype base weights are loaded in: bf16 on a GPU that runs bf16 (unless fp32 is forced), else fp32."""
    return torch.bfloat16 if device.type == "cuda" and resolve("auto", device) == "bf16" else torch.float32


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(cpu_bf16_flags())


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native bf16 matmul features (from /proc/cpuinfo; none where it cannot be read)."""
    return tuple(f for f in BF16_FLAGS if f in cpu_flags())


def preferred_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_precision() -> str:
    """The precision this process runs at on its preferred device with the weights it loads there."""
    device = preferred_device()
    return resolve("auto", device, weights_dtype(device))


def hardware(device: torch.device | None = None) -> dict:
    """What a result ran on, for every --json result: the device, its name, the CPU's vector features."""
    device = device or preferred_device()
    info = {"device": device.type, "cpu": platform.processor() or platform.machine(),
            "cpu_features": [f for f in ("avx2", "avx512f", *BF16_FLAGS) if f in cpu_flags()],
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@contextmanager
def autocast(enabled: bool, device: torch.device):
    """bf16 autocast when enabled (on a GPU the weights are already bf16; autocast keeps the LoRA math there too)."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled):
        yield
