#!/usr/bin/env python3
"""Where a user's wait goes: ``unetsegment segment`` from process start to exit, part by part.

Runs the CLI as a user would (a fresh process each time, default settings: Grad-CAM on, every output
written) ``--repeats`` times on the demo case (or ``--case``) and prints the median seconds of each part:

* start-up and exit: the wall time around the process minus the run's own ``total_s`` (the
  interpreter, the CLI's imports, the exit);
* set-up: the model bundle, and PyTorch's import (device and precision are resolved);
* read, preprocess (input checks, input-domain check, network grid), model load, inference,
  Grad-CAM, postprocess (maps back on the input grid, labels);
* writes: the lesion table (analysis, CSV, TSV), the volume files (segmentation, maps, DICOM) and
  the report PNG.

The parts come from ``summary.json``'s ``timings_s``, which every run records.

usage: python bench/end_to_end.py [--case PATH] [--repeats N] [--cli PATH]
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))

from UNetSegmentLib.demo import demo_case  # noqa: E402

#: (label, summary timing key) in the order a run passes them
PARTS = (
    ("set-up (bundle, PyTorch import)", "setup_s"),
    ("read", "read_s"),
    ("preprocess (checks, input domain, grid)", "preprocess_s"),
    ("model load", "load_model_s"),
    ("inference", "inference_s"),
    ("Grad-CAM", "gradcam_s"),
    ("postprocess (to the input grid, labels)", "postprocess_s"),
    ("lesion table", "table_s"),
    ("volume files", "volumes_s"),
    ("report PNG", "report_s"),
    ("writes, all (table, volume files, report)", "write_s"),
)


def one_run(cli: list[str], case: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="unetsegment-e2e-") as tmp:
        out = Path(tmp) / "out"
        t = time.perf_counter()
        subprocess.run([*cli, "segment", str(case), "-o", str(out), "-q"], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        timings = json.loads((out / "summary.json").read_text(encoding="utf-8"))["timings_s"]
    return {"wall_s": wall, "startup_exit_s": wall - timings["total_s"], **timings}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", type=Path, default=None, help="input volume (default: the demo case)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cli", default=None, help="the unetsegment command line (default: this Python -m UNetSegmentLib.cli)")
    a = ap.parse_args()
    case = a.case or demo_case()[0]
    cli = shlex.split(a.cli) if a.cli else [sys.executable, "-m", "UNetSegmentLib.cli"]
    runs = [one_run(cli, case) for _ in range(a.repeats)]

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs)

    print(f"`unetsegment segment` on {case}, default settings, median of {a.repeats} fresh processes")
    rows = [("start-up and exit (interpreter, imports)", med("startup_exit_s"))] + [(label, med(key)) for label, key in PARTS]
    for label, v in rows:
        print(f"  {label:<42} {v:6.2f} s")
    total = med("wall_s")
    network = med("inference_s") + med("gradcam_s")
    print(f"  {'wall time, process start to exit':<42} {total:6.2f} s")
    print(f"network passes (inference + Grad-CAM): {network:.2f} s = {network / total:.0%} of the wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
