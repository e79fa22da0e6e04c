"""The lesion table's columns, their documentation, and the :class:`LesionTable` result with its CSV/TSV
and ``summary.json`` forms (the measurements themselves: :mod:`.lesions`).
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..io.writers import write_text
from .lesion_measures import MIDLINE_TOLERANCE_MM

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
#: ABC/2, the bedside volume estimate (Kothari et al. 1996; :mod:`.abc2`), right after the 32.
ABC2_COLUMNS: tuple[str, ...] = ("abc2_ml", "abc2_a_mm", "abc2_b_mm", "abc2_c_mm")
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
#: models whose labels are compartments of one finding and context around it (ct-hemorrhage 2.x):
#: the lesion's majority compartment and the context (oedema) volume around it; empty for one-label models
COMPARTMENT_COLUMNS: tuple[str, ...] = ("compartment", "perilesional_oedema_ml")
#: oedema voxels at most this far (mm) from a lesion count for it (each for its nearest lesion only)
PERILESIONAL_MM = 10.0
COLUMNS: tuple[str, ...] = CONTRACT_COLUMNS + ABC2_COLUMNS + COMPARTMENT_COLUMNS + DICOM_COLUMNS

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
    "mean_probability": ("probability 0–1", "mean model probability of lesion over the lesion's voxels (P(any lesion "
                                            "label): for a one-label model its label's probability)"),
    "max_probability": ("probability 0–1", "maximum model probability of lesion over the lesion's voxels"),
    "side": ("", "'right', 'left' or 'midline' (the patient's side: centroid R vs the mid-sagittal plane, 'midline' "
                 "within 5 mm; summary.json: side_method); empty when it cannot be determined"),
    "touches_border": ("true/false", "the lesion reaches the edge of the volume (it may extend beyond the scan)"),
    "abc2_ml": ("mL", "ABC/2 bedside volume estimate (Kothari et al., Stroke 1996): abc2_a_mm × abc2_b_mm × abc2_c_mm "
                      "/ 2 / 1000; total row: the sum over lesions. Compare with volume_ml (the voxel count)"),
    "abc2_a_mm": ("mm", "A: the lesion's largest diameter on its largest-area slice, edge to edge (Feret diameter of "
                        "its pixels' corners; max_inplane_diameter_mm measures between pixel centres)"),
    "abc2_b_mm": ("mm", "B: the longest chord perpendicular to A on that slice that stays inside the lesion, edge to edge"),
    "abc2_c_mm": ("mm", "C: the lesion's slices weighted 1 (area ≥ 75 % of the largest), 0.5 (25–75 %) or 0 (< 25 %), "
                        "summed, × the slice thickness (distance between slice planes)"),
    "compartment": ("", "models with compartments only (e.g. ct-hemorrhage 2.x): the label most of the lesion's voxels "
                        "carry (a lesion is a connected component of all lesion labels together, so a bleed spanning "
                        "two compartments is one row); empty for one-label models"),
    "perilesional_oedema_ml": ("mL", "models with a perilesional label only (e.g. ct-hemorrhage 2.x): volume of "
                                     "that label (oedema) within 10 mm of the lesion, each voxel counted for its "
                                     "nearest lesion; total row: all oedema within 10 mm of any lesion"),
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
    #: (set by the caller that removed them, see :func:`.lesions.split_small_lesions`)
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
        """The table as CSV (``delimiter=","``) or TSV text: the header, the lesion rows, the total row."""
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
        w.writerow(COLUMNS)
        for rec in self.to_records():
            w.writerow([format_cell(rec[c]) for c in COLUMNS])
        return buf.getvalue()

    def write_csv(self, path: str | os.PathLike) -> str:
        return write_text(path, self.to_text(","))

    def write_tsv(self, path: str | os.PathLike) -> str:
        return write_text(path, self.to_text("\t"))

    # --- JSON --------------------------------------------------------------------------------
    def summary_dict(self) -> dict:
        """``summary.json``'s lesion part: the rows (with LPS points), the column docs, midline and size filter."""
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


def compartment_breakdown(rows: Sequence[Mapping[str, Any]], total: Mapping[str, Any]) -> str:
    """Per compartment, the volume and lesion count, and the perilesional oedema, as one line (models with
    compartments, e.g. ct-hemorrhage 2.x; '' for one-label models)."""
    parts: dict[str, list] = {}
    for r in rows:
        if r.get("compartment"):
            v = parts.setdefault(str(r["compartment"]), [0.0, 0])
            v[0] += float(r.get("volume_ml") or 0.0)
            v[1] += 1
    text = "   ·   ".join(f"{name} {ml:.2f} mL ({n})" for name, (ml, n) in parts.items())
    if total.get("perilesional_oedema_ml") is not None and rows:
        text += ("   ·   " if text else "") + f"perilesional oedema {float(total['perilesional_oedema_ml']):.2f} mL"
    return text


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


def format_cell(v) -> str:
    """A table value as its CSV/TSV cell: '' for None and non-finite floats, ``true``/``false``,
    integers as such, floats with at most 6 decimals (trailing zeros and '-0' dropped)."""
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


def total_row(voxels: int, voxel_mm3: float, total_int, total_prob, abc2_ml: float = 0.0,
              oedema_ml: float | None = None) -> dict:
    """The ``total`` row: summed voxels, volume and ABC/2 (``abc2_ml``), intensity/probability statistics
    pooled over all lesions, the perilesional oedema (``oedema_ml``; None for models without it)."""
    row = {c: None for c in COLUMNS}
    vol = voxels * voxel_mm3
    row.update(lesion="total", voxels=voxels, volume_mm3=vol, volume_ml=vol / 1000.0, abc2_ml=abc2_ml,
               perilesional_oedema_ml=oedema_ml)
    row["mean_intensity"], row["std_intensity"], row["max_intensity"] = total_int
    row["mean_probability"], row["max_probability"] = total_prob
    return row
