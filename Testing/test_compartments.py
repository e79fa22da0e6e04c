"""Multi-class bundles whose labels are compartments of one finding plus context that is not a lesion
(ct-hemorrhage 2.x: IPH, EAH, IVH and the perilesional oedema, ``"lesion": false``): the threshold
rule, lesions as components of the lesion labels together, the ``compartment`` and
``perilesional_oedema_ml`` columns, small-lesion removal, re-thresholding, the trainer's head
expansion, and a whole ``segment`` run through every output."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import COMPARTMENT_NAMES as NAMES
from conftest import ct_phantom, write_compartment_bundle
from UNetSegmentLib.analysis.lesions import analyze_lesions, split_small_lesions
from UNetSegmentLib.analysis.rethreshold import labels_at_threshold, rederive
from UNetSegmentLib.engine.labels import foreground_probability, labels_from_probabilities
from UNetSegmentLib.errors import ModelError, UsageError
from UNetSegmentLib.image import Image, make_ijk_to_ras

LESION, OEDEMA = (1, 2, 3), (4,)


def _img(arr, spacing=(1.0, 1.0, 1.0)):
    return Image(arr, make_ijk_to_ras(spacing, np.eye(3), (0.0, 0.0, 0.0)))


# --- the threshold rule -------------------------------------------------------------------------
def test_threshold_rule_uses_p_lesion_and_gives_context_only_where_it_is_the_most_probable_class():
    p = {1: np.array([0.30, 0.10, 0.00, 0.05, 0.20]), 2: np.array([0.30, 0.00, 0.00, 0.00, 0.20]),
         3: np.zeros(5), 4: np.array([0.10, 0.60, 0.30, 0.50, 0.30])}
    # voxel 0: P(lesion) 0.6 ≥ 0.5 → lesion (tie 1/2 → lower value); 1: oedema most probable; 2: background
    # (0.7) wins; 3: oedema 0.5 > background 0.45; 4: P(lesion) 0.4 < 0.5, oedema 0.3 = background 0.3 → 0
    assert labels_from_probabilities(p, 0.5, lesion_values=LESION).tolist() == [1, 4, 0, 4, 0]
    np.testing.assert_allclose(foreground_probability(p, LESION), [0.6, 0.1, 0.0, 0.05, 0.4])
    # the live threshold moves lesions only: at 0.35 voxel 4 becomes a lesion, the oedema stays
    assert labels_from_probabilities(p, 0.35, lesion_values=LESION).tolist() == [1, 4, 0, 4, 1]
    # without lesion_values every label is a lesion (the one-label and older multi-label rule)
    assert labels_from_probabilities(p, 0.5).tolist() == [1, 4, 0, 4, 4]
    assert labels_from_probabilities({1: np.array([0.4, 0.6])}, 0.5).tolist() == [0, 1]


# --- the lesion table ---------------------------------------------------------------------------
def _two_bleeds_and_oedema():
    """IPH (27 voxels) touching IVH (9 voxels) → one lesion; a separate EAH; oedema around the IPH
    (near, counted) and one oedema voxel 12 mm from every lesion (not counted)."""
    lab = np.zeros((20, 30, 40), np.uint8)
    lab[8:11, 8:11, 8:11] = 1  # IPH 27
    lab[8:11, 8:11, 11] = 3  # IVH 9, touching it
    lab[8:11, 12:14, 8:11] = 4  # oedema 18, 2–3 mm from the IPH
    lab[9, 9, 24] = 4  # oedema 12 mm from the IPH/IVH lesion (i 12 → 24) and > 10 mm from the EAH
    lab[2:4, 25:28, 30:34] = 2  # EAH 24, far away
    lab[3, 24, 33] = 4  # oedema 1 mm from the EAH
    return lab


def test_lesions_are_components_of_the_lesion_labels_together_with_their_majority_compartment():
    lab = _two_bleeds_and_oedema()
    t = analyze_lesions(_img(lab), label_names=NAMES, lesion_values=LESION, perilesional_values=OEDEMA)
    assert t.n_lesions == 2
    big, small = t.rows
    assert (big["voxels"], big["label"], big["compartment"]) == (36, NAMES[1], NAMES[1])
    assert (small["voxels"], small["label"], small["compartment"]) == (24, NAMES[2], NAMES[2])
    assert big["perilesional_oedema_ml"] == pytest.approx(18 / 1000)
    assert small["perilesional_oedema_ml"] == pytest.approx(1 / 1000)
    assert t.total["perilesional_oedema_ml"] == pytest.approx(19 / 1000)
    assert t.total["volume_ml"] == pytest.approx(60 / 1000)  # oedema is not lesion volume
    assert t.total["compartment"] is None
    # the same map without compartments: each label its own finding, no oedema column
    old = analyze_lesions(_img(lab), label_names=NAMES)
    assert old.n_lesions == 6 and {r["compartment"] for r in old.rows} == {None}
    assert old.total["perilesional_oedema_ml"] is None


def test_perilesional_distance_is_in_mm_and_each_voxel_counts_for_its_nearest_lesion():
    lab = np.zeros((10, 10, 60), np.uint8)
    lab[5, 5, 10] = 1
    lab[5, 5, 30] = 1
    lab[5, 5, 12:29] = 4  # between the two: i 12..20 nearer the first, 21..28 nearer the second
    t = analyze_lesions(_img(lab, (0.5, 1.0, 1.0)), label_names=NAMES, lesion_values=LESION, perilesional_values=OEDEMA)
    # spacing 0.5 mm along i: every oedema voxel lies within 10 mm (≤ 20 voxels) of a lesion
    assert [r["perilesional_oedema_ml"] * 1000 / 0.5 for r in t.rows] == pytest.approx([9, 8])
    t2 = analyze_lesions(_img(lab, (2.0, 1.0, 1.0)), label_names=NAMES, lesion_values=LESION, perilesional_values=OEDEMA)
    # 2 mm along i: only voxels ≤ 5 voxels from a lesion count (i 12..15 and 25..28)
    assert [r["perilesional_oedema_ml"] * 1000 / 2.0 for r in t2.rows] == pytest.approx([4, 4])


def test_small_lesion_removal_drops_small_bleeds_and_keeps_the_oedema():
    lab = _two_bleeds_and_oedema()
    out, dropped = split_small_lesions(_img(lab), 0.030, 26, LESION)  # EAH (0.024 mL) goes, IPH+IVH (0.036) stays
    arr = out.array
    assert dropped == pytest.approx((0.024,))
    assert not (arr == 2).any() and (arr == 1).sum() == 27 and (arr == 3).sum() == 9
    assert (arr == 4).sum() == (lab == 4).sum()


def test_rethreshold_relabels_lesions_by_the_nearest_compartment_and_keeps_the_context():
    lab = _two_bleeds_and_oedema()
    prob = np.where(np.isin(lab, LESION), 0.9, 0.0).astype(np.float32)
    prob[8:11, 8:11, 12] = 0.6  # next to the IVH: a lesion at 0.5, not at 0.7
    raw = labels_at_threshold(_img(prob), 0.5, [1, 2, 3, 4], _img(lab), LESION).array
    assert (raw[8:11, 8:11, 12] == 3).all()  # the nearest compartment
    assert ((raw == 4) == (lab == 4)).all()  # context as the run had it
    meta = [{"value": v, "name": n, "color": [1, 0, 0], **({"lesion": False} if v in OEDEMA else {})}
            for v, n in NAMES.items()]
    r = rederive(_img(prob), 0.7, meta, previous=_img(lab))
    assert r.table.n_lesions == 2 and r.table.total["perilesional_oedema_ml"] == pytest.approx(19 / 1000)
    assert not (r.labels.array[8:11, 8:11, 12]).any()


# --- bundle and trainer -------------------------------------------------------------------------
def test_a_bundle_whose_labels_are_all_context_is_refused(tiny_bundle):
    from UNetSegmentLib.models.bundle import validate_meta

    meta = json.loads((tiny_bundle / "model.json").read_text())
    meta["labels"][0]["lesion"] = False
    with pytest.raises(ModelError, match="lesion\": false"):
        validate_meta(meta)


def test_expand_output_classes_seeds_new_classes_from_the_trained_ones():
    import torch

    from UNetSegmentLib.models.networks import build_network
    from UNetSegmentLib.models.training.trainer import expand_output_classes

    kw = {"spatial_dims": 2, "in_channels": 1, "base_channels": 4, "depth": 2}
    old = build_network("unet", out_channels=2, **kw).state_dict()
    new_net = build_network("unet", out_channels=5, **kw)
    st = expand_output_classes(old, new_net.state_dict(), [0, 1, 1, 1, 0])
    new_net.load_state_dict(st)
    w = st["out_conv.weight"]
    for c, src in enumerate([0, 1, 1, 1, 0]):
        assert torch.equal(w[c], old["out_conv.weight"][src])
    assert all(torch.equal(st[k], v) for k, v in old.items() if not k.startswith("out_conv"))
    wrong = build_network("unet", out_channels=5, **{**kw, "base_channels": 8}).state_dict()
    with pytest.raises(UsageError, match="only the class count may differ"):
        expand_output_classes(old, wrong, [0, 1, 1, 1, 0])


# --- a whole run --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compartment_bundle(tmp_path_factory) -> Path:
    return write_compartment_bundle(tmp_path_factory.mktemp("compartments") / "bundle")


def test_a_compartment_model_writes_compartments_oedema_and_per_class_totals(compartment_bundle, tmp_path):
    import slicerio

    from UNetSegmentLib.io.writers import write_image
    from UNetSegmentLib.params import SegmentParams
    from UNetSegmentLib.serving.job import segment_files

    ct, blob = ct_phantom(shape_kji=(24, 96, 96), spacing=(1.5, 1.5, 1.5))
    write_image(ct, tmp_path / "ct.nii.gz")
    summary = segment_files([str(tmp_path / "ct.nii.gz")], tmp_path / "out", str(compartment_bundle),
                            SegmentParams(heatmaps=("gradcam",)))
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "lesions.csv", newline="")))
    lesions, total = rows[:-1], rows[-1]
    assert lesions and all(r["compartment"] == NAMES[1] for r in lesions)
    assert float(total["perilesional_oedema_ml"]) > 0
    assert sum(float(r["perilesional_oedema_ml"]) for r in lesions) <= float(total["perilesional_oedema_ml"]) + 1e-9
    segs = {s["value"]: s for s in summary["segments"]}
    assert [segs[v]["lesion"] for v in (1, 2, 3, 4)] == [True, True, True, False]
    assert segs[1]["lesions"] == len(lesions) and segs[4]["lesions"] is None and segs[4]["volume_ml"] > 0
    assert segs[1]["volume_ml"] + segs[2]["volume_ml"] + segs[3]["volume_ml"] == pytest.approx(summary["total_volume_ml"])
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == list(NAMES.values())
    # the Grad-CAM explains the lesions, and the blob is found where the phantom has it
    from UNetSegmentLib.io.readers import read_image

    labels = read_image(out / "segmentation.nii.gz").array
    assert (labels[blob] == 1).mean() > 0.5 and (labels == 4).any() and not (labels[blob] == 4).all()
    # a re-threshold keeps the oedema
    from UNetSegmentLib.analysis.rethreshold import load_run, rederive_run
    from UNetSegmentLib.models.bundle import load_bundle

    r = rederive_run(load_run(out), load_bundle(compartment_bundle), 0.6)
    assert r.table.total["perilesional_oedema_ml"] > 0 and (r.labels.array == 4).any()


def test_each_class_map_is_written_and_a_rethreshold_from_the_files_equals_a_fresh_run(compartment_bundle, tmp_path):
    """class_probabilities.nrrd holds each label's own map (P(lesion) is their lesion labels summed), the
    summary names its components, and the label map re-derived from the files at another threshold is
    voxel for voxel a fresh run's at that threshold, oedema included."""
    from UNetSegmentLib.analysis.rethreshold import export_run, load_run
    from UNetSegmentLib.io.class_maps import read_class_probabilities
    from UNetSegmentLib.io.readers import read_image
    from UNetSegmentLib.io.writers import write_image
    from UNetSegmentLib.models.bundle import load_bundle
    from UNetSegmentLib.params import SegmentParams
    from UNetSegmentLib.serving.job import segment_files

    ct, _ = ct_phantom(shape_kji=(24, 96, 96), spacing=(1.5, 1.5, 1.5))
    write_image(ct, tmp_path / "ct.nii.gz")
    summary = segment_files([str(tmp_path / "ct.nii.gz")], tmp_path / "a", str(compartment_bundle), SegmentParams(heatmaps=()))
    assert [c["value"] for c in summary["class_probabilities"]["components"]] == [1, 2, 3, 4]
    maps = read_class_probabilities(tmp_path / "a" / "class_probabilities.nrrd")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a" / "class_probabilities.nrrd").stat().st_mode & 0o777 == 0o666 & ~umask
    p_lesion = read_image(tmp_path / "a" / "probability.nrrd")
    assert all(m.same_grid(p_lesion) for m in maps.values())
    assert np.allclose(maps[1].array + maps[2].array + maps[3].array, p_lesion.array, atol=1e-6)
    assert (maps[4].array > 0.5).any() and np.all(sum(m.array for m in maps.values()) <= 1 + 1e-5)
    fresh = segment_files([str(tmp_path / "ct.nii.gz")], tmp_path / "b", str(compartment_bundle),
                          SegmentParams(heatmaps=(), threshold=0.7))
    again = export_run(load_run(tmp_path / "a"), tmp_path / "c", bundle=load_bundle(compartment_bundle), threshold=0.7,
                       inputs=[ct])
    a, b = (read_image(tmp_path / d / "segmentation.nii.gz").array for d in ("b", "c"))
    assert np.array_equal(a, b) and (a == 4).any()
    assert again["n_lesions"] == fresh["n_lesions"] and again["total_volume_ml"] == pytest.approx(fresh["total_volume_ml"])
    copied = read_class_probabilities(tmp_path / "c" / "class_probabilities.nrrd")
    assert all(np.array_equal(copied[v].array, maps[v].array) for v in maps)
    # a damaged class file leaves the run usable: a warning, and the label map's compartments
    (tmp_path / "a" / "class_probabilities.nrrd").write_bytes(b"NRRD0004\ntype: float\n")
    with pytest.warns(RuntimeWarning, match="per-class maps are left out"):
        assert load_run(tmp_path / "a").class_probabilities == {}


def test_class_map_names_survive_any_characters_and_an_oblique_grid(tmp_path):
    from UNetSegmentLib.io.class_maps import read_class_probabilities, write_class_probabilities

    m = make_ijk_to_ras(spacing=(0.7, 0.9, 2.5))
    c, s_ = np.cos(0.3), np.sin(0.3)
    m[:3, :3] = np.array([[c, -s_, 0], [s_, c, 0], [0, 0.2, 1]]) @ m[:3, :3]  # rotated and sheared
    rng = np.random.default_rng(0)
    maps = {v: Image(rng.random((3, 4, 5)).astype(np.float32), m) for v in (4, 1)}
    write_class_probabilities(maps, {4: "a|b\nc", 1: "plain"}, tmp_path / "c.nrrd")
    back = read_class_probabilities(tmp_path / "c.nrrd")
    assert list(back) == [4, 1]
    assert all(np.array_equal(back[v].array, maps[v].array) and np.allclose(back[v].ijk_to_ras, m) for v in maps)


def test_the_report_names_compartments_and_oedema(compartment_bundle, tmp_path):
    from UNetSegmentLib.analysis.lesion_table import compartment_breakdown

    rows = [{"compartment": NAMES[1], "volume_ml": 2.0}, {"compartment": NAMES[3], "volume_ml": 0.5},
            {"compartment": NAMES[1], "volume_ml": 1.0}]
    text = compartment_breakdown(rows, {"perilesional_oedema_ml": 1.25})
    assert text == (f"{NAMES[1]} 3.00 mL (2)   ·   {NAMES[3]} 0.50 mL (1)   ·   perilesional oedema 1.25 mL")
    assert compartment_breakdown([{"compartment": None, "volume_ml": 1.0}], {"perilesional_oedema_ml": None}) == ""


# --- evaluation ---------------------------------------------------------------------------------
def test_evaluation_scores_any_bleed_per_class_and_the_compartment_confusion():
    from UNetSegmentLib.analysis.evaluate import format_classes, per_class, score_case, summarize

    truth = np.zeros((20, 40, 40), np.uint8)
    truth[2:12, 2:12, 2:12] = 1  # IPH 1 mL
    truth[2:12, 2:12, 12:14] = 4  # oedema 0.2 mL: not a lesion
    truth[2:12, 25:35, 25:35] = 2  # EAH 1 mL
    pred = np.zeros_like(truth)
    pred[2:12, 2:12, 2:11] = 1  # IPH found (90 %)
    pred[2:12, 2:12, 12:14] = 4  # oedema found
    pred[2:12, 25:35, 25:35] = 3  # EAH found, called IVH
    pred[15:18, 35:38, 2:5] = 3  # a false lesion (IVH)
    img = lambda a: _img(a)  # noqa: E731
    r = score_case("c", img(truth), img(pred), label_values=(1, 2, 3, 4), lesion_values=LESION, truth_lesion_values=LESION)
    assert r.true_ml == pytest.approx(2.0) and r.false_lesions == 1  # oedema is not lesion volume
    assert r.classes[1]["dice"] == pytest.approx(2 * 900 / 1900) and r.classes[4]["dice"] == 1.0
    assert r.classes[2]["dice"] == 0.0 and r.classes[3]["dice"] == 0.0
    assert [(l["compartment_true"], l["compartment_pred"]) for l in r.true_lesions] == [(1, 1), (2, 3)]
    pc = per_class([r])
    assert pc["confusion"] == {"1": {"1": 1}, "2": {"3": 1}} and pc["compartment_accuracy"] == 0.5
    assert pc["classes"]["3"]["false_lesions_per_scan"] == 1.0 and pc["classes"]["2"]["sensitivity_ge_0.5ml"] == 1.0
    base = score_case("c", img(truth), img(np.isin(pred, LESION).astype(np.uint8)), label_values=(1, 2, 3, 4),
                      lesion_values=(1,), predicts_classes=False, truth_lesion_values=LESION)  # the one-label baseline
    bpc = per_class([base])
    assert bpc["compartment_accuracy"] is None and bpc["classes"]["1"]["sensitivity_ge_0.5ml"] == 1.0
    assert bpc["classes"]["2"]["sensitivity_ge_0.5ml"] == 1.0  # true compartments from the truth's own labels
    assert bpc["classes"]["1"]["dice_mean"] is None and bpc["classes"]["1"]["false_lesions_per_scan"] is None
    text = format_classes({"labels": {str(k): v for k, v in NAMES.items()}, "model_metrics": summarize([r]),
                           "baseline": {"metrics": summarize([base])}})
    assert "compartment correct: 0.500 of 2" in text and "intraparenchymal hemorrhage" in text


def test_a_one_label_model_is_scored_on_compartment_cases_by_their_own_label_definitions(tmp_path):
    from UNetSegmentLib.analysis.evaluate import case_labels, score_case
    from UNetSegmentLib.models.training.cases import _write_case_labels

    _write_case_labels("ct_hemorrhage_compartments", tmp_path)
    defined = case_labels(tmp_path)
    assert defined["lesion_values"] == (1, 2, 3) and defined["labels"]["4"] == "oedema"
    assert case_labels(tmp_path / "nothing") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "labels.json").write_text("{}")
    with pytest.raises(Exception, match="not a label definition"):
        case_labels(tmp_path / "bad")
    truth = _two_bleeds_and_oedema()
    pred = np.isin(truth, LESION).astype(np.uint8)  # a one-label model that finds every bleed, no oedema
    r = score_case("c", _img(truth), _img(pred), lesion_values=(1,), truth_lesion_values=defined["lesion_values"])
    assert len(r.true_lesions) == 2 and all(l["detected"] for l in r.true_lesions) and r.false_lesions == 0
    assert r.dice == 1.0
    # without a label definition any non-zero truth voxel is lesion, as always (e.g. masks stored as 0/255)
    r = score_case("c", _img(np.where(pred > 0, 255, 0).astype(np.uint8)), _img(pred), lesion_values=(1,))
    assert r.dice == 1.0 and r.false_lesions == 0


def test_tta_variance_is_that_of_p_lesion_not_of_the_context():
    import torch

    from UNetSegmentLib.engine.inference import Predictor, tta_flips, with_mirror_tta

    def fn(x):  # lesion (channel 1) constant 0.5; oedema (channel 2) a ramp fixed to the window, not the
        r = torch.linspace(0.0, 0.4, x.shape[-1]).expand_as(x)  # image: mirrored copies disagree on it
        return torch.cat([0.5 - r, torch.full_like(x, 0.5), r], 1)

    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    flips = tta_flips(2, ("i",))
    var_lesion = with_mirror_tta(Predictor(fn, 3), flips, lesion_channels=(1,)).fn(x)[:, -1]
    var_any = with_mirror_tta(Predictor(fn, 3), flips).fn(x)[:, -1]
    assert float(var_lesion.abs().max()) < 1e-7 and float(var_any.max()) > 1e-3


def test_perilesional_distance_is_measured_in_ras_on_a_sheared_grid():
    """Gantry tilt: the k column is (2, 0, 1) mm, so index offset (−2, 0, +1) is 1 mm away, not 3."""
    m = np.eye(4)
    m[:3, 2] = (2.0, 0.0, 1.0)
    lab = np.zeros((12, 3, 30), np.uint8)
    lab[0, 1, 20] = 1
    lab[1, 1, 18] = 4  # 1 mm from the lesion
    lab[11, 1, 0] = 4  # 11 slices up, 20 columns back: (−20 + 22, 0, 11) → |(2, 0, 11)| ≈ 11.2 mm: out
    t = analyze_lesions(Image(lab, m), label_names=NAMES, lesion_values=LESION, perilesional_values=OEDEMA)
    assert t.rows[0]["perilesional_oedema_ml"] == pytest.approx(abs(np.linalg.det(m[:3, :3])) / 1000)


def test_per_lesion_heatmap_scale_ignores_the_context():
    from UNetSegmentLib.analysis.heatmap_scale import per_lesion

    lab = np.zeros((10, 40, 40), np.uint8)
    lab[5, 5:8, 5:8] = 1
    lab[5, 30:33, 30:33] = 4  # oedema far from the bleed (its own bleed was too small and removed)
    heat = np.zeros(lab.shape, np.float32)
    heat[5, 6, 6] = 1.0
    heat[5, 31, 31] = 0.1  # weak response at the oedema
    out = per_lesion(_img(heat), _img(lab), radius_mm=5.0, lesion_values=LESION).array
    assert out[5, 31, 31] == pytest.approx(0.1)  # not stretched to 1: no lesion there
    assert per_lesion(_img(heat), _img(lab), radius_mm=5.0).array[5, 31, 31] == pytest.approx(1.0)  # the old rule


def test_a_resumed_cohort_copies_tables_written_before_the_compartment_columns(tmp_path):
    from UNetSegmentLib.analysis.lesions import COLUMNS
    from UNetSegmentLib.serving import cohort_tables

    old = [c for c in COLUMNS if c not in ("compartment", "perilesional_oedema_ml")]
    (tmp_path / "case1").mkdir()
    (tmp_path / "case1" / "lesions.csv").write_text(",".join(old) + "\n" + ",".join(str(i) for i in range(len(old)))
                                                    + "\ntotal" + "," * (len(old) - 1) + "\n")
    text = cohort_tables._lesions_csv(tmp_path, [{"case_id": "case1", "status": cohort_tables.STATUS_RESUMED}])
    header, row = [line.split(",") for line in text.strip().splitlines()]
    assert header == ["case_id", *COLUMNS] and row[header.index("compartment")] == ""
    assert row[header.index("abc2_c_mm")] == str(old.index("abc2_c_mm"))


def test_class_balanced_crops_show_a_rare_class_as_often_as_a_common_one(tmp_path):
    from UNetSegmentLib.models.training.trainer import _Sampler

    x = np.zeros((1, 6, 64, 64), np.float32)
    common, rare = np.zeros((6, 64, 64), np.uint8), np.zeros((6, 64, 64), np.uint8)
    common[1:5, 10:40, 10:40] = 1  # 3600 voxels of class 1
    rare[3, 50:52, 50:52] = 3  # 4 voxels of class 3
    files = []
    for name, y in (("a", common), ("b", rare)):
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        files.append(tmp_path / f"{name}.npz")

    def share_with_rare(balanced: bool) -> float:
        s = _Sampler(files, 0, (16, 16), np.random.default_rng(0), 1.0, class_balanced=balanced)
        return float(np.mean([(s.patch()[1] == 3).any() for _ in range(400)]))

    assert share_with_rare(True) == pytest.approx(0.5, abs=0.1)  # one label in two
    many = [tmp_path / "a.npz"] * 9 + [tmp_path / "b.npz"]  # a rare class in 1 case of 10
    s = _Sampler(many, 0, (16, 16), np.random.default_rng(0), 1.0, class_balanced=True)
    assert np.mean([(s.patch()[1] == 3).any() for _ in range(400)]) == pytest.approx(0.5, abs=0.1)
    s = _Sampler(many, 0, (16, 16), np.random.default_rng(0), 1.0)
    assert np.mean([(s.patch()[1] == 3).any() for _ in range(400)]) < 0.2
