#!/usr/bin/env python3
"""Cohort time per case: ``unetsegment batch`` (local Dask cluster) vs a loop of ``unetsegment segment``.

Makes ``--cases`` synthetic head volumes, then runs, on the same cases and flags:

* **loop**: ``unetsegment segment CASE -o OUT/<case>`` as one subprocess per case, one after the
  other (what a shell ``for`` loop does: each call pays Python + torch start-up and model load);
* **batch**: one ``unetsegment batch DIR -o OUT`` (workers sized to this machine's cores and memory,
  torch threads = cores ÷ workers).

Prints the wall time and time per case of each, the speed-up, and checks that both produced the
same ``lesions.csv`` for every case.

usage: python bench/batch_vs_loop.py [--cases 20] [--shape K J I] [--heatmap gradcam|none] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UNetSegment"))
sys.path.insert(0, str(REPO / "Testing"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--shape", type=int, nargs=3, default=(16, 96, 96), metavar=("K", "J", "I"))
    ap.add_argument("--heatmap", default="gradcam")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--model", default="tiny-blob")
    a = ap.parse_args()

    import SimpleITK as sitk
    from conftest import ct_phantom

    from UNetSegmentLib.serving.batch import local_cluster_size
    from UNetSegmentLib.image import to_sitk

    work = Path(tempfile.mkdtemp(prefix="unetsegment-batch-bench-"))
    src = work / "cases"
    src.mkdir()
    for i in range(a.cases):
        img, _ = ct_phantom(shape_kji=tuple(a.shape), seed=i, blob=i % 5 != 4)
        sitk.WriteImage(to_sitk(img), str(src / f"case{i:03d}.nii.gz"))
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    cli = [sys.executable, "-m", "UNetSegmentLib.cli"]
    flags = ["--model", a.model, "--heatmap", a.heatmap]
    try:
        t = time.perf_counter()
        for f in sorted(src.iterdir()):
            cid = f.name[: -len(".nii.gz")]
            subprocess.run(cli + ["segment", str(f), "-o", str(work / "loop" / cid), "-q"] + flags, env=env, check=True,
                           stdout=subprocess.DEVNULL)
        t_loop = time.perf_counter() - t

        t = time.perf_counter()
        extra = ["--workers", str(a.workers)] if a.workers else []
        r = subprocess.run(cli + ["batch", str(src), "-o", str(work / "batch"), "-q"] + flags + extra, env=env,
                           capture_output=True, text=True)
        t_batch = time.perf_counter() - t
        if r.returncode != 0:
            print(r.stdout, r.stderr, file=sys.stderr)
            return 1

        same = sum((work / "loop" / c / "lesions.csv").read_text() == (work / "batch" / c / "lesions.csv").read_text()
                   for c in (f.name[: -len(".nii.gz")] for f in src.iterdir()))
        workers, threads = local_cluster_size(a.cases, a.workers)
        print(f"{a.cases} cases of {tuple(a.shape)} KJI voxels, model {a.model}, --heatmap {a.heatmap}, "
              f"{len(os.sched_getaffinity(0))} CPU cores, python {sys.version.split()[0]}")
        print(f"loop of `unetsegment segment`: {t_loop:7.1f} s  = {t_loop / a.cases:6.2f} s/case")
        print(f"`unetsegment batch`:           {t_batch:7.1f} s  = {t_batch / a.cases:6.2f} s/case  "
              f"({workers} worker process(es) × {threads} torch thread(s), cluster start-up included)")
        print(f"speed-up: {t_loop / t_batch:.2f}×   identical lesions.csv: {same}/{a.cases}")
        print(next((l for l in r.stdout.splitlines() if "case(s):" in l), ""))
        return 0 if same == a.cases else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
