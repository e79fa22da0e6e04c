"""The cohort's rows and tables: one row per case (``cohort_summary.csv``), every lesion of the
completed cases (``cohort_lesions.csv``), and the check that lets ``--resume`` reuse a case.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

from ..analysis.lesions import COLUMNS, format_cell
from ..io.writers import write_text
from ..params import SegmentParams
from ..settings import resolve, resolved_parameters

#: columns of ``cohort_summary.csv``
SUMMARY_COLUMNS = ("case_id", "status", "n_lesions", "total_volume_ml", "time_s", "error", "output_dir", "inputs")
#: ``status`` values: ran now, skipped because complete (``resume``), failed
STATUS_OK, STATUS_RESUMED, STATUS_FAILED = "ok", "resumed", "failed"
COHORT_LESIONS = "cohort_lesions.csv"
COHORT_SUMMARY = "cohort_summary.csv"
#: parameters that change the result: a complete case made with other values is not reused by ``resume``
_RESULT_PARAMS = ("threshold", "min_lesion_ml", "connectivity", "overlap", "tta", "heatmaps", "gradcam_layer", "cam_method", "engine")


def failed_row(case_id: str, inputs: Sequence[str], error: str = "") -> dict:
    """A ``failed`` row of :data:`SUMMARY_COLUMNS` (also the starting row of a case that runs)."""
    return {"case_id": case_id, "status": STATUS_FAILED, "n_lesions": "", "total_volume_ml": "", "time_s": 0.0,
            "error": error, "output_dir": "", "inputs": ";".join(inputs)}


def resumed_row(case_id: str, inputs: Sequence[str], case_dir: Path) -> dict:
    """The ``resumed`` row of a complete case, from its ``summary.json``."""
    s = json.loads((case_dir / "summary.json").read_text(encoding="utf-8"))
    return {"case_id": case_id, "status": STATUS_RESUMED, "n_lesions": int(s["n_lesions"]),
            "total_volume_ml": format_cell(float(s["total_volume_ml"])),
            "time_s": round(float(s.get("timings_s", {}).get("total_s", 0.0)), 3),
            "error": "", "output_dir": case_id, "inputs": ";".join(inputs)}


def complete_case(case_dir: Path, bundle, params: SegmentParams) -> tuple[bool, str]:
    """(True, '') when ``case_dir`` holds a complete set made by ``bundle`` with these parameters as
    resolved for it (a "model's default" compares as the value it stands for); else (False, why it
    cannot be reused), or (False, '') when it holds no ``summary.json``."""
    sj = case_dir / "summary.json"
    if not sj.is_file():
        return False, ""
    try:
        s = json.loads(sj.read_text(encoding="utf-8"))
        m, rec = s["model"], s["parameters"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"{sj} is unreadable"
    if (m.get("name"), m.get("version")) != (bundle.name, bundle.version):
        return False, f"{case_dir.name} holds outputs of model {m.get('name')} {m.get('version')}"
    want = resolved_parameters(params, resolve(params, bundle, hardware=False))
    for k in _RESULT_PARAMS:
        if want[k] != rec.get(k) and not (k == "gradcam_layer" and want[k] is None):  # None: the model's layer
            return False, f"{case_dir.name} holds outputs made with {k}={rec.get(k)!r}, not {want[k]!r}"
    return True, ""


def write_cohort_tables(out_dir: Path, rows: Sequence[dict]) -> None:
    """``cohort_summary.csv`` from ``rows`` and ``cohort_lesions.csv`` from the completed cases' ``lesions.csv``."""
    write_text(out_dir / COHORT_SUMMARY, _summary_csv(rows))
    write_text(out_dir / COHORT_LESIONS, _lesions_csv(out_dir, rows))


def _summary_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in SUMMARY_COLUMNS])
    return buf.getvalue()


def _lesions_csv(out_dir: Path, rows: Sequence[dict]) -> str:
    """``case_id`` then :data:`.lesions.COLUMNS`, copied verbatim from each complete case's ``lesions.csv``
    (its ``total`` row left out)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("case_id", *COLUMNS))
    for r in rows:
        if r["status"] not in (STATUS_OK, STATUS_RESUMED):
            continue
        with open(out_dir / r["case_id"] / "lesions.csv", newline="", encoding="utf-8") as f:
            rd = csv.reader(f)
            header = next(rd)
            idx = [header.index(c) if c in header else None for c in COLUMNS]  # a case written before a column existed
            for rec in rd:
                if rec and rec[0] != "total":
                    w.writerow([r["case_id"], *("" if i is None else rec[i] for i in idx)])
    return buf.getvalue()
