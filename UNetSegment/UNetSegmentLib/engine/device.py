"""Which device and precision a run uses: ``auto`` resolved against what this machine has."""
from __future__ import annotations

import functools

from ..errors import DeviceError
from ..params import PRECISIONS


def resolve_device(name: str = "auto") -> str:
    """``auto|cpu|cuda|cuda:N|mps`` → the device to run on (``"cpu"``, ``"cuda:0"``, ``"mps"``), or
    :class:`DeviceError` naming the fix. ``cpu`` needs no torch import (the Slicer panel, ``--help``)."""
    name = (name or "auto").strip().lower()
    if name == "cpu":
        return "cpu"
    import torch

    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "mps":
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        raise DeviceError("device 'mps' requested but Apple Metal is not available", "use --device cpu or auto")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but no CUDA GPU is available", "use --device cpu or auto")
        idx = "0" if name == "cuda" else name.split(":", 1)[1]
        if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA device(s))",
                "use cuda:0 … or --device auto",
            )
        return f"cuda:{int(idx)}"
    raise DeviceError(f"unknown device {name!r}", "use one of auto, cpu, cuda, cuda:N, mps")


def device_type(device: str) -> str:
    return str(device).split(":", 1)[0]


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 matmuls beat fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` = fp16 on CUDA, bf16 on CPUs with AMX/AVX512-BF16, else fp32."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    kind = device_type(device)
    if precision != "auto":
        if precision == "fp16" and kind == "cpu":
            raise DeviceError("fp16 is not supported on the CPU", "use --precision bf16 or fp32 on the CPU")
        return precision
    if kind == "cuda":
        return "fp16"
    if kind == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def cpu_fallback_precision(asked: str) -> str:
    """The precision of a CPU retry after the GPU ran out of memory: what was asked where the CPU has it."""
    return asked if asked in ("fp32", "bf16") else resolve_precision("auto", "cpu")


def autocast_dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
