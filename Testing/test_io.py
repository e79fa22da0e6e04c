"""Readers and writers: geometry round trips (flipped, oblique), LPS↔RAS, refusals, atomic writes."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_direction

from UNetSegmentLib.errors import InputError, OutputError
from UNetSegmentLib.image import Image, from_sitk, make_ijk_to_ras, resample, slice_axis, to_sitk
from UNetSegmentLib.io.readers import pixels, quiet_itk, read_image
from UNetSegmentLib.io.writers import write_image, write_json, write_raw_nrrd, write_seg_nrrd, write_text

GEOMETRIES = {
    "axial": (np.eye(3), (0.8, 0.8, 2.5)),
    "flipped": (np.diag([-1.0, -1.0, 1.0]), (0.9, 0.7, 3.0)),
    "oblique": (oblique_direction(17.0), (0.6, 0.9, 1.7)),
    "permuted": (np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float), (1.1, 1.3, 0.5)),
}


def _image(name, dtype=np.int16):
    d, sp = GEOMETRIES[name]
    arr = (np.arange(7 * 9 * 11).reshape(7, 9, 11) % 251 - 100).astype(dtype)
    return Image(arr, make_ijk_to_ras(sp, d, (-123.4, 56.7, -8.9)))


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, geometry, suffix):
    img = _image(geometry)
    path = tmp_path / f"v{suffix}"
    write_image(img, path)
    back = read_image(path)
    np.testing.assert_array_equal(back.array, img.array)
    # every voxel centre within 1e-5 mm of where it was
    corners = np.array([[0, 0, 0], [10, 8, 6], [10, 0, 6], [0, 8, 0]], float)
    np.testing.assert_allclose(back.ijk_to_ras_points(corners), img.ijk_to_ras_points(corners), atol=1e-5)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.float32, np.float64, np.bool_])
def test_raw_nrrd_reads_back_as_simpleitks_nrrd_does(tmp_path, geometry, dtype):
    """The Slicer module's scratch inputs, written straight from the array: the voxels and the grid
    SimpleITK's own writer gives, for every geometry (flipped, oblique, permuted) and voxel type."""
    img = _image(geometry, dtype)
    ours, sitks = tmp_path / "ours.nrrd", tmp_path / "sitk.nrrd"
    write_raw_nrrd(img, ours)
    write_image(img, sitks, compress=False)
    a, b = read_image(ours), read_image(sitks)
    np.testing.assert_array_equal(a.array, b.array)
    assert a.array.dtype == b.array.dtype
    np.testing.assert_allclose(a.ijk_to_ras, img.ijk_to_ras, atol=1e-12)
    assert os.path.getsize(ours) < img.array.nbytes + 600  # raw: no compression, a short header
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # atomic: no temporary left
    flipped_view = Image(img.array[::-1], img.ijk_to_ras)  # not C-contiguous: written in its own order
    write_raw_nrrd(flipped_view, ours)
    np.testing.assert_array_equal(read_image(ours).array, img.array[::-1])
    with pytest.raises(ValueError, match="3D scalar"):
        write_raw_nrrd(Image(np.zeros((2, 3, 4, 3), np.float32), img.ijk_to_ras), ours)


def test_pixels_are_the_images_own_buffer_and_outlive_it():
    """A read image's voxels without a copy: writable, independent of the image they came from, and
    valid after that image is dropped (the array keeps it alive)."""
    import gc
    import weakref

    values = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = sitk.GetImageFromArray(values)
    original = sitk.Image(img)  # shares the buffer until one of them is written (ITK's copy on write)
    arr = pixels(img)
    assert arr.flags.writeable and arr.shape == (4, 5, 6) and arr.dtype == np.int16
    np.testing.assert_array_equal(arr, values)
    arr[0, 0, 0] = -7  # the array's image only: the copy made before is untouched
    assert original[0, 0, 0] == 0
    holder = weakref.ref(arr.base)
    del img
    gc.collect()
    assert holder() is not None  # the array holds the image
    np.testing.assert_array_equal(arr[1:], values[1:])
    del arr
    gc.collect()
    assert holder() is None  # and lets it go with the array


def test_sitk_edge_converts_lps_to_ras_once():
    img = _image("oblique")
    s = to_sitk(img)
    # SimpleITK reports LPS: x and y negated
    lps = np.array(s.TransformContinuousIndexToPhysicalPoint((3.0, 4.0, 5.0)))
    ras = img.ijk_to_ras_points([[3.0, 4.0, 5.0]])[0]
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)
    back = from_sitk(s)
    np.testing.assert_allclose(back.ijk_to_ras, img.ijk_to_ras, atol=1e-12)


def test_nifti_read_matches_nibabel_style_ras_affine(tmp_path):
    """A NIfTI written by SimpleITK stores RAS in its sform: check we agree with the header."""
    img = _image("oblique")
    p = tmp_path / "v.nii"
    write_image(img, p, compress=False)
    raw = p.read_bytes()
    srow = np.frombuffer(raw[280:328], dtype="<f4").reshape(3, 4)
    np.testing.assert_allclose(srow, img.ijk_to_ras[:3], atol=1e-4)


def test_image_helpers():
    img = _image("permuted")
    assert slice_axis(img.ijk_to_ras) == 1  # j runs along −S
    assert img.shape_ijk == (11, 9, 7)
    np.testing.assert_allclose(img.spacing, (1.1, 1.3, 0.5))
    np.testing.assert_allclose(img.voxel_volume_mm3, 1.1 * 1.3 * 0.5)
    pts = np.random.default_rng(0).uniform(0, 5, (10, 3))
    np.testing.assert_allclose(img.ras_to_ijk_points(img.ijk_to_ras_points(pts)), pts, atol=1e-9)
    with pytest.raises(ValueError):
        img.with_array(np.zeros((2, 2, 2)))


def test_resample_onto_the_same_grid_is_identity():
    img = _image("oblique", np.float32)
    out = resample(img, img.array.shape, img.ijk_to_ras, order=1)
    np.testing.assert_allclose(out.array, img.array, atol=1e-4)
    lab = resample(_image("flipped"), (7, 9, 11), _image("flipped").ijk_to_ras, order=0)
    assert lab.array.dtype == np.int16


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p.write_bytes(b"not an image at all"), "truncated or corrupt"),
        (lambda p: p.with_suffix("").with_suffix(".nrrd").write_bytes(b"NRRD0004\ntype: nonsense\n\n"), "cannot read"),
        (lambda p: sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(p)), "2D image"),
        (lambda p: sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(p)), "4D image"),
        (lambda p: sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4, 3), np.uint8), isVector=True), str(p)),
         "components per voxel"),
    ],
)
def test_unreadable_inputs_are_refused(tmp_path, make, match):
    p = tmp_path / "bad.nii.gz"
    make(p)
    with pytest.raises(InputError, match=match):
        read_image(p if p.exists() else tmp_path / "bad.nrrd")


def test_truncated_gzip_nifti_is_refused(tmp_path):
    p = tmp_path / "v.nii.gz"
    write_image(_image("axial"), p)
    data = p.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.nii.gz")
    with gzip.open(p) as f:
        assert len(f.read()) > 0


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        read_image(tmp_path / "nope.nrrd")


def test_seg_nrrd_header_and_empty_segments(tmp_path):
    import slicerio

    img = _image("oblique")
    labels = img.with_array(np.zeros(img.array.shape, np.uint8))
    segs = [{"value": 1, "name": "hemorrhage", "color": [1, 0, 0], "terminology": "a~b~c~d~e~f~g"},
            {"value": 2, "name": "edema", "color": [0, 1, 0]}]
    write_seg_nrrd(labels, segs, tmp_path / "s.seg.nrrd")
    seg = slicerio.read_segmentation(str(tmp_path / "s.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["hemorrhage", "edema"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2]
    np.testing.assert_allclose(seg["ijkToLPS"], img.ijk_to_lps, atol=1e-6)
    header = (tmp_path / "s.seg.nrrd").read_bytes()[:4000].decode("latin-1")
    assert "Segment0_Layer:=0" in header and "Segment1_Layer:=0" in header
    assert "space: left-posterior-superior" in header


def test_write_json_is_atomic_and_handles_numpy(tmp_path):
    write_json({"a": np.float32(1.5), "b": np.arange(3)}, tmp_path / "x.json")
    assert (tmp_path / "x.json").read_text().startswith("{")
    assert os.listdir(tmp_path) == ["x.json"]


def test_write_text_is_the_one_atomic_text_writer(tmp_path):
    """Lesion and cohort tables go through write_text: umask mode, line ends kept, no temporary left,
    and a one-line OutputError naming the file when the folder is missing."""
    old = os.umask(0o027)
    try:
        assert write_text(tmp_path / "t.csv", "a,b\r\n1,2\n") == str(tmp_path / "t.csv")
    finally:
        os.umask(old)
    assert (tmp_path / "t.csv").read_bytes() == b"a,b\r\n1,2\n"
    assert ((tmp_path / "t.csv").stat().st_mode & 0o777) == 0o640 and os.listdir(tmp_path) == ["t.csv"]
    with pytest.raises(OutputError, match="cannot write .*missing.*t.csv"):
        write_text(tmp_path / "missing" / "t.csv", "x")


def test_quiet_itk_turns_off_itk_warnings():
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    try:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)
        quiet_itk()
        assert sitk.ProcessObject.GetGlobalWarningDisplay() is False
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)
