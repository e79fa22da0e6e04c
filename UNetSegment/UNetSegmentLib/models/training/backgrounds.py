"""Training backgrounds for the synthetic-lesion generators: pseudo-CTs made from the MNI152
templates shipped inside nilearn's wheel, and randomly deformed copies of a real head CT.

Everything works offline: ``nilearn.datasets.load_mni152_*`` read NIfTI files bundled in the
nilearn package (no download). nibabel's affine maps ``(i, j, k)`` to RAS+ millimetres already,
so it *is* our IJK→RAS matrix; only the array needs transposing from ``[i, j, k]`` to
``[k, j, i]`` (:func:`nib_to_image`).

:func:`mni_pseudo_ct`
    A CT-like head in HU on the MNI grid (197×233×189 at 1 mm, 99×117×95 at 2 mm): grey and white
    matter and CSF mixed from the template's tissue-probability maps with per-case HU values, a
    thin CSF gap, a skull shell with denser inner/outer tables and a lighter diploë, scalp, air;
    optional falx and small calcifications; then a random similarity transform plus a mild
    elastic warp (so the anatomy differs between cases), slight blur and correlated noise.
:func:`deformed_ct`
    A smooth random elastic deformation plus anisotropic scaling and rotation of a real CT,
    resampled on the same grid (air −1000 outside).
:func:`random_transform` / :func:`warp`
    The SimpleITK transform both use (an affine about a centre composed with a displacement field
    drawn from smoothed noise on a coarse grid) and the resampling onto the image's own grid; use
    the same transform with ``order=0`` to carry a label along.

Timings (2 shared cores): pseudo-CT ~0.4 s at 2 mm and ~2.5–3.5 s at 1 mm; the first call of a
process also imports nilearn (~2 s) and each resolution's first call loads the maps and
precomputes the head geometry (~0.5 s at 2 mm, ~1.5 s at 1 mm). :func:`deformed_ct` on the
256×256×108 sample ~1 s.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from ...errors import UsageError
from ...image import LPS_TO_RAS, Image, to_sitk

AIR_HU = -1000.0
HU_CLIP = (-1024.0, 3071.0)

#: Per-case HU ranges of the pseudo-CT tissues (drawn uniformly).
PSEUDO_CT_HU = {
    "grey_matter": (35.0, 45.0),
    "white_matter": (22.0, 32.0),
    "csf": (0.0, 15.0),
    "bone": (700.0, 1500.0),
    "scalp": (20.0, 60.0),
}
#: Per-case layer thickness ranges (mm) outside the (closed) brain mask.
PSEUDO_CT_LAYERS_MM = {"csf_gap": (0.5, 3.0), "skull": (3.0, 8.0), "scalp": (1.0, 6.0)}


# --- nibabel / MNI templates ---------------------------------------------------------------------
def nib_to_image(img, dtype=np.float32) -> Image:
    """:class:`Image` from a 3D nibabel image: ``array[k, j, i]`` (transposed), ``ijk_to_ras`` = affine."""
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim != 3:
        raise UsageError(f"expected a 3D image, got shape {data.shape}", "pass a single 3D volume")
    return Image(np.ascontiguousarray(data.transpose(2, 1, 0)).astype(dtype, copy=False), np.asarray(img.affine))


@dataclass(frozen=True, eq=False)
class MNITissues:
    """The MNI152 (2009a symmetric) tissue maps on one grid; arrays ``[k, j, i]``, read-only."""

    gm: np.ndarray  # grey-matter probability, float32 0..1
    wm: np.ndarray  # white-matter probability, float32 0..1
    brain: np.ndarray  # brain mask (incl. ventricles), bool
    t1: np.ndarray  # T1 template intensity, float32 0..1
    ijk_to_ras: np.ndarray

    @property
    def csf(self) -> np.ndarray:
        """CSF fraction inside the brain mask: ``brain − gm − wm`` clipped to [0, 1]."""
        return np.where(self.brain, np.clip(1.0 - self.gm - self.wm, 0.0, 1.0), 0.0).astype(np.float32)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    def image(self, array: np.ndarray) -> Image:
        return Image(array, self.ijk_to_ras)


def _check_resolution(resolution_mm) -> float:
    try:
        r = float(resolution_mm)
    except (TypeError, ValueError):
        r = float("nan")
    if not (0.5 <= r <= 8.0):
        raise UsageError(f"resolution_mm must be a voxel size in mm (0.5–8), got {resolution_mm!r}", "use 1 or 2")
    return r


def _nilearn_datasets():
    try:
        from nilearn import datasets
    except ImportError as exc:  # the [train] extra
        raise UsageError("nilearn is not installed (it ships the MNI152 templates)",
                         "pip install 'unetsegment[train]'") from exc
    return datasets


@lru_cache(maxsize=4)
def _load_mni(resolution_mm: float) -> MNITissues:
    datasets = _nilearn_datasets()
    loaders = (datasets.load_mni152_template, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template,
               datasets.load_mni152_brain_mask)
    # nilearn resamples the 1 mm maps linearly onto a grid with the same origin; for an integer
    # voxel size r its voxel centres are every r-th 1 mm voxel, so plain subsampling is identical
    # (and much faster)
    step = int(resolution_mm) if float(resolution_mm).is_integer() else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imgs = [nib_to_image(f(resolution=1 if step else resolution_mm)) for f in loaders]
    if step > 1:
        m = imgs[0].ijk_to_ras @ np.diag([step, step, step, 1.0])
        imgs = [Image(np.ascontiguousarray(im.array[::step, ::step, ::step]), m) for im in imgs]
    t1, gm, wm, mask = imgs
    for other in (gm, wm, mask):
        if not other.same_grid(t1):
            raise UsageError("nilearn's MNI152 templates are not on one grid", "use nilearn>=0.10")
    g = np.clip(gm.array, 0.0, 1.0)
    w = np.clip(wm.array, 0.0, 1.0)
    total = g + w
    over = total > 1.0
    g[over] /= total[over]
    w[over] /= total[over]
    t1a = np.clip(t1.array, 0.0, 1.0).astype(np.float32)
    arrays = (g.astype(np.float32), w.astype(np.float32), mask.array > 0.5, t1a)
    for a in arrays:
        a.setflags(write=False)
    return MNITissues(*arrays, ijk_to_ras=t1.ijk_to_ras)


def load_mni_tissues(resolution_mm: float = 1) -> MNITissues:
    """The MNI152 tissue maps (grey/white matter probabilities, brain mask, T1) at ``resolution_mm``
    (1 or 2 are nilearn's own grids; other values are resampled by nilearn); cached per resolution,
    read from nilearn's package data (no network)."""
    return _load_mni(_check_resolution(resolution_mm))


@dataclass(frozen=True, eq=False)
class _HeadGeometry:
    dist: np.ndarray  # mm outside the closed intracranial mask (0 inside), float32, capped
    band: np.ndarray  # flat indices of voxels with 0 < dist < cap
    band_kji: np.ndarray  # their (k, j, i), float32, 3×N
    deep: np.ndarray  # their depth (mm) inside the intracranial space closed by 15 mm (skull base pockets)
    centre_ras: np.ndarray  # centroid of the brain mask


_BAND_CAP_MM = 24.0


def _closing(mask: np.ndarray, r: float, sampling) -> np.ndarray:
    """Morphological closing by a ball of radius ``r`` mm (via distance transforms), holes filled."""
    pad = int(math.ceil(r / float(np.min(sampling)))) + 2
    m = np.pad(mask, pad)
    dil = ndimage.distance_transform_edt(~m, sampling=sampling) <= r
    closed = ndimage.distance_transform_edt(dil, sampling=sampling) > r
    return ndimage.binary_fill_holes(closed)[pad:-pad, pad:-pad, pad:-pad] | mask


@lru_cache(maxsize=4)
def _mni_head(resolution_mm: float) -> _HeadGeometry:
    """Distance outside the intracranial space: the MNI brain mask closed by 6 mm (fills the
    notches between the lobes and the mouths of the fissures) plus the deep cisterns.

    The closing and a signed distance run on a ~2 mm subsample of the grid; the signed distance
    is interpolated linearly back (sub-voxel accurate near the smooth closed surface)."""
    t = _load_mni(resolution_mm)
    stride = max(1, int(round(2.0 / resolution_mm)))
    sub = t.brain[::stride, ::stride, ::stride]
    sampling = t.spacing[::-1] * stride
    closed = _closing(sub, 6.0, sampling)
    # pockets that only a 15 mm closing fills (between the temporal lobes, brainstem and
    # cerebellum, under the frontal lobes) are skull base: bone beyond the skull layer, not scalp
    big = _closing(sub, 15.0, sampling)
    big_depth = ndimage.distance_transform_edt(np.pad(big, 1), sampling=sampling)[1:-1, 1:-1, 1:-1].astype(np.float32)
    half = 0.5 * float(sampling.mean())
    signed = (ndimage.distance_transform_edt(~closed, sampling=sampling) - half
              - ndimage.distance_transform_edt(closed, sampling=sampling) + half).astype(np.float32)
    signed[closed] = np.minimum(signed[closed], 0.0)
    signed[~closed] = np.maximum(signed[~closed], 0.0)
    signed = ndimage.gaussian_filter(signed, 1.0, truncate=2.5)  # no voxel staircase on the skull
    if stride > 1:
        grids = [np.arange(n, dtype=np.float32) / np.float32(stride) for n in t.brain.shape]
        signed = _interp_separable(signed, grids)
    dist = np.clip(signed, 0.0, _BAND_CAP_MM).astype(np.float32)
    band = np.flatnonzero((dist > 0) & (dist < _BAND_CAP_MM))
    band_kji = np.array(np.unravel_index(band, dist.shape), dtype=np.float32)
    deep = ndimage.map_coordinates(big_depth, band_kji / np.float32(stride), order=1, mode="nearest").astype(np.float32)
    kji = np.argwhere(t.brain[::2, ::2, ::2]) * 2
    centre = Image(t.brain, t.ijk_to_ras).ijk_to_ras_points(kji[:, ::-1].mean(axis=0))[0]
    for a in (dist, band, band_kji, deep):
        a.setflags(write=False)
    return _HeadGeometry(dist, band, band_kji, deep, centre)


# --- smooth noise ---------------------------------------------------------------------------------
def _coarse_noise(rng: np.random.Generator, shape, sampling, sigma_mm: float, channels: int = 1):
    """Unit-variance Gaussian noise smoothed at ``sigma_mm`` on a coarse grid (step ≈ σ/2) that
    spans ``shape``; returns ``(coarse, factor)`` with coarse index = fine index / factor."""
    sampling = np.asarray(sampling, dtype=np.float64)
    f = np.maximum(0.5 * sigma_mm / sampling, 1.0)
    coarse_shape = tuple(int(math.ceil((n - 1) / s)) + 2 for n, s in zip(shape, f))
    n = rng.standard_normal((channels,) + coarse_shape, dtype=np.float32)
    sig = np.maximum(sigma_mm / (sampling * f), 0.3)
    for c in range(channels):
        n[c] = ndimage.gaussian_filter(n[c], sigma=sig, mode="reflect", truncate=3.0)
        n[c] -= n[c].mean()
        sd = float(n[c].std())
        n[c] /= sd if sd > 0 else 1.0
    return n, f


def smooth_noise(rng: np.random.Generator, shape, sampling, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-variance noise smoothed at ``sigma_mm`` on the full grid ``shape`` (k, j, i)
    with voxel size ``sampling`` (mm, k, j, i); drawn coarse and interpolated linearly."""
    coarse, f = _coarse_noise(rng, shape, sampling, sigma_mm)
    if np.all(f == 1.0):
        out = coarse[0][: shape[0], : shape[1], : shape[2]]
    else:
        grids = [np.arange(n, dtype=np.float32) / np.float32(s) for n, s in zip(shape, f)]
        out = _interp_separable(coarse[0], grids)
    return np.ascontiguousarray(out, dtype=np.float32)


def _interp_separable(c: np.ndarray, grids) -> np.ndarray:
    """Linear interpolation of ``c`` at the outer product of 1D coordinate ``grids`` (one axis at a time)."""
    out = c
    for ax, g in enumerate(grids):
        i0 = np.clip(np.floor(g).astype(np.int64), 0, out.shape[ax] - 2)
        w = (g - i0).astype(np.float32)
        a = np.take(out, i0, axis=ax)
        b = np.take(out, i0 + 1, axis=ax)
        sh = [1] * out.ndim
        sh[ax] = len(g)
        w = w.reshape(sh)
        out = a + (b - a) * w
    return out


def _sample_coarse(coarse: np.ndarray, f, kji: np.ndarray) -> np.ndarray:
    """Values of each channel of ``coarse`` at fine (k, j, i) points ``kji`` (3×N), linear."""
    coords = kji / np.asarray(f, dtype=np.float32)[:, None]
    return np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in coarse])


# --- spatial transforms ------------------------------------------------------------------------------
def _rotation_matrix(angles_rad) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def head_centre_ras(image: Image, threshold: float = -300.0) -> np.ndarray:
    """RAS centroid of the voxels above ``threshold`` (the head in a CT), from a subsample."""
    a = np.asarray(image.array)
    kji = np.argwhere(a[::2, ::2, ::2] > threshold) * 2
    if len(kji) == 0:
        kji = np.array([[(n - 1) / 2 for n in a.shape[:3]]])
    return image.ijk_to_ras_points(kji[:, ::-1].astype(np.float64).mean(axis=0))[0]


def random_transform(
    image: Image,
    rng: np.random.Generator,
    *,
    rotation_deg: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    anisotropic: bool = True,
    global_scale: tuple[float, float] = (1.0, 1.0),
    elastic_mm: tuple[float, float] = (3.0, 8.0),
    elastic_scale_mm: tuple[float, float] = (30.0, 60.0),
    centre_ras=None,
):
    """A random SimpleITK transform for resampling ``image`` onto its own grid.

    Output point ``x`` (LPS, as SimpleITK works) is read from the input at ``A(x + d(x))`` where

    * ``d`` is an elastic displacement: 3-channel white noise on a coarse grid (step ≈ scale/4)
      covering the image, smoothed with σ = scale/2 (scale drawn from ``elastic_scale_mm``), made
      zero-mean and scaled so the largest displacement is ``elastic_mm`` (drawn; (0, 0) disables it);
      interpolated linearly between grid points;
    * ``A`` is an affine about ``centre_ras`` (default: the centroid of the voxels above −300 HU):
      rotation by angles drawn uniformly in ±``rotation_deg`` about the R, A and S axes, and scaling
      of the anatomy by a factor drawn from ``global_scale`` times per-axis factors drawn from
      ``scale`` (one factor for all axes unless ``anisotropic``).
    """
    import SimpleITK as sitk

    centre = head_centre_ras(image) if centre_ras is None else np.asarray(centre_ras, dtype=np.float64)
    rot = _rotation_matrix(np.radians(rng.uniform(-rotation_deg, rotation_deg, 3)))
    s = rng.uniform(scale[0], scale[1], 3) if anisotropic else np.full(3, rng.uniform(scale[0], scale[1]))
    s = s * rng.uniform(*global_scale)
    # sampling the input at A·x with A = R·diag(1/s) makes the anatomy grow by s
    a_ras = rot @ np.diag(1.0 / s)
    flip = LPS_TO_RAS[:3, :3]
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(float(v) for v in (flip @ a_ras @ flip).ravel()))
    affine.SetCenter(tuple(float(v) for v in flip @ centre))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    amp = float(rng.uniform(*elastic_mm))
    if amp > 0:
        composite.AddTransform(_elastic_field(image, rng, amp, float(rng.uniform(*elastic_scale_mm))))
    return composite


def _elastic_field(image: Image, rng: np.random.Generator, amp_mm: float, scale_mm: float):
    import SimpleITK as sitk

    spacing = image.spacing  # i, j, k
    extent = (np.array(image.shape_ijk) - 1) * spacing
    step = max(scale_mm / 4.0, 4.0)
    size_ijk = np.ceil(extent / step).astype(int) + 2
    noise = rng.standard_normal((3,) + tuple(size_ijk[::-1]), dtype=np.float32)
    sigma = 0.5 * scale_mm / step
    for c in range(3):
        noise[c] = ndimage.gaussian_filter(noise[c], sigma, mode="reflect", truncate=3.0)
        noise[c] -= noise[c].mean()
    mag = float(np.sqrt((noise**2).sum(axis=0)).max())
    noise *= amp_mm / (mag if mag > 0 else 1.0)
    field = sitk.GetImageFromArray(np.moveaxis(noise, 0, -1).astype(np.float64), isVector=True)
    m = image.ijk_to_ras.copy()
    m[:3, :3] = image.direction * step
    ref = to_sitk(Image(np.zeros((1, 1, 1), np.uint8), m))
    field.SetOrigin(ref.GetOrigin())
    field.SetSpacing(ref.GetSpacing())
    field.SetDirection(ref.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def warp(image: Image, transform, order: int = 1, fill: float = AIR_HU, dtype=np.float32) -> Image:
    """Resample ``image`` through ``transform`` (from :func:`random_transform`) onto its own grid:
    ``order`` 0 nearest (labels), 1 linear; ``fill`` outside the input."""
    import SimpleITK as sitk

    src_arr = np.asarray(image.array)
    src = to_sitk(Image(src_arr if order == 0 else src_arr.astype(np.float32, copy=False), image.ijk_to_ras))
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    out = sitk.Resample(src, src, transform, interp, float(fill), src.GetPixelID())
    return image.with_array(sitk.GetArrayFromImage(out).astype(dtype, copy=False))


def warp_many(arrays, ijk_to_ras, transform, fill: float = 0.0) -> list[np.ndarray]:
    """Linear resampling of several same-grid ``[k, j, i]`` arrays through one ``transform`` onto
    their own grid: the transform is evaluated once per voxel (``TransformToDisplacementField``),
    then each array is interpolated with ``scipy.ndimage.map_coordinates``; float32 results."""
    import SimpleITK as sitk

    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    shape = arrays[0].shape
    ref = to_sitk(Image(np.zeros((1, 1, 1), np.uint8), ijk_to_ras))
    disp = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, tuple(int(n) for n in shape[::-1]),
                                             ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection())
    d = sitk.GetArrayFromImage(disp).astype(np.float32)  # K, J, I, 3 (LPS mm)
    to_ijk = np.linalg.inv((LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64))[:3, :3]).astype(np.float32)
    coords = np.empty((3,) + shape, dtype=np.float32)
    for axis in range(3):  # array axis 0 = k (ijk row 2)
        row = to_ijk[2 - axis]
        coords[axis] = d[..., 0] * row[0] + d[..., 1] * row[1] + d[..., 2] * row[2]
        coords[axis] += np.arange(shape[axis], dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
    del d
    return [ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=float(fill), prefilter=False)
            for a in arrays]


# --- pseudo-CT from the MNI152 templates -------------------------------------------------------------
def _ramp(x: np.ndarray, h: float) -> np.ndarray:
    """0 → 1 over one voxel around x = 0 (partial-volume edge)."""
    return np.clip(x / h + 0.5, 0.0, 1.0)


def _correlated_noise(rng: np.random.Generator, shape, sigma_hu: float, corr_vox: float) -> np.ndarray:
    n = rng.standard_normal(shape, dtype=np.float32)
    if corr_vox > 0:
        n = ndimage.gaussian_filter(n, corr_vox, truncate=3.0)
        sd = float(n[::3, ::3, ::3].std())
        sigma_hu /= sd if sd > 0 else 1.0
    n *= np.float32(sigma_hu)
    return n


def mni_pseudo_ct(rng: np.random.Generator, resolution_mm: float = 1, *, deform: bool = True) -> Image:
    """A CT-like head (HU, int-valued float32 ``[k, j, i]``) on the MNI152 grid (RAS, nilearn's affine).

    Per case (all drawn from ``rng``): grey matter 35–45 HU, white matter 22–32 HU (at least 8 HU
    darker), CSF 0–15 HU (ventricles, sulci, the brain-mask complement inside the skull), mixed by
    the tissue-probability maps, with a random degree of "atrophy" (partial-volume tissue fraction
    f → f^(1+2a), a ∈ [0, 1]: sharper sulci) and ±0.5–1.5 HU low-frequency variation. Outside the
    brain mask closed by 6 mm: a CSF gap of 0.5–3 mm, a skull of 3–8 mm (σ 15 % smooth regional
    variation; tables of 700–1500 HU, a diploë 15–40 % lighter in skulls over 4 mm), scalp of
    1–6 mm at 20–60 HU, air −1000 HU; the pockets under the brain that only a 15 mm closing fills
    (skull base) are bone of 60–90 % of the tables' density. Usually (70 %) a slightly dense falx
    and sometimes (50 %) 1–3 small calcifications (150–400 HU) at the pineal gland / choroid
    plexus. With ``deform`` the head then goes through :func:`random_transform` (rotation ±8°,
    global scale 0.92–1.08 with ±3 % per axis, elastic 0–5 mm). Finally a Gaussian blur
    (σ 0.3–0.8 mm), spatially correlated noise (σ 3–8 HU, correlation 0.4–0.7 mm) and rounding;
    clipped to [−1024, 3071].
    """
    res = _check_resolution(resolution_mm)
    t = _load_mni(res)
    geo = _mni_head(res)
    # the draws from rng happen in this order; keep it, or every seeded training/validation case changes
    v = _PseudoCTDraws.draw(rng)
    out = _pseudo_ct_brain(rng, t, v)
    if rng.random() < 0.7:
        _add_falx(out, t, rng)
    if rng.random() < 0.5:
        _add_calcifications(out, t, rng)
    _add_head_layers(rng, out, t, geo, v)
    return _deform_and_acquire(rng, t.image(out), t, geo, deform)


@dataclass(frozen=True)
class _PseudoCTDraws:
    """One pseudo-CT case's tissue densities (HU) and layer thicknesses (mm)."""

    hu_wm: float
    hu_gm: float  # at least 8 HU above white matter
    hu_csf: float
    hu_bone: float  # the skull's tables
    hu_scalp: float
    gap_mm: float  # CSF gap between the brain and the skull
    skull_mm: float
    scalp_mm: float
    skull_base: float  # density of the skull-base pockets relative to the tables
    diploe: float  # how much lighter the diploë is than the tables (0 in skulls under 4 mm)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "_PseudoCTDraws":
        hu_wm = rng.uniform(*PSEUDO_CT_HU["white_matter"])
        hu_gm = rng.uniform(max(PSEUDO_CT_HU["grey_matter"][0], hu_wm + 8.0), PSEUDO_CT_HU["grey_matter"][1])
        hu_csf = rng.uniform(*PSEUDO_CT_HU["csf"])
        hu_bone = rng.uniform(*PSEUDO_CT_HU["bone"])
        hu_scalp = rng.uniform(*PSEUDO_CT_HU["scalp"])
        gap0 = rng.uniform(*PSEUDO_CT_LAYERS_MM["csf_gap"])
        skull0 = rng.uniform(*PSEUDO_CT_LAYERS_MM["skull"])
        scalp0 = rng.uniform(*PSEUDO_CT_LAYERS_MM["scalp"])
        skull_base = rng.uniform(0.6, 0.9)
        diploe = rng.uniform(0.15, 0.4) * float(np.clip((skull0 - 4.0) / 2.0, 0.0, 1.0))  # thin skulls: no diploë
        return cls(hu_wm, hu_gm, hu_csf, hu_bone, hu_scalp, gap0, skull0, scalp0, skull_base, diploe)


def _pseudo_ct_brain(rng: np.random.Generator, t: MNITissues, v: _PseudoCTDraws) -> np.ndarray:
    """Brain HU: grey/white matter mixed by the tissue maps, CSF wherever they leave room inside the
    intracranial space, plus a small low-frequency density variation (±1.5 HU); float32."""
    gm, wm = t.gm, t.wm
    # "atrophy": partial-volume tissue at sulci and ventricle walls gives way to CSF (tissue
    # fraction f → f^(1+2a)), so sulci show as sharply as on real (older patients') CTs
    atrophy = rng.uniform(0.0, 1.0)
    tissue = gm + wm
    shrink = np.power(tissue, np.float32(2.0 * atrophy)) if atrophy > 0.02 else np.ones_like(tissue)
    out = (np.float32(v.hu_gm - v.hu_csf) * gm + np.float32(v.hu_wm - v.hu_csf) * wm) * shrink + np.float32(v.hu_csf)
    del tissue, shrink
    out += np.float32(rng.uniform(0.5, 1.5)) * smooth_noise(rng, t.gm.shape, t.spacing[::-1], 25.0)
    return out


def _add_head_layers(rng: np.random.Generator, out: np.ndarray, t: MNITissues, geo: _HeadGeometry,
                     v: _PseudoCTDraws) -> None:
    """The layers outside the intracranial space, on the band of voxels near it (in place): CSF gap,
    skull (regionally varying thickness, lighter diploë mid-thickness), scalp, then air — except in
    the skull-base pockets, which are bone; air beyond the band."""
    shape = t.gm.shape
    sampling = t.spacing[::-1]  # k, j, i
    h = float(sampling.mean())
    coarse, f = _coarse_noise(rng, shape, sampling, 20.0, channels=3)
    nz = _sample_coarse(coarse, f, geo.band_kji)
    d = geo.dist.ravel()[geo.band]
    gap = np.maximum(v.gap_mm * (1.0 + 0.3 * nz[0]), 0.3)
    sk = np.clip(v.skull_mm * (1.0 + 0.15 * nz[1]), 2.5, 10.0)
    sc = np.maximum(v.scalp_mm * (1.0 + 0.3 * nz[2]), 0.7)
    e1 = _ramp(d - gap, h)
    e2 = _ramp(d - gap - sk, h)
    e3 = _ramp(d - gap - sk - sc, h)
    u = np.clip((d - gap) / sk, 0.0, 1.0)
    bone = v.hu_bone * (1.0 - v.diploe * np.exp(-(((u - 0.5) / 0.22) ** 2)))
    flat = out.reshape(-1)
    inside = flat[geo.band]
    outside = (e2 - e3) * v.hu_scalp + e3 * AIR_HU  # beyond the skull: scalp, then air ...
    base = np.clip((geo.deep - 2.0) / 2.0, 0.0, 1.0)  # ... except in the skull-base pockets: bone
    outside = (1.0 - base) * outside + base * e2 * (v.hu_bone * v.skull_base)
    flat[geo.band] = (1.0 - e1) * inside + (e1 - e2) * bone + outside
    out[geo.dist >= _BAND_CAP_MM] = AIR_HU


def _deform_and_acquire(rng: np.random.Generator, image: Image, t: MNITissues, geo: _HeadGeometry,
                        deform: bool) -> Image:
    """Optionally a random similarity + elastic warp, then the scanner's look: blur, correlated
    noise, whole HU, clipped to the storable range."""
    sampling = t.spacing[::-1]  # k, j, i
    h = float(sampling.mean())
    if deform:
        tx = random_transform(t.image(t.brain), rng, rotation_deg=8.0, scale=(0.97, 1.03), global_scale=(0.92, 1.08),
                              elastic_mm=(0.0, 5.0), elastic_scale_mm=(30.0, 60.0), centre_ras=geo.centre_ras)
        image = warp(image, tx, order=1, fill=AIR_HU)
    arr = np.asarray(image.array, dtype=np.float32)
    arr = ndimage.gaussian_filter(arr, rng.uniform(0.3, 0.8) / sampling, truncate=2.5)
    arr += _correlated_noise(rng, t.gm.shape, rng.uniform(3.0, 8.0), max(rng.uniform(0.4, 0.7) / h, 0.2))
    np.round(arr, out=arr)
    np.clip(arr, *HU_CLIP, out=arr)
    return t.image(arr)


def _ras_to_kji(t: MNITissues, ras) -> np.ndarray:
    ijk = Image(t.brain, t.ijk_to_ras).ras_to_ijk_points(np.asarray(ras, dtype=np.float64))
    return ijk[:, ::-1]


def _add_falx(out: np.ndarray, t: MNITissues, rng: np.random.Generator) -> None:
    """A thin (~1 mm) slightly dense (45–65 HU) sheet at R = 0 where CSF separates the hemispheres
    above the corpus callosum (S > 20 mm) and behind/in front of it."""
    kji0 = _ras_to_kji(t, [[0.0, 0.0, 0.0]])[0]
    sp = t.spacing  # i, j, k
    i0 = kji0[2]
    half = max(1, int(math.ceil(1.0 / sp[0])))
    lo, hi = int(math.floor(i0)) - half, int(math.ceil(i0)) + half + 1
    sl = (slice(None), slice(None), slice(max(lo, 0), min(hi, out.shape[2])))
    ii = np.arange(sl[2].start, sl[2].stop, dtype=np.float32)
    w = np.clip(1.0 - np.abs(ii - i0) * sp[0] / rng.uniform(0.6, 1.0), 0.0, 1.0)[None, None, :]
    k = np.arange(out.shape[0], dtype=np.float32)[:, None, None]
    s_mm = t.ijk_to_ras[2, 2] * k + t.ijk_to_ras[2, 3]
    csf_like = np.clip(1.0 - t.gm[sl] - t.wm[sl], 0.0, 1.0)
    sheet = w * csf_like * (s_mm > rng.uniform(15.0, 25.0)) * t.brain[sl]
    hu = rng.uniform(45.0, 65.0)
    out[sl] += sheet * (hu - out[sl])


def _add_calcifications(out: np.ndarray, t: MNITissues, rng: np.random.Generator) -> None:
    """1–3 small (radius 1.5–3 mm) dense spots at the pineal gland / choroid plexus of the atria."""
    sites = np.array([[0.0, -28.0, 4.0], [27.0, -40.0, 15.0], [-27.0, -40.0, 15.0]])
    n = int(rng.integers(1, 4))
    chosen = sites[rng.permutation(3)[:n]] + rng.normal(0.0, 2.0, (n, 3))
    sampling = t.spacing[::-1]
    for kji, r in zip(_ras_to_kji(t, chosen), rng.uniform(1.5, 3.0, n)):
        rv = np.ceil((r + 2.0) / sampling).astype(int)
        c = np.round(kji).astype(int)
        sl = tuple(slice(max(ci - ri, 0), min(ci + ri + 1, s)) for ci, ri, s in zip(c, rv, out.shape))
        grids = np.meshgrid(*[(np.arange(s.start, s.stop) - x) * sp for s, x, sp in zip(sl, kji, sampling)],
                            indexing="ij", sparse=True)
        dist = np.sqrt(sum(g * g for g in grids))
        w = np.clip(r - dist + 0.5, 0.0, 1.0).astype(np.float32)
        out[sl] += w * (rng.uniform(150.0, 400.0) - out[sl])


# --- deformed real CT ---------------------------------------------------------------------------------
def deformed_ct(
    ct: Image,
    rng: np.random.Generator,
    *,
    elastic_mm: tuple[float, float] = (3.0, 8.0),
    elastic_scale_mm: tuple[float, float] = (30.0, 60.0),
    rotation_deg: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
) -> Image:
    """A randomly deformed copy of a head CT (HU) on the same grid: smooth elastic displacement
    (largest displacement drawn from ``elastic_mm``, correlation scale from ``elastic_scale_mm``),
    anisotropic scaling (per-axis factor from ``scale``) and rotation (±``rotation_deg`` about each
    RAS axis) about the head's centre; linear interpolation, −1000 HU outside the input. Returns
    int-valued float32 (rounded); ``ct`` is not modified."""
    if np.asarray(ct.array).ndim != 3:
        raise UsageError(f"deformed_ct needs a 3D image, got shape {np.asarray(ct.array).shape}", "pass a scalar 3D CT")
    tx = random_transform(ct, rng, rotation_deg=rotation_deg, scale=scale, anisotropic=True,
                          elastic_mm=elastic_mm, elastic_scale_mm=elastic_scale_mm)
    out = warp(ct, tx, order=1, fill=AIR_HU)
    arr = np.round(out.array)
    return ct.with_array(arr.astype(np.float32, copy=False))
