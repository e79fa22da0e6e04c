"""Temperature scaling (Guo et al. 2017) of a bundle, fitted on the tune cases, measured on validation.

The probability map drives the live threshold and the uncertainty, so it should mean what it says.
Expected calibration error (ECE: 15 equal-width bins of the foreground probability, the |mean
probability − lesion fraction| of each bin weighted by its share of voxels) is measured on the voxels
*near lesions* — within ``NEAR_MM`` of a true or a predicted lesion, where the decision is made (far
from any lesion nearly every voxel is a confident, correct 0 and would hide miscalibration).

One scalar ``T`` divides the logits. For a two-class model the foreground probability is
``σ(z)`` with ``z`` the logit difference, so ``z = logit(p)`` is read back from the probability map and
``T`` is the minimiser of the negative log-likelihood of ``σ(z / T)`` on the tune voxels (bounded scalar
search over 0.25–8). ``T`` is stored in ``model.json`` (``calibration``) only when it lowers the
validation ECE; the before/after figures are stored either way and shown in the card.

``python -m UNetSegmentLib.models.training.calibrate --model DIR --tune CASES --val CASES``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage, optimize

from ...engine.pipeline import segment
from ...errors import UsageError
from ...io.readers import read_image
from ...io.writers import write_text
from ...params import SegmentParams
from ...settings import resolve
from ..bundle import Bundle, load_bundle
from ...analysis.evaluate import case_inputs, find_cases

NEAR_MM = 5.0
N_BINS = 15
EPS = 1e-6


def ece(p: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error of probabilities ``p`` against 0/1 outcomes ``y`` (equal-width bins)."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    if p.size == 0:
        raise UsageError("no voxels to measure calibration on", "give cases with lesions")
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf = np.bincount(idx, p, minlength=n_bins)
    acc = np.bincount(idx, y, minlength=n_bins)
    used = count > 0
    return float(np.sum(np.abs(conf[used] - acc[used])) / p.size)


def scaled(p: np.ndarray, temperature: float) -> np.ndarray:
    """``σ(logit(p) / T)``: the two-class foreground probability at another temperature."""
    z = np.log(np.clip(p, EPS, 1 - EPS)) - np.log1p(-np.clip(p, EPS, 1 - EPS))
    return 1.0 / (1.0 + np.exp(-z / temperature))


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``y`` under ``σ(logit(p) / T)``."""
    y = np.asarray(y, np.float64)

    def nll(log_t: float) -> float:
        q = np.clip(scaled(p, float(np.exp(log_t))), EPS, 1 - EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    res = optimize.minimize_scalar(nll, bounds=(np.log(0.25), np.log(8.0)), method="bounded")
    return float(np.exp(res.x))


def near_lesion_voxels(bundle: Bundle, cases_dir: Path, log=print) -> tuple[np.ndarray, np.ndarray]:
    """(probability, truth) of the voxels within ``NEAR_MM`` of a true or predicted lesion, all cases,
    with the model as shipped but *uncalibrated* (temperature 1)."""
    meta = {**bundle.meta, "calibration": {"temperature": 1.0}}
    s = resolve(SegmentParams(heatmaps=()), meta)
    network = bundle.build_network()
    ps, ys = [], []
    for case in find_cases(cases_dir, bundle.channel_names):
        images = [read_image(p) for p in case_inputs(case, bundle.channel_names)]
        truth = read_image(case / "label.nii.gz").array > 0
        res = segment(images, bundle, network=network, settings=s)
        prob = res.probability.array
        near = ndimage.distance_transform_edt(~(truth | (prob >= s.threshold)), sampling=images[0].spacing[::-1]) <= NEAR_MM
        ps.append(prob[near])
        ys.append(truth[near])
        log(f"{case.name}: {int(near.sum())} voxels near lesions")
    return np.concatenate(ps), np.concatenate(ys)


def calibrate(bundle_dir: Path, tune: Path, val: Path, log=print) -> dict:
    """Fit on ``tune``, measure on ``val``, write ``calibration`` into the bundle's model.json; returns it."""
    bundle = load_bundle(bundle_dir)
    if len(bundle.labels) != 1:
        raise UsageError(f"{bundle.name} has {len(bundle.labels)} labels; this fit is for two-class models",
                         "fit a vector temperature for multi-class models")
    p_tune, y_tune = near_lesion_voxels(bundle, tune, log)
    t = fit_temperature(p_tune, y_tune)
    p_val, y_val = near_lesion_voxels(bundle, val, log)
    before, after = ece(p_val, y_val), ece(scaled(p_val, t), y_val)
    cal = {"temperature": round(t, 4) if after < before else 1.0, "fitted_temperature": round(t, 4),
           "ece_before": round(before, 4), "ece_after": round(after, 4), "near_mm": NEAR_MM, "bins": N_BINS,
           "tune_voxels": int(p_tune.size), "val_voxels": int(p_val.size),
           "method": "temperature scaling (Guo et al. 2017), NLL on tune voxels near lesions; ECE on validation voxels "
                     f"within {NEAR_MM:g} mm of a true or predicted lesion, {N_BINS} equal-width bins"}
    path = Path(bundle_dir) / "model.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["calibration"] = cal
    write_text(path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return cal


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="bundle folder (its model.json is updated)")
    ap.add_argument("--tune", required=True, type=Path, help="cases to fit the temperature on")
    ap.add_argument("--val", required=True, type=Path, help="cases to measure ECE on")
    a = ap.parse_args(argv)
    print(json.dumps(calibrate(a.model, a.tune, a.val), indent=2))


if __name__ == "__main__":
    main()
