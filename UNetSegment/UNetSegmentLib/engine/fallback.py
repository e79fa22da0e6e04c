"""Out-of-GPU-memory fallback: smaller batches, then training-size windows, then the CPU, with a message.

GPU out-of-memory errors are among the commonest complaints about AI extensions; a run should
degrade, not die. :func:`run_with_fallback` calls ``run(Attempt)`` and, on a CUDA out-of-memory
error, frees the cache and retries with half the batch (down to 1), then without fitted windows
(2D/2.5D: training-size patches), then on the CPU. Each step is recorded as a warning.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

T = TypeVar("T")


def is_out_of_memory(exc: BaseException) -> bool:
    """Any out-of-memory error (GPU or host), for messages."""
    return is_gpu_out_of_memory(exc) or isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def is_gpu_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error only (a host ``MemoryError`` would not be helped by a smaller GPU batch)."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "cuda out of memory" in str(exc).lower()


@dataclass(frozen=True)
class Attempt:
    device: str  # "cpu", "cuda:0", "mps"
    precision: str
    batch_size: int
    fit_window: bool  # 2D/2.5D fast plan: one fitted window per slice (else training-size windows)


def run_with_fallback(run: Callable[[Attempt], T], first: Attempt, cpu_precision: Callable[[], str],
                      warnings: list[str], on_cpu: Callable[[object], None] = lambda gpu: None) -> tuple[T, Attempt]:
    """``run(first)``, falling back on CUDA out-of-memory as the module says; returns (result, attempt used).

    ``cpu_precision()`` gives the precision for the CPU attempt; ``on_cpu(gpu_device)`` is called before
    it, to release what the caller holds on the GPU."""
    a = first
    while True:
        try:
            return run(a), a
        except Exception as exc:  # noqa: BLE001 - only out-of-memory on CUDA is handled, the rest re-raised
            if not str(a.device).startswith("cuda") or not is_gpu_out_of_memory(exc):
                raise
            _free_cuda_cache()
            if a.batch_size > 1:
                nxt = replace(a, batch_size=max(1, a.batch_size // 2))
                warnings.append(f"GPU out of memory at batch size {a.batch_size}: retrying with {nxt.batch_size}")
            elif a.fit_window:
                nxt = replace(a, fit_window=False, batch_size=first.batch_size)
                warnings.append("GPU out of memory with whole-slice windows: retrying with the model's patch size")
            else:
                nxt = Attempt("cpu", cpu_precision(), first.batch_size, first.fit_window)
                on_cpu(a.device)
                _free_cuda_cache()
                warnings.append("GPU out of memory even at batch size 1: ran on the CPU instead (slower); "
                                "close other GPU programs to use the GPU")
            a = nxt


class LighterOnGpuOom:
    """``run(attempt)``, or ``lighter(attempt)`` once ``run`` has run out of GPU memory (on this attempt and every
    later one): e.g. inference with Grad-CAM in the same pass, whose backward graph needs more memory,
    falling back to inference alone (Grad-CAM then runs separately, with its own fallback) before the
    windows or the device change — so asking for a heatmap never changes the labels. ``message`` is
    recorded once as a warning."""

    def __init__(self, run: Callable, lighter: Callable, warnings: list[str], message: str) -> None:
        self.run, self.lighter, self.warnings, self.message = run, lighter, warnings, message
        self.lightened = False

    def __call__(self, attempt: "Attempt"):
        if not self.lightened:
            try:
                return self.run(attempt)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory on CUDA is handled, the rest re-raised
                if not str(attempt.device).startswith("cuda") or not is_gpu_out_of_memory(exc):
                    raise
                _free_cuda_cache()
                self.lightened = True
                self.warnings.append(self.message)
        return self.lighter(attempt)


def _free_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
