"""Grid forward and back: the input's grid ↔ the network's grid, in one place.

1. :func:`align_inputs` — channels 2..n resampled onto the first channel's grid in physical space.
2. :func:`canonical_grid` — array axes permuted/flipped (no interpolation) so that i points to
   patient left, j to posterior and k to superior as nearly as the directions allow. Oblique and
   gantry-tilted inputs keep their residual rotation: nearest axis, no through-plane up-sampling.
3. :func:`network_grid` — the model's target spacing (in-plane only for 2D/2.5D).

:func:`map_grid` binds the three to one input grid (a :class:`GridMapping`); its
:meth:`~GridMapping.to_network` goes forward, :meth:`~GridMapping.to_input` brings a map computed on
the network grid back to the input's grid, exactly inverting the axis permutation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..image import Image, make_ijk_to_ras, resample

#: canonical RAS direction of the i, j, k axes: i → left (−R), j → posterior (−A), k → superior
CANONICAL_AXES = np.array([-1.0, -1.0, 1.0])
#: skip resampling when the spacing is already within this fraction of the target
SPACING_TOLERANCE = 0.01
#: refuse inputs whose physical overlap with the first channel is below this fraction
MIN_OVERLAP_FRACTION = 0.5
#: map values below this are reported as 0: far under any threshold and any visible colour, and the
#: stored probability.nrrd of a 512×512×300 CT shrinks from 178 MB of float noise to a few MB
PROBABILITY_FLOOR = 1e-3


@dataclass(frozen=True)
class Grid:
    """A voxel grid without voxels: array shape (k, j, i) and its IJK→RAS matrix."""

    shape_kji: tuple[int, int, int]
    ijk_to_ras: np.ndarray

    @classmethod
    def of(cls, image: Image) -> "Grid":
        return cls(tuple(int(s) for s in image.array.shape[-3:]), image.ijk_to_ras)  # type: ignore[arg-type]

    def same_as(self, other: "Grid") -> bool:
        return self.shape_kji == other.shape_kji and np.allclose(self.ijk_to_ras, other.ijk_to_ras, atol=1e-6)


@dataclass(frozen=True)
class AxisMap:
    """How a canonical array relates to the source array: ``canon = np.flip(src.transpose(perm), flips)``."""

    perm: tuple[int, int, int]  # array axes (k, j, i order) of the source, in canonical array order
    flips: tuple[int, ...]  # canonical array axes that were flipped

    def apply(self, arr: np.ndarray) -> np.ndarray:
        lead = arr.ndim - 3
        axes = tuple(range(lead)) + tuple(lead + p for p in self.perm)
        out = arr.transpose(axes)
        if self.flips:
            out = np.flip(out, axis=tuple(lead + f for f in self.flips))
        return out

    def invert(self, arr: np.ndarray) -> np.ndarray:
        lead = arr.ndim - 3
        if self.flips:
            arr = np.flip(arr, axis=tuple(lead + f for f in self.flips))
        inv = np.argsort(self.perm)
        return arr.transpose(tuple(range(lead)) + tuple(lead + int(p) for p in inv))


def canonical_grid(image: Image) -> tuple[Image, AxisMap]:
    """Reorient by axis permutation and flips only; returns the new image and the map back."""
    d = image.direction  # columns: i, j, k directions in RAS
    # assign each RAS axis (R, A, S) the voxel axis most aligned with it (greedy on |cos|)
    score = np.abs(d).copy()  # score[ras_axis, voxel_axis]
    ras_for_voxel = [-1, -1, -1]
    for _ in range(3):
        r, v = np.unravel_index(np.argmax(score), score.shape)
        ras_for_voxel[v] = r
        score[r, :] = -1
        score[:, v] = -1
    voxel_for_ras = [ras_for_voxel.index(r) for r in range(3)]  # canonical i<-R axis, j<-A axis, k<-S axis
    # canonical array order is (k, j, i) = (S, A, R) voxel axes; source array axis of voxel axis v is 2 - v
    perm = tuple(2 - voxel_for_ras[r] for r in (2, 1, 0))
    m = image.ijk_to_ras
    new = np.eye(4)
    flips = []
    shape_kji = image.array.shape[-3:]
    origin_ijk = np.zeros(3)
    for c_axis, r in enumerate((0, 1, 2)):  # canonical i, j, k
        v = voxel_for_ras[r]
        col = m[:3, v].copy()
        if np.sign(col[r]) != CANONICAL_AXES[r]:
            col = -col
            flips.append(2 - c_axis)  # canonical array axis index of canonical voxel axis c_axis
            origin_ijk[v] = shape_kji[2 - v] - 1
        new[:3, c_axis] = col
    new[:3, 3] = (m @ np.append(origin_ijk, 1.0))[:3]
    amap = AxisMap(perm=perm, flips=tuple(sorted(flips)))
    return Image(amap.apply(image.array), new), amap


@dataclass(frozen=True)
class GridMapping:
    """One input grid's way to the network grid and back (:func:`map_grid`)."""

    reference: Image  # the input grid (the first channel, aligned)
    axes: AxisMap  # input array axes → canonical
    canonical: Grid  # the input on canonical axes
    network: Grid  # the model's grid (the canonical grid when no resampling is needed)

    def to_canonical(self, image: Image) -> Image:
        """``image`` (on the reference grid) with canonical axes: a view, no interpolation."""
        return Image(self.axes.apply(image.array), self.canonical.ijk_to_ras)

    def to_network(self, canonical: np.ndarray, order: int = 1, fill: float | None = None) -> np.ndarray:
        """A canonical-axes array on the network grid (linear, or nearest with ``order=0``; outside the
        input: ``fill``, default the array's minimum)."""
        if self.network is self.canonical:
            return canonical
        fill = float(canonical.min()) if fill is None else fill
        return resample(Image(canonical, self.canonical.ijk_to_ras), self.network.shape_kji, self.network.ijk_to_ras,
                        order=order, fill=fill).array

    def to_input(self, arr: np.ndarray, floor: float = PROBABILITY_FLOOR) -> Image:
        """A 0–1 map on the network grid → the input grid: linear resampling to the canonical grid, then
        the axes back (exact). One full-size float32 array at the end (clipped in place), never
        float64; values below ``floor`` become 0."""
        src = arr
        if arr.shape != self.canonical.shape_kji or not self.network.same_as(self.canonical):
            arr = resample(Image(arr, self.network.ijk_to_ras), self.canonical.shape_kji, self.canonical.ijk_to_ras,
                           order=1, fill=0.0).array
        out = np.ascontiguousarray(self.axes.invert(arr), dtype=np.float32)
        if np.shares_memory(out, src):
            out = out.copy()
        np.clip(out, 0.0, 1.0, out=out)
        if floor > 0:
            out[out < floor] = 0.0
        return Image(out, self.reference.ijk_to_ras)


def map_grid(reference: Image, target_spacing, in_plane_only: bool) -> GridMapping:
    """The :class:`GridMapping` of ``reference``'s grid for a model with ``target_spacing`` (mm, i j k)."""
    canon, axes = canonical_grid(reference)
    canonical = Grid.of(canon)
    net = network_grid(canon, target_spacing, in_plane_only)
    return GridMapping(reference, axes, canonical, net if net is not None else canonical)


def align_inputs(images: list[Image], names: list[str]) -> list[Image]:
    """Resample every channel onto the first one's grid; refuse channels that barely overlap it."""
    ref = images[0]
    out = [ref]
    for img, name in zip(images[1:], names[1:]):
        if img.same_grid(ref, atol=1e-4):
            out.append(img)
            continue
        frac = _overlap_fraction(ref, img)
        if frac < MIN_OVERLAP_FRACTION:
            raise InputError(
                f"input {name} covers only {frac:.0%} of {names[0]}'s volume in physical space",
                "give co-registered series of the same patient and session (register them first)",
            )
        out.append(resample(img, ref.array.shape, ref.ijk_to_ras, order=1, fill=float(np.min(img.array))))
    return out


def _overlap_fraction(ref: Image, other: Image) -> float:
    """Fraction of ref's voxel-centre bounding box that falls inside ``other`` (sampled on a coarse grid)."""
    i, j, k = (np.linspace(0, s - 1, 9) for s in ref.shape_ijk)
    pts = np.stack(np.meshgrid(i, j, k, indexing="ij"), -1).reshape(-1, 3)
    ijk = other.ras_to_ijk_points(ref.ijk_to_ras_points(pts))
    size = np.array(other.shape_ijk)
    inside = np.all((ijk >= -0.5) & (ijk <= size - 0.5), axis=1)
    return float(inside.mean())


def network_grid(image: Image, target_spacing, in_plane_only: bool) -> Grid | None:
    """The grid (same directions and physical extent) at the target spacing, or None if already there."""
    sp = image.spacing
    tgt = np.asarray(target_spacing, dtype=np.float64)
    if in_plane_only:
        tgt = np.array([tgt[0], tgt[1], sp[2]])
    if np.all(np.abs(sp / tgt - 1) <= SPACING_TOLERANCE):
        return None
    shape_ijk = np.array(image.shape_ijk)
    extent = shape_ijk * sp  # from outer edge to outer edge
    new_shape = np.maximum(1, np.round(extent / tgt)).astype(int)
    new_sp = extent / new_shape
    # keep the outer edges: the first voxel centre moves by half the spacing difference
    first = image.ijk_to_ras_points(np.full(3, -0.5))[0] + image.direction @ (new_sp / 2)
    m = make_ijk_to_ras(new_sp, image.direction, first)
    return Grid(tuple(int(s) for s in new_shape[::-1]), m)  # type: ignore[arg-type]
