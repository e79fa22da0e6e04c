"""Per-lesion statistics: connected components of a label map, measured in physical (RAS) space.

Entry point: :func:`analyze_lesions` → :class:`LesionTable` (``rows`` + ``total`` row, CSV/TSV
writers and a ``summary.json`` fragment).

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

import csv
import io
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError, OutputError, UsageError
from ..image import Image, slice_axis as _slice_axis

#: The 32 columns of the ``segment`` contract, in this order (other tools read them by name).
CONTRACT_COLUMNS: tuple[str, ...] = (
    "lesion",
    "label",
    "voxels",
    "volume_mm3",
    "volume_ml",
    "centroid_r",
    "centroid_a",
    "centroid_s",
    "centroid_i",
    "centroid_j",
    "centroid_k",
    "inside_r",
    "inside_a",
    "inside_s",
    "slice_axis",
    "slice_index",
    "slice_first",
    "slice_last",
    "n_slices",
    "largest_area_slice",
    "largest_area_mm2",
    "max_inplane_diameter_mm",
    "extent_r_mm",
    "extent_a_mm",
    "extent_s_mm",
    "mean_intensity",
    "std_intensity",
    "max_intensity",
    "mean_probability",
    "max_probability",
    "side",
    "touches_border",
)
#: DICOM series input only (empty otherwise): the source image holding the centroid slice and the
#: one holding the largest-area slice (see :data:`COLUMN_DOCS`).
DICOM_COLUMNS: tuple[str, ...] = (
    "dicom_instance_number",
    "dicom_sop_instance_uid",
    "dicom_largest_instance_number",
    "dicom_largest_sop_instance_uid",
)
#: Every column of ``lesions.csv``/``.tsv`` and of ``summary.json``'s lesions, in order. Columns
#: appended after the 32 keep this order: abc2_ml, abc2_a_mm, abc2_b_mm, abc2_c_mm, compartment,
#: perilesional_oedema_ml, then the DICOM columns (a column not implemented is simply absent).
COLUMNS: tuple[str, ...] = CONTRACT_COLUMNS + DICOM_COLUMNS

#: stands for the intensity channel's unit in :data:`COLUMN_DOCS` (HU for CT; see :func:`column_docs`)
INTENSITY_UNIT = "{intensity_unit}"
_SLICE = "slice index (0-based)"
_RAS = "mm (RAS)"

#: Unit and meaning of every column: the one definition behind ``summary.json``'s ``columns`` and
#: docs/lesion-table.md (a test checks that the document lists every column with this unit).
COLUMN_DOCS: dict[str, tuple[str, str]] = {
    "lesion": ("", "lesion number 1..n, largest volume first; the last row is 'total' (sums and pooled statistics)"),
    "label": ("", "segment name of the model label the lesion belongs to (e.g. hemorrhage)"),
    "voxels": ("voxels", "number of voxels of the lesion (one connected component of one label)"),
    "volume_mm3": ("mm³", "voxels × voxel volume"),
    "volume_ml": ("mL", "volume_mm3 / 1000"),
    "centroid_r": (_RAS, "centroid (mean of the voxel centres), R coordinate: + toward the patient's right"),
    "centroid_a": (_RAS, "centroid, A coordinate: + toward anterior"),
    "centroid_s": (_RAS, "centroid, S coordinate: + toward superior"),
    "centroid_i": ("voxel index (0-based, fractional)", "centroid along the array axis i (columns)"),
    "centroid_j": ("voxel index (0-based, fractional)", "centroid along the array axis j (rows)"),
    "centroid_k": ("voxel index (0-based, fractional)", "centroid along the array axis k (slices as stored)"),
    "inside_r": (_RAS, "inside point, R: the lesion voxel on the largest-area slice nearest to that slice's 2D "
                       "centroid (always inside the lesion, unlike the centroid of a crescent)"),
    "inside_a": (_RAS, "inside point, A coordinate"),
    "inside_s": (_RAS, "inside point, S coordinate"),
    "slice_axis": ("", "voxel axis (i, j or k) closest to superior–inferior; every slice_* column and n_slices count "
                       "along it"),
    "slice_index": (_SLICE, "centroid slice: the centroid's index on slice_axis, rounded half up (the CLI's "
                            "'centroid slice')"),
    "slice_first": (_SLICE, "first slice holding lesion voxels"),
    "slice_last": (_SLICE, "last slice holding lesion voxels"),
    "n_slices": ("slices", "slice_last − slice_first + 1"),
    "largest_area_slice": (_SLICE, "largest-area slice: the slice with the most lesion voxels (ties: the lowest "
                                   "index); the report's panels show it"),
    "largest_area_mm2": ("mm²", "lesion area on the largest-area slice (voxels × in-plane voxel area)"),
    "max_inplane_diameter_mm": ("mm", "largest distance between voxel centres of the lesion on its largest-area slice "
                                      "(Feret diameter; equals SimpleITK's FeretDiameter on that slice)"),
    "extent_r_mm": ("mm", "max − min of the voxel-centre R coordinates (no voxel added: one voxel gives 0)"),
    "extent_a_mm": ("mm", "max − min of the voxel-centre A coordinates"),
    "extent_s_mm": ("mm", "max − min of the voxel-centre S coordinates"),
    "mean_intensity": (INTENSITY_UNIT, "mean of the intensity channel (summary.json: intensity_channel) over the "
                                       "lesion's voxels, original values"),
    "std_intensity": (INTENSITY_UNIT, "population standard deviation (ddof = 0) of the intensity channel; "
                                      "SimpleITK's LabelIntensityStatisticsImageFilter reports the sample std (ddof = 1)"),
    "max_intensity": (INTENSITY_UNIT, "maximum of the intensity channel over the lesion's voxels"),
    "mean_probability": ("probability 0–1", "mean model probability of the lesion's label over its voxels"),
    "max_probability": ("probability 0–1", "maximum model probability of the lesion's label over its voxels"),
    "side": ("", "'right', 'left' or 'midline' (the patient's side: centroid R vs the mid-sagittal plane, 'midline' "
                 "within 5 mm; summary.json: side_method); empty when it cannot be determined"),
    "touches_border": ("true/false", "the lesion reaches the edge of the volume (it may extend beyond the scan)"),
    "dicom_instance_number": ("", "DICOM input only: InstanceNumber (0020,0013) of the source image holding the "
                                  "centroid (its k index rounded half up; for axial series the centroid slice)"),
    "dicom_sop_instance_uid": ("", "DICOM input only: SOPInstanceUID (0008,0018) of that image"),
    "dicom_largest_instance_number": ("", "DICOM input only: InstanceNumber of the source image holding the "
                                          "inside point (for axial series the largest-area slice)"),
    "dicom_largest_sop_instance_uid": ("", "DICOM input only: SOPInstanceUID of that image"),
}


def columns_markdown() -> str:
    """The column table of docs/lesion-table.md, from :data:`COLUMN_DOCS` (``python -m UNetSegmentLib.analysis.lesions``)."""
    lines = ["| # | column | unit | meaning |", "|---|---|---|---|"]
    for n, c in enumerate(COLUMNS, start=1):
        unit, desc = COLUMN_DOCS[c]
        unit = "unit of the intensity channel" if unit == INTENSITY_UNIT else unit
        lines.append(f"| {n} | `{c}` | {unit or '–'} | {desc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def column_docs(intensity_unit: str | None = None, intensity_channel: str | None = None) -> dict[str, dict[str, str]]:
    """``{column: {"unit", "description"}}`` for :data:`COLUMNS`, with the intensity channel's unit filled in."""
    unit = intensity_unit or "intensity unit of the input"
    out = {}
    for c in COLUMNS:
        u, d = COLUMN_DOCS[c]
        if u == INTENSITY_UNIT:
            u = unit
            if intensity_channel:
                d = d.replace("the intensity channel", f"the intensity channel ({intensity_channel})", 1)
        out[c] = {"unit": u, "description": d}
    return out


#: |R − midline| below this (mm) → side 'midline'.
MIDLINE_TOLERANCE_MM = 5.0
#: CT head mask threshold for the midline estimate (HU).
CT_HEAD_THRESHOLD_HU = -300.0
#: With ``modality=None`` an intensity image whose minimum is below this is treated as CT.
CT_AUTODETECT_MIN = -500.0
#: Non-CT head mask: voxels above this percentile of the non-zero voxels.
NONCT_HEAD_PERCENTILE = 10.0

_AXIS_NAMES = ("i", "j", "k")
# Feret diameter: lesions whose candidate-point count is at most this use vectorised brute force.
_FERET_BRUTE_MAX = 64


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------
@dataclass
class LesionTable:
    """Per-lesion rows (dicts keyed by :data:`COLUMNS`) plus the ``total`` row."""

    rows: list[dict]
    total: dict
    midline: dict = field(default_factory=dict)
    connectivity: int = 26
    min_lesion_ml: float = 0.0
    #: with ``analyze_lesions(..., lesion_map=True)``: int32 K,J,I map, voxel value = row's ``lesion`` number
    lesion_map: np.ndarray | None = field(default=None, repr=False)
    #: the input channel the intensity columns describe, and its unit (e.g. "CT", "HU"; "Tmax", "s")
    intensity_channel: str | None = None
    intensity_unit: str | None = None
    #: volumes (mL, largest first) of the components dropped for being under ``min_lesion_ml``
    #: (set by the caller that removed them, see :func:`split_small_lesions`)
    dropped_ml: tuple[float, ...] = ()

    @property
    def n_lesions(self) -> int:
        return len(self.rows)

    @property
    def total_volume_ml(self) -> float:
        return float(self.total["volume_ml"])

    def to_records(self) -> list[dict]:
        """Lesion rows followed by the total row, each a dict with exactly :data:`COLUMNS`."""
        return [{c: r.get(c) for c in COLUMNS} for r in (*self.rows, self.total)]

    # --- files -------------------------------------------------------------------------------
    def to_text(self, delimiter: str = ",") -> str:
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
        w.writerow(COLUMNS)
        for rec in self.to_records():
            w.writerow([_fmt(rec[c]) for c in COLUMNS])
        return buf.getvalue()

    def write_csv(self, path) -> str:
        return _atomic_write(path, self.to_text(","))

    def write_tsv(self, path) -> str:
        return _atomic_write(path, self.to_text("\t"))

    # --- JSON --------------------------------------------------------------------------------
    def summary_dict(self) -> dict:
        lesions = []
        for row in self.rows:
            d = {c: _json_value(row.get(c)) for c in COLUMNS}
            d["centroid_lps"] = _ras_to_lps(row["centroid_r"], row["centroid_a"], row["centroid_s"])
            d["inside_lps"] = _ras_to_lps(row["inside_r"], row["inside_a"], row["inside_s"])
            lesions.append(d)
        return {
            "coordinate_system": "RAS",
            "columns": column_docs(self.intensity_unit, self.intensity_channel),
            "intensity_channel": self.intensity_channel,
            "intensity_unit": self.intensity_unit,
            "n_lesions": self.n_lesions,
            "total_volume_ml": self.total_volume_ml,
            "connectivity": int(self.connectivity),
            "min_lesion_ml": float(self.min_lesion_ml),
            "dropped_small_lesions": dropped_summary(self.dropped_ml),
            "side_method": self.midline.get("method", ""),
            "midline_r": _json_value(self.midline.get("midline_r")),
            "midline_tolerance_mm": MIDLINE_TOLERANCE_MM,
            "lesions": lesions,
            "total": {c: _json_value(self.total.get(c)) for c in COLUMNS},
        }


def dropped_summary(volumes_ml) -> dict:
    """``summary.json``'s account of the components removed by the minimum lesion size."""
    v = sorted((float(x) for x in volumes_ml), reverse=True)
    return {"count": len(v), "largest_ml": round(v[0], 6) if v else None, "total_ml": round(sum(v), 6)}


def dropped_note(dropped: Mapping | None, min_lesion_ml: float) -> str:
    """One sentence on the components under the minimum size ('' when none were dropped)."""
    n = int((dropped or {}).get("count") or 0)
    if n == 0:
        return ""
    what = "1 component" if n == 1 else f"{n} components"
    size = (f"{dropped['largest_ml']:.3g} mL" if n == 1
            else f"largest {dropped['largest_ml']:.3g} mL, {dropped['total_ml']:.3g} mL in all")
    return f"{what} under the {min_lesion_ml:g} mL minimum lesion size {'was' if n == 1 else 'were'} dropped ({size})"


def _ras_to_lps(r, a, s) -> list[float]:
    return [-float(r), -float(a), float(s)]


def _json_value(v):
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return ""
        s = f"{v:.6f}".rstrip("0").rstrip(".")
        return "0" if s in ("-0", "") else s
    return str(v)


def _atomic_write(path, text: str) -> str:
    from ..io.writers import atomic_path

    try:
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e}", "check that the folder exists and is writable") from e
    return os.fspath(path)


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
) -> LesionTable:
    """Connected components of each label value of ``labels``, measured (see module docstring).

    ``intensity`` — the original input intensities on the same grid (None: intensity columns
    empty). ``probability`` — float probability of the lesion class on the same grid, or a dict
    label value → Image for multi-class maps (lesions of a label missing from it get empty
    probability columns). ``label_names`` maps label values to segment names (default: the value
    as text). ``modality`` ('CT' or other) only steers the midline estimate; None auto-detects.
    ``lesion_map`` also returns the map of lesion numbers (for matching lesions, e.g. in evaluation).
    ``intensity_channel``/``intensity_unit`` name what ``intensity`` is (recorded in the table).
    ``dicom_slices`` — for a DICOM series on this grid, one reference per k index (objects with
    ``instance_number`` and ``sop_instance_uid``, see :func:`.io.readers.dicom_slice_refs`): fills
    the :data:`DICOM_COLUMNS`.
    """
    if connectivity not in (6, 18, 26):
        raise UsageError(f"connectivity must be 6 or 26, got {connectivity!r}", "use 6 (faces) or 26 (faces, edges, corners)")
    min_lesion_ml = float(min_lesion_ml)
    if not math.isfinite(min_lesion_ml) or min_lesion_ml < 0:
        raise UsageError(f"min_lesion_ml must be ≥ 0, got {min_lesion_ml}", "pass 0 to keep every lesion")
    label_names = dict(label_names or {})
    lab = _label_array(labels)
    shape = lab.shape
    _check_grid(labels, intensity, "intensity")
    prob_images: dict[int, Image] | Image | None
    if isinstance(probability, Mapping):
        prob_images = {int(k): v for k, v in probability.items() if v is not None}
        for k, v in prob_images.items():
            _check_grid(labels, v, f"probability[{k}]")
    else:
        prob_images = probability
        _check_grid(labels, probability, "probability")

    M = np.asarray(labels.ijk_to_ras, dtype=np.float64)
    A = M[:3, :3]
    voxel_mm3 = float(abs(np.linalg.det(A)))
    ax = _slice_axis(M)  # 0=i, 1=j, 2=k
    pa, pb = [x for x in (0, 1, 2) if x != ax]  # in-plane voxel axes
    inplane_area = float(np.linalg.norm(np.cross(A[:, pa], A[:, pb])))

    midline = _midline(intensity, midline_x_ras, modality)

    # --- connected components per label value (one full-volume pass per value) ------------
    comp, comp_value = _components(lab, connectivity)
    dropped: tuple[float, ...] = ()
    flat = np.flatnonzero(comp)
    ids = comp.reshape(-1)[flat].astype(np.int64) - 1
    del comp
    n = len(comp_value)
    if n and flat.size:
        order = np.argsort(ids, kind="stable")  # stable: scan order kept inside a component
        flat = flat[order]
        ids = ids[order]
        counts = np.bincount(ids, minlength=n)
        # minimum size filter
        if min_lesion_ml > 0:
            keep = counts * voxel_mm3 / 1000.0 >= min_lesion_ml * (1 - 1e-12)
            if not keep.all():
                dropped = tuple(sorted((float(c) * voxel_mm3 / 1000.0 for c in counts[~keep]), reverse=True))
                newid = np.cumsum(keep) - 1
                vmask = keep[ids]
                flat, ids = flat[vmask], newid[ids[vmask]]
                comp_value = comp_value[keep]
                counts = counts[keep]
                n = len(comp_value)
    else:
        counts = np.zeros(0, np.int64)
    if dicom_slices is not None and len(dicom_slices) != shape[0]:
        raise UsageError(f"dicom_slices has {len(dicom_slices)} entries for {shape[0]} slices (k)", "give one reference per k index")
    if n == 0:
        return replace(_empty_table(intensity, prob_images, midline, connectivity, min_lesion_ml), dropped_ml=dropped,
                       intensity_channel=intensity_channel, intensity_unit=intensity_unit)

    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    kk, jj, ii = np.unravel_index(flat, shape)
    idx = (ii, jj, kk)  # voxel index per axis 0=i, 1=j, 2=k

    # --- centroid, bounding box, extents ----------------------------------------------------
    cnt_f = counts.astype(np.float64)
    cen_ijk = np.stack([np.bincount(ids, weights=idx[d], minlength=n) / cnt_f for d in range(3)], axis=1)
    cen_ras = cen_ijk @ A.T + M[:3, 3]
    lo = np.stack([np.minimum.reduceat(idx[d], starts) for d in range(3)], axis=1)
    hi = np.stack([np.maximum.reduceat(idx[d], starts) for d in range(3)], axis=1)
    dims = np.array([shape[2], shape[1], shape[0]])
    touches = ((lo == 0) | (hi == dims - 1)).any(axis=1)
    extent = np.empty((n, 3))
    for r in range(3):
        coord = A[r, 0] * ii + A[r, 1] * jj + A[r, 2] * kk  # translation cancels in max − min
        extent[:, r] = np.maximum.reduceat(coord, starts) - np.minimum.reduceat(coord, starts)
        del coord

    # --- per-slice areas: largest-area slice --------------------------------------------------
    s_idx = idx[ax]
    S = int(dims[ax])
    key = ids * S + s_idx
    if ax != 2:  # k is already non-decreasing inside a component (scan order is k-major)
        key = np.sort(key, kind="stable")
    brk = np.flatnonzero(np.diff(key)) + 1
    run_start = np.concatenate(([0], brk))
    run_key = key[run_start]
    run_cnt = np.diff(np.concatenate((run_start, [key.size])))
    run_comp, run_slice = run_key // S, run_key % S
    o = np.lexsort((run_slice, -run_cnt, run_comp))
    first_of_comp = np.concatenate(([True], np.diff(run_comp[o]) != 0))
    best = o[first_of_comp]  # one run per component, in component order
    best_slice = run_slice[best]
    best_cnt = run_cnt[best]
    del key, run_key, run_comp, run_slice, run_cnt, run_start, brk

    # --- voxels of the largest-area slice: inside point and Feret diameter -------------------
    on = s_idx == best_slice[ids]
    sid = ids[on]
    ia = idx[pa][on].astype(np.float64)
    ib = idx[pb][on].astype(np.float64)
    sfi = ii[on], jj[on], kk[on]
    # orthonormal in-plane coordinates (mm) of the slice lattice ia*u + ib*v
    u, v = A[:, pa], A[:, pb]
    nu = float(np.linalg.norm(u))
    e1 = u / nu
    vu = float(v @ e1)
    vperp = float(np.linalg.norm(v - vu * e1))
    px = ia * nu + ib * vu
    py = ib * vperp
    bc = best_cnt.astype(np.float64)
    cx = np.bincount(sid, weights=px, minlength=n) / bc
    cy = np.bincount(sid, weights=py, minlength=n) / bc
    d2 = (px - cx[sid]) ** 2 + (py - cy[sid]) ** 2
    o = np.lexsort((d2, sid))  # stable: ties → scan order
    s_starts = np.concatenate(([0], np.cumsum(best_cnt)[:-1]))
    pick = o[s_starts]
    inside_ijk = np.stack([sfi[0][pick], sfi[1][pick], sfi[2][pick]], axis=1).astype(np.float64)
    inside_ras = inside_ijk @ A.T + M[:3, 3]
    diameter = _feret(sid, idx[pa][on], idx[pb][on], px, py, n)
    del d2, o, sfi

    # --- intensity and probability -----------------------------------------------------------
    stats: dict[str, Any] = {}
    total_int = (None, None, None)
    if intensity is not None:
        vals = np.asarray(intensity.array).reshape(-1)[flat].astype(np.float64)
        mean, std, mx = _group_stats(vals, ids, starts, cnt_f, n)
        stats["mean_intensity"], stats["std_intensity"], stats["max_intensity"] = mean, std, mx
        total_int = (float(vals.mean()), float(vals.std()), float(vals.max()))
    total_prob = (None, None)
    prob_have = None
    if prob_images is not None:
        pvals = np.full(flat.size, np.nan)
        if isinstance(prob_images, Mapping):
            vox_value = comp_value[ids]
            for value, img in prob_images.items():
                m = vox_value == value
                if m.any():
                    pvals[m] = np.asarray(img.array).reshape(-1)[flat[m]]
        else:
            pvals[:] = np.asarray(prob_images.array).reshape(-1)[flat]
        good = np.isfinite(pvals)
        prob_have = np.bincount(ids[good], minlength=n) == counts
        if good.any():
            pz = np.where(good, pvals, 0.0)
            pmean = np.bincount(ids, weights=pz, minlength=n) / cnt_f
            pmax = np.maximum.reduceat(np.where(good, pvals, -np.inf), starts)
            stats["mean_probability"], stats["max_probability"] = pmean, pmax
            total_prob = (float(pvals[good].mean()), float(pvals[good].max()))
        else:
            prob_have[:] = False

    # --- side -----------------------------------------------------------------------------------
    mid_r = midline.get("midline_r")
    if mid_r is None:
        side = [None] * n
    else:
        dr = cen_ras[:, 0] - mid_r
        side = np.where(np.abs(dr) < MIDLINE_TOLERANCE_MM, "midline", np.where(dr > 0, "right", "left")).tolist()

    # --- rows, sorted by volume ------------------------------------------------------------------
    first_flat = flat[starts]
    order = np.lexsort((first_flat, comp_value, -counts))
    o = order

    def col(x) -> list:  # column in row order as plain Python values
        return np.asarray(x)[o].tolist()

    vox = counts[o]
    vol = vox * voxel_mm3
    none = [None] * n
    names = {int(v): label_names.get(int(v), str(int(v))) for v in np.unique(comp_value)}
    prob_ok = prob_have[o] if prob_have is not None else None

    def prob_col(name) -> list:
        if name not in stats:
            return none
        return [x if ok else None for x, ok in zip(col(stats[name]), prob_ok.tolist())]

    cols = {
        "lesion": list(range(1, n + 1)),
        "label": [names[v] for v in col(comp_value)],
        "voxels": vox.tolist(),
        "volume_mm3": vol.tolist(),
        "volume_ml": (vol / 1000.0).tolist(),
        "centroid_r": col(cen_ras[:, 0]),
        "centroid_a": col(cen_ras[:, 1]),
        "centroid_s": col(cen_ras[:, 2]),
        "centroid_i": col(cen_ijk[:, 0]),
        "centroid_j": col(cen_ijk[:, 1]),
        "centroid_k": col(cen_ijk[:, 2]),
        "inside_r": col(inside_ras[:, 0]),
        "inside_a": col(inside_ras[:, 1]),
        "inside_s": col(inside_ras[:, 2]),
        "slice_axis": [_AXIS_NAMES[ax]] * n,
        "slice_index": col(np.floor(cen_ijk[:, ax] + 0.5).astype(np.int64)),  # round half up
        "slice_first": col(lo[:, ax]),
        "slice_last": col(hi[:, ax]),
        "n_slices": col(hi[:, ax] - lo[:, ax] + 1),
        "largest_area_slice": col(best_slice),
        "largest_area_mm2": col(best_cnt * inplane_area),
        "max_inplane_diameter_mm": col(diameter),
        "extent_r_mm": col(extent[:, 0]),
        "extent_a_mm": col(extent[:, 1]),
        "extent_s_mm": col(extent[:, 2]),
        "mean_intensity": col(stats["mean_intensity"]) if "mean_intensity" in stats else none,
        "std_intensity": col(stats["std_intensity"]) if "std_intensity" in stats else none,
        "max_intensity": col(stats["max_intensity"]) if "max_intensity" in stats else none,
        "mean_probability": prob_col("mean_probability"),
        "max_probability": prob_col("max_probability"),
        "side": [side[c] for c in o.tolist()],
        "touches_border": col(touches),
        **_dicom_columns(dicom_slices, col(np.floor(cen_ijk[:, 2] + 0.5).astype(np.int64)), col(inside_ijk[:, 2].astype(np.int64))),
    }
    assert tuple(cols) == COLUMNS
    rows = [dict(zip(COLUMNS, vals)) for vals in zip(*cols.values())]

    total = _total_row(int(counts.sum()), voxel_mm3, total_int, total_prob)
    lmap = None
    if lesion_map:
        rank = np.empty(n, np.int32)
        rank[order] = np.arange(1, n + 1, dtype=np.int32)
        lmap = np.zeros(shape, np.int32)
        lmap.reshape(-1)[flat] = rank[ids]
    return LesionTable(rows, total, midline, int(connectivity), min_lesion_ml, lmap, dropped_ml=dropped,
                       intensity_channel=intensity_channel, intensity_unit=intensity_unit)


def _dicom_columns(refs: Sequence[Any] | None, centroid_k: list[int], inside_k: list[int]) -> dict[str, list]:
    """The :data:`DICOM_COLUMNS` per row: the source image of the centroid's and of the inside point's k."""
    if refs is None:
        none = [None] * len(centroid_k)
        return {c: none for c in DICOM_COLUMNS}
    last = len(refs) - 1
    cen = [refs[min(max(k, 0), last)] for k in centroid_k]
    big = [refs[k] for k in inside_k]
    return {
        "dicom_instance_number": [r.instance_number for r in cen],
        "dicom_sop_instance_uid": [r.sop_instance_uid for r in cen],
        "dicom_largest_instance_number": [r.instance_number for r in big],
        "dicom_largest_sop_instance_uid": [r.sop_instance_uid for r in big],
    }


def remove_small_lesions(labels: Image, min_lesion_ml: float, connectivity: int = 26) -> Image:
    """The label map without connected lesions smaller than ``min_lesion_ml`` (same components as the table)."""
    return split_small_lesions(labels, min_lesion_ml, connectivity)[0]


def split_small_lesions(labels: Image, min_lesion_ml: float, connectivity: int = 26) -> tuple[Image, tuple[float, ...]]:
    """:func:`remove_small_lesions` and the volumes (mL, largest first) of the components it dropped.

    A run whose every component is under the minimum reports "no lesion" although the model found
    something; the dropped volumes let the outputs say so.
    """
    if min_lesion_ml <= 0:
        return labels, ()
    lab = _label_array(labels)
    box = _nonzero_box(lab)
    if box is None:
        return labels, ()
    sub = lab[box]  # components only where there are labels: a 512×512×300 scan's lesions fill a small box
    comp, _ = _components(sub, connectivity)
    counts = np.bincount(comp.reshape(-1))
    vol_ml = counts * labels.voxel_volume_mm3 / 1000.0
    keep = vol_ml >= min_lesion_ml
    keep[0] = False
    dropped = tuple(sorted((float(v) for v in vol_ml[1:][~keep[1:]]), reverse=True))
    if not dropped:
        return labels, ()
    out = np.array(lab, dtype=labels.array.dtype, copy=True)
    out[box] = np.where(keep[comp], sub, 0)
    return labels.with_array(out), dropped


def _nonzero_box(a: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the nonzero voxels of ``a`` (None when there are none)."""
    nz = a != 0
    box = []
    for axis in range(a.ndim):
        idx = np.flatnonzero(nz.any(axis=tuple(x for x in range(a.ndim) if x != axis)))
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _label_array(labels: Image) -> np.ndarray:
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


def _check_grid(labels: Image, other: Image | None, what: str) -> None:
    if other is None:
        return
    if not isinstance(other, Image):
        raise UsageError(f"{what} must be an Image or None", "wrap the array: Image(array, ijk_to_ras)")
    if np.asarray(other.array).ndim != 3 or not labels.same_grid(other):
        raise InputError(
            f"{what} is not on the label map's grid ({other.array.shape} vs {labels.array.shape})",
            "resample it onto the label map's grid first",
        )


def _components(lab: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Component id map (1..n, int32) over all label values, and the label value of each id."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
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


def _group_stats(vals, ids, starts, cnt_f, n):
    mean = np.bincount(ids, weights=vals, minlength=n) / cnt_f
    var = np.bincount(ids, weights=(vals - mean[ids]) ** 2, minlength=n) / cnt_f  # ddof = 0
    mx = np.maximum.reduceat(vals, starts)
    return mean, np.sqrt(var), mx


def _feret(sid, ia_int, ib_int, px, py, n) -> np.ndarray:
    """Max distance between voxel centres of each component's largest-area slice.

    The convex hull of lattice points is the hull of each lattice row's two end points, so only
    those are kept (≤ 2 per row). Up to ``_FERET_BRUTE_MAX`` candidates: vectorised brute force
    over all pairs (the maximum over all pairs equals the maximum over hull vertices); more: the
    scipy ConvexHull of the candidates, then all pairs of its vertices (brute force over the
    candidates where the hull is degenerate, i.e. collinear points).
    """
    o = np.lexsort((ia_int, ib_int, sid))
    sid_o, ib_o = sid[o], ib_int[o]
    new_row = np.concatenate(([True], (np.diff(sid_o) != 0) | (np.diff(ib_o) != 0)))
    first = np.flatnonzero(new_row)
    last = np.concatenate((first[1:], [sid_o.size])) - 1
    # row ends, interleaved (first ≤ last < next first: already sorted), single-voxel rows once
    cand = np.stack((first, last), axis=1).ravel()[np.stack((np.ones_like(first, bool), last != first), axis=1).ravel()]
    cid = sid_o[cand]
    cx, cy = px[o][cand], py[o][cand]
    cnt = np.bincount(cid, minlength=n)
    cst = np.concatenate(([0], np.cumsum(cnt)[:-1]))
    out = np.zeros(n)
    lo_b = 0
    b = 2
    while lo_b < _FERET_BRUTE_MAX:
        sel = np.flatnonzero((cnt > lo_b) & (cnt <= b))
        if sel.size:
            pad = cst[sel, None] + np.minimum(np.arange(b)[None, :], cnt[sel, None] - 1)
            X, Y = cx[pad], cy[pad]
            step = max(1, 4_000_000 // (b * b))
            for s in range(0, sel.size, step):
                x, y = X[s : s + step], Y[s : s + step]
                d2 = (x[:, :, None] - x[:, None, :]) ** 2 + (y[:, :, None] - y[:, None, :]) ** 2
                out[sel[s : s + step]] = np.sqrt(d2.reshape(d2.shape[0], -1).max(axis=1))
        lo_b, b = b, b * 2
    big = np.flatnonzero(cnt > _FERET_BRUTE_MAX)
    if big.size:
        from scipy.spatial import ConvexHull, QhullError

        for c in big.tolist():
            P = np.stack([cx[cst[c] : cst[c] + cnt[c]], cy[cst[c] : cst[c] + cnt[c]]], axis=1)
            try:
                P = P[ConvexHull(P).vertices]
            except (QhullError, ValueError):
                pass  # collinear / degenerate: brute force over all candidates
            out[c] = _brute_diameter(P)
    return out


def _brute_diameter(P: np.ndarray) -> float:
    best = 0.0
    for s in range(0, len(P), 1024):
        d2 = ((P[s : s + 1024, None, :] - P[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return math.sqrt(best)


def _midline(intensity: Image | None, midline_x_ras: float | None, modality: str | None) -> dict:
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


def _total_row(voxels: int, voxel_mm3: float, total_int, total_prob) -> dict:
    row = {c: None for c in COLUMNS}
    vol = voxels * voxel_mm3
    row.update(lesion="total", voxels=voxels, volume_mm3=vol, volume_ml=vol / 1000.0)
    row["mean_intensity"], row["std_intensity"], row["max_intensity"] = total_int
    row["mean_probability"], row["max_probability"] = total_prob
    return row


def _empty_table(intensity, prob, midline, connectivity, min_lesion_ml) -> LesionTable:
    return LesionTable([], _total_row(0, 0.0, (None,) * 3, (None,) * 2), midline, int(connectivity), float(min_lesion_ml))


if __name__ == "__main__":  # regenerate the table of docs/lesion-table.md
    print(columns_markdown(), end="")
