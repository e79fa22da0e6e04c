"""Training backgrounds (MNI152 pseudo-CTs, deformed real CT) and synthetic perfusion cases.

The MNI152 maps come from nilearn's wheel (no network); most checks run on the 2 mm grid to keep
the file fast (< 30 s on 2 cores, first-call template loading included).
"""
from __future__ import annotations

import socket

import numpy as np
import pytest
from scipy import ndimage

from UNetSegmentLib import synth
from UNetSegmentLib.errors import UsageError
from UNetSegmentLib.image import Image
from UNetSegmentLib.models.training import backgrounds as bg
from UNetSegmentLib.models.training import perfusion as pf

MNI2_SHAPE_KJI = (95, 117, 99)
MNI1_SHAPE_KJI = (189, 233, 197)


def _affine(res: float) -> np.ndarray:
    m = np.diag([res, res, res, 1.0])
    m[:3, 3] = (-98.0, -134.0, -72.0)
    return m


@pytest.fixture(scope="module")
def mni2() -> bg.MNITissues:
    return bg.load_mni_tissues(2)


@pytest.fixture(scope="module")
def ct2(mni2) -> Image:
    return bg.mni_pseudo_ct(np.random.default_rng(11), 2, deform=False)


# --- nibabel conversion and the MNI templates ---------------------------------------------------
def test_nib_to_image_transposes_and_keeps_the_affine():
    import nibabel as nib

    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # i, j, k
    aff = np.array([[-1.5, 0, 0, 10.0], [0, 2.0, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
    img = bg.nib_to_image(nib.Nifti1Image(data, aff))
    assert img.array.shape == (4, 3, 2)  # k, j, i
    assert img.array[3, 2, 1] == data[1, 2, 3]
    np.testing.assert_allclose(img.ijk_to_ras, aff)
    np.testing.assert_allclose(img.ijk_to_ras_points([1, 2, 3])[0], aff[:3, :3] @ [1, 2, 3] + aff[:3, 3])


def test_mni_templates_load_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access while loading the MNI152 templates")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    bg._load_mni.cache_clear()
    t = bg.load_mni_tissues(2)
    assert t.gm.shape == t.wm.shape == t.brain.shape == MNI2_SHAPE_KJI
    np.testing.assert_allclose(t.ijk_to_ras, _affine(2.0))
    assert t.gm.dtype == np.float32 and t.brain.dtype == bool
    assert 0.0 <= t.gm.min() and (t.gm + t.wm).max() <= 1.0 + 1e-6
    # the 2 mm grid is nilearn's own (our subsampling of the 1 mm maps equals nilearn's resampling)
    from nilearn import datasets

    ref = bg.nib_to_image(datasets.load_mni152_gm_template(resolution=2))
    assert ref.same_grid(t.image(t.gm))
    np.testing.assert_allclose(t.gm, np.clip(ref.array, 0, 1), atol=1e-5)


def test_mni_orientation_is_ras(mni2):
    """The brain reaches further back (occipital pole, A ≈ −105) than forward (A ≈ +70) and from
    S ≈ −72 (medulla, cut by the grid) to the vertex (S ≈ +78); it is left–right symmetric."""
    img = mni2.image(mni2.brain)
    ras = img.ijk_to_ras_points(np.argwhere(mni2.brain)[:, ::-1].astype(float))
    lo, hi = ras.min(axis=0), ras.max(axis=0)
    assert -112 < lo[1] < -95 and 60 < hi[1] < 78
    assert lo[2] < -65 and 70 < hi[2] < 85
    assert abs(lo[0] + hi[0]) < 6 and hi[0] > 60
    # the frontal horns of the lateral ventricles (CSF) lie just above and behind the origin (AC)
    csf = mni2.csf
    for r in (-5.0, 5.0):
        k, j, i = np.round(img.ras_to_ijk_points([[r, 4.0, 16.0]])[0][::-1]).astype(int)
        assert csf[k, j, i] > 0.9


# --- pseudo-CT -----------------------------------------------------------------------------------
def test_pseudo_ct_geometry_and_tissue_hu(ct2, mni2):
    assert ct2.array.shape == MNI2_SHAPE_KJI and ct2.array.dtype == np.float32
    assert ct2.same_grid(mni2.image(mni2.brain))
    a = ct2.array
    assert np.array_equal(a, np.round(a)) and a.min() >= -1024 and a.max() <= 3071
    wm = np.median(a[(mni2.wm > 0.95) & mni2.brain])
    gm = np.median(a[(mni2.gm > 0.7) & (mni2.gm + mni2.wm > 0.97) & mni2.brain])  # without partial volume
    ventricles = ndimage.binary_erosion(mni2.csf > 0.95, iterations=1)
    csf = np.median(a[ventricles])
    assert 20 <= wm <= 34 and 30 <= gm <= 47 and gm > wm + 4
    assert -3 <= csf <= 18 and csf < wm
    assert 550 <= np.median(a[a > 300]) <= 1550 and np.percentile(a[a > 300], 95) <= 1600
    assert abs(np.median(a[0:3, 0:3, :]) + 1000) < 15  # air in the corners
    # a skull shell around the whole brain: every ray from the brain centre outward crosses bone
    k, j, i = np.round(ct2.ras_to_ijk_points([[0.0, -18.0, 15.0]])[0][::-1]).astype(int)
    for row in (a[k, j, i:], a[k, j, :i][::-1], a[k, j:, i], a[k, :j, i][::-1], a[k:, j, i]):
        assert (row > 500).any()


def test_pseudo_ct_brain_mask_and_bleed(ct2, mni2):
    """The hemorrhage generator works on a pseudo-CT: its brain mask finds the MNI brain."""
    brain = synth.brain_mask(ct2)
    dice = 2 * (brain & mni2.brain).sum() / (brain.sum() + mni2.brain.sum())
    assert dice > 0.85
    out, label = synth.synthesize_hemorrhage(ct2, np.random.default_rng(3), "intraparenchymal", 10.0, brain=brain)
    assert abs(label.array.sum() * ct2.voxel_volume_mm3 / 1000 - 10.0) < 0.5


def test_pseudo_ct_determinism_and_variation(mni2):
    a = bg.mni_pseudo_ct(np.random.default_rng(5), 2)
    b = bg.mni_pseudo_ct(np.random.default_rng(5), 2)
    c = bg.mni_pseudo_ct(np.random.default_rng(6), 2)
    assert np.array_equal(a.array, b.array)
    assert a.same_grid(c) and not np.array_equal(a.array, c.array)
    head = [(x.array > -300).sum() for x in (a, c)]
    undeformed = (bg.mni_pseudo_ct(np.random.default_rng(5), 2, deform=False).array > -300).sum()
    for h in head:  # global scale 0.92–1.08 (±3 % per axis): head volume within ~±35 %
        assert 0.65 < h / undeformed < 1.35


def test_pseudo_ct_1mm():
    img = bg.mni_pseudo_ct(np.random.default_rng(1), 1)
    assert img.array.shape == MNI1_SHAPE_KJI
    np.testing.assert_allclose(img.ijk_to_ras, _affine(1.0))
    a = img.array
    assert 550 <= np.median(a[a > 300]) <= 1550


def test_bad_resolution_is_a_usage_error():
    with pytest.raises(UsageError):
        bg.load_mni_tissues(0)
    with pytest.raises(UsageError):
        bg.mni_pseudo_ct(np.random.default_rng(0), "fine")


# --- deformed CT -----------------------------------------------------------------------------------
def test_deformed_ct_on_phantom():
    from conftest import ct_phantom, oblique_direction

    ct, _ = ct_phantom(shape_kji=(30, 64, 64), spacing=(2.0, 2.0, 3.0), direction=oblique_direction())
    a = bg.deformed_ct(ct, np.random.default_rng(1))
    b = bg.deformed_ct(ct, np.random.default_rng(1))
    c = bg.deformed_ct(ct, np.random.default_rng(2))
    assert a.same_grid(ct) and a.array.dtype == np.float32
    assert np.array_equal(a.array, b.array) and not np.array_equal(a.array, c.array)
    assert not np.array_equal(a.array, ct.array.astype(np.float32))
    assert np.array_equal(a.array, np.round(a.array))
    assert abs(np.median(a.array[0, :4, :4]) + 1000) < 15  # air stays air
    # the head keeps its size to within the scaling range
    assert 0.7 < (a.array > -300).sum() / (ct.array > -300).sum() < 1.4


def test_deformed_transform_carries_a_label():
    from conftest import ct_phantom

    ct, mask = ct_phantom(shape_kji=(24, 48, 48), spacing=(2.0, 2.0, 3.0))
    tx = bg.random_transform(ct, np.random.default_rng(4))
    moved_ct = bg.warp(ct, tx)
    moved = bg.warp(ct.with_array(mask.astype(np.uint8)), tx, order=0, fill=0, dtype=np.uint8)
    assert moved.array.dtype == np.uint8 and set(np.unique(moved.array)) <= {0, 1}
    assert moved.array.sum() > 0.5 * mask.sum()
    assert np.median(moved_ct.array[moved.array > 0]) > 50  # the bright blob moved with its label


def test_deformed_real_ct_keeps_grid_and_histogram(head_ct):
    out = bg.deformed_ct(head_ct, np.random.default_rng(7))
    assert out.same_grid(head_ct) and out.array.dtype == np.float32
    bins = [-2000, -500, -100, 0, 80, 300, 5000]
    h0 = np.histogram(head_ct.array, bins)[0] / head_ct.array.size
    h1 = np.histogram(out.array, bins)[0] / out.array.size
    assert np.abs(h1 - h0).sum() < 0.06  # mostly the same intensities
    b0 = h0[3]
    assert abs(h1[3] - b0) / b0 < 0.3  # soft tissue / brain fraction
    # it is a different picture, not a copy
    assert np.mean(np.abs(out.array - head_ct.array) > 50) > 0.02
    brain = synth.brain_mask(out)
    assert 1000 <= brain.sum() * out.voxel_volume_mm3 / 1000 <= 2000


# --- perfusion -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def perf_case():
    return pf.synthesize_perfusion_case(np.random.default_rng(21), 2, deform=False, core_volume_ml=25.0)


def test_perfusion_shapes_units_and_geometry(perf_case, mni2):
    maps, label = perf_case
    assert tuple(maps) == pf.CHANNELS
    grid = mni2.image(mni2.brain)
    for name, img in maps.items():
        assert img.same_grid(grid) and img.array.dtype == np.float32
        assert (img.array[~mni2.brain] == 0).all() and img.array.min() >= 0
    assert label.same_grid(grid) and label.array.dtype == np.uint8
    # normal values away from the lesion (contralateral hemisphere)
    lab = label.array.astype(bool)
    side = np.sign(grid.ijk_to_ras_points(np.argwhere(lab)[:, ::-1].astype(float))[:, 0].mean())
    x = grid.ijk_to_ras[0, 0] * np.arange(lab.shape[2]) + grid.ijk_to_ras[0, 3]
    contra = mni2.brain & (side * x < -5)[None, None, :]
    gm, wm = contra & (mni2.gm > 0.7), contra & (mni2.wm > 0.9)
    assert 35 < np.median(maps["CBF"].array[gm]) < 75 and 15 < np.median(maps["CBF"].array[wm]) < 33
    assert np.median(maps["CBF"].array[gm]) > 1.5 * np.median(maps["CBF"].array[wm])
    assert 3.0 < np.median(maps["CBV"].array[gm]) < 5.5 and 1.5 < np.median(maps["CBV"].array[wm]) < 2.8
    assert 2.5 < np.median(maps["MTT"].array[contra & (mni2.gm + mni2.wm > 0.9)]) < 5.5
    assert np.percentile(maps["Tmax"].array[contra], 95) < 2.5


def test_perfusion_core_is_hypoperfused(perf_case, mni2):
    maps, label = perf_case
    lab = label.array.astype(bool)
    vol = lab.sum() * label.voxel_volume_mm3 / 1000
    assert abs(vol - 25.0) < 2.5
    assert (lab <= mni2.brain).all() and ((mni2.gm + mni2.wm)[lab] > 0.3).all()
    x = label.ijk_to_ras_points(np.argwhere(lab)[:, ::-1].astype(float))[:, 0]
    assert (x > 0).all() or (x < 0).all()  # one hemisphere
    mirror = lab[:, :, ::-1]  # the grid is symmetric about R = 0
    assert not (mirror & lab).any()
    m = {n: (img.array[lab].mean(), img.array[mirror].mean()) for n, img in maps.items()}
    assert m["CBF"][0] < 0.4 * m["CBF"][1]
    assert m["CBV"][0] < 0.8 * m["CBV"][1]
    assert m["MTT"][0] > 1.4 * m["MTT"][1]
    assert m["Tmax"][0] > 6.0 and m["Tmax"][1] < 2.0
    assert np.median(maps["Tmax"].array[lab]) > 6.0
    # penumbra: a hypoperfused rim (Tmax 4–8 s, CBF moderately reduced) around the core, not labelled
    ring = (ndimage.distance_transform_edt(~lab, sampling=2.0) <= 6.0) & ~lab & mni2.brain & ((mni2.gm + mni2.wm) > 0.5)
    tmax_ring = np.median(maps["Tmax"].array[ring])
    assert 3.5 < tmax_ring < 9.0
    assert m["CBF"][0] < np.median(maps["CBF"].array[ring])


def test_perfusion_negative_and_determinism(mni2):
    maps, label = pf.synthesize_perfusion_case(np.random.default_rng(8), lesion=False)
    assert label.array.dtype == np.uint8 and not label.array.any()
    brain = maps["CBF"].array > 0
    assert np.percentile(maps["Tmax"].array[brain], 99) < 3.0
    again, label2 = pf.synthesize_perfusion_case(np.random.default_rng(8), lesion=False)
    for n in pf.CHANNELS:
        assert np.array_equal(maps[n].array, again[n].array)
    other, _ = pf.synthesize_perfusion_case(np.random.default_rng(9), lesion=False)
    assert not np.array_equal(maps["CBF"].array, other["CBF"].array)


def test_perfusion_deformed_case_label_inside_brain():
    maps, label = pf.synthesize_perfusion_case(np.random.default_rng(31), 2)
    lab = label.array.astype(bool)
    vol = lab.sum() * label.voxel_volume_mm3 / 1000
    assert 1.5 <= vol <= 82
    assert (maps["CBV"].array[lab] > 0).all()  # inside the (deformed) brain
    brain = maps["CBF"].array > 0
    x = label.ijk_to_ras_points(np.argwhere(brain)[:, ::-1].astype(float))[:, 0]
    xl = label.ijk_to_ras_points(np.argwhere(lab)[:, ::-1].astype(float))[:, 0]
    contra = brain.copy()
    contra[brain] = np.sign(x) == -np.sign(np.median(xl))
    assert maps["CBF"].array[lab].mean() < 0.5 * maps["CBF"].array[contra].mean()
    assert maps["Tmax"].array[lab].mean() > 6.0 > 3 * maps["Tmax"].array[contra].mean()


def test_perfusion_noise_differs_per_channel(mni2):
    noisy, _ = pf.synthesize_perfusion_case(np.random.default_rng(4), deform=False, lesion=False)
    clean, _ = pf.synthesize_perfusion_case(np.random.default_rng(4), deform=False, lesion=False, noise=False)
    wm = ndimage.binary_erosion((mni2.wm > 0.9) & mni2.brain, iterations=2)
    resid = {n: noisy[n].array[wm] - clean[n].array[wm] for n in pf.CHANNELS}
    rel = {n: resid[n].std() / clean[n].array[wm].mean() for n in ("CBF", "CBV", "MTT")}
    assert rel["CBF"] > rel["CBV"] and rel["CBF"] > rel["MTT"]  # CBF is the noisiest
    assert all(r > 0.01 for r in rel.values()) and resid["Tmax"].std() > 0.02
    c = np.corrcoef([resid[n] for n in pf.CHANNELS])
    assert np.abs(c[np.triu_indices(4, 1)]).max() < 0.3  # independent noise per channel


def test_write_perfusion_case(perf_case, tmp_path):
    import SimpleITK as sitk

    from UNetSegmentLib.image import from_sitk

    maps, label = perf_case
    paths = pf.write_perfusion_case(tmp_path / "case0", maps, label)
    assert sorted(p.name for p in (tmp_path / "case0").iterdir()) == sorted(
        [f"{n}.nii.gz" for n in pf.CHANNELS] + ["label.nii.gz"])
    for name, img in [*maps.items(), ("label", label)]:
        back = sitk.ReadImage(str(paths[name]))
        assert back.GetPixelID() == (sitk.sitkUInt8 if name == "label" else sitk.sitkFloat32)
        got = from_sitk(back)
        assert got.same_grid(img)
        np.testing.assert_array_equal(got.array, img.array)
    with pytest.raises(UsageError):
        pf.write_perfusion_case(tmp_path / "bad", {"../x": maps["CBF"]})
