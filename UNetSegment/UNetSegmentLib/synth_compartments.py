"""Compartment-labelled head bleeds, their oedema, and hemorrhage mimics (cases for ct-hemorrhage 2.0).

The classes are BLAST-CT's (Monteiro et al. 2020), numbered as issue #19 asks: 1 intraparenchymal
haemorrhage (IPH), 2 extra-axial haemorrhage (EAH: subdural, epidural, subarachnoid), 3
intraventricular haemorrhage (IVH), 4 perilesional oedema. BLAST-CT numbers the last two the other way
round (3 oedema, 4 IVH): :data:`TO_BLAST_CT` maps ours to theirs for any comparison of label maps.
Bleeds are painted as in :mod:`.synth` (same geometry context, the same blending, physical units),
with these additions:

* ``epidural`` — a biconvex lens against the inner table, its footprint sized from its volume (about
  twice as wide as thick) and its thickness falling to zero at its rim, so the bleed stops short
  instead of tapering along the skull as a subdural does (an epidural bleed is bounded by the sutures
  where the dura is fixed). 55–90 HU.
* ``subarachnoid`` — thin hyperdensity in CSF spaces: voxels well below the brain's density, outside the
  ventricles, in the sulci of one convexity or in the basal cisterns (below and in front of the centre),
  spreading from a seed along the CSF; 45–75 HU (blood mixed with CSF).
* fluid levels — some IPH get a haematocrit level: the dependent (posterior, patient supine) part
  denser, the rest lighter, with a sharp boundary.
* the oedema rim around IPH and contusions (hypodense, 10–20 HU below the brain) is labelled 4 where
  it dominates and no bleed or calcification lies.
* mimics, never labelled: calcifications of the choroid plexus, the pineal gland, the basal ganglia
  and the falx; a hyperdense superior sagittal sinus; a beam-hardening band between the petrous ridges.

:func:`synthesize_compartments` paints a list of bleeds and mimics into one CT. The CT is never modified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError, UsageError
from .image import Image
from .synth import _MAKERS, _cone, _Ctx, _deformed_blobs, _loguniform, _n_voxels, _paint, _select, _ventricles, brain_mask

#: label value → name, the BLAST-CT classes
CLASSES = {1: "IPH", 2: "EAH", 3: "IVH", 4: "oedema"}
OEDEMA = 4
#: our label value → BLAST-CT's (its data/config.json class_names: foreground, IPH, EAH, oedema, IVH)
TO_BLAST_CT = {0: 0, 1: 1, 2: 2, 3: 4, 4: 3}
#: which class each bleed kind is
KIND_CLASS = {"intraparenchymal": 1, "contusion": 1, "subdural": 2, "epidural": 2, "subarachnoid": 2, "intraventricular": 3}
BLEED_KINDS = tuple(KIND_CLASS)

EXTRA_KIND_HU = {"epidural": (55.0, 90.0), "subarachnoid": (45.0, 75.0)}
EXTRA_KIND_VOLUME_ML = {"epidural": (4.0, 60.0), "subarachnoid": (0.5, 12.0)}
CSF_BELOW_BRAIN_HU = 10.0  # CSF (sulci, cisterns): this much below the brain's median after 1 mm smoothing


@dataclass(frozen=True)
class Bleed:
    """One bleed to paint: its kind, volume (None: the kind's range, log-uniform), whether an IPH gets a
    fluid level (None: 25 % of them), and its mean density (``density_hu``) or its contrast with the brain
    around it (``contrast_hu``) as in :func:`.synth.synthesize_hemorrhage` (neither: the kind's range)."""

    kind: str
    volume_ml: float | None = None
    fluid_level: bool | None = None
    density_hu: float | None = None
    contrast_hu: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KIND_CLASS:
            raise UsageError(f"unknown bleed kind {self.kind!r}", f"use one of {', '.join(BLEED_KINDS)}")
        if self.volume_ml is not None and not (self.volume_ml > 0):
            raise UsageError(f"bleed volume must be positive, got {self.volume_ml} mL", "pass a volume in mL, e.g. 10")
        if self.density_hu is not None and not (0.0 < self.density_hu < 200.0):
            raise UsageError(f"bleed density must be in 0–200 HU, got {self.density_hu}", "pass e.g. 60")
        if self.contrast_hu is not None and (self.density_hu is not None or not (0.0 < self.contrast_hu < 150.0)):
            raise UsageError(f"bleed contrast must be in 0–150 HU and not given with a density, got {self.contrast_hu}",
                             "pass one of density_hu or contrast_hu")


# --- extra bleed kinds -------------------------------------------------------------------------
def _epidural(ctx: _Ctx, rng, out, label, volume_ml, exclude=None, side=None):
    v = _loguniform(rng, *EXTRA_KIND_VOLUME_ML["epidural"]) if volume_ml is None else float(volume_ml)
    theta, dist = _cone(ctx, rng, side)
    depth = ctx.fine_depth()
    # a lens of footprint radius r and parabolic profile holds (π/2)·r²·t; with its thickness t about r/2
    # (a 6 cm wide, 1.5 cm thick epidural), r = (4v/π)^(1/3); as an angle seen from the brain's centre,
    # at the brain surface's distance from it along the cone's axis
    radius = (4.0 * v * 1000.0 / math.pi) ** (1.0 / 3.0) * rng.uniform(0.85, 1.1)
    along = ctx.brain[ctx.bb] & (theta < math.radians(6.0))
    surface = float(np.broadcast_to(dist, depth.shape)[along].max()) if along.any() else 70.0
    half_angle = min(radius / max(surface, 30.0), math.radians(45.0))
    # thickness ∝ 1 − (θ/half)²: the N voxels of lowest depth/thickness fill depth < s·thickness(θ), a
    # biconvex lens against the inner table, never deeper than its radius
    thick = np.clip(1.0 - (theta / half_angle) ** 2, 0.0, 1.0)
    thick *= 1.0 + 0.08 * ctx.noise(rng, depth.shape, 10.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (np.maximum(depth - 0.5 * float(ctx.sampling.min()), 0.0) / thick).astype(np.float32)
    allowed = ctx.brain[ctx.bb] & (theta < half_angle) & (depth <= radius)
    if exclude is not None:
        allowed &= ~exclude[ctx.bb]
    score[~allowed | ~np.isfinite(score)] = np.inf
    lab = _select(score, _n_voxels(ctx, v), connected=True)
    _paint(ctx, out, label, ctx.bb, lab, rng, EXTRA_KIND_HU["epidural"], rng.uniform(2.0, 5.0), None, "epidural")


def _subarachnoid_space(ctx: _Ctx) -> np.ndarray:
    """CSF outside the ventricles in the brain box: at least :data:`CSF_BELOW_BRAIN_HU` below the brain's
    median (scans differ in calibration: an absolute window would take in grey matter on some)."""
    sm = ctx.smoothed_ct()
    brain = ctx.brain[ctx.bb]
    tissue = float(np.median(sm[brain & (sm > 0.0) & (sm < 80.0)])) if brain.any() else 30.0
    return (sm >= -10.0) & (sm <= tissue - CSF_BELOW_BRAIN_HU) & brain & ~_ventricles(ctx)


def _subarachnoid(ctx: _Ctx, rng, out, label, volume_ml, exclude=None, side=None):
    v = _loguniform(rng, *EXTRA_KIND_VOLUME_ML["subarachnoid"]) if volume_ml is None else float(volume_ml)
    depth = ctx.fine_depth()
    R, A, S = ctx.ras_grid(ctx.bb)
    shape = depth.shape
    csf = _subarachnoid_space(ctx)
    n = _n_voxels(ctx, v)
    c = ctx.centroid
    cand = np.zeros(shape, bool)
    if rng.random() < 0.5:  # basal (suprasellar, ambient) cisterns: below and in front of the brain's centre
        where = ((np.broadcast_to(S, shape) > c[2] - 35.0) & (np.broadcast_to(S, shape) < c[2] - 10.0)
                 & (np.broadcast_to(A, shape) > c[1] - 5.0) & (np.broadcast_to(A, shape) < c[1] + 30.0)
                 & (np.abs(np.broadcast_to(R, shape) - c[0]) < 25.0))
        cand = csf & where
    if int(cand.sum()) < n // 2:  # the sulci of one convexity: within 12 mm of the brain surface, in a wide cone
        theta, _ = _cone(ctx, rng, side)
        where = (depth <= 12.0) & (theta < math.radians(rng.uniform(40.0, 70.0)))
        cand = csf & where
        if int(cand.sum()) < n:  # too little CSF seen (a head without visible sulci): the thin outer shell
            cand |= where & (depth > 0) & (depth <= 2.5)
    if exclude is not None:
        cand &= ~exclude[ctx.bb]
    if not cand.any():
        raise InputError("no CSF space for a subarachnoid bleed", "use another kind")
    pts = np.argwhere(cand)
    seed = pts[int(rng.integers(len(pts)))]
    sr, sa, ss = (float(np.broadcast_to(g, shape)[tuple(seed)]) for g in (R, A, S))
    score = np.sqrt((R - sr) ** 2 + (A - sa) ** 2 + (S - ss) ** 2).astype(np.float32) + 3.0 * ctx.noise(rng, shape, 5.0)
    score[~cand] = np.inf
    lab = _select(score, n, connected=False)
    _paint(ctx, out, label, ctx.bb, lab, rng, EXTRA_KIND_HU["subarachnoid"], rng.uniform(2.0, 4.0), None, "subarachnoid")


_EXTRA_MAKERS = {"epidural": _epidural, "subarachnoid": _subarachnoid}


def _fluid_level(ctx: _Ctx, rng, out: np.ndarray, new: np.ndarray) -> None:
    """A haematocrit level in the bleed ``new`` (full-volume mask): below a level in A (posterior is
    dependent for a supine patient) +8–15 HU, above it −5–10 HU, a sharp boundary."""
    idx = np.argwhere(new)
    if len(idx) < 20:
        return
    a = ctx.ct.ijk_to_ras_points(idx[:, ::-1].astype(np.float64))[:, 1]
    level = np.percentile(a, rng.uniform(30.0, 60.0))
    lower = a <= level
    delta = np.where(lower, rng.uniform(8.0, 15.0), -rng.uniform(5.0, 10.0))
    vals = out[tuple(idx.T)].astype(np.float32) + delta
    if np.issubdtype(out.dtype, np.integer):
        vals = np.rint(vals)
    out[tuple(idx.T)] = vals.astype(out.dtype)


# --- mimics (never labelled) -------------------------------------------------------------------
def _blob(ctx: _Ctx, rng, out, scratch, centre, radius_mm: float, hu: tuple[float, float]) -> None:
    box = ctx.box(centre, radius_mm * 2.0 + 3.0)
    score = _deformed_blobs(ctx, rng, box, [centre], [radius_mm], 0.2, None)
    lab = _select(score, _n_voxels(ctx, 4.0 / 3.0 * math.pi * radius_mm ** 3 / 1000.0), connected=True)
    _paint(ctx, out, scratch, box, lab, rng, hu, 5.0, None, "mimic")


def _deep_point(ctx: _Ctx, lateral_mm: float, posterior_mm: float, up_mm: float) -> np.ndarray:
    """The brain point nearest to centroid + (lateral, −posterior, up) mm."""
    target = ctx.centroid + np.array([lateral_mm, -posterior_mm, up_mm])
    _, ras = ctx.coarse_points(ctx.coarse_depth > 0)
    return ras[int(np.argmin(np.linalg.norm(ras - target, axis=1)))]


def _choroid_calcification(ctx: _Ctx, rng, out, scratch) -> None:
    """In the posterior (dependent) part of the lateral ventricles, where the glomus calcifies."""
    vent = _ventricles(ctx)
    if vent.sum() < 50:
        centre = _deep_point(ctx, float(rng.choice([-1, 1])) * 15.0, 20.0, 5.0)
    else:
        pts = np.argwhere(vent) + np.array([b.start for b in ctx.bb])
        ras = ctx.ct.ijk_to_ras_points(pts[:, ::-1].astype(np.float64))
        back = ras[ras[:, 1] <= np.percentile(ras[:, 1], 15)]
        centre = back[int(rng.integers(len(back)))]
    _blob(ctx, rng, out, scratch, centre, rng.uniform(1.5, 3.5), (150.0, 350.0))


def _pineal_calcification(ctx: _Ctx, rng, out, scratch) -> None:
    _blob(ctx, rng, out, scratch, _deep_point(ctx, 0.0, rng.uniform(10.0, 20.0), rng.uniform(-5.0, 5.0)),
          rng.uniform(1.5, 3.0), (120.0, 300.0))


def _basal_ganglia_calcification(ctx: _Ctx, rng, out, scratch) -> None:
    """Bilateral and roughly symmetric, faint to dense."""
    lat, back, up = rng.uniform(18.0, 26.0), rng.uniform(-10.0, 5.0), rng.uniform(-8.0, 4.0)  # globus pallidus
    r, hu = rng.uniform(2.0, 4.5), rng.uniform(70.0, 160.0)
    for side in (-1, 1):
        _blob(ctx, rng, out, scratch, _deep_point(ctx, side * lat, back, up), r, (hu - 15.0, hu + 15.0))


def _falx_calcification(ctx: _Ctx, rng, out, scratch) -> None:
    """A thin plate in the midline, above the centre of the brain."""
    R, A, S = ctx.ras_grid(ctx.bb)
    a0 = ctx.centroid[1] + rng.uniform(-30.0, 30.0)
    length, height = rng.uniform(10.0, 30.0), rng.uniform(4.0, 10.0)
    s0 = ctx.centroid[2] + rng.uniform(20.0, 45.0)
    plate = (np.abs(R - ctx.centroid[0]) <= 0.8) & (np.abs(A - a0) <= length / 2) & (np.abs(S - s0) <= height / 2)
    _paint(ctx, out, scratch, ctx.bb, plate & ctx.brain[ctx.bb], rng, (150.0, 400.0), 20.0, None, "mimic")


def _dense_sinus(ctx: _Ctx, rng, out, scratch) -> None:
    """The superior sagittal sinus as dense as blood: midline, against the posterior/superior inner table."""
    R, A, S = ctx.ras_grid(ctx.bb)
    depth = ctx.fine_depth()
    sinus = (np.abs(R - ctx.centroid[0]) <= rng.uniform(3.0, 5.0)) & (depth > 0) & (depth <= 4.0) \
        & (A < ctx.centroid[1] + 20.0) & (S > ctx.centroid[2] - 10.0)
    _paint(ctx, out, scratch, ctx.bb, sinus, rng, (58.0, 75.0), 2.0, None, "mimic")


def _beam_hardening(ctx: _Ctx, rng, out, scratch) -> None:
    """A band between the petrous ridges (25–45 mm above the lowest brain), striped along A and fading
    above and below: mostly brighter (the streak that mimics blood), sometimes darker (Hounsfield bar)."""
    R, A, S = ctx.ras_grid(ctx.bb)
    shape = ctx.fine_depth().shape
    s_full = np.broadcast_to(S, shape)
    s_low = float(np.min(s_full[ctx.brain[ctx.bb]]))
    centre, half = s_low + rng.uniform(25.0, 45.0), rng.uniform(4.0, 9.0)
    fade = np.exp(-0.5 * ((s_full - centre) / half) ** 2)
    streak = np.clip(np.cos((np.broadcast_to(A, shape) - ctx.centroid[1]) / rng.uniform(6.0, 12.0)), 0, 1)
    amplitude = rng.uniform(10.0, 25.0) * (1.0 if rng.random() < 0.7 else -1.0)
    sub = out[ctx.bb].astype(np.float32) + (amplitude * streak * fade * ctx.brain[ctx.bb]).astype(np.float32)
    out[ctx.bb] = (np.rint(sub) if np.issubdtype(out.dtype, np.integer) else sub).astype(out.dtype)


_MIMIC_MAKERS = {"choroid_calcification": _choroid_calcification, "pineal_calcification": _pineal_calcification,
                 "basal_ganglia_calcification": _basal_ganglia_calcification, "falx_calcification": _falx_calcification,
                 "dense_sinus": _dense_sinus, "beam_hardening": _beam_hardening}
MIMICS = tuple(_MIMIC_MAKERS)


# --- public API ---------------------------------------------------------------------------------
def synthesize_compartments(ct: Image, rng: np.random.Generator, bleeds: list[Bleed], mimics: tuple[str, ...] = (), *,
                            brain: np.ndarray | None = None) -> tuple[Image, Image]:
    """Paint ``mimics`` and then ``bleeds`` (each away from the mimics) into a copy of ``ct`` (HU); returns
    ``(ct, label)`` with the label values of :data:`CLASSES` (oedema only where no bleed and nothing
    denser than 100 HU lies; a later bleed overwrites an earlier one where they meet). A bleed whose
    geometry does not fit this head (no room, no CSF space) is skipped."""
    for m in mimics:
        if m not in _MIMIC_MAKERS:
            raise UsageError(f"unknown mimic {m!r}", f"use one of {', '.join(MIMICS)}")
    ctx = _Ctx(ct, brain_mask(ct) if brain is None else np.asarray(brain, bool))
    ctx.kind_values, ctx.oedema_value = dict(KIND_CLASS), OEDEMA
    out = np.array(ct.array, copy=True)
    label = np.zeros(ct.array.shape[:3], np.uint8)
    scratch = np.zeros(out.shape[:3], np.uint8)  # mimics are painted like bleeds but never labelled
    for m in mimics:
        _MIMIC_MAKERS[m](ctx, rng, out, scratch)
    keep_out = ndimage.binary_dilation(scratch > 0, iterations=2) if scratch.any() else None
    for b in bleeds:
        before = label == KIND_CLASS[b.kind]
        ctx.density_hu, ctx.contrast_hu = b.density_hu, b.contrast_hu
        maker = _EXTRA_MAKERS.get(b.kind) or _MAKERS[b.kind]
        try:
            maker(ctx, rng, out, label, b.volume_ml, exclude=keep_out)
        except InputError:  # this head has no room for it
            continue
        if b.kind == "intraparenchymal" and (b.fluid_level if b.fluid_level is not None else rng.random() < 0.25):
            _fluid_level(ctx, rng, out, (label == 1) & ~before)
    return Image(out, ct.ijk_to_ras), Image(label, ct.ijk_to_ras)
