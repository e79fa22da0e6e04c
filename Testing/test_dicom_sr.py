"""measurements.dcm: the lesion table as a TID 1500 Comprehensive 3D SR, validated by dciodvfy, read back
with highdicom and with dcmqi's tid1500reader (the reader behind Slicer's QuantitativeReporting)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sysconfig

import pydicom
import pytest

from conftest import ct_phantom
from dicom_utils import dciodvfy_path, write_ct_series
from UNetSegmentLib.cli import main
from UNetSegmentLib.io.dicom_sr import NOT_DICOM, SCHEME


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sr")
    ct, _ = ct_phantom(shape_kji=(12, 96, 96), spacing=(1.0, 1.0, 3.0))
    write_ct_series(ct, tmp / "ct", shuffle_names=True)
    out = tmp / "out"
    assert main(["segment", str(tmp / "ct"), "-o", str(out), "--model", "tiny-blob", "-q", "--heatmap", "none"]) == 0
    with open(out / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:-1]
    return {"out": out, "ct": tmp / "ct", "rows": rows, "summary": json.loads((out / "summary.json").read_text())}


def test_sr_is_valid_dicom(dicom_run, capsys):
    out = dicom_run["out"]
    assert dicom_run["summary"]["dicom_sr"] == {"file": "measurements.dcm"}
    r = subprocess.run([dciodvfy_path(), str(out / "measurements.dcm")], capture_output=True, text=True, timeout=120)
    report = (r.stdout + r.stderr).strip()
    with capsys.disabled():
        print(f"\ndciodvfy measurements.dcm:\n{report}")
    assert not [ln for ln in report.splitlines() if ln.lstrip().startswith("Error")], report
    # the only warnings name our private coding scheme, which the SR declares
    assert all(SCHEME in ln for ln in report.splitlines() if ln.lstrip().startswith("Warning")), report


def test_sr_reads_back_with_highdicom_and_matches_the_table(dicom_run):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    out, rows = dicom_run["out"], dicom_run["rows"]
    sr = hd.sr.srread(out / "measurements.dcm")
    seg = pydicom.dcmread(out / "segmentation.dcm", stop_before_pixels=True)
    source = pydicom.dcmread(next(dicom_run["ct"].iterdir()), stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID
    assert {s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence} >= {SCHEME}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(rows) >= 1
    for group, row in zip(groups, rows):
        assert group.tracking_identifier == f"lesion {row['lesion']}"
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [1]
        assert ref.source_series_for_segmentation.value == source.SeriesInstanceUID
        values = {(m.name.value, m.name.scheme_designator): m for m in group.get_measurements()}
        volume = values[(codes.SCT.Volume.value, "SCT")]
        assert volume.value == pytest.approx(float(row["volume_ml"]), rel=1e-6) and volume.unit.value == "ml"
        assert values[("ABC2VOL", SCHEME)].value == pytest.approx(float(row["abc2_ml"]), rel=1e-6)
        for code, column in (("ABC2A", "abc2_a_mm"), ("ABC2B", "abc2_b_mm"), ("ABC2C", "abc2_c_mm")):
            assert values[(code, SCHEME)].value == pytest.approx(float(row[column]), rel=1e-6)
        lps = [-float(row["centroid_r"]), -float(row["centroid_a"]), float(row["centroid_s"])]
        for axis, expect in zip("XYZ", lps):
            assert values[(f"CENTROID{axis}", SCHEME)].value == pytest.approx(expect, abs=1e-6)
        assert values[("SLICEFIRST", SCHEME)].value == int(row["slice_first"])
        assert values[("SLICELAST", SCHEME)].value == int(row["slice_last"])
        density = values[(codes.DCM.MeanAttenuationCoefficient.value, "DCM")]
        assert density.value == pytest.approx(float(row["mean_intensity"]), rel=1e-6) and density.unit.value == "[hnsf'U]"
        assert values[(codes.DCM.Probability.value, "DCM")].value == pytest.approx(float(row["mean_probability"]), rel=1e-6)


def test_dcmqi_tid1500reader_reads_it(dicom_run, tmp_path):
    reader = shutil.which("tid1500reader") or shutil.which("tid1500reader", path=sysconfig.get_path("scripts"))
    assert reader, "dcmqi (a test requirement: pip install dcmqi) provides tid1500reader"
    meta = tmp_path / "sr.json"
    r = subprocess.run([reader, "--inputDICOM", str(dicom_run["out"] / "measurements.dcm"), "--outputMetadata", str(meta)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    read = json.loads(meta.read_text())
    groups = read["Measurements"]
    assert [g["TrackingIdentifier"] for g in groups] == [f"lesion {row['lesion']}" for row in dicom_run["rows"]]
    assert all(g["ReferencedSegment"] == 1 for g in groups)
    items = {i["quantity"]["CodeValue"]: float(i["value"]) for i in groups[0]["measurementItems"]}
    assert items["118565006"] == pytest.approx(float(dicom_run["rows"][0]["volume_ml"]), rel=1e-6)
    assert items["ABC2VOL"] == pytest.approx(float(dicom_run["rows"][0]["abc2_ml"]), rel=1e-6)


def test_no_sr_for_a_volume_file_and_summary_says_why(tmp_path):
    from UNetSegmentLib.io.writers import write_image

    ct, _ = ct_phantom(shape_kji=(12, 96, 96), spacing=(1.0, 1.0, 3.0))
    write_image(ct, tmp_path / "ct.nrrd")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "ct.nrrd"), "-o", str(out), "--model", "tiny-blob", "-q", "--heatmap", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dicom_sr"] == {"file": None, "absent_because": NOT_DICOM}
    assert not (out / "measurements.dcm").exists()


def test_sr_needs_the_seg_it_references(tmp_path):
    from UNetSegmentLib.analysis.lesions import analyze_lesions
    from UNetSegmentLib.io.dicom_sr import NO_SEG, write_measurement_report
    from UNetSegmentLib.io.readers import read_image

    ct, _ = ct_phantom(shape_kji=(6, 64, 64), spacing=(1.0, 1.0, 3.0))
    write_ct_series(ct, tmp_path / "ct")
    labels = read_image(tmp_path / "ct")
    labels = labels.with_array((labels.array > 50).astype("uint8"))
    table = analyze_lesions(labels)
    assert write_measurement_report(labels, tmp_path / "ct", tmp_path / "missing.dcm", table.rows, tmp_path / "m.dcm",
                                    model_name="m", model_version="1", intensity_unit="HU") == NO_SEG
    assert not (tmp_path / "m.dcm").exists()


def test_compare_of_dicom_scans_writes_the_change_into_the_sr(tmp_path, capsys):
    import highdicom as hd
    import numpy as np

    from UNetSegmentLib.phantom import head_with_blob

    ct, _ = head_with_blob(shape_kji=(16, 96, 96), spacing=(1.2, 1.2, 2.5))
    K, J, I = ct.array.shape
    k, j, i = np.mgrid[:K, :J, :I]
    grown = ((i - I * 0.62) / (I * 0.13)) ** 2 + ((j - J * 0.45) / (J * 0.12)) ** 2 + ((k - K / 2) / (K * 0.22)) ** 2 < 1
    current = ct.array.copy()
    current[grown] = 70
    write_ct_series(ct, tmp_path / "prior")
    write_ct_series(ct.with_array(current), tmp_path / "current")
    out = tmp_path / "cmp"
    assert main(["compare", "--prior", str(tmp_path / "prior"), "--current", str(tmp_path / "current"), "-o", str(out),
                 "--model", "tiny-blob", "-q", "--heatmap", "none"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["dicom_sr"] == {"file": "measurements.dcm"}
    r = subprocess.run([dciodvfy_path(), str(out / "measurements.dcm")], capture_output=True, text=True, timeout=120)
    report = (r.stdout + r.stderr).strip()
    assert not [ln for ln in report.splitlines() if ln.lstrip().startswith("Error")], report
    sr = hd.sr.srread(out / "measurements.dcm")
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    row = result["lesions"][0]
    assert row["status"] == "grown" and group.tracking_identifier == "lesion 1"
    values = {m.name.value: m.value for m in group.get_measurements()}
    assert values["PRIORVOL"] == pytest.approx(row["prior_ml"], rel=1e-6)
    assert values["VOLCHANGE"] == pytest.approx(row["change_ml"], rel=1e-6)
    assert values["VOLCHANGEPCT"] == pytest.approx(row["change_pct"], rel=1e-6)
    evaluations = {e.name.value: e.value.value for e in group.get_qualitative_evaluations()}
    assert evaluations["CHANGESTATUS"] == "STATUS_GROWN"
    assert evaluations["HEMEXP"] == ("373066001" if row["expansion"] else "373067005")  # SNOMED CT yes / no
    seg = pydicom.dcmread(out / "current" / "segmentation.dcm", stop_before_pixels=True)
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
