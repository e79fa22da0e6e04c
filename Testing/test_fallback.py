"""CUDA out-of-memory fallback: halve the batch, then training-size windows, then the CPU (no GPU needed:
the device is the string "cuda:0" and the run raises torch's out-of-memory error)."""
from __future__ import annotations

import pytest
import torch

from UNetSegmentLib.engine.fallback import Attempt, LighterOnGpuOom, is_out_of_memory, run_with_fallback


GPU = "cuda:0"  # only a name here: nothing is sent to a GPU


def _kind(device: str) -> str:
    return device.split(":", 1)[0]


def _oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_halves_the_batch_until_it_fits():
    tried = []

    def run(a: Attempt):
        tried.append((a.batch_size, a.fit_window))
        if a.batch_size > 2:
            raise _oom()
        return "ok"

    warnings: list[str] = []
    out, used = run_with_fallback(run, Attempt(GPU, "fp16", 8, True), lambda: "fp32", warnings)
    assert out == "ok" and used.batch_size == 2 and _kind(used.device) == "cuda"
    assert tried == [(8, True), (4, True), (2, True)]
    assert len(warnings) == 2 and "batch size 8" in warnings[0]


def test_then_patch_windows_then_the_cpu():
    tried = []

    def run(a: Attempt):
        tried.append((_kind(a.device), a.batch_size, a.fit_window, a.precision))
        if _kind(a.device) == "cuda":
            raise _oom()
        return "cpu result"

    warnings: list[str] = []
    out, used = run_with_fallback(run, Attempt(GPU, "fp16", 2, True), lambda: "bf16", warnings)
    assert out == "cpu result" and used.device == "cpu" and used.precision == "bf16"
    assert tried == [("cuda", 2, True, "fp16"), ("cuda", 1, True, "fp16"), ("cuda", 2, False, "fp16"),
                     ("cuda", 1, False, "fp16"), ("cpu", 2, True, "bf16")]
    assert "CPU" in warnings[-1]


def test_other_errors_and_cpu_out_of_memory_are_not_swallowed():
    def boom(a):
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        run_with_fallback(boom, Attempt(GPU, "fp16", 4, True), lambda: "fp32", [])

    def cpu_oom(a):
        raise _oom()

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_fallback(cpu_oom, Attempt("cpu", "fp32", 4, True), lambda: "fp32", [])


def test_is_out_of_memory_recognises_torch_and_message_forms():
    assert is_out_of_memory(_oom())
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_host_memory_errors_on_a_gpu_run_are_not_retried_as_gpu_ones():
    def host_oom(a):
        raise MemoryError("cannot allocate 3 GiB")

    with pytest.raises(MemoryError):
        run_with_fallback(host_oom, Attempt(GPU, "fp16", 4, True), lambda: "fp32", [])


def test_the_caller_releases_the_gpu_before_the_cpu_attempt():
    released = []

    def run(a):
        if _kind(a.device) == "cuda":
            raise _oom()
        return released[:]

    out, _ = run_with_fallback(run, Attempt(GPU, "fp16", 1, False), lambda: "fp32", [], on_cpu=released.append)
    assert out == ["cuda:0"]


@pytest.mark.parametrize("device", ["mps", "cpu"])
def test_only_cuda_devices_fall_back(device):
    tried = []

    def run(a):
        tried.append(a.device)
        raise _oom()

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_fallback(run, Attempt(device, "fp32", 4, True), lambda: "fp32", [])
    assert tried == [device]


def test_any_cuda_index_falls_back_and_reports_which_gpu_to_release():
    released = []

    def run(a):
        if a.device.startswith("cuda"):
            raise _oom()
        return a.device

    out, used = run_with_fallback(run, Attempt("cuda:1", "fp16", 1, False), lambda: "fp32", [], on_cpu=released.append)
    assert out == "cpu" and used.precision == "fp32" and released == ["cuda:1"]


def test_a_heavier_pass_out_of_gpu_memory_gives_way_to_the_lighter_one_before_the_windows_or_device_change():
    """Grad-CAM in the inference pass needs its backward graph: when that runs out of GPU memory the same
    attempt runs inference alone (same batch, same windows, same device: the labels do not depend on
    the heatmap being asked for), and later attempts never go back to the heavier pass."""
    tried = []

    def heavy(a):
        tried.append(("heavy", a.batch_size, a.fit_window))
        raise _oom()

    def light(a):
        tried.append(("light", a.batch_size, a.fit_window))
        if a.batch_size > 2:
            raise _oom()
        return "labels"

    warnings: list[str] = []
    out, used = run_with_fallback(LighterOnGpuOom(heavy, light, warnings, "two passes"), Attempt(GPU, "fp16", 4, True),
                                  lambda: "bf16", warnings)
    assert out == "labels" and used == Attempt(GPU, "fp16", 2, True)
    assert tried == [("heavy", 4, True), ("light", 4, True), ("light", 2, True)]
    assert warnings[0] == "two passes" and len(warnings) == 2


def test_the_lighter_pass_is_not_taken_for_other_errors_or_off_the_gpu():
    def heavy(a):
        raise _oom() if a.device == "cpu" else ValueError("a bug")

    for device, error in ((GPU, ValueError), ("cpu", torch.cuda.OutOfMemoryError)):
        run = LighterOnGpuOom(heavy, lambda a: "light", [], "two passes")
        with pytest.raises(error):
            run(Attempt(device, "fp32", 2, True))
