"""``unetsegment evaluate``: a model (and the HU-threshold baseline) against labelled cases.

A case is a folder with ``label.nii.gz`` and either ``image.nii.gz`` (one-channel models) or one
``<CHANNEL>.nii.gz`` per model channel. Definitions (lesions are 26-connected components, measured
with :func:`lesions.analyze_lesions`, the same code as the lesion table):

* Dice per case over all voxels, averaged over cases whose true lesion volume ≥ 1 mL;
* a true lesion is *detected* when any predicted voxel overlaps it; a *false lesion* is a predicted
  lesion that overlaps no true lesion;
* sensitivity per true-lesion volume bin (< 0.5, 0.5–5, > 5 mL) and for ≥ 0.5 mL overall;
* volume error per case = |predicted − true total| / true total (median over cases with lesions);
* centroid error (mm, RAS) and slice-index agreement between each detected true lesion and the
  predicted lesion overlapping it most;
* per true lesion: its *density* (median input intensity over the lesion eroded by one voxel — what
  a reader would measure, HU for CT) and its *lesion Dice* (against the union of the predicted
  lesions overlapping it; 0 when missed); sensitivity and median lesion Dice of lesions ≥ 0.5 mL per
  density bin (45–60 HU: early subacute, faint; 60–75; 75–90 HU: acute).

For models with compartments and context labels (``"lesion": false`` in ``model.json``, e.g.
ct-hemorrhage 2.x) the figures above are any-lesion figures: lesions are components of the lesion
labels together and the context (oedema) is no lesion, in the truth as in the prediction. Per class
besides: Dice (over cases with ≥ 1 mL of the class in the truth), the volume error (median over cases
with the class in the truth), per true compartment the sensitivity ≥ 0.5 mL (detected by any lesion
label) and the false lesions per scan by predicted compartment; and the compartment confusion over
detected true lesions ≥ 0.5 mL: a true lesion's compartment is its majority label, the predicted one
the majority predicted lesion label over the true lesion's voxels. The HU baseline predicts one
label, so it has the per-compartment sensitivity and false lesions only.

The baseline is what a user would do by hand in Segment Editor: threshold 50–90 HU inside a brain
mask (:func:`synth.brain_mask`: skull-enclosed soft tissue, eroded), drop components < 0.1 mL.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..engine.pipeline import segment
from ..errors import InputError
from ..image import Image
from ..io.readers import read_image
from ..models.bundle import Bundle
from ..params import SegmentParams
from ..settings import RunSettings, resolve
from .lesion_measures import label_mask
from .lesions import LesionTable, analyze_lesions, remove_small_lesions

BINS = (("<0.5 mL", 0.0, 0.5), ("0.5-5 mL", 0.5, 5.0), (">5 mL", 5.0, np.inf))
DENSITY_BINS = (("<45 HU", -np.inf, 45.0), ("45-60 HU", 45.0, 60.0), ("60-75 HU", 60.0, 75.0), ("75-90 HU", 75.0, 90.0),
                (">=90 HU", 90.0, np.inf))
BASELINE_HU = (50.0, 90.0)
BASELINE_MIN_ML = 0.1
DICE_MIN_TRUE_ML = 1.0


@dataclass
class CaseResult:
    case: str
    true_ml: float
    pred_ml: float
    dice: float
    true_lesions: list[dict] = field(default_factory=list)  # volume_ml, detected, centroid_err_mm, slice_agree
    false_lesions: int = 0
    seconds: float = 0.0
    #: models with several labels: per label value {true_ml, pred_ml, dice}; false lesions by predicted label
    classes: dict = field(default_factory=dict)
    false_by_class: dict = field(default_factory=dict)


def case_labels(cases_dir: Path) -> dict | None:
    """The cases' own label definitions (``labels.json`` beside the case folders, written by the cases
    module for generators with several labels: ``{"labels": {value: name}, "lesion_values": [...]}``), or None."""
    import json

    f = Path(cases_dir) / "labels.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
        return {"labels": {str(k): str(v) for k, v in d["labels"].items()},
                "lesion_values": tuple(int(v) for v in d["lesion_values"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{f} is not a label definition ({e})",
                         'write {"labels": {"1": "name", ...}, "lesion_values": [1, ...]} or remove it') from None


def find_cases(cases_dir: Path, channels: list[str]) -> list[Path]:
    cases = sorted(p for p in Path(cases_dir).iterdir() if (p / "label.nii.gz").is_file())
    if not cases:
        raise InputError(f"no case folders with label.nii.gz in {cases_dir}", "each case is a folder with label.nii.gz and its image(s)")
    return cases


def case_inputs(case: Path, channels: list[str]) -> list[Path]:
    if len(channels) == 1 and (case / "image.nii.gz").is_file():
        return [case / "image.nii.gz"]
    paths = [case / f"{c}.nii.gz" for c in channels]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"case {case.name} lacks {', '.join(missing)}", "add one <CHANNEL>.nii.gz per model channel")
    return paths


@dataclass(frozen=True)
class Reference:
    """The truth's side of :func:`score_case`, the same for every prediction scored against that truth
    (a sweep scores every pair against it): the lesion mask, its lesion table, the map of lesion
    numbers and each lesion's bounding box."""

    mask: Image
    table: LesionTable
    lesion_map: np.ndarray
    boxes: list[tuple[slice, ...]]


def reference_lesions(truth: Image, truth_lesion_values: tuple[int, ...] | None = None) -> Reference:
    """``truth``'s lesions as :func:`score_case` measures them (``truth_lesion_values`` as there)."""
    mask = truth.with_array(label_mask(truth.array, truth_lesion_values).astype(np.uint8))
    table, lesion_map = _lesions_and_map(mask)
    return Reference(mask, table, lesion_map, _label_boxes(lesion_map, table.n_lesions))


def _lesions_and_map(mask: Image) -> tuple[LesionTable, np.ndarray]:
    """26-connected lesions of a 0/1 mask and the int32 map of their row numbers (zeros without lesions)."""
    table = analyze_lesions(mask, connectivity=26, lesion_map=True)
    return table, table.lesion_map if table.lesion_map is not None else np.zeros(mask.array.shape, np.int32)


def score_case(name: str, truth: Image, pred: Image, seconds: float = 0.0, intensity: Image | None = None,
               label_values: tuple[int, ...] | None = None, lesion_values: tuple[int, ...] | None = None,
               predicts_classes: bool = True, truth_lesion_values: tuple[int, ...] | None = None,
               reference: Reference | None = None) -> CaseResult:
    """Compare two label maps on the same grid; with ``intensity``, each true lesion's density too
    (module docstring). Lesion voxels are those of ``lesion_values`` (None: any non-zero label); with
    ``label_values`` (a model with several labels) also the per-class figures and each true lesion's
    true and predicted compartment (``predicts_classes=False``, e.g. the one-label HU baseline: the
    true compartments only). ``truth_lesion_values``: the truth's lesion labels, as the cases declare
    them (``labels.json``, :func:`case_labels`); None: any non-zero truth voxel is lesion.
    ``reference``: :func:`reference_lesions` of ``truth`` and ``truth_lesion_values``, when the caller
    scores several predictions against one truth (else computed here)."""
    ref = reference or reference_lesions(truth, truth_lesion_values)
    t_lab, tt, tm = ref.mask, ref.table, ref.lesion_map
    p_lab = pred.with_array(label_mask(pred.array, lesion_values).astype(np.uint8))
    pt, pm = _lesions_and_map(p_lab)
    both = (tm > 0) & (pm > 0)
    nt, npd = tt.n_lesions, pt.n_lesions
    overlap = np.bincount(tm[both].astype(np.int64) * (npd + 1) + pm[both], minlength=(nt + 1) * (npd + 1)).reshape(nt + 1, npd + 1)
    a, b = t_lab.array > 0, p_lab.array > 0
    denom = int(a.sum()) + int(b.sum())
    dice = 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom
    lesions = []
    t_boxes, p_boxes = ref.boxes, _label_boxes(pm, npd)
    for row in tt.rows:
        n = row["lesion"]
        hits = overlap[n, 1:]
        ids = np.flatnonzero(hits) + 1
        # each lesion's figures on a box around it (and the predicted lesions it meets), not the whole volume:
        # the same values, as nothing outside the box is either lesion, at a small fraction of the cost
        box = _union_box([t_boxes[n - 1]] + [p_boxes[i - 1] for i in ids])
        true_n = tm[box] == n
        entry = {"volume_ml": row["volume_ml"], "detected": bool(hits.any()), "dice": _lesion_dice(true_n, np.isin(pm[box], ids))}
        if intensity is not None:
            entry["density"] = _density(intensity.array[box], true_n)
        if hits.any():
            m = pt.rows[int(np.argmax(hits))]
            entry["centroid_err_mm"] = float(np.linalg.norm(
                [row["centroid_r"] - m["centroid_r"], row["centroid_a"] - m["centroid_a"], row["centroid_s"] - m["centroid_s"]]))
            entry["slice_agree"] = abs(int(row["slice_index"]) - int(m["slice_index"])) <= 1
        lesions.append(entry)
    false = int((overlap[1:, 1:].sum(axis=0) == 0).sum()) if npd else 0
    result = CaseResult(name, tt.total_volume_ml, pt.total_volume_ml, dice, lesions, false, seconds)
    if label_values is not None and len(label_values) > 1:
        _score_classes(result, truth.array, pred.array, tm, pm, overlap, label_values, lesion_values or label_values,
                       truth_lesion_values or lesion_values or label_values, truth.voxel_volume_mm3 / 1000.0,
                       predicts_classes)
    return result


def _majority(values: np.ndarray, among: tuple[int, ...]) -> int | None:
    """The most frequent of ``among`` in ``values`` (ties: the lower value); None when none occurs."""
    counts = [int((values == v).sum()) for v in among]
    return among[int(np.argmax(counts))] if max(counts, default=0) > 0 else None


def _score_classes(r: CaseResult, truth: np.ndarray, pred: np.ndarray, tm: np.ndarray, pm: np.ndarray,
                   overlap: np.ndarray, label_values: tuple[int, ...], lesion_values: tuple[int, ...],
                   truth_lesion_values: tuple[int, ...], voxel_ml: float, predicts_classes: bool = True) -> None:
    """Per class: volumes and Dice; per true lesion: its true and predicted compartment; false lesions
    by their predicted compartment (module docstring)."""
    for v in label_values:
        a, b = truth == v, pred == v
        r.classes[int(v)] = {"true_ml": float(a.sum() * voxel_ml),
                             "pred_ml": float(b.sum() * voxel_ml) if predicts_classes else None,
                             "dice": _lesion_dice(a, b) if predicts_classes else None}
    for n, entry in enumerate(r.true_lesions, start=1):
        inside = tm == n
        entry["compartment_true"] = _majority(truth[inside], tuple(truth_lesion_values))
        entry["compartment_pred"] = (_majority(pred[inside], lesion_values)
                                     if entry["detected"] and predicts_classes else None)
    for n in np.flatnonzero(overlap[1:, 1:].sum(axis=0) == 0) + 1 if overlap.shape[1] > 1 else ():
        c = _majority(pred[pm == n], lesion_values) if predicts_classes else None
        r.false_by_class[c] = r.false_by_class.get(c, 0) + 1


def _label_boxes(lesion_map: np.ndarray, n: int) -> list[tuple[slice, ...]]:
    """Bounding box of each label 1…n of ``lesion_map`` (every label present: the map numbers its components)."""
    from scipy import ndimage

    return list(ndimage.find_objects(lesion_map, max_label=n)) if n else []


def _union_box(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The smallest box holding ``boxes``. A lesion's erosion (border 0) on a box holding it equals its
    erosion on the whole volume: nothing outside the box is lesion."""
    return tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(len(boxes[0])))


def _lesion_dice(true: np.ndarray, pred: np.ndarray) -> float:
    denom = int(true.sum()) + int(pred.sum())
    return 2.0 * int((true & pred).sum()) / denom if denom else 1.0


def _density(arr: np.ndarray, lesion: np.ndarray) -> float:
    """Median intensity over the lesion eroded by one voxel (all of it when erosion leaves nothing)."""
    from scipy import ndimage

    core = ndimage.binary_erosion(lesion)
    return float(np.median(arr[core if core.any() else lesion]))


def by_density(lesions: list[dict]) -> dict:
    """Sensitivity and median lesion Dice of the lesions ≥ 0.5 mL per density bin (lesions with a density)."""
    out = {}
    for name, lo, hi in DENSITY_BINS:
        sel = [l for l in lesions if l["volume_ml"] >= 0.5 and "density" in l and lo <= l["density"] < hi]
        out[name] = {"n": len(sel), "sensitivity": (sum(l["detected"] for l in sel) / len(sel)) if sel else None,
                     "lesion_dice_median": float(np.median([l["dice"] for l in sel])) if sel else None}
    return out


def hu_baseline(ct: Image) -> Image:
    """50–90 HU inside the brain mask, components < 0.1 mL removed."""
    from ..synth import brain_mask

    arr = ct.array
    lab = ((arr >= BASELINE_HU[0]) & (arr <= BASELINE_HU[1]) & brain_mask(ct)).astype(np.uint8)
    return remove_small_lesions(ct.with_array(lab), BASELINE_MIN_ML, 26)


def summarize(results: list[CaseResult]) -> dict:
    dice = [r.dice for r in results if r.true_ml >= DICE_MIN_TRUE_ML]
    all_true = [l for r in results for l in r.true_lesions]
    sens = {}
    for name, lo, hi in BINS:
        sel = [l for l in all_true if lo <= l["volume_ml"] < hi]
        sens[name] = {"sensitivity": (sum(l["detected"] for l in sel) / len(sel)) if sel else None, "n": len(sel)}
    big = [l for l in all_true if l["volume_ml"] >= 0.5]
    vol_err = [abs(r.pred_ml - r.true_ml) / r.true_ml for r in results if r.true_ml > 0]
    matched = [l for l in all_true if l["detected"]]
    return {
        "n_cases": len(results),
        "n_cases_dice": len(dice),
        "dice_mean": float(np.mean(dice)) if dice else None,
        "dice_median": float(np.median(dice)) if dice else None,
        "sensitivity_by_volume": sens,
        "sensitivity_ge_0.5ml": (sum(l["detected"] for l in big) / len(big)) if big else None,
        "n_true_lesions_ge_0.5ml": len(big),
        "false_lesions_per_scan": float(np.mean([r.false_lesions for r in results])) if results else None,
        "volume_error_median": float(np.median(vol_err)) if vol_err else None,
        "centroid_error_mm_median": float(np.median([l["centroid_err_mm"] for l in matched])) if matched else None,
        "slice_agreement": (sum(l["slice_agree"] for l in matched) / len(matched)) if matched else None,
        "seconds_per_case": float(np.mean([r.seconds for r in results])) if results else None,
        "by_density": by_density(all_true),
        **({"per_class": per_class(results)} if any(r.classes for r in results) else {}),
    }


def per_class(results: list[CaseResult]) -> dict:
    """Per label value: Dice, volume error, sensitivity ≥ 0.5 mL by true compartment, false lesions per
    scan by predicted compartment; and the compartment confusion of detected true lesions ≥ 0.5 mL
    (``confusion[true][predicted]`` counts, ``compartment_accuracy`` their diagonal share)."""
    values = sorted({v for r in results for v in r.classes})
    lesions = [l for r in results for l in r.true_lesions if l["volume_ml"] >= 0.5 and "compartment_true" in l]
    out: dict = {"classes": {}}
    predicted = any(c["dice"] is not None for r in results for c in r.classes.values())
    for v in values:
        dice = [r.classes[v]["dice"] for r in results
                if v in r.classes and r.classes[v]["true_ml"] >= DICE_MIN_TRUE_ML and r.classes[v]["dice"] is not None]
        err = [abs(r.classes[v]["pred_ml"] - r.classes[v]["true_ml"]) / r.classes[v]["true_ml"]
               for r in results if v in r.classes and r.classes[v]["true_ml"] > 0 and r.classes[v]["pred_ml"] is not None]
        mine = [l for l in lesions if l["compartment_true"] == v]
        out["classes"][str(v)] = {
            "dice_mean": float(np.mean(dice)) if dice else None, "n_cases_dice": len(dice),
            "volume_error_median": float(np.median(err)) if err else None,
            "sensitivity_ge_0.5ml": (sum(l["detected"] for l in mine) / len(mine)) if mine else None,
            "n_true_lesions_ge_0.5ml": len(mine),
            "false_lesions_per_scan": (float(np.mean([r.false_by_class.get(v, 0) for r in results]))
                                       if results and predicted else None),
        }
    detected = [l for l in lesions if l["detected"] and l["compartment_pred"] is not None]
    confusion: dict = {}
    for l in detected:
        row = confusion.setdefault(str(l["compartment_true"]), {})
        row[str(l["compartment_pred"])] = row.get(str(l["compartment_pred"]), 0) + 1
    out["confusion"] = confusion
    out["compartment_accuracy"] = (sum(l["compartment_true"] == l["compartment_pred"] for l in detected) / len(detected)
                                   if detected else None)
    out["n_detected_lesions_ge_0.5ml"] = len(detected)
    return out


def _settings(bundle: Bundle, params: SegmentParams | None) -> RunSettings:
    """The run settings every case of an evaluation uses (resolved once; default: no heatmaps)."""
    return resolve(params or SegmentParams(heatmaps=()), bundle)


def read_case(case: Path, channels: list[str]) -> tuple[list[Image], Image]:
    """A case folder's input images (in ``channels`` order) and its truth, which must share their grid."""
    images = [read_image(p) for p in case_inputs(case, channels)]
    truth = read_image(case / "label.nii.gz")
    if not truth.same_grid(images[0], atol=1e-4):
        raise InputError(f"case {case.name}: label.nii.gz is not on the image's grid", "write the label on the image's grid")
    return images, truth


def evaluate(bundle: Bundle, cases_dir: Path, params: SegmentParams | None = None, baseline: bool = True,
             progress: Callable[[str], None] | None = None) -> dict:
    s = _settings(bundle, params)
    cases = find_cases(cases_dir, bundle.channel_names)
    network = bundle.build_network()
    lesion = s.model.lesion_values
    defined = case_labels(cases_dir)
    truth_lesion = defined["lesion_values"] if defined else None
    # per-class figures only where the cases declare their labels (else a label's meaning is unknown)
    classes = s.model.label_values if len(s.model.label_values) > 1 and defined else None
    model_results, base_results = [], []
    for i, case in enumerate(cases):
        images, truth = read_case(case, bundle.channel_names)
        t = time.perf_counter()
        res = segment(images, bundle, network=network, settings=s)
        pred = remove_small_lesions(res.labels, s.min_lesion_ml, s.connectivity, lesion)
        model_results.append(score_case(case.name, truth, pred, time.perf_counter() - t, intensity=images[0],
                                        label_values=classes, lesion_values=lesion, truth_lesion_values=truth_lesion))
        if baseline and bundle.meta["inputs"][0]["modality"].upper() == "CT":
            t = time.perf_counter()
            base_results.append(score_case(case.name, truth, hu_baseline(images[0]), time.perf_counter() - t,
                                           intensity=images[0], label_values=classes, lesion_values=(1,),
                                           predicts_classes=False, truth_lesion_values=truth_lesion or lesion))
        if progress:
            r = model_results[-1]
            progress(f"[{i + 1}/{len(cases)}] {case.name}: Dice {r.dice:.3f}, true {r.true_ml:.2f} mL, predicted {r.pred_ml:.2f} mL, "
                     f"{r.false_lesions} false lesion(s)")
    out = {"model": {"name": bundle.name, "version": bundle.version}, "cases_dir": str(cases_dir),
           "labels": {str(l["value"]): l["name"] for l in bundle.labels},
           "definitions": __doc__.split("Definitions", 1)[1].strip(), "model_metrics": summarize(model_results),
           "per_case": [r.__dict__ for r in model_results]}
    if base_results:
        out["baseline"] = {"name": f"HU threshold {BASELINE_HU[0]:g}–{BASELINE_HU[1]:g} inside brain mask, components < {BASELINE_MIN_ML} mL removed",
                           "metrics": summarize(base_results), "per_case": [r.__dict__ for r in base_results]}
    return out


def sweep_postprocessing(bundle: Bundle, cases_dir: Path, min_sizes: list[float], thresholds: list[float] | None = None,
                         params: SegmentParams | None = None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """The model's figures for each pair of threshold (default: the bundle's) and smallest-lesion size
    (one inference per case; each threshold applied to the run's probability maps by
    :func:`.rethreshold.labels_at_threshold`, the live threshold's rule, which equals a fresh run there).

    For choosing the bundle's ``threshold`` and ``min_lesion_ml`` on *tuning* cases (``--split tune`` or
    ``--extra-tune NAME`` of the training cases module: validation settings, other seeds), never on the
    cases the model card reports. A value given twice is scored once."""
    from .rethreshold import labels_at_threshold

    s = _settings(bundle, params)
    thresholds = list(dict.fromkeys(thresholds or [s.threshold]))
    min_sizes = list(dict.fromkeys(min_sizes))
    cases = find_cases(cases_dir, bundle.channel_names)
    network = bundle.build_network()
    defined = case_labels(cases_dir)
    truth_lesion = defined["lesion_values"] if defined else None
    lesion = s.model.lesion_values
    per: dict[tuple[float, float], list[CaseResult]] = {(t, m): [] for t in thresholds for m in min_sizes}
    for i, case in enumerate(cases):
        images, truth = read_case(case, bundle.channel_names)
        res = segment(images, bundle, network=network, settings=s)
        ref = reference_lesions(truth, truth_lesion)  # the truth's side once per case, not once per pair
        for t in thresholds:
            raw = labels_at_threshold(res.probability, t, s.model.label_values, res.labels, lesion, res.class_probabilities)
            for m in min_sizes:
                per[(t, m)].append(score_case(case.name, truth, remove_small_lesions(raw, m, s.connectivity, lesion),
                                              intensity=images[0], lesion_values=lesion, truth_lesion_values=truth_lesion,
                                              reference=ref))
        if progress:
            progress(f"[{i + 1}/{len(cases)}] {case.name}")
    return [{"threshold": t, "min_lesion_ml": m, **summarize(per[(t, m)])} for t in thresholds for m in min_sizes]


def choose_min_lesion(rows: list[dict], max_false_per_scan: float = 0.2, min_sensitivity: float = 0.95) -> float | None:
    """The smallest size whose false lesions per scan ≤ ``max_false_per_scan`` while the sensitivity for
    lesions ≥ 0.5 mL stays ≥ ``min_sensitivity`` (the default-model targets); where none meets both,
    the size with the fewest false lesions among those keeping the sensitivity (sensitivity first:
    a missed bleed costs more than a false one); None if no size keeps it."""
    ok = [r for r in sorted(rows, key=lambda r: r["min_lesion_ml"])
          if r["sensitivity_ge_0.5ml"] is None or r["sensitivity_ge_0.5ml"] >= min_sensitivity]
    for r in ok:
        if r["false_lesions_per_scan"] <= max_false_per_scan:
            return float(r["min_lesion_ml"])
    return float(min(ok, key=lambda r: r["false_lesions_per_scan"])["min_lesion_ml"]) if ok else None


def choose_operating_point(rows: list[dict], max_false_per_scan: float = 0.2,
                           min_sensitivity: float = 0.95) -> tuple[float, float] | None:
    """(threshold, smallest-lesion size) from a :func:`sweep_postprocessing` table: per threshold the size
    :func:`choose_min_lesion` picks; of those, the ones meeting both targets first, then the most
    sensitive, then the highest Dice; where none meets both, the fewest false lesions among those keeping
    the sensitivity (ties: the most sensitive, then the best Dice). None if no pair keeps it. With one
    threshold: that threshold's size."""
    picks = []
    for t in dict.fromkeys(r["threshold"] for r in rows):
        at_t = [r for r in rows if r["threshold"] == t]
        m = choose_min_lesion(at_t, max_false_per_scan, min_sensitivity)
        if m is not None:
            picks.append(next(r for r in at_t if r["min_lesion_ml"] == m))
    if not picks:
        return None
    sens = lambda r: 1.0 if r["sensitivity_ge_0.5ml"] is None else r["sensitivity_ge_0.5ml"]  # noqa: E731
    meeting = [r for r in picks if r["false_lesions_per_scan"] <= max_false_per_scan]
    best = (max(meeting, key=lambda r: (sens(r), r["dice_mean"] or 0.0)) if meeting
            else min(picks, key=lambda r: (r["false_lesions_per_scan"], -sens(r), -(r["dice_mean"] or 0.0))))
    return float(best["threshold"]), float(best["min_lesion_ml"])


def format_sweep(rows: list[dict]) -> str:
    """The sweep as a table; per density bin holding lesions, how many of its lesions ≥ 0.5 mL were found."""
    bins = [name for name, _, _ in DENSITY_BINS if any(r["by_density"][name]["n"] for r in rows)]
    head = f"{'threshold':>10}{'min mL':>8}{'Dice':>8}{'sens ≥0.5':>11}{'false/scan':>12}{'vol err':>9}"
    lines = [head + "".join(f"{b:>12}" for b in bins)]
    for r in rows:
        found = []
        for b in bins:
            d = r["by_density"][b]
            found.append(f"{round((d['sensitivity'] or 0.0) * d['n'])}/{d['n']}" if d["n"] else "–")
        lines.append(f"{r['threshold']:>10g}{r['min_lesion_ml']:>8g}{r['dice_mean'] or 0:>8.3f}{r['sensitivity_ge_0.5ml'] or 0:>11.3f}"
                     f"{r['false_lesions_per_scan']:>12.2f}{r['volume_error_median'] or 0:>9.1%}" + "".join(f"{v:>12}" for v in found))
    return "\n".join(lines)


def format_table(result: dict) -> str:
    rows = [("Dice (cases ≥ 1 mL)", "dice_mean", "{:.3f}"), ("sensitivity ≥ 0.5 mL", "sensitivity_ge_0.5ml", "{:.3f}"),
            ("false lesions / scan", "false_lesions_per_scan", "{:.2f}"), ("volume error (median)", "volume_error_median", "{:.1%}"),
            ("centroid error mm (median)", "centroid_error_mm_median", "{:.2f}"), ("slice agreement (±1)", "slice_agreement", "{:.3f}")]
    m = result["model_metrics"]
    b = result.get("baseline", {}).get("metrics")
    lines = [f"{'metric':<28}{result['model']['name']:>16}" + (f"{'HU baseline':>16}" if b else "")]
    for label, key, fmt in rows:
        def f(d):
            v = d.get(key)
            return "—" if v is None else fmt.format(v)
        lines.append(f"{label:<28}{f(m):>16}" + (f"{f(b):>16}" if b else ""))
    for name, _, _ in BINS:
        s = m["sensitivity_by_volume"][name]
        sb = b["sensitivity_by_volume"][name] if b else None
        fmt = lambda d: "—" if d["sensitivity"] is None else f"{d['sensitivity']:.3f} (n={d['n']})"  # noqa: E731
        lines.append(f"{'sensitivity ' + name:<28}{fmt(s):>16}" + (f"{fmt(sb):>16}" if b else ""))
    for name, _, _ in DENSITY_BINS:
        d, db = m["by_density"][name], b["by_density"][name] if b else None
        if not d["n"]:
            continue
        fmt = lambda d: "—" if d["sensitivity"] is None else f"{d['sensitivity']:.2f}/{d['lesion_dice_median']:.2f} (n={d['n']})"  # noqa: E731
        lines.append(f"{'sens/Dice ≥0.5 mL ' + name:<28}{fmt(d):>16}" + (f"{fmt(db):>16}" if b else ""))
    lines.append(f"{m['n_cases']} cases, {m['n_cases_dice']} with ≥ 1 mL of lesion")
    if "per_class" in m:
        lines.append(format_classes(result))
    return "\n".join(lines)


def format_classes(result: dict) -> str:
    """The per-class table (model, and the baseline's per-compartment sensitivity) and the confusion table."""
    names = result.get("labels", {})
    m = result["model_metrics"]["per_class"]
    b = result.get("baseline", {}).get("metrics", {}).get("per_class")
    f = lambda v, fmt: "—" if v is None else fmt.format(v)  # noqa: E731
    lines = ["", f"{'class':<30}{'Dice':>8}{'vol err':>9}{'sens ≥0.5':>11}{'n':>5}{'false/scan':>12}"
             + (f"{'baseline sens':>15}" if b else "")]
    for v, c in m["classes"].items():
        lines.append(f"{names.get(v, v):<30}{f(c['dice_mean'], '{:.3f}'):>8}{f(c['volume_error_median'], '{:.1%}'):>9}"
                     f"{f(c['sensitivity_ge_0.5ml'], '{:.3f}'):>11}{c['n_true_lesions_ge_0.5ml']:>5}"
                     f"{f(c['false_lesions_per_scan'], '{:.2f}'):>12}"
                     + (f"{f(b['classes'].get(v, {}).get('sensitivity_ge_0.5ml'), '{:.3f}'):>15}" if b else ""))
    lesion_classes = [v for v in m["classes"] if v in m["confusion"] or any(v in row for row in m["confusion"].values())]
    lines.append("")
    lines.append("compartment confusion (detected true lesions ≥ 0.5 mL; rows: true, columns: predicted)")
    short = {v: names.get(v, v).split()[0][:14] for v in lesion_classes}
    lines.append(f"{'':<16}" + "".join(f"{short[v]:>16}" for v in lesion_classes))
    for t in lesion_classes:
        row = m["confusion"].get(t, {})
        lines.append(f"{short[t]:<16}" + "".join(f"{row.get(p, 0):>16}" for p in lesion_classes))
    lines.append(f"compartment correct: {f(m['compartment_accuracy'], '{:.3f}')} of {m['n_detected_lesions_ge_0.5ml']}")
    return "\n".join(lines)


def write_result(result: dict, path: Path) -> None:
    from ..io.writers import write_json

    write_json(result, path)


def main_evaluate(model: str, cases: Path, out_json: Path | None, params: SegmentParams, baseline: bool = True,
                  min_lesion_sweep: list[float] | None = None, threshold_sweep: list[float] | None = None) -> dict:
    from ..models.bundle import load_bundle

    if min_lesion_sweep or threshold_sweep:
        bundle = load_bundle(model)
        sizes = min_lesion_sweep or [_settings(bundle, params).min_lesion_ml]
        rows = sweep_postprocessing(bundle, cases, sizes, threshold_sweep, params, progress=print)
        print(format_sweep(rows))
        chosen = choose_operating_point(rows)
        print("chosen (per threshold the smallest size with ≤ 0.2 false lesions/scan and sensitivity ≥ 0.95 for lesions "
              "≥ 0.5 mL, else the fewest false lesions keeping that sensitivity; of those pairs, the ones with ≤ 0.2 false "
              "lesions/scan, the most sensitive, then the best Dice; if none has, the fewest false lesions): "
              + ("none" if chosen is None else f"threshold {chosen[0]:g}, {chosen[1]:g} mL"))
        result = {"sweep": rows, "chosen": None if chosen is None else {"threshold": chosen[0], "min_lesion_ml": chosen[1]}}
        if out_json:
            write_result(result, out_json)
            print(f"wrote {out_json}")
        return result

    result = evaluate(load_bundle(model), cases, params, baseline, progress=print)
    print(format_table(result))
    if out_json:
        write_result(result, out_json)
        print(f"wrote {out_json}")
    return result
