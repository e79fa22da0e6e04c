"""Measurement kernels of the lesion table: input checks, connected components, the Feret diameter,
grouped statistics and the mid-sagittal plane. :mod:`.lesions` assembles them into rows.
"""
from __future__ import annotations

import math

from typing import Collection

import numpy as np

from ..errors import InputError, UsageError
from ..image import Image

#: |R − midline| below this (mm) → side 'midline'.
MIDLINE_TOLERANCE_MM = 5.0
#: CT head mask threshold for the midline estimate (HU).
CT_HEAD_THRESHOLD_HU = -300.0
#: With ``modality=None`` an intensity image whose minimum is below this is treated as CT.
CT_AUTODETECT_MIN = -500.0
#: Non-CT head mask: voxels above this percentile of the non-zero voxels.
NONCT_HEAD_PERCENTILE = 10.0

# Feret diameter: lesions whose candidate-point count is at most this use vectorised brute force.
_FERET_BRUTE_MAX = 64


def nonzero_box(a: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the nonzero voxels of ``a`` (None when there are none)."""
    nz = a != 0
    box = []
    for axis in range(a.ndim):
        idx = np.flatnonzero(nz.any(axis=tuple(x for x in range(a.ndim) if x != axis)))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def label_array(labels: Image) -> np.ndarray:
    """The integer K,J,I array of ``labels`` (bool viewed as uint8, integral floats as int64); one-line errors otherwise."""
    if not isinstance(labels, Image):
        raise UsageError("labels must be an Image", "wrap the array: Image(array, ijk_to_ras)")
    a = np.asarray(labels.array)
    if a.ndim != 3:
        raise InputError(f"label map must be 3D, got shape {a.shape}", "pass a single-component K,J,I label volume")
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise InputError("label map has non-integer values", "pass an integer label map (0 = background)")
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"label map dtype {a.dtype} is not integer", "pass an integer label map (0 = background)")
    return a


def check_grid(labels: Image, other: Image | None, what: str) -> None:
    """Raise unless ``other`` (named ``what`` in the error) is None or a 3D image on the grid of ``labels``."""
    if other is None:
        return
    if not isinstance(other, Image):
        raise UsageError(f"{what} must be an Image or None", "wrap the array: Image(array, ijk_to_ras)")
    if np.asarray(other.array).ndim != 3 or not labels.same_grid(other):
        raise InputError(
            f"{what} is not on the label map's grid ({other.array.shape} vs {labels.array.shape})",
            "resample it onto the label map's grid first",
        )


def label_mask(lab: np.ndarray, values: Collection[int] | None) -> np.ndarray:
    """The voxels whose label is one of ``values`` (None: any label, i.e. > 0)."""
    return lab > 0 if values is None else np.isin(lab, np.asarray(list(values), dtype=lab.dtype))


def components(lab: np.ndarray, connectivity: int,
               lesion_values: Collection[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Component id map (1..n, int32) of the lesion voxels, and each component's label value.

    ``lesion_values`` given (what a bundle's run passes: its lesion labels): a lesion is a connected
    component of those labels together, so a bleed spanning two compartments is one lesion, whose
    label is the one most of its voxels carry (ties: the lower value); voxels of other labels
    (context such as oedema) belong to no component. ``None``: every non-zero value is its own kind
    of finding and is labelled separately (touching components of two values are two lesions).
    """
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    if lesion_values is None:
        return _components_per_value(lab, structure)
    mask = label_mask(lab, lesion_values)
    comp, nc = ndimage.label(mask, structure=structure)
    comp = comp.astype(np.int32, copy=False)
    if nc == 0:
        return comp, np.zeros(0, np.int64)
    ids, values = comp[mask], lab[mask].astype(np.int64)
    present = np.unique(values)
    if present.size == 1:
        return comp, np.full(nc, int(present[0]), np.int64)
    pairs = (ids.astype(np.int64) - 1) * present.size + np.searchsorted(present, values)
    counts = np.bincount(pairs, minlength=nc * present.size).reshape(nc, present.size)
    return comp, present[np.argmax(counts, axis=1)]  # argmax: the first (lower) value on ties


def _components_per_value(lab: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`components` of each label value separately (one full-volume pass per value)."""
    from scipy import ndimage

    if np.issubdtype(lab.dtype, np.unsignedinteger) and lab.dtype.itemsize <= 2:
        present = np.flatnonzero(np.bincount(lab.reshape(-1), minlength=1))
        values = present[present != 0]
    else:
        nz = lab[lab != 0]
        values = np.unique(nz)
    if values.size == 0:
        return np.zeros(lab.shape, np.int32), np.zeros(0, np.int64)
    if values.size == 1:
        comp, nc = ndimage.label(lab == values[0], structure=structure)
        return comp, np.full(nc, int(values[0]), np.int64)
    comp = np.zeros(lab.shape, np.int32)
    vals = []
    offset = 0
    for v in values.tolist():
        c, nc = ndimage.label(lab == v, structure=structure)
        if nc:
            m = c > 0
            comp[m] = c[m] + offset
            offset += nc
            vals.append(np.full(nc, int(v), np.int64))
    return comp, np.concatenate(vals) if vals else np.zeros(0, np.int64)


def group_stats(values: np.ndarray, lesion_of: np.ndarray, starts: np.ndarray, voxels: np.ndarray,
                n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, population std (ddof = 0) and maximum of ``values`` per lesion.

    ``values`` and ``lesion_of`` (lesion id per voxel) are grouped by lesion, ``starts`` is each
    lesion's first position and ``voxels`` its voxel count as float.
    """
    mean = np.bincount(lesion_of, weights=values, minlength=n) / voxels
    var = np.bincount(lesion_of, weights=(values - mean[lesion_of]) ** 2, minlength=n) / voxels  # ddof = 0
    return mean, np.sqrt(var), np.maximum.reduceat(values, starts)


def feret_diameters(lesion_of: np.ndarray, col: np.ndarray, row: np.ndarray, x_mm: np.ndarray, y_mm: np.ndarray,
                    n: int) -> np.ndarray:
    """Max distance between voxel centres of each lesion's largest-area slice.

    One entry per voxel of those slices: its lesion id, its integer in-plane lattice position
    (``col``, ``row``) and its orthonormal in-plane coordinates in mm (``x_mm``, ``y_mm``).
    The convex hull of lattice points is the hull of each lattice row's two end points, so only
    those are kept (≤ 2 per row). Up to ``_FERET_BRUTE_MAX`` candidates: vectorised brute force
    over all pairs (the maximum over all pairs equals the maximum over hull vertices); more: the
    scipy ConvexHull of the candidates, then all pairs of its vertices (brute force over the
    candidates where the hull is degenerate, i.e. collinear points).
    """
    by_row = np.lexsort((col, row, lesion_of))
    lesion_sorted, row_sorted = lesion_of[by_row], row[by_row]
    new_row = np.concatenate(([True], (np.diff(lesion_sorted) != 0) | (np.diff(row_sorted) != 0)))
    first = np.flatnonzero(new_row)
    last = np.concatenate((first[1:], [lesion_sorted.size])) - 1
    # row ends, interleaved (first ≤ last < next first: already sorted), single-voxel rows once
    ends = np.stack((first, last), axis=1).ravel()[np.stack((np.ones_like(first, bool), last != first), axis=1).ravel()]
    cand_x, cand_y = x_mm[by_row][ends], y_mm[by_row][ends]
    n_cand = np.bincount(lesion_sorted[ends], minlength=n)
    cand_start = np.concatenate(([0], np.cumsum(n_cand)[:-1]))
    out = np.zeros(n)
    _brute_force_small(out, cand_x, cand_y, cand_start, n_cand)
    large = np.flatnonzero(n_cand > _FERET_BRUTE_MAX)
    if large.size:
        from scipy.spatial import ConvexHull, QhullError

        for c in large.tolist():
            span = slice(cand_start[c], cand_start[c] + n_cand[c])
            points = np.stack([cand_x[span], cand_y[span]], axis=1)
            try:
                points = points[ConvexHull(points).vertices]
            except (QhullError, ValueError):
                pass  # collinear / degenerate: brute force over all candidates
            out[c] = _brute_diameter(points)
    return out


def _brute_force_small(out: np.ndarray, cand_x: np.ndarray, cand_y: np.ndarray, cand_start: np.ndarray,
                       n_cand: np.ndarray) -> None:
    """``out[c]`` = the diameter of every lesion with at most ``_FERET_BRUTE_MAX`` candidates, all pairs at once.

    Lesions are taken in size classes (≤ 2, ≤ 4, … candidates), each padded to its class size by
    repeating its last candidate (a repeated point changes no distance).
    """
    lower, size = 0, 2
    while lower < _FERET_BRUTE_MAX:
        sel = np.flatnonzero((n_cand > lower) & (n_cand <= size))
        if sel.size:
            pad = cand_start[sel, None] + np.minimum(np.arange(size)[None, :], n_cand[sel, None] - 1)
            xs, ys = cand_x[pad], cand_y[pad]
            step = max(1, 4_000_000 // (size * size))
            for s in range(0, sel.size, step):
                x, y = xs[s : s + step], ys[s : s + step]
                d2 = (x[:, :, None] - x[:, None, :]) ** 2 + (y[:, :, None] - y[:, None, :]) ** 2
                out[sel[s : s + step]] = np.sqrt(d2.reshape(d2.shape[0], -1).max(axis=1))
        lower, size = size, size * 2


def _brute_diameter(points: np.ndarray) -> float:
    """Largest distance between two of ``points`` (N×2), in blocks of 1024 rows."""
    best = 0.0
    for s in range(0, len(points), 1024):
        d2 = ((points[s : s + 1024, None, :] - points[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return math.sqrt(best)


def estimate_midline(intensity: Image | None, midline_x_ras: float | None, modality: str | None) -> dict:
    """The mid-sagittal plane (``midline_r``, None when unknown) and how it was found (see :mod:`.lesions`)."""
    base = {"tolerance_mm": MIDLINE_TOLERANCE_MM, "convention": "RAS: +R = patient right"}
    if midline_x_ras is not None:
        r = float(midline_x_ras)
        return {
            **base,
            "midline_r": r,
            "source": "given",
            "method": f"centroid R vs given mid-sagittal plane R = {r:.2f} mm; "
            f"'midline' within {MIDLINE_TOLERANCE_MM:g} mm; +R = patient right",
        }
    if intensity is None:
        return {
            **base,
            "midline_r": None,
            "source": "none",
            "method": "side not determined (no intensity image and no midline_x_ras)",
        }
    a = np.asarray(intensity.array)
    amin = float(a.min()) if a.size else 0.0
    is_ct = modality.upper() == "CT" if modality else amin < CT_AUTODETECT_MIN
    if is_ct:
        thr = CT_HEAD_THRESHOLD_HU
        how = f"voxels > {thr:g} HU (CT)"
    else:
        nz = a[a != 0]
        thr = float(np.percentile(nz, NONCT_HEAD_PERCENTILE)) if nz.size else 0.0
        how = f"voxels ≥ {thr:.4g} (10th percentile of non-zero voxels)"
    # CT: strictly above the HU threshold; other modalities: at or above the percentile, so a
    # uniform (e.g. binary or skull-stripped constant) head still gives a mask
    mask = a > thr if is_ct else a >= thr
    nvox = int(np.count_nonzero(mask))
    if nvox == 0:
        return {**base, "midline_r": None, "source": "none", "method": f"side not determined (no head voxels: {how})"}
    # centre of mass of the mask in index space from the three axis projections (one pass)
    ck = np.dot(mask.sum(axis=(1, 2)), np.arange(a.shape[0])) / nvox
    cj = np.dot(mask.sum(axis=(0, 2)), np.arange(a.shape[1])) / nvox
    ci = np.dot(mask.sum(axis=(0, 1)), np.arange(a.shape[2])) / nvox
    r = float(intensity.ijk_to_ras_points([ci, cj, ck])[0, 0])
    return {
        **base,
        "midline_r": r,
        "source": "intensity",
        "threshold": thr,
        "method": f"centroid R vs mid-sagittal plane R = {r:.2f} mm = centre of mass of the head ({how}); "
        f"'midline' within {MIDLINE_TOLERANCE_MM:g} mm; +R = patient right",
    }
