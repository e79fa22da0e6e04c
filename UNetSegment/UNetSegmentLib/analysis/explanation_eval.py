"""Do the heatmaps point at the lesions, and are they faithful? Measured on labelled cases.

Definitions (``tol`` = 2 voxels, Euclidean distance on the voxel grid; ``radius`` = 20 mm):

* **per-lesion pointing** — for every *predicted* lesion ≥ 0.5 mL (26-connected), the heatmap's maximum
  over the voxels within ``radius`` of it (voxels nearer another predicted lesion belong to that one)
  lies inside the lesion or within ``tol`` of it; the share of such lesions;
* **mass near true lesions** — per positive case, the share of the heatmap's total mass within
  ``tol`` of a *true* lesion; the median over positive cases;
* **volume pointing game** — per positive case, the whole map's maximum lies within ``tol`` of a true
  lesion; the share of positive cases;
* **deletion curve** (Petsiuk et al. 2018, "RISE") — per predicted lesion ≥ 0.5 mL, in its bounding
  box plus ``radius``: replace the top 5/10/20 % of the heatmap's voxels by the median of the healthy
  brain (brain-mask voxels ≥ 10 mm from any predicted lesion) and re-run the model on the region
  (plus context): the lesion's mean probability should fall more than when the same number of randomly
  chosen voxels of the region are replaced (mean of ``n_random`` draws). Reported as the mean
  probability per fraction for both, and the share of lesions whose heatmap deletion beats random.

``python -m UNetSegmentLib.analysis.explanation_eval --model ct-hemorrhage --cases DIR --output F.json
[--layer L --cam-method M] [--deletion]`` writes all of it (cases as ``unetsegment evaluate`` reads them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..engine.pipeline import segment
from ..engine.roi import crop
from ..image import Image
from ..io.readers import read_image
from ..models.bundle import Bundle, load_bundle
from ..params import SegmentParams
from ..settings import RunSettings, resolve
from .evaluate import case_inputs, case_labels, find_cases
from .lesion_measures import label_mask
from .lesions import remove_small_lesions

TOL_VOXELS = 2.0
RADIUS_MM = 20.0
MIN_LESION_ML = 0.5
FRACTIONS = (0.05, 0.10, 0.20)


def lesion_components(mask: np.ndarray, spacing_kji: np.ndarray, min_ml: float = MIN_LESION_ML) -> tuple[np.ndarray, list[int]]:
    """26-connected components of ``mask`` and the ids of those ≥ ``min_ml``."""
    lab, n = ndimage.label(mask, np.ones((3, 3, 3), bool))
    ml = np.bincount(lab.ravel(), minlength=n + 1)[1:] * float(np.prod(spacing_kji)) / 1000.0
    return lab, [i + 1 for i in range(n) if ml[i] >= min_ml]


def pointing(heat: np.ndarray, pred: np.ndarray, truth: np.ndarray, spacing_kji: np.ndarray) -> dict:
    """Per-lesion pointing hits, mass near true lesions and the volume pointing game of one case."""
    spacing_kji = np.asarray(spacing_kji, float)
    lab, big = lesion_components(pred > 0, spacing_kji)
    hits: list[bool] = []
    if big:
        dist_mm, (ik, ij, ii) = ndimage.distance_transform_edt(lab == 0, sampling=spacing_kji, return_indices=True)
        owner = lab[ik, ij, ii]  # each voxel's nearest predicted lesion
        near_vox = ndimage.distance_transform_edt(lab == 0)
        for n in big:
            region = (owner == n) & (dist_mm <= RADIUS_MM)
            at = np.unravel_index(np.argmax(np.where(region, heat, -np.inf)), heat.shape)
            hits.append(bool(owner[at] == n and near_vox[at] <= TOL_VOXELS))
    out: dict = {"lesion_hits": hits}
    if truth.any() and heat.max() > 0:
        near_truth = ndimage.distance_transform_edt(~truth) <= TOL_VOXELS
        out["mass_near_truth"] = float(heat[near_truth].sum() / heat.sum())
        out["volume_pointing"] = bool(near_truth[np.unravel_index(np.argmax(heat), heat.shape)])
    return out


def healthy_brain_median(ct: Image, pred: np.ndarray) -> float:
    """Median of the brain voxels ≥ 10 mm from every predicted lesion (HU for CT)."""
    from ..synth import brain_mask

    far = ndimage.distance_transform_edt(pred == 0, sampling=ct.spacing[::-1]) >= 10.0
    return float(np.median(ct.array[brain_mask(ct) & far]))


def deletion(images: list[Image], bundle: Bundle, settings: RunSettings, network, heat: np.ndarray, pred: np.ndarray,
             fill: float, rng: np.random.Generator, n_random: int = 3) -> list[dict]:
    """Deletion curves of the predicted lesions ≥ 0.5 mL of one case (module docstring)."""
    sp = images[0].spacing[::-1].astype(float)
    lab, big = lesion_components(pred > 0, sp)
    boxes = ndimage.find_objects(lab)
    curves = []
    for n in big:
        region_box = _grow(boxes[n - 1], RADIUS_MM, sp, lab.shape)
        context_box = _grow(boxes[n - 1], RADIUS_MM + 16.0, sp, lab.shape, extra_slices=2)
        local = tuple(slice(r.start - c.start, r.stop - c.start) for r, c in zip(region_box, context_box))
        lesion = (lab[context_box] == n)
        heat_r = heat[region_box]
        order = np.argsort(-heat_r, axis=None, kind="stable")

        def p_after(flat_idx: np.ndarray) -> float:
            arr = np.array(images[0].array[context_box], np.float32, copy=True)
            reg = arr[local].reshape(-1)
            reg[flat_idx] = fill
            arr[local] = reg.reshape(heat_r.shape)
            parts = [crop(im, context_box) for im in images]
            parts[0] = parts[0].with_array(arr)
            res = segment(parts, bundle, network=network, settings=settings)
            return float(res.probability.array[lesion].mean())

        base = p_after(np.zeros(0, np.int64))
        row = {"lesion_ml": float(lesion.sum() * np.prod(sp) / 1000.0), "p0": base, "heatmap": [], "random": []}
        for q in FRACTIONS:
            k = max(1, int(round(q * heat_r.size)))
            row["heatmap"].append(p_after(order[:k]))
            row["random"].append(float(np.mean([p_after(rng.choice(heat_r.size, k, replace=False)) for _ in range(n_random)])))
        curves.append(row)
    return curves


def _grow(box: tuple[slice, ...], mm: float, sp: np.ndarray, shape, extra_slices: int = 0) -> tuple[slice, ...]:
    out = []
    for ax, (s, n) in enumerate(zip(box, shape)):
        m = int(np.ceil(mm / sp[ax])) if ax > 0 else int(np.ceil(mm / sp[ax])) + extra_slices
        out.append(slice(max(0, s.start - m), min(n, s.stop + m)))
    return tuple(out)


def evaluate_explanations(bundle: Bundle, cases_dir: Path, params: SegmentParams, with_deletion: bool = False,
                          progress=print) -> dict:
    """The module docstring's measures over every case of ``cases_dir`` for the heatmap ``params`` ask for."""
    s = resolve(dataclasses.replace(params, heatmaps=("gradcam",)), bundle)
    plain = resolve(SegmentParams(heatmaps=(), allow_unusual_input=True), bundle)  # crops have no whole skull
    network = bundle.build_network()
    rng = np.random.default_rng(0)
    per_case, ratios = [], []
    defined = case_labels(cases_dir)  # compartment cases: which truth labels are lesions (not the oedema)
    truth_lesion = defined["lesion_values"] if defined else None
    lesion = s.model.lesion_values
    for i, case in enumerate(find_cases(cases_dir, bundle.channel_names)):
        images = [read_image(p) for p in case_inputs(case, bundle.channel_names)]
        truth = label_mask(read_image(case / "label.nii.gz").array, truth_lesion)
        t = time.perf_counter()
        res = segment(images, bundle, network=network, settings=s)
        pred = label_mask(remove_small_lesions(res.labels, s.min_lesion_ml, s.connectivity, lesion).array, lesion)
        heat = res.heatmaps["gradcam"].array
        row = {"case": case.name, **pointing(heat, pred, truth, images[0].spacing[::-1])}
        ratios.append(res.timings["gradcam_s"] / res.timings["inference_s"])
        if with_deletion and pred.any():
            row["deletion"] = deletion(images, bundle, plain, network, heat, pred, healthy_brain_median(images[0], pred), rng)
        per_case.append(row)
        progress(f"[{i + 1}] {case.name}: hits {row['lesion_hits']}, mass {row.get('mass_near_truth', float('nan')):.2f} "
                 f"({time.perf_counter() - t:.1f} s)")
    return {"model": {"name": bundle.name, "version": bundle.version}, "layer": res.extra.get("gradcam_layer"),
            "cam_method": s.cam_method, "summary": summarize(per_case, ratios), "per_case": per_case,
            "definitions": __doc__.split("Definitions", 1)[1].split("``python -m", 1)[0].strip()}


def summarize(per_case: list[dict], cost_ratios: list[float]) -> dict:
    hits = [h for r in per_case for h in r["lesion_hits"]]
    mass = [r["mass_near_truth"] for r in per_case if "mass_near_truth" in r]
    game = [r["volume_pointing"] for r in per_case if "volume_pointing" in r]
    out = {"predicted_lesions_ge_0.5ml": len(hits), "per_lesion_pointing": float(np.mean(hits)) if hits else None,
           "positive_cases": len(mass), "mass_near_truth_median": float(np.median(mass)) if mass else None,
           "volume_pointing_game": float(np.mean(game)) if game else None,
           "gradcam_over_inference_median": float(np.median(cost_ratios)) if cost_ratios else None}
    curves = [c for r in per_case for c in r.get("deletion", [])]
    if curves:
        out["deletion"] = {
            "fractions": list(FRACTIONS), "lesions": len(curves),
            "p0_mean": float(np.mean([c["p0"] for c in curves])),
            "heatmap_mean": [float(np.mean([c["heatmap"][i] for c in curves])) for i in range(len(FRACTIONS))],
            "random_mean": [float(np.mean([c["random"][i] for c in curves])) for i in range(len(FRACTIONS))],
            "heatmap_beats_random": [float(np.mean([c["heatmap"][i] < c["random"][i] for c in curves]))
                                     for i in range(len(FRACTIONS))],
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True, type=Path)
    ap.add_argument("--output", type=Path)
    ap.add_argument("--layer", default=None, help="network layer (default: the model's cam_layer)")
    ap.add_argument("--cam-method", default="hirescam")
    ap.add_argument("--deletion", action="store_true", help="also the deletion curves (slower: re-runs the model)")
    a = ap.parse_args(argv)
    res = evaluate_explanations(load_bundle(a.model), a.cases, SegmentParams(gradcam_layer=a.layer, cam_method=a.cam_method),
                                a.deletion)
    print(json.dumps(res["summary"], indent=2))
    if a.output:
        from ..io.writers import write_json

        write_json(res, a.output)


if __name__ == "__main__":
    main()
