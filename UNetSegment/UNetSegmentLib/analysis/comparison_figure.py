"""comparison.png: for each compared lesion, the registered prior and the current axial slice through the
same physical point side by side (radiological orientation), each scan's lesion contours, and the numbers."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..image import Image
from .report import radiological_slice

_PRIOR, _CURRENT = "#3b82f6", "#ef4444"
_ZOOM_MM = 90.0


def draw_comparison(path: Path, prior_registered: Image, prior_map: Image, current: Image, current_map: Image,
                    rows: Sequence[Mapping], total: Mapping, registration: Mapping, max_rows: int = 8,
                    window: tuple[float, float] = (0.0, 80.0)) -> int:
    """Write the figure (atomically); the number of lesion rows drawn."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..io.writers import atomic_output

    shown = [r for r in rows if r.get("centroid_r") is not None][:max_rows]
    n = max(1, len(shown))
    fig = plt.figure(figsize=(9.0, 1.4 + 3.6 * n), dpi=100)
    head = (f"Follow-up: total {_ml(total['prior_ml'])} → {_ml(total['current_ml'])} mL "
            f"({_signed(total['change_ml'])} mL{_pct(total.get('change_pct'))}), "
            f"hematoma expansion: {'YES' if total['expansion'] else 'no'}")
    fig.text(0.03, 1 - 0.35 / fig.get_figheight(), head, fontsize=12, fontweight="bold", va="top")
    reg = (f"{registration['kind']} registration: head overlap {registration['head_dice']:.2f}, intensity correlation "
           f"{registration['correlation']:.2f}")
    legend = "blue: prior lesions (registered) · red: current lesions · yellow +: the row's lesion · research use only"
    for n, line in enumerate((reg, legend)):
        fig.text(0.03, 1 - (0.7 + 0.22 * n) / fig.get_figheight(), line, fontsize=9, va="top", color="#444444")
    if not shown:
        fig.text(0.03, 0.4, "No lesion in either scan.", fontsize=12)
    for i, r in enumerate(shown):
        point = np.array([r["centroid_r"], r["centroid_a"], r["centroid_s"]], np.float64)[None]
        top = 1 - (1.4 + 3.6 * i) / fig.get_figheight()
        h = 3.2 / fig.get_figheight()
        for j, (img, lab, colour, title) in enumerate(((prior_registered, prior_map, _PRIOR, "prior (registered)"),
                                                       (current, current_map, _CURRENT, "current"))):
            ax = fig.add_axes([0.03 + 0.32 * j, top - h, 0.30, h])
            v = radiological_slice(img, point)
            m = radiological_slice(lab, point)
            ax.imshow(v.array, cmap="gray", vmin=window[0], vmax=window[1], extent=v.extent, origin="upper")
            if np.any(m.array > 0):
                ax.contour(m.array > 0, levels=[0.5], colors=[colour], linewidths=1.2, origin="upper", extent=m.extent)
            px, py = v.point
            ax.plot([px], [py], marker="+", markersize=14, color="#facc15", markeredgewidth=1.5)  # the lesion's centroid
            ax.set_xlim(px - _ZOOM_MM / 2, px + _ZOOM_MM / 2)
            ax.set_ylim(py + _ZOOM_MM / 2, py - _ZOOM_MM / 2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title}, axial", fontsize=9)
        text = (f"current lesion {r['current_lesion'] or '–'} · prior lesion {r['prior_lesion'] or '–'}\n"
                f"status: {r['status']} ({r['match']})\n"
                f"prior {_ml(r['prior_ml'])} mL\ncurrent {_ml(r['current_ml'])} mL\n"
                f"change {_signed(r['change_ml'])} mL{_pct(r.get('change_pct'))}\n"
                f"expansion: {'YES' if r['expansion'] else 'no'}\n"
                f"RAS ({r['centroid_r']:.1f}, {r['centroid_a']:.1f}, {r['centroid_s']:.1f}) mm")
        fig.text(0.68, top - 0.1 * h, text, fontsize=10, va="top", linespacing=1.5)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return len(shown)


def _ml(v) -> str:
    return f"{float(v):.2f}"


def _signed(v) -> str:
    return f"{float(v):+.2f}"


def _pct(v) -> str:
    return "" if v is None else f", {float(v):+.0f} %"
