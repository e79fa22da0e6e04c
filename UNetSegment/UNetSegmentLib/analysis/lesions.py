"""Per-lesion statistics: connected components of a label map, measured in physical (RAS) space.

Entry point: :func:`analyze_lesions` → :class:`LesionTable` (``rows`` + ``total`` row, CSV/TSV
writers and a ``summary.json`` fragment). The columns, their docs and the table live in
:mod:`.lesion_table`, the measurement kernels (components, Feret diameter, midline) in
:mod:`.lesion_measures`; this module assembles them and holds the one small-lesion rule
(:func:`small_lesion_filter`).

Conventions (all coordinates are RAS, millimetres; see :mod:`.image`):

* **Voxel centres.** Index ``(i, j, k)`` is the centre of a voxel; ``ijk_to_ras`` maps it to RAS.
  Centroids, the inside point, the Feret diameter and the extents are computed on voxel centres.
  ``extent_*_mm`` is ``max − min`` of the voxel-centre coordinates: **no voxel is added**, so a
  one-voxel lesion has extent 0 and a lesion of ``n`` voxels in a row along an axis-aligned axis of
  spacing ``s`` has extent ``(n−1)·s``. ``max_inplane_diameter_mm`` uses the same convention and
  agrees exactly with SimpleITK's ``LabelShapeStatisticsImageFilter`` Feret diameter
  (``ComputeFeretDiameterOn``), which measures between pixel centres.
* **Volumes** are ``voxels × |det(ijk_to_ras[:3, :3])|`` (mm³; mL = mm³ / 1000).
* **Slices.** ``slice_axis`` is the voxel axis closest to superior–inferior
  (:func:`.image.slice_axis`); all ``slice_*`` indices are 0-based along that axis.
  Two different slices are reported, always under these names: the **centroid slice**
  (``slice_index``: the centroid's coordinate on that axis rounded half-up) and the
  **largest-area slice** (``largest_area_slice``: the slice with most lesion voxels, ties: lowest index);
  ``largest_area_mm2`` = voxel count × in-plane voxel area (norm of the cross product of the two
  other axes' direction×spacing columns, so sheared grids are handled).
* **Inside point** (``inside_r/a/s``): the lesion voxel on its largest-area slice nearest (in mm)
  to that slice's 2D centroid — always a lesion voxel, unlike the centroid (e.g. a crescent).
* **Intensity** statistics use the original intensities: mean, *population* std (ddof=0; note
  SimpleITK's ``LabelIntensityStatisticsImageFilter`` reports the sample std, ddof=1), max.
* **Side.** In RAS, +R points to the patient's **right** (Slicer: "R: from left towards right").
  A lesion is ``'right'`` when its centroid R exceeds the mid-sagittal plane by
  :data:`MIDLINE_TOLERANCE_MM` or more, ``'left'`` when it is that much below, else ``'midline'``.
  The plane is ``midline_x_ras`` when given; otherwise the R coordinate of the centre of mass of the
  head in the intensity image: voxels above :data:`CT_HEAD_THRESHOLD_HU` for CT (``modality='CT'``,
  or, when ``modality`` is None, any intensity image whose minimum is below
  :data:`CT_AUTODETECT_MIN`, i.e. one that contains air in HU) and for other modalities voxels
  at or above the 10th percentile of the non-zero voxels (≥, so that a uniform head still counts).
  With neither an intensity image nor ``midline_x_ras``, ``side`` is empty (None).
* **DICOM** (series input only): ``dicom_*`` name the source image (InstanceNumber,
  SOPInstanceUID) holding the centroid and the one holding the inside point, matched to k by position.
* **Units** of every column: :data:`COLUMN_DOCS` (also in ``summary.json`` and docs/lesion-table.md).
* **Sorting.** Rows are sorted by volume descending, ties by label value, then by the first voxel
  in array (k, j, i) scan order; they are numbered 1..n in ``lesion``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from ..errors import UsageError
from ..image import Image
from ..image import slice_axis as _slice_axis
from ..params import FIELD
from .abc2 import abc2
from .lesion_measures import (
    CT_AUTODETECT_MIN,
    CT_HEAD_THRESHOLD_HU,
    MIDLINE_TOLERANCE_MM,
    NONCT_HEAD_PERCENTILE,
    check_grid,
    components,
    estimate_midline,
    feret_diameters,
    label_mask,
    group_stats,
    label_array,
    nonzero_box,
)
from .lesion_table import (
    ABC2_COLUMNS,
    COMPARTMENT_COLUMNS,
    PERILESIONAL_MM,
    COLUMN_DOCS,
    COLUMNS,
    CONTRACT_COLUMNS,
    DICOM_COLUMNS,
    INTENSITY_UNIT,
    LesionTable,
    column_docs,
    columns_markdown,
    dropped_note,
    dropped_summary,
    format_cell,
    total_row,
)

__all__ = [
    "ABC2_COLUMNS", "COLUMN_DOCS", "COMPARTMENT_COLUMNS", "PERILESIONAL_MM", "COLUMNS", "CONTRACT_COLUMNS", "CT_AUTODETECT_MIN", "CT_HEAD_THRESHOLD_HU", "DICOM_COLUMNS",
    "INTENSITY_UNIT", "LesionTable", "MIDLINE_TOLERANCE_MM", "MIN_SIZE_RTOL", "NONCT_HEAD_PERCENTILE", "analyze_lesions",
    "column_docs", "columns_markdown", "dropped_note", "dropped_summary", "format_cell", "remove_small_lesions",
    "small_lesion_filter", "split_small_lesions",
]

_AXIS_NAMES = ("i", "j", "k")
#: relative slack of the minimum lesion size (see :func:`small_lesion_filter`)
MIN_SIZE_RTOL = 1e-12


# --------------------------------------------------------------------------------------------
# The minimum lesion size
# --------------------------------------------------------------------------------------------
def small_lesion_filter(voxel_counts: np.ndarray, voxel_mm3: float,
                        min_lesion_ml: float) -> tuple[np.ndarray, tuple[float, ...]]:
    """The one minimum-size rule: which components to keep, and the volumes (mL, largest first) of the rest.

    A component is kept when ``voxels × voxel_mm3 / 1000 ≥ min_lesion_ml × (1 − MIN_SIZE_RTOL)``,
    ``MIN_SIZE_RTOL = 1e-12``. The slack absorbs the rounding of the voxel volume (a float
    determinant of direction × spacing): without it a component of exactly the minimum (e.g.
    3 voxels for a minimum of 3 voxel volumes) can come out one ulp under it and be dropped, or
    not, depending on the order of the products. It is far below any real difference (one voxel
    of a 10⁶-voxel lesion is 10⁻⁶). :func:`split_small_lesions` (the label map every output is
    made from) and :func:`analyze_lesions` (the table) both use it, so they drop the same components.
    """
    volume_ml = voxel_counts * voxel_mm3 / 1000.0
    keep = volume_ml >= min_lesion_ml * (1 - MIN_SIZE_RTOL)
    return keep, tuple(sorted((float(v) for v in volume_ml[~keep]), reverse=True))


def remove_small_lesions(labels: Image, min_lesion_ml: float, connectivity: int = 26,
                         lesion_values: Collection[int] | None = None) -> Image:
    """The label map without connected lesions smaller than ``min_lesion_ml`` (same components as the table)."""
    return split_small_lesions(labels, min_lesion_ml, connectivity, lesion_values)[0]


def split_small_lesions(labels: Image, min_lesion_ml: float, connectivity: int = 26,
                        lesion_values: Collection[int] | None = None) -> tuple[Image, tuple[float, ...]]:
    """:func:`remove_small_lesions` and the volumes (mL, largest first) of the components it dropped.

    Lesions are the components of the ``lesion_values`` labels together (None: every label; see
    :func:`.lesion_measures.components`); voxels of other labels (oedema) are kept as they are.
    A run whose every component is under the minimum reports "no lesion" although the model found
    something; the dropped volumes let the outputs say so.
    """
    if min_lesion_ml <= 0:
        return labels, ()
    lab = label_array(labels)
    box = nonzero_box(lab)
    if box is None:
        return labels, ()
    sub = lab[box]  # components only where there are labels: a 512×512×300 scan's lesions fill a small box
    comp, _ = components(sub, connectivity, lesion_values)
    keep, dropped = small_lesion_filter(np.bincount(comp.reshape(-1))[1:], labels.voxel_volume_mm3, min_lesion_ml)
    if not dropped:
        return labels, ()
    out = np.array(lab, dtype=labels.array.dtype, copy=True)
    out[box] = np.where(np.concatenate(([True], keep))[comp], sub, 0)  # id 0: background or context, kept
    return labels.with_array(out), dropped


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------
def analyze_lesions(
    labels: Image,
    intensity: Image | None = None,
    probability: Image | Mapping[int, Image] | None = None,
    label_names: Mapping[int, str] | None = None,
    connectivity: int = 26,
    min_lesion_ml: float = 0.0,
    midline_x_ras: float | None = None,
    *,
    modality: str | None = None,
    lesion_map: bool = False,
    intensity_channel: str | None = None,
    intensity_unit: str | None = None,
    dicom_slices: Sequence[Any] | None = None,
    lesion_values: Collection[int] | None = None,
    perilesional_values: Collection[int] = (),
) -> LesionTable:
    """The lesions of ``labels`` (connected components, see ``lesion_values``), measured (module docstring).

    ``intensity`` — the original input intensities on the same grid (None: intensity columns
    empty). ``probability`` — float probability of the lesion class on the same grid, or a dict
    label value → Image for multi-class maps (lesions of a label missing from it get empty
    probability columns). ``label_names`` maps label values to segment names (default: the value
    as text). ``modality`` ('CT' or other) only steers the midline estimate; None auto-detects.
    ``lesion_map`` also returns the map of lesion numbers (for matching lesions, e.g. in evaluation).
    ``intensity_channel``/``intensity_unit`` name what ``intensity`` is (recorded in the table).
    ``dicom_slices`` — for a DICOM series on this grid, one reference per k index (objects with
    ``instance_number`` and ``sop_instance_uid``, see :func:`.io.readers.dicom_slice_refs`): fills
    the :data:`DICOM_COLUMNS`. ``lesion_values`` — the labels that are lesions, whose components are
    taken together (a bundle's run passes its lesion labels; with more than one, ``compartment``
    names each lesion's majority label); None: every label value is labelled separately. ``perilesional_values`` —
    labels counted in ``perilesional_oedema_ml`` (e.g. a bundle's oedema: ``"lesion": false``).
    """
    lab, probability, min_lesion_ml = _checked_inputs(labels, intensity, probability, connectivity, min_lesion_ml,
                                                      dicom_slices)
    grid = _Grid.of(labels, lab.shape)
    midline = estimate_midline(intensity, midline_x_ras, modality)
    voxels = _lesion_voxels(lab, connectivity, min_lesion_ml, grid.voxel_mm3, lesion_values)
    common = dict(midline=midline, connectivity=int(connectivity), min_lesion_ml=min_lesion_ml,
                  dropped_ml=voxels.dropped_ml, intensity_channel=intensity_channel, intensity_unit=intensity_unit)
    if voxels.n == 0:
        return LesionTable([], total_row(0, 0.0, (None,) * 3, (None,) * 2,
                                         oedema_ml=0.0 if perilesional_values else None), **common)
    names = dict(label_names or {})
    columns = _geometry_columns(voxels, grid, names, midline, dicom_slices)
    columns["compartment"] = ([names.get(v, str(v)) for v in voxels.label_value.tolist()]
                              if lesion_values is not None and len(set(lesion_values)) > 1 else [None] * voxels.n)
    oedema, total_oedema = _perilesional_ml(lab, voxels, grid, perilesional_values)
    columns["perilesional_oedema_ml"] = oedema
    intensity_columns, total_intensity = _intensity_columns(intensity, voxels)
    probability_columns, total_probability = _probability_columns(probability, voxels)
    columns.update(intensity_columns, **probability_columns)
    # rows by volume (largest first), then label value, then first voxel in scan order
    order = np.lexsort((voxels.flat[voxels.starts], voxels.label_value, -voxels.counts))
    rows = _sorted_rows(columns, order)
    total = total_row(int(voxels.counts.sum()), grid.voxel_mm3, total_intensity, total_probability,
                      float(sum(columns["abc2_ml"])), total_oedema)
    numbers = _lesion_number_map(voxels, order, grid.shape) if lesion_map else None
    return LesionTable(rows, total, lesion_map=numbers, **common)


def _checked_inputs(labels: Image, intensity: Image | None, probability: Image | Mapping[int, Image] | None,
                    connectivity: int, min_lesion_ml: float,
                    dicom_slices: Sequence[Any] | None) -> tuple[np.ndarray, Image | dict[int, Image] | None, float]:
    """The label array, the probability image(s) (a mapping without its None entries) and the minimum
    size as float, after checking every argument of :func:`analyze_lesions` (one-line errors)."""
    FIELD["connectivity"].check(connectivity)  # the run parameters' one definition (UsageError)
    min_lesion_ml = FIELD["min_lesion_ml"].check(min_lesion_ml) or 0.0
    lab = label_array(labels)
    check_grid(labels, intensity, "intensity")
    if isinstance(probability, Mapping):
        probability = {int(k): v for k, v in probability.items() if v is not None}
        for k, v in probability.items():
            check_grid(labels, v, f"probability[{k}]")
    else:
        check_grid(labels, probability, "probability")
    if dicom_slices is not None and len(dicom_slices) != lab.shape[0]:
        raise UsageError(f"dicom_slices has {len(dicom_slices)} entries for {lab.shape[0]} slices (k)",
                         "give one reference per k index")
    return lab, probability, min_lesion_ml


@dataclass(frozen=True)
class _Grid:
    """The label map's geometry as the measurements use it."""

    ijk_to_ras: np.ndarray  # 4×4, float64
    shape: tuple[int, ...]  # K, J, I
    voxel_mm3: float
    slice_axis: int  # voxel axis closest to superior–inferior: 0 = i, 1 = j, 2 = k
    inplane_axes: tuple[int, int]  # the two other voxel axes
    inplane_area_mm2: float  # area of one voxel on a slice (sheared grids included)

    @classmethod
    def of(cls, labels: Image, shape: tuple[int, ...]) -> "_Grid":
        ijk_to_ras = np.asarray(labels.ijk_to_ras, dtype=np.float64)
        linear = ijk_to_ras[:3, :3]
        axis = _slice_axis(ijk_to_ras)
        a, b = [x for x in (0, 1, 2) if x != axis]
        return cls(ijk_to_ras, shape, float(abs(np.linalg.det(linear))), axis, (a, b),
                   float(np.linalg.norm(np.cross(linear[:, a], linear[:, b]))))

    @property
    def linear(self) -> np.ndarray:
        """direction × spacing: voxel index step → RAS mm"""
        return self.ijk_to_ras[:3, :3]

    @property
    def size_ijk(self) -> np.ndarray:
        """voxels along i, j, k"""
        return np.array([self.shape[2], self.shape[1], self.shape[0]])

    def to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """n×3 voxel indices (i, j, k) → n×3 RAS points"""
        return ijk @ self.linear.T + self.ijk_to_ras[:3, 3]


@dataclass
class _Voxels:
    """The voxels of the lesions kept, grouped by lesion (array scan order inside a lesion)."""

    flat: np.ndarray  # index of each voxel into the flattened K,J,I volume
    lesion_of: np.ndarray  # lesion id 0..n-1 of each voxel
    label_value: np.ndarray  # label value of each lesion
    counts: np.ndarray  # voxels of each lesion
    dropped_ml: tuple[float, ...]  # volumes of the components under the minimum size
    shape: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.label_value)

    @cached_property
    def starts(self) -> np.ndarray:
        """position of each lesion's first voxel"""
        return np.concatenate(([0], np.cumsum(self.counts)[:-1]))

    @cached_property
    def counts_f(self) -> np.ndarray:
        return self.counts.astype(np.float64)

    @cached_property
    def ijk(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """voxel index of each voxel along i, j, k"""
        k, j, i = np.unravel_index(self.flat, self.shape)
        return i, j, k


def _lesion_voxels(lab: np.ndarray, connectivity: int, min_lesion_ml: float, voxel_mm3: float,
                   lesion_values: Collection[int] | None = None) -> _Voxels:
    """Connected components of the lesion labels, without those under the minimum size.

    Components are found in the labels' bounding box only (lesions fill a small part of a head);
    the voxels' flat indices are those of the whole volume, in its scan order."""
    box = nonzero_box(lab)
    sub = lab[box] if box is not None else lab[:0, :0, :0]
    comp, label_value = components(sub, connectivity, lesion_values)
    flat_sub = np.flatnonzero(comp)
    lesion_of = comp.reshape(-1)[flat_sub].astype(np.int64) - 1
    del comp
    offset = [b.start for b in box] if box is not None else [0, 0, 0]
    flat = np.ravel_multi_index(tuple(c + o for c, o in zip(np.unravel_index(flat_sub, sub.shape), offset)), lab.shape)
    n = len(label_value)
    if n == 0:
        return _Voxels(flat, lesion_of, label_value, np.zeros(0, np.int64), (), lab.shape)
    order = np.argsort(lesion_of, kind="stable")  # stable: scan order kept inside a component
    flat, lesion_of = flat[order], lesion_of[order]
    counts = np.bincount(lesion_of, minlength=n)
    dropped: tuple[float, ...] = ()
    if min_lesion_ml > 0:
        keep, dropped = small_lesion_filter(counts, voxel_mm3, min_lesion_ml)
        if dropped:
            new_id = np.cumsum(keep) - 1
            kept_voxel = keep[lesion_of]
            flat, lesion_of = flat[kept_voxel], new_id[lesion_of[kept_voxel]]
            label_value, counts = label_value[keep], counts[keep]
    return _Voxels(flat, lesion_of, label_value, counts, dropped, lab.shape)


# --------------------------------------------------------------------------------------------
# Measurements, per lesion in lesion-id order
# --------------------------------------------------------------------------------------------
def _geometry_columns(voxels: _Voxels, grid: _Grid, label_names: Mapping[int, str], midline: dict,
                      dicom_slices: Sequence[Any] | None) -> dict[str, list]:
    """Every column but ``lesion`` and the intensity/probability ones, as lists in lesion-id order."""
    centroid_ijk, centroid_ras, first, last, touches, extent = _centroids_and_extents(voxels, grid)
    best_slice, best_voxels, slice_runs = _largest_area_slices(voxels, grid)
    inside_ijk, diameter = _inside_points_and_diameters(voxels, grid, best_slice, best_voxels)
    inside_ras = grid.to_ras(inside_ijk)
    axis = grid.slice_axis
    volume = voxels.counts * grid.voxel_mm3
    centroid_slice = np.floor(centroid_ijk[:, axis] + 0.5).astype(np.int64)  # round half up
    return {
        "label": [label_names.get(v, str(v)) for v in voxels.label_value.tolist()],
        "voxels": voxels.counts.tolist(),
        "volume_mm3": volume.tolist(),
        "volume_ml": (volume / 1000.0).tolist(),
        **{f"centroid_{c}": centroid_ras[:, d].tolist() for d, c in enumerate("ras")},
        **{f"centroid_{c}": centroid_ijk[:, d].tolist() for d, c in enumerate("ijk")},
        **{f"inside_{c}": inside_ras[:, d].tolist() for d, c in enumerate("ras")},
        "slice_axis": [_AXIS_NAMES[axis]] * voxels.n,
        "slice_index": centroid_slice.tolist(),
        "slice_first": first[:, axis].tolist(),
        "slice_last": last[:, axis].tolist(),
        "n_slices": (last[:, axis] - first[:, axis] + 1).tolist(),
        "largest_area_slice": best_slice.tolist(),
        "largest_area_mm2": (best_voxels * grid.inplane_area_mm2).tolist(),
        "max_inplane_diameter_mm": diameter.tolist(),
        **{f"extent_{c}_mm": extent[:, d].tolist() for d, c in enumerate("ras")},
        "side": _sides(centroid_ras[:, 0], midline),
        "touches_border": touches.tolist(),
        **_abc2_columns(voxels, grid, best_slice, slice_runs),
        **_dicom_columns(dicom_slices, np.floor(centroid_ijk[:, 2] + 0.5).astype(np.int64).tolist(),
                         inside_ijk[:, 2].astype(np.int64).tolist()),
    }


def _centroids_and_extents(voxels: _Voxels, grid: _Grid) -> tuple[np.ndarray, ...]:
    """Per lesion: centroid (i, j, k and RAS), first and last voxel index per axis (i, j, k), whether
    it touches the volume's border, and its extent along R, A, S (mm, between voxel centres)."""
    n, lesion_of, starts = voxels.n, voxels.lesion_of, voxels.starts
    ijk = voxels.ijk
    centroid_ijk = np.stack([np.bincount(lesion_of, weights=ijk[d], minlength=n) / voxels.counts_f for d in range(3)],
                            axis=1)
    first = np.stack([np.minimum.reduceat(ijk[d], starts) for d in range(3)], axis=1)
    last = np.stack([np.maximum.reduceat(ijk[d], starts) for d in range(3)], axis=1)
    touches = ((first == 0) | (last == grid.size_ijk - 1)).any(axis=1)
    extent = np.empty((n, 3))
    linear = grid.linear
    for r in range(3):
        coord = linear[r, 0] * ijk[0] + linear[r, 1] * ijk[1] + linear[r, 2] * ijk[2]  # translation cancels in max − min
        extent[:, r] = np.maximum.reduceat(coord, starts) - np.minimum.reduceat(coord, starts)
        del coord
    return centroid_ijk, grid.to_ras(centroid_ijk), first, last, touches, extent


def _largest_area_slices(voxels: _Voxels, grid: _Grid) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Per lesion: its largest-area slice (most voxels along the slice axis; ties: the lowest index)
    and its voxel count there; and every (lesion, slice) pair's voxel count as (lesion ids, counts),
    grouped by lesion."""
    axis = grid.slice_axis
    n_slices = int(grid.size_ijk[axis])
    key = voxels.lesion_of * n_slices + voxels.ijk[axis]  # (lesion, slice) as one number
    if axis != 2:  # k is already non-decreasing inside a lesion (scan order is k-major)
        key = np.sort(key, kind="stable")
    run_start = np.concatenate(([0], np.flatnonzero(np.diff(key)) + 1))  # one run per (lesion, slice)
    run_key = key[run_start]
    run_voxels = np.diff(np.concatenate((run_start, [key.size])))
    run_lesion, run_slice = run_key // n_slices, run_key % n_slices
    by_area = np.lexsort((run_slice, -run_voxels, run_lesion))  # per lesion: most voxels, then lowest slice
    first_of_lesion = np.concatenate(([True], np.diff(run_lesion[by_area]) != 0))
    best = by_area[first_of_lesion]  # one run per lesion, in lesion order
    return run_slice[best], run_voxels[best], (run_lesion, run_voxels)


def _inside_points_and_diameters(voxels: _Voxels, grid: _Grid, best_slice: np.ndarray,
                                 best_voxels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per lesion, from the voxels of its largest-area slice: the inside point (the voxel nearest to
    the slice's 2D centroid, ties: scan order; n×3 voxel index i, j, k) and the Feret diameter (mm)."""
    n = voxels.n
    col_axis, row_axis = grid.inplane_axes
    on = voxels.ijk[grid.slice_axis] == best_slice[voxels.lesion_of]
    lesion_on = voxels.lesion_of[on]
    ijk = [a[on] for a in voxels.ijk]  # the voxels on the largest-area slices
    x_mm, y_mm = _inplane_mm(grid, ijk[col_axis].astype(np.float64), ijk[row_axis].astype(np.float64))
    area = best_voxels.astype(np.float64)
    centre_x = np.bincount(lesion_on, weights=x_mm, minlength=n) / area
    centre_y = np.bincount(lesion_on, weights=y_mm, minlength=n) / area
    d2 = (x_mm - centre_x[lesion_on]) ** 2 + (y_mm - centre_y[lesion_on]) ** 2
    nearest_first = np.lexsort((d2, lesion_on))  # stable: ties → scan order
    pick = nearest_first[np.concatenate(([0], np.cumsum(best_voxels)[:-1]))]
    inside_ijk = np.stack([ijk[0][pick], ijk[1][pick], ijk[2][pick]], axis=1).astype(np.float64)
    diameter = feret_diameters(lesion_on, ijk[col_axis], ijk[row_axis], x_mm, y_mm, n)
    return inside_ijk, diameter


def _abc2_columns(voxels: _Voxels, grid: _Grid, best_slice: np.ndarray,
                  slice_runs: tuple[np.ndarray, np.ndarray]) -> dict[str, list]:
    """The ABC/2 columns per lesion (:mod:`.abc2`): A and B on the largest-area slice, C over its slices."""
    col_axis, row_axis = grid.inplane_axes
    x_u, y_u = _inplane_mm(grid, np.array([1.0]), np.array([0.0]))
    x_v, y_v = _inplane_mm(grid, np.array([0.0]), np.array([1.0]))
    u, v = np.array([x_u[0], y_u[0]]), np.array([x_v[0], y_v[0]])
    thickness = grid.voxel_mm3 / grid.inplane_area_mm2
    run_lesion, run_voxels = slice_runs
    run_bounds = np.searchsorted(run_lesion, np.arange(voxels.n + 1))
    on = voxels.ijk[grid.slice_axis] == best_slice[voxels.lesion_of]
    lesion_on, col_on, row_on = voxels.lesion_of[on], voxels.ijk[col_axis][on], voxels.ijk[row_axis][on]
    pixel_bounds = np.searchsorted(lesion_on, np.arange(voxels.n + 1))  # lesion ids are non-decreasing
    out: dict[str, list] = {c: [] for c in ABC2_COLUMNS}
    for n in range(voxels.n):
        p = slice(pixel_bounds[n], pixel_bounds[n + 1])
        m = abc2(col_on[p], row_on[p], u, v, run_voxels[run_bounds[n]:run_bounds[n + 1]], thickness)
        for c, value in zip(ABC2_COLUMNS, (m.ml, m.a_mm, m.b_mm, m.c_mm)):
            out[c].append(value)
    return out


def _inplane_mm(grid: _Grid, col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal in-plane coordinates (mm) of the slice lattice ``col·u + row·v`` (u, v: the in-plane
    axes' direction × spacing columns), so distances are true on sheared grids too."""
    col_axis, row_axis = grid.inplane_axes
    u, v = grid.linear[:, col_axis], grid.linear[:, row_axis]
    u_len = float(np.linalg.norm(u))
    e1 = u / u_len
    v_along = float(v @ e1)
    v_across = float(np.linalg.norm(v - v_along * e1))
    return col * u_len + row * v_along, row * v_across


def _sides(centroid_r: np.ndarray, midline: dict) -> list[str | None]:
    """'right', 'left' or 'midline' per lesion from its centroid R (None each without a midline)."""
    mid_r = midline.get("midline_r")
    if mid_r is None:
        return [None] * len(centroid_r)
    dr = centroid_r - mid_r
    return np.where(np.abs(dr) < MIDLINE_TOLERANCE_MM, "midline", np.where(dr > 0, "right", "left")).tolist()


def _intensity_columns(intensity: Image | None, voxels: _Voxels) -> tuple[dict[str, list], tuple]:
    """The intensity columns (lesion-id order; None each without an image) and the pooled (mean, std, max)."""
    if intensity is None:
        return dict.fromkeys(("mean_intensity", "std_intensity", "max_intensity"), [None] * voxels.n), (None,) * 3
    values = np.asarray(intensity.array).reshape(-1)[voxels.flat].astype(np.float64)
    mean, std, top = group_stats(values, voxels.lesion_of, voxels.starts, voxels.counts_f, voxels.n)
    columns = {"mean_intensity": mean.tolist(), "std_intensity": std.tolist(), "max_intensity": top.tolist()}
    return columns, (float(values.mean()), float(values.std()), float(values.max()))


def _probability_columns(probability: Image | Mapping[int, Image] | None, voxels: _Voxels) -> tuple[dict[str, list], tuple]:
    """The probability columns (lesion-id order) and the pooled (mean, max). A lesion gets values only
    when every one of its voxels has a finite probability (a label missing from a mapping: none)."""
    empty = dict.fromkeys(("mean_probability", "max_probability"), [None] * voxels.n), (None, None)
    if probability is None:
        return empty
    n, flat, lesion_of = voxels.n, voxels.flat, voxels.lesion_of
    values = np.full(flat.size, np.nan)
    if isinstance(probability, Mapping):
        value_of_voxel = voxels.label_value[lesion_of]
        for value, img in probability.items():
            m = value_of_voxel == value
            if m.any():
                values[m] = np.asarray(img.array).reshape(-1)[flat[m]]
    else:
        values[:] = np.asarray(probability.array).reshape(-1)[flat]
    finite = np.isfinite(values)
    if not finite.any():
        return empty
    complete = (np.bincount(lesion_of[finite], minlength=n) == voxels.counts).tolist()
    mean = np.bincount(lesion_of, weights=np.where(finite, values, 0.0), minlength=n) / voxels.counts_f
    top = np.maximum.reduceat(np.where(finite, values, -np.inf), voxels.starts)
    columns = {name: [x if ok else None for x, ok in zip(col.tolist(), complete)]
               for name, col in (("mean_probability", mean), ("max_probability", top))}
    return columns, (float(values[finite].mean()), float(values[finite].max()))


def _dicom_columns(refs: Sequence[Any] | None, centroid_k: list[int], inside_k: list[int]) -> dict[str, list]:
    """The :data:`DICOM_COLUMNS` per lesion: the source image of the centroid's and of the inside point's k."""
    if refs is None:
        return dict.fromkeys(DICOM_COLUMNS, [None] * len(centroid_k))
    last = len(refs) - 1
    centroid = [refs[min(max(k, 0), last)] for k in centroid_k]
    inside = [refs[k] for k in inside_k]
    return {
        "dicom_instance_number": [r.instance_number for r in centroid],
        "dicom_sop_instance_uid": [r.sop_instance_uid for r in centroid],
        "dicom_largest_instance_number": [r.instance_number for r in inside],
        "dicom_largest_sop_instance_uid": [r.sop_instance_uid for r in inside],
    }


def _perilesional_ml(lab: np.ndarray, voxels: _Voxels, grid: _Grid,
                     values: Collection[int]) -> tuple[list[float | None], float | None]:
    """Per lesion, the volume (mL) of the ``values`` labels within :data:`PERILESIONAL_MM` of it, each
    voxel counted for its nearest lesion (Euclidean distance in RAS mm between voxel centres, so
    sheared and oblique grids are measured exactly); and the total. ``[None…], None`` when the model
    has no such label."""
    if not values:
        return [None] * voxels.n, None
    from scipy.spatial import cKDTree

    context = np.flatnonzero(label_mask(lab, values))
    if context.size == 0:
        return [0.0] * voxels.n, 0.0
    lesion_ras = grid.to_ras(np.stack(voxels.ijk, axis=1).astype(np.float64))
    k, j, i = np.unravel_index(context, voxels.shape)
    dist, nearest = cKDTree(lesion_ras).query(grid.to_ras(np.stack([i, j, k], axis=1).astype(np.float64)),
                                              distance_upper_bound=PERILESIONAL_MM * (1 + 1e-9))
    owner = voxels.lesion_of[nearest[np.isfinite(dist)]]
    ml = np.bincount(owner, minlength=voxels.n) * grid.voxel_mm3 / 1000.0
    return ml.tolist(), float(ml.sum())


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------
def _sorted_rows(columns: Mapping[str, list], order: np.ndarray) -> list[dict]:
    """Row dicts keyed by :data:`COLUMNS`, lesions in ``order``, numbered 1..n in ``lesion``."""
    missing = set(COLUMNS[1:]) ^ set(columns)
    assert not missing, f"lesion columns not measured or unknown: {sorted(missing)}"
    positions = order.tolist()
    rows = []
    for number, i in enumerate(positions, start=1):
        rows.append({"lesion": number, **{c: columns[c][i] for c in COLUMNS[1:]}})
    return rows


def _lesion_number_map(voxels: _Voxels, order: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """int32 K,J,I map whose voxels hold their row's ``lesion`` number (0: background)."""
    rank = np.empty(voxels.n, np.int32)
    rank[order] = np.arange(1, voxels.n + 1, dtype=np.int32)
    numbers = np.zeros(shape, np.int32)
    numbers.reshape(-1)[voxels.flat] = rank[voxels.lesion_of]
    return numbers


if __name__ == "__main__":  # regenerate the table of docs/lesion-table.md
    print(columns_markdown(), end="")
