"""The "Compare with prior" results in the scene: the registered prior volume, the comparison table and
the flags (the comparison itself: :mod:`..serving.compare`, run by the worker)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..analysis.followup import COMPARISON_COLUMNS
from ..io.readers import read_image
from . import scene
from .volumes import add_volume


@dataclass
class CompareResult:
    """One finished comparison and the nodes showing it."""

    comparison: dict  # comparison.json
    table: object  # vtkMRMLTableNode: one row per lesion group, then the total
    prior_registered: object  # vtkMRMLScalarVolumeNode on the current scan's grid
    reference_volume: object  # the current scan's node (the frame of every point)
    work_dir: Path

    @property
    def rows(self) -> list[dict]:
        return [*self.comparison["lesions"], self.comparison["total"]]

    def summary_text(self) -> str:
        t, f = self.comparison["total"], self.comparison["flags"]
        reg = self.comparison["registration"]
        pct = "" if t.get("change_pct") is None else f", {t['change_pct']:+.0f} %"
        return (f"Total {t['prior_ml']:.2f} → {t['current_ml']:.2f} mL ({t['change_ml']:+.2f} mL{pct}); hematoma "
                f"expansion: {'YES' if f['hematoma_expansion'] else 'no'}; {f['new_lesions']} new, "
                f"{f['resolved_lesions']} resolved. {reg['kind'].capitalize()} registration: head overlap "
                f"{reg['head_dice']:.2f}, correlation {reg['correlation']:.2f}.")

    def point_of_row(self, row: int) -> tuple[float, float, float] | None:
        """RAS (the current scan's frame) of a table row's lesion; None for the total or out of range."""
        rows = self.comparison["lesions"]
        if row is None or not 0 <= row < len(rows) or rows[row].get("centroid_r") is None:
            return None
        r = rows[row]
        return (float(r["centroid_r"]), float(r["centroid_a"]), float(r["centroid_s"]))


def show_comparison(out_dir: Path, reference_volume, prior_name: str, work_dir: Path, created: list) -> CompareResult:
    """Load a finished comparison's outputs as nodes (appended to ``created``) and overlay the registered prior."""
    comparison = json.loads((out_dir / "comparison.json").read_text(encoding="utf-8"))
    base = f"{prior_name} → {reference_volume.GetName()}"
    registered = add_volume(read_image(out_dir / "prior_registered.nrrd"), f"{base} prior registered")
    created.append(registered)
    scene.place_in_study(registered, reference_volume)
    scene.follow_input_transform(registered, reference_volume)
    rows = [*comparison["lesions"], comparison["total"]]
    table = scene.update_rows_table(None, COMPARISON_COLUMNS, rows, f"{base} comparison")
    created.append(table)
    scene.place_in_study(table, reference_volume)
    scene.show_overlay(reference_volume, registered, 0.5)
    return CompareResult(comparison, table, registered, reference_volume, work_dir)
