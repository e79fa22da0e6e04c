"""Geometry of pre-processing: canonical axes, channel alignment, network grid, normalisation."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import ct_phantom, oblique_direction

from UNetSegmentLib.errors import InputError
from UNetSegmentLib.image import Image, make_ijk_to_ras
from UNetSegmentLib.engine.grid import PROBABILITY_FLOOR, Grid, align_inputs, canonical_grid, map_grid, network_grid
from UNetSegmentLib.engine.preprocess import network_input, normalize, prepare_inputs
from UNetSegmentLib.settings import ModelSettings


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
    assert isinstance(g, Grid) and g.shape_kji == (10, 15, 20)
    np.testing.assert_allclose(np.linalg.norm(g.ijk_to_ras[:3, :3], axis=0), (1.0, 1.0, 5.0))
    np.testing.assert_allclose(g.ijk_to_ras[:3, :3] / [1.0, 1.0, 5.0], img.direction, atol=1e-12)
    # outer edges of the volume stay where they were
    lo_src = img.ijk_to_ras_points([[-0.5, -0.5, -0.5]])
    lo_new = (g.ijk_to_ras @ [-0.5, -0.5, -0.5, 1.0])[:3]
    np.testing.assert_allclose(lo_src[0], lo_new, atol=1e-9)
    assert network_grid(img, (0.5, 0.5, 1.0), in_plane_only=True) is None
    g3 = network_grid(img, (1.0, 1.0, 1.0), in_plane_only=False)
    assert g3.shape_kji == (50, 15, 20)


def test_normalize_ct_and_zscore_and_nan():
    a = np.array([-1000, 0, 40, 80, 3000, np.nan], np.float32)
    out = normalize(a, {"type": "ct", "clip": [-20, 120], "mean": 40, "std": 40})
    np.testing.assert_allclose(out, [-1.5, -1.0, 0.0, 1.0, 2.0, -1.5])
    z = normalize(np.array([0, 1, 2, 3, np.nan], np.float32), {"type": "zscore", "mask": "nonzero"})
    assert z[0] == 0 and z[4] == 0
    np.testing.assert_allclose(z[1:4].mean(), 0, atol=1e-6)
    assert normalize(a, {"type": "ct", "clip": [-20, 120], "mean": 40, "std": 40}).dtype == np.float32


def _flipped_image(shape_kji=(6, 20, 24), spacing=(1.0, 1.0, 3.0), seed=0) -> Image:
    """A volume whose array axes are permuted and flipped against the canonical ones."""
    d = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, -1]], float)
    arr = np.random.default_rng(seed).uniform(0.0, 1.0, shape_kji).astype(np.float32)
    return Image(arr, make_ijk_to_ras(spacing, d, (4.0, -3.0, 9.0)))


def test_map_grid_without_resampling_goes_to_canonical_and_back_exactly():
    img = _flipped_image()
    m = map_grid(img, (1.0, 1.0, 3.0), in_plane_only=False)
    assert m.network is m.canonical, "already at the target spacing: no network grid of its own"
    canon = m.to_canonical(img)
    direct, _ = canonical_grid(img)
    np.testing.assert_array_equal(canon.array, direct.array)
    np.testing.assert_allclose(canon.ijk_to_ras, direct.ijk_to_ras)
    assert m.to_network(canon.array) is canon.array
    back = m.to_input(canon.array, floor=0.0)
    assert back.same_grid(img) and back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, img.array)
    assert not np.shares_memory(back.array, canon.array), "the map back is a copy, never a view of the caller's array"


def test_map_grid_resamples_forward_and_back_and_floors_small_values():
    """A field linear in RAS survives network grid → input grid up to interpolation at the borders;
    values below PROBABILITY_FLOOR come back as 0 and everything is clipped to 0–1."""
    img = _flipped_image(shape_kji=(6, 40, 48), spacing=(0.5, 0.5, 3.0))
    kk, jj, ii = np.meshgrid(*(np.arange(s) for s in img.array.shape), indexing="ij")
    ras = img.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1))
    field = ((ras @ [0.01, 0.02, 0.0]) - (ras @ [0.01, 0.02, 0.0]).min()).reshape(img.array.shape)
    field = (0.1 + 0.8 * field / field.max()).astype(np.float32)
    m = map_grid(img, (1.0, 1.0, 1.0), in_plane_only=True)
    assert m.network.shape_kji == (6, 24, 20) and m.canonical.shape_kji == (6, 48, 40)
    net = m.to_network(m.to_canonical(img.with_array(field)).array)
    assert net.shape == m.network.shape_kji
    back = m.to_input(net)
    assert back.same_grid(img) and back.array.dtype == np.float32
    inner = np.s_[:, 2:-2, 2:-2]
    np.testing.assert_allclose(back.array[inner], field[inner], atol=1e-4)
    tiny = m.to_input(np.full(m.network.shape_kji, PROBABILITY_FLOOR / 2, np.float32))
    assert not tiny.array.any()
    big = m.to_input(np.full(m.network.shape_kji, 1.5, np.float32), floor=0.0)
    assert big.array.max() == 1.0


def test_prepare_inputs_is_the_network_input_on_the_network_grid():
    img, _ = ct_phantom(shape_kji=(6, 40, 40), spacing=(0.75, 0.75, 3.0), direction=oblique_direction(5.0))
    spec = {"type": "ct", "clip": [-20, 120], "mean": 40, "std": 40}
    model = ModelSettings(dimensions="2d", patch=(32, 32), target_spacing=(1.5, 1.5, 3.0), context=0, channels=("CT",),
                          normalizations=(spec,), out_channels=2, tta_axes=("i",))
    prepared = prepare_inputs([img], model)
    assert prepared.volume.shape == (1, *prepared.mapping.network.shape_kji) and prepared.volume.dtype == np.float32
    assert prepared.mapping.network.shape_kji == (6, 20, 20), "in-plane only: the slices are kept"
    assert prepared.aligned[0] is img
    np.testing.assert_array_equal(prepared.volume, network_input([img], prepared.mapping, [spec]))
    assert prepared.volume.min() >= -1.5 and prepared.volume.max() <= 2.0, "CT window (-20, 120) → (-1.5, 2.0)"
