"""Tests for UNetSegmentLib.analysis.lesions (per-lesion statistics)."""
from __future__ import annotations

import csv
import json
import math
import os
import zlib

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from UNetSegmentLib.errors import InputError, UsageError
from UNetSegmentLib.image import Image, make_ijk_to_ras, to_sitk
from UNetSegmentLib.analysis.lesions import (COLUMN_DOCS, COLUMNS, CONTRACT_COLUMNS, DICOM_COLUMNS, MIDLINE_TOLERANCE_MM,
                                    LesionTable, analyze_lesions, remove_small_lesions, small_lesion_filter,
                                    split_small_lesions)

CONTRACT_32 = (
    "lesion,label,voxels,volume_mm3,volume_ml,centroid_r,centroid_a,centroid_s,centroid_i,centroid_j,"
    "centroid_k,inside_r,inside_a,inside_s,slice_axis,slice_index,slice_first,slice_last,n_slices,"
    "largest_area_slice,largest_area_mm2,max_inplane_diameter_mm,extent_r_mm,extent_a_mm,extent_s_mm,"
    "mean_intensity,std_intensity,max_intensity,mean_probability,max_probability,side,touches_border"
).split(",")
#: the 32, then the columns this round's issues append (DICOM references last; empty for other input)
EXPECTED_COLUMNS = CONTRACT_32 + ["abc2_ml", "abc2_a_mm", "abc2_b_mm", "abc2_c_mm", "compartment", "perilesional_oedema_ml"] + [
    "dicom_instance_number", "dicom_sop_instance_uid", "dicom_largest_instance_number", "dicom_largest_sop_instance_uid"]


# --- geometries ---------------------------------------------------------------------------------
def _rot(ax, ay, az):
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


GEOMETRIES = {
    "axial": make_ijk_to_ras((0.8, 0.9, 1.3), origin=(-20.0, 15.0, -7.0)),
    "flipped_lps": make_ijk_to_ras((0.7, 1.1, 2.0), np.diag([-1.0, -1.0, 1.0]), (30.0, 40.0, -10.0)),
    "flipped_k": make_ijk_to_ras((1.2, 0.6, 1.5), np.diag([1.0, -1.0, -1.0]), (-5.0, 25.0, 60.0)),
    "oblique": make_ijk_to_ras((0.6, 0.95, 1.7), _rot(0.3, -0.2, 0.5), (12.0, -33.0, 8.0)),
    "oblique_flipped": make_ijk_to_ras((1.0, 0.75, 2.5), _rot(-0.25, 0.15, 2.4) @ np.diag([-1, 1, 1]), (1.0, 2.0, 3.0)),
    "thick5": make_ijk_to_ras((0.5, 0.5, 5.0), origin=(-10.0, -10.0, -30.0)),
    "coronal": make_ijk_to_ras((0.9, 0.9, 3.0), np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]).T, (0.0, 0.0, 0.0)),
}


def _components(lab, connectivity=26):
    """Test-side labelling: component ids over all label values (independent of the module)."""
    st = np.ones((3, 3, 3), bool) if connectivity == 26 else ndimage.generate_binary_structure(3, 1)
    comp = np.zeros(lab.shape, np.int32)
    off = 0
    for v in np.unique(lab[lab != 0]):
        c, n = ndimage.label(lab == v, structure=st)
        comp[c > 0] = c[c > 0] + off
        off += n
    return comp, off


def _random_labels(rng, shape=(20, 34, 30)):
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.6)
    split = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
    lab = np.zeros(shape, np.uint8)
    fg = noise > np.quantile(noise, 0.85)
    lab[fg & (split > 0)] = 1
    lab[fg & (split <= 0)] = 3
    return lab


def _voxel_of(img: Image, ras) -> tuple[int, int, int]:
    ijk = img.ras_to_ijk_points(np.asarray(ras))[0]
    assert np.allclose(ijk, np.round(ijk), atol=1e-6), ijk
    i, j, k = (int(x) for x in np.round(ijk))
    return k, j, i


def _inplane_axes(m):
    from UNetSegmentLib.image import slice_axis

    ax = slice_axis(m)
    return ax, [x for x in (0, 1, 2) if x != ax]


# --- columns ------------------------------------------------------------------------------------
def test_columns_exact():
    assert list(CONTRACT_COLUMNS) == CONTRACT_32 and len(CONTRACT_32) == 32
    assert list(COLUMNS) == EXPECTED_COLUMNS and COLUMNS[-4:] == DICOM_COLUMNS


def test_every_column_has_a_unit_and_description():
    assert set(COLUMN_DOCS) == set(COLUMNS)
    assert all(desc for _, desc in COLUMN_DOCS.values())


# --- SimpleITK cross-check ----------------------------------------------------------------------
@pytest.mark.parametrize("geom", ["axial", "flipped_lps", "flipped_k", "oblique", "oblique_flipped", "thick5"])
def test_matches_simpleitk(geom):
    rng = np.random.default_rng(zlib.crc32(geom.encode()))
    m = GEOMETRIES[geom]
    lab = _random_labels(rng)
    inten = rng.normal(50.0, 20.0, lab.shape).astype(np.float32)
    labels, intensity = Image(lab, m), Image(inten, m)
    table = analyze_lesions(labels, intensity, None, {1: "a", 3: "b"})
    comp, n = _components(lab)
    assert table.n_lesions == n > 5

    s_comp = to_sitk(Image(comp.astype(np.uint32), m))
    fs = sitk.LabelShapeStatisticsImageFilter()
    fs.Execute(s_comp)
    fi = sitk.LabelIntensityStatisticsImageFilter()
    fi.Execute(s_comp, to_sitk(intensity))
    scale = float(np.abs(m[:3, 3]).max() + 100)
    ax, (pa, pb) = _inplane_axes(m)
    sp = np.linalg.norm(m[:3, :3], axis=0)
    seen = set()
    for row in table.rows:
        c = int(comp[_voxel_of(labels, (row["inside_r"], row["inside_a"], row["inside_s"]))])
        assert c > 0 and c not in seen
        seen.add(c)
        cnt = fs.GetNumberOfPixels(c)
        assert row["voxels"] == cnt
        assert row["volume_mm3"] == pytest.approx(fs.GetPhysicalSize(c), rel=1e-6)
        assert row["volume_ml"] == pytest.approx(fs.GetPhysicalSize(c) / 1000, rel=1e-6)
        lps = fs.GetCentroid(c)
        ras = (-lps[0], -lps[1], lps[2])
        got = (row["centroid_r"], row["centroid_a"], row["centroid_s"])
        assert np.allclose(got, ras, rtol=1e-6, atol=1e-6 * scale)
        assert row["mean_intensity"] == pytest.approx(fi.GetMean(c), rel=1e-6, abs=1e-9)
        # SimpleITK reports the sample std (ddof=1); ours is the population std (ddof=0)
        pop = fi.GetStandardDeviation(c) * math.sqrt((cnt - 1) / cnt) if cnt > 1 else 0.0
        assert row["std_intensity"] == pytest.approx(pop, rel=1e-6, abs=1e-9)
        assert row["max_intensity"] == pytest.approx(fi.GetMaximum(c), rel=1e-6)
        # brute-force checks of the slice columns and extents
        mask = comp == c
        kk, jj, ii = np.nonzero(mask)
        idx = (ii, jj, kk)
        per_slice = np.bincount(idx[ax], minlength=lab.shape[2 - ax])
        assert row["slice_first"] == idx[ax].min() and row["slice_last"] == idx[ax].max()
        assert row["n_slices"] == idx[ax].max() - idx[ax].min() + 1
        assert per_slice[row["largest_area_slice"]] == per_slice.max()
        assert row["largest_area_mm2"] == pytest.approx(per_slice.max() * sp[pa] * sp[pb], rel=1e-9)
        assert row["slice_index"] == math.floor(idx[ax].mean() + 0.5)
        pts = labels.ijk_to_ras_points(np.stack([ii, jj, kk], 1))
        ext = pts.max(0) - pts.min(0)
        assert np.allclose([row["extent_r_mm"], row["extent_a_mm"], row["extent_s_mm"]], ext, atol=1e-9)
        # Feret on the 2D slice vs SimpleITK on a 2D image with the in-plane spacing
        sl = np.take(mask, row["largest_area_slice"], axis=2 - ax).astype(np.uint8)  # [pb, pa]
        img2 = sitk.GetImageFromArray(sl)
        img2.SetSpacing((float(sp[pa]), float(sp[pb])))
        f2 = sitk.LabelShapeStatisticsImageFilter()
        f2.ComputeFeretDiameterOn()
        f2.Execute(img2)
        assert row["max_inplane_diameter_mm"] == pytest.approx(f2.GetFeretDiameter(1), rel=1e-6, abs=1e-9)
        border = (ii.min() == 0) | (jj.min() == 0) | (kk.min() == 0)
        border |= (ii.max() == lab.shape[2] - 1) | (jj.max() == lab.shape[1] - 1) | (kk.max() == lab.shape[0] - 1)
        assert row["touches_border"] == bool(border)
    # total row: pooled statistics over all lesion voxels
    v = inten[lab != 0].astype(np.float64)
    assert table.total["voxels"] == v.size
    assert table.total["mean_intensity"] == pytest.approx(v.mean(), rel=1e-9)
    assert table.total["std_intensity"] == pytest.approx(v.std(), rel=1e-9)
    assert table.total["max_intensity"] == pytest.approx(v.max())


def test_feret_large_and_collinear_vs_simpleitk():
    """Large cross-sections (scipy ConvexHull path) and a degenerate (collinear) one."""
    rng = np.random.default_rng(7)
    m = make_ijk_to_ras((0.7, 1.3, 3.0))
    lab = np.zeros((3, 160, 150), np.uint8)
    blob = ndimage.gaussian_filter(rng.standard_normal((160, 150)), 8) > 0.0
    c2, n2 = ndimage.label(blob, np.ones((3, 3)))
    big = np.argmax(np.bincount(c2.ravel())[1:]) + 1
    lab[1][c2 == big] = 1
    lab[0, 0, 5:125] = 2  # a line along i: collinear voxel centres
    table = analyze_lesions(Image(lab, m), None, None, {})
    rows = {r["label"]: r for r in table.rows}
    img2 = sitk.GetImageFromArray((c2 == big).astype(np.uint8))
    img2.SetSpacing((0.7, 1.3))
    f = sitk.LabelShapeStatisticsImageFilter()
    f.ComputeFeretDiameterOn()
    f.Execute(img2)
    assert rows["1"]["max_inplane_diameter_mm"] == pytest.approx(f.GetFeretDiameter(1), rel=1e-9)
    assert rows["2"]["max_inplane_diameter_mm"] == pytest.approx(119 * 0.7, rel=1e-12)


def test_feret_voxel_centre_convention_matches_simpleitk():
    """3 pixels in a row at 2 mm: centre-to-centre 4 mm in both (not 6 mm edge-to-edge)."""
    lab = np.zeros((1, 5, 7), np.uint8)
    lab[0, 2, 1:4] = 1
    t = analyze_lesions(Image(lab, make_ijk_to_ras((2.0, 3.0, 1.0))), None, None, {})
    img2 = sitk.GetImageFromArray(lab[0])
    img2.SetSpacing((2.0, 3.0))
    f = sitk.LabelShapeStatisticsImageFilter()
    f.ComputeFeretDiameterOn()
    f.Execute(img2)
    assert t.rows[0]["max_inplane_diameter_mm"] == pytest.approx(4.0) == pytest.approx(f.GetFeretDiameter(1))
    assert t.rows[0]["extent_r_mm"] == pytest.approx(4.0)  # no voxel added


# --- known answers ------------------------------------------------------------------------------
def _ball(m, shape, centre_ijk, radius_mm):
    k, j, i = np.indices(shape)
    p = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    ras = p @ m[:3, :3].T
    c = np.asarray(centre_ijk, float) @ m[:3, :3].T
    return (np.linalg.norm(ras - c, axis=1) <= radius_mm).reshape(shape)


@pytest.mark.parametrize(
    "geom,shape,radius,tol",
    [
        ("axial", (40, 40, 40), 10.0, 0.03),
        ("flipped_lps", (30, 36, 56), 10.0, 0.03),
        ("oblique", (36, 56, 56), 12.0, 0.03),
        ("thick5", (16, 100, 100), 20.0, 0.06),
    ],
)
def test_sphere_volume(geom, shape, radius, tol):
    m = GEOMETRIES[geom]
    centre = [(s - 1) / 2 for s in shape[::-1]]
    lab = _ball(m, shape, centre, radius).astype(np.uint8)
    t = analyze_lesions(Image(lab, m), None, None, {1: "lesion"})
    assert t.n_lesions == 1
    row = t.rows[0]
    assert row["volume_mm3"] == pytest.approx(4 / 3 * math.pi * radius**3, rel=tol)
    assert row["volume_ml"] == pytest.approx(row["volume_mm3"] / 1000)
    assert np.allclose([row["centroid_i"], row["centroid_j"], row["centroid_k"]], centre, atol=1e-9)
    assert np.allclose([row["centroid_r"], row["centroid_a"], row["centroid_s"]], Image(lab, m).ijk_to_ras_points(centre)[0])
    assert not row["touches_border"]
    assert t.total["volume_ml"] == pytest.approx(row["volume_ml"])


@pytest.mark.parametrize("geom", ["axial", "flipped_lps", "flipped_k", "oblique", "thick5", "coronal"])
def test_box_slice_ranges(geom):
    m = GEOMETRIES[geom]
    shape = (12, 14, 16)
    lab = np.zeros(shape, np.uint8)
    lab[3:8, 4:9, 2:12] = 1  # k 3..7, j 4..8, i 2..11
    lab[5, 9:11, 2:12] = 1  # a larger slice along k (k = 5); along j slice 9/10 are smaller
    ax, (pa, pb) = _inplane_axes(m)
    t = analyze_lesions(Image(lab, m), None, None, {1: "lesion"})
    row = t.rows[0]
    assert row["slice_axis"] == "ijk"[ax]
    first, last = {0: (2, 11), 1: (4, 10), 2: (3, 7)}[ax]
    assert (row["slice_first"], row["slice_last"], row["n_slices"]) == (first, last, last - first + 1)
    kk, jj, ii = np.nonzero(lab)
    centroid_ax = (ii, jj, kk)[ax].mean()
    assert row["slice_index"] == math.floor(centroid_ax + 0.5)
    sp = np.linalg.norm(m[:3, :3], axis=0)
    counts = np.bincount((ii, jj, kk)[ax])
    assert row["largest_area_slice"] == int(np.argmax(counts))
    assert row["largest_area_mm2"] == pytest.approx(counts.max() * sp[pa] * sp[pb])
    if geom in ("axial", "flipped_lps", "flipped_k", "thick5"):
        assert row["slice_axis"] == "k" and row["largest_area_slice"] == 5 and row["slice_index"] == 5
        assert row["largest_area_mm2"] == pytest.approx(70 * sp[0] * sp[1])
    if geom == "coronal":
        assert row["slice_axis"] == "j"
    if geom == "thick5":
        assert row["extent_s_mm"] == pytest.approx(4 * 5.0)  # 5 slices, centre to centre


def _common_multiple(x: float, y: float) -> float:
    from fractions import Fraction

    fx, fy = Fraction(str(round(x, 6))), Fraction(str(round(y, 6)))
    num = math.lcm(fx.numerator * fy.denominator, fy.numerator * fx.denominator)
    return float(Fraction(num, fx.denominator * fy.denominator))


@pytest.mark.parametrize("geom", ["axial", "flipped_lps", "flipped_k", "oblique", "thick5", "coronal"])
def test_disc_diameter(geom):
    """A disc of radius R on one slice, centred on a voxel, R a multiple of both in-plane spacings:
    the antipodal points ±R along an axis are voxel centres, so the Feret diameter is exactly 2R."""
    m = GEOMETRIES[geom]
    ax, (pa, pb) = _inplane_axes(m)
    sp = np.linalg.norm(m[:3, :3], axis=0)
    assert abs(float(m[:3, pa] @ m[:3, pb])) < 1e-12  # orthogonal in-plane axes
    base = _common_multiple(sp[pa], sp[pb])
    R = base * max(1, math.ceil(7.0 / base))
    ra, rb = round(R / sp[pa]), round(R / sp[pb])
    dims = [0, 0, 0]
    dims[pa], dims[pb], dims[ax] = 2 * ra + 3, 2 * rb + 3, 5
    shape = (dims[2], dims[1], dims[0])
    a_idx, b_idx = np.meshgrid(np.arange(dims[pa]) - ra - 1, np.arange(dims[pb]) - rb - 1, indexing="ij")
    inside = (a_idx * sp[pa]) ** 2 + (b_idx * sp[pb]) ** 2 <= R**2 * (1 + 1e-9)
    lab = np.zeros(shape, np.uint8)
    sel = [slice(None)] * 3
    sel[2 - ax] = 2
    lab[tuple(sel)] = inside.T  # remaining array axes are (pb, pa)
    t = analyze_lesions(Image(lab, m), None, None, {1: "lesion"})
    row = t.rows[0]
    assert row["slice_axis"] == "ijk"[ax]
    assert row["largest_area_slice"] == 2 and row["n_slices"] == 1 and row["slice_index"] == 2
    assert row["largest_area_mm2"] == pytest.approx(inside.sum() * sp[pa] * sp[pb])
    assert row["largest_area_mm2"] == pytest.approx(math.pi * R**2, rel=0.08)
    assert row["max_inplane_diameter_mm"] == pytest.approx(2 * R, rel=1e-9)
    # the inside point of a symmetric disc is its centre voxel
    centre_vox = [0, 0, 0]
    centre_vox[pa], centre_vox[pb], centre_vox[ax] = ra + 1, rb + 1, 2
    assert np.allclose([row["inside_r"], row["inside_a"], row["inside_s"]], Image(lab, m).ijk_to_ras_points(centre_vox)[0])


def test_crescent_inside_point():
    for geom in ("axial", "oblique", "flipped_lps"):
        m = GEOMETRIES[geom]
        shape = (3, 44, 44)
        k, j, i = np.indices(shape)
        big = (i - 20) ** 2 + (j - 20) ** 2 <= 100
        small = (i - 23) ** 2 + (j - 20) ** 2 <= 64  # one 26-connected crescent
        lab = (big & ~small).astype(np.uint8)
        lab[0] = lab[2] = 0
        img = Image(lab, m)
        t = analyze_lesions(img, None, None, {1: "lesion"})
        assert t.n_lesions == 1
        row = t.rows[0]
        c = np.round([row["centroid_i"], row["centroid_j"], row["centroid_k"]]).astype(int)
        assert lab[c[2], c[1], c[0]] == 0  # the centroid lies outside the crescent
        kji = _voxel_of(img, (row["inside_r"], row["inside_a"], row["inside_s"]))
        assert lab[kji] == 1  # the inside point is a lesion voxel


# --- filtering, sorting, connectivity -----------------------------------------------------------
def _three_blobs():
    lab = np.zeros((10, 30, 30), np.uint8)
    lab[2, 2, 2:7] = 1  # 5 voxels
    lab[2:4, 10:15, 10:12] = 1  # 20 voxels
    lab[6, 20:22, 20:25] = 2  # 10 voxels
    return Image(lab, make_ijk_to_ras((1.0, 1.0, 1.0)))


def test_sorting_and_numbering():
    t = analyze_lesions(_three_blobs(), None, None, {1: "tumour", 2: "edema"})
    assert [r["lesion"] for r in t.rows] == [1, 2, 3]
    assert [r["voxels"] for r in t.rows] == [20, 10, 5]
    assert [r["label"] for r in t.rows] == ["tumour", "edema", "tumour"]
    assert t.total["voxels"] == 35 and t.total["volume_ml"] == pytest.approx(0.035)
    assert t.total["lesion"] == "total"


def test_min_lesion_ml_filter():
    t = analyze_lesions(_three_blobs(), None, None, {}, min_lesion_ml=0.01)  # 10 voxels of 1 mm³
    assert [r["voxels"] for r in t.rows] == [20, 10]
    assert [r["lesion"] for r in t.rows] == [1, 2]
    assert t.total["voxels"] == 30
    t = analyze_lesions(_three_blobs(), None, None, {}, min_lesion_ml=1.0)
    assert t.rows == [] and t.total["voxels"] == 0
    with pytest.raises(UsageError):
        analyze_lesions(_three_blobs(), None, None, {}, min_lesion_ml=-1)


def test_one_small_lesion_rule_keeps_a_lesion_of_exactly_the_minimum():
    """0.7 mm voxels: 1000 of them are 0.343 mL, but the float voxel volume is 0.3429999… mm³. The
    label map the outputs are made from (split_small_lesions) and the table agree: the cube is kept."""
    lab = np.zeros((14, 14, 14), np.uint8)
    lab[1:11, 1:11, 1:11] = 1  # 1000 voxels = 0.343 mL
    lab[12, 12, 12:14] = 1  # 2 voxels: dropped
    img = Image(lab, make_ijk_to_ras((0.7, 0.7, 0.7)))
    assert 1000 * img.voxel_volume_mm3 / 1000.0 < 0.343  # a plain ≥ would drop the cube
    kept, dropped = split_small_lesions(img, 0.343)
    assert int(np.count_nonzero(kept.array)) == 1000 and remove_small_lesions(img, 0.343).same_grid(img)
    table = analyze_lesions(img, min_lesion_ml=0.343)
    assert [r["voxels"] for r in table.rows] == [1000] and table.dropped_ml == dropped
    assert dropped == pytest.approx((2 * 0.343 / 1000,))
    keep, volumes = small_lesion_filter(np.array([1000, 2]), img.voxel_volume_mm3, 0.343)
    assert keep.tolist() == [True, False] and volumes == dropped


def test_connectivity_6_vs_26():
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = lab[2, 2, 2] = 1  # touch at a corner only
    img = Image(lab, np.eye(4))
    assert analyze_lesions(img, None, None, {}, connectivity=26).n_lesions == 1
    assert analyze_lesions(img, None, None, {}, connectivity=6).n_lesions == 2
    with pytest.raises(UsageError):
        analyze_lesions(img, None, None, {}, connectivity=4)


def test_different_labels_touching_are_separate_lesions():
    lab = np.zeros((4, 4, 6), np.uint8)
    lab[1, 1, 1:3] = 1
    lab[1, 1, 3:5] = 2
    t = analyze_lesions(Image(lab, np.eye(4)), None, None, {1: "a", 2: "b"})
    assert sorted(r["label"] for r in t.rows) == ["a", "b"]


# --- side ---------------------------------------------------------------------------------------
def _head(m, shape, centre_ijk, radius_vox, ct=True):
    k, j, i = np.indices(shape)
    head = (i - centre_ijk[0]) ** 2 + (j - centre_ijk[1]) ** 2 + (k - centre_ijk[2]) ** 2 <= radius_vox**2
    if ct:
        return Image(np.where(head, 40.0, -1000.0).astype(np.float32), m)
    return Image(np.where(head, 300.0, 0.0).astype(np.float32), m)


@pytest.mark.parametrize("ct", [True, False])
def test_side_identity_ras(ct):
    """ijk_to_ras = identity: +i = +R = toward the patient's RIGHT."""
    shape = (30, 40, 60)
    m = np.eye(4)
    head = _head(m, shape, (35, 20, 15), 14, ct=ct)  # head centred at R = 35, not the volume centre
    lab = np.zeros(shape, np.uint8)
    lab[15, 20, 45:47] = 1  # R ≈ 45.5 → right
    lab[15, 25, 24:26] = 1  # R ≈ 24.5 → left
    lab[15, 10, 34:37] = 1  # R = 35 → midline
    t = analyze_lesions(Image(lab, m), head, None, {})
    sides = {round(r["centroid_r"], 1): r["side"] for r in t.rows}
    assert sides == {45.5: "right", 24.5: "left", 35.0: "midline"}
    assert t.midline["midline_r"] == pytest.approx(35.0, abs=1e-6)
    # cross-check the convention with SimpleITK: LPS +x is the patient's LEFT
    comp, n = _components(lab)
    f = sitk.LabelShapeStatisticsImageFilter()
    f.Execute(to_sitk(Image(comp.astype(np.uint32), m)))
    for c in range(1, n + 1):
        x_lps = f.GetCentroid(c)[0]
        mid_lps = -t.midline["midline_r"]
        side = "midline" if abs(x_lps - mid_lps) < MIDLINE_TOLERANCE_MM else ("left" if x_lps > mid_lps else "right")
        assert side == sides[round(-x_lps, 1)]


def test_side_flipped_geometry_and_given_midline():
    """LPS-ordered array (i runs toward the patient's left): high i → left."""
    shape = (20, 30, 50)
    m = make_ijk_to_ras((1.0, 1.0, 2.0), np.diag([-1.0, -1.0, 1.0]), (24.5, 10.0, 0.0))
    lab = np.zeros(shape, np.uint8)
    lab[10, 10, 2:4] = 1  # i ≈ 2.5 → R ≈ 22 → right
    lab[10, 10, 44:46] = 1  # i ≈ 44.5 → R ≈ −20 → left
    head = _head(m, shape, (24.5, 15, 10), 9)
    t = analyze_lesions(Image(lab, m), head, None, {})
    assert t.midline["midline_r"] == pytest.approx(0.0, abs=1e-6)
    by_i = {round(r["centroid_i"]): r["side"] for r in t.rows}
    assert by_i == {2: "right", 44: "left"}  # round(2.5) = 2, round(44.5) = 44 (banker's)
    t2 = analyze_lesions(Image(lab, m), head, None, {}, midline_x_ras=30.0)
    assert {r["side"] for r in t2.rows} == {"left"}
    assert t2.midline["source"] == "given"
    t3 = analyze_lesions(Image(lab, m), None, None, {})
    assert {r["side"] for r in t3.rows} == {None}
    assert "not determined" in t3.summary_dict()["side_method"]


# --- border, empty, probability, files ------------------------------------------------------------
def test_touches_border():
    lab = np.zeros((6, 7, 8), np.uint8)
    lab[3, 3, 0:2] = 1  # i = 0 face
    lab[3, 3, 4:6] = 2  # interior
    lab[5, 1, 5] = 3  # k = last face
    t = analyze_lesions(Image(lab, np.eye(4)), None, None, {1: "a", 2: "b", 3: "c"})
    assert {r["label"]: r["touches_border"] for r in t.rows} == {"a": True, "b": False, "c": True}


def test_empty_label_map(tmp_path):
    lab = Image(np.zeros((5, 6, 7), np.uint8), np.eye(4))
    t = analyze_lesions(lab, Image(np.ones((5, 6, 7), np.float32), np.eye(4)), None, {})
    assert t.rows == [] and t.n_lesions == 0
    assert t.total["lesion"] == "total" and t.total["voxels"] == 0 and t.total["volume_ml"] == 0
    recs = t.to_records()
    assert len(recs) == 1 and list(recs[0]) == list(COLUMNS)
    p = t.write_csv(tmp_path / "l.csv")
    rows = list(csv.reader(open(p, newline="")))
    assert rows[0] == EXPECTED_COLUMNS and rows[1][0] == "total" and len(rows) == 2
    s = json.loads(json.dumps(t.summary_dict()))
    assert s["n_lesions"] == 0 and s["total_volume_ml"] == 0 and s["lesions"] == []


def test_probability_single_and_per_label():
    img = _three_blobs()
    lab = img.array
    p1 = np.where(lab == 1, 0.8, 0.1).astype(np.float32)
    p1[2, 2, 2] = 0.95
    p2 = np.where(lab == 2, 0.6, 0.0).astype(np.float32)
    t = analyze_lesions(img, None, Image(p1, img.ijk_to_ras), {1: "t", 2: "e"})
    small = [r for r in t.rows if r["voxels"] == 5][0]
    assert small["mean_probability"] == pytest.approx((0.95 + 4 * 0.8) / 5, rel=1e-6)
    assert small["max_probability"] == pytest.approx(0.95, rel=1e-6)
    assert t.rows[1]["label"] == "e" and t.rows[1]["mean_probability"] == pytest.approx(0.1, rel=1e-6)
    assert t.rows[0]["mean_intensity"] is None
    t = analyze_lesions(img, None, {1: Image(p1, img.ijk_to_ras), 2: Image(p2, img.ijk_to_ras)}, {1: "t", 2: "e"})
    assert t.rows[1]["mean_probability"] == pytest.approx(0.6, rel=1e-6)
    assert t.total["max_probability"] == pytest.approx(0.95, rel=1e-6)
    t = analyze_lesions(img, None, {1: Image(p1, img.ijk_to_ras)}, {1: "t", 2: "e"})
    assert t.rows[1]["mean_probability"] is None and t.rows[0]["mean_probability"] == pytest.approx(0.8)


def test_grid_and_dtype_checks():
    img = _three_blobs()
    with pytest.raises(InputError):
        analyze_lesions(img, Image(np.zeros((10, 30, 31), np.float32), img.ijk_to_ras), None, {})
    with pytest.raises(InputError):
        analyze_lesions(img, Image(np.zeros(img.array.shape, np.float32), np.diag([2.0, 1, 1, 1])), None, {})
    with pytest.raises(InputError):
        analyze_lesions(Image(img.array * 0.5, img.ijk_to_ras), None, None, {})
    t = analyze_lesions(Image(img.array.astype(np.float32), img.ijk_to_ras), None, None, {})
    assert t.n_lesions == 3
    t = analyze_lesions(Image(img.array > 0, img.ijk_to_ras), None, None, {1: "x"})
    assert {r["label"] for r in t.rows} == {"x"}


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_csv_tsv_files(tmp_path, kind):
    img = _three_blobs()
    inten = Image(np.arange(img.array.size, dtype=np.float32).reshape(img.array.shape), img.ijk_to_ras)
    t = analyze_lesions(img, inten, None, {1: "tumour", 2: "edema"})
    path = tmp_path / f"lesions.{kind}"
    path.write_text("old")
    getattr(t, f"write_{kind}")(path)
    assert os.listdir(tmp_path) == [f"lesions.{kind}"]  # temp file replaced, none left behind
    rows = list(csv.reader(open(path, newline=""), delimiter="," if kind == "csv" else "\t"))
    assert rows[0] == EXPECTED_COLUMNS
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "total"]
    assert all(len(r) == len(COLUMNS) for r in rows)
    body = dict(zip(rows[0], rows[1]))
    assert body["voxels"] == "20" and body["label"] == "tumour" and body["mean_probability"] == ""
    assert body["touches_border"] in ("true", "false")
    assert float(body["volume_ml"]) == pytest.approx(0.02)
    total = dict(zip(rows[0], rows[-1]))
    assert total["voxels"] == "35" and total["centroid_r"] == "" and total["side"] == ""
    assert all(body[c] == "" for c in DICOM_COLUMNS)  # not a DICOM input: empty strings


def test_summary_dict():
    m = GEOMETRIES["oblique"]
    img = Image(_three_blobs().array, m)
    t = analyze_lesions(img, None, None, {1: "tumour", 2: "edema"}, connectivity=6, min_lesion_ml=0.0)
    s = json.loads(json.dumps(t.summary_dict()))
    assert s["n_lesions"] == 3 and s["connectivity"] == 6 and s["min_lesion_ml"] == 0.0
    assert list(s["columns"]) == list(COLUMNS)  # name → unit and description, in table order
    assert s["columns"]["volume_ml"]["unit"] == "mL" and s["columns"]["slice_index"]["unit"] == "slice index (0-based)"
    assert "centroid slice" in s["columns"]["slice_index"]["description"]
    assert "largest-area slice" in s["columns"]["largest_area_slice"]["description"]
    assert s["total_volume_ml"] == pytest.approx(t.total["volume_ml"])
    assert "side_method" in s
    for les, row in zip(s["lesions"], t.rows):
        assert set(COLUMNS) <= set(les)
        assert les["centroid_lps"] == pytest.approx([-row["centroid_r"], -row["centroid_a"], row["centroid_s"]])
        assert les["inside_lps"] == pytest.approx([-row["inside_r"], -row["inside_a"], row["inside_s"]])
    assert isinstance(t, LesionTable)
