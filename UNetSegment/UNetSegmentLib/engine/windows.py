"""Plan once: where the network's windows go on a volume, shared by inference and Grad-CAM.

A :class:`WindowPlan` lists :class:`Region` s of the volume ``[C, K, J, I]`` on the network grid; in
each, windows of one size slide with the run's overlap and are blended with Gaussian importance
weights (:func:`gaussian_importance`). :func:`plan_windows` makes the plan once per run; inference
(:func:`.inference.sliding_window`) and Grad-CAM (:func:`.heatmaps.gradcam`) both run it, so the
explanation sees exactly the windows that made the prediction it explains.

* ``plain`` engine: one region, the whole volume, the training patch size.
* ``fast`` engine: only the body is windowed (:func:`body_mask`: the voxels that differ from the
  background value, e.g. air after a CT window clip, without detached pieces such as a head rest).
  For 3D models one region, the body's box (:data:`CONTENT_MARGIN` voxels of background kept around
  it). For 2D/2.5D models one region per slab of :data:`SLAB_SLICES` slices, each with its own box and
  one window per slice sized to that box (:func:`fitted_window`), so nothing is run twice and windows
  shrink toward the vertex and the skull base. Every box starts on the network's pooling grid
  (:func:`align_box`). Outside the regions every window would be uniform background: the run gives
  those voxels the network's answer to one uniform window, computed once.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np

Box = tuple[slice, slice, slice]

#: in-plane margin (voxels) kept around the body's box, so that the network sees the head's edge
#: against real background, as in the whole-volume path, before the window's zero padding
CONTENT_MARGIN = 8
#: a separate piece of the body is kept when at least this fraction of the largest piece
MIN_PART = 0.05
#: largest fitted 2D window side; beyond it the training patch size slides as usual
MAX_FITTED_SIDE = 512
#: slices per slab of the fast 2D/2.5D plan (a multiple of the usual batch sizes)
SLAB_SLICES = 8


# --- windows inside one region ------------------------------------------------------------------
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


@dataclass(frozen=True)
class WindowGrid:
    """The windows of one region: starts on the region padded by ``pad`` to at least ``roi``."""

    roi: tuple[int, int, int]  # (k, j, i) window size
    pad: tuple[tuple[int, int], ...]  # padding of (k, j, i) to reach at least roi
    starts: tuple[tuple[int, int, int], ...]

    def batches(self, batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
        for b in range(0, len(self.starts), batch_size):
            yield list(self.starts[b : b + batch_size])


def grid_windows(shape_kji: Sequence[int], roi_kji: Sequence[int], overlap: float,
                 keep: Callable[[tuple[int, int, int]], bool] | None = None) -> WindowGrid:
    """Windows of ``roi_kji`` over a ``shape_kji`` array (an axis with a 1-voxel window: every index);
    ``keep(start)`` drops windows."""
    pad = tuple((0, max(0, r - s)) for s, r in zip(shape_kji, roi_kji))
    padded = [s + p[1] for s, p in zip(shape_kji, pad)]
    per_axis = [window_starts(s, r, overlap if r > 1 else 0.0) for s, r in zip(padded, roi_kji)]
    starts = [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]
    if keep is not None:
        starts = [s for s in starts if keep(s)]
    return WindowGrid(tuple(int(r) for r in roi_kji), pad, tuple(starts))


# --- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """Windows of ``roi`` (``(j, i)`` for 2D/2.5D, ``(k, j, i)`` for 3D) slide over ``volume[box]``.

    ``write_k``: the slices of the box whose results are kept (a 2D/2.5D slab's box also holds the
    context slices its windows read); None: all of them."""

    box: Box
    roi: tuple[int, ...]
    write_k: tuple[int, int] | None = None

    def roi_kji(self, spatial_dims: int) -> tuple[int, int, int]:
        return (1, *self.roi) if spatial_dims == 2 else tuple(self.roi)  # type: ignore[return-value]

    def window_grid(self, spatial_dims: int, overlap: float,
                    keep: Callable[[tuple[int, int, int]], bool] | None = None) -> WindowGrid:
        """The windows of this region (starts relative to the box); only those on ``write_k`` slices."""
        shape = tuple(s.stop - s.start for s in self.box)
        if self.write_k is not None:
            lo, hi = self.write_k[0] - self.box[0].start, self.write_k[1] - self.box[0].start
            inner = keep
            keep = (lambda s: lo <= s[0] < hi and (inner is None or inner(s)))
        return grid_windows(shape, self.roi_kji(spatial_dims), overlap, keep)

    @property
    def written(self) -> Box:
        """The part of the volume this region's results cover."""
        if self.write_k is None:
            return self.box
        return (slice(*self.write_k), self.box[1], self.box[2])


@dataclass(frozen=True)
class WindowPlan:
    """Where a run's windows go on a ``shape`` volume.

    ``pad_value``: per channel, what windows reaching past a region's edge are padded with.
    ``whole``: the regions cover the volume (else what lies outside gets the answer to a uniform
    background window). ``coarse``: the same plan with training-size windows over one box (the
    fallback after a GPU runs out of memory with fitted windows); None where that is the plan."""

    shape: tuple[int, int, int]
    spatial_dims: int
    context: int
    patch: tuple[int, ...]
    overlap: float
    pad_value: np.ndarray
    regions: tuple[Region, ...]
    whole: bool
    coarse: "WindowPlan | None" = None

    def fitted_windows(self) -> bool:
        return self.coarse is not None

    def without_fitted_windows(self) -> "WindowPlan":
        return self.coarse if self.coarse is not None else self

    def on_slices(self, ks: Sequence[int]) -> "WindowPlan":
        """2D/2.5D: the plan restricted to slices ``ks`` (each a region with its context slices), e.g. a
        validation that scores a sample of slices; other slices are left to the uniform answer."""
        if self.spatial_dims != 2:
            raise ValueError("on_slices is for 2D/2.5D plans")
        K, J, I = self.shape
        regions = tuple(Region((slice(max(0, k - self.context), min(K, k + self.context + 1)), slice(0, J), slice(0, I)),
                               self.patch, (int(k), int(k) + 1)) for k in ks)
        return replace(self, regions=regions, whole=False, coarse=None)

    def n_windows(self, keep: Callable[[Region, tuple[int, int, int]], bool] | None = None) -> int:
        return sum(len(r.window_grid(self.spatial_dims, self.overlap,
                                     None if keep is None else functools.partial(keep, r)).starts) for r in self.regions)


def plan_windows(volume: np.ndarray, *, spatial_dims: int, patch: Sequence[int], context: int, overlap: float,
                 fast: bool, size_divisor: int) -> WindowPlan:
    """The window plan of one run on ``volume`` [C, K, J, I] (see the module docstring).

    ``patch``: the training window; ``context``: 2.5D neighbour slices per side; ``fast``: the fast
    engine's body-only plan, else the plain whole-volume plan; ``size_divisor``: the network's
    pooling factor (2**depth), which fitted windows and box starts are aligned to."""
    shape = tuple(int(s) for s in volume.shape[1:])
    patch = tuple(int(p) for p in patch)
    base = WindowPlan(shape, spatial_dims, context, patch, float(overlap), np.zeros(volume.shape[0], np.float32), (), True)
    full: Box = tuple(slice(0, s) for s in shape)  # type: ignore[assignment]
    if not fast:
        pad = np.array([volume[c].min() for c in range(volume.shape[0])], np.float32)
        return replace(base, pad_value=pad, regions=(Region(full, patch),))
    background = background_values(volume)
    base = replace(base, pad_value=background)
    body = body_mask(volume, background)
    margin = (context + 1, CONTENT_MARGIN, CONTENT_MARGIN) if spatial_dims == 2 else (CONTENT_MARGIN,) * 3
    box = None if body is None else body.box(margin)
    if box is None:  # nothing but background: every voxel gets the uniform answer
        return replace(base, whole=False)
    box = align_box(box, size_divisor, in_plane_only=spatial_dims == 2)
    one_box = replace(base, regions=(_box_region(box, patch, context, shape[0]),), whole=is_full(box, shape))
    if spatial_dims == 3:
        return one_box
    slabs = _fitted_slabs(body, box, shape[0], patch, context, size_divisor)
    return replace(base, regions=slabs, whole=False, coarse=one_box)


def _box_region(box: Box, patch: tuple[int, ...], context: int, n_slices: int) -> Region:
    """Training-size windows over ``box``; for 2.5D the box also holds the context slices its edge slices
    read (as a slab's does), so that they see the real neighbours, not the box's edge repeated."""
    lo, hi = max(0, box[0].start - context), min(n_slices, box[0].stop + context)
    if len(patch) == 3 or (lo, hi) == (box[0].start, box[0].stop):
        return Region(box, patch)
    return Region((slice(lo, hi), box[1], box[2]), patch, (box[0].start, box[0].stop))


def _fitted_slabs(body: "BodyMask", box: Box, n_slices: int, patch: tuple[int, ...], context: int,
                  divisor: int) -> tuple[Region, ...]:
    """2D/2.5D: per slab of :data:`SLAB_SLICES` slices of ``box``, the in-plane box of the body in its
    slices and context, aligned, and one window per slice that size."""
    roi = fitted_window(patch, (box[1].stop - box[1].start, box[2].stop - box[2].start), divisor)
    slabs: list[Region] = []
    for k0 in range(box[0].start, box[0].stop, SLAB_SLICES):
        k1 = min(k0 + SLAB_SLICES, box[0].stop)
        lo, hi = max(0, k0 - context), min(n_slices, k1 + context)
        b = body.box((0, CONTENT_MARGIN, CONTENT_MARGIN), (lo, hi))
        if b is None:  # only background in these slices: the uniform answer, no windows
            continue
        b = align_box((slice(lo, hi), b[1], b[2]), divisor, in_plane_only=True)
        slabs.append(Region(b, fitted_window(roi, (b[1].stop - b[1].start, b[2].stop - b[2].start), divisor), (k0, k1)))
    return tuple(slabs)


# --- the body and its box ------------------------------------------------------------------------
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

    def box(self, margin_kji: Sequence[int], k_range: tuple[int, int] | None = None) -> Box | None:
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


def fitted_window(roi_ji: Sequence[int], shape_ji: Sequence[int], divisor: int, max_side: int = MAX_FITTED_SIDE) -> tuple[int, int]:
    """The 2D window for a box of ``shape_ji``: the box itself rounded up to ``divisor`` where that
    fits in ``max_side`` (one window per slice), else the training patch ``roi_ji``."""
    out = []
    for r, s in zip(roi_ji, shape_ji):
        fit = -(-int(s) // divisor) * divisor
        out.append(fit if fit <= max(max_side, r) else int(r))
    return tuple(out)  # type: ignore[return-value]


def align_box(box: Box, divisor: int, in_plane_only: bool) -> Box:
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


def is_full(box: Box, shape_kji: Sequence[int]) -> bool:
    return all(b.start == 0 and b.stop == s for b, s in zip(box, shape_kji))
