"""Temperature scaling (Guo et al. 2017) of a bundle, fitted on the tune cases, measured on validation.

The probability map drives the live threshold and the uncertainty, so it should mean what it says.
Expected calibration error (ECE: 15 equal-width bins of the foreground probability, the |mean
probability − lesion fraction| of each bin weighted by its share of voxels) is measured on the voxels
*near lesions* — within ``NEAR_MM`` of a true or a predicted lesion, where the decision is made (far
from any lesion nearly every voxel is a confident, correct 0 and would hide miscalibration).

One scalar ``T`` divides the logits, of every class alike. Dividing the logits by ``T`` raises each
class probability to ``1/T`` before renormalising (``softmax(z/T)_c ∝ p_c^(1/T)``), so ``T`` is fitted
on the probability maps the engine writes, with no second network pass: the minimiser of the
negative log-likelihood of the true class on the tune voxels (bounded scalar search over 0.25–8). For a
two-class model this is ``σ(logit(p) / T)``; for a multi-class bundle (bleed compartments plus
oedema) the likelihood is that of the true class among all of them, and the ECE is measured on what
the threshold reads, P(lesion) (the sum of the lesion classes) against "the truth is a lesion class".
``T`` is stored in ``model.json`` (``calibration``) only when it lowers the validation ECE; the
before/after figures are stored either way and shown in the card.

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
from ...settings import ModelSettings, resolve
from ..bundle import Bundle, load_bundle
from ...analysis.evaluate import case_inputs, case_labels, find_cases

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
    """Probabilities at another temperature. A 1-D ``p`` is a two-class foreground probability:
    ``σ(logit(p) / T)``. An (N, C) ``p`` holds every class's probability (background first):
    ``p^(1/T)`` renormalised over the classes, which is ``softmax(z / T)`` for the logits ``z``."""
    p = np.asarray(p, np.float64)
    if p.ndim == 1:
        z = np.log(np.clip(p, EPS, 1 - EPS)) - np.log1p(-np.clip(p, EPS, 1 - EPS))
        return 1.0 / (1.0 + np.exp(-z / temperature))
    logq = np.log(np.clip(p, EPS, 1.0)) / temperature  # as the 1-D form: floored map values still depend on T
    logq -= logq.max(axis=1, keepdims=True)
    q = np.exp(logq)
    return q / q.sum(axis=1, keepdims=True)


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of the outcomes under :func:`scaled`:
    ``y`` is 0/1 for a 1-D ``p``, the true class's column index for an (N, C) ``p``."""
    p = np.asarray(p, np.float64)
    y = np.asarray(y)
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        q = np.clip(scaled(p, float(np.exp(log_t))), EPS, 1 - EPS)
        if p.ndim == 1:
            yf = y.astype(np.float64)
            return float(-np.mean(yf * np.log(q) + (1 - yf) * np.log1p(-q)))
        return float(-np.mean(np.log(q[rows, y])))

    res = optimize.minimize_scalar(nll, bounds=(np.log(0.25), np.log(8.0)), method="bounded")
    return float(np.exp(res.x))


def truth_channels(truth: np.ndarray, label_values: tuple[int, ...]) -> np.ndarray:
    """The output channel of each true voxel (0 background, ``c`` for ``label_values[c - 1]``). A
    one-label model reads any non-zero truth as its label, as :mod:`...analysis.evaluate` does."""
    if len(label_values) == 1:
        return (truth > 0).astype(np.int64)
    lookup = {0: 0, **{v: c for c, v in enumerate(label_values, start=1)}}
    unknown = sorted(set(np.unique(truth).tolist()) - set(lookup))
    if unknown:
        raise UsageError(f"the truth holds label values {unknown} that the model does not predict",
                         f"calibrate on cases labelled with the model's values {list(label_values)}")
    lut = np.zeros(max(lookup) + 1, np.int64)
    for v, c in lookup.items():
        lut[v] = c
    return lut[truth]


def check_case_labels(cases_dir: Path, label_values: tuple[int, ...]) -> None:
    """A multi-class fit needs cases whose label values mean the model's labels: the cases must declare
    them (``labels.json``, as :func:`...analysis.evaluate.case_labels` reads it) with the same values."""
    if len(label_values) == 1:
        return
    defined = case_labels(cases_dir)
    if defined is None:
        raise UsageError(f"{cases_dir} does not declare its labels (labels.json), so its truth cannot be read per class",
                         "calibrate on cases written by the training cases module for this model's generator")
    declared = tuple(sorted(int(v) for v in defined["labels"]))
    if declared != tuple(sorted(label_values)):
        raise UsageError(f"{cases_dir} declares labels {list(declared)}, the model predicts {list(label_values)}",
                         "calibrate on cases of the model's own generator")


def near_lesion_voxels(bundle: Bundle, cases_dir: Path, log=print) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (N, C), background first; true channel (N,)) of the voxels within
    ``NEAR_MM`` of a true or predicted lesion, all cases, with the model as shipped but *uncalibrated*
    (temperature 1). Lesion means the lesion labels (not context such as oedema)."""
    meta = {**bundle.meta, "calibration": {"temperature": 1.0}}
    s = resolve(SegmentParams(heatmaps=()), meta)
    network = bundle.build_network()
    lesion_channels = np.asarray(s.model.lesion_channels)
    check_case_labels(cases_dir, s.model.label_values)
    ps, ys = [], []
    for case in find_cases(cases_dir, bundle.channel_names):
        images = [read_image(p) for p in case_inputs(case, bundle.channel_names)]
        y = truth_channels(np.asarray(read_image(case / "label.nii.gz").array).astype(np.int64), s.model.label_values)
        res = segment(images, bundle, network=network, settings=s)
        predicted = res.probability.array >= s.threshold
        near = ndimage.distance_transform_edt(~(np.isin(y, lesion_channels) | predicted),
                                              sampling=images[0].spacing[::-1]) <= NEAR_MM
        cls = np.stack([res.class_probabilities[v].array[near] for v in s.model.label_values], axis=1).astype(np.float32)
        ps.append(np.concatenate([np.clip(1.0 - cls.sum(1, keepdims=True), 0.0, 1.0), cls], axis=1))
        ys.append(y[near].astype(np.int8))
        log(f"{case.name}: {int(near.sum())} voxels near lesions")
    return np.concatenate(ps), np.concatenate(ys).astype(np.int64)


def lesion_ece(p: np.ndarray, y: np.ndarray, lesion_channels: tuple[int, ...]) -> float:
    """ECE of P(lesion) (the lesion channels of the (N, C) ``p`` summed) against "the true channel is a
    lesion channel": the calibration of what the threshold and the heatmaps read."""
    ch = np.asarray(lesion_channels)
    return ece(np.clip(p[:, ch].sum(1), 0.0, 1.0), np.isin(y, ch))


def calibrate(bundle_dir: Path, tune: Path, val: Path, log=print) -> dict:
    """Fit on ``tune``, measure on ``val``, write ``calibration`` into the bundle's model.json; returns it."""
    bundle = load_bundle(bundle_dir)
    lesion = ModelSettings.from_meta(bundle.meta).lesion_channels
    p_tune, y_tune = near_lesion_voxels(bundle, tune, log)
    t = fit_temperature(p_tune, y_tune)
    p_val, y_val = near_lesion_voxels(bundle, val, log)
    before, after = lesion_ece(p_val, y_val, lesion), lesion_ece(scaled(p_val, t), y_val, lesion)
    cal = {"temperature": round(t, 4) if after < before else 1.0, "fitted_temperature": round(t, 4),
           "ece_before": round(before, 4), "ece_after": round(after, 4), "near_mm": NEAR_MM, "bins": N_BINS,
           "tune_voxels": len(p_tune), "val_voxels": len(p_val),
           "method": "temperature scaling (Guo et al. 2017), NLL of the true class on tune voxels near lesions; ECE of "
                     f"P(lesion) on validation voxels within {NEAR_MM:g} mm of a true or predicted lesion, {N_BINS} equal-width bins"}
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
