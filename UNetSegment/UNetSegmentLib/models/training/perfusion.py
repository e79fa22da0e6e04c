"""Synthetic multi-modal stroke perfusion cases (CBF, CBV, MTT, Tmax) from the MNI152 tissue maps.

Each case is four co-registered parameter maps on the MNI152 grid (RAS; 99×117×95 at 2 mm), float32
in the usual units, plus a uint8 label (1 = infarct core). Offline: the tissue maps come from
nilearn's package data (see :mod:`.backgrounds`).

How a case is made (all random draws from ``rng``):

1. Anatomy: the grey/white-matter probability maps and brain mask, by default passed through a
   random rotation (±6°), scaling (0.92–1.08, ±3 % per axis) and mild elastic warp (0–5 mm;
   :func:`.backgrounds.random_transform`), so cases differ in shape. The template coordinates of every voxel are warped along, which
   gives each voxel's hemisphere and vascular-territory position exactly.
2. Normal perfusion: per-case values for grey / white matter / CSF —
   CBF 50–70 / 20–30 / 0–3 mL/100 g/min, CBV 4–5 / 2–2.5 / 0–0.4 mL/100 g, MTT 3–4.2 / 3.8–5 s,
   Tmax 0.2–1 / 0.5–1.6 s — mixed by the tissue fractions (MTT and Tmax fade out in CSF), with
   ±5–10 % smooth regional variation of CBF/CBV and 20–60 small bright "vessels" (high CBV and
   CBF, short Tmax) in sulcal CSF.
3. Lesion (``lesion=True``): an infarct *core*, an irregular blob (a sphere deformed by smoothed
   noise) of 2–80 mL (log-uniform) centred in the cortex/subcortex of one hemisphere's middle
   cerebral artery territory, restricted to brain tissue on that side; a surrounding *penumbra*
   of 1.5–4× the core plus 10–60 mL (at most 300 mL; another deformed blob around the core).
   Relative to normal: core CBF ×0.05–0.25 (< 30 %), CBV ×0.3–0.65, MTT × CBV-factor/CBF-factor
   (clipped to 1.5–3), Tmax 8–14 s; penumbra CBF ×0.4–0.75, CBV ×1.0–1.3, MTT ×
   CBV-factor/CBF-factor, Tmax 4–8 s rising toward the core. The effects reach fully to each
   region's edge and fade over a few mm outside it. Only the core is labelled.
4. Acquisition: independent, spatially correlated multiplicative noise per channel (relative σ:
   CBF 15–25 %, CBV 8–14 %, MTT 5–10 %; Tmax additive 0.2–0.5 s), then Gaussian smoothing
   (σ 1–2 mm) like the filters of perfusion software; negative values clipped; 0 outside the
   brain.

``synthesize_perfusion_case`` takes ~1 s at 2 mm (2 shared cores; the first call of a process
also imports nilearn and loads the templates, ~2–3 s).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ...errors import OutputError, UsageError
from ...image import Image, to_sitk
from .backgrounds import MNITissues, head_centre_ras, load_mni_tissues, random_transform, smooth_noise, warp_many

CHANNELS = ("CBF", "CBV", "MTT", "Tmax")
UNITS = {"CBF": "mL/100 g/min", "CBV": "mL/100 g", "MTT": "s", "Tmax": "s"}

#: Normal values per tissue (per-case uniform draws).
NORMAL = {
    "CBF": {"gm": (50.0, 70.0), "wm": (20.0, 30.0), "csf": (0.0, 3.0)},
    "CBV": {"gm": (4.0, 5.0), "wm": (2.0, 2.5), "csf": (0.0, 0.4)},
    "MTT": {"gm": (3.0, 4.2), "wm": (3.8, 5.0)},
    "Tmax": {"gm": (0.2, 1.0), "wm": (0.5, 1.6)},
}
CORE_VOLUME_ML = (2.0, 80.0)
#: Relative noise (CBF, CBV, MTT) and additive Tmax noise (s).
NOISE = {"CBF": (0.15, 0.25), "CBV": (0.08, 0.14), "MTT": (0.05, 0.10), "Tmax": (0.2, 0.5)}


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _keep_component(mask: np.ndarray, seed_kji) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    which = lab[tuple(seed_kji)]
    if which == 0:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        which = int(np.argmax(sizes))
    return lab == which


def _select(score: np.ndarray, n: int) -> np.ndarray:
    flat = score.ravel()
    n = int(min(n, int(np.isfinite(flat).sum())))
    out = np.zeros(flat.shape, dtype=bool)
    if n > 0:
        out[np.argpartition(flat, n - 1)[:n]] = True
    return out.reshape(score.shape)


def _grow(mask: np.ndarray, sigma_vox) -> np.ndarray:
    """Weight 1 on ``mask`` (and at its edge), fading to 0 over ~2σ outside it."""
    w = ndimage.gaussian_filter(mask.astype(np.float32), sigma_vox, truncate=3.0)
    return np.minimum(2.0 * w, 1.0) * (1.0 - mask) + mask


def _channel_noise(rng: np.random.Generator, shape, corr_vox: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), corr_vox, truncate=3.0)
    sd = float(n[::2, ::2, ::2].std())
    return n / np.float32(sd if sd > 0 else 1.0)


def synthesize_perfusion_case(
    rng: np.random.Generator,
    resolution_mm: float = 2,
    lesion: bool = True,
    *,
    deform: bool = True,
    core_volume_ml: float | None = None,
    noise: bool = True,
    noise_scale: float = 1.0,
) -> tuple[dict[str, Image], Image]:
    """One synthetic CT/MR perfusion case: ``({"CBF", "CBV", "MTT", "Tmax"} → Image, label)``.

    The maps are float32 on the MNI152 grid at ``resolution_mm`` (RAS), in mL/100 g/min, mL/100 g,
    s and s; the label is uint8 (1 = infarct core, all 0 when ``lesion`` is False). ``deform``
    (default) varies the anatomy per case; ``core_volume_ml`` fixes the core volume (else
    log-uniform in 2–80 mL); ``noise=False`` gives the same case (same seed) without the channel
    noise (still smoothed); ``noise_scale`` multiplies every channel's noise level (validation cases
    use 1.3, i.e. noisier maps than training). See the module docstring for the model.

    The steps below draw from ``rng`` in a fixed order (anatomy, normal values, vessels, lesion,
    acquisition): keep it, or every seeded training/validation case changes.
    """
    if core_volume_ml is not None and not (core_volume_ml > 0):
        raise UsageError(f"core_volume_ml must be positive, got {core_volume_ml}", "pass a volume in mL, e.g. 20")
    t = load_mni_tissues(resolution_mm)
    anat = _anatomy(t, rng, deform)
    maps = _normal_perfusion(rng, anat)
    _add_vessels(rng, anat, maps)
    label = np.zeros(anat.shape, dtype=np.uint8)
    if lesion:
        core, pen = _lesion_regions(rng, anat, core_volume_ml)
        label[core] = 1
        _apply_lesion(rng, anat, maps, core, pen)
    maps["Tmax"] *= anat.fade  # no Tmax in CSF
    out = _acquisition(rng, anat, maps, noise, noise_scale)
    return {name: t.image(arr) for name, arr in out.items()}, t.image(label)


@dataclass(frozen=True)
class _Anatomy:
    """One case's (possibly deformed) tissue maps on the template grid, arrays ``[k, j, i]``."""

    gm: np.ndarray  # grey-matter fraction, 0 outside the brain
    wm: np.ndarray  # white-matter fraction, 0 outside the brain
    csf: np.ndarray  # the rest of the brain
    tissue: np.ndarray  # gm + wm (at most 1)
    fade: np.ndarray  # 0 → 1 over tissue fractions 0–0.3: transit times fade out in CSF
    brain: np.ndarray  # bool
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]  # template RAS (mm) of each voxel, warped along
    sampling: np.ndarray  # voxel size (mm) along k, j, i

    @property
    def shape(self) -> tuple[int, ...]:
        return self.gm.shape

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.sampling)) / 1000.0


def _template_coords(t: MNITissues) -> list[np.ndarray]:
    """Template (MNI) RAS coordinates X, Y, Z of every voxel, float32 ``[k, j, i]``."""
    shape = t.gm.shape
    k, j, i = (np.arange(n, dtype=np.float32) for n in shape)
    m = t.ijk_to_ras.astype(np.float32)
    coords = [m[r, 0] * i[None, None, :] + m[r, 1] * j[None, :, None] + m[r, 2] * k[:, None, None] + m[r, 3]
              for r in range(3)]
    return [np.broadcast_to(c, shape).astype(np.float32) for c in coords]


def _anatomy(t: MNITissues, rng: np.random.Generator, deform: bool) -> _Anatomy:
    """Step 1: the tissue maps, with ``deform`` through one random transform (the template
    coordinates go along, so hemisphere and territory tests stay exact after warping)."""
    coords = _template_coords(t)
    gm, wm, brain_f = t.gm, t.wm, t.brain.astype(np.float32)
    if deform:
        geom = t.image(brain_f)
        tx = random_transform(geom, rng, rotation_deg=6.0, scale=(0.97, 1.03), global_scale=(0.92, 1.08),
                              elastic_mm=(0.0, 5.0), elastic_scale_mm=(30.0, 60.0),
                              centre_ras=head_centre_ras(geom, threshold=0.5))
        gm, wm, brain_f, *coords = warp_many([gm, wm, brain_f, *coords], t.ijk_to_ras, tx, fill=0.0)
    brain = brain_f > 0.5
    gm = np.where(brain, np.clip(gm, 0.0, 1.0), 0.0).astype(np.float32)
    wm = np.where(brain, np.clip(wm, 0.0, 1.0), 0.0).astype(np.float32)
    tissue = np.minimum(gm + wm, 1.0)
    csf = np.where(brain, 1.0 - tissue, 0.0).astype(np.float32)
    return _Anatomy(gm=gm, wm=wm, csf=csf, tissue=tissue, fade=np.clip(tissue / 0.3, 0.0, 1.0), brain=brain,
                    coords=tuple(coords), sampling=t.spacing[::-1])


def _normal_perfusion(rng: np.random.Generator, anat: _Anatomy) -> dict[str, np.ndarray]:
    """Step 2: per-case normal values mixed by the tissue fractions, with smooth regional variation
    of CBF/CBV. Tmax is not faded out in CSF yet (vessels and lesion act on it first)."""
    v = {ch: {tis: rng.uniform(*rng_) for tis, rng_ in d.items()} for ch, d in NORMAL.items()}
    gm, wm, csf = anat.gm, anat.wm, anat.csf
    safe = np.maximum(anat.tissue, 1e-3)
    cbf = gm * v["CBF"]["gm"] + wm * v["CBF"]["wm"] + csf * v["CBF"]["csf"]
    cbv = gm * v["CBV"]["gm"] + wm * v["CBV"]["wm"] + csf * v["CBV"]["csf"]
    mtt = (gm * v["MTT"]["gm"] + wm * v["MTT"]["wm"]) / safe * anat.fade
    tmax = (gm * v["Tmax"]["gm"] + wm * v["Tmax"]["wm"]) / safe
    regional = 1.0 + rng.uniform(0.05, 0.10) * smooth_noise(rng, anat.shape, anat.sampling, 25.0)
    cbf *= regional
    cbv *= regional
    return {"CBF": cbf, "CBV": cbv, "MTT": mtt, "Tmax": tmax}


def _add_vessels(rng: np.random.Generator, anat: _Anatomy, maps: dict[str, np.ndarray]) -> None:
    """Step 2b: 20–60 small bright spots (high CBV and CBF, short Tmax) in sulcal CSF; in place."""
    sampling = anat.sampling
    sulcal = np.flatnonzero((anat.csf > 0.4) & anat.brain & (ndimage.uniform_filter(anat.tissue, 3) > 0.4))
    if not len(sulcal):
        return
    vessels = np.zeros(anat.shape, np.float32)
    vessels.ravel()[rng.choice(sulcal, size=min(len(sulcal), int(rng.integers(20, 61))), replace=False)] = 1.0
    vessels = ndimage.gaussian_filter(vessels, rng.uniform(0.8, 1.5) / sampling, truncate=3.0)
    vessels /= max(float(vessels.max()), 1e-6)
    maps["CBV"] += vessels * rng.uniform(6.0, 15.0)
    maps["CBF"] += vessels * rng.uniform(40.0, 120.0)
    maps["Tmax"] *= 1.0 - 0.8 * vessels


def _lesion_centre(rng: np.random.Generator, anat: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """A random side's hemisphere tissue mask and a centre ``[k, j, i]`` in its MCA territory."""
    X, Y, Z = anat.coords
    brain, tissue = anat.brain, anat.tissue
    side = float(rng.choice([-1.0, 1.0]))
    hemi = (side * X > 2.0) & brain & (tissue > 0.3)
    territory = hemi & (side * X >= 15.0) & (side * X <= 60.0) & (Y >= -70.0) & (Y <= 35.0) & (Z >= -15.0) \
        & (Z <= 50.0) & (tissue > 0.6)
    cand = np.flatnonzero(territory.ravel())
    if len(cand) == 0:  # pragma: no cover - only on absurd deformations
        cand = np.flatnonzero(hemi.ravel())
    return hemi, np.array(np.unravel_index(int(rng.choice(cand)), anat.shape))


def _lesion_regions(rng: np.random.Generator, anat: _Anatomy,
                    core_volume_ml: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Step 3a: the core and the penumbra (which contains it), deformed blobs of the drawn volumes
    on the lesion's side; each is the voxels of lowest "distance − noise" score."""
    shape, sampling, voxel_ml = anat.shape, anat.sampling, anat.voxel_ml
    hemi, centre = _lesion_centre(rng, anat)
    vol = _loguniform(rng, *CORE_VOLUME_ML) if core_volume_ml is None else float(core_volume_ml)
    n_core = max(1, int(round(vol / voxel_ml)))
    r = (3.0 * vol * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    kk, jj, ii = (np.arange(n, dtype=np.float32) for n in shape)
    d = np.sqrt(((kk[:, None, None] - centre[0]) * sampling[0]) ** 2
                + ((jj[None, :, None] - centre[1]) * sampling[1]) ** 2
                + ((ii[None, None, :] - centre[2]) * sampling[2]) ** 2)
    score = d / r - rng.uniform(0.25, 0.45) * smooth_noise(rng, shape, sampling, max(0.5 * r, 4.0))
    score[~hemi] = np.inf
    core = _keep_component(_select(score, n_core), centre)
    pen_ml = min(vol * rng.uniform(1.5, 4.0) + rng.uniform(10.0, 60.0), 300.0)
    n_pen = max(n_core + 1, int(round(pen_ml / voxel_ml)))
    r2 = r * (n_pen / n_core) ** (1.0 / 3.0)
    score2 = d / r2 - rng.uniform(0.3, 0.5) * smooth_noise(rng, shape, sampling, max(0.5 * r2, 5.0))
    score2[~hemi] = np.inf
    score2[core] = -np.inf
    pen = _keep_component(_select(score2, n_pen) | core, centre) | core
    return core, pen


def _apply_lesion(rng: np.random.Generator, anat: _Anatomy, maps: dict[str, np.ndarray], core: np.ndarray,
                  pen: np.ndarray) -> None:
    """Step 3b: scale CBF/CBV/MTT in the penumbra and core (fading out over a few mm beyond them)
    and raise Tmax, toward the core; ``maps`` updated in place (Tmax replaced)."""
    sampling = anat.sampling
    w_core = _grow(core, rng.uniform(1.0, 2.0) / sampling)
    w_pen = np.maximum(_grow(pen, rng.uniform(2.0, 4.0) / sampling), w_core)
    core_f = {"CBF": rng.uniform(0.05, 0.25), "CBV": rng.uniform(0.3, 0.65)}
    core_f["MTT"] = float(np.clip(core_f["CBV"] / core_f["CBF"], 1.5, 3.0))
    pen_f = {"CBF": rng.uniform(0.4, 0.75), "CBV": rng.uniform(1.0, 1.3)}
    pen_f["MTT"] = pen_f["CBV"] / pen_f["CBF"]
    for name in ("CBF", "CBV", "MTT"):
        maps[name] *= 1.0 + (pen_f[name] - 1.0) * w_pen + (core_f[name] - pen_f[name]) * w_core
    near = ndimage.gaussian_filter(core.astype(np.float32), rng.uniform(4.0, 8.0) / sampling, truncate=3.0)
    near /= max(float(near.max()), 1e-6)
    t_pen = np.clip(rng.uniform(4.5, 6.0) + rng.uniform(1.0, 2.5) * np.sqrt(near)
                    + 0.3 * smooth_noise(rng, anat.shape, sampling, 8.0), 4.0, 8.0)
    t_core = rng.uniform(8.0, 14.0)
    maps["Tmax"] = maps["Tmax"] * (1.0 - w_pen) + t_pen * (w_pen - w_core) + t_core * w_core


def _acquisition(rng: np.random.Generator, anat: _Anatomy, maps: dict[str, np.ndarray], noise: bool,
                 noise_scale: float) -> dict[str, np.ndarray]:
    """Step 4: correlated noise per channel, smoothing, negatives clipped, 0 outside the brain."""
    shape, sampling = anat.shape, anat.sampling
    corr = np.maximum(rng.uniform(0.8, 1.5) / sampling, 0.3)
    smooth = rng.uniform(1.0, 2.0) / sampling
    sigmas = {name: noise_scale * rng.uniform(*NOISE[name]) for name in CHANNELS}
    out = {}
    for name in CHANNELS:
        arr = maps[name]
        if noise:  # the last draws of a case, so noise=False gives the same case without them
            n = _channel_noise(rng, shape, corr) * np.float32(sigmas[name])
            arr = arr + n * anat.fade if name == "Tmax" else arr * (1.0 + n)
        arr = ndimage.gaussian_filter(arr.astype(np.float32), smooth, truncate=3.0)
        out[name] = np.where(anat.brain, np.maximum(arr, 0.0), 0.0).astype(np.float32)
    return out


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_perfusion_case(case_dir: Path, maps: dict[str, Image], label: Image | None = None) -> dict[str, Path]:
    """Write ``<case_dir>/<name>.nii.gz`` for each map (float32) and ``label.nii.gz`` (uint8);
    returns the paths by name (``"label"`` for the label). All images must share one grid."""
    import SimpleITK as sitk

    case_dir = Path(case_dir)
    images = dict(maps)
    if label is not None:
        if "label" in images:
            raise UsageError("a map is named 'label'", "rename it: label.nii.gz holds the label")
        images["label"] = label
    ref = next(iter(images.values()), None)
    for name, img in images.items():
        if not _NAME.match(name):
            raise UsageError(f"map name {name!r} is not a plain file name", "use names such as CBF, CBV, MTT, Tmax")
        if not img.same_grid(ref):
            raise UsageError(f"map {name!r} is not on the grid of the others", "resample the maps onto one grid")
    try:
        case_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, img in images.items():
            arr = np.asarray(img.array)
            arr = arr.astype(np.uint8) if name == "label" else arr.astype(np.float32, copy=False)
            path = case_dir / f"{name}.nii.gz"
            sitk.WriteImage(to_sitk(img.with_array(arr)), str(path), True)
            paths[name] = path
    except (OSError, RuntimeError) as exc:
        raise OutputError(f"cannot write the perfusion case in {case_dir}: {exc}",
                          "check the folder and free space") from exc
    return paths
