"""ABC/2 ÷ voxel volume per lesion shape on the validation cases of a training config.

The bedside ABC/2 estimate (Kothari et al., Stroke 1996) assumes an ellipsoid; the literature reports
that it over-estimates irregular and crescent-shaped bleeds. This script regenerates the validation
cases of ``--config`` (same seeds and settings as ``python -m UNetSegmentLib.models.training.cases``),
keeps each synthesised bleed's kind, measures every true lesion of at least ``--min-ml`` with the
lesion table (:mod:`UNetSegmentLib.analysis.abc2`) and prints, per shape, the number of lesions and
the median (quartiles) of ``abc2_ml / volume_ml``:

* round — intraparenchymal bleeds (deformed ellipsoids);
* irregular — contusions (clusters of blobs) and intraventricular bleeds (casts of the ventricles);
* crescent — subdural bleeds.

A lesion made of bleeds of different kinds that touch is counted as ``mixed``.

    python bench/abc2_shapes.py [--config Resources/Training/ct-hemorrhage.yaml] [--cases 48] [--json OUT]

No timing: this is a measurement of the estimate, not of speed.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "UNetSegment"))

from UNetSegmentLib.analysis.lesions import analyze_lesions  # noqa: E402
from UNetSegmentLib.models.training.cases import VALIDATION, ct_hemorrhage_case  # noqa: E402

SHAPES = {"intraparenchymal": "round", "contusion": "irregular", "intraventricular": "irregular",
          "subdural": "crescent"}
#: a lesion takes a bleed's kind when that bleed holds at least this share of its voxels
KIND_SHARE = 0.9


def case_lesions(seed: int, min_ml: float) -> list[dict]:
    """The true lesions of one validation case: kind, shape, voxel volume and ABC/2."""
    bleeds: list[tuple[str, np.ndarray]] = []
    (ct,), label = ct_hemorrhage_case(seed, VALIDATION, lesions=bleeds)
    table = analyze_lesions(label, ct, min_lesion_ml=min_ml, lesion_map=True, modality="CT")
    out = []
    for row in table.rows:
        voxels = table.lesion_map == row["lesion"]
        shares = {kind: np.count_nonzero(mask & voxels) / row["voxels"] for kind, mask in bleeds}
        kind = max(shares, key=shares.get) if shares else "unknown"
        kind = kind if shares.get(kind, 0.0) >= KIND_SHARE else "mixed"
        out.append({"seed": seed, "lesion": row["lesion"], "kind": kind, "shape": SHAPES.get(kind, kind),
                    "volume_ml": row["volume_ml"], "abc2_ml": row["abc2_ml"], "ratio": row["abc2_ml"] / row["volume_ml"],
                    "a_mm": row["abc2_a_mm"], "b_mm": row["abc2_b_mm"], "c_mm": row["abc2_c_mm"],
                    "slice_mm": float(abs(np.linalg.det(ct.ijk_to_ras[:3, :3])) / np.prod(ct.spacing[:2]))})
    return out


def summarise(lesions: list[dict], key: str) -> dict[str, dict]:
    """n, median and quartiles of the ratio per value of ``key`` (shape or kind)."""
    out = {}
    for value in sorted({r[key] for r in lesions}):
        ratios = np.array([r["ratio"] for r in lesions if r[key] == value])
        q1, med, q3 = np.percentile(ratios, [25, 50, 75])
        out[value] = {"n": int(ratios.size), "median": round(float(med), 3), "q1": round(float(q1), 3),
                      "q3": round(float(q3), 3)}
    return out


def _line(shape: str, kind: str, s: dict) -> str:
    quartiles = f"{s['q1']:.3f}–{s['q3']:.3f}"
    return f"{shape:<12}{kind:<18}{s['n']:>4}{s['median']:>9.3f}{quartiles:>16}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "Resources/Training/ct-hemorrhage.yaml")
    ap.add_argument("--cases", type=int, default=None, help="validation cases (default: the config's val_cases)")
    ap.add_argument("--min-ml", type=float, default=0.5, help="smallest true lesion measured (mL)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the per-lesion rows and the summary here")
    a = ap.parse_args()
    data = yaml.safe_load(a.config.read_text(encoding="utf-8"))["data"]
    seeds = range(int(data["val_seed"]), int(data["val_seed"]) + int(a.cases or data["val_cases"]))
    with ProcessPoolExecutor(a.workers) as pool:
        lesions = [r for rows in pool.map(case_lesions, seeds, [a.min_ml] * len(seeds)) for r in rows]
    by_shape, by_kind = summarise(lesions, "shape"), summarise(lesions, "kind")
    print(f"ABC/2 ÷ voxel volume, {len(lesions)} true lesions ≥ {a.min_ml:g} mL in {len(seeds)} validation cases")
    print(f"{'shape':<12}{'kind':<18}{'n':>4}{'median':>9}{'quartiles':>16}")
    for shape, s in by_shape.items():
        print(_line(shape, "", s))
        for kind, k in by_kind.items():
            if SHAPES.get(kind, kind) == shape and kind != shape:
                print(_line("", kind, k))
    print("ellipsoid (thin slices): (1 + √3)·3/(4π) = 0.652")
    if a.json:
        a.json.write_text(json.dumps({"by_shape": by_shape, "by_kind": by_kind, "lesions": lesions}, indent=1) + "\n",
                          encoding="utf-8")


if __name__ == "__main__":
    main()
