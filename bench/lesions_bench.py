"""Benchmark analyze_lesions on 10,000 random small lesions in a 256×256×128 volume.

Peer, measured in the same run on the same labelled volume: SimpleITK's
LabelShapeStatisticsImageFilter + LabelIntensityStatisticsImageFilter (default settings except
perimeter off; Feret off) on the component label map that scipy.ndimage.label produces.
``ratio`` = ours / peer (below 1 = faster than the peer). Ours includes connected-component
labelling, the largest-slice Feret diameter, inside point, probability and midline; the peer
gets the components ready-made. The peer including sitk.ConnectedComponent is printed too.

Run: .venv/bin/python bench/lesions_bench.py [--lesions 10000] [--repeat 3] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "UNetSegment"))

from UNetSegmentLib.image import Image, make_ijk_to_ras, to_sitk  # noqa: E402
from UNetSegmentLib.analysis.lesions import analyze_lesions  # noqa: E402


def build(n_lesions: int, shape=(128, 256, 256), seed=0):
    """Label map with ``n_lesions`` separate random blobs (1–4 voxels per side, random dropout)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    cell = 6
    grid = [s // cell for s in shape]
    ncell = int(np.prod(grid))
    if n_lesions > ncell:
        raise SystemExit(f"at most {ncell} lesions fit")
    cells = rng.choice(ncell, n_lesions, replace=False)
    lab = np.zeros(shape, np.uint8)
    ck, cj, ci = np.unravel_index(cells, grid)
    for n, (k, j, i) in enumerate(zip(ck, cj, ci)):
        sz = rng.integers(1, 5, size=3)
        blob = np.ones(sz, bool)
        if blob.size > 4:  # a few holes, as long as the blob stays one 26-connected piece
            holed = blob & (rng.random(sz) > 0.2)
            if holed.any() and ndimage.label(holed, structure=np.ones((3, 3, 3)))[1] == 1:
                blob = holed
        k0, j0, i0 = k * cell + 1, j * cell + 1, i * cell + 1
        lab[k0 : k0 + sz[0], j0 : j0 + sz[1], i0 : i0 + sz[2]][blob] = 1 if n % 5 else 2
    m = make_ijk_to_ras((0.9, 0.9, 1.5), origin=(-115.0, -115.0, -96.0))
    intensity = rng.normal(40.0, 10.0, shape).astype(np.float32)
    intensity[:, :, :20] = -1000.0  # some "air" so the midline estimate takes the CT path
    prob = rng.random(shape, dtype=np.float32)
    return Image(lab, m), Image(intensity, m), Image(prob, m)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lesions", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="SimpleITK threads (0: its default)")
    args = ap.parse_args(argv)

    import SimpleITK as sitk
    from scipy import ndimage

    if args.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    labels, intensity, prob = build(args.lesions)
    names = {1: "lesion", 2: "edema"}

    ours = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        table = analyze_lesions(labels, intensity, prob, names, connectivity=26)
        ours.append(time.perf_counter() - t0)

    # peer input: the same components, one label per component (the same 26-connectivity)
    comp = np.zeros(labels.array.shape, np.uint32)
    off = 0
    for v in (1, 2):
        c, nc = ndimage.label(labels.array == v, structure=np.ones((3, 3, 3)))
        comp[c > 0] = c[c > 0] + off
        off += nc
    s_comp = to_sitk(Image(comp, labels.ijk_to_ras))
    s_int = to_sitk(intensity)
    peer, peer_cc = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fs = sitk.LabelShapeStatisticsImageFilter()
        fs.ComputePerimeterOff()
        fs.ComputeFeretDiameterOff()
        fs.Execute(s_comp)
        fi = sitk.LabelIntensityStatisticsImageFilter()
        fi.Execute(s_comp, s_int)
        peer.append(time.perf_counter() - t0)
        n_peer = fs.GetNumberOfLabels()
        t0 = time.perf_counter()
        s_lab = to_sitk(labels)
        cc1 = sitk.ConnectedComponent(s_lab == 1, True)
        n1 = int(sitk.GetArrayViewFromImage(cc1).max())
        cc = cc1 + sitk.Mask(sitk.ConnectedComponent(s_lab == 2, True) + n1, s_lab == 2)
        fs2 = sitk.LabelShapeStatisticsImageFilter()
        fs2.ComputePerimeterOff()
        fs2.Execute(cc)
        fi2 = sitk.LabelIntensityStatisticsImageFilter()
        fi2.Execute(cc, s_int)
        peer_cc.append(time.perf_counter() - t0)
        n_peer_cc = fs2.GetNumberOfLabels()

    t_ours, t_peer, t_peer_cc = min(ours), min(peer), min(peer_cc)
    shape = labels.array.shape
    print(f"volume k,j,i = {shape}  cpus = {os.cpu_count()}  sitk threads = {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}")
    print(f"lesions: ours = {table.n_lesions}  peer = {n_peer}  peer+ = {n_peer_cc}")
    print(f"ours  analyze_lesions (labelling + all columns)          best {t_ours:.3f} s  runs {[round(t, 3) for t in ours]}")
    print(f"peer  sitk LabelShape+LabelIntensityStatistics            best {t_peer:.3f} s  runs {[round(t, 3) for t in peer]}")
    print(f"peer+ sitk ConnectedComponent + the two filters           best {t_peer_cc:.3f} s")
    print(f"ratio = ours / peer = {t_ours / t_peer:.2f}   (ours / peer+ = {t_ours / t_peer_cc:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
