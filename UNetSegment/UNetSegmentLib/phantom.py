"""Synthetic phantoms: a small CT-like head with one hyperdense blob (Slicer self-test, adapter tests)
and perfusion maps with an infarct core (the perfusion demo case; :func:`perfusion_phantom`).

The bundled ``tiny-blob`` model finds the blob (it was trained on similar 2D phantoms), so a run on
this volume exercises every output: a non-empty segmentation, heatmaps and one lesion row.
"""
from __future__ import annotations

import numpy as np

from .image import Image, make_ijk_to_ras


def oblique_direction(deg: float = 12.0, flip_i: bool = True) -> np.ndarray:
    """A 3×3 direction matrix tilted by ``deg`` about the R axis (a gantry-tilted or oblique series);
    ``flip_i`` also stores columns right→left, so tests see a flip and an oblique together."""
    a = np.deg2rad(deg)
    d = np.array([[1.0, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    if flip_i:
        d[:, 0] *= -1
    return d


def head_with_blob(shape_kji=(12, 96, 96), spacing=(1.2, 1.2, 4.0), direction=None, origin=(10.0, -20.0, 5.0),
                   seed=0, blob=True) -> tuple[Image, np.ndarray]:
    """int16 HU volume (air −1000, skull 1000, brain 30, blob 70, noise σ 3) and the blob mask (K,J,I)."""
    rng = np.random.default_rng(seed)
    K, J, I = shape_kji
    k, j, i = np.mgrid[:K, :J, :I].astype(np.float32)
    head = ((i - I / 2) / (I * 0.42)) ** 2 + ((j - J / 2) / (J * 0.45)) ** 2 + ((k - K / 2) / (K * 0.7)) ** 2
    arr = np.full(shape_kji, -1000.0, np.float32)
    arr[head < 1.0] = 1000.0
    arr[head < 0.8] = 30.0
    mask = np.zeros(shape_kji, bool)
    if blob:
        mask = ((i - I * 0.62) / (I * 0.09)) ** 2 + ((j - J * 0.45) / (J * 0.08)) ** 2 + ((k - K / 2) / max(2.0, K * 0.15)) ** 2 < 1
        arr[mask] = 70.0
    arr += rng.normal(0, 3, arr.shape).astype(np.float32)
    return Image(arr.astype(np.int16), make_ijk_to_ras(spacing, direction, origin)), mask


# --- perfusion maps -----------------------------------------------------------------------------
PERFUSION_CHANNELS = ("CBF", "CBV", "MTT", "Tmax")
#: bump when :func:`perfusion_phantom` changes, so that cached demo cases are made again
PERFUSION_PHANTOM_VERSION = 1
#: normal values per tissue (grey matter, white matter, CSF), as in the model's training generator
#: (:mod:`.training.perfusion`): CBF mL/100 g/min, CBV mL/100 g, MTT s, Tmax s
_NORMAL = {"CBF": (60.0, 25.0, 1.5), "CBV": (4.5, 2.2, 0.2), "MTT": (3.6, 4.4, 0.0), "Tmax": (0.6, 1.0, 0.0)}
#: factors in the infarct core / penumbra (Tmax: absolute seconds)
_CORE = {"CBF": 0.15, "CBV": 0.5, "MTT": 3.0, "Tmax": 10.0}
_PENUMBRA = {"CBF": 0.6, "CBV": 1.15, "MTT": 1.9, "Tmax": 6.0}
_NOISE = {"CBF": 0.18, "CBV": 0.10, "MTT": 0.07, "Tmax": 0.3}  # relative; Tmax additive (s)


def _smooth(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-smoothed noise."""
    from scipy import ndimage

    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return n / np.float32(max(float(n.std()), 1e-6))


def perfusion_phantom(seed: int = 0, spacing_mm: float = 2.0, core_ml: float = 25.0,
                      lesion: bool = True) -> tuple[dict[str, Image], Image]:
    """Synthetic CBF/CBV/MTT/Tmax maps of an adult brain with an infarct core, and its label.

    No templates or training extras: an ellipsoid brain (cortical grey-matter shell, white matter,
    deep grey nuclei, ventricles) on a RAS grid of ``spacing_mm`` (default 2 mm, 84×100×70 voxels),
    normal perfusion as in the training generator, and — with ``lesion`` — an irregular infarct core
    of about ``core_ml`` mL in the right middle-cerebral-artery territory inside a larger penumbra
    (core: CBF ×0.15, CBV ×0.5, MTT ×3, Tmax 10 s; penumbra: CBF ×0.6, Tmax 6 s), then spatially
    correlated noise and smoothing; 0 outside the brain. Returns float32 maps and a uint8 label
    (1 = core). About 1 s; the same ``seed`` gives the same case.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    s = float(spacing_mm)
    shape = tuple(int(round(n / s)) for n in (140.0, 200.0, 168.0))  # K (S), J (A), I (R→L) in mm / spacing
    K, J, I = shape
    m = make_ijk_to_ras((s, s, s), np.diag([-1.0, 1.0, 1.0]), (0.0, 0.0, 0.0))
    m[:3, 3] = -m[:3, :3] @ ((np.array([I, J, K], float) - 1) / 2)  # grid centre at RAS (0, 0, 0)
    k, j, i = np.mgrid[:K, :J, :I].astype(np.float32)
    R, A, S = (m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3))
    wobble = 1.0 + 0.03 * _smooth(rng, shape, 12.0 / s)
    brain_r = np.sqrt((R / 68.0) ** 2 + (A / 86.0) ** 2 + ((S - 5.0) / 60.0) ** 2) / wobble
    brain = brain_r < 1.0
    gm = ((brain_r > 0.88) & brain).astype(np.float32)  # cortex
    for side in (-1.0, 1.0):  # deep grey nuclei
        gm[np.sqrt(((R - side * 20.0) / 9.0) ** 2 + ((A - 2.0) / 14.0) ** 2 + ((S - 4.0) / 10.0) ** 2) < 1.0] = 1.0
    csf = np.zeros(shape, np.float32)
    for side in (-1.0, 1.0):  # lateral ventricles
        csf[np.sqrt(((R - side * 7.0) / 5.0) ** 2 + ((A + 5.0) / 26.0) ** 2 + ((S - 15.0) / 8.0) ** 2) < 1.0] = 1.0
    csf[(brain_r > 0.97) & brain] = 1.0  # sulcal CSF under the surface
    gm = ndimage.gaussian_filter(gm * (1 - csf), 1.0 / s)
    csf = ndimage.gaussian_filter(csf, 1.0 / s)
    wm = np.clip(1.0 - gm - csf, 0.0, 1.0)
    tissue = np.clip(gm + wm, 1e-3, 1.0)
    maps = {}
    for ch, (g, w, c) in _NORMAL.items():
        v = gm * g + wm * w + csf * c
        if ch in ("MTT", "Tmax"):  # transit times are tissue properties: fade out in CSF
            v = (gm * g + wm * w) / tissue * np.clip(tissue / 0.3, 0.0, 1.0)
        maps[ch] = v.astype(np.float32)
    label = np.zeros(shape, np.uint8)
    if lesion:
        centre = np.array([38.0, 0.0, 18.0])  # RAS: right MCA territory, cortex and subcortex
        d = np.sqrt((R - centre[0]) ** 2 + (A - centre[1]) ** 2 + (S - centre[2]) ** 2)
        r_core = (3.0 * core_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
        core = (d / r_core - 0.3 * _smooth(rng, shape, 6.0 / s) < 1.0) & brain & (R > 4.0) & (csf < 0.5)
        pen = (d / (1.7 * r_core) - 0.3 * _smooth(rng, shape, 8.0 / s) < 1.0) & brain & (R > 2.0)
        core = _largest(core)
        label[core] = 1
        w_core = np.maximum(ndimage.gaussian_filter(core.astype(np.float32), 1.5 / s) * 2.0, core).clip(0, 1)
        w_pen = np.maximum(ndimage.gaussian_filter(pen.astype(np.float32), 3.0 / s) * 2.0, pen).clip(0, 1)
        w_pen = np.maximum(w_pen, w_core)
        for ch in PERFUSION_CHANNELS:
            v = maps[ch]
            if ch == "Tmax":
                v = np.maximum(v, (w_pen - w_core) * _PENUMBRA[ch] + w_core * _CORE[ch]) * (tissue > 0.2)
            else:
                f = 1.0 + (w_pen - w_core) * (_PENUMBRA[ch] - 1.0) + w_core * (_CORE[ch] - 1.0)
                v = v * f
            maps[ch] = v.astype(np.float32)
    out = {}
    for ch in PERFUSION_CHANNELS:
        n = _smooth(rng, shape, 2.0 / s)
        v = maps[ch] + _NOISE[ch] * n if ch == "Tmax" else maps[ch] * (1.0 + _NOISE[ch] * n)
        v = ndimage.gaussian_filter(v, 1.5 / s)
        v = np.where(brain, np.maximum(v, 0.0), 0.0).astype(np.float32)
        out[ch] = Image(v, m)
    return out, Image(label, m)


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))
