"""DICOM: reading CT series folders (geometry round trip, refusals) and writing DICOM SEG (validated by dciodvfy)."""
from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest

from conftest import ct_phantom, oblique_direction
from dicom_utils import dciodvfy_path, write_ct_series
from UNetSegmentLib.errors import InputError
from UNetSegmentLib.image import Image
from UNetSegmentLib.io.dicom_seg import NO_LESION, write_dicom_seg
from UNetSegmentLib.io.readers import read_image

SPACING = (0.7, 0.9, 2.5)  # anisotropic, and i != j so a PixelSpacing swap shows


def _phantom(right_handed: bool = True) -> tuple[Image, np.ndarray]:
    """Oblique (12° about L-R), i flipped; j flipped too for a right-handed grid, else left-handed."""
    d = oblique_direction(12.0, flip_i=True)
    if right_handed:
        d[:, 1] *= -1
    assert (np.linalg.det(d) > 0) == right_handed
    return ct_phantom(shape_kji=(12, 40, 48), spacing=SPACING, direction=d, origin=(31.5, -12.25, 47.0))


# --- reading -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_read_series_round_trip(tmp_path, shuffle):
    img, _ = _phantom()
    write_ct_series(img, tmp_path, shuffle_names=shuffle)
    back = read_image(tmp_path)
    assert back.array.shape == img.array.shape
    assert np.array_equal(back.array, img.array)
    np.testing.assert_allclose(back.ijk_to_ras, img.ijk_to_ras, atol=1e-5)


def test_read_left_handed_series_gives_the_same_physical_image(tmp_path):
    """Slices stacked against cross(row, column): the reader orders them along the normal, so k is reversed."""
    img, _ = _phantom(right_handed=False)
    write_ct_series(img, tmp_path, shuffle_names=True)
    back = read_image(tmp_path)
    K = img.array.shape[0]
    flip_k = np.eye(4)
    flip_k[2, 2], flip_k[2, 3] = -1.0, K - 1
    assert np.array_equal(back.array, img.array[::-1])
    np.testing.assert_allclose(back.ijk_to_ras, img.ijk_to_ras @ flip_k, atol=1e-5)


def test_read_refuses_two_series(tmp_path):
    img, _ = _phantom()
    a = write_ct_series(img, tmp_path, prefix="A", series_number=1)
    b = write_ct_series(img, tmp_path, prefix="B", series_number=2, study_uid=pydicom.dcmread(a[0]).StudyInstanceUID)
    uids = [pydicom.dcmread(p[0]).SeriesInstanceUID for p in (a, b)]
    with pytest.raises(InputError, match="holds 2 DICOM series") as e:
        read_image(tmp_path)
    assert all(u in str(e.value) for u in uids)


def test_read_refuses_missing_slice(tmp_path):
    img, _ = _phantom()
    paths = write_ct_series(img, tmp_path)
    paths[len(paths) // 2].unlink()
    with pytest.raises(InputError, match="uneven slice spacing"):
        read_image(tmp_path)


def test_read_refuses_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no DICOM series found"):
        read_image(tmp_path)


# --- DICOM SEG -----------------------------------------------------------------------------------
SEGMENTS = [
    {"value": 1, "name": "lesion A", "color": [1.0, 0.0, 0.0]},
    {"value": 2, "name": "lesion B (empty)", "color": [0.0, 1.0, 0.0]},
    {"value": 3, "name": "lesion C", "color": [0.0, 0.0, 1.0],
     "code": {"scheme": "SCT", "value": "230690007", "meaning": "Cerebrovascular accident"}},
]


def _labels(grid: Image, mask: np.ndarray) -> Image:
    lab = np.zeros(grid.array.shape, np.uint8)
    lab[mask] = 1
    lab[2:4, 5:9, 6:12] = 3  # a second lesion, touching the volume's low-k end
    return grid.with_array(lab)


def _seg_labelmap(seg, source_uids, numbers_to_values) -> np.ndarray:
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, combine_segments=True,
                                           assert_missing_frames_are_empty=True)
    out = np.zeros(px.shape, np.uint8)
    for n, v in numbers_to_values.items():
        out[px == n] = v
    return out


def test_dicom_seg_valid_and_round_trips(tmp_path, capsys):
    import highdicom as hd

    img, mask = _phantom()
    ct = tmp_path / "ct"
    write_ct_series(img, ct, shuffle_names=True)
    labels = _labels(read_image(ct), mask)
    out = tmp_path / "out" / "seg.dcm"
    assert write_dicom_seg(labels, ct, SEGMENTS, out, model_name="test-model", model_version="0.0.1") is None
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.dcm"]  # no temp file left

    dciodvfy = dciodvfy_path()
    r = subprocess.run([dciodvfy, str(out)], capture_output=True, text=True, timeout=120)
    report = (r.stdout + r.stderr).strip()
    with capsys.disabled():
        print(f"\ndciodvfy {out.name}:\n{report}")
    errors = [ln for ln in report.splitlines() if ln.lstrip().startswith("Error")]
    assert not errors, report

    seg = hd.seg.segread(out)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.Manufacturer == "UNetSegment"
    assert seg.SeriesDescription and seg.ContentLabel and seg.SeriesNumber
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["lesion A", "lesion C"]
    assert [d.SegmentNumber for d in seg.SegmentSequence] == [1, 2]
    d1, d2 = seg.SegmentSequence
    assert (d1.SegmentedPropertyTypeCodeSequence[0].CodeValue, d1.SegmentedPropertyTypeCodeSequence[0].CodeMeaning) == ("52988006", "Lesion")
    assert d2.SegmentedPropertyTypeCodeSequence[0].CodeValue == "230690007"
    assert d1.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert d1.SegmentAlgorithmType == "AUTOMATIC"
    assert d1.SegmentAlgorithmName == "UNetSegment test-model"
    alg = d1.SegmentationAlgorithmIdentificationSequence[0]
    assert (alg.AlgorithmName, alg.AlgorithmVersion) == ("UNetSegment test-model", "0.0.1")
    assert alg.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert hd.color.CIELabColor.from_dicom_value(d1.RecommendedDisplayCIELabValue).to_rgb() == (255, 0, 0)
    assert hd.color.CIELabColor.from_dicom_value(d2.RecommendedDisplayCIELabValue).to_rgb() == (0, 0, 255)

    # frames: one per (slice, segment) holding that segment
    expected_frames = sum(int(np.any(labels.array[k] == v)) for k in range(labels.array.shape[0]) for v in (1, 3))
    assert int(seg.NumberOfFrames) == expected_frames
    # references and geometry: the CT series, frame by frame
    src = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in ct.iterdir())}
    first = next(iter(src.values()))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    # map back in label k order (the order of ImagePositionPatient along the grid's k axis)
    inv = np.linalg.inv(labels.ijk_to_lps)
    k_of = {u: int(round((inv[:3, :3] @ np.asarray(ds.ImagePositionPatient, float) + inv[:3, 3])[2])) for u, ds in src.items()}
    uids = sorted(src, key=k_of.get)
    assert [k_of[u] for u in uids] == list(range(labels.array.shape[0]))
    assert np.array_equal(_seg_labelmap(seg, uids, {1: 1, 2: 3}), labels.array)


def test_dicom_seg_left_handed_labels_match_by_position(tmp_path):
    """Labels on a grid whose k runs against the files' normal: frames are matched by position, not file order."""
    import highdicom as hd

    img, mask = _phantom(right_handed=False)
    ct = tmp_path / "ct"
    paths = write_ct_series(img, ct)  # paths in img's k order
    labels = _labels(img, mask)
    out = tmp_path / "seg.dcm"
    assert write_dicom_seg(labels, ct, SEGMENTS, out, model_name="m", model_version="1") is None
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert np.array_equal(_seg_labelmap(hd.seg.segread(out), uids, {1: 1, 2: 3}), labels.array)


@pytest.mark.parametrize("change", ["shift", "slices", "spacing"])
def test_dicom_seg_refuses_labels_off_the_series_grid(tmp_path, change):
    img, mask = _phantom()
    ct = tmp_path / "ct"
    write_ct_series(img, ct)
    labels = _labels(img, mask)
    m = labels.ijk_to_ras.copy()
    if change == "shift":
        m[:3, 3] += m[:3, 0] * 0.5  # half a voxel along i
        labels = Image(labels.array, m)
    elif change == "slices":
        labels = Image(labels.array[:-1], m)
    else:
        m[:3, 1] *= 1.1
        labels = Image(labels.array, m)
    out = tmp_path / "seg.dcm"
    with pytest.raises(InputError, match="do not lie on the grid"):
        write_dicom_seg(labels, ct, SEGMENTS, out, model_name="m", model_version="1")
    assert not out.exists()


def test_dicom_seg_empty_labels_write_nothing(tmp_path):
    img, _ = _phantom()
    ct = tmp_path / "ct"
    write_ct_series(img, ct)
    out = tmp_path / "out"
    out.mkdir()
    labels = img.with_array(np.zeros(img.array.shape, np.uint8))
    assert write_dicom_seg(labels, ct, SEGMENTS, out / "seg.dcm", model_name="m", model_version="1") == NO_LESION
    # also when only values without a segment are present
    labels = img.with_array(np.full(img.array.shape, 7, np.uint8))
    assert write_dicom_seg(labels, ct, SEGMENTS, out / "seg.dcm", model_name="m", model_version="1") == NO_LESION
    assert list(out.iterdir()) == []


def test_gantry_tilted_series_keeps_its_true_slice_positions(tmp_path):
    """ITK builds an orthogonal grid and misplaces tilted slices; we keep the sheared geometry."""
    import json

    from conftest import ct_phantom

    from UNetSegmentLib.cli import main

    base, _ = ct_phantom(shape_kji=(8, 96, 96), spacing=(1.0, 1.0, 5.0))
    m = base.ijk_to_ras.copy()
    tilt = np.deg2rad(15.0)
    m[:3, 2] = 5.0 * np.array([0.0, np.sin(tilt), np.cos(tilt)])  # each slice steps 1.3 mm anterior
    tilted = Image(base.array, m)
    folder = tmp_path / "tilted"
    write_ct_series(tilted, folder)
    back = read_image(folder)
    np.testing.assert_allclose(back.ijk_to_ras, tilted.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(back.array, tilted.array)
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--model", "tiny-blob", "-q", "--heatmap", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert any("non-orthogonal" in w for w in summary["warnings"])
    for f in ("segmentation.seg.nrrd", "probability.nrrd"):
        np.testing.assert_allclose(read_image(out / f).ijk_to_ras, tilted.ijk_to_ras, atol=1e-4)
    assert any("segmentation.nii.gz cannot store" in w for w in summary["warnings"])
    assert summary["n_lesions"] >= 1 and summary["dicom_seg"] == {"file": "segmentation.dcm"}
