"""The model card renderer: targets met / not met from the measurements, density bins, calibration,
explanation and deletion tables, refused-input examples, and the checkpoint-selection line."""
from __future__ import annotations

import json

import numpy as np
from conftest import REPO

from UNetSegmentLib.analysis import explanation_eval
from UNetSegmentLib.analysis.evaluate import score_case, summarize
from UNetSegmentLib.image import Image, make_ijk_to_ras
from UNetSegmentLib.models.training import model_card

GRID = make_ijk_to_ras((1.0, 1.0, 1.0), np.eye(3), (0, 0, 0))


def _case(name: str, true_boxes, pred_boxes, density: float = 70.0):
    """A 20³ case with 1 mm voxels: boxes (k0, k1, j0, j1, i0, i1) of truth and prediction."""
    t, p = np.zeros((20, 20, 20), np.uint8), np.zeros((20, 20, 20), np.uint8)
    for arr, boxes in ((t, true_boxes), (p, pred_boxes)):
        for k0, k1, j0, j1, i0, i1 in boxes:
            arr[k0:k1, j0:j1, i0:i1] = 1
    ct = np.where(t > 0, density, 30.0).astype(np.float32)
    return score_case(name, Image(t, GRID), Image(p, GRID), intensity=Image(ct, GRID))


def _evaluation(version: str, results) -> dict:
    return {"model": {"name": "ct-hemorrhage", "version": version}, "model_metrics": summarize(results),
            "definitions": "test definitions"}


def _meta() -> dict:
    meta = json.loads((REPO / "Resources/Models/ct-hemorrhage/model.json").read_text())
    meta["version"] = "9.9.0"
    meta["training"] = {**meta.get("training", {}), "selection_split": "tune", "best_val_dice_network_grid": 0.9}
    meta["calibration"] = {"temperature": 1.3, "fitted_temperature": 1.3, "ece_before": 0.05, "ece_after": 0.02,
                           "val_voxels": 1000, "tune_voxels": 2000, "method": "temperature scaling"}
    return meta


def _explanations() -> list[dict]:
    per_case = [{"lesion_hits": [True, True], "mass_near_truth": 0.8, "volume_pointing": True,
                 "deletion": [{"p0": 0.9, "heatmap": [0.5, 0.3, 0.1], "random": [0.85, 0.8, 0.7]}]},
                {"lesion_hits": [False], "mass_near_truth": 0.4, "volume_pointing": False}]
    chosen = {"layer": "decoder.2", "cam_method": "hirescam", "definitions": "pointing defs",
              "summary": explanation_eval.summarize(per_case, [1.1, 1.3])}
    other = {"layer": "decoder.0", "cam_method": "gradcam", "summary": explanation_eval.summarize(per_case[1:], [1.2])}
    return [chosen, other]


def test_card_marks_targets_from_the_measurements_and_lists_every_section(tmp_path):
    big = (2, 14, 2, 14, 2, 14)  # 1.728 mL
    good = [_case(f"g{i}", [big], [big]) for i in range(4)] + [_case("neg", [], [])]
    worse = [_case(f"w{i}", [big], [(2, 14, 2, 14, 2, 8)]) for i in range(4)] + [_case("neg", [], [(0, 3, 0, 3, 0, 3)])]
    evaluation, previous = _evaluation("9.9.0", good), _evaluation("9.8.0", worse)
    meta = _meta()
    runs = _explanations()
    meta["architecture"]["cam_layer"] = "decoder.2"
    domain = {"ct-hemorrhage": {"summary": {"false_refusals": 0, "in_distribution": 2, "false_acceptances": 0,
                                            "out_of_distribution": 1},
                                "accepted": [{"example": "sample: flipped i/j storage", "verdict": "ok"},
                                             {"example": "case val/case-1", "verdict": "ok"}],
                                "refused": [{"example": "chest CT", "verdict": "refuse", "seen": "a torso, no skull ring"}]}}
    text = model_card.render(meta, evaluation, "## Extra\nhand-written", previous, runs, domain)

    targets = text.split("### Targets")[1].split("###")[0]
    assert "| Dice ≥ 0.85 on cases with ≥ 1 mL | 1.000 | yes | 0.667 |" in targets
    assert "| ≤ 0.2 false lesions per scan | 0.00 | yes | 0.20 |" in targets
    assert "| median volume error ≤ 10 % | 0.0% | yes | 50.0% |" in targets
    assert "| 60-75 HU | 4 | 1.000 | 1.000 | 1.00 / 0.67 (n=4) |" in text
    assert "Checkpoint chosen on the tune split" in text and "0.0500 before, 0.0200 after" in text
    assert "| hirescam @ decoder.2 (default) | 3 | 0.667 | 0.600 | 0.500 | 1.20× |" in text
    assert "| gradcam @ decoder.0 | 1 | 0.000 |" in text
    assert "| heatmap's top | 0.900 | 0.500 | 0.300 | 0.100 |" in text
    assert "false refusals 0/2" in text and "| refused | chest CT | refuse: a torso, no skull ring |" in text
    assert "| accepted | sample: flipped i/j storage | ok |" in text
    assert "| accepted | 1 validation and tune cases | 1 accepted |" in text
    assert text.rstrip().endswith("hand-written")

    failing = _evaluation("9.9.0", worse)
    assert "| ≤ 0.2 false lesions per scan | 0.20 | yes |" in model_card.render(meta, failing)
    assert "| Dice ≥ 0.85 on cases with ≥ 1 mL | 0.667 | **no** |" in model_card.render(meta, failing)

    png = tmp_path / "deletion_curves.png"
    assert model_card.draw_deletion_curves(runs, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not model_card.draw_deletion_curves(runs[1:], tmp_path / "none.png")


def test_card_cli_writes_the_card_beside_the_bundle(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.json").write_text(json.dumps(_meta()))
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps(_evaluation("9.9.0", [_case("g", [(2, 14, 2, 14, 2, 14)], [(2, 14, 2, 14, 2, 14)])])))
    extra = tmp_path / "extra.md"
    extra.write_text("## What changed\nsomething")
    model_card.main([str(bundle), "--evaluation", str(ev), "--extra", str(extra)])
    card = (bundle / "MODEL_CARD.md").read_text()
    assert card.startswith("# ct-hemorrhage 9.9.0") and "## What changed" in card and "### Targets" in card
    assert not (bundle / "deletion_curves.png").exists()
