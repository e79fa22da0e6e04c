"""Per-lesion scaling of a 0–1 explanation map (Grad-CAM).

The engine normalises a heatmap to the whole volume's peak. Next to a large lesion with a strong
response, a small lesion whose own peak is a tenth of it is then drawn at 0.1 — below most overlay
thresholds, i.e. invisible. :func:`per_lesion` rescales each lesion's neighbourhood to its own peak
so that every lesion's explanation can be read, while the rest of the map stays as it was.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Collection

import numpy as np

from ..errors import UsageError
from ..image import Image
from .lesion_measures import label_mask

Box = tuple[slice, ...]

#: how a Grad-CAM map may be shown: each lesion's neighbourhood to its own peak, or the volume's peak = 1
SCALES = ("lesion", "volume")
#: voxel connectivity → scipy's ``generate_binary_structure`` rank
_CONNECTIVITY = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class LesionScaling:
    """What :func:`per_lesion` does to a map: every voxel divided by ``volume_scale`` and clipped to
    0–1, then inside ``box`` (the lesions grown by the radius) the per-lesion ``values``."""

    box: Box
    values: np.ndarray
    volume_scale: float

    def apply_in_place(self, heat: np.ndarray) -> None:
        """Scale the float32 map ``heat`` itself (e.g. a Slicer node's own copy: no second array)."""
        if self.volume_scale != 1.0:
            heat /= np.float32(self.volume_scale)
        np.clip(heat, 0.0, 1.0, out=heat)
        heat[self.box] = self.values

    def apply(self, heat: np.ndarray) -> np.ndarray:
        """The scaled map as a new float32 array."""
        out = np.array(heat, dtype=np.float32, copy=True)
        self.apply_in_place(out)
        return out


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
    scaling = lesion_scaling(heatmap, labels, radius_mm, connectivity, lesion_values)
    heat = np.asarray(heatmap.array, dtype=np.float32)
    return heatmap.with_array(heat.copy() if scaling is None else scaling.apply(heat))


def lesion_scaling(heatmap: Image, labels: Image, radius_mm: float = 20.0, connectivity: int = 26,
                   lesion_values: Collection[int] | None = None) -> LesionScaling | None:
    """:func:`per_lesion` as the change it makes (None without lesions), for a caller that already holds
    its own copy of the map (a Slicer volume node) and scales it in place."""
    _check(heatmap, labels, radius_mm, connectivity)
    radius_mm = float(radius_mm)
    heat = np.asarray(heatmap.array, dtype=np.float32)
    lab = np.asarray(labels.array)
    lesions = _lesion_box(lab, lesion_values)
    if lesions is None:
        return None
    volume_scale = _peak(heat)
    crop = _grown(lesions, radius_mm, heatmap.spacing[::-1], lab.shape)
    owner = _nearest_lesion(label_mask(lab[crop], lesion_values), radius_mm, heatmap.spacing[::-1], connectivity)
    near = owner > 0
    local = heat[crop]
    ids, values = owner[near], local[near]
    peaks = np.full(int(ids.max()) + 1, -np.inf, dtype=np.float32)
    np.maximum.at(peaks, ids, np.where(np.isnan(values), -np.inf, values))
    scale = np.where(np.isfinite(peaks) & (peaks > 0), peaks, volume_scale)  # no positive response: volume scale
    patch = local / np.float32(volume_scale)
    patch[near] = values / scale[ids].astype(np.float32)
    np.clip(patch, 0.0, 1.0, out=patch)
    return LesionScaling(crop, patch, volume_scale)


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


def _lesion_box(lab: np.ndarray, lesion_values: Collection[int] | None) -> Box | None:
    """The bounding box of the lesion voxels (None without any). The lesion mask is only made inside
    the labels' box: a volume-sized mask would cost more than the rest of :func:`per_lesion`."""
    labelled = _box_of(lab)
    if labelled is None:
        return None
    inner = _box_of(label_mask(lab[labelled], lesion_values))
    if inner is None:
        return None
    return tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(labelled, inner))


def _box_of(a: np.ndarray) -> Box | None:
    """The bounding box of ``a``'s nonzero voxels (None when there are none), from per-axis reductions
    of ``a`` itself (no mask of its size)."""
    box = []
    for axis in range(a.ndim):
        hit = np.flatnonzero(np.any(a, axis=tuple(x for x in range(a.ndim) if x != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _grown(box: Box, radius_mm: float, spacing_kji, shape: tuple[int, ...]) -> Box:
    """``box`` grown by ``radius_mm`` and clipped to ``shape``: no voxel outside it is within reach of a
    lesion, so the distance transforms run on this box only (a full 512² CT volume would need gigabytes)."""
    return tuple(slice(max(b.start - int(math.ceil(radius_mm / float(sp))), 0),
                       min(b.stop + int(math.ceil(radius_mm / float(sp))), n))
                 for b, sp, n in zip(box, spacing_kji, shape))


def _nearest_lesion(lesion: np.ndarray, radius_mm: float, spacing_kji, connectivity: int) -> np.ndarray:
    """Per voxel, the 1-based id of the nearest lesion if it lies within ``radius_mm``, else 0.

    Each lesion's distances are computed on its own box grown by ``radius_mm`` (the only voxels it can
    own), keeping the nearest lesion per voxel. When those boxes together are larger than the whole
    (many or crowded lesions) one distance transform with nearest-voxel indices is cheaper, and gives
    the same owners (up to ties)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY[connectivity])
    components, _ = ndimage.label(lesion, structure=structure)
    sampling = tuple(float(s) for s in spacing_kji)
    boxes = [_grown(box, radius_mm, sampling, lesion.shape) for box in ndimage.find_objects(components)]
    if sum(math.prod(s.stop - s.start for s in box) for box in boxes) >= lesion.size:
        return _nearest_in_one_transform(components, radius_mm, sampling)
    owner = np.zeros(lesion.shape, dtype=components.dtype)
    nearest = np.full(lesion.shape, np.inf, dtype=np.float64)
    for value, box in enumerate(boxes, start=1):
        dist = ndimage.distance_transform_edt(components[box] != value, sampling=sampling)
        closer = (dist <= radius_mm) & (dist < nearest[box])
        nearest[box][closer] = dist[closer]
        owner[box][closer] = value
    return owner


def _nearest_in_one_transform(components: np.ndarray, radius_mm: float, sampling: tuple[float, ...]) -> np.ndarray:
    """:func:`_nearest_lesion` by one distance transform with the nearest lesion voxel's indices."""
    from scipy import ndimage

    dist, (k, j, i) = ndimage.distance_transform_edt(components == 0, sampling=sampling, return_indices=True)
    return np.where(dist <= radius_mm, components[k, j, i], 0)
