#!/usr/bin/env python3
"""How much network work two cheap "do less" plans could save at most, on the evaluation cases.

The fast engine already windows only the body, one window per slice sized to each slab's body box
(``engine/windows.py``). This bench measures two further plans as upper bounds, without timing (the
saving is the share of window area left out; the time saved is at most that share of inference):

* **cranial slices only** — an anatomical candidate detector: run the network only over the span of
  slices where the input-domain check sees a skull enclosing brain (:func:`.domain.cranial_slices`),
  plus ``--margin`` slices each side; hemorrhage is intracranial, so the other slices get no lesion.
* **skip quiet slices** — a first pass on every other slice; a skipped slice is run only where a
  neighbour's P(lesion) reaches ``floor`` somewhere, else it gets its neighbours' mean. Printed per
  floor, with the worst Dice (labels at the model's threshold, network grid) against the full pass,
  over all slice spacings and over thin (≤ 2 mm between slices) ones only. P(lesion) is the engine's:
  the model's temperature applied, its lesion labels together (:func:`.labels.foreground_probability`).

    python bench/plan_savings.py [--cases DIR] [--limit N] [--margin 2]

Cases as in ``bench/inference_vs_monai.py`` (``make evaluate`` writes them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))

from UNetSegmentLib.engine.acceleration import prepare_network  # noqa: E402
from UNetSegmentLib.engine.domain import cranial_slices  # noqa: E402
from UNetSegmentLib.engine.grid import canonical_grid  # noqa: E402
from UNetSegmentLib.engine.inference import sliding_window, softmax_predictor  # noqa: E402
from UNetSegmentLib.engine.labels import foreground_probability  # noqa: E402
from UNetSegmentLib.engine.pipeline import plan_for  # noqa: E402
from UNetSegmentLib.engine.preprocess import prepare_inputs  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.models.bundle import default_model_name, load_bundle  # noqa: E402
from UNetSegmentLib.params import SegmentParams  # noqa: E402
from UNetSegmentLib.settings import resolve  # noqa: E402

FLOORS = (0.01, 0.05, 0.1)
THIN_MM = 2.0


def slice_areas(plan, n_slices: int) -> np.ndarray:
    """Window pixels the fast plan runs on each slice (0 where it runs none)."""
    area = np.zeros(n_slices)
    for r in plan.regions:
        k0, k1 = r.write_k or (r.box[0].start, r.box[0].stop)
        area[k0:k1] = r.roi[-1] * r.roi[-2]
    return area


def skip_quiet(fg: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(slices run, resulting map): even slices and the last always; an odd slice when a neighbour
    reaches ``floor``; the others their neighbours' mean."""
    k = fg.shape[0]
    run = np.zeros(k, bool)
    run[::2] = True
    run[-1] = True
    hot = fg.reshape(k, -1).max(1) >= floor
    out = fg.copy()
    for i in range(1, k - 1, 2):
        if hot[i - 1] or hot[i + 1]:
            run[i] = True
        else:
            out[i] = 0.5 * (fg[i - 1] + fg[i + 1])
    return run, out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--cases", type=Path, default=Path(".cache/eval-ct-hemorrhage"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--margin", type=int, default=2, help="slices kept each side of the cranial ones")
    a = ap.parse_args()
    bundle = load_bundle(a.model or default_model_name())
    s = resolve(SegmentParams(device="cpu", heatmaps=()), bundle)
    m = s.model
    if m.spatial_dims != 2:
        print("these plans are per slice: a 2D/2.5D model only")
        return 2
    net = prepare_network(bundle.build_network(), m.spatial_dims, "cpu")
    predictor = softmax_predictor(net, m.out_channels, s.precision, m.temperature)
    cases = sorted(p for p in a.cases.iterdir() if (p / "image.nii.gz").exists())[: a.limit] if a.cases.is_dir() else []
    if not cases:
        print(f"no evaluation cases in {a.cases}: `make evaluate` makes them")
        return 2
    total = cranial = 0.0
    skipped = {(f, thin): [0.0, 0.0, 1.0] for f in FLOORS for thin in (False, True)}  # run area, all area, worst Dice
    hot_share = []
    for c in cases:
        img = read_image(c / "image.nii.gz")
        vol = prepare_inputs([img], m).volume
        plan = plan_for(vol, s, net)
        area = slice_areas(plan, vol.shape[1])
        probs = sliding_window(vol, predictor, plan, batch_size=s.batch_size)
        fg = foreground_probability({c: probs[c] for c in range(1, probs.shape[0])}, m.lesion_channels)
        total += area.sum()
        ks = np.nonzero(cranial_slices(img, bundle.meta.get("domain")))[0]
        if ks.size:
            cranial += area[max(0, ks.min() - a.margin): ks.max() + a.margin + 1].sum()
        hot_share.append(float((fg.reshape(fg.shape[0], -1).max(1) >= FLOORS[0]).mean()))
        full = fg >= s.threshold
        thin = float(canonical_grid(img)[0].spacing[2]) <= THIN_MM  # between axial slices
        for f in FLOORS:
            run, out = skip_quiet(fg, f)
            d = dice(full, out >= s.threshold)
            for only_thin in (False, True):
                acc = skipped[(f, only_thin)]
                acc[1] += area.sum()
                acc[0] += area[run].sum() if (thin or not only_thin) else area.sum()
                if thin or not only_thin:
                    acc[2] = min(acc[2], d)
    print(f"{bundle.name} {bundle.version}, {len(cases)} evaluation cases; share of the fast plan's window area:")
    print(f"  cranial slices only (±{a.margin}): {cranial / total:.3f}")
    print(f"  slices with P(lesion) ≥ {FLOORS[0]} somewhere: median share {np.median(hot_share):.2f}")
    for f in FLOORS:
        for only_thin in (False, True):
            run, all_, worst = skipped[(f, only_thin)]
            which = f"slices ≤ {THIN_MM:g} mm skipped, others full" if only_thin else "every case"
            print(f"  skip quiet slices, floor {f} ({which}): {run / all_:.3f}; worst label Dice vs the full pass {worst:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
