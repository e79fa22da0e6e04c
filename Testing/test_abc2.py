"""ABC/2 (Kothari et al. 1996) against known answers: ellipsoids, a crescent, thick and thin slices,
rotated lesions and rotated grids (UNetSegmentLib.analysis.abc2 and its lesion-table columns)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from UNetSegmentLib.analysis.abc2 import abc2, slice_weights
from UNetSegmentLib.analysis.lesions import ABC2_COLUMNS, COLUMNS, CONTRACT_COLUMNS, analyze_lesions
from UNetSegmentLib.image import Image, make_ijk_to_ras

#: thin-slice C of an ellipsoid of semi-axis c across the slices: c + ½·c(√3 − 1) (module docstring)
THIN_C_FACTOR = (1 + math.sqrt(3)) / 2


def _ellipsoid(a: float, b: float, c: float, spacing=(0.5, 0.5, 0.5), rotation_deg: float = 0.0,
               direction: np.ndarray | None = None, z_offset_mm: float = 0.0) -> Image:
    """A binary ellipsoid (semi-axes a along i, b along j, c along k, mm) centred on the middle voxel
    (or ``z_offset_mm`` above it), optionally rotated by ``rotation_deg`` in the slice plane;
    ``direction`` rotates the grid."""
    si, sj, sk = spacing
    shape = [int(2 * r / s) + 9 for r, s in zip((c, b, a), (sk, sj, si))]  # K, J, I; odd → a centre voxel
    k, j, i = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, (sk, sj, si))], indexing="ij")
    t = math.radians(rotation_deg)
    x, y = math.cos(t) * i + math.sin(t) * j, -math.sin(t) * i + math.cos(t) * j
    mask = (x / a) ** 2 + (y / b) ** 2 + ((k + z_offset_mm) / c) ** 2 <= 1
    return Image(mask.astype(np.uint8), make_ijk_to_ras(spacing, direction=direction))


def _row(img: Image) -> dict:
    table = analyze_lesions(img)
    assert table.n_lesions == 1
    return table.rows[0]


def test_slice_weights_follow_kothari():
    areas = np.array([100, 75, 74.9, 25, 24.9, 0.5])
    assert slice_weights(areas).tolist() == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]


def test_thin_slices_ellipsoid_a_b_and_the_weighted_c():
    a, b, c = 20.0, 10.0, 15.0
    r = _row(_ellipsoid(a, b, c))
    assert r["abc2_a_mm"] == pytest.approx(2 * a, abs=0.75)  # edge to edge: within a pixel and a half
    assert r["abc2_b_mm"] == pytest.approx(2 * b, abs=0.75)
    assert r["abc2_c_mm"] == pytest.approx(THIN_C_FACTOR * c, abs=2 * 0.5)  # within two 0.5 mm slices
    assert r["abc2_ml"] == pytest.approx(r["abc2_a_mm"] * r["abc2_b_mm"] * r["abc2_c_mm"] / 2000)
    # the weighted C makes ABC/2 ≈ (1 + √3)·abc ≈ 0.652 × (4/3)πabc; counting every slice fully gives 4abc ≈ 0.955 ×.
    # Edge-to-edge A and B of a voxelised ellipse run up to a pixel over 2a and 2b (here ≤ 2.5 % each): rel 0.06.
    true_ml = 4 / 3 * math.pi * a * b * c / 1000
    assert r["volume_ml"] == pytest.approx(true_ml, rel=0.01)
    assert r["abc2_ml"] / r["volume_ml"] == pytest.approx((1 + math.sqrt(3)) * 3 / (4 * math.pi), rel=0.06)
    all_slices_ml = r["abc2_a_mm"] * r["abc2_b_mm"] * (2 * c) / 2000
    assert all_slices_ml / r["volume_ml"] == pytest.approx(3 / math.pi, rel=0.06)


def test_thick_slices_count_each_slice_by_its_area():
    # c = 10 mm over 5 mm slices centred at z = ±2.5 (area 94 % of the largest: weight 1) and z = ±7.5 (44 %: 0.5)
    r = _row(_ellipsoid(20.0, 10.0, 10.0, spacing=(0.5, 0.5, 5.0), z_offset_mm=2.5))
    assert r["n_slices"] == 4
    assert r["abc2_c_mm"] == pytest.approx((1 + 1 + 0.5 + 0.5) * 5.0)
    assert r["abc2_a_mm"] == pytest.approx(40 * math.sqrt(1 - 2.5 ** 2 / 100), abs=0.75)  # the z = ±2.5 section


def test_anisotropic_pixels_and_a_rotated_lesion_give_the_same_diameters():
    upright = _row(_ellipsoid(20.0, 10.0, 8.0, spacing=(0.4, 0.8, 1.0)))
    rotated = _row(_ellipsoid(20.0, 10.0, 8.0, spacing=(0.5, 0.5, 1.0), rotation_deg=30.0))
    for r in (upright, rotated):
        assert r["abc2_a_mm"] == pytest.approx(40.0, abs=1.0)
        assert r["abc2_b_mm"] == pytest.approx(20.0, abs=1.0)
        assert r["abc2_c_mm"] == pytest.approx(THIN_C_FACTOR * 8.0, abs=2.0)


def test_a_rotated_grid_measures_the_same_lesion_identically():
    t = math.radians(35.0)
    about_s = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    flipped = np.diag([-1.0, -1.0, 1.0])  # LPS-style storage of the same voxels
    plain = _row(_ellipsoid(15.0, 9.0, 6.0, spacing=(0.6, 0.6, 1.2)))
    for direction in (about_s, flipped):
        r = _row(_ellipsoid(15.0, 9.0, 6.0, spacing=(0.6, 0.6, 1.2), direction=direction))
        for c in ABC2_COLUMNS:
            assert r[c] == pytest.approx(plain[c], rel=1e-9, abs=1e-9), c


def test_crescent_b_is_the_longest_chord_inside_not_the_caliper_width():
    # half an annulus (radii 20–25 mm, y ≥ 0) on one 2 mm slice: A joins the horns (≈ 50 mm). Chords perpendicular
    # to A are longest at the inner radius's end, x = ±20 mm: y from 0 to √(25² − 20²) = 15 mm. The caliper
    # width perpendicular to A (25 mm) would span the hollow.
    y, x = np.mgrid[-30:30.5:0.5, -30:30.5:0.5]
    rr = np.hypot(x, y)
    crescent = ((rr >= 20) & (rr <= 25) & (y >= 0)).astype(np.uint8)[None]
    r = _row(Image(crescent, make_ijk_to_ras((0.5, 0.5, 2.0))))
    assert r["abc2_a_mm"] == pytest.approx(50.5, abs=0.75)
    assert r["abc2_b_mm"] == pytest.approx(15.0, abs=1.0)
    assert r["abc2_c_mm"] == pytest.approx(2.0)


def test_abc2_function_on_a_single_row_of_pixels():
    m = abc2(np.arange(10), np.zeros(10, int), np.array([0.5, 0.0]), np.array([0.0, 2.0]), np.array([10]), 3.0)
    assert (m.a_mm, m.c_mm) == (pytest.approx(math.hypot(5.0, 2.0)), 3.0)  # corner to corner of a 5 × 2 mm strip
    # perpendicular to the diagonal, chords run from the bottom edge to the top one: 2 mm / cos(angle)
    assert m.b_mm == pytest.approx(2.0 * math.hypot(5.0, 2.0) / 5.0, abs=0.15)


def test_columns_follow_the_32_and_the_total_sums_the_lesions():
    assert COLUMNS[: len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    assert COLUMNS[len(CONTRACT_COLUMNS): len(CONTRACT_COLUMNS) + 4] == ABC2_COLUMNS
    two = np.zeros((12, 40, 60), np.uint8)
    two[2:8, 5:20, 5:25] = 1
    two[3:6, 25:35, 40:50] = 1
    table = analyze_lesions(Image(two, make_ijk_to_ras((1.0, 1.0, 2.0))))
    assert table.total["abc2_ml"] == pytest.approx(sum(r["abc2_ml"] for r in table.rows))
    big = table.rows[0]  # a 20 × 15 × 6-slice box: every slice counts fully
    assert (big["abc2_a_mm"], big["abc2_c_mm"]) == (pytest.approx(25.0), pytest.approx(12.0))
    assert big["abc2_b_mm"] == pytest.approx(15 * 25 / 20, abs=0.3)  # bottom to top edge, across the diagonal
    header = table.to_text().splitlines()[0].split(",")
    assert header[32:36] == list(ABC2_COLUMNS)
    assert set(ABC2_COLUMNS) <= set(table.summary_dict()["lesions"][0])


def test_report_table_and_panel_headings_show_abc2(tmp_path):
    from UNetSegmentLib.analysis.report import abc2_text, render_report

    labels = _ellipsoid(12.0, 8.0, 6.0, spacing=(0.8, 0.8, 2.0))
    ct = labels.with_array(np.where(labels.array > 0, 65, 30).astype(np.int16))
    table = analyze_lesions(labels, ct)
    row = table.rows[0]
    line = abc2_text(row)  # the panel's second line starts with it
    assert line == (f"ABC/2 {row['abc2_ml']:.2f} mL ({row['abc2_a_mm']:.1f} × {row['abc2_b_mm']:.1f} × "
                    f"{row['abc2_c_mm']:.1f} mm / 2)")
    lay = render_report(tmp_path / "report.png", image=ct, labels=labels, probability=None, gradcam=None, table=table,
                        model_name="ct-hemorrhage", model_version="1.2", input_name="ct.nrrd",
                        created="2026-12-06T08:00:00+00:00")
    header, lesion, total = lay.table_cells
    col = header.index("ABC/2\nmL")
    assert header[col - 1] == "volume\nmL"
    assert lesion[col] == f"{row['abc2_ml']:.2f}" and total[col] == f"{table.total['abc2_ml']:.2f}"
