"""Inference speed-ups. Each is a pure transformation with a test against the plain path and a stated
tolerance (``Testing/test_acceleration.py``, ``Testing/test_default_model.py``: on the sample head CT
in fp32, labels Dice ≥ 0.999 (8 of 6.5 M voxels changed), |Δp| ≤ 0.01 at 99.99 % of voxels, 0.18 at
most at single voxels near the edge of small slabs), and a measured gain (``bench/inference_vs_monai.py``).

* :func:`fold_batchnorm` — eval-mode BatchNorm folded into the convolution before it (exact up to
  float rounding): one pass over each activation map instead of two.
* :func:`prepare_network` — the folded network in the channels-last (NHWC/NDHWC) layout that
  oneDNN's CPU convolutions, bf16 ones above all, run fastest on.
* :func:`content_box` — the box around the voxels that differ from the background value (air on a
  CT, after the window clip). Outside it every window is uniform, and its output is the network's
  answer to a uniform window, computed once (:func:`uniform_prediction`) instead of per window.
* :func:`fitted_window` — for 2D/2.5D models, one window per slice sized to the content box (rounded
  up to the network's size divisor, so at most divisor − 1 rows/columns of padding) instead of
  overlapping training-size patches: nothing is run twice. The box is taken per slab of
  :data:`SLAB_SLICES` slices, so windows shrink where the head does (vertex, skull base).
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

#: in-plane margin (voxels) kept around the content box, so that the network sees the head's edge
#: against real background, as in the whole-volume path, before the window's zero padding
CONTENT_MARGIN = 8
#: a separate piece of the body is kept when at least this fraction of the largest piece
MIN_PART = 0.05
#: largest fitted 2D window side; beyond it the training patch size slides as usual
MAX_FITTED_SIDE = 512


def usable_cores() -> int:
    """CPU cores this process may really use: its affinity mask, capped by a cgroup CPU quota (a
    container started with ``--cpus 2`` on a 64-core host must not run 64 threads)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            text = Path(path).read_text().split()
        except OSError:
            continue
        try:
            if path.endswith("cpu.max") and text[0] != "max":
                n = min(n, math.ceil(int(text[0]) / int(text[1])))
            elif path.endswith("quota_us") and int(text[0]) > 0:
                period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
                n = min(n, math.ceil(int(text[0]) / period))
        except (ValueError, IndexError, OSError):
            pass
        break
    return max(1, n)


_DEFAULT_THREADS: list[int] = []


def default_threads() -> int:
    """torch's own default thread count (physical cores, or ``OMP_NUM_THREADS``) as first seen in this
    process, capped by :func:`usable_cores`; what a run uses when no thread count is asked for."""
    import torch

    if not _DEFAULT_THREADS:
        _DEFAULT_THREADS.append(torch.get_num_threads())
    return max(1, min(_DEFAULT_THREADS[0], usable_cores()))


def fold_batchnorm(network):
    """A copy of ``network`` in eval mode with every BatchNorm that directly follows a convolution
    folded into it (``ConvBlock`` conv1/norm1 and conv2/norm2, and ``Sequential`` conv → BN)."""
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(network).eval()
    convs = (nn.Conv2d, nn.Conv3d)
    bns = (nn.BatchNorm2d, nn.BatchNorm3d)
    for module in list(net.modules()):
        pairs: list[tuple[str, str]] = []
        if isinstance(module, nn.Sequential):
            names = [n for n, _ in module.named_children()]
            pairs = [(a, b) for a, b in zip(names, names[1:])]
        elif hasattr(module, "conv1") and hasattr(module, "norm1"):  # networks.ConvBlock
            pairs = [("conv1", "norm1"), ("conv2", "norm2")]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, convs) and isinstance(bn, bns) and bn.track_running_stats and bn.running_mean is not None:
                with torch.no_grad():
                    setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return net


def memory_format(spatial_dims: int):
    import torch

    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def prepare_network(network, spatial_dims: int, device):
    """The inference form of ``network``: BatchNorm folded, channels-last, on ``device``, eval mode.
    The original is not modified (Grad-CAM hooks, training and other callers keep using it)."""
    return fold_batchnorm(network).to(device=device, memory_format=memory_format(spatial_dims)).eval()


def background_values(volume: np.ndarray) -> np.ndarray:
    """Per channel the background value: the commonest value on the volume's outer faces (air after a
    CT window clip, 0 outside the mask of a z-scored map), or the channel's minimum where no single
    value holds half of the faces (then nothing is uniform background and nothing is cropped)."""
    out = np.empty(volume.shape[0], np.float32)
    for c in range(volume.shape[0]):
        v = volume[c]
        faces = np.concatenate([v[0].ravel(), v[-1].ravel(), v[:, 0].ravel(), v[:, -1].ravel(), v[:, :, 0].ravel(), v[:, :, -1].ravel()])
        vals, counts = np.unique(faces, return_counts=True)
        out[c] = vals[np.argmax(counts)] if counts.max() * 2 >= faces.size else v.min()
    return out


@dataclass(frozen=True)
class BodyMask:
    """The body on a strided grid (``mask[k, j, i]`` ↔ voxel ``(k·sk, j·sj, i·si)``) of a ``shape`` volume."""

    mask: np.ndarray
    stride: tuple[int, int, int]
    shape: tuple[int, int, int]

    def box(self, margin_kji: Sequence[int], k_range: tuple[int, int] | None = None) -> tuple[slice, slice, slice] | None:
        """Bounding box of the body grown by ``margin_kji`` and clipped to the volume; None when there is
        no body. With ``k_range`` (full-grid slices ``lo:hi``) only the body in those slices counts,
        and the box's k extent is ``k_range`` itself."""
        m = self.mask
        if k_range is not None:
            sk = self.stride[0]
            m = m[k_range[0] // sk : (k_range[1] - 1) // sk + 1]  # coarse slices whose block meets lo:hi
        if not m.any():
            return None
        box = []
        for axis, margin in enumerate(margin_kji):
            if axis == 0 and k_range is not None:
                box.append(slice(int(k_range[0]), int(k_range[1])))
                continue
            other = tuple(a for a in range(3) if a != axis)
            idx = np.flatnonzero(m.any(axis=other))
            st = self.stride[axis]
            lo, hi = int(idx[0]) * st - (st - 1), (int(idx[-1]) + 1) * st
            box.append(slice(max(0, lo - int(margin)), min(self.shape[axis], hi + int(margin))))
        return tuple(box)  # type: ignore[return-value]


def body_mask(volume: np.ndarray, background: np.ndarray | None = None, min_part: float = MIN_PART) -> BodyMask | None:
    """The body in ``volume`` [C, K, J, I]: the voxels where any channel differs from its background
    value, keeping only the connected pieces at least ``min_part`` of the largest one — the head, not
    the head-rest arcs or a table lying apart from it (components on a 2×-strided grid). None when
    the whole volume is background."""
    from scipy import ndimage

    bg = background_values(volume) if background is None else np.asarray(background)
    fg = np.zeros(volume.shape[1:], bool)
    for c in range(volume.shape[0]):
        fg |= volume[c] != bg[c]
    if not fg.any():
        return None
    stride = tuple(2 if n >= 16 else 1 for n in fg.shape)
    coarse = fg[:: stride[0], :: stride[1], :: stride[2]]
    lab, n = ndimage.label(coarse, np.ones((3, 3, 3), bool))
    if n == 0:  # content only between the strided samples: keep it all, at full resolution
        return BodyMask(fg, (1, 1, 1), fg.shape)
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        coarse = np.isin(lab, 1 + np.flatnonzero(sizes >= min_part * sizes.max()))
    return BodyMask(coarse, stride, fg.shape)  # type: ignore[arg-type]


def content_box(volume: np.ndarray, margin_kji: Sequence[int], background: np.ndarray | None = None,
                min_part: float = MIN_PART) -> tuple[slice, slice, slice] | None:
    """Bounding box (k, j, i slices) of the :func:`body_mask` of ``volume``, grown by ``margin_kji``
    and clipped to the volume; None when the whole volume is background. Everything inside the box is
    run whatever it is; only what lies outside is taken as background."""
    body = body_mask(volume, background, min_part)
    return None if body is None else body.box(margin_kji)


def fitted_window(roi_ji: Sequence[int], shape_ji: Sequence[int], divisor: int, max_side: int = MAX_FITTED_SIDE) -> tuple[int, int]:
    """The 2D window for a content box of ``shape_ji``: the box itself rounded up to ``divisor`` where
    that fits in ``max_side`` (one window per slice), else the training patch ``roi_ji``."""
    out = []
    for r, s in zip(roi_ji, shape_ji):
        fit = -(-int(s) // divisor) * divisor
        out.append(fit if fit <= max(max_side, r) else int(r))
    return tuple(out)  # type: ignore[return-value]


def align_box(box: tuple[slice, slice, slice], divisor: int, in_plane_only: bool) -> tuple[slice, slice, slice]:
    """``box`` with its start moved down to a multiple of ``divisor`` (k too unless ``in_plane_only``).

    A U-Net with d poolings is shift-equivariant only for shifts by multiples of 2**d: a box that
    starts elsewhere puts the pooling grid at another phase, and the output changes (up to 0.95 in
    probability at single voxels on the sample CT). Aligned, the fitted window has the pooling phase
    of a plain-path window starting at 0 (what differences remain come from where the window borders lie)."""
    out = []
    for axis, b in enumerate(box):
        if axis == 0 and in_plane_only:
            out.append(b)
        else:
            out.append(slice(b.start - b.start % divisor, b.stop))
    return tuple(out)  # type: ignore[return-value]


def is_full(box: tuple[slice, slice, slice], shape_kji: Sequence[int]) -> bool:
    return all(b.start == 0 and b.stop == s for b, s in zip(box, shape_kji))


@dataclass(frozen=True)
class Slab:
    """A run of slices ``k0:k1`` windowed together in-plane over ``box[1:]`` with window ``roi``;
    ``box[0]`` adds the 2.5D context slices the windows need."""

    k0: int
    k1: int
    box: tuple[slice, slice, slice]
    roi: tuple[int, int]


@dataclass(frozen=True)
class ContentPlan:
    box: tuple[slice, slice, slice] | None  # None: the volume is all background
    roi: tuple[int, ...]  # window size to use on the box
    background: np.ndarray  # per-channel background value (also the padding value)
    slabs: tuple[Slab, ...] = ()  # 2D/2.5D with fitted windows: per-slab boxes and windows


#: slices per slab of the fast 2D/2.5D path: each slab gets the box of the body in those slices, so the
#: windows shrink toward the vertex and the skull base (a multiple of the usual batch sizes)
SLAB_SLICES = 8


def plan_content(volume: np.ndarray, roi: Sequence[int], network, spatial_dims: int, context: int,
                 fit_window: bool, background: Sequence[float] | None = None) -> ContentPlan:
    """Where the fast path runs windows on ``volume`` [C, K, J, I] and with which window size.

    The box keeps ``context + 1`` slices (2D/2.5D) or :data:`CONTENT_MARGIN` voxels of background
    around the body and starts on the network's pooling grid (:func:`align_box`). With
    ``fit_window`` for 2D/2.5D, slabs of :data:`SLAB_SLICES` slices each get the in-plane box of the
    body in their slices and context (same margin and alignment) and one window per slice of that
    size (:func:`fitted_window`)."""
    bg = background_values(volume) if background is None else np.asarray(background, np.float32)
    margin = (context + 1, CONTENT_MARGIN, CONTENT_MARGIN) if spatial_dims == 2 else (CONTENT_MARGIN,) * 3
    divisor = int(getattr(network, "size_divisor", 16))
    body = body_mask(volume, bg)
    box = None if body is None else body.box(margin)
    roi = tuple(int(r) for r in roi)
    slabs: list[Slab] = []
    if box is not None:
        box = align_box(box, divisor, in_plane_only=spatial_dims == 2)
        if fit_window and spatial_dims == 2:
            roi = fitted_window(roi, (box[1].stop - box[1].start, box[2].stop - box[2].start), divisor)
            K = volume.shape[1]
            for k0 in range(box[0].start, box[0].stop, SLAB_SLICES):
                k1 = min(k0 + SLAB_SLICES, box[0].stop)
                lo, hi = max(0, k0 - context), min(K, k1 + context)
                b = body.box((0, CONTENT_MARGIN, CONTENT_MARGIN), (lo, hi))
                if b is None:  # only background in these slices: the uniform answer, no windows
                    continue
                b = align_box((slice(lo, hi), b[1], b[2]), divisor, in_plane_only=True)
                slabs.append(Slab(k0, k1, b, fitted_window(roi, (b[1].stop - b[1].start, b[2].stop - b[2].start), divisor)))
    return ContentPlan(box, roi, bg.astype(np.float32), tuple(slabs))
