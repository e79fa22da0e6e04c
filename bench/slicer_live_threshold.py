"""Live threshold in the Slicer module: time from a slider step / release to updated views, on real MRML.

Runs the module's logic on Slicer's own code (``Testing/slicer_standin``: slicer-core + trame-slicer,
views rendered offscreen) with the demo case and ct-hemorrhage, then times, per threshold:
- *drag*: what a step of the dragged slider does (label maps + table re-derived, no 3D surfaces), then
  the three slice views rendered;
- *release*: the same with the 3D surfaces rebuilt, then all four views rendered.

    .venv/bin/python bench/slicer_live_threshold.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import slicer_standin

    harness = slicer_standin.install()
    from UNetSegmentLib.demo import demo_case
    from UNetSegmentLib.io.readers import read_image
    from UNetSegmentLib.params import SegmentParams
    from UNetSegmentLib.slicer.logic import RunRequest, SegmentationLogic
    from UNetSegmentLib.slicer.volumes import add_volume

    image_path, _ = demo_case()
    node = add_volume(read_image(image_path), "demo CT")
    logic = SegmentationLogic(dependency_check=lambda: True)
    out = {}
    logic.finished.connect(lambda r: out.setdefault("result", r))
    logic.failed.connect(lambda ev: out.setdefault("error", ev))
    logic.start(RunRequest([node], "ct-hemorrhage", SegmentParams(device="cpu", heatmaps=())))
    harness.run_until(lambda: bool(out), 600)
    if "result" not in out:
        raise SystemExit(f"the run failed: {out}")
    result = out["result"]
    harness.fit_slice_views()
    logic.jump_to_table_row(result, 0)
    harness.fit_3d()

    def timed(threshold: float, surfaces: bool) -> float:
        t0 = time.perf_counter()
        logic.set_threshold(result, threshold, surfaces=surfaces)
        for name in ("axial", "coronal", "sagittal", *(("3d",) if surfaces else ())):
            harness.render(name)
        return time.perf_counter() - t0

    thresholds = [0.3 + 0.1 * (i % 5) for i in range(args.repeats)]
    drag = [timed(t, surfaces=False) for t in thresholds]
    release = [timed(t, surfaces=True) for t in thresholds]
    shape = "x".join(str(s) for s in result.run.labels.array.shape[::-1])
    print(f"demo case {shape}, {result.lesions.n_lesions} lesion(s); median of {args.repeats} (min–max), seconds")
    print(f"drag step    (label maps + table, 3 slice views): {statistics.median(drag):.3f} "
          f"({min(drag):.3f}–{max(drag):.3f})")
    print(f"release      (+ 3D surfaces, 4 views):            {statistics.median(release):.3f} "
          f"({min(release):.3f}–{max(release):.3f})")
    logic.discard(result)


if __name__ == "__main__":
    main()
