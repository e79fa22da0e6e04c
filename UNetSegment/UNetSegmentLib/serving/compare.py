"""``unetsegment compare``: segment the current scan, register the prior one to it, match lesions, report the change.

PRIOR is an earlier ``segment`` output folder (its ``summary.json``, segmentation and the input it
names are read) or a scan (segmented here, into ``DIR/prior``, with the same model and parameters).
CURRENT likewise: an earlier output folder, or the scan (one volume per model channel), segmented
into ``DIR/current``. The prior scan is registered to the current one
(:mod:`..engine.registration`), its lesion map resampled onto the current grid, lesions matched and
compared (:mod:`..analysis.followup`). Outputs in DIR, committed together (the summary last):
``prior_registered.nrrd``, ``comparison.csv``, ``comparison.png`` and ``comparison.json``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..analysis.comparison_figure import draw_comparison
from ..analysis.followup import COMPARISON_COLUMNS, ChangeRules, compare_tables, link_lesions
from ..analysis.lesion_table import format_cell
from ..analysis.lesions import analyze_lesions
from ..engine.inference import CancelToken, ProgressFn
from ..engine.registration import register, resample_to
from ..errors import InputError
from ..image import Image
from ..io.outputs import StagedOutput
from ..io.readers import read_image
from ..io.writers import write_image, write_json, write_text
from ..models.bundle import load_bundle
from ..params import SegmentParams
from ..settings import context_label_values, lesion_label_values
from .job import segment_files

#: what ``compare`` writes in DIR, the summary last (its presence means the set is complete)
COMPARE_FILES = ("prior_registered.nrrd", "comparison.csv", "comparison.png", "measurements.dcm", "comparison.json")


@dataclass
class ScanRun:
    """One scan's segmentation as ``compare`` uses it: the first input channel, its lesions and their map."""

    folder: Path
    summary: dict
    image: Image
    rows: list[dict]
    lesion_map: Image  # int32, voxel value = the lesion's number in this scan's table

    @property
    def modality(self) -> str | None:
        return (self.summary.get("input_domain") or {}).get("modality") or ("CT" if self.image.array.min() < -500 else None)


def load_run(folder: Path) -> ScanRun:
    """An earlier ``segment`` output folder: its first input, labels and lesion table (renumbered as its table)."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{folder} is not a segment output folder ({e})",
                         "give the folder an earlier `unetsegment segment` wrote, or the prior scan itself") from None
    source = Path(summary["inputs"][0]["path"])
    if not source.exists():
        raise InputError(f"the prior run's input {source} is gone (named in {folder / 'summary.json'})",
                         "restore it, or give the prior scan itself as --prior")
    image = read_image(source)
    labels = read_image(folder / "segmentation.seg.nrrd")
    if not labels.same_grid(image, atol=1e-3):
        raise InputError(f"the segmentation in {folder} is not on the grid of its input {source}",
                         "give the prior scan itself as --prior (it is then segmented again)")
    params = summary.get("parameters", {})
    names = {int(s["value"]): s["name"] for s in summary.get("segments", [])}
    probability = read_image(folder / "probability.nrrd") if (folder / "probability.nrrd").is_file() else None
    if probability is not None and not probability.same_grid(labels, atol=1e-3):
        probability = None
    segs = summary.get("segments", [])
    marked = any("lesion" in s for s in segs)  # runs before lesion/context labels: every label its own finding
    table = analyze_lesions(labels, intensity=image, probability=probability, label_names=names, lesion_map=True,
                            connectivity=int(params.get("connectivity", 26)),
                            min_lesion_ml=float(params.get("min_lesion_ml") or 0.0),
                            lesion_values=lesion_label_values(segs) if marked else None,
                            perilesional_values=context_label_values(segs))
    numbers = table.lesion_map if table.lesion_map is not None else np.zeros(labels.array.shape, np.int32)  # no lesion
    return ScanRun(folder, summary, image, table.rows, labels.with_array(numbers))


def compare_files(
    prior: str,
    current: Sequence[str],
    output_dir: str | os.PathLike,
    model: str | None = None,
    params: SegmentParams | None = None,
    rules: ChangeRules = ChangeRules(),
    affine: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> dict:
    """Segment ``current`` (and ``prior`` unless it is an output folder), register, compare; the comparison.json dict."""
    out = Path(output_dir)
    stage = StagedOutput(out, overwrite, COMPARE_FILES)
    stage.check()
    if _is_run_folder(current[0]) and len(current) == 1:  # an earlier run of the current scan: not segmented again
        cur = load_run(Path(current[0]))
        current_summary = cur.summary
        if model and load_bundle(model).name != current_summary["model"]["name"]:
            raise InputError(f"the current run used model {current_summary['model']['name']}, not {model}",
                             "leave out --model, or give the current scan itself")
    else:
        current_summary = segment_files(current, out / "current", model, params, overwrite, progress, cancel)
        cur = load_run(out / "current")
    if _is_run_folder(prior):
        pri = load_run(Path(prior))
        if pri.summary["model"]["name"] != current_summary["model"]["name"]:
            raise InputError(f"the prior run used model {pri.summary['model']['name']}, the current one "
                             f"{current_summary['model']['name']}", "compare runs of the same model (or give the prior scan)")
    else:
        segment_files([prior], out / "prior", current_summary["model"]["name"], params, overwrite, progress, cancel)
        pri = load_run(out / "prior")
    if cancel is not None:
        cancel.check()
    reg = register(cur.image, pri.image, modality=cur.modality, affine=affine)
    prior_map = resample_to(pri.lesion_map, cur.image, reg, labels=True)
    prior_voxels = {int(v): int(n) for v, n in enumerate(np.bincount(prior_map.array.reshape(-1))) if v and n}
    prior_voxels.update({int(r["lesion"]): prior_voxels.get(int(r["lesion"]), 0) for r in pri.rows})
    current_voxels = {int(r["lesion"]): int(r["voxels"]) for r in cur.rows}
    groups = link_lesions(cur.lesion_map.array, prior_map.array, current_voxels, prior_voxels)
    centroids = {int(r["lesion"]): reg.prior_point_to_current([r["centroid_r"], r["centroid_a"], r["centroid_s"]])[0]
                 for r in pri.rows}
    rows, total = compare_tables(groups, cur.rows, pri.rows, centroids, rules)
    background = float(np.min(pri.image.array))
    registered = resample_to(pri.image, cur.image, reg, labels=False, default=background)
    result = {
        "unetsegment_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "research_use_only": "Research use only — not for diagnosis.",
        "prior": {"folder": str(pri.folder.resolve()), "input": pri.summary["inputs"][0]["path"],
                  "run_id": pri.summary.get("run_id")},
        "current": {"folder": str(cur.folder.resolve()), "input": cur.summary["inputs"][0]["path"],
                    "run_id": cur.summary.get("run_id")},
        "model": current_summary["model"],
        "registration": reg.to_json(),
        "rules": rules.to_json(),
        "parameters": {"current": cur.summary.get("parameters"), "prior": pri.summary.get("parameters"),
                       "affine": bool(affine)},
        "matching": "lesions linked by overlap after registration (≥ 5 % of the smaller); connected groups are "
                    "one-to-one, split, merge or many-to-many rows",
        "total": total,
        "flags": {"hematoma_expansion": bool(total["expansion"]),
                  "new_lesions": sum(r["status"] == "new" for r in rows),
                  "resolved_lesions": sum(r["status"] == "resolved" for r in rows),
                  "lesions_with_expansion": sum(bool(r["expansion"]) for r in rows)},
        "lesions": rows,
        "columns": list(COMPARISON_COLUMNS),
    }
    with stage:
        write_image(registered, stage.path / "prior_registered.nrrd")
        write_text(stage.path / "comparison.csv", comparison_csv(rows, total))
        draw_comparison(stage.path / "comparison.png", registered, prior_map, cur.image, cur.lesion_map, rows, total,
                        reg.to_json(), window=display_window(cur))
        result["dicom_sr"] = _write_change_sr(cur, rows, stage.path / "measurements.dcm")
        write_json(result, stage.path / "comparison.json")
    return result


def _write_change_sr(cur: ScanRun, rows: list[dict], out: Path) -> dict:
    """For a DICOM current scan: its TID 1500 SR with each lesion's change (``measurements.dcm``); else why not."""
    from ..io.dicom_sr import NOT_DICOM, write_measurement_report
    from .job import channel_unit

    source = Path(cur.summary["inputs"][0]["path"])
    if not source.is_dir():
        return {"file": None, "absent_because": NOT_DICOM}
    changes = {int(n): r for r in rows if r["current_lesion"] for n in r["current_lesion"].split("+")}
    try:
        absent = write_measurement_report(cur.lesion_map, source, cur.folder / "segmentation.dcm", cur.rows, out,
                                          model_name=cur.summary["model"]["name"],
                                          model_version=cur.summary["model"]["version"],
                                          intensity_unit=channel_unit(load_bundle(cur.summary["model"]["path"]), 0),
                                          changes=changes)
    except Exception as e:  # noqa: BLE001 - the SR is an extra; never lose the comparison over it
        absent = f"DICOM SR could not be written: {e}"
    return {"file": None, "absent_because": absent} if absent else {"file": "measurements.dcm"}


def _is_run_folder(path: str) -> bool:
    """An earlier ``segment`` output folder (rather than a scan: a volume file or a DICOM folder)."""
    return Path(path).is_dir() and (Path(path) / "summary.json").is_file()


def comparison_csv(rows: list[dict], total: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COMPARISON_COLUMNS)
    for r in (*rows, total):
        w.writerow([format_cell(r.get(c)) for c in COMPARISON_COLUMNS])
    return buf.getvalue()


def display_window(run: ScanRun) -> tuple[float, float]:
    """The model's display window, as the report uses it (CT: 0–80 HU)."""
    from .job import display_window as bundle_window

    return bundle_window(load_bundle(run.summary["model"]["path"]), run.image)
