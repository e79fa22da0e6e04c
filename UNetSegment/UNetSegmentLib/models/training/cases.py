"""Synthetic training/validation cases for the shipped models, and their network-grid cache.

Each generator returns ``(channels: list[Image], label: Image)`` for one case from a seed. Cases
are brought to the network grid with the *inference* pre-processing (canonical axes → target
spacing → normalisation), so training sees exactly what inference feeds the network, and cached as
``.npz`` files (outside git).

``ct_hemorrhage``: a head CT background — the real sample CT (40 %), an elastically deformed copy
(30 %) or an MNI152 pseudo-CT (30 %) — resampled with a random rotation (±20°), scale (0.9–1.1),
flips and slice thickness (0.5–6 mm); 0–3 synthetic hemorrhages of random kinds (intraparenchymal,
contusion, subdural, intraventricular; 15 % of cases negative), each of one density drawn from
45–90 HU (hyperacute to early subacute blood; ``Settings.bleed_hu``); then noise, HU shift and an in-plane blur or
sharpening kernel. Validation cases use other seeds *and* other generator settings
(``VALIDATION``): larger rotations, thicker slices, more noise.

``ct_hemorrhage_compartments``: the same backgrounds and scanner variety with bleeds labelled by
compartment (IPH, extra-axial, intraventricular, oedema) and unlabelled hemorrhage mimics
(:mod:`...synth_compartments`), for the compartment model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from ...engine.preprocess import prepare_inputs
from ...errors import UsageError
from ...image import Image, make_ijk_to_ras, resample
from ...io.writers import atomic_path
from ...settings import ModelSettings


@dataclass(frozen=True)
class Settings:
    rotation_deg: float = 20.0
    scale: tuple[float, float] = (0.9, 1.1)
    thickness_mm: tuple[float, float] = (0.5, 6.0)
    noise_hu: tuple[float, float] = (0.0, 8.0)
    hu_shift: tuple[float, float] = (-8.0, 8.0)
    negative_fraction: float = 0.15
    max_lesions: int = 3
    background_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)  # real, deformed, MNI
    perfusion_noise_scale: float = 1.0  # × the perfusion maps' per-channel noise (mr_perfusion)
    bleed_hu: tuple[float, float] | None = (45.0, 90.0)  # each bleed's density, uniform (None: by kind)
    # or: each bleed's contrast, uniform, in HU above the brain around it (overrides bleed_hu)
    bleed_contrast_hu: tuple[float, float] | None = None
    # share of cases given 1–2 hemorrhage mimics (calcifications, dense sinus, beam hardening; never
    # labelled) before their bleeds; None: no mimics and no draw, so other settings keep their seeds' cases
    mimic_fraction: float | None = None


TRAINING = Settings()
VALIDATION = Settings(rotation_deg=25.0, thickness_mm=(1.0, 6.0), noise_hu=(2.0, 10.0), hu_shift=(-10.0, 10.0),
                      negative_fraction=0.2, max_lesions=2, background_weights=(0.5, 0.25, 0.25),
                      perfusion_noise_scale=1.3)


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def reslice(ct: Image, rng: np.random.Generator, s: Settings, label: Image | None = None) -> tuple[Image, Image | None]:
    """A new acquisition of the same head: rotated, scaled, flipped, with a random slice thickness."""
    rot = _random_rotation(rng, s.rotation_deg)
    scale = rng.uniform(*s.scale)
    thick = float(np.exp(rng.uniform(np.log(s.thickness_mm[0]), np.log(s.thickness_mm[1]))))
    inplane = float(rng.uniform(0.45, 1.0))
    d = rot @ np.diag([-1.0, -1.0, 1.0])  # an LPS-like axial acquisition, rotated
    if rng.random() < 0.5:
        d[:, 0] *= -1  # stored left-right flipped
    extent = np.array(ct.shape_ijk) * ct.spacing / scale
    sp = np.array([inplane, inplane, thick])
    shape_ijk = np.maximum(8, np.round(np.array([extent[0], extent[1], extent[2]]) / sp)).astype(int)
    centre = ct.ijk_to_ras_points((np.array(ct.shape_ijk) - 1) / 2)[0]
    # scale about the centre: sample the source at centre + (p − centre)·scale
    # thick slices average a slab: sample n thin sub-slices per slice and average them
    n_sub = max(1, int(round(thick / 0.75)))
    sub_sp = sp * np.array([1.0, 1.0, 1.0 / n_sub])
    sub_shape = shape_ijk * np.array([1, 1, n_sub])
    m_sub = make_ijk_to_ras(sub_sp * scale, d, (0, 0, 0))
    m_sub[:3, 3] = centre - m_sub[:3, :3] @ ((sub_shape - 1) / 2)
    thin = resample(ct, tuple(sub_shape[::-1]), m_sub, order=1, fill=-1000.0).array
    out = thin.reshape(shape_ijk[2], n_sub, shape_ijk[1], shape_ijk[0]).mean(axis=1)
    m = make_ijk_to_ras(sp * scale, d, (0, 0, 0))
    m[:3, 3] = centre - m[:3, :3] @ ((shape_ijk - 1) / 2)
    lab = resample(label, tuple(shape_ijk[::-1]), m, order=0, fill=0) if label is not None else None
    # report the physical (unscaled) geometry: the head really is scaled
    m_true = m.copy()
    m_true[:3, :3] /= scale
    m_true[:3, 3] = centre - m_true[:3, :3] @ ((shape_ijk - 1) / 2)
    return Image(out.astype(np.float32), m_true), (Image(lab.array, m_true) if lab is not None else None)


def intensity_augment(ct: Image, rng: np.random.Generator, s: Settings) -> Image:
    """Scanner variety: a reconstruction kernel, an HU calibration shift and noise.

    Kernels act **in-plane** with widths in mm, as a CT reconstruction filter does; smoothing or
    sharpening across thick slices (v1 did, with a 1-voxel sigma) smears the skull into the
    subdural space and leaves label voxels with no visible blood.
    """
    a = ct.array.astype(np.float32)
    head = a > -500
    sp_k, sp_j, sp_i = ct.spacing[::-1]
    kernel = rng.choice(["none", "blur", "sharpen"])
    if kernel == "blur":
        mm = rng.uniform(0.2, 0.6)
        a = ndimage.gaussian_filter(a, (0.0, mm / sp_j, mm / sp_i))
    elif kernel == "sharpen":
        a = a + rng.uniform(0.15, 0.5) * (a - ndimage.gaussian_filter(a, (0.0, 0.8 / sp_j, 0.8 / sp_i)))
    a[head] += rng.uniform(*s.hu_shift)
    a += rng.normal(0, rng.uniform(*s.noise_hu), a.shape).astype(np.float32)
    return ct.with_array(a)


def ct_hemorrhage_case(seed: int, s: Settings = TRAINING,
                       lesions: list[tuple[str, np.ndarray]] | None = None) -> tuple[list[Image], Image]:
    """One synthetic head CT with hemorrhages and its label; ``lesions`` (when given) receives each
    synthesised bleed's kind and voxel mask, in the order painted (they may touch or overlap)."""
    from ...io.sample import load_sample
    from ...synth import KINDS, brain_mask, synthesize_hemorrhage

    rng = np.random.default_rng(seed)
    bg = _background(rng, s, _cached_sample(load_sample))
    ct, _ = reslice(bg, rng, s)
    label = np.zeros(ct.array.shape, np.uint8)
    if s.mimic_fraction is not None:
        from ...synth_compartments import synthesize_compartments

        mimics = _draw_mimics(rng, s.mimic_fraction)
        if mimics:
            ct = synthesize_compartments(ct, rng, [], mimics, brain=brain_mask(ct))[0]
    if rng.random() >= s.negative_fraction:
        brain = brain_mask(ct)
        for _ in range(int(rng.integers(1, s.max_lesions + 1))):
            kind = str(rng.choice(KINDS))
            density = float(rng.uniform(*s.bleed_hu)) if s.bleed_hu else None
            contrast = None
            if s.bleed_contrast_hu:  # drawn only then: the cases of other settings keep their seeds' draws
                density, contrast = None, float(rng.uniform(*s.bleed_contrast_hu))
            try:
                ct, lab = synthesize_hemorrhage(ct, rng, kind, brain=brain, density_hu=density, contrast_hu=contrast)
            except UsageError:  # bad settings are an error, not a case without this bleed
                raise
            except Exception:  # noqa: BLE001 - a geometry that cannot host this kind: try the next
                continue
            label |= lab.array.astype(np.uint8)
            if lesions is not None:
                lesions.append((kind, lab.array > 0))
    ct = intensity_augment(ct, rng, s)
    return [ct], ct.with_array(label)


#: bleed kinds of the compartment cases and how often each is drawn (per class: IPH 0.35, EAH 0.45, IVH 0.2)
COMPARTMENT_KIND_WEIGHTS = {"intraparenchymal": 0.25, "contusion": 0.10, "subdural": 0.20, "epidural": 0.12,
                            "subarachnoid": 0.13, "intraventricular": 0.20}


def ct_hemorrhage_compartments_case(seed: int, s: Settings = TRAINING) -> tuple[list[Image], Image]:
    """One synthetic head CT for the compartment model (ct-hemorrhage 2.x): the backgrounds, reslicing
    and scanner variety of :func:`ct_hemorrhage_case`; 0–``max_lesions`` bleeds of the kinds of
    :data:`COMPARTMENT_KIND_WEIGHTS`, each with its own density from ``bleed_hu`` (or contrast from
    ``bleed_contrast_hu``); in ``mimic_fraction`` of the cases (default 60 %), positive or negative, 1–2
    hemorrhage mimics (:data:`..synth_compartments.MIMICS`, never labelled). The label holds the classes
    of :data:`..synth_compartments.CLASSES`."""
    from ...io.sample import load_sample
    from ...synth import brain_mask
    from ...synth_compartments import Bleed, synthesize_compartments

    rng = np.random.default_rng(seed)
    bg = _background(rng, s, _cached_sample(load_sample))
    ct, _ = reslice(bg, rng, s)
    kinds, weights = list(COMPARTMENT_KIND_WEIGHTS), np.array(list(COMPARTMENT_KIND_WEIGHTS.values()))
    bleeds = []
    if rng.random() >= s.negative_fraction:
        for _ in range(int(rng.integers(1, s.max_lesions + 1))):
            kind = str(rng.choice(kinds, p=weights / weights.sum()))
            if s.bleed_contrast_hu:
                bleeds.append(Bleed(kind, contrast_hu=float(rng.uniform(*s.bleed_contrast_hu))))
            else:
                bleeds.append(Bleed(kind, density_hu=float(rng.uniform(*s.bleed_hu)) if s.bleed_hu else None))
    mimics = _draw_mimics(rng, 0.6 if s.mimic_fraction is None else s.mimic_fraction)
    ct, label = synthesize_compartments(ct, rng, bleeds, mimics, brain=brain_mask(ct))
    ct = intensity_augment(ct, rng, s)
    return [ct], label


def _draw_mimics(rng: np.random.Generator, fraction: float) -> tuple[str, ...]:
    """With probability ``fraction``, 1–2 distinct hemorrhage mimics; else none."""
    from ...synth_compartments import MIMICS

    if rng.random() >= fraction:
        return ()
    return tuple(str(m) for m in rng.choice(MIMICS, size=int(rng.integers(1, 3)), replace=False))


def _background(rng: np.random.Generator, s: Settings, real: Image) -> Image:
    """The real sample CT, a deformed copy or an MNI152 pseudo-CT, by ``s.background_weights``."""
    kind_bg = rng.choice(3, p=np.asarray(s.background_weights) / sum(s.background_weights))
    if kind_bg == 0:
        return real
    if kind_bg == 1:
        from .backgrounds import deformed_ct

        return deformed_ct(real, rng)
    from .backgrounds import mni_pseudo_ct

    return mni_pseudo_ct(rng)


_SAMPLE: dict = {}


def _cached_sample(loader: Callable[[], Image]) -> Image:
    if "ct" not in _SAMPLE:
        _SAMPLE["ct"] = loader()
    return _SAMPLE["ct"]


GENERATORS: dict[str, Callable[[int, Settings], tuple[list[Image], Image]]] = {"ct_hemorrhage": ct_hemorrhage_case}


def perfusion_case(seed: int, s: Settings = TRAINING) -> tuple[list[Image], Image]:
    from .perfusion import synthesize_perfusion_case

    rng = np.random.default_rng(seed)
    maps, label = synthesize_perfusion_case(rng, lesion=rng.random() >= s.negative_fraction, noise_scale=s.perfusion_noise_scale)
    return [maps[c] for c in ("CBF", "CBV", "MTT", "Tmax")], label


GENERATORS["mr_perfusion"] = perfusion_case


def phantom_case(seed: int, s: Settings = TRAINING) -> tuple[list[Image], Image]:
    """A small analytic head with 0–2 bright blobs (fast; for tests of the training machinery)."""
    rng = np.random.default_rng(seed)
    K, J, I = 12, 64, 64
    k, j, i = np.mgrid[:K, :J, :I].astype(np.float32)
    head = ((i - I / 2) / 27) ** 2 + ((j - J / 2) / 29) ** 2 + ((k - K / 2) / 9) ** 2
    arr = np.full((K, J, I), -1000.0, np.float32)
    arr[head < 1] = 1000.0
    arr[head < 0.8] = 30.0
    lab = np.zeros((K, J, I), np.uint8)
    for _ in range(int(rng.integers(0, 3))):
        c = rng.uniform([4, 20, 20], [8, 44, 44])
        r = rng.uniform([1.5, 3, 3], [3, 7, 7])
        blob = (((k - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((i - c[2]) / r[2]) ** 2 < 1) & (head < 0.7)
        arr[blob] = rng.uniform(55, 85)
        lab[blob] = 1
    arr += rng.normal(0, 3, arr.shape).astype(np.float32)
    img = Image(arr, make_ijk_to_ras((1.0, 1.0, 2.0), np.diag([-1.0, -1.0, 1.0]), (0, 0, 0)))
    return [img], img.with_array(lab)


GENERATORS["phantom"] = phantom_case
GENERATORS["ct_hemorrhage_compartments"] = ct_hemorrhage_compartments_case


def generator_labels(generator: str) -> dict | None:
    """The label definitions of a generator with several labels (written as ``labels.json`` beside its
    case folders, read by ``evaluate``: which truth labels are lesions), else None (label 1 = lesion)."""
    if generator != "ct_hemorrhage_compartments":
        return None
    from ...synth_compartments import CLASSES, OEDEMA

    return {"labels": {str(v): n for v, n in CLASSES.items()}, "lesion_values": [v for v in CLASSES if v != OEDEMA]}


def _write_case_labels(generator: str, case_dir: Path) -> None:
    labels = generator_labels(generator)
    if labels is not None:
        from ...io.writers import write_json

        case_dir.mkdir(parents=True, exist_ok=True)
        write_json(labels, case_dir / "labels.json")


def to_network_grid(channels: list[Image], label: Image, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The inference pre-processing applied to a training case: (C, K, J, I) float32, (K, J, I) uint8."""
    x, mapping, _ = prepare_inputs(channels, ModelSettings.from_meta(meta))
    lab = mapping.to_network(np.ascontiguousarray(mapping.to_canonical(label).array), order=0, fill=0.0)
    return x.astype(np.float32), lab.astype(np.uint8)


def write_case_folder(folder: Path, channels: list[Image], label: Image, names: list[str]) -> None:
    """A case as ``evaluate`` reads it: image.nii.gz (or <CHANNEL>.nii.gz) + label.nii.gz."""
    from ...io.writers import write_image

    folder.mkdir(parents=True, exist_ok=True)
    if len(channels) == 1:
        write_image(channels[0].with_array(np.round(channels[0].array).astype(np.int16)), folder / "image.nii.gz")
    else:
        for img, n in zip(channels, names):
            write_image(img.with_array(img.array.astype(np.float32)), folder / f"{n}.nii.gz")
    write_image(label.with_array(label.array.astype(np.uint8)), folder / "label.nii.gz")


def _make_case(generator: str, seed: int, settings: Settings, meta: dict, f: Path, folder: Path | None) -> None:
    channels, label = GENERATORS[generator](seed, settings)
    if not f.exists():
        x, y = to_network_grid(channels, label, meta)
        with atomic_path(f) as tmp:
            np.savez(tmp, x=x, y=y)
    if folder is not None:
        write_case_folder(folder, channels, label, [c["name"] for c in meta["inputs"]])


def build_cache(generator: str, seeds: list[int], meta: dict, cache: Path, settings: Settings,
                case_dir: Path | None = None, log: Callable[[str], None] = print, workers: int | None = None) -> list[Path]:
    """Generate (once) and cache the network-grid arrays of each seed; optionally also NIfTI case folders.

    Cases are independent and seeded, so they are made in ``workers`` processes (default: the usable
    cores); the result does not depend on the number of workers.
    """
    from concurrent.futures import ProcessPoolExecutor

    cache.mkdir(parents=True, exist_ok=True)
    out, todo = [], []
    for seed in seeds:
        f = cache / f"case-{seed}.npz"
        folder = case_dir / f"case-{seed}" if case_dir is not None else None
        need_folder = folder is not None and not (folder / "label.nii.gz").exists()
        if not f.exists() or need_folder:
            todo.append((seed, f, folder if need_folder else None))
        out.append(f)
    workers = workers or max(1, min(len(todo), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    if workers <= 1 or len(todo) <= 1:
        for n, (seed, f, folder) in enumerate(todo):
            _make_case(generator, seed, settings, meta, f, folder)
            log(f"case {n + 1}/{len(todo)} (seed {seed}) ready")
        return out
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_make_case, generator, seed, settings, meta, f, folder) for seed, f, folder in todo]
        for n, (fut, (seed, _, _)) in enumerate(zip(futures, todo)):
            fut.result()
            log(f"case {n + 1}/{len(todo)} (seed {seed}) ready")
    return out


#: settings that are HU ranges, and the open interval their ends must lie in
RANGE_SETTINGS = {"bleed_hu": (0.0, 200.0), "bleed_contrast_hu": (0.0, 150.0)}


def extra_cases(data: dict) -> list["ExtraCases"]:
    """``data.extra_train`` (a list, or absent) as :class:`ExtraCases`; :class:`UsageError` on a bad entry."""
    entries = data.get("extra_train") or []
    if not isinstance(entries, list):
        raise UsageError("data.extra_train is not a list", "give a list of {cases, seed, settings} entries")
    return [ExtraCases.from_config(e) for e in entries]


def extra_validation_sets(data: dict) -> dict[str, "ExtraCases"]:
    """``data.extra_val``: named validation sets reported beside the main one (e.g. only faint bleeds, to
    measure one density bin on enough lesions), from :data:`.cases.VALIDATION` with some settings changed.
    Checks ``data.extra_tune`` too (:func:`extra_sets`)."""
    return extra_sets(data)["extra_val"]


def extra_sets(data: dict) -> dict[str, dict[str, "ExtraCases"]]:
    """Both lists of named extra sets, by key (``extra_val``, ``extra_tune``), each set from
    :data:`.cases.VALIDATION` with some settings changed; :class:`UsageError` on a bad entry, a name used
    twice (across both lists) or seeds that meet any training, tune, validation or other extra set's seed."""
    fix = "give a list of {name, cases, seed, settings} entries with distinct names"
    out: dict[str, dict[str, ExtraCases]] = {"extra_val": {}, "extra_tune": {}}
    names: set[str] = set()
    for key, sets in out.items():
        entries = data.get(key) or []
        if not isinstance(entries, list):
            raise UsageError(f"data.{key} is not a list", fix)
        for e in entries:
            name = e.get("name") if isinstance(e, dict) else None
            if not isinstance(name, str) or not name.replace("-", "").isalnum() or name in names:
                raise UsageError(f"bad data.{key} entry {e!r}: no name, a bad name or a repeated one", fix)
            names.add(name)
            sets[name] = ExtraCases.from_config({k: v for k, v in e.items() if k != "name"}, VALIDATION,
                                                f"data.{key} {name!r}")
    used = {"training": set(split_seeds(data, "train")), "extra training": {s for x in extra_cases(data) for s in x.seeds},
            "validation": set(split_seeds(data, "val")), "tune": set(split_seeds(data, "tune"))}
    for sets in out.values():
        for name, x in sets.items():
            for split, seeds in used.items():
                if seeds & set(x.seeds):
                    raise UsageError(f"extra set {name!r} (seeds {x.seeds[0]}…{x.seeds[-1]}) overlaps the "
                                     f"{split} seeds", "choose a seed range no other split uses")
            used[f"extra set {name!r}"] = set(x.seeds)
    return out


def split_seeds(data: dict, split: str) -> range:
    """The seeds of split ``train``, ``val`` or ``tune`` of a config's ``data`` (tune: 12 from 800000 unless set)."""
    defaults = {"tune_seed": 800000, "tune_cases": 12}
    first = int(data.get(f"{split}_seed", defaults.get(f"{split}_seed", 0)))
    return range(first, first + int(data.get(f"{split}_cases", defaults.get(f"{split}_cases", 0))))


@dataclass(frozen=True)
class ExtraCases:
    """``data.extra_train`` entry: more training cases from the same generator with some of its
    :class:`.cases.Settings` changed (e.g. ``{cases: 64, seed: 3000, settings: {bleed_hu: [45, 60]}}``
    for more faint bleeds), cached in a folder of their own whose name carries a digest of what makes
    them (generator, settings, the model's grid), so changed settings never reuse old cases. A
    ``data.extra_val`` entry is the same on top of the validation settings."""

    seeds: tuple[int, ...]
    settings: Settings
    overrides: tuple[tuple[str, object], ...] = ()

    def folder(self, generator: str, meta: dict, prefix: str = "train-extra") -> str:
        # settings left at None (e.g. bleed_contrast_hu) are not hashed: adding such a setting keeps old folders
        settings = {k: v for k, v in asdict(self.settings).items() if v is not None}
        what = {"generator": generator, "settings": settings, "target_spacing": meta.get("target_spacing"),
                "dimensions": meta.get("dimensions"), "inputs": [c.get("normalization") for c in meta.get("inputs", [])]}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode()).hexdigest()[:8]
        return f"{prefix}-{self.seeds[0]}-{digest}"

    def record(self) -> dict:
        """What ``model.json``'s training record says about these cases."""
        return {"cases": len(self.seeds), "seed": self.seeds[0], "settings": {k: list(v) if isinstance(v, tuple) else v
                                                                              for k, v in self.overrides}}

    @classmethod
    def from_config(cls, d, base: Settings = TRAINING, key: str = "data.extra_train") -> "ExtraCases":
        known = {f.name: f for f in fields(Settings)}
        fix = "give {cases: N ≥ 1, seed: integer, settings: {…}} with settings among: " + ", ".join(sorted(known))
        if not isinstance(d, dict) or not isinstance(d.get("cases"), int) or isinstance(d.get("cases"), bool) \
                or d["cases"] < 1 or not isinstance(d.get("seed"), int) or isinstance(d.get("seed"), bool):
            raise UsageError(f"bad {key} entry {d!r}", fix)
        over = d.get("settings") or {}
        if not isinstance(over, dict) or sorted(set(over) - set(known)):
            raise UsageError(f"bad {key} entry {d!r}: unknown settings {sorted(set(over) - set(known))}", fix)
        clean = {}
        for k, v in over.items():
            default = getattr(base, k)
            if isinstance(default, tuple) or (default is None and isinstance(v, list)) or (k in RANGE_SETTINGS and v is not None):
                n = len(default) if isinstance(default, tuple) else 2
                if not isinstance(v, (list, tuple)) or len(v) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                    raise UsageError(f"{key} setting {k} is {v!r}, not {n} numbers", fix)
                lo, hi = RANGE_SETTINGS.get(k, (-math.inf, math.inf))
                if not all(lo < x < hi for x in v):
                    raise UsageError(f"{key} setting {k} is {v!r}, not within {lo:g}–{hi:g} HU", fix)
                if n == 2 and v[0] > v[1]:
                    raise UsageError(f"{key} setting {k} is {v!r}: the range is reversed", fix)
                v = tuple(float(x) for x in v)
            elif v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)
                                    or (isinstance(default, int) and not isinstance(v, int))):
                raise UsageError(f"{key} setting {k} is {v!r}, not a {type(default).__name__}", fix)
            clean[k] = v
        return cls(tuple(range(d["seed"], d["seed"] + d["cases"])), replace(base, **clean), tuple(sorted(clean.items())))


def main() -> None:
    """Write a config's validation (or training) cases as NIfTI case folders for ``unetsegment evaluate``."""
    import argparse

    from ...errors import require_extra

    require_extra("train", "writing training cases")
    import yaml

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", required=True, type=Path)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--split", choices=["val", "tune", "train"], default="val",
                       help="val: the reported validation cases; tune: other seeds with the validation settings, for "
                            "choosing post-processing (never reported); train: the training cases")
    which.add_argument("--extra-val", metavar="NAME",
                       help="instead of --split: the config's data.extra_val set NAME (e.g. faint: only 45–60 HU bleeds)")
    which.add_argument("--extra-tune", metavar="NAME",
                       help="instead of --split: the config's data.extra_tune set NAME (e.g. faint-tune: faint bleeds for "
                            "choosing post-processing, never reported)")
    ap.add_argument("--output-dir", required=True, type=Path)
    a = ap.parse_args()
    cfg = yaml.safe_load(a.config.read_text(encoding="utf-8"))
    d = cfg["data"]
    cache_root = Path(os.path.expandvars(d.get("cache_dir", ".cache/unetsegment/train")))
    if a.extra_val or a.extra_tune:
        key, name, prefix = ("extra_val", a.extra_val, "val-extra") if a.extra_val else ("extra_tune", a.extra_tune, "tune-extra")
        try:
            sets = extra_sets(d)[key]
        except UsageError as e:
            ap.error(f"{e} ({e.fix})" if getattr(e, "fix", None) else str(e))
        if name not in sets:
            ap.error(f"the config has no data.{key} set {name!r}; it has: {', '.join(sets) or 'none'}")
        x = sets[name]
        build_cache(d["generator"], list(x.seeds), cfg["bundle"], cache_root / x.folder(d["generator"], cfg["bundle"], prefix),
                    x.settings, case_dir=a.output_dir)
        _write_case_labels(d["generator"], a.output_dir)
        print(f"{len(x.seeds)} {name} cases in {a.output_dir}")
        return
    seeds = list(split_seeds(d, a.split))
    settings = TRAINING if a.split == "train" else VALIDATION
    build_cache(d["generator"], seeds, cfg["bundle"], cache_root / a.split, settings, case_dir=a.output_dir)
    _write_case_labels(d["generator"], a.output_dir)
    print(f"{len(seeds)} {a.split} cases in {a.output_dir}")


if __name__ == "__main__":
    main()
