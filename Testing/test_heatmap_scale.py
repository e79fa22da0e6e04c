"""Tests for UNetSegmentLib.analysis.heatmap_scale (per-lesion Grad-CAM scaling) and its use in the report."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from UNetSegmentLib.analysis import report as report_mod
from UNetSegmentLib.analysis.heatmap_scale import per_lesion
from UNetSegmentLib.engine.grid import canonical_grid
from UNetSegmentLib.errors import UsageError
from UNetSegmentLib.image import Image, make_ijk_to_ras

SPACING = (0.8, 1.0, 2.0)  # i, j, k (mm)
SHAPE = (30, 64, 96)  # k, j, i
RADIUS = 20.0
#: RAS centre, lesion radius (mm), heatmap peak
LARGE = ((-12.0, 0.0, 0.0), 8.0, 1.0)
SMALL = ((19.0, 4.0, 2.0), 3.0, 0.1)  # ~31 mm from the large one: the 20 mm neighbourhoods overlap
FAR_SPOT = ((0.0, 0.0, -26.0), 0.3)  # a response > 20 mm from both lesions


def _grid() -> np.ndarray:
    K, J, I = SHAPE
    origin = -np.asarray(SPACING) * (np.array([I, J, K]) - 1) / 2
    return make_ijk_to_ras(SPACING, None, origin)


def _ras(m: np.ndarray, shape) -> list[np.ndarray]:
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float64)
    return [m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)]


def two_lesions() -> tuple[Image, Image]:
    """A large and a small lesion whose Grad-CAM peak is a tenth of the large one's, plus a far spot."""
    m = _grid()
    x, y, z = _ras(m, SHAPE)
    labels = np.zeros(SHAPE, np.uint8)
    cam = np.zeros(SHAPE, np.float64)
    for (c, r, peak) in (LARGE, SMALL):
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        labels[d <= r] = 1
        cam = np.maximum(cam, peak * np.exp(-((d / r) ** 2)))
    c, peak = FAR_SPOT
    d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    cam = np.maximum(cam, peak * np.exp(-((d / 3.0) ** 2)))
    cam /= cam.max()  # as the engine stores it: the volume's peak is 1
    return Image(cam.astype(np.float32), m), Image(labels, m)


def _flipped(img: Image) -> Image:
    """The same voxels stored with every axis reversed (the physical image is unchanged)."""
    K, J, I = img.array.shape
    m = img.ijk_to_ras.copy()
    m[:3, 3] = img.ijk_to_ras_points([I - 1, J - 1, K - 1])[0]
    m[:3, :3] = -m[:3, :3]
    return Image(np.ascontiguousarray(img.array[::-1, ::-1, ::-1]), m)


def _component_distances(labels: Image, connectivity: int = 26) -> tuple[np.ndarray, np.ndarray]:
    """Per lesion, the physical distance of every voxel to it (brute force: one transform per lesion)."""
    st = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    comp, n = ndimage.label(labels.array > 0, structure=st)
    sampling = tuple(labels.spacing[::-1])
    return comp, np.stack([ndimage.distance_transform_edt(comp != c, sampling=sampling) for c in range(1, n + 1)])


def _reference(heat: Image, labels: Image, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Expected result from the definition, and the mask of voxels not equidistant from two lesions."""
    _, dists = _component_distances(labels)
    nearest = np.argmin(dists, axis=0)
    dmin = dists.min(axis=0)
    within = dmin <= radius
    srt = np.sort(dists, axis=0)
    tie = within & (np.abs(srt[1] - srt[0]) < 1e-6) if len(dists) > 1 else np.zeros_like(within)
    a = heat.array.astype(np.float64)
    out = a / a.max()
    for c in range(len(dists)):
        hood = within & (nearest == c)
        out[hood] = a[hood] / a[hood].max()
    return out, ~tie


def test_small_lesion_next_to_large_one_peaks_at_one():
    heat, labels = two_lesions()
    comp, dists = _component_distances(labels)
    assert dists.shape[0] == 2
    out = per_lesion(heat, labels, radius_mm=RADIUS)
    assert out.array.dtype == np.float32 and out.same_grid(heat)
    assert 0.0 <= out.array.min() and out.array.max() <= 1.0
    nearest, dmin = np.argmin(dists, axis=0), dists.min(axis=0)
    for c in range(2):
        hood = (dmin <= RADIUS) & (nearest == c)
        before = float(heat.array[hood].max())
        assert float(out.array[hood].max()) == pytest.approx(1.0, abs=1e-6)
        assert float(out.array[comp == c + 1].max()) > 0.9  # the peak sits on the lesion
        if before < 0.5:  # the small lesion: ten times brighter than before
            assert float(out.array[comp == c + 1].max()) > 5 * float(heat.array[comp == c + 1].max())
    far = dmin > RADIUS
    np.testing.assert_allclose(out.array[far], heat.array[far], atol=1e-6)  # volume peak is 1: unchanged
    assert 0.2 < float(out.array[far].max()) <= FAR_SPOT[1]


def test_each_voxel_goes_to_its_nearest_lesion():
    heat, labels = two_lesions()
    expected, no_tie = _reference(heat, labels, RADIUS)
    out = per_lesion(heat, labels, radius_mm=RADIUS)
    np.testing.assert_allclose(out.array[no_tie], expected[no_tie], atol=1e-5)
    # a smaller radius leaves more of the map on the volume scale
    out5 = per_lesion(heat, labels, radius_mm=5.0)
    expected5, no_tie5 = _reference(heat, labels, 5.0)
    np.testing.assert_allclose(out5.array[no_tie5], expected5[no_tie5], atol=1e-5)
    assert np.count_nonzero(out5.array != heat.array) < np.count_nonzero(out.array != heat.array)


def test_flipped_storage_gives_the_same_map_in_physical_space():
    heat, labels = two_lesions()
    upright = per_lesion(heat, labels, radius_mm=RADIUS)
    fh, fl = _flipped(heat), _flipped(labels)
    assert np.allclose(fh.ijk_to_ras_points([0, 0, 0]), heat.ijk_to_ras_points(np.array(heat.shape_ijk) - 1))
    flipped = per_lesion(fh, fl, radius_mm=RADIUS)
    back = flipped.array[::-1, ::-1, ::-1]
    _, no_tie = _reference(heat, labels, RADIUS)
    np.testing.assert_allclose(back[no_tie], upright.array[no_tie], atol=1e-6)
    assert no_tie.mean() > 0.99  # ties are a thin set, not what the comparison rests on


def test_oblique_direction_uses_voxel_spacing():
    heat, labels = two_lesions()
    a = np.radians(25.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    m = heat.ijk_to_ras.copy()
    m[:3, :3] = rot @ m[:3, :3]
    rotated = per_lesion(Image(heat.array, m), Image(labels.array, m), radius_mm=RADIUS)
    np.testing.assert_array_equal(rotated.array, per_lesion(heat, labels, radius_mm=RADIUS).array)


def test_connectivity_defines_the_lesions():
    m = make_ijk_to_ras((1.0, 1.0, 1.0))
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[4, 4, 3] = lab[5, 5, 4] = 1  # two voxels touching at an edge (18- and 26-connected, not 6)
    heat = np.zeros((9, 9, 9), np.float32)
    heat[4, 4, 3], heat[5, 5, 4] = 0.8, 0.2
    heat[0, 0, 0] = 1.0
    joined = per_lesion(Image(heat, m), Image(lab, m), radius_mm=1.0, connectivity=26).array
    split = per_lesion(Image(heat, m), Image(lab, m), radius_mm=1.0, connectivity=6).array
    assert joined[4, 4, 3] == pytest.approx(1.0) and joined[5, 5, 4] == pytest.approx(0.25)
    assert split[4, 4, 3] == pytest.approx(1.0) and split[5, 5, 4] == pytest.approx(1.0)
    assert joined[0, 0, 0] == split[0, 0, 0] == pytest.approx(1.0)


def test_no_lesion_returns_a_copy_and_nan_stays_nan():
    heat, labels = two_lesions()
    empty = labels.with_array(np.zeros_like(labels.array))
    out = per_lesion(heat, empty)
    assert out.array is not heat.array
    np.testing.assert_array_equal(out.array, heat.array)
    a = heat.array.copy()
    a[0, 0, 0] = np.nan
    out = per_lesion(heat.with_array(a), labels)
    assert np.isnan(out.array[0, 0, 0]) and np.isfinite(out.array[1:]).all()
    # a map that was not normalised keeps values on the volume peak far away and 1 at each lesion
    out = per_lesion(heat.with_array(heat.array * 4.0), labels)
    np.testing.assert_allclose(out.array, per_lesion(heat, labels).array, atol=1e-6)


def test_bad_input_is_refused_with_a_fix():
    heat, labels = two_lesions()
    shifted = Image(labels.array, labels.ijk_to_ras + np.pad(np.ones((3, 1)), ((0, 1), (3, 0))))
    with pytest.raises(UsageError, match="same grid.*resample"):
        per_lesion(heat, shifted)
    with pytest.raises(UsageError, match="same grid"):
        per_lesion(heat, Image(labels.array[:, :, :-1], labels.ijk_to_ras))
    with pytest.raises(UsageError, match="radius_mm"):
        per_lesion(heat, labels, radius_mm=0)
    with pytest.raises(UsageError, match="radius_mm"):
        per_lesion(heat, labels, radius_mm="20")
    with pytest.raises(UsageError, match="connectivity"):
        per_lesion(heat, labels, connectivity=8)
    with pytest.raises(UsageError, match="Image"):
        per_lesion(heat.array, labels)


# --- the report ------------------------------------------------------------------------------
HEAD_LESIONS = (((-30.0, 25.0, 20.0), 10.0, 1.0), ((12.0, 50.0, 30.0), 4.0, 0.1))  # centre, radius, Grad-CAM peak


def _head_case():
    """The report's phantom head with a large and a small lesion; the small one's Grad-CAM peak is 0.1."""
    from test_report import phantom

    image, labels, prob, _ = phantom(lesions=tuple((c, r, 70.0) for c, r, _ in HEAD_LESIONS),
                                     geometry="oblique_flipped")
    x, y, z = _ras(labels.ijk_to_ras, labels.array.shape)
    cam = np.zeros(labels.array.shape)
    for (c, r, peak) in HEAD_LESIONS:
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        cam = np.maximum(cam, peak * np.exp(-((d / r) ** 2)))
        if peak < 1:
            small = (d <= r) & (labels.array > 0)
    assert ndimage.label(labels.array > 0, structure=np.ones((3, 3, 3)))[1] == 2 and small.any()
    return image, labels, prob, labels.with_array((cam / cam.max()).astype(np.float32)), small


@pytest.mark.parametrize("scale", ["lesion", "volume"])
def test_report_records_the_heatmap_scale(tmp_path, monkeypatch, scale):
    from test_report import _render

    image, labels, prob, cam, small = _head_case()
    drawn: dict[str, list] = {"labels": [], "maps": []}
    colorbar, overlay = report_mod._colorbar, report_mod._draw_zoom_overlay

    def record_colorbar(fig, box, cmap, label, fontsize):
        drawn["labels"].append(label)
        return colorbar(fig, box, cmap, label, fontsize)

    def record_overlay(page, ax, x, y, sl, canon_map, *args):
        if args[-1].startswith("Grad-CAM"):
            drawn["maps"].append(canon_map.array)
        return overlay(page, ax, x, y, sl, canon_map, *args)

    monkeypatch.setattr(report_mod, "_colorbar", record_colorbar)
    monkeypatch.setattr(report_mod, "_draw_zoom_overlay", record_overlay)
    kw = {} if scale == "lesion" else {"heatmap_scale": "volume"}  # "lesion" is the default
    _, lay = _render(tmp_path / "r.png", image, labels, prob, cam, **kw)
    assert lay.heatmap_scale == scale and lay.gradcam and lay.n_lesion_panels == 2
    want = report_mod.HEATMAP_SCALES[scale]
    assert want == ("Grad-CAM (per-lesion max)" if scale == "lesion" else "Grad-CAM (volume max)")
    assert drawn["labels"].count(want) == 2 and not any(x.startswith("Grad-CAM (") and x != want
                                                         for x in drawn["labels"])
    # the map the Grad-CAM panels drew from (computed once): per-lesion scaling lifts the small lesion to ~1
    shown = per_lesion(cam, labels) if scale == "lesion" else cam
    assert len(drawn["maps"]) == 2 and drawn["maps"][0] is drawn["maps"][1]
    np.testing.assert_allclose(drawn["maps"][0], canonical_grid(shown)[0].array, atol=1e-6)
    assert float(canonical_grid(labels.with_array(small))[0].array.sum()) == float(small.sum())
    small_peak = float(shown.array[small].max())
    assert small_peak > 0.9 if scale == "lesion" else small_peak < 0.2


def test_report_refuses_unknown_heatmap_scale(tmp_path):
    from test_report import _render

    image, labels, prob, cam, _ = _head_case()
    with pytest.raises(UsageError, match="heatmap_scale.*'lesion' or 'volume'"):
        _render(tmp_path / "r.png", image, labels, prob, cam, heatmap_scale="global")
    assert not (tmp_path / "r.png").exists()


def test_nearest_lesion_per_box_equals_one_transform():
    """Each lesion's distances on its own grown box (the fast path) give the owners one distance
    transform of all lesions gives: the same reach, and where the owner differs, a tie."""
    from UNetSegmentLib.analysis.heatmap_scale import _CONNECTIVITY, _nearest_in_one_transform, _nearest_lesion

    rng = np.random.default_rng(7)
    per_box_cases = 0
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(40, 80, 3))
        lesion = np.zeros(shape, bool)
        for _ in range(int(rng.integers(1, 6))):
            c, r = [int(rng.integers(0, n)) for n in shape], int(rng.integers(0, 4))
            box = tuple(slice(max(ci - r, 0), ci + r + 1) for ci in c)
            lesion[box] |= rng.random(lesion[box].shape) < 0.7
        sampling = tuple(float(s) for s in rng.uniform(0.4, 3.0, 3))
        radius, conn = float(rng.uniform(1.0, 12.0)), int(rng.choice([6, 18, 26]))
        comp, _ = ndimage.label(lesion, ndimage.generate_binary_structure(3, _CONNECTIVITY[conn]))
        boxes = ndimage.find_objects(comp)
        pads = [int(np.ceil(radius / s)) for s in sampling]
        per_box_cases += sum(np.prod([min(b.stop + p, n) - max(b.start - p, 0) for b, p, n in zip(bx, pads, shape)])
                             for bx in boxes) < lesion.size
        fast = _nearest_lesion(lesion, radius, sampling, conn)
        one = _nearest_in_one_transform(comp, radius, sampling)
        np.testing.assert_array_equal(fast > 0, one > 0)
        dist = {v: ndimage.distance_transform_edt(comp != v, sampling=sampling) for v in np.unique(fast[fast != one])}
        for v in np.argwhere(fast != one):  # a tie: both owners equally near
            v = tuple(v)
            assert dist[fast[v]][v] == pytest.approx(ndimage.distance_transform_edt(comp != one[v], sampling=sampling)[v])
    assert per_box_cases >= 30  # the fast path is what was compared


def test_lesion_scaling_in_place_is_per_lesion():
    """Scaling a copy of the map in place (what the Slicer node's own copy gets) gives per_lesion's map
    bit for bit, for a map with peak 1 and for others (another peak, negative values clipped), and
    the definition's values (brute force, one transform per lesion) where the map is not negative."""
    from UNetSegmentLib.analysis.heatmap_scale import lesion_scaling

    heat, labels = two_lesions()
    for changed in (heat.array, heat.array * 0.8, heat.array * 4.0, heat.array - 0.5):
        scaling = lesion_scaling(heat.with_array(changed), labels, radius_mm=RADIUS)
        assert scaling.values.shape == changed[scaling.box].shape
        copy = changed.astype(np.float32).copy()
        scaling.apply_in_place(copy)
        np.testing.assert_array_equal(copy, per_lesion(heat.with_array(changed), labels, radius_mm=RADIUS).array)
        if changed.min() >= 0:  # the reference does not model a lesion with no positive response (volume scale)
            expected, unique = _reference(heat.with_array(changed), labels, RADIUS)
            np.testing.assert_allclose(copy[unique], expected[unique], atol=1e-6)
    assert lesion_scaling(heat, labels.with_array(np.zeros_like(labels.array))) is None
