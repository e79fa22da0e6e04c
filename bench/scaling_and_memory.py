#!/usr/bin/env python3
"""Time and peak memory of ``unetsegment segment`` (probability + Grad-CAM written) at three sizes.

The demo case (sample head CT + synthetic hemorrhage, 256×256×108) is resampled to finer grids of
the same head — by default 256×256×108, 384×384×200 and 512×512×300 — and each is segmented by the
CLI in its own process, as a user runs it. Reported per size: voxels, wall time, time per million
voxels, the engine's own stage timings (from ``summary.json``) and the process's peak RSS (the
kernel's ``ru_maxrss`` of the child). The memory target of the speed issue: peak RSS ≤ 2.5 GB at
512×512×300 with probability and Grad-CAM written.

A 2D/2.5D model runs on a 1 mm in-plane network grid whatever the input spacing, so the network
cost grows with the slice count while reading, resampling and writing grow with the voxel count.

usage: python bench/scaling_and_memory.py [--sizes 256x256x108 384x384x200 512x512x300] [--engine fast]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UNetSegment"))

from UNetSegmentLib.demo import demo_case  # noqa: E402
from UNetSegmentLib.image import Image, resample  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.io.writers import write_image  # noqa: E402

TARGET_BYTES = 2.5e9


def resampled_case(src: Image, shape_ijk: tuple[int, int, int], out: Path) -> Path:
    """The same head on a ``shape_ijk`` grid spanning the same physical box (linear interpolation)."""
    if not out.exists():
        extent = np.array(src.shape_ijk) * src.spacing
        sp = extent / np.array(shape_ijk)
        m = src.ijk_to_ras.copy()
        m[:3, :3] = src.direction * sp
        m[:3, 3] = src.ijk_to_ras_points(np.full((1, 3), -0.5))[0] + src.direction @ (sp / 2)
        arr = resample(src.with_array(src.array.astype(np.float32)), tuple(shape_ijk[::-1]), m, order=1, fill=-1024.0).array
        write_image(Image(np.round(arr).astype(np.int16), m), out)
    return out


def run_cli(case: Path, out: Path, engine: str) -> tuple[float, int, dict]:
    exe = Path(sys.executable).with_name("unetsegment")
    cmd = [str(exe), "segment", str(case), "-o", str(out), "--heatmap", "gradcam", "--engine", engine, "--overwrite"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # a running maximum: one size per process
    summary = json.loads((out / "summary.json").read_text())
    return wall, peak_kib * 1024, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["256x256x108", "384x384x200", "512x512x300"])
    ap.add_argument("--engine", default="fast", choices=["fast", "plain"])
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one size in this process's children
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or os.path.join(tempfile.gettempdir(), "unetsegment-scaling"))
    work.mkdir(parents=True, exist_ok=True)
    if a.one:
        wall, peak, summary = run_cli(Path(a.one), work / ("out-" + Path(a.one).name.split(".")[0]), a.engine)
        print(json.dumps({"wall": wall, "peak": peak, "timings": summary.get("timings_s", {})}))
        return 0
    src = read_image(demo_case()[0])
    print(f"engine {a.engine}; CPU threads {os.cpu_count()}; case: demo case resampled")
    print(f"{'size (i×j×k)':>14} {'Mvoxels':>8} {'wall s':>8} {'s/Mvox':>7} {'peak RSS GB':>12}  stages")
    rows = []
    for s in a.sizes:
        shape = tuple(int(v) for v in s.lower().split("x"))
        case = resampled_case(src, shape, work / f"case-{s}.nii.gz")
        # a fresh parent per size, so that the children's peak RSS is this size's alone
        res = subprocess.run([sys.executable, __file__, "--one", str(case), "--engine", a.engine, "--workdir", str(work)],
                             check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        mvox = np.prod(shape) / 1e6
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in r["timings"].items() if isinstance(v, (int, float)))
        print(f"{s:>14} {mvox:8.1f} {r['wall']:8.2f} {r['wall'] / mvox:7.3f} {r['peak'] / 1e9:12.2f}  {stages}")
        rows.append((mvox, r["wall"], r["peak"]))
    big = rows[-1]
    print(f"peak RSS at the largest size: {big[2] / 1e9:.2f} GB (target ≤ {TARGET_BYTES / 1e9:.1f} GB): "
          f"{'met' if big[2] <= TARGET_BYTES else 'NOT met'}")
    if len(rows) >= 2:
        slope = np.polyfit([r[0] for r in rows], [r[1] for r in rows], 1)
        print(f"linear fit: {slope[0]:.3f} s per Mvoxel + {slope[1]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
