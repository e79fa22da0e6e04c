"""Tests for UNetSegmentLib.analysis.report (the PNG report)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import ndimage

from UNetSegmentLib.errors import InputError, OutputError, UsageError
from UNetSegmentLib.image import Image, make_ijk_to_ras
from UNetSegmentLib.analysis.lesions import analyze_lesions
from UNetSegmentLib.analysis.report import (
    RESEARCH_NOTE,
    ReportLayout,
    radiological_axial,
    radiological_slice,
    render_report,
)


def _rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


#: lesions in RAS (+R = patient right, +A = anterior, +S = superior): centre, radius (mm), HU
LESIONS_3 = (
    ((-32.0, 28.0, 22.0), 10.0, 70.0),  # patient LEFT, anterior  (largest)
    ((30.0, -25.0, 8.0), 7.5, 65.0),  # patient right, posterior
    ((8.0, 52.0, 32.0), 5.0, 75.0),  # right of midline, far anterior (small)
)

GEOMETRIES = {
    "axial": (np.eye(3), (1.0, 1.0, 4.0)),
    # LPS-like storage (i → left, j → posterior), 12° gantry tilt, k flipped (inferior-going slices)
    "oblique_flipped": (_rot_x(12.0) @ np.diag([-1.0, -1.0, -1.0]), (0.9, 1.1, 4.0)),
}


def phantom(lesions=LESIONS_3, geometry="axial", shape_kji=(24, 150, 130), seed=0):
    """CT-like head (skull, brain, ventricles) with bright blobs, its label map, probability and fake Grad-CAM.

    The anatomy is defined in RAS, so every geometry shows the same patient.
    """
    direction, spacing = GEOMETRIES[geometry]
    K, J, I = shape_kji
    A = direction * np.asarray(spacing)
    centre_ras = np.array([0.0, 5.0, 20.0])
    origin = centre_ras - A @ (np.array([I, J, K], float) - 1) / 2
    m = make_ijk_to_ras(spacing, direction, origin)
    k, j, i = np.mgrid[:K, :J, :I].astype(np.float32)
    ras = [A[r, 0] * i + A[r, 1] * j + A[r, 2] * k + origin[r] for r in range(3)]
    x, y, z = ras[0], ras[1] - 5.0, ras[2] - 20.0
    head = (x / 62) ** 2 + (y / 76) ** 2 + (z / 70) ** 2
    rng = np.random.default_rng(seed)
    arr = np.full(shape_kji, -1000.0, np.float32)
    arr[head < 1.0] = 1200.0  # skull
    arr[head < 0.85] = 34.0  # brain
    vent = ((np.abs(x) - 7) / 5) ** 2 + ((y - 5) / 22) ** 2 + ((z - 10) / 25) ** 2 < 1
    arr[vent & (head < 0.85)] = 8.0
    prob = np.zeros(shape_kji, np.float32)
    cam = np.zeros(shape_kji, np.float32)
    for (c, r, hu) in lesions:
        d = np.sqrt((ras[0] - c[0]) ** 2 + (ras[1] - c[1]) ** 2 + (ras[2] - c[2]) ** 2)
        arr[d < r] = hu
        prob = np.maximum(prob, 1 / (1 + np.exp((d - r) / 1.5)))
        cam = np.maximum(cam, np.exp(-(d / (2.2 * r)) ** 2))
    arr = ndimage.gaussian_filter(arr, 0.6) + rng.normal(0, 4, shape_kji).astype(np.float32)
    # a faint false-positive-like spot in the probability map
    d = np.sqrt((ras[0] - 5) ** 2 + (ras[1] + 40) ** 2 + (ras[2] - 30) ** 2)
    prob = np.maximum(prob, 0.3 * np.exp(-(d / 6) ** 2))
    labels = (prob >= 0.5).astype(np.uint8)
    image = Image(arr.astype(np.int16), m)
    return image, Image(labels, m), Image(prob.astype(np.float32), m), Image(cam.astype(np.float32), m)


def _render(path, image, labels, prob, cam, **kw):
    table = analyze_lesions(labels, intensity=image, probability=prob, label_names={1: "hemorrhage"}, modality="CT")
    args = dict(image=image, labels=labels, probability=prob, gradcam=cam, table=table, model_name="ich-unet",
                model_version="1.2.0", input_name="head_ct_0001.nrrd", created="2024-05-17T10:31:00+00:00",
                label_colors={1: (230, 40, 40)}, parameters={"threshold": 0.5, "min_lesion_ml": 0.0, "tta": False})
    args.update(kw)
    return table, render_report(path, **args)


def _read_png(path):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return imread(path)


# --- geometry of the 2D panels ------------------------------------------------------------------
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_radiological_axial_left_is_image_right_anterior_is_up(geometry):
    c = (-35.0, 30.0, 20.0)  # patient left, anterior
    image, labels, _, _ = phantom(lesions=((c, 8.0, 300.0),), geometry=geometry, shape_kji=(16, 110, 96))
    arr, extent = radiological_axial(labels, c)
    rows, cols = np.nonzero(arr)
    assert rows.size > 0
    assert cols.mean() > arr.shape[1] / 2  # patient left → image right
    assert rows.mean() < arr.shape[0] / 2  # anterior → top
    # extent in mm keeps the pixel aspect: width/height = cols·dx / rows·dy
    v = radiological_slice(labels, c, "axial")
    l, r, b, t = extent
    assert (r - l) == pytest.approx(arr.shape[1] * v.spacing[0])
    assert (b - t) == pytest.approx(arr.shape[0] * v.spacing[1])
    assert b > t  # origin='upper': row 0 at the top
    # the requested point is in the upper-right quadrant as a fraction of the panel
    fx, fy = v.point_fraction
    assert fx > 0.5 and fy < 0.5
    # the same image slice through the intensity volume shows the bright blob there too
    img2d, _ = radiological_axial(image, c)
    rr, cc = np.nonzero(img2d > 200)
    rr, cc = rr[(img2d[rr, cc] < 600)], cc[(img2d[rr, cc] < 600)]  # not the skull
    assert cc.mean() > img2d.shape[1] / 2 and rr.mean() < img2d.shape[0] / 2


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_coronal_and_sagittal_superior_up(geometry):
    c = (25.0, -10.0, 45.0)  # patient right, superior
    _, labels, _, _ = phantom(lesions=((c, 8.0, 300.0),), geometry=geometry, shape_kji=(30, 100, 96))
    cor = radiological_slice(labels, c, "coronal")
    rows, cols = np.nonzero(cor.array)
    assert rows.mean() < cor.array.shape[0] / 2  # superior → top
    assert cols.mean() < cor.array.shape[1] / 2  # patient right → image left
    assert cor.orientation == ("R", "L", "S", "I")
    sag = radiological_slice(labels, (25.0, 40.0, 45.0), "sagittal")
    assert sag.orientation == ("A", "P", "S", "I")
    with pytest.raises(UsageError):
        radiological_slice(labels, c, "oblique")


# --- full report ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case3():
    return phantom(geometry="oblique_flipped")


def test_report_three_lesions(tmp_path, case3):
    path = tmp_path / "report.png"
    table, lay = _render(path, *case3)
    assert isinstance(lay, ReportLayout)
    assert table.n_lesions == 3
    assert (lay.n_lesions, lay.n_lesion_panels, lay.n_table_rows) == (3, 3, 3)
    assert not lay.more_note and lay.n_more == 0 and not lay.negative and lay.gradcam
    png = _read_png(path)
    assert png.shape[:2] == (lay.height_px, lay.width_px)
    assert 800 < lay.width_px < 2500 and 1000 < lay.height_px < 4000
    assert 20_000 < os.path.getsize(path) < 2_000_000
    assert np.ptp(png[..., :3]) > 0.5  # not blank
    # lesion 1 is in the patient's left anterior quadrant: image right, upper half of its axial panel
    row1 = table.rows[0]
    assert row1["side"] == "left" and row1["inside_r"] < 0 and row1["inside_a"] > 0
    fx, fy = lay.panel_points[0]
    assert fx > 0.5 and fy < 0.5
    # lesion 2 is patient right, posterior: image left, lower half
    fx, fy = lay.panel_points[1]
    assert table.rows[1]["side"] == "right"
    assert fx < 0.5 and fy > 0.5
    # each panel's slice is the table's largest-area slice of the ORIGINAL grid (k is flipped here)
    labels = case3[1]
    for row in table.rows:
        assert row["slice_axis"] == "k"
        v = radiological_slice(labels, (row["inside_r"], row["inside_a"], row["inside_s"]))
        assert v.index == labels.array.shape[0] - 1 - row["largest_area_slice"]
        assert np.count_nonzero(v.array) == np.count_nonzero(labels.array[row["largest_area_slice"]])


def test_height_grows_with_lesions(tmp_path, case3):
    image, labels, prob, cam = phantom(lesions=LESIONS_3[:1], geometry="axial")
    _, one = _render(tmp_path / "one.png", image, labels, prob, cam)
    _, three = _render(tmp_path / "three.png", *case3)
    assert one.n_lesion_panels == 1 and three.n_lesion_panels == 3
    assert three.height_px > one.height_px + 400
    assert three.width_px == one.width_px


def test_negative_scan(tmp_path):
    image, labels, prob, _ = phantom(lesions=(), geometry="axial")
    assert not labels.array.any()
    table, lay = _render(tmp_path / "neg.png", image, labels, prob, None)
    assert table.n_lesions == 0
    assert lay.negative and lay.n_lesion_panels == 0 and lay.n_table_rows == 0 and not lay.more_note
    assert lay.max_probability == pytest.approx(float(prob.array.max()))
    assert 0.2 < lay.max_probability < 0.5
    png = _read_png(tmp_path / "neg.png")
    assert png.shape[:2] == (lay.height_px, lay.width_px)


def test_many_lesions_more_note_and_size(tmp_path):
    rng = np.random.default_rng(3)
    centres = []
    while len(centres) < 11:  # well separated blobs inside the brain
        c = rng.uniform([-40, -50, 5], [40, 55, 40])
        if all(np.linalg.norm(c - o) > 16 for o in centres):
            centres.append(c)
    lesions = tuple((tuple(c), 4.0 + 0.3 * n, 70.0) for n, c in enumerate(centres))
    image, labels, prob, cam = phantom(lesions=lesions, geometry="axial", shape_kji=(20, 130, 110))
    path = tmp_path / "many.png"
    table, lay = _render(path, image, labels, prob, cam, max_rows=6)
    assert table.n_lesions == 11
    assert lay.n_lesion_panels == 8 and lay.n_table_rows == 6
    assert lay.more_note and lay.n_more == 5
    assert os.path.getsize(path) < 2_000_000
    png = _read_png(path)
    assert png.shape[:2] == (lay.height_px, lay.width_px)
    # all rows in the table, no more note; no panels
    _, lay2 = _render(tmp_path / "all.png", image, labels, prob, cam, max_lesions=0)
    assert lay2.n_lesion_panels == 0 and lay2.n_table_rows == 11 and not lay2.more_note
    assert lay2.height_px < lay.height_px


def test_gradcam_missing_and_no_label_colors(tmp_path, case3):
    image, labels, prob, _ = case3
    _, lay = _render(tmp_path / "r.png", image, labels, prob, None, label_colors=None, parameters=None)
    assert not lay.gradcam and lay.n_lesion_panels == 3


def test_atomic_write_and_errors(tmp_path, case3):
    import matplotlib

    rc_before = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    path = tmp_path / "report.png"
    path.write_bytes(b"old")
    _render(path, *case3)
    assert sorted(os.listdir(tmp_path)) == ["report.png"]  # replaced, no temp file left
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc_before
    with pytest.raises(OutputError):
        _render(tmp_path / "missing" / "report.png", *case3)
    assert sorted(os.listdir(tmp_path)) == ["report.png"]
    image, labels, prob, cam = case3
    other = Image(prob.array[:, :, :-1], prob.ijk_to_ras)
    with pytest.raises(InputError):
        _render(tmp_path / "x.png", image, labels, other, cam)
    with pytest.raises(UsageError):
        _render(tmp_path / "x.png", image, labels, prob, cam, window=(80, 0))
    assert not (tmp_path / "x.png").exists()


def test_research_note_text():
    assert RESEARCH_NOTE == "Research use only — not for diagnosis"
