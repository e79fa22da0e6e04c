"""MODEL_CARD.md for a bundle, from its model.json and the ``evaluate`` results (model vs HU baseline)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ...analysis.evaluate import format_table

NOT_FOR = {
    "ct_hemorrhage": "such as contrast-enhanced CT, MR, or non-head scans.",
    "mr_perfusion": "such as raw perfusion source images, maps from a different deconvolution whose units or scaling "
                    "differ, maps not co-registered with each other, or non-brain scans.",
}

LIMITS = {
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


def render(meta: dict, evaluation: dict | None, extra: str = "") -> str:
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
        f"- Data: generator `{t.get('generator')}` ({t.get('train_cases')} training cases from seed {t.get('train_seed')}, "
        f"{t.get('val_cases')} validation cases from seed {t.get('val_seed')} with different generator settings); "
        "see `UNetSegmentLib/training/cases.py` and the config in `Resources/Training/`.",
        f"- {t.get('steps')} steps, batch {t.get('batch_size')}, crops {t.get('crop')}, seed {t.get('seed')}, "
        f"{t.get('minutes')} min on {t.get('device')} ({t.get('precision')}, {t.get('host')}).",
        f"- Best validation Dice on the network grid during training: {t.get('best_val_dice_network_grid')}.",
        "",
    ]
    if evaluation:
        lines += ["## Evaluation (validation cases, input grid)", "", "```", format_table(evaluation), "```", "",
                  "Definitions: " + evaluation.get("definitions", "").replace("\n", " "), ""]
    lines += ["## Known limits", *LIMITS.get(t.get("generator"), ["- Trained and validated on synthetic data only."]), ""]
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)


def main() -> None:
    """``python -m UNetSegmentLib.models.training.model_card BUNDLE [EVALUATION.json [EXTRA.md]]``"""
    bundle = Path(sys.argv[1])
    evaluation = json.loads(Path(sys.argv[2]).read_text()) if len(sys.argv) > 2 else None
    extra = Path(sys.argv[3]).read_text(encoding="utf-8").strip() if len(sys.argv) > 3 else ""
    meta = json.loads((bundle / "model.json").read_text())
    (bundle / "MODEL_CARD.md").write_text(render(meta, evaluation, extra), encoding="utf-8")
    print(f"wrote {bundle / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
