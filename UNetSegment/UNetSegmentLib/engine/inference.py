"""Sliding-window inference with Gaussian blending, device/precision choice, TTA, progress and cancel.

One pure function, :func:`sliding_window`, in the spirit of MONAI's ``sliding_window_inference``:
the volume is a ``[C, K, J, I]`` float32 array on the network grid; windows are cut one batch at a
time (never a full-volume copy per window), run through ``predictor`` and blended with a Gaussian
importance map computed once per window size. 2D and 2.5D models use windows one slice deep
(2.5D: ``context`` neighbouring slices on each side become extra channels).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import CancelledError, DeviceError

ProgressFn = Callable[[str, float, str], None]


class CancelToken:
    """Set by another thread (GUI, signal handler, server) to stop a run between windows."""

    def __init__(self) -> None:
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check(self) -> None:
        if self._cancelled:
            raise CancelledError("run cancelled", "start it again when ready")


# --- device and precision --------------------------------------------------------------------
def resolve_device(name: str = "auto"):
    """``auto|cpu|cuda|cuda:N|mps`` → torch.device, or :class:`DeviceError` naming the fix."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        raise DeviceError("device 'mps' requested but Apple Metal is not available", "use --device cpu or auto")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but no CUDA GPU is available", "use --device cpu or auto")
        idx = 0 if name == "cuda" else name.split(":", 1)[1]
        if not str(idx).isdigit() or int(idx) >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA device(s))",
                "use cuda:0 … or --device auto",
            )
        return torch.device(f"cuda:{int(idx)}")
    raise DeviceError(f"unknown device {name!r}", "use one of auto, cpu, cuda, cuda:N, mps")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 matmuls beat fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_precision(precision: str, device) -> str:
    """``auto`` = fp16 on CUDA, bf16 on CPUs with AMX/AVX512-BF16, else fp32."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise DeviceError("fp16 is not supported on the CPU", "use --precision bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


# --- window geometry -------------------------------------------------------------------------
def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices covering ``size`` with windows of ``roi``, evenly spread, at least ``overlap`` apart."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    n = math.ceil((size - roi) / step) + 1
    return sorted({int(round(x)) for x in np.linspace(0, size - roi, n)})


@functools.lru_cache(maxsize=8)
def gaussian_importance(roi: tuple[int, ...], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable Gaussian weights (peak 1, floor > 0) for one window; cached per window size."""
    w = np.ones((), np.float32)
    for n in roi:
        if n == 1:
            g = np.ones(1, np.float32)
        else:
            x = np.arange(n, dtype=np.float32) - (n - 1) / 2
            g = np.exp(-0.5 * (x / (n * sigma_scale)) ** 2).astype(np.float32)
        w = np.multiply.outer(w, g)
    w = w / w.max()
    w = np.maximum(w, 1e-3)
    w.setflags(write=False)
    return w.astype(np.float32)


@dataclass
class WindowPlan:
    roi: tuple[int, int, int]  # (k, j, i) window size on the padded volume
    pad: tuple[tuple[int, int], ...]  # padding of (k, j, i) to reach at least roi
    starts: list[tuple[int, int, int]]

    def batches(self, batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
        for b in range(0, len(self.starts), batch_size):
            yield self.starts[b : b + batch_size]


def plan_windows(shape_kji: Sequence[int], roi_kji: Sequence[int], overlap: float, keep: Callable | None = None) -> WindowPlan:
    pad = tuple((0, max(0, r - s)) for s, r in zip(shape_kji, roi_kji))
    padded = [s + p[1] for s, p in zip(shape_kji, pad)]
    per_axis = [window_starts(s, r, overlap if r > 1 else 0.0) for s, r in zip(padded, roi_kji)]
    starts = [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]
    if keep is not None:
        starts = [s for s in starts if keep(s)]
    return WindowPlan(tuple(int(r) for r in roi_kji), pad, starts)


def tta_flips(spatial_dims: int, axes: Sequence[str] = ("i", "j", "k")) -> list[tuple[int, ...]]:
    """All mirror combinations over the given canonical axes (i = left–right, j = A–P, k = S–I).

    Models should only be mirrored along axes they were trained mirrored on: the bundle's
    ``inference.tta_axes`` (default left–right only). 2D models have no k axis.
    """
    tensor_axis = {"i": 1 + spatial_dims, "j": spatial_dims, "k": 2}
    dims = sorted(tensor_axis[a] for a in set(axes) if a in tensor_axis and (spatial_dims == 3 or a != "k"))
    out: list[tuple[int, ...]] = [()]
    for a in dims:
        out += [f + (a,) for f in out]
    return out


# --- the engine ------------------------------------------------------------------------------
WindowFn = Callable[["object", list], np.ndarray]


def blend_windows(
    volume: np.ndarray,
    roi: Sequence[int],
    fn: WindowFn,
    *,
    spatial_dims: int,
    out_channels: int,
    context: int = 0,
    overlap: float = 0.25,
    batch_size: int = 4,
    device=None,
    pad_value: Sequence[float] | None = None,
    keep_window: Callable | None = None,
    background: Sequence[float] | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    stage: str = "inference",
) -> np.ndarray:
    """Run ``fn`` on every window of ``volume`` [C, K, J, I] and blend its outputs with Gaussian weights.

    ``roi`` is (J, I) for 2D/2.5D models and (K, J, I) for 3D. ``fn`` takes a batch tensor
    [B, C', (k,) j, i] on ``device`` and the windows' (k, j, i) starts on the (padded) volume, and
    returns a numpy array [B, out_channels, (k,) j, i].
    Voxels no kept window covers get ``background`` (default zeros). Returns float32
    [out_channels, K, J, I].
    """
    import torch

    device = device or torch.device("cpu")
    roi_kji = (1, *roi) if spatial_dims == 2 else tuple(roi)
    C, K, J, I = volume.shape
    plan = plan_windows((K, J, I), roi_kji, overlap, keep_window)
    if any(p[1] for p in plan.pad):  # pad once, only the axes smaller than the window
        pad_value = [float(volume[c].min()) for c in range(C)] if pad_value is None else pad_value
        padded = np.empty((C, *(s + p[1] for s, p in zip((K, J, I), plan.pad))), np.float32)
        for c in range(C):
            padded[c] = pad_value[c]
        padded[:, :K, :J, :I] = volume
        volume = padded
    weights = gaussian_importance(roi_kji)
    acc = np.zeros((out_channels, *volume.shape[1:]), np.float32)
    norm = np.zeros(volume.shape[1:], np.float32)
    n_batches = max(1, math.ceil(len(plan.starts) / batch_size))
    t0 = time.perf_counter()
    for bi, batch in enumerate(plan.batches(batch_size)):
        if cancel is not None:
            cancel.check()
        x = torch.from_numpy(np.stack([_cut(volume, s, roi_kji, context) for s in batch])).to(device)
        out = fn(x[:, :, 0] if spatial_dims == 2 else x, batch)
        if spatial_dims == 2:
            out = out[:, :, None]
        for n, (k0, j0, i0) in enumerate(batch):
            sl = (slice(k0, k0 + roi_kji[0]), slice(j0, j0 + roi_kji[1]), slice(i0, i0 + roi_kji[2]))
            acc[(slice(None), *sl)] += out[n] * weights
            norm[sl] += weights
        if progress is not None:
            done = (bi + 1) / n_batches
            el = time.perf_counter() - t0
            progress(stage, done, f"ETA {el / done - el:.0f} s" if done < 1 else "")
    covered = norm > 0
    acc[:, covered] /= norm[covered]
    if not covered.all():
        bg = np.zeros(out_channels, np.float32) if background is None else np.asarray(background, np.float32)
        acc[:, ~covered] = bg[:, None]
    return acc[:, :K, :J, :I]


def sliding_window(
    volume: np.ndarray,
    network,
    roi: Sequence[int],
    *,
    spatial_dims: int,
    context: int = 0,
    out_channels: int,
    overlap: float = 0.25,
    batch_size: int = 4,
    device=None,
    precision: str = "fp32",
    tta: bool = False,
    tta_axes: Sequence[str] = ("i", "j", "k"),
    pad_value: Sequence[float] | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    keep_window: Callable | None = None,
    return_tta_variance: bool = False,
    crop_to_content: bool = False,
    fit_window: bool = False,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Blend softmax probabilities of ``network`` over ``volume`` [C, K, J, I].

    Returns float32 probabilities [out_channels, K, J, I] and, with ``tta`` and
    ``return_tta_variance``, the per-voxel variance of the foreground probability across the TTA
    passes (else None). Skipped windows (``keep_window`` False) count as certain background.

    The fast path (:mod:`.acceleration`): ``crop_to_content`` runs windows only over the box of
    non-background voxels and gives the rest the network's answer to a uniform window;
    ``fit_window`` (2D/2.5D) makes that one window per slice the size of the box; ``channels_last``
    feeds NHWC tensors (for a network prepared with :func:`acceleration.prepare_network`).
    """
    import torch

    from . import acceleration as acc

    if crop_to_content and keep_window is not None:
        raise ValueError("keep_window refers to windows of the whole volume: it cannot be combined with crop_to_content")
    flips = tta_flips(spatial_dims, tta_axes) if tta else [()]
    amp = autocast_dtype(precision)
    with_var = tta and return_tta_variance
    fmt = acc.memory_format(spatial_dims) if channels_last else torch.contiguous_format

    def predict(x, _starts):
        x = x.contiguous(memory_format=fmt)
        p_sum = sq_sum = None
        for f in flips:
            xi = torch.flip(x, f) if f else x
            with torch.autocast(device_type=x.device.type, dtype=amp, enabled=amp is not None):
                logits = network(xi)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            p = torch.softmax(logits.float(), dim=1)
            if f:
                p = torch.flip(p, f)
            p_sum = p if p_sum is None else p_sum + p
            if with_var:
                fg = 1 - p[:, :1]
                sq_sum = fg * fg if sq_sum is None else sq_sum + fg * fg
        mean = p_sum / len(flips)
        if with_var:
            var = (sq_sum / len(flips) - (1 - mean[:, :1]) ** 2).clamp_min(0)
            mean = torch.cat([mean, var], 1)
        return mean.float().cpu().numpy()

    n_out = out_channels + int(with_var)
    background = [1.0] + [0.0] * (out_channels - 1) + ([0.0] if with_var else [])
    full_shape_kji = volume.shape[1:]
    box = None
    if crop_to_content:
        train_roi = tuple(int(r) for r in roi)
        plan = acc.plan_content(volume, roi, network, spatial_dims, context, fit_window, pad_value)
        box, roi, bg_vals = plan.box, plan.roi, plan.background
        pad_value = bg_vals
        if box is None or plan.slabs or not acc.is_full(box, full_shape_kji):
            # everything outside the box: the plain path's answer there, i.e. a training-size window of
            # uniform background, Gaussian-weighted as blending weighs it; computed once
            shape = (volume.shape[0], *((1,) if spatial_dims == 2 else ()), *train_roi)
            uniform = np.ascontiguousarray(np.broadcast_to(bg_vals.astype(np.float32)[:, None, None, None], shape))
            with torch.inference_mode():
                u = blend_windows(uniform, train_roi, predict, spatial_dims=spatial_dims, out_channels=n_out,
                                  context=context, batch_size=1, device=device, pad_value=bg_vals)
            w = gaussian_importance(shape[1:])
            background = [float((u[c] * w).sum() / w.sum()) for c in range(n_out)]
        if box is None or plan.slabs:  # nothing but background / per-slab windows (2D, 2.5D)
            out = _paste(np.zeros((n_out, 0, 0, 0), np.float32), (slice(0, 0),) * 3, full_shape_kji, background)
            if plan.slabs:
                _run_slabs(volume, plan.slabs, out, predict, spatial_dims=spatial_dims, context=context, batch_size=batch_size,
                           device=device, pad_value=bg_vals, background=background, progress=progress, cancel=cancel)
            return (out[:out_channels], out[out_channels]) if with_var else (out, None)
        if acc.is_full(box, full_shape_kji):
            box = None
        else:
            volume = volume[(slice(None), *box)]
    elif fit_window and spatial_dims == 2:
        roi = acc.fitted_window(roi, volume.shape[2:], int(getattr(network, "size_divisor", 16)))
    with torch.inference_mode():
        out = blend_windows(
            volume, roi, predict, spatial_dims=spatial_dims, out_channels=n_out,
            context=context, overlap=overlap, batch_size=batch_size, device=device, pad_value=pad_value,
            keep_window=keep_window, background=background, progress=progress, cancel=cancel,
        )
    if box is not None:
        out = _paste(out, box, full_shape_kji, background)
    if with_var:
        return out[:out_channels], out[out_channels]
    return out, None


def _run_slabs(volume: np.ndarray, slabs, out: np.ndarray, predict, *, spatial_dims: int, context: int, batch_size: int,
               device, pad_value, background, progress: ProgressFn | None, cancel: CancelToken | None) -> None:
    """The fast 2D/2.5D path: each slab's slices windowed over its own in-plane box (written into ``out``)."""
    import torch

    total = sum(s.k1 - s.k0 for s in slabs)
    done, t0 = 0, time.perf_counter()
    for slab in slabs:
        first, last = slab.k0 - slab.box[0].start, slab.k1 - slab.box[0].start

        def report(stage, frac, _msg, n=slab.k1 - slab.k0, before=done):
            if progress is not None:
                f = (before + frac * n) / total
                el = time.perf_counter() - t0
                progress(stage, f, f"ETA {el / f - el:.0f} s" if 0 < f < 1 else "")

        with torch.inference_mode():
            res = blend_windows(volume[(slice(None), *slab.box)], slab.roi, predict, spatial_dims=spatial_dims,
                                out_channels=out.shape[0], context=context, batch_size=batch_size, device=device,
                                pad_value=pad_value, background=background, cancel=cancel, progress=report,
                                keep_window=lambda s, a=first, b=last: a <= s[0] < b)
        out[:, slab.k0 : slab.k1, slab.box[1], slab.box[2]] = res[:, first:last]
        done += slab.k1 - slab.k0


def _paste(sub: np.ndarray, box: tuple[slice, slice, slice], shape_kji: Sequence[int], fill: Sequence[float]) -> np.ndarray:
    """``sub`` [C, k, j, i] placed at ``box`` in a [C, K, J, I] array filled per channel with ``fill``."""
    out = np.empty((sub.shape[0], *shape_kji), np.float32)
    out[:] = np.asarray(fill, np.float32)[:, None, None, None]
    out[(slice(None), *box)] = sub
    return out


def _cut(volume: np.ndarray, start: tuple[int, int, int], roi_kji: tuple[int, int, int], context: int) -> np.ndarray:
    """One window [C', k, j, i]; 2.5D: the ``context`` neighbours of the slice (clamped) become channels."""
    k0, j0, i0 = start
    sj = slice(j0, j0 + roi_kji[1])
    si = slice(i0, i0 + roi_kji[2])
    if context == 0:
        return volume[:, k0 : k0 + roi_kji[0], sj, si]
    ks = np.clip(np.arange(k0 - context, k0 + context + 1), 0, volume.shape[1] - 1)
    w = volume[:, ks, sj, si]  # C, 2c+1, j, i → channel index = c·(2c+1) + neighbour
    return w.reshape(w.shape[0] * w.shape[1], 1, w.shape[2], w.shape[3])
