#!/usr/bin/env python3
"""Segment clicks in the Slicer module on real MRML: the first (cold) click and the later (warm) ones.

Runs the module's panel on Slicer's own code (``Testing/slicer_standin``: slicer-core + trame-slicer,
the Qt widgets imitated) with the demo case and the default model and settings, and clicks
**Segment** ``--clicks`` times. Each time is from the click to the result being in the scene: the
segmentation, table and heatmap nodes added, the panel showing the result, and the views rendered once
(the harness renders as Slicer does, once per turn of the event loop). The first click starts
the worker process; the later ones go to the same warm worker (:class:`UNetSegmentLib.slicer.process.WarmWorker`).
For comparison, ``--cold`` also times clicks that each start a fresh worker (the behaviour before
the warm worker).

Prints the first click, the median (min–max) of the later ones, the GUI loop's longest pause while
waiting (how responsive Slicer stays while the worker computes), and each run's own parts
(``summary.json`` ``timings_s``) for the last click. ``--threads N`` sets the worker's threads.

    .venv/bin/python bench/slicer_second_click.py [--clicks 6] [--cold]
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
    ap.add_argument("--clicks", type=int, default=6, help="clicks in all: the first (cold) and the rest (warm)")
    ap.add_argument("--cold", action="store_true", help="also time clicks that each start a fresh worker")
    ap.add_argument("--threads", type=int, default=None,
                    help="the worker's threads (default: the panel's choice, every usable core)")
    args = ap.parse_args()

    import slicer_standin
    from slicer_standin import qtlike

    harness = slicer_standin.install()
    import slicer
    from UNetSegmentLib.demo import demo_case
    from UNetSegmentLib.io.readers import read_image
    from UNetSegmentLib.models.bundle import default_model_name
    from UNetSegmentLib.slicer.logic import SegmentationLogic
    from UNetSegmentLib.resources import resource_path
    from UNetSegmentLib.slicer.volumes import add_volume
    from UNetSegmentLib.slicer.widget import Panel

    if args.threads is not None:
        import UNetSegmentLib.slicer.widget as widget

        widget.usable_cores = lambda: args.threads
    add_volume(read_image(demo_case()[0]), "demo CT")
    root = slicer.util.loadUI(str(resource_path("UI", "UNetSegment.ui")))
    ui = slicer.util.childWidgetVariables(root)
    root.setMRMLScene(slicer.mrmlScene)
    logic = SegmentationLogic(dependency_check=lambda: True)
    panel = Panel(ui, logic)
    panel.refresh_models(select=default_model_name())
    ui.deviceComboBox.setCurrentIndex(1)  # cpu (what "auto" picks on this machine anyway)

    gaps: list[float] = []  # the GUI loop's longest pause per click: how responsive Slicer stays meanwhile

    def click() -> float:
        before = panel.result
        t0 = time.perf_counter()
        ui.segmentButton.click()
        ticks = [time.perf_counter()]

        def finished() -> bool:
            ticks.append(time.perf_counter())
            return panel.result is not before and panel.result is not None

        if not harness.run_until(finished, 600):
            raise SystemExit("the run did not finish")
        # the views render the new nodes when the event loop next turns (as Slicer's do): count that render
        qtlike.process_events()
        waits = [b - a for a, b in zip(ticks, ticks[1:])][:-1]  # the last one loads the result
        gaps.append(max(waits, default=0.0))
        return time.perf_counter() - t0

    times = [click() for _ in range(args.clicks)]
    starts = logic.worker.starts
    print(f"model {panel.bundle.name} {panel.bundle.version}, demo case, default heatmaps "
          f"{list(panel.result.summary.get('heatmaps', []))}; click → result in the scene, seconds")
    print(f"first click (starts the worker):  {times[0]:.2f}")
    warm = times[1:]
    if warm:
        print(f"later clicks (warm worker), median of {len(warm)}: {statistics.median(warm):.2f} "
              f"({min(warm):.2f}–{max(warm):.2f}); worker processes started: {starts}")
    print(f"worker threads {panel.result.summary['parameters'].get('threads')}; the GUI loop's longest pause while "
          f"the worker computes (10 ms ticks), median over clicks: {statistics.median(gaps[1:] or gaps) * 1e3:.0f} ms")
    parts = panel.result.summary.get("timings_s", {})
    print("last click's run, its parts: " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in parts.items()))
    if args.cold:
        cold = []
        for _ in range(max(1, len(warm))):
            logic.worker.shutdown()
            cold.append(click())
        print(f"clicks each starting a fresh worker, median of {len(cold)}: {statistics.median(cold):.2f} "
              f"({min(cold):.2f}–{max(cold):.2f})")
    logic.close()


if __name__ == "__main__":
    main()
