"""ABC/2, the bedside hematoma volume estimate (Kothari et al., Stroke 1996), measured on a label map.

On the lesion's largest-area slice, **A** is its largest diameter and **B** its largest diameter
perpendicular to A; **C** is the number of slices holding the lesion, each weighted by its lesion
area relative to the largest (1 when ≥ 75 %, 0.5 when 25–75 %, 0 under 25 %), times the slice
thickness; the estimate is A·B·C/2. Measured in physical space, edge to edge as calipers on the
screen would: A is the Feret diameter of the lesion's pixels (their corners, so a row of n pixels of
spacing s measures n·s), B the longest chord perpendicular to A that stays inside the lesion's pixels,
and the slice thickness is the distance between slice planes (voxel volume ÷ in-plane pixel area, so
sheared and oblique grids are handled).

Known answers for an ellipsoid with semi-axes (a, b, c), a and b in the slice plane: A = 2a, B = 2b.
Its cross-section at height z has relative area 1 − z²/c², which is ≥ 75 % for |z| ≤ c/2 and ≥ 25 %
for |z| ≤ c·√3/2, so thin slices give C = c + ½·c(√3 − 1) = c(1 + √3)/2 ≈ 1.366 c and
ABC/2 = (1 + √3)·abc ≈ 0.652 × its volume (4/3)πabc; counting every slice fully (C = 2c) would give
4abc ≈ 0.955 × the volume.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: relative slice area at or above which a slice counts fully, and at or above which it counts half
FULL_SLICE, HALF_SLICE = 0.75, 0.25
#: chord sampling step as a fraction of the smaller pixel side (and at most 1/512 of the lesion's size)
_STEP_FRACTION = 0.25


@dataclass(frozen=True)
class Abc2:
    """One lesion's ABC/2: the three diameters (mm) and the estimate (mL)."""

    a_mm: float
    b_mm: float
    c_mm: float

    @property
    def ml(self) -> float:
        return self.a_mm * self.b_mm * self.c_mm / 2.0 / 1000.0


def slice_weights(areas: np.ndarray) -> np.ndarray:
    """Kothari's weight of each slice from its lesion area: 1 (≥ 75 % of the largest), 0.5 (25–75 %), 0."""
    rel = np.asarray(areas, dtype=np.float64) / float(np.max(areas))
    return np.where(rel >= FULL_SLICE, 1.0, np.where(rel >= HALF_SLICE, 0.5, 0.0))


def abc2(col: np.ndarray, row: np.ndarray, u: np.ndarray, v: np.ndarray, slice_areas: np.ndarray,
         slice_thickness_mm: float) -> Abc2:
    """ABC/2 of one lesion.

    ``col``, ``row`` — integer lattice positions of the lesion's pixels on its largest-area slice;
    ``u``, ``v`` — the in-plane pixel steps along ``col`` and ``row`` in orthonormal in-plane mm
    (2-vectors; a sheared grid has u·v ≠ 0); ``slice_areas`` — the lesion's area (any unit) on each
    slice it occupies; ``slice_thickness_mm`` — the distance between slice planes.
    """
    col, row = np.asarray(col, np.int64), np.asarray(row, np.int64)
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    basis = np.stack([u, v], axis=1)  # lattice (col, row) → mm
    a_mm, direction = _feret_of_pixels(_row_ends(col, row) @ basis.T, u, v)
    b_mm = _longest_perpendicular_chord(col, row, basis, direction)
    c_mm = float(slice_weights(slice_areas).sum() * slice_thickness_mm)
    return Abc2(a_mm, b_mm, c_mm)


def _row_ends(col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """(col, row) of the first and last pixel of every lattice row: their squares' corners span the
    convex hull of all the pixels (a Feret diameter is a distance between hull vertices)."""
    order = np.lexsort((col, row))
    c, r = col[order], row[order]
    first = np.concatenate(([True], r[1:] != r[:-1]))
    last = np.concatenate((r[1:] != r[:-1], [True]))
    ends = first | last
    return np.stack([c[ends], r[ends]], axis=1).astype(np.float64)


def _feret_of_pixels(centres: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[float, np.ndarray]:
    """The largest distance between corners of the pixels centred at ``centres`` (mm) and its unit direction."""
    offsets = np.array([(+0.5, +0.5), (+0.5, -0.5), (-0.5, +0.5), (-0.5, -0.5)]) @ np.stack([u, v])
    corners = (centres[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
    corners = _hull_points(corners)
    d = corners[:, None, :] - corners[None, :, :]
    dist2 = (d ** 2).sum(-1)
    p, q = np.unravel_index(int(np.argmax(dist2)), dist2.shape)
    length = float(np.sqrt(dist2[p, q]))
    return length, (corners[q] - corners[p]) / length


def _hull_points(points: np.ndarray) -> np.ndarray:
    """The convex hull's vertices (all points when the hull is degenerate, e.g. collinear)."""
    if len(points) <= 16:
        return points
    from scipy.spatial import ConvexHull, QhullError

    try:
        return points[ConvexHull(points).vertices]
    except (QhullError, ValueError):
        return points


def _longest_perpendicular_chord(col: np.ndarray, row: np.ndarray, basis: np.ndarray, direction: np.ndarray) -> float:
    """The longest segment perpendicular to ``direction`` that lies inside the pixels (mm, edge to edge).

    Lines perpendicular to A are laid across the lesion at a fine step and sampled at the same
    step; a sample is inside when the pixel it falls in (nearest lattice point) is a lesion pixel.
    A chord is a run of consecutive inside samples, so a line crossing a crescent's two horns gives
    two chords, not one spanning the gap between them.
    """
    c0, r0 = col.min(), row.min()
    mask = np.zeros((row.max() - r0 + 3, col.max() - c0 + 3), bool)  # one empty pixel of margin on each side
    mask[row - r0 + 1, col - c0 + 1] = True
    perp = np.array([-direction[1], direction[0]])
    pixel = min(float(np.linalg.norm(basis[:, 0])), float(np.linalg.norm(basis[:, 1])))
    centres = np.stack([col, row], axis=1) @ basis.T
    along, across = centres @ direction, centres @ perp
    reach = float(np.linalg.norm(basis[:, 0]) + np.linalg.norm(basis[:, 1]))  # beyond any corner of a pixel
    size = max(float(np.ptp(along)), float(np.ptp(across))) + 2 * reach
    step = max(_STEP_FRACTION * pixel, size / 512.0)
    t = np.arange(along.min() - reach / 2, along.max() + reach / 2 + step, step)
    s = np.arange(across.min() - reach, across.max() + reach + step, step)
    points = t[:, None, None] * direction + s[None, :, None] * perp  # lines × samples × 2 (mm)
    lattice = np.rint(points @ np.linalg.inv(basis).T).astype(np.int64)
    i = np.clip(lattice[..., 0] - c0 + 1, 0, mask.shape[1] - 1)
    j = np.clip(lattice[..., 1] - r0 + 1, 0, mask.shape[0] - 1)
    inside = mask[j, i]
    return float(_longest_run(inside) * step)


def _longest_run(inside: np.ndarray) -> int:
    """Longest run of True along the last axis, over all rows."""
    padded = np.pad(inside, ((0, 0), (1, 1))).astype(np.int8)
    edges = np.diff(padded, axis=1)
    starts = np.argwhere(edges == 1)
    ends = np.argwhere(edges == -1)
    return int((ends[:, 1] - starts[:, 1]).max()) if len(starts) else 0
