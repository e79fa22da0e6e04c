"""Follow-up comparison: lesion matching and change rules (known answers), registration of the real head CT
against a known rigid motion, and `unetsegment compare` end to end on phantoms (files, columns, refusals)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from UNetSegmentLib.analysis.followup import COMPARISON_COLUMNS, ChangeRules, compare_tables, link_lesions
from UNetSegmentLib.cli import main
from UNetSegmentLib.image import from_sitk, to_sitk
from UNetSegmentLib.io.writers import write_image
from UNetSegmentLib.phantom import head_with_blob


# --- matching and rules ------------------------------------------------------------------------
def _maps():
    """Current and (registered) prior lesion maps: 1↔1 one-to-one, prior 2 split into current 2 and 3,
    prior 3 and 4 merged into current 4, current 5 new, prior 5 resolved."""
    cur, pri = np.zeros((4, 40, 40), np.int32), np.zeros((4, 40, 40), np.int32)
    cur[1, 2:6, 2:6], pri[1, 2:6, 3:7] = 1, 1
    pri[1, 10:14, 2:12] = 2
    cur[1, 10:14, 2:6], cur[1, 10:14, 8:12] = 2, 3
    pri[1, 20:24, 2:6], pri[1, 20:24, 8:12] = 3, 4
    cur[1, 20:24, 2:12] = 4
    cur[1, 30:34, 30:34] = 5
    pri[2, 30:34, 2:6] = 5
    return cur, pri


def _counts(m):
    return {int(v): int(n) for v, n in enumerate(np.bincount(m.ravel())) if v and n}


def test_link_lesions_one_to_one_split_merge_new_resolved():
    cur, pri = _maps()
    groups = link_lesions(cur, pri, _counts(cur), _counts(pri))
    assert groups == [([1], [1]), ([2, 3], [2]), ([4], [3, 4]), ([5], []), ([], [5])]


def test_a_touch_under_the_overlap_share_does_not_link():
    cur, pri = np.zeros((1, 60, 60), np.int32), np.zeros((1, 60, 60), np.int32)
    cur[0, 0:40, 0:40] = 1
    pri[0, 39:60, 39:60] = 1  # one voxel of 441 overlaps: < 5 % of the smaller lesion
    assert link_lesions(cur, pri, _counts(cur), _counts(pri)) == [([1], []), ([], [1])]


@pytest.mark.parametrize("prior, current, status, expansion", [
    (10.0, 10.4, "stable", False),  # within 0.5 mL
    (10.0, 10.9, "stable", False),  # within 10 %
    (10.0, 11.2, "grown", False),
    (10.0, 13.4, "grown", True),  # +34 %
    (20.0, 26.5, "grown", True),  # +6.5 mL (32.5 %)
    (20.0, 12.0, "shrunk", False),
    (0.0, 3.0, "new", False),
    (3.0, 0.0, "resolved", False),
])
def test_change_rules_default_definition(prior, current, status, expansion):
    rules = ChangeRules()
    assert (rules.status(prior, current), rules.expansion(prior, current)) == (status, expansion)


def test_another_trials_expansion_definition():
    rules = ChangeRules(expansion_ml=12.5, expansion_pct=1000.0)
    assert not rules.expansion(20.0, 32.0) and rules.expansion(20.0, 33.0)


def test_compare_tables_rows_and_total():
    cur, pri = _maps()
    groups = link_lesions(cur, pri, _counts(cur), _counts(pri))
    crow = lambda n, ml, x: {"lesion": n, "volume_ml": ml, "centroid_r": x, "centroid_a": 0.0, "centroid_s": 0.0}  # noqa: E731
    current_rows = [crow(1, 10.6, 1.0), crow(2, 3.0, 2.0), crow(3, 3.0, 4.0), crow(4, 8.4, 3.0), crow(5, 2.0, 5.0)]
    prior_rows = [crow(1, 6.0, 0.0), crow(2, 5.0, 0.0), crow(3, 4.0, 0.0), crow(4, 4.0, 0.0), crow(5, 1.5, 0.0)]
    rows, total = compare_tables(groups, current_rows, prior_rows, {n: np.array([9.0, 9.0, 9.0]) for n in range(1, 6)},
                                 ChangeRules())
    by = {(r["current_lesion"], r["prior_lesion"]): r for r in rows}
    assert by[("1", "1")]["status"] == "grown" and by[("1", "1")]["expansion"]  # +4.6 mL, +77 %
    assert by[("2+3", "2")]["match"] == "split" and by[("2+3", "2")]["change_ml"] == pytest.approx(1.0)
    assert by[("2+3", "2")]["centroid_r"] == pytest.approx(3.0)  # volume-weighted over the current pieces
    assert by[("4", "3+4")]["match"] == "merge" and by[("4", "3+4")]["status"] == "stable"  # 8 → 8.4 mL
    assert by[("5", "")]["status"] == "new" and by[("5", "")]["change_pct"] is None
    assert by[("", "5")]["status"] == "resolved" and by[("", "5")]["centroid_r"] == pytest.approx(9.0)
    assert [r["current_lesion"] for r in rows] == ["1", "2+3", "4", "5", ""]
    assert total["prior_ml"] == pytest.approx(20.5) and total["current_ml"] == pytest.approx(27.0)
    assert total["status"] == "grown" and total["expansion"]  # +6.5 mL


# --- registration --------------------------------------------------------------------------------
def test_registration_recovers_a_known_rigid_motion_of_the_real_head_ct(head_ct):
    import SimpleITK as sitk

    from UNetSegmentLib.engine.registration import register

    src = sitk.Shrink(to_sitk(head_ct), [2, 2, 1])  # 2 mm in-plane keeps the test short
    prior = from_sitk(src)
    t = sitk.Euler3DTransform()
    t.SetCenter(src.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in src.GetSize()]))
    t.SetRotation(*np.deg2rad([6.0, -5.0, 9.0]))
    t.SetTranslation((10.0, -8.0, 6.0))
    ref = sitk.Image([src.GetSize()[0], src.GetSize()[1], src.GetSize()[2] * 15 // 40], sitk.sitkInt16)
    ref.SetSpacing((src.GetSpacing()[0], src.GetSpacing()[1], 4.0))
    ref.SetOrigin(src.GetOrigin())
    ref.SetDirection(src.GetDirection())
    current = from_sitk(sitk.Resample(src, ref, t, sitk.sitkLinear, -1024.0, sitk.sitkInt16))
    reg = register(current, prior, modality="CT")
    m = reg.current_to_prior_ras
    brain = current.ijk_to_ras_points(np.argwhere(current.array > 0)[::97][:, ::-1].astype(float))
    lps = brain * [-1, -1, 1]
    truth = np.array([t.TransformPoint(p.tolist()) for p in lps]) * [-1, -1, 1]
    tre = np.linalg.norm(brain @ m[:3, :3].T + m[:3, 3] - truth, axis=1)
    assert np.median(tre) < 1.0 and reg.head_dice > 0.95, (np.median(tre), reg.head_dice)


# --- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A phantom prior with one blob, and the current scan with that blob grown and a new one."""
    tmp = tmp_path_factory.mktemp("compare")
    ct, _ = head_with_blob(shape_kji=(24, 96, 96), spacing=(1.2, 1.2, 2.0))
    K, J, I = ct.array.shape
    k, j, i = np.mgrid[:K, :J, :I]
    big = ((i - I * 0.62) / (I * 0.12)) ** 2 + ((j - J * 0.45) / (J * 0.11)) ** 2 + ((k - K / 2) / (K * 0.2)) ** 2 < 1
    new = ((i - I * 0.35) / (I * 0.07)) ** 2 + ((j - J * 0.6) / (J * 0.07)) ** 2 + ((k - K / 2) / (K * 0.15)) ** 2 < 1
    a = ct.array.copy()
    a[big | new] = 70
    write_image(ct, tmp / "prior.nrrd")
    write_image(ct.with_array(a), tmp / "current.nrrd")
    opts = ["--model", "tiny-blob", "-q", "--heatmap", "none"]
    assert main(["segment", str(tmp / "prior.nrrd"), "-o", str(tmp / "prior_run"), *opts]) == 0
    return tmp, opts


def test_compare_with_an_earlier_run_writes_the_comparison(scans):
    tmp, opts = scans
    out = tmp / "out"
    assert main(["compare", "--prior", str(tmp / "prior_run"), "--current", str(tmp / "current.nrrd"), "-o", str(out),
                 *opts]) == 0
    assert {"comparison.csv", "comparison.json", "comparison.png", "prior_registered.nrrd", "current"} <= {
        p.name for p in out.iterdir()}
    with open(out / "comparison.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert tuple(header[: len(COMPARISON_COLUMNS)]) == COMPARISON_COLUMNS
    rec = [dict(zip(header, r)) for r in rows]
    assert [r["status"] for r in rec] == ["grown", "new", "grown"]  # the two lesions, then the total
    assert rec[0]["current_lesion"] == "1" and rec[0]["prior_lesion"] == "1" and rec[0]["expansion"] == "true"
    assert rec[1]["prior_lesion"] == "" and rec[1]["change_pct"] == "" and rec[1]["expansion"] == "false"
    assert rec[-1]["current_lesion"] == "total"
    result = json.loads((out / "comparison.json").read_text())
    assert result["registration"]["head_dice"] > 0.99 and result["flags"]["new_lesions"] == 1
    assert result["flags"]["hematoma_expansion"] is True
    prior_table = list(csv.DictReader(open(tmp / "prior_run" / "lesions.csv", newline="")))
    assert float(rec[0]["prior_ml"]) == pytest.approx(float(prior_table[0]["volume_ml"]), rel=1e-6)
    # a second run into the same folder is refused (exit 6) unless --overwrite
    assert main(["compare", "--prior", str(tmp / "prior_run"), "--current", str(tmp / "current.nrrd"), "-o", str(out),
                 *opts]) == 6
    assert main(["compare", "--prior", str(tmp / "prior_run"), "--current", str(tmp / "current.nrrd"), "-o", str(out),
                 "--overwrite", "--expansion-ml", "100", "--expansion-pct", "1000", *opts]) == 0
    latest = json.loads((out / "comparison.json").read_text())
    assert latest["flags"]["hematoma_expansion"] is False
    # the current scan given as its earlier run: compared without segmenting it again
    assert main(["compare", "--prior", str(tmp / "prior_run"), "--current", str(out / "current"), "-o", str(tmp / "c"),
                 *opts]) == 0
    assert not (tmp / "c" / "current").exists()
    again = json.loads((tmp / "c" / "comparison.json").read_text())
    assert again["current"]["run_id"] == latest["current"]["run_id"]
    assert [(r["current_lesion"], r["prior_lesion"], r["status"]) for r in again["lesions"]] == [
        (r["current_lesion"], r["prior_lesion"], r["status"]) for r in result["lesions"]]


def test_compare_segments_a_prior_scan_and_refuses_one_that_does_not_register(scans, tmp_path, capsys):
    tmp, opts = scans
    assert main(["compare", "--prior", str(tmp / "prior.nrrd"), "--current", str(tmp / "current.nrrd"),
                 "-o", str(tmp_path / "a"), *opts]) == 0
    assert (tmp_path / "a" / "prior" / "summary.json").is_file()
    # a prior of another shape (a thin slab of the head) cannot be registered: exit 3, no comparison files
    ct, _ = head_with_blob(shape_kji=(24, 96, 96), spacing=(1.2, 1.2, 2.0))
    slab = ct.array.copy()
    slab[:, :, 40:] = -1000
    write_image(ct.with_array(slab), tmp_path / "other.nrrd")
    capsys.readouterr()
    assert main(["compare", "--prior", str(tmp_path / "other.nrrd"), "--current", str(tmp / "current.nrrd"),
                 "-o", str(tmp_path / "b"), *opts]) == 3
    assert "did not register" in capsys.readouterr().err
    assert not (tmp_path / "b" / "comparison.json").exists()
