"""Input-domain check: is this image what the model card says the model reads?

One small, documented function per model family, chosen by the bundle's ``domain.family``; every
threshold comes from the bundle's ``domain`` section (defaults below), so a model declares what it
reads. A check returns a :class:`DomainVerdict`:

* ``refuse`` — evidence of another modality or another body part. The pipeline raises
  :class:`~..errors.UnusualInputError` (exit 3) unless the user asked to run anyway
  (``allow_unusual_input``); then every output is marked (``summary.json`` "unusual_input", a report
  banner, the Slicer dialog).
* ``warn`` — borderline (little head coverage, odd proportions): a warning, as for other odd inputs.
* ``ok``.

Size alone never refuses (the extent warning of :mod:`.checks` stays a warning).

``head_ct`` (:func:`head_ct_check`) — on the volume brought to canonical axes and block-averaged to
about 2 mm in-plane (averaging also tames low-dose noise; block maxima keep thin bone):

1. modality: air (0.5th percentile ≤ ``air_hu``) and soft tissue (≥ ``min_soft_tissue_fraction`` of the
   voxels above −300 HU lie in −100…100 HU). No air with values that stay above 0: another modality
   (MR, PET, a parametric map) or a CT without its rescale (air stored at 0) — the message says which.
2. anatomy, per axial slice: bone (> ``bone_hu``) closed by ``ring_closing_mm``; the region it
   encloses must be at least ``min_cranial_area_cm2`` and hold ≥ ``min_brain_fraction`` brain-density
   voxels (``brain_hu``). A slice passing both is a *cranial slice*. A head shows them over at least
   ``min_cranial_mm`` (a posterior-fossa-only scan, a vertex-cut scan, a child's head, a skull with a
   craniectomy gap above intact slices all do); a torso, a limb, noise or a brain without skull shows
   none (refused) — a few millimetres only is borderline (warning).
3. orientation sanity: a head is longer front-to-back than it is wide; a cranial region much wider
   left-right than front-to-back (ratio > ``max_width_to_length``) suggests swapped header axes (warning).

``perfusion_maps`` (:func:`perfusion_check`) — each channel must be a map, not a CT (no air near
−1000), not mostly negative (a map of flow, volume or time is ≥ 0: noise or a difference image is
not), and within ``max_range_factor`` × its declared ``expected_range`` (seconds as milliseconds,
for example, are refused).
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from ..image import Image
from .checks import finite_sample
from .grid import canonical_grid

HEAD_CT_DEFAULTS: dict[str, Any] = {
    "air_hu": -500.0,
    "min_soft_tissue_fraction": 0.2,
    "bone_hu": 200.0,
    "brain_hu": [0.0, 80.0],
    "ring_closing_mm": 6.0,
    "min_cranial_area_cm2": 12.0,
    "min_brain_fraction": 0.5,
    "min_cranial_mm": 10.0,
    "max_width_to_length": 1.15,
    "sampling_mm": 2.0,
}

PERFUSION_DEFAULTS: dict[str, Any] = {
    "air_hu": -500.0,
    "max_negative_fraction": 0.05,
    "max_range_factor": 10.0,
}


@dataclass(frozen=True)
class DomainVerdict:
    """``verdict``: ok, warn or refuse; ``seen``: one line of what was seen (empty when ok);
    ``measures``: the numbers the verdict rests on (for ``summary.json`` and the card)."""

    verdict: str
    seen: str = ""
    fix: str = ""
    measures: dict[str, Any] = field(default_factory=dict)


def check_domain(inputs: list[Image], names: list[str], meta: dict) -> DomainVerdict:
    """The bundle's family check on its inputs (``ok`` for a bundle that declares no ``domain``)."""
    spec = meta.get("domain") or {}
    family = spec.get("family")
    if family is None:
        return DomainVerdict("ok")
    if family not in FAMILIES:
        raise ValueError(f"unknown domain family {family!r}")  # the bundle schema lists the families
    return FAMILIES[family](inputs, names, meta, spec)


def head_ct_check(inputs: list[Image], names: list[str], meta: dict, spec: dict) -> DomainVerdict:
    """Non-contrast head CT in HU: modality, then skull and brain on axial slices (module docstring)."""
    t = {**HEAD_CT_DEFAULTS, **spec}
    img, name = inputs[0], names[0]
    what = meta.get("title") or "head CT"
    fix = f"pass a non-contrast head CT in Hounsfield units (this model reads: {what})"
    arr, peaks, spacing_kji = _canonical_blocks(img, float(t["sampling_mm"]))
    finite = finite_sample(arr)  # block means: the same air, tissue and bone, a quarter of the voxels (or fewer)
    if finite.size == 0:
        return DomainVerdict("refuse", f"input {name} holds no finite values", fix)
    p_lo, p_hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    body = finite[finite > -300]
    soft = float(np.mean((body >= -100) & (body <= 100))) if body.size else 0.0
    m: dict[str, Any] = {"p0_5": round(p_lo, 1), "p99_5": round(p_hi, 1), "soft_tissue_fraction": round(soft, 3)}
    if p_lo > t["air_hu"]:
        if -50 <= p_lo <= 50 and p_hi > 1000:
            return DomainVerdict("refuse", f"input {name}: the lowest values are near {p_lo:.0f}, not air at −1000 HU "
                                 f"(values {p_lo:.0f}…{p_hi:.0f}): a CT stored without its rescale, or not a CT", fix +
                                 "; if it is a CT stored without its rescale, apply RescaleIntercept (usually −1024)", m)
        return DomainVerdict("refuse", f"input {name} has no air near −1000 HU (values {_n(p_lo)}…{_n(p_hi)}): it looks "
                             "like another modality (MR, PET) or a parametric map, not a CT in Hounsfield units", fix, m)
    if soft < t["min_soft_tissue_fraction"]:
        return DomainVerdict("refuse", f"input {name}: only {soft:.0%} of the body is soft-tissue density (−100…100 HU): "
                             "not a CT of a head (noise, another modality, or a lung/bone window export)", fix, m)
    cranial, width_to_length = _cranial_slices(arr, peaks, spacing_kji, t)
    cranial_mm = float(cranial.sum() * spacing_kji[0])
    m.update({"cranial_mm": round(cranial_mm, 1), "cranial_slices": int(cranial.sum()),
              "width_to_length": None if width_to_length is None else round(width_to_length, 2)})
    if cranial_mm == 0:
        return DomainVerdict("refuse", f"input {name} shows no skull enclosing brain-density tissue on any axial slice "
                             "(a torso, a limb, a skull-stripped brain, or not an image of anatomy)", fix, m)
    if cranial_mm < t["min_cranial_mm"]:
        return DomainVerdict("warn", f"input {name}: a skull enclosing brain tissue is seen over only {cranial_mm:.0f} mm; "
                             "check the scan covers the head", "", m)
    if width_to_length is not None and width_to_length > t["max_width_to_length"]:
        return DomainVerdict("warn", f"input {name}: the head is {width_to_length:.2f}× wider left-right than long "
                             "front-to-back; the file's orientation (axes) may be wrong", "", m)
    return DomainVerdict("ok", "", "", m)


def perfusion_check(inputs: list[Image], names: list[str], meta: dict, spec: dict) -> DomainVerdict:
    """Perfusion maps: per channel not a CT, not mostly negative, within the declared range (module docstring)."""
    t = {**PERFUSION_DEFAULTS, **spec}
    m: dict[str, Any] = {}
    for img, name, ch in zip(inputs, names, meta["inputs"]):
        finite = finite_sample(img.array)
        if finite.size == 0:
            return DomainVerdict("refuse", f"input {name} holds no finite values", "pass the perfusion map", m)
        p_lo, p_hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
        neg = float(np.mean(finite < 0))
        m[name] = {"p0_5": round(p_lo, 3), "p99_5": round(p_hi, 3), "negative_fraction": round(neg, 4)}
        unit = f" {ch['unit']}" if ch.get("unit") else ""
        fix = f"pass the {name} map ({ch.get('description', name)}) as the {name} input"
        if p_lo <= t["air_hu"]:
            return DomainVerdict("refuse", f"input {name} reaches {p_lo:.0f} (air in HU): it looks like a CT, not a "
                                 f"{name} perfusion map", fix, m)
        if neg > t["max_negative_fraction"]:
            return DomainVerdict("refuse", f"input {name}: {neg:.0%} of the voxels are negative; a {name} map is never "
                                 "negative (noise or a difference image?)", fix, m)
        rng = ch.get("expected_range")
        if rng is not None and p_hi > t["max_range_factor"] * max(abs(rng[1]), 1e-6):
            return DomainVerdict("refuse", f"input {name} reaches {_n(p_hi)}{unit}, over {t['max_range_factor']:g}× the "
                                 f"{name} range ({rng[0]:g}…{rng[1]:g}{unit}): another quantity or other units", fix, m)
    return DomainVerdict("ok", "", "", m)


FAMILIES: dict[str, Callable[[list[Image], list[str], dict, dict], DomainVerdict]] = {
    "head_ct": head_ct_check,
    "perfusion_maps": perfusion_check,
}


# --- head CT helpers ------------------------------------------------------------------------------
def cranial_slices(img: Image, spec: dict | None = None) -> np.ndarray:
    """Per axial slice of ``img`` on canonical axes (k = S, as the network grid of a 2D/2.5D model):
    does a skull enclose brain-density tissue there (step 2 of :func:`head_ct_check`, same thresholds)?"""
    t = {**HEAD_CT_DEFAULTS, **(spec or {})}
    arr, peaks, spacing_kji = _canonical_blocks(img, float(t["sampling_mm"]))
    return _cranial_slices(arr, peaks, spacing_kji, t)[0]


def _canonical_blocks(img: Image, sampling_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The volume on canonical axes (k = S, j = A, i = R) in in-plane blocks of about ``sampling_mm``:
    (block means, block maxima, spacing k, j, i in mm). Means tame noise for densities; maxima keep
    thin bone (a 1 mm temporal squama averaged with brain falls below any bone threshold)."""
    canon, _ = canonical_grid(img)
    a = np.asarray(canon.array, dtype=np.float32)
    sp = canon.spacing[::-1].astype(float)  # k, j, i
    fj, fi = (max(1, int(round(sampling_mm / s))) for s in sp[1:])
    K, J, I = a.shape
    J2, I2 = (J // fj) * fj, (I // fi) * fi
    if J2 == 0 or I2 == 0:
        return a, a, sp
    # block sums and maxima over strided views (one per offset in the block): a reshape-and-reduce's
    # values up to float32 rounding (maxima exactly), five times faster on a 256² × 108 CT
    views = [a[:, dj:J2:fj, di:I2:fi] for dj in range(fj) for di in range(fi)]
    total, peak = views[0].copy(), views[0].copy()
    for v in views[1:]:
        np.add(total, v, out=total)
        np.maximum(peak, v, out=peak)
    total *= np.float32(1.0 / (fj * fi))
    return total, peak, sp * np.array([1.0, fj, fi])


def _cranial_slices(arr: np.ndarray, peaks: np.ndarray, sp: np.ndarray, t: dict) -> tuple[np.ndarray, float | None]:
    """Per axial slice: does bone (block maxima) enclose a brain-sized region of brain density (block
    means)? And the width/length ratio of the enclosed region over the cranial slices (None if none)."""
    a = np.nan_to_num(arr, nan=-1000.0)
    bone = np.nan_to_num(peaks, nan=-1000.0) > float(t["bone_hu"])
    r = max(1, int(round(float(t["ring_closing_mm"]) / float(min(sp[1:])))))
    closed = close_in_plane(np.pad(bone, ((0, 0), (r, r), (r, r))), r)[:, r:-r, r:-r]
    inside = _enclosed(closed)
    lo, hi = t["brain_hu"]
    brain = inside & (a >= lo) & (a <= hi)
    px_cm2 = float(sp[1] * sp[2]) / 100.0
    area = inside.sum(axis=(1, 2)) * px_cm2
    frac = brain.sum(axis=(1, 2)) / np.maximum(inside.sum(axis=(1, 2)), 1)
    cranial = (area >= float(t["min_cranial_area_cm2"])) & (frac >= float(t["min_brain_fraction"]))
    if not cranial.any():
        return cranial, None
    region = inside[cranial].any(axis=0)
    jj, ii = np.nonzero(region)
    length = (jj.max() - jj.min() + 1) * sp[1]
    width = (ii.max() - ii.min() + 1) * sp[2]
    return cranial, float(width / length)


def disk_rectangles(r: int) -> list[tuple[int, int]]:
    """The disk ``x² + y² ≤ r²`` (pixels) as a union of centred rectangles, by half-sizes (j, i): for
    each row offset ``dy`` the rectangle ``|y| ≤ dy, |x| ≤ ⌊√(r² − dy²)⌋``, without those inside another."""
    rects = [(dy, math.isqrt(r * r - dy * dy)) for dy in range(r + 1)]
    return [(a, b) for a, b in rects if not any((c, d) != (a, b) and c >= a and d >= b for c, d in rects)]


def close_in_plane(mask: np.ndarray, r: int) -> np.ndarray:
    """``binary_closing(mask, disk of radius r in each axial slice)`` (scipy's, border 0), exactly, by
    separable running max/min filters over the disk's rectangles: a dilation by a union is the union
    of the dilations, an erosion by it the intersection of the erosions. Ten times faster than
    scipy's element-by-element structure on a 128² × 108 bone mask."""
    m = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)

    def rect(a: np.ndarray, half_j: int, half_i: int, f) -> np.ndarray:
        out = a
        for axis, half in ((1, half_j), (2, half_i)):
            if half:
                out = f(out, 2 * half + 1, axis=axis, mode="constant", cval=0)
        return out

    rects = disk_rectangles(r)
    dilated = np.zeros_like(m)
    for a, b in rects:
        np.maximum(dilated, rect(m, a, b, ndimage.maximum_filter1d), out=dilated)
    closed = np.ones_like(m)
    for a, b in rects:
        np.minimum(closed, rect(dilated, a, b, ndimage.minimum_filter1d), out=closed)
    return closed.astype(bool)


def _enclosed(wall: np.ndarray) -> np.ndarray:
    """Per axial slice, the voxels not in ``wall`` that ``wall`` encloses (4-connected in-plane): what
    ``binary_fill_holes(wall, in-plane structure) & ~wall`` gives, by one labelling instead of an
    iterated dilation."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    lab, n = ndimage.label(~wall, structure=in_plane)
    if n == 0:
        return np.zeros(wall.shape, bool)
    border = np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])
    open_ = np.zeros(n + 1, bool)
    open_[border] = True
    open_[0] = True  # the wall itself
    return ~open_[lab]


def _n(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
