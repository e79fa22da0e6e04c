"""Where a lesion is, said one way everywhere: the two slices named apart, DICOM image references for series
input (matched by position, whatever the file order), and one terminology code per segment in every file."""
from __future__ import annotations

import csv
import json

import numpy as np
import pydicom
import pytest

from conftest import REPO
from dicom_utils import write_ct_series
from UNetSegmentLib.models.bundle import load_bundle, validate_meta
from UNetSegmentLib.errors import InputError, ModelError, UsageError
from UNetSegmentLib.image import Image
from UNetSegmentLib.io.readers import dicom_slice_refs, read_image
from UNetSegmentLib.analysis.lesions import DICOM_COLUMNS, analyze_lesions
from UNetSegmentLib.phantom import head_with_blob
from UNetSegmentLib.analysis.report import lesion_heading
from UNetSegmentLib.models.terminology import label_codes, label_terminology, parse_terminology

#: left-handed grid (every axis flipped): the reader orders the slices along the normal, so the
#: array's k runs opposite to the files' InstanceNumber (1..K in the writer's k order)
FLIPPED = np.diag([-1.0, -1.0, -1.0])


def _series(tmp_path, shape=(12, 40, 44)):
    img, _ = head_with_blob(shape_kji=shape, spacing=(1.1, 0.9, 3.0), direction=FLIPPED, origin=(20.0, 30.0, 40.0))
    files = write_ct_series(img, tmp_path / "ct", shuffle_names=True)  # file names say nothing about the order
    return img, files, read_image(tmp_path / "ct")


def _file_at(grid: Image, k: int, files) -> pydicom.Dataset:
    """The source file whose ImagePositionPatient is voxel (0, 0, k) of ``grid`` (found by position only)."""
    want = grid.ijk_to_lps[:3, :3] @ [0.0, 0.0, k] + grid.ijk_to_lps[:3, 3]
    hits = [ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)
            if np.allclose(np.asarray(ds.ImagePositionPatient, float), want, atol=1e-3)]
    assert len(hits) == 1
    return hits[0]


def test_dicom_columns_name_the_files_of_the_centroid_and_largest_area_slices(tmp_path):
    _, files, grid = _series(tmp_path)
    refs = dicom_slice_refs(tmp_path / "ct", grid)
    assert len(refs) == grid.array.shape[0]
    # a cone: wide at k=2, narrowing up to k=8 — the largest-area slice (2) is not the centroid slice
    lab = np.zeros(grid.array.shape, np.uint8)
    for k, r in zip(range(2, 9), (9, 8, 6, 5, 4, 3, 2)):
        jj, ii = np.ogrid[: lab.shape[1], : lab.shape[2]]
        lab[k][(jj - 20) ** 2 + (ii - 22) ** 2 <= r * r] = 1
    table = analyze_lesions(grid.with_array(lab), dicom_slices=refs)
    row = table.rows[0]
    assert row["slice_axis"] == "k" and row["largest_area_slice"] == 2 and row["slice_index"] == 3
    centroid_file = _file_at(grid, row["slice_index"], files)
    largest_file = _file_at(grid, row["largest_area_slice"], files)
    assert row["dicom_instance_number"] == int(centroid_file.InstanceNumber)
    assert row["dicom_sop_instance_uid"] == centroid_file.SOPInstanceUID
    assert row["dicom_largest_instance_number"] == int(largest_file.InstanceNumber)
    assert row["dicom_largest_sop_instance_uid"] == largest_file.SOPInstanceUID
    # the flip is real: InstanceNumber is not k + 1 of the array the table counts in
    assert row["dicom_instance_number"] != row["slice_index"] + 1
    assert all(table.total[c] is None for c in DICOM_COLUMNS)


def test_dicom_refs_follow_a_gantry_tilted_series(tmp_path):
    """Sheared grid (15° tilt, each slice steps anterior): every k maps to the file at its true position."""
    base, _ = head_with_blob(shape_kji=(8, 40, 40), spacing=(1.0, 1.0, 5.0))
    m = base.ijk_to_ras.copy()
    m[:3, 2] = 5.0 * np.array([0.0, np.sin(np.deg2rad(15.0)), np.cos(np.deg2rad(15.0))])
    files = write_ct_series(Image(base.array, m), tmp_path / "ct", shuffle_names=True)
    grid = read_image(tmp_path / "ct")
    refs = dicom_slice_refs(tmp_path / "ct", grid)
    for k, ref in enumerate(refs):
        f = _file_at(grid, k, files)
        assert (ref.instance_number, ref.sop_instance_uid) == (int(f.InstanceNumber), f.SOPInstanceUID)


def test_dicom_refs_refuse_a_grid_the_files_do_not_lie_on(tmp_path):
    _, _, grid = _series(tmp_path)
    m = grid.ijk_to_ras.copy()
    m[2, 3] += 1.5  # half a slice (3 mm) superior: no file lies on a slice of this grid
    shifted = Image(grid.array, m)
    with pytest.raises(InputError, match="is not one of the"):
        dicom_slice_refs(tmp_path / "ct", shifted)


def test_dicom_refs_must_match_the_label_grid():
    lab = Image(np.ones((3, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(UsageError, match="dicom_slices has 2 entries for 3 slices"):
        analyze_lesions(lab, dicom_slices=[None, None])


def test_segment_on_a_dicom_series_fills_the_columns_and_keeps_one_code_everywhere(tmp_path, capsys):
    """End to end (tiny-blob): lesions.csv/.tsv/summary.json carry the DICOM references after the other
    columns; the .seg.nrrd, the DICOM SEG and summary.json carry the same segment code; the CLI names the
    two slices apart."""
    import slicerio

    from UNetSegmentLib.cli import _print_result
    from UNetSegmentLib.serving.job import segment_files
    from UNetSegmentLib.params import SegmentParams

    img, _ = head_with_blob(direction=FLIPPED)  # the phantom tiny-blob finds
    files = write_ct_series(img, tmp_path / "ct", shuffle_names=True)
    out = tmp_path / "out"
    summary = segment_files([str(tmp_path / "ct")], out, "tiny-blob", SegmentParams(heatmaps=()))
    grid = read_image(tmp_path / "ct")
    with open(out / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "lesions.tsv", newline="") as f:
        header = next(csv.reader(f, delimiter="\t"))
    assert header[-4:] == list(DICOM_COLUMNS) and list(rows[0])[-4:] == list(DICOM_COLUMNS)
    body = [r for r in rows if r["lesion"] != "total"]
    assert body, "tiny-blob found no lesion in its phantom"
    r = body[0]
    f = _file_at(grid, int(r["slice_index"]), files)
    assert (r["dicom_instance_number"], r["dicom_sop_instance_uid"]) == (str(f.InstanceNumber), f.SOPInstanceUID)
    f = _file_at(grid, int(r["largest_area_slice"]), files)
    assert (r["dicom_largest_instance_number"], r["dicom_largest_sop_instance_uid"]) == (str(f.InstanceNumber), f.SOPInstanceUID)
    les = summary["lesions"][0]
    assert les["dicom_instance_number"] == int(r["dicom_instance_number"])
    assert summary["columns"]["dicom_instance_number"]["description"].startswith("DICOM input only")

    # one terminology: .seg.nrrd (Slicer TerminologyEntry) == DICOM SEG == summary.json == the bundle's code
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"), skip_voxels=True)
    term = seg["segments"][0]["terminology"]  # slicerio's own parse of the TerminologyEntry tag
    nrrd_cat, nrrd_type = ({"scheme": s, "value": v, "meaning": m} for s, v, m in (term["category"], term["type"]))
    dcm = pydicom.dcmread(out / "segmentation.dcm").SegmentSequence[0]
    dcm_type = dcm.SegmentedPropertyTypeCodeSequence[0]
    dcm_cat = dcm.SegmentedPropertyCategoryCodeSequence[0]
    assert (nrrd_type["value"], nrrd_type["meaning"]) == (dcm_type.CodeValue, dcm_type.CodeMeaning)
    assert (nrrd_cat["value"], nrrd_cat["meaning"]) == (dcm_cat.CodeValue, dcm_cat.CodeMeaning)
    assert summary["segments"][0]["code"] == nrrd_type == label_codes(load_bundle("tiny-blob").labels[0])[1]

    capsys.readouterr()
    _print_result(json.loads((out / "summary.json").read_text()), out)
    text = capsys.readouterr().out
    assert "centroid slice" in text and "largest-area slice" in text and "DICOM image" in text


def test_report_heading_names_both_slices():
    row = {"lesion": 2, "label": "hemorrhage", "volume_ml": 3.2, "slice_axis": "k", "slice_index": 54,
           "largest_area_slice": 57, "slice_first": 50, "slice_last": 60, "max_inplane_diameter_mm": 21.0,
           "side": "left", "dicom_instance_number": 48, "dicom_largest_instance_number": 45}
    h = lesion_heading(row)
    assert "largest-area slice k=57 (DICOM image 45)" in h and "centroid slice k=54 (DICOM image 48)" in h
    assert "DICOM" not in lesion_heading({**row, "dicom_instance_number": None, "dicom_largest_instance_number": None})


@pytest.mark.parametrize("model", ["ct-hemorrhage", "mr-perfusion-lesion", "tiny-blob"])
def test_bundled_models_give_one_code_per_segment(model):
    for label in load_bundle(model).labels:
        category, code = label_codes(label)
        assert parse_terminology(label_terminology(label)) == (category, code)
        assert label.get("code") in (None, code)


def test_bundle_with_two_codes_for_one_segment_is_refused():
    meta = json.loads((REPO / "Resources" / "Models" / "ct-hemorrhage" / "model.json").read_text())
    meta["labels"][0]["code"] = {"scheme": "SCT", "value": "1386000", "meaning": "Intracranial hemorrhage"}
    with pytest.raises(ModelError, match="differ"):
        validate_meta(meta)
    meta["labels"][0]["terminology"] = "not a terminology"
    with pytest.raises(ModelError, match="not a Slicer terminology entry"):
        validate_meta(meta)


def test_label_without_terminology_gets_one_built_from_its_code():
    label = {"value": 1, "name": "core", "color": [1, 0, 0], "code": {"scheme": "SCT", "value": "55641003", "meaning": "Infarct"}}
    cat, typ = parse_terminology(label_terminology(label))
    assert typ == label["code"] and cat["value"] == "49755003"
    assert label_codes({"value": 1, "name": "x", "color": [1, 0, 0]})[1]["meaning"] == "Lesion"
