"""Input sanity checks: which inputs are refused and which are accepted with a warning.

All thresholds live here (``LIMITS``), so the README's table and the code cannot drift apart.
Refusals raise :class:`InputError`; warnings are returned as one-line strings that the pipeline
prints and records in ``summary.json``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..image import Image


@dataclass(frozen=True)
class Limits:
    min_spacing_mm: float = 0.05  # finer than any clinical scanner: a header error
    max_spacing_mm: float = 20.0  # coarser than any usable slice
    max_nonfinite_fraction: float = 0.01  # more NaN/Inf than this: a broken reconstruction
    anisotropy_warn: float = 3.0  # largest / smallest spacing
    thick_slice_warn_mm: float = 5.0
    tilt_warn_deg: float = 1.0  # axes off the nearest patient axis (gantry tilt, oblique)
    skew_warn_deg: float = 0.1  # non-orthogonal voxel axes
    min_axes_volume: float = 0.1  # |det| of the unit direction columns below this: degenerate axes
    memory_fraction: float = 0.6  # refuse a run whose estimate exceeds this share of available RAM
    bytes_per_voxel_estimate: int = 48  # peak bytes per input voxel for a 2-class model (measured)


LIMITS = Limits()


def check_volume(img: Image, name: str) -> list[str]:
    """Refuse broken geometry or data; return warnings for odd but usable volumes."""
    warnings: list[str] = []
    sp = img.spacing
    if not np.all(np.isfinite(img.ijk_to_ras)) or np.any(sp < LIMITS.min_spacing_mm) or np.any(sp > LIMITS.max_spacing_mm):
        raise InputError(
            f"input {name} has implausible voxel spacing {tuple(round(float(s), 4) for s in sp)} mm "
            f"(allowed {LIMITS.min_spacing_mm}–{LIMITS.max_spacing_mm} mm)",
            "fix the spacing in the file's header (re-export it from the scanner or PACS)",
        )
    d = img.direction
    if abs(np.linalg.det(d)) < LIMITS.min_axes_volume:
        raise InputError(f"input {name} has degenerate voxel axes (nearly parallel directions)", "fix the file's header")
    arr = img.array
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        n_bad = int(arr.size - np.count_nonzero(finite))
        if n_bad:
            frac = n_bad / arr.size
            if frac > LIMITS.max_nonfinite_fraction:
                raise InputError(
                    f"input {name} has {frac:.1%} NaN/Inf voxels (more than {LIMITS.max_nonfinite_fraction:.0%})",
                    "reconstruct or export the volume again; a few NaN voxels would be treated as background",
                )
            warnings.append(f"input {name}: {n_bad} NaN/Inf voxels ({frac:.3%}) treated as background")
        lo, hi = (float(np.min(arr[finite])), float(np.max(arr[finite]))) if finite.any() else (0.0, 0.0)
    else:
        lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        warnings.append(f"input {name} is constant ({lo:g}) — nothing to segment; expect an empty result")
    if sp.max() / sp.min() > LIMITS.anisotropy_warn or sp.max() > LIMITS.thick_slice_warn_mm:
        warnings.append(
            f"input {name} has thick slices / strong anisotropy (spacing {', '.join(f'{s:.2g}' for s in sp)} mm): "
            "small lesions may be missed and volumes are less precise"
        )
    skew = np.degrees(np.arcsin(np.clip(np.abs(np.triu(d.T @ d, 1)).max(), 0, 1)))
    if skew > LIMITS.skew_warn_deg:
        warnings.append(f"input {name} has non-orthogonal voxel axes (skew {skew:.1f}°); the nearest axes are used")
    tilt = np.degrees(np.arccos(np.clip(np.abs(d).max(axis=0).min(), -1, 1)))
    if tilt > LIMITS.tilt_warn_deg:
        warnings.append(f"input {name} is oblique or gantry-tilted by {tilt:.1f}°; processed on its nearest patient axes without through-plane resampling")
    return warnings


def check_for_model(img: Image, name: str, spec: dict, dimensions: str, anatomy: dict | None,
                    domain_checked: bool = False) -> list[str]:
    """Warnings (or refusal) about fit between a volume and the model's expectations.

    ``domain_checked``: the bundle declares an input-domain family (:mod:`.domain`), which then owns the
    CT modality rule (air present); the per-channel ranges here still apply."""
    warnings: list[str] = []
    if min(img.array.shape) == 1:
        if dimensions == "3d":
            raise InputError(f"input {name} holds a single slice; this model is 3D", "give the whole volume, or use a 2D model")
        warnings.append(f"input {name} holds a single slice; processed as one 2D image")
    w = _intensity_warning(img, name, spec, need_air=not domain_checked)
    if w:
        warnings.append(w)
    if anatomy and spec.get("modality", "").upper() == "CT":
        w = _anatomy_warning(img, name, anatomy)
        if w:
            warnings.append(w)
    return warnings


#: percentiles of larger arrays are taken on a sample of this many values, drawn uniformly at random
#: with a fixed seed (the same input gives the same figures): the 0.5th and 99.5th of a 512² × 300 CT
#: then cost milliseconds instead of most of a second, and move by far less than any threshold they
#: are compared with. Not a regular stride: on 512-wide rows a stride of 32 would keep 16 columns only.
PERCENTILE_SAMPLES = 1 << 20


def finite_sample(values: np.ndarray, n: int = PERCENTILE_SAMPLES) -> np.ndarray:
    """The finite values of ``values``, from a fixed-seed uniform sample of ``n`` of them when there are more than 2n."""
    flat = np.asarray(values).reshape(-1)
    if flat.size > 2 * n:
        flat = flat[np.sort(np.random.default_rng(0).integers(0, flat.size, n))]
    return flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat


def _intensity_warning(img: Image, name: str, spec: dict, need_air: bool = True) -> str | None:
    """Intensities unlike the channel's, judged per channel from the bundle's input spec.

    CT (``modality`` CT): the 0.5–99.5th percentiles must reach into ``expected_range`` and show air
    (0.5th percentile ≤ −500 HU; ``need_air`` False leaves that to the domain check). Other channels: the 99.5th percentile must not exceed
    ``expected_range`` by more than 10 % of its span (e.g. seconds given in ms), the 0.5th not lie
    below it by as much, and every percentile of the channel's ``signature`` (e.g. ``{"p99.5":
    [0.3, 40]}`` for Tmax: a normal map, brain 0–2 s, passes; null = unbounded) must lie in its range.
    """
    rng, signature = spec.get("expected_range"), spec.get("signature") or {}
    if rng is None and not signature:
        return None
    finite = finite_sample(img.array)
    if not finite.size:
        return None
    wanted = sorted({0.5, 99.5} | {float(k[1:]) for k in signature})
    at = dict(zip(wanted, (float(v) for v in np.percentile(finite, wanted))))
    if not (_off_range(at, rng, spec.get("modality", "").upper() == "CT", need_air) or _off_signature(at, signature)):
        return None
    expect = [f"about {rng[0]:g}…{rng[1]:g}"] if rng is not None else []
    expect += [f"{k[1:]}th percentile {'' if a is None else f'{a:g}'}…{'' if b is None else f'{b:g}'}"
               for k, (a, b) in signature.items()]
    unit = f" {spec['unit']}" if spec.get("unit") else ""
    what = spec.get("modality", "the expected modality") + (f" {name}" if name != spec.get("modality") else "")
    return (f"input {name}: intensities {_num(at[0.5])}…{_num(at[99.5])}{unit} do not look like {what} "
            f"(model expects {', '.join(expect)}); check the input is the right series and in the right units")


def _off_range(at: dict[float, float], rng, is_ct: bool, need_air: bool = True) -> bool:
    """CT: no overlap with the range, or (``need_air``) no air; other maps: beyond the range by over 10 % of its span."""
    if rng is None:
        return False
    lo, hi, span = at[0.5], at[99.5], rng[1] - rng[0]
    if is_ct:
        return hi < rng[0] + 0.1 * span or lo > rng[1] - 0.1 * span or (need_air and lo > -500)
    return hi > rng[1] + 0.1 * span or lo < rng[0] - 0.1 * span


def _off_signature(at: dict[float, float], signature: dict) -> bool:
    """Any percentile of the signature outside its [low, high] (None: unbounded)."""
    for key, (a, b) in signature.items():
        v = at[float(key[1:])]
        if (a is not None and v < a) or (b is not None and v > b):
            return True
    return False


def _num(v: float) -> str:
    """−1024 or 1.45: whole numbers where large, three digits where small."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _anatomy_warning(img: Image, name: str, anatomy: dict) -> str | None:
    """Compare the body's physical extent (voxels above −300 HU) with the model's training anatomy."""
    lo, hi = anatomy.get("extent_mm", (0, np.inf))
    body = img.array > -300
    if not body.any():
        return f"input {name}: no body found (no voxels above −300 HU); is this a CT in HU?"
    idx = [np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    # extent along each voxel axis (k, j, i) in mm; compare the largest in-plane extent
    ext = [(ix[-1] - ix[0] + 1) * img.spacing[2 - ax] for ax, ix in enumerate(idx)]
    width = max(ext[1], ext[2])
    if not lo <= width <= hi:
        return (f"input {name}: the body is {width:.0f} mm across, unlike the {anatomy.get('name', 'anatomy')} "
                f"this model was trained on ({lo:g}–{hi:g} mm); results may be meaningless")
    return None


def check_memory(n_voxels: int, n_classes: int) -> None:
    """Refuse before swapping the machine to death."""
    need = n_voxels * (LIMITS.bytes_per_voxel_estimate + 8 * max(0, n_classes - 2))
    _refuse_beyond_memory(need, "this volume needs", "crop the volume to the region of interest or run on a machine "
                          "with more memory")


def check_read_memory(size: tuple[int, ...], bytes_per_voxel: int, name: str) -> None:
    """Refuse a file whose header declares more voxels than memory can hold, before reading any of them.

    Reading holds the voxels once (the array is made on ITK's own buffer, ``io.readers.pixels``); twice
    that is asked for, since no run can go on without at least one more copy (the network's float32
    input). The model's own, larger estimate (:func:`check_memory`) is applied by the caller where the
    model is known.
    """
    need = 2 * math.prod(size) * bytes_per_voxel
    _refuse_beyond_memory(need, f"{name} declares {' × '.join(str(n) for n in size)} voxels: reading it needs",
                          "check the file's header (its sizes may be wrong), crop the volume, or use a machine with "
                          "more memory")


def _refuse_beyond_memory(need: int, what: str, fix: str) -> None:
    """:class:`InputError` "<what> about N GiB of memory, more than F of the A GiB available" when it does not fit."""
    avail = _available_memory()
    if avail and need > LIMITS.memory_fraction * avail:
        raise InputError(f"{what} about {need / 2**30:.1f} GiB of memory, more than {LIMITS.memory_fraction:.0%} of "
                         f"the {avail / 2**30:.1f} GiB available", fix)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
