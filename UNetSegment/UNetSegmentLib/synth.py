"""Synthetic intracranial hemorrhages painted into a real head CT (for training and demos).

Everything is done in physical units (mm, mL) from the image's IJK→RAS matrix, so any spacing
and orientation (anisotropic, flipped, oblique) works. The input is never modified.

How a bleed is made
    1. A *score* field is built on a box around the lesion (lower = more inside): a sphere
       deformed by smoothed noise (intraparenchymal, contusion), depth below the brain surface
       relative to a tapering crescent thickness (subdural), or position along the
       gravity-dependent axis inside the ventricles (intraventricular). Voxels outside the brain
       mask get an infinite score.
    2. The label is the N lowest-score voxels, N = volume / voxel volume, so the label volume
       matches the requested ``volume_ml`` to one voxel (unless the brain cannot hold it);
       single lesions are kept connected.
    3. The hard label is smoothed (Gaussian, ~0.7 mm) into a blend weight ``w`` (partial-volume
       edges) that is forced to ≥ 0.5 inside the label and < 0.5 outside it, and to 0 outside the
       brain; so *label = voxels where the bleed dominates (w ≥ 0.5)*.
    4. The bleed intensity (kind-specific HU range, plus smooth texture) replaces the tissue
       with weight ``w``; the CT's own high-frequency noise (CT minus its 3×3×3 median, clipped to
       ±25 HU) is kept, so the bleed is not unrealistically smooth. An optional hypodense oedema
       rim (10–20 HU lower, a few mm wide) is painted around intraparenchymal bleeds and
       contusions first.

Only boxes around the lesion are processed (float32), so on a 256×256×108 head a bleed takes
0.1–1 s and :func:`brain_mask` about 1 s (2 busy cores).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .errors import InputError, UsageError
from .image import Image, slice_axis

KINDS = ("intraparenchymal", "contusion", "subdural", "intraventricular")

#: HU range of the bleed's own intensity per kind (before partial-volume blending and CT noise).
KIND_HU = {
    "intraparenchymal": (50.0, 90.0),
    "contusion": (50.0, 80.0),
    "subdural": (50.0, 80.0),
    "intraventricular": (45.0, 75.0),
}

#: Default volume ranges (mL, drawn log-uniformly) when ``volume_ml`` is not given.
KIND_VOLUME_ML = {
    "intraparenchymal": (0.1, 80.0),
    "contusion": (0.3, 10.0),
    "subdural": (5.0, 80.0),
    "intraventricular": (0.5, 15.0),  # capped at 60 % of the ventricles found
}

#: Texture range either side of a bleed density given to :func:`synthesize_hemorrhage`.
DENSITY_SPREAD_HU = 15.0
BLOOD_HU = (40.0, 100.0)  # the mean density a bleed asked for by contrast is kept within

SKULL_HU = 300.0
BRAIN_HU = (0.0, 80.0)
VENTRICLE_HU = (0.0, 15.0)
EDGE_SIGMA_MM = 0.7


# --- brain mask -------------------------------------------------------------------------------
def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(out)


def _fill_slicewise(mask: np.ndarray, axis: int) -> np.ndarray:
    out = np.empty_like(mask)
    for n in range(mask.shape[axis]):
        idx = [slice(None)] * 3
        idx[axis] = n
        out[tuple(idx)] = ndimage.binary_fill_holes(mask[tuple(idx)])
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _block_any(mask: np.ndarray, stride: tuple[int, int, int]) -> np.ndarray:
    """Coarse mask: True where any voxel of a ``stride`` block is True."""
    m = np.pad(mask, [(0, (-n) % s) for n, s in zip(mask.shape, stride)])
    k, j, i = (n // s for n, s in zip(m.shape, stride))
    return m.reshape(k, stride[0], j, stride[1], i, stride[2]).any(axis=(1, 3, 5))


def _upsample(mask: np.ndarray, stride: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    up = mask.repeat(stride[0], 0).repeat(stride[1], 1).repeat(stride[2], 2)
    return up[: shape[0], : shape[1], : shape[2]]


def brain_mask(
    ct: Image, erode_mm: float = 3.0, close_mm: float = 12.0, close_across_mm: float = 6.0, grid_mm: float = 2.0
) -> np.ndarray:
    """Boolean ``[k, j, i]`` mask of the intracranial soft tissue (brain + CSF) of a head CT in HU.

    Method (distances Euclidean in mm; the shape steps run on a ~``grid_mm`` grid for speed):

    1. skull = voxels > 300 HU;
    2. the intracranial space is what the skull encloses: the skull is dilated by an ellipsoid
       (``close_mm`` within the slice planes, ``close_across_mm`` across them; it bridges
       sutures, thin or missing bone such as burr holes and bone flaps ~2×``close_mm`` wide
       without pushing the foramen magnum far into the neck), holes are filled in 3D and slice
       by slice along the axis closest to superior–inferior (the cavity is open at the foramen
       magnum, so 3D filling alone misses it), and the enclosed space is grown back by the same
       ellipsoid (a morphological closing);
    3. candidates = enclosed, non-skull voxels in [0, 80] HU (brain, CSF, fresh blood);
    4. they are eroded by ``erode_mm`` (cuts thin bridges to the orbits, sinuses and soft tissue
       through foramina), the largest 3D component is kept and grown back by the same distance
       (an opening by reconstruction);
    5. at full resolution the result is intersected with the voxel-wise candidates, the largest
       component is kept and holes are filled slice-wise (calcifications, vessels).
    """
    a = np.asarray(ct.array)
    if a.ndim != 3:
        raise InputError(f"brain_mask needs a 3D CT, got shape {a.shape}", "pass a scalar 3D head CT")
    skull = a > SKULL_HU
    if not skull.any():
        raise InputError("no bone (> 300 HU) in the CT, so no skull to find the brain in", "pass a head CT in Hounsfield units")
    bb = _bbox(skull, margin=2)
    sk = skull[bb]
    sub = a[bb]
    axis = 2 - slice_axis(ct.ijk_to_ras)  # array axis (k, j, i order)
    sampling = ct.spacing[::-1]
    stride = tuple(max(1, int(round(grid_mm / s))) for s in sampling)
    cs = sampling * np.array(stride)
    sk_c = _block_any(sk, stride)
    hu_c = sub[:: stride[0], :: stride[1], :: stride[2]]
    soft_c = (hu_c >= BRAIN_HU[0]) & (hu_c <= BRAIN_HU[1])
    # closing with an ellipsoid: close_mm in the slice planes, close_across_mm across them (a
    # full ball would extend openings such as the foramen magnum far beyond the skull)
    in_plane = cs.copy()
    in_plane[axis] *= close_mm / close_across_mm
    shell = ndimage.distance_transform_edt(~sk_c, sampling=in_plane) <= close_mm
    enclosed = (ndimage.binary_fill_holes(shell) | _fill_slicewise(shell, axis)) & ~shell
    if not enclosed.any():
        raise InputError("the skull encloses no space", "pass a head CT in Hounsfield units that covers the brain")
    to_enclosed = ndimage.distance_transform_edt(~enclosed, sampling=in_plane)
    cand = (to_enclosed <= close_mm + 1e-3) & ~sk_c & soft_c
    core = ndimage.distance_transform_edt(cand, sampling=cs) > erode_mm
    if not core.any():
        raise InputError("no brain found inside the skull", "pass a head CT in Hounsfield units that covers the brain")
    core = _largest_component(core)
    grown = ndimage.distance_transform_edt(~core, sampling=cs) <= erode_mm + float(cs.max())
    region = grown & (to_enclosed <= close_mm + float(np.delete(cs, axis).max()))
    brain = _upsample(region, stride, sk.shape) & ~sk & (sub >= BRAIN_HU[0]) & (sub <= BRAIN_HU[1])
    brain = _largest_component(brain)
    brain |= _fill_slicewise(brain, axis)
    out = np.zeros(a.shape, dtype=bool)
    out[bb] = brain
    return out


# --- geometry helpers ---------------------------------------------------------------------------
class _Ctx:
    """Geometry and caches shared by the bleeds painted into one CT."""

    def __init__(self, ct: Image, brain: np.ndarray):
        self.ct = ct
        self.m = ct.ijk_to_ras
        self.inv = np.linalg.inv(self.m)
        self.shape = ct.array.shape[:3]
        self.sampling = ct.spacing[::-1].astype(np.float64)  # k, j, i
        self.voxel_mm3 = ct.voxel_volume_mm3
        self.brain = brain
        self.density_hu: float | None = None  # one bleed density for every bleed painted (None: by kind)
        self.contrast_hu: float | None = None  # or: this many HU above the brain around the bleed
        # compartment labels (synth_compartments): the label value per kind and of the oedema rim;
        # None: every bleed is 1 and the rim is not labelled (the one-label models)
        self.kind_values: dict[str, int] | None = None
        self.oedema_value: int | None = None
        if not brain.any():
            raise InputError("the brain mask is empty", "pass a head CT in Hounsfield units that covers the brain")
        self.bb = _bbox(brain, margin=1)
        # coarse depth map (~2 mm voxels) for choosing centres
        self.stride = tuple(max(1, int(round(2.0 / s))) for s in self.sampling)
        cs = tuple(slice(b.start, b.stop, st) for b, st in zip(self.bb, self.stride))
        cb = brain[cs]
        self.coarse_slices = cs
        self.coarse_depth = ndimage.distance_transform_edt(
            np.pad(cb, 1), sampling=self.sampling * np.array(self.stride)
        )[1:-1, 1:-1, 1:-1]
        kji = np.argwhere(cb) * np.array(self.stride) + np.array([b.start for b in self.bb])
        self.centroid = ct.ijk_to_ras_points(kji[:, ::-1].mean(axis=0))[0]
        self._fine_depth = None
        self._smoothed = None

    # coordinates ------------------------------------------------------------------------------
    def coarse_points(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kji indices, RAS) of the True voxels of a coarse-grid mask."""
        kji = np.argwhere(mask) * np.array(self.stride) + np.array([s.start for s in self.coarse_slices])
        return kji, self.ct.ijk_to_ras_points(kji[:, ::-1].astype(np.float64))

    def box(self, centre_ras: np.ndarray, radius_mm: float) -> tuple[slice, ...]:
        ijk = self.ct.ras_to_ijk_points(centre_ras)[0]
        half = radius_mm * np.linalg.norm(self.inv[:3, :3], axis=1)  # i, j, k extent of the ball
        out = []
        for c, h, n in zip(ijk[::-1], half[::-1], self.shape):
            lo = int(math.floor(c - h))
            hi = int(math.ceil(c + h)) + 1
            out.append(slice(min(max(lo, 0), n), min(max(hi, 0), n)))
        return tuple(out)

    def ras_grid(self, box: tuple[slice, ...]) -> list[np.ndarray]:
        """R, A, S (float32, broadcastable to the box) of the voxel centres of ``box``."""
        k = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None, None]
        j = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :, None]
        i = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :]
        m = self.m.astype(np.float32)
        return [m[c, 0] * i + m[c, 1] * j + m[c, 2] * k + m[c, 3] for c in range(3)]

    def noise(self, rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float) -> np.ndarray:
        """Gaussian noise smoothed at ``sigma_mm``, zero mean, unit standard deviation."""
        # smooth noise varies slowly: draw it on a grid of ~sigma/2 mm and interpolate up
        f = np.maximum(np.floor(0.5 * sigma_mm / self.sampling), 1).astype(int)
        coarse = tuple(int(n) if s == 1 else int(math.ceil(n / s)) + 1 for n, s in zip(shape, f))
        n = rng.standard_normal(coarse, dtype=np.float32)
        n = ndimage.gaussian_filter(n, sigma=np.maximum(sigma_mm / (self.sampling * f), 0.3), mode="reflect", truncate=3.0)
        if (f > 1).any():
            n = ndimage.zoom(n, np.array(shape) / np.array(coarse), order=1, grid_mode=False)
            n = n[: shape[0], : shape[1], : shape[2]]
        sd = float(n.std())
        return (n - float(n.mean())) / (sd if sd > 0 else 1.0)

    def smoothed_ct(self) -> np.ndarray:
        """The input CT over ``self.bb`` smoothed at 1 mm (float32): what tissue-class thresholds (CSF,
        ventricles) are applied to, computed once per context."""
        if self._smoothed is None:
            ct = np.asarray(self.ct.array)[self.bb].astype(np.float32)
            self._smoothed = ndimage.gaussian_filter(ct, sigma=1.0 / self.sampling, truncate=3.0)
        return self._smoothed

    def fine_depth(self) -> np.ndarray:
        """Depth below the brain surface in mm over ``self.bb`` (0 outside the brain)."""
        if self._fine_depth is None:
            b = np.pad(self.brain[self.bb], 1)
            self._fine_depth = ndimage.distance_transform_edt(b, sampling=self.sampling)[1:-1, 1:-1, 1:-1].astype(np.float32)
        return self._fine_depth


def _select(score: np.ndarray, n: int, connected: bool) -> np.ndarray:
    """The ``n`` lowest finite-score voxels (kept as one component when ``connected``)."""
    flat = score.ravel()
    n = int(min(n, int(np.isfinite(flat).sum())))
    lab = np.zeros(flat.shape, dtype=bool)
    if n <= 0:
        return lab.reshape(score.shape)
    lab[np.argpartition(flat, n - 1)[:n]] = True
    lab = lab.reshape(score.shape)
    if connected:
        lab = _largest_component(lab)
        for _ in range(200):
            deficit = n - int(lab.sum())
            if deficit <= 0:
                break
            ring = ndimage.binary_dilation(lab) & ~lab & np.isfinite(score)
            if not ring.any():
                break
            cand = np.flatnonzero(ring)
            take = cand[np.argsort(score.ravel()[cand], kind="stable")[:deficit]]
            lab.ravel()[take] = True
    return lab


def _weight(ctx: _Ctx, lab: np.ndarray, brain_box: np.ndarray) -> np.ndarray:
    w = ndimage.gaussian_filter(lab.astype(np.float32), sigma=EDGE_SIGMA_MM / ctx.sampling, truncate=3.0)
    # inside the label the bleed dominates (w ≥ 0.5, quickly reaching 1 a voxel in); outside it
    # only the partial-volume fringe remains (w < 0.5)
    w = np.where(lab, np.clip(0.5 + 2.0 * (w - 0.5), 0.5, 1.0), np.minimum(w, 0.49))
    w[~brain_box] = 0.0
    return w


def _paint(ctx: _Ctx, out: np.ndarray, label: np.ndarray, box, lab: np.ndarray, rng: np.random.Generator,
           hu: tuple[float, float], texture_sd: float, oedema: tuple[float, float] | None, kind: str = "") -> None:
    """Blend a bleed (box-local hard label ``lab``) of ``kind`` into ``out`` (in place) and mark ``label``
    (1, or the kind's value in ``ctx.kind_values``; the oedema rim where it dominates gets
    ``ctx.oedema_value`` on voxels no bleed holds)."""
    if not lab.any():
        return
    sub = _bbox(lab, margin=int(math.ceil((8.0 + (oedema[1] if oedema else 0.0)) / ctx.sampling.min())))
    box = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub))
    lab = lab[sub]
    brain_box = ctx.brain[box]
    ct = out[box].astype(np.float32)
    w = _weight(ctx, lab, brain_box)
    if oedema is not None:  # hypodense rim: (drop HU, width mm)
        drop, width = oedema
        dist = ndimage.distance_transform_edt(~lab, sampling=ctx.sampling).astype(np.float32)
        rim = np.clip((width - dist) / max(width * 0.5, 1e-3), 0.0, 1.0) * (dist > 0)
        rim *= brain_box * (1.0 - w)
        ct -= drop * rim
    resid = np.clip(ct - ndimage.median_filter(ct, size=3, mode="nearest"), -25.0, 25.0) * brain_box
    if ctx.contrast_hu is not None or ctx.density_hu is not None:
        base = ctx.density_hu
        if ctx.contrast_hu is not None:  # relative to the brain next to the bleed (what makes it visible)
            near = brain_box & ~lab & (label[box] == 0) & (ct > 0.0) & (ct < 80.0)  # not earlier bleeds
            base = (float(np.median(ct[near])) if near.any() else 35.0) + ctx.contrast_hu
            base = float(np.clip(base, *BLOOD_HU))  # still blood: next to CSF a "contrast" alone could make it 20 HU
        lo, hi = base - DENSITY_SPREAD_HU, base + DENSITY_SPREAD_HU
    else:
        lo, hi = hu
        base = rng.uniform(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo))
    target = np.clip(base + texture_sd * ctx.noise(rng, ct.shape, 1.5), lo, hi)
    blended = (1.0 - w) * ct + w * (target + resid)
    if np.issubdtype(out.dtype, np.integer):
        info = np.iinfo(out.dtype)
        blended = np.clip(np.rint(blended), info.min, info.max)
    out[box] = blended.astype(out.dtype)
    value = ctx.kind_values.get(kind, 1) if ctx.kind_values else 1
    if oedema is not None and ctx.oedema_value is not None:
        region = label[box]
        region[(rim >= 0.5) & ~lab & (region == 0) & (blended < 100.0)] = ctx.oedema_value  # not on a calcification
    label[box][lab] = value


# --- lesion shapes ------------------------------------------------------------------------------
def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _pick(rng: np.random.Generator, ras: np.ndarray) -> np.ndarray:
    return ras[int(rng.integers(len(ras)))]


def _blob_centre(ctx: _Ctx, rng, reach_mm: float, exclude: np.ndarray | None, side: int | None) -> np.ndarray:
    """A brain point at least ``reach_mm`` (+3 mm) below the brain surface, in the given
    hemisphere (``side`` +1 = right, −1 = left, None = any), outside ``exclude``."""
    depth = ctx.coarse_depth
    ok = np.ones(depth.shape, dtype=bool)
    if exclude is not None:
        ok &= ~exclude[ctx.coarse_slices]
    kji, ras = ctx.coarse_points(ok & (depth > 0))
    d = depth[ok & (depth > 0)]
    if side is not None:
        lateral = side * (ras[:, 0] - ctx.centroid[0])
        keep = lateral >= min(15.0, 0.5 * float(lateral.max(initial=0.0)))
        kji, ras, d = kji[keep], ras[keep], d[keep]
    if len(d) == 0:
        raise InputError("no room for a bleed in the brain mask", "pass a head CT that covers the brain")
    far = d >= reach_mm + 3.0
    if not far.any():
        far = d >= 0.8 * float(d.max())
    return _pick(rng, ras[far])


def _cone(ctx: _Ctx, rng, side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel of the brain box: its angle (rad) from a random outward axis on one side (``side``
    +1 = right, −1 = left, None = drawn), seen from the brain's centroid, and its distance (mm) from it."""
    side = int(rng.choice([-1, 1])) if side is None else side
    axis = np.array([side, rng.uniform(-0.8, 0.8), rng.uniform(-0.1, 0.6)])
    axis /= np.linalg.norm(axis)
    R, A, S = ctx.ras_grid(ctx.bb)
    dx, dy, dz = R - ctx.centroid[0], A - ctx.centroid[1], S - ctx.centroid[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    cosang = (dx * axis[0] + dy * axis[1] + dz * axis[2]) / np.maximum(dist, 1e-3)
    return np.arccos(np.clip(cosang, -1.0, 1.0)), dist


def _deformed_blobs(ctx: _Ctx, rng, box, centres, radii, amp: float, exclude) -> np.ndarray:
    """Score (mm) of a union of noise-deformed spheres on ``box``; inf outside the brain."""
    R, A, S = ctx.ras_grid(box)
    shape = tuple(b.stop - b.start for b in box)
    score = np.full(shape, np.inf, dtype=np.float32)
    noise = ctx.noise(rng, shape, max(0.4 * float(np.mean(radii)), 1.0))
    for c, r in zip(centres, radii):
        c, r = [float(x) for x in c], float(r)
        rho = np.sqrt((R - c[0]) ** 2 + (A - c[1]) ** 2 + (S - c[2]) ** 2) / r
        score = np.minimum(score, (rho - amp * noise) * r)
    allowed = ctx.brain[box].copy()
    if exclude is not None:
        allowed &= ~exclude[box]
    score[~allowed] = np.inf
    return score


def _n_voxels(ctx: _Ctx, volume_ml: float) -> int:
    return max(1, int(round(volume_ml * 1000.0 / ctx.voxel_mm3)))


def _intraparenchymal(ctx, rng, out, label, volume_ml, exclude=None, side=None, centre=None):
    v = _loguniform(rng, *KIND_VOLUME_ML["intraparenchymal"]) if volume_ml is None else float(volume_ml)
    r = (3.0 * v * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    amp = rng.uniform(0.2, 0.4)
    if centre is None:
        centre = _blob_centre(ctx, rng, r * (1.0 + amp), exclude, side)
    box = ctx.box(centre, r * (1.0 + 4.0 * amp) + 4.0)
    lab = _select(_deformed_blobs(ctx, rng, box, [centre], [r], amp, exclude), _n_voxels(ctx, v), connected=True)
    oedema = (rng.uniform(10.0, 20.0), rng.uniform(2.0, 6.0)) if rng.random() < 0.6 else None
    _paint(ctx, out, label, box, lab, rng, KIND_HU["intraparenchymal"], rng.uniform(2.0, 5.0), oedema, "intraparenchymal")


def _contusion(ctx, rng, out, label, volume_ml, exclude=None, side=None, n_blobs=None):
    v = _loguniform(rng, *KIND_VOLUME_ML["contusion"]) if volume_ml is None else float(volume_ml)
    n_blobs = int(rng.integers(2, 6)) if n_blobs is None else int(n_blobs)
    depth = ctx.coarse_depth
    near = (depth >= 2.0) & (depth <= 8.0)
    if exclude is not None:
        near &= ~exclude[ctx.coarse_slices]
    kji, ras = ctx.coarse_points(near)
    if side is not None and len(ras):
        keep = side * (ras[:, 0] - ctx.centroid[0]) > 10.0
        if keep.any():
            kji, ras = kji[keep], ras[keep]
    if len(ras) == 0:
        return _intraparenchymal(ctx, rng, out, label, v, exclude, side)
    # a base point with bone within 8 mm (near the inner table, not at a cut through the brainstem)
    skull_hu = np.asarray(ctx.ct.array)
    base = None
    for idx in rng.permutation(len(ras))[:60]:
        b = ctx.box(ras[idx], 8.0)
        if (skull_hu[b] > SKULL_HU).any():
            base = ras[idx]
            break
    if base is None:
        base = _pick(rng, ras)
    close = np.linalg.norm(ras - base, axis=1) <= 15.0
    cand = ras[close]
    centres = [base] + [_pick(rng, cand) for _ in range(n_blobs - 1)]
    fractions = rng.dirichlet(np.ones(n_blobs))
    radii = [max((3.0 * f * v * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0), 1.0) for f in fractions]
    amp = rng.uniform(0.15, 0.3)
    box = ctx.box(base, 15.0 + 2.5 * max(radii) + 4.0)
    lab = _select(_deformed_blobs(ctx, rng, box, centres, radii, amp, exclude), _n_voxels(ctx, v), connected=False)
    oedema = (rng.uniform(10.0, 20.0), rng.uniform(3.0, 8.0)) if rng.random() < 0.8 else None
    _paint(ctx, out, label, box, lab, rng, KIND_HU["contusion"], rng.uniform(4.0, 9.0), oedema, "contusion")


def _subdural(ctx, rng, out, label, volume_ml, exclude=None, side=None):
    v = _loguniform(rng, *KIND_VOLUME_ML["subdural"]) if volume_ml is None else float(volume_ml)
    theta, _ = _cone(ctx, rng, side)
    half_angle = math.radians(rng.uniform(45.0, 75.0))
    box = ctx.bb
    depth = ctx.fine_depth()
    thick = np.cos(0.5 * math.pi * np.minimum(theta / half_angle, 1.0)) ** 0.7  # crescent profile
    thick *= 1.0 + 0.15 * ctx.noise(rng, depth.shape, 8.0)
    with np.errstate(divide="ignore"):
        score = (np.maximum(depth - 0.5 * float(ctx.sampling.min()), 0.0) / np.maximum(thick, 0.0)).astype(np.float32)
    allowed = ctx.brain[box] & (theta < half_angle)
    if exclude is not None:
        allowed &= ~exclude[box]
    score[~allowed] = np.inf
    lab = _select(score, _n_voxels(ctx, v), connected=True)
    _paint(ctx, out, label, box, lab, rng, KIND_HU["subdural"], rng.uniform(2.0, 4.0), None, "subdural")


def _ventricles(ctx: _Ctx) -> np.ndarray:
    """Over the brain box: low-density (0–15 HU after 1 mm smoothing) voxels ≥ 12 mm deep in the brain,
    in the larger connected pieces near its centre."""
    sm = ctx.smoothed_ct()
    vent = (sm >= VENTRICLE_HU[0]) & (sm <= VENTRICLE_HU[1]) & (ctx.fine_depth() >= 12.0) & ctx.brain[ctx.bb]
    lab, n = ndimage.label(vent)
    if n == 0:
        return vent
    sizes = np.bincount(lab.ravel())[1:] * ctx.voxel_mm3 / 1000.0
    keep = np.flatnonzero(sizes >= max(0.3, 0.1 * sizes.max())) + 1
    return np.isin(lab, keep)


def _intraventricular(ctx, rng, out, label, volume_ml, exclude=None, side=None):
    box = ctx.bb
    vent = _ventricles(ctx)
    if exclude is not None:
        vent &= ~exclude[box]
    vent_ml = float(vent.sum()) * ctx.voxel_mm3 / 1000.0
    if vent_ml < 1.5:  # no ventricles found: a central blob
        v = _loguniform(rng, *KIND_VOLUME_ML["intraventricular"]) if volume_ml is None else float(volume_ml)
        d = ctx.coarse_depth
        kji, ras = ctx.coarse_points(d >= 0.8 * d.max())
        centre = ras[np.argmin(np.linalg.norm(ras - ctx.centroid, axis=1))]
        return _intraparenchymal(ctx, rng, out, label, v, exclude, centre=centre)
    if volume_ml is None:
        lo, hi = KIND_VOLUME_ML["intraventricular"]
        v = _loguniform(rng, lo, min(hi, 0.6 * vent_ml))  # vent_ml ≥ 1.5, so the range is not empty
    else:
        v = float(volume_ml)
    R, A, S = ctx.ras_grid(box)
    # the bleed spreads from a seed in the dependent (posterior, patient supine) part of one
    # ventricular space and prefers dependent voxels: score = distance + 0.5·ΔA + texture (mm)
    comp, n_comp = ndimage.label(vent)
    sizes = np.bincount(comp.ravel())[1:].astype(np.float64)
    which = int(rng.choice(n_comp, p=sizes / sizes.sum())) + 1
    pts = np.argwhere(comp == which)
    a_pts = np.broadcast_to(A, vent.shape)[tuple(pts.T)]
    dependent = pts[a_pts <= np.percentile(a_pts, 25)]
    seed = dependent[int(rng.integers(len(dependent)))]
    sr, sa, ss = (float(np.broadcast_to(g, vent.shape)[tuple(seed)]) for g in (R, A, S))
    score = np.sqrt((R - sr) ** 2 + (A - sa) ** 2 + (S - ss) ** 2) + 0.5 * (A - sa)
    score = score.astype(np.float32) + 2.0 * ctx.noise(rng, vent.shape, 4.0)
    allowed = ctx.brain[box].copy()
    if exclude is not None:
        allowed &= ~exclude[box]
    if _n_voxels(ctx, v) > int(vent.sum()):  # more than the ventricles hold: spill into the tissue around
        spill = ndimage.distance_transform_edt(~vent, sampling=ctx.sampling).astype(np.float32)
        score = np.where(vent, score, 1e4 + spill)
    else:
        score[~vent] = np.inf
    score[~allowed] = np.inf
    lab = _select(score, _n_voxels(ctx, v), connected=False)
    _paint(ctx, out, label, box, lab, rng, KIND_HU["intraventricular"], rng.uniform(2.0, 4.0), None, "intraventricular")


_MAKERS = {
    "intraparenchymal": _intraparenchymal,
    "contusion": _contusion,
    "subdural": _subdural,
    "intraventricular": _intraventricular,
}


# --- public API ---------------------------------------------------------------------------------
def synthesize_hemorrhage(
    ct: Image,
    rng: np.random.Generator,
    kind: str = "intraparenchymal",
    volume_ml: float | None = None,
    *,
    brain: np.ndarray | None = None,
    density_hu: float | None = None,
    contrast_hu: float | None = None,
) -> tuple[Image, Image]:
    """Paint one synthetic bleed into a copy of ``ct`` (HU); returns ``(ct_with_bleed, label)``.

    ``kind``:
      * ``"intraparenchymal"`` — one irregular blob (sphere deformed by smoothed noise), deep in
        the brain away from the skull, 50–90 HU, textured, with a hypodense oedema rim (10–20 HU
        lower) 60 % of the time; volume drawn log-uniformly from 0.1–80 mL unless given.
      * ``"contusion"`` — 2–5 small blobs clustered within 15 mm of a point 2–8 mm below the brain
        surface next to the inner table, 50–80 HU, heterogeneous, usually with oedema; 0.3–10 mL
        in total unless given.
      * ``"subdural"`` — a crescent in the outer brain-mask shell along the inner table, within a
        45–75° cone on one side, thickest in the middle and tapering to the edges; 50–80 HU;
        5–80 mL unless given.
      * ``"intraventricular"`` — hyperdense (45–75 HU) fill of the low-density ventricles (0–15 HU,
        ≥ 12 mm deep in the brain), filling the dependent (posterior) parts first; falls back to a
        central blob where no ventricles are found; 0.5–15 mL (at most 60 % of the ventricles)
        unless given.

    The label (uint8, 1 = hemorrhage, same grid) marks the voxels where the bleed's blend weight is
    ≥ 0.5; its volume equals ``volume_ml`` to within one voxel whenever the brain can hold it. All
    sizes are in mm/mL, so any spacing and orientation works. ``brain`` is a precomputed
    :func:`brain_mask` (saves ~1 s per call). ``density_hu`` replaces the kind's HU range by one
    mean bleed density (texture within ±15 HU of it): hyperacute-to-early-subacute blood spans about
    45–90 HU, and faint bleeds are the ones a model trained on the kinds' ranges misses.
    ``contrast_hu`` (instead of ``density_hu``) sets the mean density this many HU above the median
    brain (0–80 HU) around the bleed: a faint bleed is hard when it is close to its surroundings, and
    the same HU is subtle on grey matter and plain on white matter. ``ct`` is not modified.
    """
    if kind not in _MAKERS:
        raise UsageError(f"unknown hemorrhage kind {kind!r}", f"use one of {', '.join(KINDS)}")
    if volume_ml is not None and not (volume_ml > 0):
        raise UsageError(f"volume_ml must be positive, got {volume_ml}", "pass a volume in mL, e.g. 10")
    if density_hu is not None and not (0.0 < density_hu < 200.0):
        raise UsageError(f"density_hu must be a blood density in HU (0–200), got {density_hu}", "pass e.g. 55")
    if contrast_hu is not None and (density_hu is not None or not (0.0 < contrast_hu < 150.0)):
        raise UsageError(f"contrast_hu must be a positive contrast in HU (0–150) and not given with density_hu, "
                         f"got {contrast_hu}", "pass one of density_hu or contrast_hu, e.g. contrast_hu=15")
    ctx = _Ctx(ct, brain_mask(ct) if brain is None else _check_brain(brain, ct))
    ctx.density_hu, ctx.contrast_hu = density_hu, contrast_hu
    out = np.array(ct.array, copy=True)
    label = np.zeros(ct.array.shape[:3], dtype=np.uint8)
    _MAKERS[kind](ctx, rng, out, label, volume_ml)
    return Image(out, ct.ijk_to_ras), Image(label, ct.ijk_to_ras)


def _check_brain(brain: np.ndarray, ct: Image) -> np.ndarray:
    brain = np.asarray(brain)
    if brain.shape != ct.array.shape[:3]:
        raise UsageError(f"brain mask shape {brain.shape} does not match the CT {ct.array.shape}", "pass brain_mask(ct)")
    return brain.astype(bool, copy=False)


def make_demo_case(ct: Image, seed: int = 2026) -> tuple[Image, Image]:
    """The fixed demo case: one ~15–25 mL intraparenchymal hemorrhage deep in one hemisphere
    plus one small (~1–2 mL) contusion under the inner table of the other hemisphere.

    Deterministic for a given ``ct`` and ``seed``. The demo seed (2026) is **never used in
    training**: training data must be synthesised with other seeds, so the demo is a held-out case.
    Returns ``(ct_with_bleeds, label)`` (uint8, 1 = hemorrhage).
    """
    rng = np.random.default_rng(seed)
    ctx = _Ctx(ct, brain_mask(ct))
    out = np.array(ct.array, copy=True)
    label = np.zeros(ct.array.shape[:3], dtype=np.uint8)
    side = int(rng.choice([-1, 1]))
    _intraparenchymal(ctx, rng, out, label, rng.uniform(17.0, 23.0), side=side)
    # keep the contusion well away from the first bleed
    exclude = np.zeros(label.shape, dtype=bool)
    bb = _bbox(label > 0, margin=int(math.ceil(10.0 / ctx.sampling.min())) + 1)
    exclude[bb] = ndimage.distance_transform_edt(label[bb] == 0, sampling=ctx.sampling) < 10.0
    _contusion(ctx, rng, out, label, rng.uniform(1.0, 2.0), exclude=exclude, side=-side, n_blobs=2)
    return Image(out, ct.ijk_to_ras), Image(label, ct.ijk_to_ras)
