"""`unetsegment compare` against known answers: synthetic prior/current pairs of the real head CT.

Each pair paints bleeds (ellipsoids at 65 HU with noise) of known volume into the sample head CT
(Debian's invesalius-examples) for the prior scan, and the same bleeds grown by a known amount (or a
new one, or one resolved) for the current scan; the current scan is then moved by a known rigid
transform (up to 15° and 20 mm) and resliced, with a slice thickness other than the prior's. The
prior is given as a scan (so ``compare`` segments both) and every pair runs through the CLI's code
path (:func:`UNetSegmentLib.serving.compare.compare_files`) with the shipped ``ct-hemorrhage`` model.

Measured per pair, against the truth:

* target registration error at the true lesion centroids (current scan; the applied transform is the
  truth) — target: median ≤ 1.0 mm;
* each matched lesion's change in volume — target: within 0.5 mL or 5 % of the true current volume
  of the true change (the true volumes are the painted voxel volumes);
* status (new / resolved / grown / shrunk / stable) and the hematoma-expansion flag of every lesion and
  of the total — target: correct on every pair.

    python bench/followup_pairs.py [--json OUT] [--keep DIR]

No timing targets (the wall time per pair is printed for information).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))

from UNetSegmentLib.analysis.followup import ChangeRules  # noqa: E402
from UNetSegmentLib.image import Image, from_sitk, to_sitk  # noqa: E402
from UNetSegmentLib.io.sample import load_sample  # noqa: E402
from UNetSegmentLib.io.writers import write_image  # noqa: E402
from UNetSegmentLib.params import SegmentParams  # noqa: E402
from UNetSegmentLib.serving.compare import compare_files  # noqa: E402
from UNetSegmentLib.synth import brain_mask  # noqa: E402

BLEED_HU, NOISE_HU = 65.0, 3.0


@dataclass
class Bleed:
    """An ellipsoid bleed at ``offset_mm`` (RAS) from the brain's centre, ``prior_ml`` → ``current_ml``."""

    name: str
    offset_mm: tuple[float, float, float]
    prior_ml: float
    current_ml: float


@dataclass
class Pair:
    name: str
    bleeds: list[Bleed]
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    current_slice_mm: float
    expect_status: dict[str, str] = field(default_factory=dict)  # bleed name → status
    expect_expansion: dict[str, bool] = field(default_factory=dict)
    expect_total_expansion: bool = False


PAIRS = [
    Pair("stable, 5 mm slices", [Bleed("A", (25, 10, 10), 12.0, 12.0)], (8, -5, 10), (12, -8, 10), 5.0,
         {"A": "stable"}, {"A": False}, False),
    Pair("+3 mL", [Bleed("A", (-25, 15, 5), 15.0, 18.0)], (-10, 6, 4), (-15, 10, 5), 3.0,
         {"A": "grown"}, {"A": False}, False),
    Pair("+35 %", [Bleed("A", (20, -20, 5), 12.0, 16.2)], (5, 10, -8), (18, 5, -6), 2.5,
         {"A": "grown"}, {"A": True}, True),
    Pair("a new lesion", [Bleed("A", (-25, -10, 8), 10.0, 10.0), Bleed("B", (28, 25, 0), 0.0, 5.0)],
         (0, -8, 12), (-10, -15, 8), 5.0, {"A": "stable", "B": "new"}, {"A": False, "B": False},
         True),  # the total grows 10 → 15 mL (+50 %): expansion of the total, though no lesion expanded
    Pair("a resolved lesion", [Bleed("A", (25, -5, 5), 10.0, 10.0), Bleed("B", (-28, 20, 0), 4.0, 0.0)],
         (12, 4, -6), (8, 18, -5), 1.0, {"A": "stable", "B": "resolved"}, {"A": False, "B": False}, False),
    Pair("shrunk, 15° and 20 mm", [Bleed("A", (-20, 5, 10), 18.0, 11.0)], (9, -9, 8.5), (12, -12, 10), 5.0,
         {"A": "shrunk"}, {"A": False}, False),
]


def ellipsoid(ct: Image, centre_ras: np.ndarray, volume_ml: float) -> np.ndarray:
    """K,J,I mask of an ellipsoid (axes 1.3 : 1 : 0.8, RAS-aligned) of ``volume_ml`` around ``centre_ras``."""
    if volume_ml <= 0:
        return np.zeros(ct.array.shape, bool)
    r = (volume_ml * 1000 * 3 / (4 * np.pi) / (1.3 * 0.8)) ** (1 / 3)
    K, J, I = ct.array.shape
    k, j, i = np.mgrid[:K, :J, :I]
    ras = ct.ijk_to_ras_points(np.stack([i.ravel(), j.ravel(), k.ravel()], 1)).reshape(K, J, I, 3) - centre_ras
    return (ras[..., 0] / (1.3 * r)) ** 2 + (ras[..., 1] / r) ** 2 + (ras[..., 2] / (0.8 * r)) ** 2 <= 1


def paint(ct: Image, masks: list[np.ndarray], rng: np.random.Generator) -> Image:
    a = np.asarray(ct.array, np.float32).copy()
    for m in masks:
        a[m] = BLEED_HU + rng.normal(0, NOISE_HU, int(m.sum()))
    return ct.with_array(np.round(a).astype(np.int16))


def moved(ct: Image, rotation_deg, translation_mm, slice_mm: float):
    """The scan moved by a rigid transform and resliced; the transform maps current LPS points to prior LPS points."""
    import SimpleITK as sitk

    src = to_sitk(ct)
    t = sitk.Euler3DTransform()
    centre = src.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in src.GetSize()])
    t.SetCenter(centre)
    t.SetRotation(*np.deg2rad(rotation_deg))
    t.SetTranslation(tuple(float(x) for x in translation_mm))
    size = list(src.GetSize())
    size[2] = int(round(size[2] * src.GetSpacing()[2] / slice_mm))
    ref = sitk.Image(size, sitk.sitkInt16)
    ref.SetSpacing((src.GetSpacing()[0], src.GetSpacing()[1], slice_mm))
    ref.SetOrigin(src.GetOrigin())
    ref.SetDirection(src.GetDirection())
    out = sitk.Resample(src, ref, t, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    return from_sitk(out), t


def run_pair(pair: Pair, base: Image, brain_centre: np.ndarray, work: Path, rules: ChangeRules, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    centres = {b.name: brain_centre + np.asarray(b.offset_mm, float) for b in pair.bleeds}
    prior_masks = {b.name: ellipsoid(base, centres[b.name], b.prior_ml) for b in pair.bleeds}
    current_masks = {b.name: ellipsoid(base, centres[b.name], b.current_ml) for b in pair.bleeds}
    v = base.voxel_volume_mm3 / 1000
    truth = {b.name: (float(prior_masks[b.name].sum() * v), float(current_masks[b.name].sum() * v)) for b in pair.bleeds}
    prior = paint(base, list(prior_masks.values()), rng)
    current, transform = moved(paint(base, list(current_masks.values()), rng), pair.rotation_deg,
                               pair.translation_mm, pair.current_slice_mm)
    folder = work / pair.name.replace(" ", "_").replace(",", "").replace("%", "pct").replace("°", "deg")
    folder.mkdir(parents=True, exist_ok=True)
    write_image(prior, folder / "prior.nrrd")
    write_image(current, folder / "current.nrrd")
    t0 = time.perf_counter()
    result = compare_files(str(folder / "prior.nrrd"), [str(folder / "current.nrrd")], folder / "out", "ct-hemorrhage",
                           SegmentParams(heatmaps=()), rules, overwrite=True)
    seconds = time.perf_counter() - t0
    inv = transform.GetInverse()
    m = np.asarray(result["registration"]["current_to_prior_ras"])
    errors, lesions = [], []
    for b in pair.bleeds:
        prior_lps = np.array([-centres[b.name][0], -centres[b.name][1], centres[b.name][2]])
        cur_lps = np.asarray(inv.TransformPoint(prior_lps.tolist()))  # where the bleed lies in the current scan
        cur_ras = cur_lps * [-1, -1, 1]
        errors.append(float(np.linalg.norm(m[:3, :3] @ cur_ras + m[:3, 3] - centres[b.name])))
        row = _row_of(result["lesions"], cur_ras)
        true_change = truth[b.name][1] - truth[b.name][0]
        got_change = row["change_ml"] if row else None
        tol = max(0.5, 0.05 * truth[b.name][1])
        lesions.append({
            "bleed": b.name, "true_prior_ml": round(truth[b.name][0], 3), "true_current_ml": round(truth[b.name][1], 3),
            "true_change_ml": round(true_change, 3), "measured_change_ml": None if got_change is None else round(got_change, 3),
            "change_ok": got_change is not None and abs(got_change - true_change) <= tol,
            "status": row["status"] if row else None, "status_ok": bool(row) and row["status"] == pair.expect_status[b.name],
            "expansion": row["expansion"] if row else None,
            "expansion_ok": bool(row) and row["expansion"] == pair.expect_expansion[b.name],
        })
    extra = len(result["lesions"]) - len(pair.bleeds)
    return {"pair": pair.name, "seconds": round(seconds, 1), "tre_mm": [round(e, 3) for e in errors],
            "head_dice": result["registration"]["head_dice"], "lesions": lesions, "extra_rows": extra,
            "total_expansion": result["total"]["expansion"],
            "total_expansion_ok": result["total"]["expansion"] == pair.expect_total_expansion}


def _row_of(rows: list[dict], ras: np.ndarray, within_mm: float = 15.0) -> dict | None:
    """The comparison row whose centroid is nearest to ``ras`` (within ``within_mm``)."""
    best, dist = None, within_mm
    for r in rows:
        d = float(np.linalg.norm(np.array([r["centroid_r"], r["centroid_a"], r["centroid_s"]]) - ras))
        if d < dist:
            best, dist = r, d
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep the pairs and outputs here (default: a temporary folder)")
    a = ap.parse_args()
    base = load_sample()
    brain = brain_mask(base)
    kji = np.argwhere(brain).mean(0)
    brain_centre = base.ijk_to_ras_points(kji[::-1][None])[0]
    work = a.keep or Path(tempfile.mkdtemp(prefix="followup-"))
    rules = ChangeRules()
    results = [run_pair(p, base, brain_centre, work, rules, seed) for seed, p in enumerate(PAIRS)]
    tre = [e for r in results for e in r["tre_mm"]]
    print(f"{'pair':<24}{'TRE mm':>8}{'head':>6}  bleed  true Δ mL  measured Δ  status (ok)   expansion (ok)  s")
    for r in results:
        for n, les in enumerate(r["lesions"]):
            print(f"{r['pair'] if n == 0 else '':<24}{r['tre_mm'][n]:>8.2f}{r['head_dice']:>6.2f}  {les['bleed']:<5}"
                  f"{les['true_change_ml']:>+10.2f}{(les['measured_change_ml'] or 0):>+12.2f}  "
                  f"{str(les['status']):<9}{'✓' if les['status_ok'] else '✗':<4}{str(les['expansion']):<7}"
                  f"{'✓' if les['expansion_ok'] else '✗':<8}{r['seconds'] if n == 0 else '':>6}")
    all_status = all(les["status_ok"] and les["expansion_ok"] for r in results for les in r["lesions"])
    all_change = all(les["change_ok"] for r in results for les in r["lesions"])
    totals = all(r["total_expansion_ok"] for r in results)
    extra = sum(r["extra_rows"] for r in results)
    print(f"TRE median {np.median(tre):.2f} mm, max {np.max(tre):.2f} mm (target median ≤ 1.0)")
    print(f"change within max(0.5 mL, 5 % of the true volume) of the truth: {'all' if all_change else 'NOT all'}")
    print(f"status and expansion correct on every lesion: {all_status}; total expansion flag correct: {totals}; "
          f"rows beyond the painted bleeds: {extra}")
    if a.json:
        a.json.write_text(json.dumps({"pairs": results, "tre_median_mm": float(np.median(tre)),
                                      "all_status": all_status, "all_change": all_change, "totals": totals},
                                     indent=1) + "\n", encoding="utf-8")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
