"""Sliding-window inference over a :class:`.windows.WindowPlan`, with Gaussian blending, TTA, progress and cancel.

In the spirit of MONAI's inferers: the configuration is bound once (the plan, made by
:func:`.windows.plan_windows`; the predictor, made by :func:`softmax_predictor` and wrapped by
:func:`with_mirror_tta`), and :func:`sliding_window` is a pure function of the volume. The volume is
a ``[C, K, J, I]`` float32 array on the network grid; windows are cut one batch at a time (never a
full-volume copy per window). 2D and 2.5D models see windows one slice deep (2.5D: the plan's
``context`` neighbouring slices on each side become extra channels).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import CancelledError
from .device import autocast_dtype
from .windows import Region, WindowGrid, WindowPlan, gaussian_importance, grid_windows, is_full

ProgressFn = Callable[[str, float, str], None]
#: a batch of windows [B, C', (k,) j, i] on the device and their (k, j, i) starts in the region → [B, n, (k,) j, i]
WindowFn = Callable[["object", list], np.ndarray]
#: the same for :func:`run_plan`, which also passes the region the windows lie in
RegionWindowFn = Callable[["object", list, Region], np.ndarray]


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


# --- predictors: the network's softmax, and variants by wrapping ---------------------------------
@dataclass(frozen=True)
class Predictor:
    """``fn(x)`` → class probabilities (a float32 tensor [B, out_channels, ...]) for a batch of windows."""

    fn: Callable
    out_channels: int

    def __call__(self, x):
        return self.fn(x)


def softmax_predictor(network, out_channels: int, precision: str = "fp32", temperature: float = 1.0) -> Predictor:
    """Softmax of ``network``'s logits divided by ``temperature`` (the model's calibration, Guo et al.
    2017: one scalar fitted on held-out cases; 1 = none), the forward pass under autocast for ``fp16``/``bf16``."""
    import torch

    amp = autocast_dtype(precision)
    if not (temperature > 0):
        raise ValueError(f"temperature must be positive, got {temperature}")
    scale = 1.0 / float(temperature)

    def predict(x):
        with torch.autocast(device_type=x.device.type, dtype=amp, enabled=amp is not None):
            logits = network(x)
        if isinstance(logits, (list, tuple)):  # deep supervision: the full-resolution head
            logits = logits[0]
        logits = logits.float()
        return torch.softmax(logits * scale if scale != 1.0 else logits, dim=1)

    return Predictor(predict, out_channels)


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


def with_mirror_tta(inner: Predictor, flips: Sequence[tuple[int, ...]],
                    lesion_channels: Sequence[int] | None = None) -> Predictor:
    """The mean of ``inner`` over mirrored copies of each window (test-time augmentation), plus one more
    channel: the per-voxel variance of P(lesion) across the copies — the sum of the ``lesion_channels``
    (default: every channel but the background, i.e. 1 − P(background))."""
    import torch

    def lesion_probability(p):
        if lesion_channels is None or set(lesion_channels) == set(range(1, p.shape[1])):
            return 1 - p[:, :1]  # every label a lesion (as before, bit for bit)
        return p[:, list(lesion_channels)].sum(1, keepdim=True)

    def predict(x):
        p_sum = sq_sum = None
        for f in flips:
            p = inner(torch.flip(x, f) if f else x)
            if f:
                p = torch.flip(p, f)
            fg = lesion_probability(p)
            p_sum = p if p_sum is None else p_sum + p
            sq_sum = fg * fg if sq_sum is None else sq_sum + fg * fg
        mean = p_sum / len(flips)
        var = (sq_sum / len(flips) - lesion_probability(mean) ** 2).clamp_min(0)
        return torch.cat([mean, var], 1)

    return Predictor(predict, inner.out_channels + 1)


# --- running a plan ------------------------------------------------------------------------------
def sliding_window(volume: np.ndarray, predictor: Predictor, plan: WindowPlan, *, batch_size: int = 4,
                   device: str = "cpu", progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> np.ndarray:
    """``predictor`` blended over the windows of ``plan`` on ``volume`` [C, K, J, I].

    ``batch_size``: windows per forward pass; ``device``: where the windows are sent (the
    predictor's network must be there); ``progress(stage, fraction, message)`` after each batch;
    ``cancel`` is checked before each batch. Returns float32 [predictor.out_channels, K, J, I]; voxels
    outside the plan's regions get the predictor's answer to a uniform background window."""
    import torch

    def fn(x, _starts, _region):
        return predictor(x).float().cpu().numpy()

    with torch.inference_mode():
        return run_plan(volume, plan, fn, predictor.out_channels, outside_answer(predictor, plan, device),
                        batch_size=batch_size, device=device, progress=progress, cancel=cancel)


def outside_answer(predictor: Predictor, plan: WindowPlan, device: str) -> np.ndarray:
    """Per output channel, what voxels outside the plan's regions get: the answer to a uniform background
    window (:func:`uniform_answer`), or plain background where the regions cover the volume."""
    if plan.whole:
        return np.array([1.0] + [0.0] * (predictor.out_channels - 1), np.float32)
    return uniform_answer(predictor, plan, device)


def uniform_answer(predictor: Predictor, plan: WindowPlan, device: str) -> np.ndarray:
    """Per output channel, the predictor's answer to a training-size window of uniform background
    (the plan's pad values), Gaussian-weighted as blending weighs it: what every window outside the
    body would give, computed once."""
    import torch

    roi_kji = (1, *plan.patch) if plan.spatial_dims == 2 else tuple(plan.patch)
    shape = (len(plan.pad_value), *roi_kji)
    uniform = np.ascontiguousarray(np.broadcast_to(plan.pad_value.astype(np.float32)[:, None, None, None], shape))
    one = grid_windows(roi_kji, roi_kji, 0.0)

    def fn(x, _starts):
        return predictor(x).float().cpu().numpy()

    with torch.inference_mode():
        u = blend_region(uniform, one, fn, plan, predictor.out_channels, np.zeros(predictor.out_channels, np.float32),
                         batch_size=1, device=device, on_batch=lambda n: None, cancel=None)
    w = gaussian_importance(roi_kji)
    return np.array([float((u[c] * w).sum() / w.sum()) for c in range(predictor.out_channels)], np.float32)


def run_plan(volume: np.ndarray, plan: WindowPlan, fn: RegionWindowFn, out_channels: int, fill: np.ndarray, *,
             batch_size: int, device: str, keep: Callable[[Region, tuple[int, int, int]], bool] | None = None,
             progress: ProgressFn | None = None, cancel: CancelToken | None = None, stage: str = "inference") -> np.ndarray:
    """``fn`` on every window of every region of ``plan``, blended; [out_channels, K, J, I] float32.

    ``fill``: per channel, the value of voxels no window covers; ``keep(region, start)`` drops windows
    (Grad-CAM: those without a voxel to explain)."""
    single = len(plan.regions) == 1 and plan.regions[0].write_k is None and is_full(plan.regions[0].box, plan.shape)
    out = None
    if not single:  # one region over the whole volume (the plain plan): its blend is the result, no second copy
        out = np.empty((out_channels, *plan.shape), np.float32)
        out[:] = np.asarray(fill, np.float32)[:, None, None, None]
    total = max(1, plan.n_windows(keep))
    done, t0 = 0, time.perf_counter()

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            f, el = done / total, time.perf_counter() - t0
            progress(stage, f, f"ETA {el / f - el:.0f} s" if f < 1 else "")

    for region in plan.regions:
        grid = region.window_grid(plan.spatial_dims, plan.overlap, None if keep is None else (lambda s, r=region: keep(r, s)))
        part = blend_region(volume[(slice(None), *region.box)], grid, lambda x, s, r=region: fn(x, s, r), plan,
                            out_channels, fill, batch_size=batch_size, device=device, on_batch=report, cancel=cancel)
        if out is None:
            return part
        if region.write_k is None:
            out[(slice(None), *region.box)] = part
        else:
            k0, k1 = region.write_k[0] - region.box[0].start, region.write_k[1] - region.box[0].start
            out[(slice(None), *region.written)] = part[:, k0:k1]
    return out


def blend_region(volume: np.ndarray, grid: WindowGrid, fn: WindowFn, plan: WindowPlan, out_channels: int, fill: np.ndarray, *,
                 batch_size: int, device: str, on_batch: Callable[[int], None], cancel: CancelToken | None) -> np.ndarray:
    """The windows of ``grid`` over one region ``volume`` [C, k, j, i] (padded with the plan's pad values
    where a window is larger), blended with Gaussian weights; uncovered voxels get ``fill``."""
    import torch

    C, K, J, I = volume.shape
    roi = grid.roi
    if any(p[1] for p in grid.pad):  # pad once, only the axes smaller than the window
        padded = np.empty((C, *(s + p[1] for s, p in zip((K, J, I), grid.pad))), np.float32)
        padded[:] = plan.pad_value[:, None, None, None]
        padded[:, :K, :J, :I] = volume
        volume = padded
    # one window per slice covering it (the fitted 2D windows): nothing overlaps, so blending would
    # divide each window's weights out again (up to float rounding); its result is written as it is
    tiled = (roi[0] == 1 and roi[1] >= volume.shape[2] and roi[2] >= volume.shape[3]
             and all(j == 0 and i == 0 for _, j, i in grid.starts))
    weights = gaussian_importance(roi)
    acc = np.zeros((out_channels, *volume.shape[1:]), np.float32)
    norm = None if tiled else np.zeros(volume.shape[1:], np.float32)
    for batch in grid.batches(batch_size):
        if cancel is not None:
            cancel.check()
        x = torch.from_numpy(np.stack([_cut(volume, s, roi, plan.context) for s in batch])).to(device)
        res = fn(x[:, :, 0] if plan.spatial_dims == 2 else x, batch)
        if plan.spatial_dims == 2:
            res = res[:, :, None]
        for n, (k0, j0, i0) in enumerate(batch):
            sl = (slice(k0, k0 + roi[0]), slice(j0, j0 + roi[1]), slice(i0, i0 + roi[2]))
            if tiled:
                acc[(slice(None), *sl)] = res[n]
            else:
                acc[(slice(None), *sl)] += res[n] * weights
                norm[sl] += weights
        on_batch(len(batch))
    if tiled:
        covered = np.zeros(volume.shape[1], bool)
        covered[[k for k, _, _ in grid.starts]] = True
        if not covered.all():
            acc[:, ~covered] = np.asarray(fill, np.float32)[:, None, None, None]
        return acc[:, :K, :J, :I]
    covered = norm > 0
    acc[:, covered] /= norm[covered]
    if not covered.all():
        acc[:, ~covered] = np.asarray(fill, np.float32)[:, None]
    return acc[:, :K, :J, :I]


def slice_with_context(volume: np.ndarray, k: int, context: int) -> np.ndarray:
    """Slice ``k`` of ``volume`` [C, K, J, I] as the 2.5D network sees it: [C·(2·context+1), J, I], each
    channel's ``context`` neighbours on either side (clamped at the ends) in order, channel by channel."""
    ks = np.clip(np.arange(k - context, k + context + 1), 0, volume.shape[1] - 1)
    w = volume[:, ks]
    return w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])


def _cut(volume: np.ndarray, start: tuple[int, int, int], roi_kji: Sequence[int], context: int) -> np.ndarray:
    """One window [C', k, j, i]; 2.5D: the ``context`` neighbours of the slice become channels."""
    k0, j0, i0 = start
    sj = slice(j0, j0 + roi_kji[1])
    si = slice(i0, i0 + roi_kji[2])
    if context == 0:
        return volume[:, k0 : k0 + roi_kji[0], sj, si]
    return slice_with_context(volume[:, :, sj, si], k0, context)[:, None]
