"""Restrict a run to a box: crop an :class:`Image` to an RAS bounding box and put results back.

Used by the Slicer module's optional ROI. The crop keeps the voxel grid (no resampling): the
cropped image's IJK→RAS is the original's shifted by the crop's first voxel, so results computed
on it land exactly on the original grid again with :func:`uncrop`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError
from ..image import Image

Box = tuple[slice, slice, slice]  # k, j, i


def box_from_ras_bounds(image: Image, ras_bounds: Sequence[float]) -> Box:
    """Smallest K,J,I box of ``image`` holding every voxel centre inside ``ras_bounds``.

    ``ras_bounds`` is (r_min, r_max, a_min, a_max, s_min, s_max) in ``image``'s RAS frame.
    Raises :class:`InputError` if the bounds are invalid or the box misses the volume.
    """
    b = np.asarray(ras_bounds, dtype=np.float64).reshape(3, 2)
    if not np.all(np.isfinite(b)) or np.any(b[:, 1] < b[:, 0]):
        raise InputError(f"invalid ROI bounds {list(ras_bounds)}", "place the ROI box over the volume")
    return box_from_ras_corners(image, np.array([[r, a, s] for r in b[0] for a in b[1] for s in b[2]]))


def box_from_ras_corners(image: Image, corners: np.ndarray) -> Box:
    """Smallest K,J,I box of ``image`` covering the points ``corners`` (N×3, ``image``'s RAS frame).

    Given the 8 corners of a (possibly rotated) ROI box, an oblique grid gets the box that covers
    the whole ROI. Raises :class:`InputError` if the box misses the volume.
    """
    corners = np.asarray(corners, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(corners)):
        raise InputError("the ROI has no valid corners", "place the ROI box over the volume")
    ijk = image.ras_to_ijk_points(corners)
    lo = np.ceil(ijk.min(axis=0) - 1e-6).astype(int)
    hi = np.floor(ijk.max(axis=0) + 1e-6).astype(int)
    size = np.array(image.shape_ijk)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, size - 1)
    if np.any(hi < lo):
        raise InputError("the ROI does not overlap the input volume", "move the ROI box onto the volume or clear the ROI")
    (i0, j0, k0), (i1, j1, k1) = lo, hi
    return (slice(int(k0), int(k1) + 1), slice(int(j0), int(j1) + 1), slice(int(i0), int(i1) + 1))


def crop(image: Image, box: Box) -> Image:
    """The voxels of ``box`` (a copy) with the matching IJK→RAS."""
    shift = np.eye(4)
    shift[:3, 3] = [box[2].start, box[1].start, box[0].start]  # i, j, k of the first voxel
    return Image(np.array(image.array[box], copy=True), image.ijk_to_ras @ shift)


def uncrop(part: Image, full: Image, box: Box, fill: float = 0.0) -> Image:
    """``part`` (computed on ``crop(full, box)``) placed on ``full``'s grid, ``fill`` elsewhere."""
    if part.array.shape[:3] != tuple(s.stop - s.start for s in box):
        raise ValueError(f"part shape {part.array.shape} does not match the box {box}")
    out = np.full(full.array.shape[:3], fill, dtype=part.array.dtype)
    out[box] = part.array
    return Image(out, full.ijk_to_ras)
