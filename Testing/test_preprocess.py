"""Geometry of pre-processing: canonical axes, channel alignment, network grid, normalisation."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import ct_phantom, oblique_direction

from UNetSegmentLib.errors import InputError
from UNetSegmentLib.image import Image, make_ijk_to_ras, resample
from UNetSegmentLib.engine.preprocess import align_inputs, canonical_grid, network_grid, normalize


def _all_orientations():
    """Every signed permutation of the axes (48), plus an oblique, gantry-tilted variant."""
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for col, (row, s) in enumerate(zip(perm, signs)):
                d[row, col] = s
            yield d
    yield oblique_direction(17.0) @ np.diag([1, -1, 1])


@pytest.mark.parametrize("direction", list(_all_orientations()))
def test_canonical_grid_keeps_every_voxel_in_place(direction):
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(5, 6, 7)).astype(np.float32)
    img = Image(arr, make_ijk_to_ras((0.7, 0.9, 2.5), direction, (3.0, -4.0, 5.0)))
    canon, amap = canonical_grid(img)
    # i → patient left (−R), j → posterior (−A), k → superior, as nearly as the directions allow
    d = canon.direction
    assert d[0, 0] < 0 and d[1, 1] < 0 and d[2, 2] > 0
    assert np.all(np.abs(np.diag(d)) >= np.abs(d).max(axis=0) - 1e-12)
    # each canonical voxel holds the value of the source voxel at the same RAS point
    kk, jj, ii = np.meshgrid(*(np.arange(s) for s in canon.array.shape), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1).astype(float)
    src_ijk = np.rint(img.ras_to_ijk_points(canon.ijk_to_ras_points(ijk))).astype(int)
    np.testing.assert_allclose(img.ijk_to_ras_points(src_ijk), canon.ijk_to_ras_points(ijk), atol=1e-9)
    np.testing.assert_array_equal(arr[src_ijk[:, 2], src_ijk[:, 1], src_ijk[:, 0]], canon.array.ravel())
    # and the map back is exact, with leading channel axes too
    np.testing.assert_array_equal(amap.invert(canon.array), arr)
    np.testing.assert_array_equal(amap.invert(amap.apply(np.stack([arr, arr + 1])))[1], arr + 1)


def test_canonical_grid_keeps_oblique_tilt_without_resampling():
    img, _ = ct_phantom(direction=oblique_direction(20.0))
    canon, _ = canonical_grid(img)
    assert sorted(canon.array.shape) == sorted(img.array.shape)
    np.testing.assert_allclose(sorted(canon.spacing), sorted(img.spacing))
    assert abs(canon.direction[2, 2]) < 0.99  # tilt kept: nearest axis, no through-plane resampling


def test_align_inputs_resamples_onto_first_channel():
    """A field linear in RAS is reproduced exactly by linear resampling: a strict geometry check."""
    def linear_field(img):
        kk, jj, ii = np.meshgrid(*(np.arange(s) for s in img.array.shape), indexing="ij")
        ras = img.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1))
        return (ras @ [2.0, -1.0, 0.5]).reshape(img.array.shape).astype(np.float32)

    a = Image(np.zeros((20, 40, 40), np.float32), make_ijk_to_ras((1.0, 1.0, 2.0), oblique_direction(8), (3, -7, 11)))
    a = a.with_array(linear_field(a))
    # second channel: a coarser, shifted, flipped grid over the same space
    grid = make_ijk_to_ras((2.0, 2.0, 4.0), np.diag([-1, 1, 1]), a.origin + [0.5, -0.75, -1.0])
    b = Image(np.zeros((12, 22, 22), np.float32), grid)
    b = b.with_array(linear_field(b))
    out = align_inputs([a, b], ["CT", "B"])
    assert out[1].same_grid(a) and out[0] is a
    inner = np.s_[3:17, 4:36, 4:36]
    np.testing.assert_allclose(out[1].array[inner], a.array[inner], atol=1e-3)


def test_align_inputs_refuses_channels_that_do_not_overlap():
    a, _ = ct_phantom(shape_kji=(10, 20, 20))
    far = Image(a.array, make_ijk_to_ras((1.5, 1.5, 3.0), None, (500.0, 500.0, 500.0)))
    with pytest.raises(InputError, match="covers only"):
        align_inputs([a, far], ["CBF", "CBV"])


def test_network_grid_keeps_physical_extent_and_in_plane_only():
    img = Image(np.zeros((10, 30, 40), np.float32), make_ijk_to_ras((0.5, 0.5, 5.0), oblique_direction(10), (1, 2, 3)))
    g = network_grid(img, (1.0, 1.0, 1.0), in_plane_only=True)
    assert g.array.shape == (10, 15, 20)
    np.testing.assert_allclose(g.spacing, (1.0, 1.0, 5.0))
    # outer edges of the volume stay where they were
    lo_src = img.ijk_to_ras_points([[-0.5, -0.5, -0.5]])
    lo_new = g.ijk_to_ras_points([[-0.5, -0.5, -0.5]])
    np.testing.assert_allclose(lo_src, lo_new, atol=1e-9)
    assert network_grid(img, (0.5, 0.5, 1.0), in_plane_only=True) is None
    g3 = network_grid(img, (1.0, 1.0, 1.0), in_plane_only=False)
    assert g3.array.shape == (50, 15, 20)


def test_normalize_ct_and_zscore_and_nan():
    a = np.array([-1000, 0, 40, 80, 3000, np.nan], np.float32)
    out = normalize(a, {"type": "ct", "clip": [-20, 120], "mean": 40, "std": 40})
    np.testing.assert_allclose(out, [-1.5, -1.0, 0.0, 1.0, 2.0, -1.5])
    z = normalize(np.array([0, 1, 2, 3, np.nan], np.float32), {"type": "zscore", "mask": "nonzero"})
    assert z[0] == 0 and z[4] == 0
    np.testing.assert_allclose(z[1:4].mean(), 0, atol=1e-6)
    assert normalize(a, {"type": "ct", "clip": [-20, 120], "mean": 40, "std": 40}).dtype == np.float32
