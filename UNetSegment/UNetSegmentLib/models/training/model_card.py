"""MODEL_CARD.md for a bundle, from its model.json and measurement files: the ``evaluate`` results
(model vs HU baseline, optionally the previous version on the same cases), the explanation
measurements (``analysis.explanation_eval``; the deletion curves are drawn to ``deletion_curves.png``
beside the card) and the input-domain check's examples (``bench/input_domain.py``).

``python -m UNetSegmentLib.models.training.model_card BUNDLE [--evaluation E.json] [--previous P.json]
[--explanations X.json ...] [--domain D.json] [--extra EXTRA.md]``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...analysis.evaluate import format_table

NOT_FOR = {
    "ct_hemorrhage": "such as contrast-enhanced CT, MR, or non-head scans.",
    "ct_hemorrhage_compartments": "such as contrast-enhanced CT, MR, or non-head scans; nor for grading a bleed's "
                                  "age, or for subtypes the model does not separate (subdural, epidural and "
                                  "subarachnoid blood are one class, extra-axial).",
    "mr_perfusion": "such as raw perfusion source images, maps from a different deconvolution whose units or scaling "
                    "differ, maps not co-registered with each other, or non-brain scans.",
}

LIMITS = {
    "ct_hemorrhage_compartments": [
        "- Training and validation bleeds, oedema and mimics are **synthetic** (UNetSegmentLib/synth_compartments.py), "
        "and the only real CT background is one head CT (ProMED CT 0051, Debian `invesalius-examples`); the others "
        "are deformed copies of it and MNI152 pseudo-CTs, whose tissue maps give the ventricles, sulci and cisterns. "
        "Performance on real scans is **unmeasured**.",
        "- Compartments are learned from where the generator puts blood: extra-axial crescents and lenses against the "
        "inner table, subarachnoid blood in cisterns and sulci, intraventricular casts in the ventricles. Real "
        "bleeds that cross compartments, post-operative collections, and subarachnoid blood outside these sites "
        "were not in the data.",
        "- Mimics (calcified choroid plexus, pineal, basal ganglia and falx, a dense sinus, beam hardening) are "
        "simple shapes at typical sites; no contrast, metal or motion.",
    ],
    "ct_hemorrhage": [
        "- Training and validation lesions are **synthetic**, and the only real CT background is one head CT "
        "(ProMED CT 0051, Debian `invesalius-examples`); the others are deformed copies of it and MNI152 pseudo-CTs. "
        "Performance on real hemorrhage scans is **unmeasured**.",
        "- Hemorrhage mimics were barely in the training data: only the physiological calcifications of the one real CT and "
        "simple synthetic ones in the pseudo-CTs; no contrast, beam hardening or motion.",
    ],
    "mr_perfusion": [
        "- Training and validation maps are **synthetic**: made from the MNI152 tissue maps (one anatomy, warped), with a "
        "simple model of normal perfusion, of the infarct core and penumbra and of the noise of each map. Real "
        "perfusion maps (ISLES and clinical software) have other artefacts, arrival delays, vessels and scalings: "
        "performance on them is **unmeasured**.",
        "- The label is the infarct core as the generator defines it (CBF below ~30 % of normal with prolonged Tmax); "
        "the penumbra is not segmented.",
    ],
}


#: the targets the shipped CT model keeps (default-model issue; kept by 1.2): (label, metric, test)
TARGETS = (
    ("Dice ≥ 0.85 on cases with ≥ 1 mL", "dice_mean", lambda v: v >= 0.85, "{:.3f}"),
    ("sensitivity ≥ 0.95 for lesions ≥ 0.5 mL", "sensitivity_ge_0.5ml", lambda v: v >= 0.95, "{:.3f}"),
    ("≤ 0.2 false lesions per scan", "false_lesions_per_scan", lambda v: v <= 0.2, "{:.2f}"),
    ("median volume error ≤ 10 %", "volume_error_median", lambda v: v <= 0.10, "{:.1%}"),
)


def target_table(evaluation: dict, previous: dict | None) -> list[str]:
    """The targets, this version and (same cases) the previous one, with met / not met."""
    m, p = evaluation["model_metrics"], (previous or {}).get("model_metrics")
    name = f"{evaluation['model']['name']} {evaluation['model']['version']}"
    head = f"| target | {name} | met |" + (f" {previous['model']['name']} {previous['model']['version']} |" if p else "")
    lines = [head, "|---|---|---|" + ("---|" if p else "")]
    for label, key, ok, fmt in TARGETS:
        v = m.get(key)
        cell = "—" if v is None else fmt.format(v)
        lines.append(f"| {label} | {cell} | {'yes' if v is not None and ok(v) else '**no**'} |"
                     + (f" {fmt.format(p[key]) if p.get(key) is not None else '—'} |" if p else ""))
    return lines


#: per-class targets of a compartment model (ct-hemorrhage 2.x): (label values, minimum Dice)
CLASS_DICE_TARGETS = (("intraparenchymal", 0.75), ("extra-axial", 0.75), ("intraventricular", 0.75), ("oedema", 0.6))
COMPARTMENT_ACCURACY_TARGET = 0.9


def class_target_table(evaluation: dict) -> list[str]:
    """Per-class Dice and the compartment accuracy against the compartment model's targets."""
    pc = evaluation["model_metrics"]["per_class"]
    names = evaluation.get("labels", {})
    lines = ["| target | value | met |", "|---|---|---|"]
    for v, c in pc["classes"].items():
        name = names.get(v, v)
        need = next((t for key, t in CLASS_DICE_TARGETS if key in name), None)
        if need is None:
            continue
        d = c["dice_mean"]
        lines.append(f"| {name}: Dice ≥ {need:g} (cases with ≥ 1 mL; n={c['n_cases_dice']}) | {_f(d)} | "
                     f"{'yes' if d is not None and d >= need else '**no**'} |")
    acc = pc["compartment_accuracy"]
    lines.append(f"| compartment correct for ≥ {COMPARTMENT_ACCURACY_TARGET:.0%} of detected lesions ≥ 0.5 mL "
                 f"(n={pc['n_detected_lesions_ge_0.5ml']}) | {_f(acc)} | "
                 f"{'yes' if acc is not None and acc >= COMPARTMENT_ACCURACY_TARGET else '**no**'} |")
    return lines


def density_table(evaluation: dict, previous: dict | None) -> list[str]:
    """Sensitivity and median lesion Dice (lesions ≥ 0.5 mL) per measured density bin."""
    m, p = evaluation["model_metrics"].get("by_density", {}), (previous or {}).get("model_metrics", {}).get("by_density")
    lines = ["| lesion density (median HU) | lesions | sensitivity | median lesion Dice |"
             + (" previous: sensitivity / Dice |" if p else ""), "|---|---|---|---|" + ("---|" if p else "")]
    for name, d in m.items():
        if not d["n"]:
            continue
        prev = ""
        if p and p.get(name, {}).get("n"):
            prev = f" {p[name]['sensitivity']:.2f} / {p[name]['lesion_dice_median']:.2f} (n={p[name]['n']}) |"
        elif p:
            prev = " — |"
        lines.append(f"| {name} | {d['n']} | {d['sensitivity']:.3f} | {d['lesion_dice_median']:.3f} |{prev}")
    return lines


def calibration_lines(meta: dict) -> list[str]:
    c = meta.get("calibration")
    if not c:
        return []
    applied = c["temperature"] != 1.0
    return ["## Calibration", "",
            f"- Temperature scaling: fitted T = {c.get('fitted_temperature', c['temperature'])} "
            f"({'applied' if applied else 'not applied: it did not lower the validation ECE'}; the logits are divided by T).",
            f"- Expected calibration error on validation voxels within {c.get('near_mm', 5):g} mm of a true or predicted "
            f"lesion ({c.get('val_voxels', 0):,} voxels, {c.get('bins', 15)} bins): **{c['ece_before']:.4f} before, "
            f"{c['ece_after']:.4f} after**; fitted on {c.get('tune_voxels', 0):,} tune voxels.",
            f"- Method: {c.get('method', '')}.", ""]


def explanation_lines(runs: list[dict], chosen_layer: str | None, chosen_method: str | None) -> list[str]:
    """Pointing / mass / pointing game / cost for each measured heatmap, and the deletion curves."""
    if not runs:
        return []
    lines = ["## Explanations: does the heatmap point at the lesion?", "",
             "| method @ layer | predicted lesions ≥ 0.5 mL | per-lesion pointing | mass near true lesions (median) "
             "| volume pointing game | cost / inference (median) |", "|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        mark = " (default)" if (r.get("layer"), r.get("cam_method")) == (chosen_layer, chosen_method) else ""
        lines.append(f"| {r['cam_method']} @ {r.get('layer')}{mark} | {s['predicted_lesions_ge_0.5ml']} | "
                     f"{_f(s['per_lesion_pointing'])} | {_f(s['mass_near_truth_median'])} | "
                     f"{_f(s['volume_pointing_game'])} | {_f(s['gradcam_over_inference_median'], '{:.2f}×')} |")
    lines += ["", "Definitions: " + runs[0].get("definitions", "").replace("\n", " "), ""]
    deletion = [r for r in runs if "deletion" in r["summary"]]
    for r in deletion:
        d = r["summary"]["deletion"]
        lines += [f"### Deletion curves ({r['cam_method']} @ {r.get('layer')}, {d['lesions']} lesions)", "",
                  "Mean lesion probability after replacing the top-ranked voxels of the heatmap, or as many random voxels, "
                  "of the lesion's box + 20 mm by the healthy brain's median (lower = the map found what the model used):",
                  "", "| voxels replaced | none | " + " | ".join(f"{q:.0%}" for q in d["fractions"]) + " |",
                  "|---|---|" + "---|" * len(d["fractions"]),
                  f"| heatmap's top | {d['p0_mean']:.3f} | " + " | ".join(f"{v:.3f}" for v in d["heatmap_mean"]) + " |",
                  f"| random | {d['p0_mean']:.3f} | " + " | ".join(f"{v:.3f}" for v in d["random_mean"]) + " |",
                  "| lesions where the heatmap's deletion beats random | | "
                  + " | ".join(f"{v:.0%}" for v in d["heatmap_beats_random"]) + " |", "",
                  "![deletion curves](deletion_curves.png)", ""]
    return lines


#: how bench/input_domain.py names the examples read from case folders (counted in one row of the card)
CASE_EXAMPLE_PREFIX = "case "


def domain_lines(domain: dict | None, model: str) -> list[str]:
    """The input-domain check: both error kinds and the examples (bench/input_domain.py)."""
    d = (domain or {}).get(model)
    if not d:
        return []
    s = d["summary"]
    lines = ["## Inputs it refuses", "",
             "Before inference the input-domain check (`engine/domain.py`, thresholds in model.json `domain`) refuses "
             "evidence of another modality or body part with exit 3 and one line naming what it saw; "
             "`--allow-unusual-input` runs anyway and marks every output. Measured with `bench/input_domain.py`: "
             f"**false refusals {s['false_refusals']}/{s['in_distribution']}**, "
             f"**false acceptances {s['false_acceptances']}/{s['out_of_distribution']}**.", "",
             "| must be | example | verdict |", "|---|---|---|"]
    acc = d["accepted"]
    cases = [r for r in acc if r["example"].startswith(CASE_EXAMPLE_PREFIX)]
    for r in [r for r in acc if not r["example"].startswith(CASE_EXAMPLE_PREFIX)]:
        lines.append(f"| accepted | {r['example']} | {r['verdict']} |")
    if cases:
        bad = sum(r["verdict"] == "refuse" for r in cases)
        lines.append(f"| accepted | {len(cases)} validation and tune cases | {len(cases) - bad} accepted |")
    for r in d["refused"]:
        lines.append(f"| refused | {r['example']} | {r['verdict']}: {r['seen'][:110]} |")
    return lines + [""]


def draw_deletion_curves(runs: list[dict], path: Path) -> bool:
    """deletion_curves.png: mean lesion probability against the share of voxels replaced."""
    deletion = [r for r in runs if "deletion" in r["summary"]]
    if not deletion:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    for r in deletion:
        d = r["summary"]["deletion"]
        xs = [0.0] + [100 * q for q in d["fractions"]]
        ax.plot(xs, [d["p0_mean"]] + d["heatmap_mean"], "o-", label=f"{r['cam_method']} @ {r.get('layer')}: top voxels")
        ax.plot(xs, [d["p0_mean"]] + d["random_mean"], "s--", color="grey", label="random voxels")
    ax.set_xlabel("voxels of the lesion's box + 20 mm replaced (%)")
    ax.set_ylabel("mean lesion probability")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Deletion curves (Petsiuk et al. 2018)", fontsize=10)
    fig.tight_layout()
    from ...io.writers import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _f(v, fmt: str = "{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def render(meta: dict, evaluation: dict | None, extra: str = "", previous: dict | None = None,
           explanations: list[dict] | None = None, domain: dict | None = None) -> str:
    t = meta.get("training", {})
    arch = meta["architecture"]
    lines = [
        f"# {meta['name']} {meta['version']} — {meta.get('title', '')}".rstrip(" —"),
        "",
        "**Research use only — not a medical device, not for diagnosis.**",
        "",
        "## Intended use",
        meta.get("intended_use", ""),
        "",
        "Not intended for: clinical decisions, triage, screening, or any use on patients; inputs unlike the "
        "training data (see below), " + NOT_FOR.get(t.get("generator"), "such as other modalities or body parts."),
        "",
        "## Model",
        f"- {meta['description'].strip()}",
        f"- Architecture: `{arch['name']}` {json.dumps(arch['kwargs'])}; **{arch.get('parameters', 0):,} parameters**; "
        f"{meta['dimensions']} (context slices: {meta.get('context_slices', 0)}), patch {meta['patch_size']}, "
        f"target spacing {meta['target_spacing']} mm.",
        f"- Input: " + "; ".join(f"{c['name']} ({c['modality']}), normalisation {json.dumps(c['normalization'])}" for c in meta["inputs"]),
        f"- Labels: " + "; ".join(f"{l['value']} = {l['name']}" + (f" ({l['code']['scheme']} {l['code']['value']} {l['code']['meaning']})" if 'code' in l else "") for l in meta["labels"]),
        f"- Threshold {meta['threshold']}, inference defaults {json.dumps(meta.get('inference', {}))}; Grad-CAM layer `{arch.get('cam_layer', 'decoder.0')}`.",
        "",
        "## Training",
        f"- Data: generator `{t.get('generator')}` ({t.get('train_cases')} training cases from seed {t.get('train_seed')}"
        + "".join(f" + {e['cases']} from seed {e['seed']} with {json.dumps(e['settings'])}" for e in t.get("extra_train", []))
        + ", "
        f"{t.get('val_cases')} validation cases from seed {t.get('val_seed')} with different generator settings); "
        "see `UNetSegmentLib/training/cases.py` and the config in `Resources/Training/`.",
        f"- {t.get('steps')} steps, batch {t.get('batch_size')}, crops {t.get('crop')}, seed {t.get('seed')}, "
        f"{t.get('minutes')} min on {t.get('device')} ({t.get('precision')}, {t.get('host')}).",
        (f"- Checkpoint chosen on the tune split (never on the validation cases reported below): Dice "
         f"{t.get('best_val_dice_network_grid')} on the network grid."
         if t.get("selection_split") == "tune" else
         f"- Best validation Dice on the network grid during training: {t.get('best_val_dice_network_grid')}."),
        *([f"- Fine-tuned from version {t['init_from'].get('version')} (weights sha256 {t['init_from'].get('sha256', '')[:12]}…, "
           f"itself {t['init_from'].get('minutes')} min of training); total training time "
           f"{round(float(t.get('minutes') or 0) + float(t['init_from'].get('minutes') or 0), 1)} min."]
          if t.get("init_from") else []),
        "",
    ]
    if evaluation:
        lines += ["## Evaluation (validation cases, input grid)", "", "```", format_table(evaluation), "```", ""]
        if previous:
            lines += [f"The previous version, {previous['model']['name']} {previous['model']['version']}, on the same cases:",
                      "", "```", format_table(previous), "```", ""]
        if meta.get("name") in ("ct-hemorrhage", "ct-hemorrhage-compartments"):  # any-bleed targets for both
            lines += ["### Targets", "", *target_table(evaluation, previous), ""]
        if "per_class" in evaluation["model_metrics"]:
            lines += ["### Per-class targets", "", *class_target_table(evaluation), ""]
        if any(d["n"] for d in evaluation["model_metrics"].get("by_density", {}).values()):
            lines += ["### By lesion density", "", *density_table(evaluation, previous), ""]
        lines += ["Definitions: " + evaluation.get("definitions", "").replace("\n", " "), ""]
    lines += calibration_lines(meta)
    lines += explanation_lines(explanations or [], meta["architecture"].get("cam_layer"),
                               (meta.get("inference") or {}).get("cam_method", "hirescam"))
    lines += domain_lines(domain, meta["name"])
    lines += ["## Known limits", *LIMITS.get(t.get("generator"), ["- Trained and validated on synthetic data only."]), ""]
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--evaluation", type=Path, help="unetsegment evaluate --output JSON of this version")
    ap.add_argument("--previous", type=Path, help="the same for the previous version, on the same cases")
    ap.add_argument("--explanations", type=Path, nargs="*", default=[], help="analysis.explanation_eval outputs")
    ap.add_argument("--domain", type=Path, help="bench/input_domain.py --json output")
    ap.add_argument("--extra", type=Path, help="hand-written Markdown appended to the card")
    a = ap.parse_args(argv)
    read = lambda p: json.loads(p.read_text(encoding="utf-8")) if p else None  # noqa: E731
    meta = read(a.bundle / "model.json")
    runs = [read(p) for p in a.explanations]
    draw_deletion_curves(runs, a.bundle / "deletion_curves.png")
    text = render(meta, read(a.evaluation), a.extra.read_text(encoding="utf-8").strip() if a.extra else "",
                  read(a.previous), runs, read(a.domain))
    from ...io.writers import write_text

    write_text(a.bundle / "MODEL_CARD.md", text)
    print(f"wrote {a.bundle / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
