"""One-page PNG report of a segmentation: header, per-lesion panels, lesion table.

Entry point: :func:`render_report` → writes the PNG atomically and returns a :class:`ReportLayout`
describing what was drawn (so tests and callers can check content, not pixels).

Display conventions (radiological, as in Slicer's default views and PACS viewers):

* **Axial**: anterior at the top, the patient's **left on the image right**.
* **Coronal**: superior at the top, patient's left on the image right.
* **Sagittal**: superior at the top, anterior on the image left.

They are obtained from the geometry, not assumed: every volume is viewed through
:func:`..engine.grid.canonical_grid` (axis permutation and flips only, no interpolation), whose
i axis points to the patient's left, j posterior and k superior. Row index = increasing j
(anterior → posterior, top → bottom), column index = increasing i (right → left, image left →
image right). Coronal/sagittal reformats are flipped so superior is up. Pixels keep their
physical aspect ratio (``imshow`` extents in millimetres). Oblique acquisitions keep their residual
rotation (nearest axes), exactly like the network input.

The slice of each lesion panel is the lesion's largest-area slice: its index in the table refers to
the *original* grid axis, so the panel is located through the lesion's inside point (RAS → canonical
ijk), which lies on that slice by construction.

Matplotlib is used through :class:`matplotlib.figure.Figure` + the Agg canvas only; no pyplot, no
global state is changed.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Collection, Mapping

import numpy as np

from ..engine.grid import canonical_grid
from ..errors import InputError, UsageError
from ..image import Image
from ..image import slice_axis as _slice_axis
from .heatmap_scale import per_lesion
from .lesion_measures import label_mask
from .lesion_table import compartment_breakdown
from .lesions import CT_AUTODETECT_MIN, LesionTable, dropped_note, dropped_summary

RESEARCH_NOTE = "Research use only — not for diagnosis"
#: probability / Grad-CAM values below this are fully transparent in the overlays
OVERLAY_MIN = 0.05
PROB_CMAP = "inferno"
CAM_CMAP = "turbo"
DPI = 100
#: side (mm) of the zoomed panels: max(ZOOM_MIN_MM, ZOOM_DIAMETERS × lesion diameter)
ZOOM_MIN_MM = 60.0
ZOOM_DIAMETERS = 3.0

_ALL_LESIONS_COLOR = (0.2, 0.85, 1.0)  # default contour colour of lesion voxels (cyan)
_HIGHLIGHT_COLOR = (1.0, 0.85, 0.0)  # this lesion's component (yellow)
_RED = "#c62828"
_GREEN = "#1b5e20"

# --- layout (inches) ------------------------------------------------------------------------
_MARGIN_L = 0.35
_MARGIN_TOP = 0.2
_HEADER_H = 1.55
_BANNER_H = 0.75
_PANEL = 2.6  # panel box (square)
_CBAR_W = 0.13
_CBAR_SPACE = 1.0  # colour bar + its tick labels and label, up to the next panel
_GAP = 0.22
_FIG_W = 2 * _MARGIN_L + 5 * _PANEL + 2 * _GAP + 2 * _CBAR_SPACE
_ROW_TITLE_H = 0.82
_ROW_GAP = 0.3
_TABLE_ROW_H = 0.25
_TABLE_TITLE_H = 0.45
_FOOT_LINE_H = 0.2
_NEG_TITLE_H = 1.35
#: zoomed panels show voxels as blocks (also keeps the PNG small: noise is incompressible)
_ZOOM_INTERP = "nearest"
_PANEL_FS = 10.5  # panel titles
#: render_report(heatmap_scale=…) → the Grad-CAM colour bar's label
HEATMAP_SCALES = {"lesion": "Grad-CAM (per-lesion max)", "volume": "Grad-CAM (volume max)"}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceView:
    """A 2D reformat in radiological display orientation.

    ``array`` rows run top → bottom and columns left → right *as displayed*; use
    ``imshow(array, extent=extent, origin='upper', aspect='equal')``. Coordinates are millimetres
    along the displayed axes; ``point`` is where the requested RAS point falls.
    """

    array: np.ndarray
    extent: tuple[float, float, float, float]  # (left, right, bottom, top) for origin='upper'
    spacing: tuple[float, float]  # (dx, dy) mm
    point: tuple[float, float]  # display (x, y) mm of the RAS point
    index: int  # slice index along the canonical axis normal to the view
    n_slices: int
    view: str  # 'axial', 'coronal' or 'sagittal'
    orientation: tuple[str, str, str, str]  # patient direction at the (left, right, top, bottom) edges

    @property
    def point_fraction(self) -> tuple[float, float]:
        """``point`` as a fraction of the image width (0 = left edge) and height (0 = top edge)."""
        l, r, b, t = self.extent
        return (float((self.point[0] - l) / (r - l)), float((self.point[1] - t) / (b - t)))


@dataclass(frozen=True)
class ReportLayout:
    """What :func:`render_report` drew."""

    path: str
    width_px: int
    height_px: int
    negative: bool  # the "No lesion found" page
    n_lesions: int  # lesions in the table
    n_lesion_panels: int  # lesion rows of panels
    n_table_rows: int  # lesion rows in the table (the total row not counted)
    more_note: bool  # "… and N more lesions" shown
    n_more: int
    gradcam: bool  # Grad-CAM overlays drawn (False: "Grad-CAM not computed")
    #: per lesion panel row: where the lesion's inside point lies in the axial panel, as
    #: (fraction of width from the left, fraction of height from the top)
    panel_points: tuple[tuple[float, float], ...] = ()
    max_probability: float | None = None
    #: the negative page's sentence on components dropped under the minimum lesion size ('' if none)
    dropped_note: str = ""
    unusual_input: bool = False  # the "unusual input" banner drawn
    #: how the Grad-CAM panels were scaled: 'lesion' (each lesion's neighbourhood to its own peak) or 'volume'
    heatmap_scale: str = "lesion"
    #: the lesion table as drawn: the header row, then one row per lesion and the total row (text cells)
    table_cells: tuple[tuple[str, ...], ...] = ()


# --------------------------------------------------------------------------------------------
# Slices in radiological convention
# --------------------------------------------------------------------------------------------
def radiological_slice(image: Image, ras_point, view: str = "axial") -> SliceView:
    """The axial/coronal/sagittal voxel plane of ``image`` through ``ras_point``, display-oriented."""
    canon, _ = canonical_grid(image)
    return _reformat(canon, canon.ras_to_ijk_points(ras_point)[0], view)


def radiological_axial(image: Image, ras_point) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """``(2D array, extent)`` of the axial plane through ``ras_point``: anterior up, patient left on the right."""
    v = radiological_slice(image, ras_point, "axial")
    return v.array, v.extent


def _reformat(canon: Image, cijk, view: str) -> SliceView:
    arr = canon.array
    K, J, I = arr.shape[-3:]
    sp = canon.spacing
    ci, cj, ck = (float(x) for x in cijk)
    i, j, k = (int(np.clip(math.floor(x + 0.5), 0, n - 1)) for x, n in ((ci, I), (cj, J), (ck, K)))
    if view == "axial":
        a, dx, dy, px, py, idx, n = arr[..., k, :, :], sp[0], sp[1], ci * sp[0], cj * sp[1], k, K
        orient = ("R", "L", "A", "P")
    elif view == "coronal":
        a, dx, dy, px, py, idx, n = arr[..., :, j, :][..., ::-1, :], sp[0], sp[2], ci * sp[0], (K - 1 - ck) * sp[2], j, J
        orient = ("R", "L", "S", "I")
    elif view == "sagittal":
        a, dx, dy, px, py, idx, n = arr[..., :, :, i][..., ::-1, :], sp[1], sp[2], cj * sp[1], (K - 1 - ck) * sp[2], i, I
        orient = ("A", "P", "S", "I")
    else:
        raise UsageError(f"unknown view {view!r}", "use 'axial', 'coronal' or 'sagittal'")
    rows, cols = a.shape[-2:]
    extent = (-dx / 2, (cols - 0.5) * dx, (rows - 0.5) * dy, -dy / 2)
    return SliceView(a, extent, (float(dx), float(dy)), (float(px), float(py)), idx, n, view, orient)


def _axial_level_y(view: SliceView, canon_k: int, K: int) -> float:
    """y (mm) of axial slice ``canon_k`` in a coronal/sagittal view."""
    return (K - 1 - canon_k) * view.spacing[1]


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------
def _outline_segments(mask: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Voxel-edge outline of a 2D mask as N×2×2 segments in display mm (pixel (r, c) at (c·dx, r·dy))."""
    if not mask.any():
        return np.zeros((0, 2, 2))
    rr, cc = np.nonzero(mask)
    r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
    m = np.pad(mask[r0:r1, c0:c1], 1)
    segs = []
    v = m[1:-1, 1:] != m[1:-1, :-1]  # edge left of column c (c = 0..w) in row r
    r, c = np.nonzero(v)
    x = (c + c0 - 0.5) * dx
    segs.append(np.stack([np.stack([x, (r + r0 - 0.5) * dy], 1), np.stack([x, (r + r0 + 0.5) * dy], 1)], 1))
    h = m[1:, 1:-1] != m[:-1, 1:-1]  # edge above row r (r = 0..h) in column c
    r, c = np.nonzero(h)
    y = (r + r0 - 0.5) * dy
    segs.append(np.stack([np.stack([(c + c0 - 0.5) * dx, y], 1), np.stack([(c + c0 + 0.5) * dx, y], 1)], 1))
    return np.concatenate(segs)


def _draw_outline(ax, mask, view: SliceView, color, lw: float, zorder: float = 3) -> None:
    from matplotlib.collections import LineCollection

    segs = _outline_segments(np.asarray(mask, bool), *view.spacing)
    if len(segs):
        ax.add_collection(LineCollection(segs, colors=[color], linewidths=lw, capstyle="projecting", zorder=zorder))


def _overlay_rgba(values: np.ndarray, cmap, alpha_lo: float = 0.3, alpha_hi: float = 0.85) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    bad = ~np.isfinite(v)
    v = np.clip(np.where(bad, 0, v), 0, 1)
    rgba = cmap(v)
    alpha = alpha_lo + (alpha_hi - alpha_lo) * v
    alpha[(v < OVERLAY_MIN) | bad] = 0
    rgba[..., 3] = alpha
    return rgba


def _show_grey(ax, view: SliceView, window, interpolation: str = "antialiased") -> None:
    ax.imshow(view.array, cmap="gray", vmin=window[0], vmax=window[1], extent=view.extent, origin="upper",
              aspect="equal", interpolation=interpolation)


def _style_axes(ax, view: SliceView, letters: bool = True, fontsize: float = 9) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    for s in ax.spines.values():
        s.set_color("#888888")
    if not letters:
        return
    l, r, t, b = view.orientation
    kw = dict(transform=ax.transAxes, color="white", fontsize=fontsize, fontweight="bold", zorder=6,
              bbox=dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.55))
    ax.text(0.015, 0.5, l, ha="left", va="center", **kw)
    ax.text(0.985, 0.5, r, ha="right", va="center", **kw)
    ax.text(0.5, 0.985, t, ha="center", va="top", **kw)
    ax.text(0.5, 0.015, b, ha="center", va="bottom", **kw)


def _zoom_box(view: SliceView, size_mm: float) -> tuple[float, float, float, float]:
    """(x0, x1, y_bottom, y_top) square of ``size_mm`` centred on the point, kept inside the image."""
    l, r, b, t = view.extent
    out = []
    for c, lo, hi in ((view.point[0], l, r), (view.point[1], t, b)):
        half = min(size_mm, hi - lo) / 2
        c = min(max(c, lo + half), hi - half)
        out.append((c - half, c + half))
    (x0, x1), (y0, y1) = out
    return x0, x1, y1, y0


def _set_view(ax, box) -> None:
    x0, x1, yb, yt = box
    ax.set_xlim(x0, x1)
    ax.set_ylim(yb, yt)


def _colorbar(fig, ax_box, cmap, label: str, fontsize: float):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cax = fig.add_axes(ax_box)
    cb = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), cax=cax)
    cb.set_ticks([0, 0.25, 0.5, 0.75, 1.0])
    cb.ax.tick_params(labelsize=fontsize - 1)
    cb.set_label(label, fontsize=fontsize)
    return cb


def _note(ax, text: str, fontsize: float = 11) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("#f2f2f2")
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=fontsize, color="#555555",
            wrap=True)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------
def _f(v, fmt: str = ".1f", empty: str = "–") -> str:
    """Number for display (typographic minus, no "−0.0"); ``empty`` for None/NaN."""
    if v is None:
        return empty
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(x):
        return empty
    s = format(x, fmt)
    if s.startswith("-"):
        s = s[1:] if float(s) == 0 else "−" + s[1:]
    return s


def _ellipsize(s: str, n: int) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n // 2 - 1] + "…" + s[-(n - n // 2):]


def _unit(image: Image, modality: str | None) -> str:
    if modality:
        return "HU" if modality.upper() == "CT" else "intensity"
    a = np.asarray(image.array)
    return "HU" if a.size and float(a.min()) < CT_AUTODETECT_MIN else "intensity"


def _wnum(v: float) -> str:
    """A window bound: whole HU (−1000, 80) or three digits for small map values (0.249, 9.82)."""
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


def _intensity_fmt(unit: str) -> str:
    """HU to the unit; other maps (e.g. Tmax in s, CBF) to 3 significant digits."""
    return ".0f" if unit in ("HU", "intensity") else ".3g"


def _mean_text(value, unit: str) -> str:
    """'mean 62 HU' or, for a named channel ('Tmax s'), 'mean Tmax 9.8 s'."""
    name, _, u = unit.partition(" ") if " " in unit else ("", "", unit)
    return " ".join(x for x in ("mean", name, _f(value, _intensity_fmt(unit)), u) if x)


def _rgb(c) -> tuple[float, float, float]:
    c = tuple(float(x) for x in tuple(c)[:3])
    if max(c) > 1.0:
        c = tuple(x / 255.0 for x in c)
    return c


def _param_lines(parameters: Mapping[str, Any] | None, window) -> list[str]:
    items = []
    for k, v in (dict(parameters) if parameters else {}).items():
        if v is None:
            continue
        if isinstance(v, float):
            v = f"{v:g}"
        elif isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v) if v else "none"
        items.append(f"{k} = {v}")
    items.append(f"display window = {_wnum(window[0])}…{_wnum(window[1])}")
    lines, cur = [], ""
    for it in items:
        if cur and len(cur) + len(it) + 5 > 190:
            lines.append(cur)
            cur = ""
        cur = f"{cur}   ·   {it}" if cur else it
    if cur:
        lines.append(cur)
    return lines


# --------------------------------------------------------------------------------------------
# Main entry point
# --------------------------------------------------------------------------------------------
def render_report(
    path,
    *,
    image: Image,
    labels: Image,
    probability: Image | None,
    gradcam: Image | None,
    table: LesionTable,
    model_name: str,
    model_version: str,
    input_name: str,
    created: str,
    window: tuple[float, float] = (0, 80),
    label_colors: Mapping[int, tuple] | None = None,
    max_lesions: int = 8,
    max_rows: int = 20,
    parameters: Mapping[str, Any] | None = None,
    modality: str | None = None,
    intensity_label: str | None = None,
    unusual_input: str | None = None,
    heatmap_scale: str = "lesion",
    lesion_values: Collection[int] | None = None,
) -> ReportLayout:
    """Write the report PNG to ``path`` (atomically) and return what was drawn.

    ``image`` — the input intensities (first channel); ``labels`` — the label map the ``table``
    was computed from; ``probability`` — foreground probability 0–1; ``gradcam`` — 0–1 heat map or
    None. All on the same grid. ``label_colors`` maps label values to RGB (0–1 or 0–255).
    ``parameters`` (optional) — run parameters printed in the footer; ``modality`` — 'CT' gives
    intensities in HU (None: auto, like :func:`.lesions.analyze_lesions`); ``intensity_label`` names
    the shown channel and its unit instead (e.g. "Tmax s" for a perfusion model). ``unusual_input``:
    what the input-domain check saw when the user ran the model anyway — drawn as a banner under the
    header saying the results are not findings. ``heatmap_scale``: 'lesion' (default) rescales the
    Grad-CAM around each lesion to that lesion's own peak (:func:`.heatmap_scale.per_lesion`), so a
    small lesion next to a large one stays visible; 'volume' shows the map as stored (volume peak = 1).
    ``lesion_values``: the labels that are lesions, whose components together are the table's lesions
    (None: each label separately, as :func:`.lesions.analyze_lesions`); contours are drawn in each
    label's own colour, so compartments and oedema are told apart.
    """
    _check_inputs(image, labels, probability, gradcam, window, max_lesions, max_rows)
    if not isinstance(heatmap_scale, str) or heatmap_scale not in HEATMAP_SCALES:
        raise UsageError(f"unknown heatmap_scale {heatmap_scale!r}", "use 'lesion' or 'volume'")
    window = (float(window[0]), float(window[1]))
    unit = intensity_label or _unit(image, modality)
    rows = list(table.rows)
    if gradcam is not None and heatmap_scale == "lesion" and rows:
        gradcam = per_lesion(gradcam, labels, connectivity=table.connectivity, lesion_values=lesion_values)
    canon = _Canonical.of(image, labels, probability, gradcam)
    pmax, pmax_ras = _max_probability(probability)
    counts = _Counts.of(len(rows), max_lesions, max_rows)
    params = _param_lines(parameters, window)

    page = _Page.new(_figure_height(counts, len(params)) + (_BANNER_H if unusual_input else 0.0))
    y = _draw_header(page, counts, table.total_volume_ml, model_name=model_name, model_version=model_version,
                     input_name=input_name, created=created, breakdown=compartment_breakdown(rows, table.total))
    if unusual_input:
        y = _draw_unusual_banner(page, y, unusual_input)
    panel_points: list[tuple[float, float]] = []
    dropped, table_cells = "", ()
    if counts.negative:
        dropped = dropped_note(dropped_summary(table.dropped_ml), table.min_lesion_ml)
        y = _draw_negative(page, y, image, canon, window, pmax, pmax_ras, dropped)
    else:
        colors = {int(k): _rgb(v) for k, v in (label_colors or {}).items()}
        y, panel_points = _draw_lesion_panels(page, y, rows, counts, labels=labels, canon=canon, window=window,
                                              colors=colors, unit=unit, connectivity=table.connectivity,
                                              cam_label=HEATMAP_SCALES[heatmap_scale], lesion_values=lesion_values)
        y, table_cells = _draw_table(page, y, rows[: counts.n_table], table.total, unit, counts.n_more)
    _draw_footer(page, y, params)

    wpx, hpx = _save_png(page.fig, path)
    return ReportLayout(
        path=os.fspath(path), width_px=wpx, height_px=hpx, negative=counts.negative, n_lesions=counts.n_rows,
        n_lesion_panels=counts.n_panels, n_table_rows=0 if counts.negative else counts.n_table,
        more_note=bool(counts.n_more) and not counts.negative, n_more=max(0, counts.n_more),
        gradcam=gradcam is not None and not counts.negative, panel_points=tuple(panel_points),
        max_probability=pmax, dropped_note=dropped, unusual_input=bool(unusual_input), heatmap_scale=heatmap_scale,
        table_cells=table_cells,
    )


@dataclass(frozen=True)
class _Canonical:
    """The input volumes viewed through :func:`canonical_grid` (display axes; no resampling)."""

    image: Image
    labels: Image
    probability: Image | None
    gradcam: Image | None

    @classmethod
    def of(cls, image: Image, labels: Image, probability: Image | None, gradcam: Image | None) -> "_Canonical":
        return cls(
            canonical_grid(image)[0],
            canonical_grid(labels)[0],
            canonical_grid(probability)[0] if probability is not None else None,
            canonical_grid(gradcam)[0] if gradcam is not None else None,
        )


@dataclass(frozen=True)
class _Counts:
    """How many lesions get panels and table rows (the rest: a "… and N more" note)."""

    n_rows: int  # lesions in the table
    n_panels: int
    n_table: int
    n_more: int

    @property
    def negative(self) -> bool:
        return self.n_rows == 0

    @classmethod
    def of(cls, n_rows: int, max_lesions: int, max_rows: int) -> "_Counts":
        n_panels = 0 if n_rows == 0 else min(max_lesions, n_rows)
        n_table = min(max_rows, n_rows)
        return cls(n_rows, n_panels, n_table, n_rows - n_table)


@dataclass(frozen=True)
class _Page:
    """The figure, laid out in inches measured from its top-left corner (matplotlib counts from the
    bottom-left in figure fractions: :meth:`box` and :meth:`text` convert)."""

    fig: Any
    width: float
    height: float

    @classmethod
    def new(cls, height: float) -> "_Page":
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(_FIG_W, height), dpi=DPI, facecolor="white")
        FigureCanvasAgg(fig)
        return cls(fig, _FIG_W, height)

    def box(self, x: float, y_top: float, w: float, h: float) -> list[float]:
        """Figure-fraction rect of the ``w``×``h`` box whose top-left corner is at (x, y_top)."""
        W, H = self.width, self.height
        return [x / W, (H - y_top - h) / H, w / W, h / H]

    def text(self, x: float, y_top: float, s: str, **kw):
        kw.setdefault("va", "top")
        return self.fig.text(x / self.width, (self.height - y_top) / self.height, s, **kw)

    def add_axes(self, x: float, y_top: float, w: float = _PANEL, h: float = _PANEL):
        return self.fig.add_axes(self.box(x, y_top, w, h))


def _draw_unusual_banner(page: _Page, y: float, seen: str) -> float:
    """A red banner: the model ran outside what it reads, at the user's request; returns y below."""
    page.text(_MARGIN_L, y, "  UNUSUAL INPUT — run anyway at the user's request (--allow-unusual-input). "
              "These results are not findings.  ", fontsize=13, fontweight="bold", color="white",
              bbox=dict(boxstyle="square,pad=0.35", fc=_RED, ec=_RED))
    page.text(_MARGIN_L, y + 0.38, _ellipsize(seen[:1].upper() + seen[1:], 170), fontsize=10, color=_RED)
    return y + _BANNER_H


def _figure_height(counts: _Counts, n_param_lines: int) -> float:
    """Page height (inches) from the content: header, lesion rows or negative page, table, footer."""
    foot_lines = n_param_lines + 2
    if counts.negative:
        body_h = _NEG_TITLE_H + _PANEL + 0.35
    else:
        body_h = counts.n_panels * (_ROW_TITLE_H + _PANEL + _ROW_GAP)
        if counts.n_rows > counts.n_panels:
            body_h += 0.3
        body_h += _TABLE_TITLE_H + (counts.n_table + 2) * _TABLE_ROW_H + (0.3 if counts.n_more else 0) + 0.25
    return _MARGIN_TOP + _HEADER_H + body_h + foot_lines * _FOOT_LINE_H + 0.25


def _draw_header(page: _Page, counts: _Counts, total_volume_ml, *, model_name: str, model_version: str,
                 input_name: str, created: str, breakdown: str = "") -> float:
    """Title, research-use badge, model/input/date, the lesion count and the orientation note; returns y below."""
    W, H = page.width, page.height
    y = _MARGIN_TOP
    page.text(_MARGIN_L, y, "UNetSegment report", fontsize=22, fontweight="bold")
    page.text(W - _MARGIN_L, y + 0.02, f"  {RESEARCH_NOTE}  ", ha="right", fontsize=15, fontweight="bold",
              color="white", bbox=dict(boxstyle="round,pad=0.4", fc=_RED, ec=_RED))
    page.text(_MARGIN_L, y + 0.5,
              f"Model: {_ellipsize(model_name, 50)}  v{model_version}      Input: {_ellipsize(input_name, 70)}      "
              f"Date: {created}", fontsize=12)
    if counts.negative:
        summary = "0 lesions   ·   total volume 0.00 mL"
    else:
        n = counts.n_rows
        summary = f"{n} lesion{'s' if n != 1 else ''}   ·   total volume {_f(total_volume_ml, '.2f')} mL"
    page.text(_MARGIN_L, y + 0.82, summary, fontsize=15, fontweight="bold",
              color=_RED if not counts.negative else _GREEN)
    if breakdown and not counts.negative:  # beside the count; smaller (down to 8 pt) where it would not fit
        x = _MARGIN_L + 0.13 * len(summary) + 0.3
        t = page.text(x, y + 0.845, breakdown, fontsize=12, color="#333333")
        width = t.get_window_extent(renderer=page.fig.canvas.get_renderer()).width / page.fig.dpi
        if width > W - _MARGIN_L - x:
            t.set_fontsize(max(8.0, 12.0 * (W - _MARGIN_L - x) / width))
    page.text(_MARGIN_L, y + 1.17,
              "Images in radiological convention: patient's LEFT on the image RIGHT, anterior at the top (axial), "
              "superior at the top (coronal). Coordinates: RAS, mm.", fontsize=10, color="#444444")
    y += _HEADER_H
    page.fig.add_artist(_hline(page.fig, (H - y + 0.08) / H, W, H))
    return y


def _draw_lesion_panels(page: _Page, y: float, rows: list, counts: _Counts, *, labels: Image, canon: _Canonical,
                        window, colors, unit: str, connectivity: int, cam_label: str,
                        lesion_values: Collection[int] | None = None) -> tuple[float, list[tuple[float, float]]]:
    """One row of panels per shown lesion, then a note when some lesions have none.

    Returns y below them and, per row, where the lesion's inside point lies in its axial panel."""
    from matplotlib import colormaps

    comp_cache: dict = {}
    points = []
    for row in rows[: counts.n_panels]:
        y, frac = _draw_lesion_row(page, y, row, labels=labels, canon=canon, window=window, colors=colors,
                                   colormaps=colormaps, unit=unit, connectivity=connectivity, cache=comp_cache,
                                   cam_label=cam_label, lesion_values=lesion_values)
        points.append(frac)
    if counts.n_rows > counts.n_panels:
        note = (f"Panels shown for the {counts.n_panels} largest of {counts.n_rows} lesions" if counts.n_panels else
                "Lesion panels not drawn (max_lesions = 0)")
        page.text(_MARGIN_L, y, f"{note}; all lesions are listed in lesions.csv.", fontsize=11, style="italic",
                  color="#444444")
        y += 0.3
    return y, points


def _draw_footer(page: _Page, y: float, params: list[str]) -> None:
    """Rule, the run parameters and the research-use sentence."""
    W, H = page.width, page.height
    page.fig.add_artist(_hline(page.fig, (H - y - 0.05) / H, W, H))
    y += 0.15
    page.text(_MARGIN_L, y, "Parameters:", fontsize=10, fontweight="bold", color="#333333")
    y += _FOOT_LINE_H
    for line in params:
        page.text(_MARGIN_L, y, line, fontsize=9.5, color="#333333", family="DejaVu Sans Mono")
        y += _FOOT_LINE_H
    page.text(_MARGIN_L, y + 0.02, f"{RESEARCH_NOTE}. Automated output of an experimental model; verify every finding "
              "on the original images.", fontsize=10, fontweight="bold", color=_RED)


def _hline(fig, y_frac: float, W: float, H: float):
    from matplotlib.lines import Line2D

    return Line2D([_MARGIN_L / W, 1 - _MARGIN_L / W], [y_frac, y_frac], transform=fig.transFigure, color="#999999",
                  linewidth=1)


def _check_inputs(image, labels, probability, gradcam, window, max_lesions, max_rows) -> None:
    for name, img in (("image", image), ("labels", labels)):
        if not isinstance(img, Image):
            raise UsageError(f"{name} must be an Image", "wrap the array: Image(array, ijk_to_ras)")
    for name, img in (("image", image), ("labels", labels), ("probability", probability), ("gradcam", gradcam)):
        if img is None:
            continue
        if not isinstance(img, Image):
            raise UsageError(f"{name} must be an Image or None", "wrap the array: Image(array, ijk_to_ras)")
        if np.asarray(img.array).ndim != 3:
            raise InputError(f"{name} must be a 3D volume, got shape {np.shape(img.array)}", "pass a K,J,I volume")
        if img is not labels and not labels.same_grid(img):
            raise InputError(f"{name} is not on the label map's grid", "resample it onto the label map's grid first")
    lo, hi = window
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi)) and float(hi) > float(lo)):
        raise UsageError(f"display window must be (low, high) with high > low, got {window!r}", "e.g. window=(0, 80)")
    if int(max_lesions) < 0 or int(max_rows) < 0:
        raise UsageError("max_lesions and max_rows must be ≥ 0", "pass 0 to leave the panels/table out")


def _orig_slice(image: Image, ras) -> str:
    """'k=12': the slice index of a RAS point along the original grid's slice axis (as in the table)."""
    ax = _slice_axis(image.ijk_to_ras)
    idx = int(math.floor(float(image.ras_to_ijk_points(ras)[0][ax]) + 0.5))
    return f"{'ijk'[ax]}={idx}"


def percentile_window(image: Image, percentiles=(1.0, 99.0)) -> tuple[float, float]:
    """Display window from the image's own percentiles of its non-zero finite voxels (maps are 0 outside
    the brain); a flat image gets a unit-wide window so that it still renders."""
    a = np.asarray(image.array)
    v = a[np.isfinite(a) & (a != 0)] if a.dtype.kind == "f" else a[a != 0]
    if v.size == 0:
        return (0.0, 1.0)
    if v.size > 2_000_000:  # a strided subsample is plenty for two percentiles
        v = v[:: v.size // 1_000_000]
    lo, hi = (float(x) for x in np.percentile(v, [float(percentiles[0]), float(percentiles[1])]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _max_probability(probability: Image | None) -> tuple[float | None, np.ndarray | None]:
    if probability is None:
        return None, None
    a = np.asarray(probability.array)
    if a.size == 0 or not np.isfinite(a).any():
        return None, None
    top = a.max()
    # one pass when the map is finite (ours always is); NaN/Inf maps take the careful path
    flat = int(np.argmax(a)) if np.isfinite(top) else int(np.nanargmax(np.where(np.isfinite(a), a, -np.inf)))
    k, j, i = np.unravel_index(flat, a.shape)
    return float(a.reshape(-1)[flat]), probability.ijk_to_ras_points([i, j, k])[0]


def _lesion_component(row, labels: Image, canon_lab: Image, cijk, connectivity: int, cache: dict,
                      lesion_values: Collection[int] | None = None):
    """(label value, canonical k0, 3D bool mask of this lesion's component in canonical slab k0..).

    The component is of the voxel's own label, or of all ``lesion_values`` together when given (the
    table's lesions; see :func:`.lesion_measures.components`)."""
    from scipy import ndimage

    p = np.array([row["inside_r"], row["inside_a"], row["inside_s"]], dtype=np.float64)
    oijk = np.floor(labels.ras_to_ijk_points(p)[0] + 0.5).astype(int)
    I, J, K = labels.shape_ijk
    oijk = np.clip(oijk, 0, [I - 1, J - 1, K - 1])
    value = int(np.asarray(labels.array)[oijk[2], oijk[1], oijk[0]])
    if value == 0:
        return 0, 0, None
    # the component lies within its slice range on the original slice axis: map that slab to canonical k
    ax = "ijk".index(row.get("slice_axis") or "k")
    lo_hi = [(0, I - 1), (0, J - 1), (0, K - 1)]
    if row.get("slice_first") is not None and row.get("slice_last") is not None:
        lo_hi[ax] = (int(row["slice_first"]), int(row["slice_last"]))
    corners = np.array([[a, b, c] for a in lo_hi[0] for b in lo_hi[1] for c in lo_hi[2]], dtype=np.float64)
    ck = canon_lab.ras_to_ijk_points(labels.ijk_to_ras_points(corners))[:, 2]
    Kc = canon_lab.array.shape[0]
    k0 = int(np.clip(math.floor(ck.min() + 0.5), 0, Kc - 1))
    k1 = int(np.clip(math.floor(ck.max() + 0.5), 0, Kc - 1))
    together = lesion_values is not None and value in lesion_values
    key = ("lesions" if together else value, k0, k1)
    if key not in cache:
        st = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}.get(int(connectivity), 3))
        slab = np.asarray(canon_lab.array[k0 : k1 + 1])
        mask = label_mask(slab, lesion_values) if together else slab == value
        cache[key] = ndimage.label(mask, structure=st)[0]
    comp = cache[key]
    ci, cj, ckk = (int(np.clip(math.floor(x + 0.5), 0, n - 1)) for x, n in zip(cijk, canon_lab.shape_ijk))
    if not k0 <= ckk <= k1:
        return value, k0, None
    cid = comp[ckk - k0, cj, ci]
    return value, k0, (comp == cid) if cid else None


@dataclass(frozen=True)
class _LesionSlice:
    """One lesion's shown axial slice and what its panels share."""

    cijk: np.ndarray  # the lesion's inside point, canonical ijk
    view: SliceView  # the image's axial slice through it
    labels_axial: np.ndarray  # the label map on that slice
    this_axial: np.ndarray | None  # this lesion's component on that slice (None: not found there)
    component: np.ndarray | None  # this lesion's 3D component in the canonical slab k0.. (None: not found)
    k0: int
    color: tuple  # contour colour of the lesion's label
    label_colors: Mapping[int, tuple]  # contour colour of every label (compartments, oedema)
    zoom_mm: float
    zoom_box: tuple[float, float, float, float]


def _inside_point(row) -> np.ndarray:
    return np.array([row["inside_r"], row["inside_a"], row["inside_s"]], dtype=np.float64)


def _lesion_slice(row, labels: Image, canon: _Canonical, colors, connectivity: int, cache: dict,
                  lesion_values: Collection[int] | None = None) -> _LesionSlice:
    cijk = canon.labels.ras_to_ijk_points(_inside_point(row))[0]
    value, k0, comp = _lesion_component(row, labels, canon.labels, cijk, connectivity, cache, lesion_values)
    view = _reformat(canon.image, cijk, "axial")
    k = view.index
    this_ax = comp[k - k0] if comp is not None and 0 <= k - k0 < comp.shape[0] else None
    zoom_mm = max(ZOOM_MIN_MM, ZOOM_DIAMETERS * float(row.get("max_inplane_diameter_mm") or 0))
    return _LesionSlice(
        cijk=cijk, view=view, labels_axial=_reformat(canon.labels, cijk, "axial").array, this_axial=this_ax,
        component=comp, k0=k0, color=colors.get(value, _ALL_LESIONS_COLOR), label_colors=colors, zoom_mm=zoom_mm,
        zoom_box=_zoom_box(view, zoom_mm),
    )


def _draw_lesion_row(page: _Page, y: float, row, *, labels: Image, canon: _Canonical, window, colors, colormaps,
                     unit: str, connectivity: int, cache: dict, cam_label: str,
                     lesion_values: Collection[int] | None = None) -> tuple[float, tuple[float, float]]:
    """Title lines and the five panels of one lesion: full axial slice, zoomed contour, zoomed
    probability, zoomed Grad-CAM, coronal locator. Returns y below the row and the inside point's
    position in the axial panel (fractions of width and height)."""
    sl = _lesion_slice(row, labels, canon, colors, connectivity, cache, lesion_values)
    y = _draw_lesion_title(page, y, row, unit)
    x = _MARGIN_L
    _draw_full_slice_panel(page, x, y, sl, window)
    x += _PANEL + _GAP
    _draw_zoom_contour_panel(page, x, y, sl, window)
    x += _PANEL + _GAP
    _draw_probability_panel(page, x, y, sl, canon.probability, window, colormaps[PROB_CMAP])
    x += _PANEL + _CBAR_SPACE
    _draw_gradcam_panel(page, x, y, sl, canon.gradcam, window, colormaps[CAM_CMAP], cam_label)
    x += _PANEL + _CBAR_SPACE
    _draw_coronal_locator(page, x, y, sl, canon, window)
    y += _PANEL + _ROW_GAP
    return y, sl.view.point_fraction


def _draw_lesion_title(page: _Page, y: float, row, unit: str) -> float:
    p = _inside_point(row)
    page.text(_MARGIN_L, y, lesion_heading(row), fontsize=13.5, fontweight="bold")
    abc2 = abc2_text(row)
    page.text(_MARGIN_L, y + 0.3,
              (f"{abc2}   ·   " if abc2 else "") + f"{_mean_text(row.get('mean_intensity'), unit)}   ·   mean probability "
              f"{_f(row.get('mean_probability'), '.2f')}   ·   max probability {_f(row.get('max_probability'), '.2f')}"
              f"   ·   inside point RAS ({_f(p[0])}, {_f(p[1])}, {_f(p[2])}) mm   ·   "
              f"{row.get('n_slices', '–')} slice(s)"
              + (f"   ·   oedema {_f(row['perilesional_oedema_ml'], '.2f')} mL"
                 if row.get("perilesional_oedema_ml") is not None else ""),
              fontsize=10.5, color="#333333")
    return y + _ROW_TITLE_H


def _draw_label_outlines(ax, labels: np.ndarray, view: SliceView, sl: _LesionSlice, lw: float) -> None:
    """The labels on a slice: one label in the lesion's colour; several (compartments, oedema) each in
    its own colour, so they are told apart."""
    present = [int(v) for v in np.unique(labels) if v]
    if len(present) <= 1:
        _draw_outline(ax, labels > 0, view, sl.color, lw)
        return
    for v in present:
        _draw_outline(ax, labels == v, view, sl.label_colors.get(v, sl.color), lw)


def _draw_lesion_outlines(ax, sl: _LesionSlice, lw_all: float, lw_this: float) -> None:
    """Every label's voxels in their colours, this lesion's component highlighted on top."""
    _draw_label_outlines(ax, sl.labels_axial, sl.view, sl, lw_all)
    if sl.this_axial is not None:
        _draw_outline(ax, sl.this_axial, sl.view, _HIGHLIGHT_COLOR, lw_this, zorder=4)


def _draw_full_slice_panel(page: _Page, x: float, y: float, sl: _LesionSlice, window) -> None:
    """The whole axial slice with the contours, an arrow at the lesion and the zoomed area dashed."""
    from matplotlib.patches import Rectangle

    ax = page.add_axes(x, y)
    _show_grey(ax, sl.view, window)
    _draw_lesion_outlines(ax, sl, 0.8, 1.5)
    _arrow(ax, sl.view)
    x0, x1, yb, yt = sl.zoom_box
    ax.add_patch(Rectangle((x0, yt), x1 - x0, yb - yt, fill=False, ec="white", lw=0.9, ls="--", zorder=5))
    _set_view(ax, sl.view.extent)
    _style_axes(ax, sl.view)
    ax.set_title(f"Axial, window {_wnum(window[0])}–{_wnum(window[1])}", fontsize=_PANEL_FS)


def _draw_zoom_contour_panel(page: _Page, x: float, y: float, sl: _LesionSlice, window) -> None:
    ax = page.add_axes(x, y)
    _show_grey(ax, sl.view, window, _ZOOM_INTERP)
    _draw_lesion_outlines(ax, sl, 1.0, 2.0)
    _set_view(ax, sl.zoom_box)
    _style_axes(ax, sl.view)
    ax.set_title(f"Zoom {sl.zoom_mm:.0f} mm: lesion contour", fontsize=_PANEL_FS)


def _draw_probability_panel(page: _Page, x: float, y: float, sl: _LesionSlice, canon_prob: Image | None, window,
                            cmap) -> None:
    ax = page.add_axes(x, y)
    _show_grey(ax, sl.view, window, _ZOOM_INTERP)
    if canon_prob is None:
        _note(ax, "Probability map\nnot available")
        return
    _draw_zoom_overlay(page, ax, x, y, sl, canon_prob, cmap, (0.3, 0.85),
                       f"Probability (clear < {OVERLAY_MIN:g})", "lesion probability")


def _draw_gradcam_panel(page: _Page, x: float, y: float, sl: _LesionSlice, canon_cam: Image | None, window,
                        cmap, cbar_label: str) -> None:
    ax = page.add_axes(x, y)
    if canon_cam is None:
        _note(ax, "Grad-CAM\nnot computed")
        ax.set_title("Grad-CAM", fontsize=_PANEL_FS)
        return
    _show_grey(ax, sl.view, window, _ZOOM_INTERP)
    _draw_zoom_overlay(page, ax, x, y, sl, canon_cam, cmap, (0.25, 0.7),
                       f"Grad-CAM (clear < {OVERLAY_MIN:g})", cbar_label)


def _draw_zoom_overlay(page: _Page, ax, x: float, y: float, sl: _LesionSlice, canon_map: Image, cmap,
                       alphas: tuple[float, float], title: str, cbar_label: str) -> None:
    """A 0–1 map over the zoomed grey slice (more opaque where higher), the lesion outlined in white
    so the map under it stays visible, and the map's colour bar right of the panel."""
    values = _reformat(canon_map, sl.cijk, "axial").array
    ax.imshow(_overlay_rgba(values, cmap, *alphas), extent=sl.view.extent, origin="upper", aspect="equal",
              interpolation=_ZOOM_INTERP, zorder=2)
    if sl.this_axial is not None:
        _draw_outline(ax, sl.this_axial, sl.view, "white", 0.9, zorder=4)
    _set_view(ax, sl.zoom_box)
    _style_axes(ax, sl.view)
    ax.set_title(title, fontsize=_PANEL_FS)
    _colorbar(page.fig, page.box(x + _PANEL + 0.06, y, _CBAR_W, _PANEL), cmap, cbar_label, _PANEL_FS - 1)


def _draw_coronal_locator(page: _Page, x: float, y: float, sl: _LesionSlice, canon: _Canonical, window) -> None:
    """Coronal slice through the lesion with its component highlighted and the axial level dashed."""
    ax = page.add_axes(x, y)
    cor = _reformat(canon.image, sl.cijk, "coronal")
    _show_grey(ax, cor, window)
    lab_cor = _reformat(canon.labels, sl.cijk, "coronal").array
    _draw_label_outlines(ax, lab_cor, cor, sl, 0.8)
    comp = sl.component
    if comp is not None:
        Kc = canon.labels.array.shape[0]
        full = np.zeros((Kc, comp.shape[2]), bool)
        full[sl.k0 : sl.k0 + comp.shape[0]] = comp[:, cor.index, :]
        _draw_outline(ax, full[::-1], cor, _HIGHLIGHT_COLOR, 1.3, zorder=4)
    ly = _axial_level_y(cor, sl.view.index, canon.image.array.shape[0])
    ax.axhline(ly, color=_HIGHLIGHT_COLOR, lw=1.0, ls="--", alpha=0.9, zorder=5)
    _set_view(ax, cor.extent)
    _style_axes(ax, cor)
    ax.set_title("Coronal locator (dashed: this slice)", fontsize=_PANEL_FS)


def lesion_heading(row: Mapping[str, Any]) -> str:
    """A lesion panel's title. It names the shown slice as the *largest-area* slice, apart from the
    *centroid* slice of the table and CLI (and, for DICOM input, the source image numbers)."""
    axis = row.get("slice_axis") or "k"
    big = f"largest-area slice {axis}={row['largest_area_slice']}"
    cen = f"centroid slice {axis}={row.get('slice_index')}"
    if row.get("dicom_largest_instance_number") is not None:
        big += f" (DICOM image {row['dicom_largest_instance_number']})"
    if row.get("dicom_instance_number") is not None:
        cen += f" (DICOM image {row['dicom_instance_number']})"
    return (f"Lesion {row['lesion']} — {row['label']}, {_f(row['volume_ml'], '.2f')} mL, {big}; {cen}; "
            f"spans {row['slice_first']}–{row['slice_last']}, diameter {_f(row.get('max_inplane_diameter_mm'))} mm, "
            f"{row.get('side') or 'side n/a'}")


def abc2_text(row: Mapping[str, Any]) -> str:
    """The lesion's ABC/2 estimate with its three diameters, for the panel's second line ('' without one)."""
    if row.get("abc2_ml") is None:
        return ""
    return (f"ABC/2 {_f(row['abc2_ml'], '.2f')} mL ({_f(row.get('abc2_a_mm'))} × {_f(row.get('abc2_b_mm'))} × "
            f"{_f(row.get('abc2_c_mm'))} mm / 2)")


def _arrow(ax, view: SliceView, color=_HIGHLIGHT_COLOR) -> None:
    l, r, b, t = view.extent
    size = max(r - l, b - t)
    px, py = view.point
    # point from the image centre's side so the arrow stays inside the frame
    dx = -1 if px > (l + r) / 2 else 1
    dy = -1 if py > (t + b) / 2 else 1
    off = 0.17 * size
    ax.annotate("", xy=(px, py), xytext=(px + dx * off, py + dy * off), xycoords="data", zorder=6,
                arrowprops=dict(arrowstyle="-|>", color=color, lw=1.6, shrinkA=0, shrinkB=6,
                                mutation_scale=12))


def _draw_table(page: _Page, y: float, rows, total, unit: str, n_more: int) -> tuple[float, tuple[tuple[str, ...], ...]]:
    """The lesion table under the panels; the new ``y`` and the cells drawn (header first)."""
    page.text(_MARGIN_L, y + 0.05, "Lesion table", fontsize=14, fontweight="bold")
    y += _TABLE_TITLE_H
    oedema = total.get("perilesional_oedema_ml") is not None  # models with a perilesional label (ct-hemorrhage 2.x)
    header = ["#", "label", "volume\nmL", "ABC/2\nmL", *(["oedema\nmL"] if oedema else []), "centroid\nslice",
              "slice range", "largest-area\nslice", "diameter\nmm", "side", f"mean\n{unit}", "mean\nprobability",
              "centroid RAS (mm)"]
    name_len = min(28, max([len(str(r.get("label") or "")) for r in rows] + [12]))
    cells = []
    for r in rows:
        ax_name = r.get("slice_axis") or "k"
        cells.append([
            str(r["lesion"]), _ellipsize(r.get("label", ""), name_len), _f(r.get("volume_ml"), ".2f"),
            _f(r.get("abc2_ml"), ".2f"), *([_f(r.get("perilesional_oedema_ml"), ".2f")] if oedema else []),
            f"{ax_name}={r.get('slice_index')}", f"{r.get('slice_first')}–{r.get('slice_last')}",
            f"{ax_name}={r.get('largest_area_slice')}", _f(r.get("max_inplane_diameter_mm")), r.get("side") or "–",
            _f(r.get("mean_intensity"), _intensity_fmt(unit)), _f(r.get("mean_probability"), ".2f"),
            f"({_f(r.get('centroid_r'))}, {_f(r.get('centroid_a'))}, {_f(r.get('centroid_s'))})",
        ])
    cells.append(["total", "", _f(total.get("volume_ml"), ".2f"), _f(total.get("abc2_ml"), ".2f"),
                  *([_f(total.get("perilesional_oedema_ml"), ".2f")] if oedema else []), "", "", "", "", "",
                  _f(total.get("mean_intensity"), _intensity_fmt(unit)), _f(total.get("mean_probability"), ".2f"), ""])
    widths = np.array([0.6, max(1.4, 0.095 * name_len), 0.9, 0.9, *([0.9] if oedema else []), 1.0, 1.0, 1.1, 0.9,
                       0.8, 0.8, 1.0, 2.0])
    tw = float(widths.sum())
    nrows = len(cells) + 1
    h = (nrows + 0.6) * _TABLE_ROW_H  # header row is two lines
    ax = page.fig.add_axes(page.box(_MARGIN_L, y, tw, h))
    ax.axis("off")
    tab = ax.table(cellText=cells, colLabels=header, colWidths=list(widths / tw), cellLoc="center", loc="upper left",
                   bbox=[0, 0, 1, 1])
    tab.auto_set_font_size(False)
    tab.set_fontsize(10.5)
    unit_h = 1.0 / (nrows + 0.6)
    for (ri, ci), cell in tab.get_celld().items():
        cell.set_edgecolor("#bbbbbb")
        cell.set_linewidth(0.6)
        if ri == 0:
            cell.set_height(1.6 * unit_h)
            cell.set_facecolor("#e0e0e0")
            cell.get_text().set_fontweight("bold")
            cell.get_text().set_fontsize(10)
        else:
            cell.set_height(unit_h)
            if ri == nrows - 1:
                cell.set_facecolor("#f3f3f3")
                cell.get_text().set_fontweight("bold")
            elif ri % 2 == 0:
                cell.set_facecolor("#fafafa")
    y += h + 0.1
    if n_more:
        page.text(_MARGIN_L, y, f"… and {n_more} more lesion{'s' if n_more != 1 else ''} (see lesions.csv)",
                  fontsize=11.5, fontweight="bold", color="#333333")
        y += 0.3
    return y + 0.15, tuple(map(tuple, [header, *cells]))


def _draw_negative_title(page: _Page, y: float, pmax, pmax_ras, dropped: str) -> float:
    page.text(_MARGIN_L, y + 0.1, "No lesion found", fontsize=24, fontweight="bold", color=_GREEN)
    pm = "not available" if pmax is None else f"{pmax:.3f}"
    where = "" if pmax_ras is None else f" at RAS ({_f(pmax_ras[0])}, {_f(pmax_ras[1])}, {_f(pmax_ras[2])}) mm"
    # a high maximum beside "No lesion found" needs its reason: components under the minimum size
    why = f"\n{dropped[0].upper()}{dropped[1:]}." if dropped else ""
    page.text(_MARGIN_L, y + 0.62, f"Maximum lesion probability in the volume: {pm}{where}.   "
              f"A negative result does not exclude disease.{why}", fontsize=12.5, color="#222222")
    return y + _NEG_TITLE_H


def _draw_negative(page: _Page, y: float, image: Image, canon: _Canonical, window, pmax, pmax_ras,
                   dropped: str = "") -> float:
    """The "No lesion found" page: the maximum probability and where it lies, mid-volume and
    maximum slices with the probability map, and a coronal locator of both."""
    from matplotlib import colormaps

    canon_img, canon_prob = canon.image, canon.probability
    y = _draw_negative_title(page, y, pmax, pmax_ras, dropped)
    K, J, I = canon_img.array.shape
    mid = np.array([(I - 1) / 2, (J - 1) / 2, (K - 1) / 2])
    view = _reformat(canon_img, mid, "axial")
    fs = 11

    def prob_panel(ax, v: SliceView, cijk):
        _show_grey(ax, v, window)
        pv = _reformat(canon_prob, cijk, "axial").array
        ax.imshow(_overlay_rgba(pv, colormaps[PROB_CMAP]), extent=v.extent, origin="upper", aspect="equal",
                  interpolation="antialiased", zorder=2)
        _set_view(ax, v.extent)
        _style_axes(ax, v)
        return float(np.nanmax(pv)) if np.isfinite(pv).any() else float("nan")

    x = _MARGIN_L
    ax = page.add_axes(x, y)
    _show_grey(ax, view, window)
    _set_view(ax, view.extent)
    _style_axes(ax, view)
    ax.set_title(f"Mid-volume axial, slice {_orig_slice(image, canon_img.ijk_to_ras_points(mid)[0])}", fontsize=fs)
    x += _PANEL + _GAP
    ax = page.add_axes(x, y)
    max_view = None
    if canon_prob is not None:
        m = prob_panel(ax, view, mid)
        ax.set_title(f"+ probability (max here {_f(m, '.3f')})", fontsize=fs)
        x += _PANEL + _GAP
        if pmax_ras is not None:
            cmax = canon_prob.ras_to_ijk_points(pmax_ras)[0]
            max_view = _reformat(canon_img, cmax, "axial")
            ax = page.add_axes(x, y)
            prob_panel(ax, max_view, cmax)
            _arrow(ax, max_view, color="#00e5ff")
            ax.set_title(f"Maximum: slice {_orig_slice(image, pmax_ras)}, p = {pmax:.3f}", fontsize=fs)
        _colorbar(page.fig, page.box(x + _PANEL + 0.06, y, _CBAR_W, _PANEL), colormaps[PROB_CMAP],
                  "lesion probability", fs - 1)
        x += _PANEL + _CBAR_SPACE
    else:
        _note(ax, "Probability map\nnot available")
        x += _PANEL + _GAP
    cor = _reformat(canon_img, mid, "coronal")
    ax = page.add_axes(x, y)
    _show_grey(ax, cor, window)
    ax.axhline(_axial_level_y(cor, view.index, K), color=_HIGHLIGHT_COLOR, lw=1.0, ls="--", zorder=5)
    title = "Coronal locator (yellow: mid slice"
    if max_view is not None:
        ax.axhline(_axial_level_y(cor, max_view.index, K), color="#00e5ff", lw=1.0, ls="--", zorder=5)
        title += ",\ncyan: slice of the maximum)"
    else:
        title += ")"
    _set_view(ax, cor.extent)
    _style_axes(ax, cor)
    ax.set_title(title, fontsize=fs)
    return y + _PANEL + 0.35


#: what drawing a report imports (the first time in a process, about 0.35 s)
_DRAWING_MODULES = ("matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.collections", "matplotlib.cm",
                    "matplotlib.colors", "matplotlib.lines", "matplotlib.patches", "PIL.Image", "PIL.PngImagePlugin")


def preload_drawing() -> threading.Thread:
    """Import the report's drawing modules in a background thread, started before the network passes:
    those release the GIL, so the imports cost the run nothing instead of a third of a second at its
    end. Importing is idempotent; a module the thread has not finished is simply waited for."""
    import importlib

    def load() -> None:
        for name in _DRAWING_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - drawing imports it again and reports the error itself
                return

    thread = threading.Thread(target=load, name="report-imports", daemon=True)
    thread.start()
    return thread


def _write_png(fig, f) -> None:
    """RGB PNG (no alpha channel: ~8 % smaller) of the Agg-rendered figure."""
    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    info = PngInfo()
    info.add_text("Software", "UNetSegment")
    info.add_text("Disclaimer", RESEARCH_NOTE)
    PILImage.fromarray(np.ascontiguousarray(rgba[..., :3])).save(f, format="PNG", pnginfo=info, compress_level=6)


def _save_png(fig, path) -> tuple[int, int]:
    from ..io.writers import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            _write_png(fig, f)
    w, h = fig.get_size_inches() * DPI
    return int(round(w)), int(round(h))
