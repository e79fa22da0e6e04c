"""Per-lesion scaling of a 0–1 explanation map (Grad-CAM).

The engine normalises a heatmap to the whole volume's peak. Next to a large lesion with a strong
response, a small lesion whose own peak is a tenth of it is then drawn at 0.1 — below most overlay
thresholds, i.e. invisible. :func:`per_lesion` rescales each lesion's neighbourhood to its own peak
so that every lesion's explanation can be read, while the rest of the map stays as it was.
"""
from __future__ import annotations

import math
import numbers
from typing import Collection

import numpy as np

from ..errors import UsageError
from ..image import Image
from .lesion_measures import label_mask

#: how a Grad-CAM map may be shown: each lesion's neighbourhood to its own peak, or the volume's peak = 1
SCALES = ("lesion", "volume")
#: voxel connectivity → scipy's ``generate_binary_structure`` rank
_CONNECTIVITY = {6: 1, 18: 2, 26: 3}


def per_lesion(heatmap: Image, labels: Image, radius_mm: float = 20.0, connectivity: int = 26,
               lesion_values: Collection[int] | None = None) -> Image:
    """``heatmap`` rescaled so that each lesion's neighbourhood peaks at 1.

    A lesion is a connected component of the ``lesion_values`` labels (None: ``labels > 0``; context
    such as oedema is no lesion; ``connectivity`` 6, 18 or 26). Every voxel
    within ``radius_mm`` (physical distance to the nearest lesion voxel) belongs to its *nearest*
    lesion and is divided by the heatmap's maximum over the voxels that belong to that lesion.
    Voxels farther than ``radius_mm`` from every lesion are divided by the global peak (unchanged for
    a map already normalised to 0–1). Returns float32 values in 0–1 on the same grid; NaN stays NaN.
    Without lesions the result is a copy of the input.

    Distances use the voxel spacing only, which is exact on the voxel grid for any (flipped,
    permuted or oblique) direction matrix. At voxels exactly equidistant from two lesions either
    lesion may be chosen.
    """
    _check(heatmap, labels, radius_mm, connectivity)
    radius_mm = float(radius_mm)
    heat = np.asarray(heatmap.array, dtype=np.float32)
    lab = np.asarray(labels.array)
    lesion = label_mask(lab, lesion_values)
    if not lesion.any():
        return heatmap.with_array(heat.copy())
    volume_scale = _peak(heat)
    out = heat / np.float32(volume_scale)
    crop = _crop_around(lesion, radius_mm, heatmap.spacing[::-1])
    owner = _nearest_lesion(lesion[crop], radius_mm, heatmap.spacing[::-1], connectivity)
    near = owner > 0
    ids, values = owner[near], heat[crop][near]
    peaks = np.full(int(ids.max()) + 1, -np.inf, dtype=np.float32)
    np.maximum.at(peaks, ids, np.where(np.isnan(values), -np.inf, values))
    scale = np.where(np.isfinite(peaks) & (peaks > 0), peaks, volume_scale)  # no positive response: volume scale
    out[crop][near] = values / scale[ids].astype(np.float32)  # out[crop] is a view
    np.clip(out, 0.0, 1.0, out=out)
    return heatmap.with_array(out)


def _peak(heat: np.ndarray) -> float:
    """The map's largest finite value, or 1 when it has no positive one (an all-zero map stays zero)."""
    top = float(heat.max())  # one pass; NaN/Inf maps take the careful path
    if not math.isfinite(top):
        top = float(heat[np.isfinite(heat)].max(initial=0.0))
    return top if top > 0 else 1.0


def _check(heatmap: Image, labels: Image, radius_mm: float, connectivity: int) -> None:
    for name, img in (("heatmap", heatmap), ("labels", labels)):
        if not isinstance(img, Image):
            raise UsageError(f"{name} must be an Image", "wrap the array: Image(array, ijk_to_ras)")
        if np.asarray(img.array).ndim != 3:
            raise UsageError(f"{name} must be a 3D volume, got shape {np.shape(img.array)}", "pass a K,J,I volume")
    if not labels.same_grid(heatmap):
        raise UsageError("labels and heatmap are not on the same grid (shape or IJK→RAS differ)",
                         "resample the heatmap onto the label map's grid first")
    if not (isinstance(radius_mm, numbers.Real) and not isinstance(radius_mm, bool) and math.isfinite(radius_mm)
            and radius_mm > 0):
        raise UsageError(f"radius_mm must be a positive number of millimetres, got {radius_mm!r}", "e.g. 20.0")
    if connectivity not in _CONNECTIVITY:
        raise UsageError(f"connectivity must be 6, 18 or 26, got {connectivity!r}", "use 26 (the default)")


def _crop_around(lesion: np.ndarray, radius_mm: float, spacing_kji) -> tuple[slice, slice, slice]:
    """The lesions' bounding box grown by ``radius_mm``: no voxel outside it is within reach, so the
    distance transform runs on this box only (a full 512² CT volume would need gigabytes)."""
    out = []
    for ax, sp in enumerate(spacing_kji):
        hit = np.flatnonzero(lesion.any(axis=tuple(a for a in range(3) if a != ax)))
        pad = int(math.ceil(radius_mm / float(sp)))
        out.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + pad + 1, lesion.shape[ax])))
    return tuple(out)


def _nearest_lesion(lesion: np.ndarray, radius_mm: float, spacing_kji, connectivity: int) -> np.ndarray:
    """Per voxel, the 1-based id of the nearest lesion if it lies within ``radius_mm``, else 0."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY[connectivity])
    components, _ = ndimage.label(lesion, structure=structure)
    dist, (k, j, i) = ndimage.distance_transform_edt(~lesion, sampling=tuple(float(s) for s in spacing_kji),
                                                     return_indices=True)
    return np.where(dist <= radius_mm, components[k, j, i], 0)

