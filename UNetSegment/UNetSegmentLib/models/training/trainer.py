"""``unetsegment train --config CONFIG.yaml --output-dir DIR``: reproducible training to a complete bundle.

Seeded; precision ``auto`` as in inference (bf16 autocast only on CPUs with AMX/AVX512-BF16, fp16
on CUDA); CUDA when present; a progress bar with loss and validation Dice; a checkpoint (model,
optimiser, scheduler, RNG states, step) written atomically every ``checkpoint_every`` steps, from
which an interrupted run resumes; the best validation checkpoint becomes the bundle
(``model.json`` + ``model.safetensors`` + ``MODEL_CARD.md``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from ...engine.device import autocast_dtype, device_type
from ...engine.inference import slice_with_context, sliding_window, softmax_predictor
from ...engine.labels import labels_from_probabilities
from ...engine.windows import plan_windows
from ...errors import UsageError
from ...io.writers import atomic_path
from ...params import SegmentParams
from ...settings import ModelSettings, RunSettings, resolve
from ..bundle import load_weights, sha256_file, write_bundle_files
from ..networks import build_network, count_parameters
from .cases import TRAINING, VALIDATION, build_cache, extra_cases, extra_validation_sets, split_seeds


def load_config(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read config {path}: {e}", "give a YAML training config (see Resources/Training/)") from None
    for key in ("bundle", "data", "train"):
        if key not in cfg:
            raise UsageError(f"config {path} lacks the '{key}' section", "see Resources/Training/ct-hemorrhage.yaml")
    return cfg


def real_number(value: Any) -> bool:
    """A finite int or float from a config or an argument (not a bool, a string or None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def hu_to_network(hu: float, normalization: Mapping[str, Any]) -> float:
    """``hu`` in a CT input's normalised units (the value the network sees), clipped to its window."""
    return (float(np.clip(float(hu), *normalization["clip"])) - float(normalization["mean"])) / float(normalization["std"])


@dataclass(frozen=True)
class HardLesions:
    """Lesions the sampler centres an extra ``share`` of its lesion crops on: faint (mean of channel 0 below
    ``max_value``, in the network's normalised units), small in-plane (largest cross-section below
    ``max_area_vox`` network-grid pixels) and not a speck (at least ``min_voxels``)."""

    max_value: float
    max_area_vox: int
    min_voxels: int
    share: float

    @classmethod
    def from_config(cls, spec: dict | None, normalization: dict) -> "HardLesions | None":
        """``train.hard_lesions: {max_hu, max_area_mm2, min_voxels, share}`` for a CT model on a 1 mm in-plane grid."""
        if not spec:
            return None
        if normalization.get("type") != "ct":
            raise UsageError("train.hard_lesions needs a CT input (its threshold is in HU)", "remove train.hard_lesions")
        share = float(spec["share"])
        if not 0.0 < share <= 1.0:
            raise UsageError(f"train.hard_lesions.share is {share}", "give a share of the lesion crops in (0, 1]")
        return cls(hu_to_network(spec["max_hu"], normalization), int(spec["max_area_mm2"]),
                   int(spec.get("min_voxels", 100)), share)

    def find(self, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        """The voxel indices (K, J, I rows) of each hard lesion of one case."""
        from scipy import ndimage

        comps, n = ndimage.label(y > 0)
        means = np.asarray(ndimage.mean(x[0], comps, np.arange(1, n + 1))) if n else np.zeros(0)
        found = []
        for c, box in enumerate(ndimage.find_objects(comps), start=1):
            v = np.argwhere(comps[box] == c) + [s.start for s in box]
            if len(v) >= self.min_voxels and means[c - 1] < self.max_value and np.bincount(v[:, 0]).max() < self.max_area_vox:
                found.append(v)
        return found


@dataclass(frozen=True)
class SkullEdgeNegatives:
    """A ``share`` of the negative crops centred on the brain side of the skull's inner table: a pixel of
    brain density (0–80 HU: ``brain_min`` to ``brain_max`` in normalised units) within ``EDGE_PX`` pixels
    (8-connected) of bone, that is of the clip's ceiling, 120 HU (``bone_min``; calcifications and bone's
    partial volume reach it too), inside the skull when the slice's bone ring is closed (else on either
    side of the bone, so the scalp may be drawn too), and not labelled (a bleed against the skull is a
    lesion, not a negative). The false lesions of a fine-tune on low-contrast bleeds (1.2.6's recipe)
    sat there: 13 of 15 on the tune split within 2 mm of bone (≥ 200 HU in that analysis), 8 of those in
    the top or bottom quarter of the slices, where the skull runs along the slice and partial volume
    leaves a bright rim. Plain negatives, centred anywhere in the head, rarely put that rim in the
    middle of a crop."""

    share: float
    bone_min: float
    brain_min: float
    brain_max: float

    EDGE_PX = 2
    BONE_HU, BRAIN_HU = 120.0, (0.0, 80.0)

    @classmethod
    def from_config(cls, share: Any, normalization: dict) -> "SkullEdgeNegatives | None":
        """``train.skull_edge_negatives: SHARE`` (absent or 0: none) for a CT model whose clip reaches bone."""
        if share is None or (real_number(share) and share == 0):
            return None
        if not real_number(share) or not 0 < share <= 1:
            raise UsageError(f"train.skull_edge_negatives is {share!r}", "give a share of the negative crops in (0, 1], or remove it")
        if normalization.get("type") != "ct" or float(normalization["clip"][1]) < cls.BONE_HU:
            raise UsageError("train.skull_edge_negatives needs a CT input whose clip reaches bone (>= 120 HU)",
                             "remove train.skull_edge_negatives")
        return cls(float(share), *(hu_to_network(hu, normalization) for hu in (cls.BONE_HU, *cls.BRAIN_HU)))

    def rim(self, sl: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
        """The rim pixels of one normalised slice (boolean, same shape), none of them in ``label``."""
        from scipy import ndimage

        bone = sl >= self.bone_min - 1e-6
        if not bone.any():
            return bone
        near = ndimage.binary_dilation(bone, np.ones((3, 3), bool), iterations=self.EDGE_PX)
        rim = near & ~bone & (sl >= self.brain_min) & (sl <= self.brain_max)
        inside = ndimage.binary_fill_holes(bone) & ~bone
        if (rim & inside).any():
            rim &= inside
        return rim if label is None else rim & (label == 0)


class _Sampler:
    """Random 2D/2.5D training patches from cached network-grid cases: ``lesion_fraction`` of them around a
    lesion voxel, the others around a random voxel of the head (never pure air). With ``hard``, a
    ``hard.share`` of the lesion crops centre on a faint small lesion (drawn uniformly over all cases).
    With ``class_balanced`` (multi-class bundles), each other lesion crop first draws a label uniformly
    among those in the training cases, then a voxel of it: a rare class (IVH, oedema) is seen as often
    as a common one, instead of in proportion to its voxels."""

    def __init__(self, files: list[Path], context: int, crop: tuple[int, int], rng: np.random.Generator, lesion_fraction: float,
                 hard: HardLesions | None = None, class_balanced: bool = False,
                 skull_edge: SkullEdgeNegatives | None = None):
        self.cases = [np.load(f) for f in files]
        self.cases = [(c["x"], c["y"]) for c in self.cases]
        self.context, self.crop, self.rng, self.lesion_fraction = context, crop, rng, lesion_fraction
        self.skull_edge = skull_edge
        self.lesion_slices = [np.flatnonzero(y.reshape(y.shape[0], -1).any(1)) for _, y in self.cases]
        self.channel_min = [x.reshape(x.shape[0], -1).min(1) for x, _ in self.cases]
        self.hard_share = hard.share if hard is not None else 0.0
        self.hard = [(n, v) for n, (x, y) in enumerate(self.cases) for v in (hard.find(x, y) if hard else [])]
        self.class_slices: dict[int, list[tuple[int, np.ndarray]]] = {}  # label → [(case, slices holding it)]
        for n, (_, y) in enumerate(self.cases) if class_balanced else ():
            for c in (int(v) for v in np.unique(y) if v):
                self.class_slices.setdefault(c, []).append((n, np.flatnonzero((y == c).reshape(y.shape[0], -1).any(1))))
        self.class_slices = dict(sorted(self.class_slices.items()))  # drawn by position: an order fixed by label

    def _class_voxel(self) -> tuple[int, int, int, int] | None:
        """(case, k, j, i) of a voxel of a label drawn uniformly among the labels (class balance), else None."""
        if not self.class_slices:
            return None
        rng = self.rng
        c, entries = list(self.class_slices.items())[int(rng.integers(len(self.class_slices)))]
        n, ks = entries[int(rng.integers(len(entries)))]
        k = int(ks[int(rng.integers(ks.size))])
        jj, ii = np.nonzero(self.cases[n][1][k] == c)
        p = int(rng.integers(jj.size))
        return n, k, int(jj[p]), int(ii[p])

    def _hard_voxel(self) -> tuple[int, int, int, int] | None:
        """(case, k, j, i) of a voxel of a hard lesion for ``hard_share`` of the lesion crops, else None."""
        if not self.hard or self.rng.random() >= self.hard_share:
            return None
        n, vox = self.hard[int(self.rng.integers(len(self.hard)))]
        return (n, *map(int, vox[int(self.rng.integers(len(vox)))]))

    def patch(self) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        lesion_crop = rng.random() < self.lesion_fraction
        pick = (self._hard_voxel() or self._class_voxel()) if lesion_crop else None
        n = pick[0] if pick else int(rng.integers(len(self.cases)))
        x, y = self.cases[n]
        C, K, J, I = x.shape
        want_lesion = pick is not None or (lesion_crop and self.lesion_slices[n].size)
        k = pick[1] if pick else int(rng.choice(self.lesion_slices[n])) if want_lesion else int(rng.integers(K))
        xs = slice_with_context(x, k, self.context)
        ys = y[k]
        ch, cw = self.crop
        if pick:
            jj, ii = np.array([pick[2]]), np.array([pick[3]])
        elif want_lesion and ys.any():
            jj, ii = np.nonzero(ys)
        else:  # negatives centred in the head (where mimics are), not in the air around it
            where = xs[self.context] > xs[self.context].min() + 0.05
            if self.skull_edge is not None and rng.random() < self.skull_edge.share:  # drawn only then
                rim = self.skull_edge.rim(xs[self.context], ys)
                where = rim if rim.any() else where
            jj, ii = np.nonzero(where)
        if jj.size:
            p = int(rng.integers(jj.size))
            j0 = int(np.clip(jj[p] - rng.integers(ch // 4, 3 * ch // 4), 0, max(0, J - ch)))
            i0 = int(np.clip(ii[p] - rng.integers(cw // 4, 3 * cw // 4), 0, max(0, I - cw)))
        else:
            j0 = int(rng.integers(max(1, J - ch + 1)))
            i0 = int(rng.integers(max(1, I - cw + 1)))
        xp = np.empty((xs.shape[0], ch, cw), np.float32)  # padded as inference pads: each channel's minimum
        xp[:] = np.repeat(self.channel_min[n], 2 * self.context + 1)[:, None, None]
        yp = np.zeros((ch, cw), np.int64)
        sx = xs[:, j0 : j0 + ch, i0 : i0 + cw]
        xp[:, : sx.shape[1], : sx.shape[2]] = sx
        yp[: sx.shape[1], : sx.shape[2]] = ys[j0 : j0 + ch, i0 : i0 + cw]
        if rng.random() < 0.5:  # left-right mirror
            xp, yp = xp[:, :, ::-1], yp[:, ::-1]
        return np.ascontiguousarray(xp), np.ascontiguousarray(yp)

    def batch(self, n: int):
        xs, ys = zip(*(self.patch() for _ in range(n)))
        return np.stack(xs), np.stack(ys)


class _Sampler3D(_Sampler):
    """Random 3D training patches [C, d, h, w]: ``lesion_fraction`` around a lesion voxel, the rest
    around a random voxel of the head; mirrored left–right half of the time."""

    def patch(self) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        n = int(rng.integers(len(self.cases)))
        x, y = self.cases[n]
        C, K, J, I = x.shape
        size = self.crop
        if rng.random() < self.lesion_fraction and self.lesion_slices[n].size:
            pts = np.argwhere(y > 0)
        else:
            stride = (max(1, K // 32), max(1, J // 32), max(1, I // 32))  # a coarse sample of head voxels is enough
            sub = x[0, :: stride[0], :: stride[1], :: stride[2]]
            pts = np.argwhere(sub > sub.min() + 0.05) * np.array(stride)
        if len(pts):
            c = pts[int(rng.integers(len(pts)))]
            start = [int(np.clip(c[a] - rng.integers(size[a] // 4, 3 * size[a] // 4 + 1), 0, max(0, dim - size[a])))
                     for a, dim in enumerate((K, J, I))]
        else:
            start = [int(rng.integers(max(1, dim - sz + 1))) for dim, sz in zip((K, J, I), size)]
        sl = tuple(slice(st, st + sz) for st, sz in zip(start, size))
        xs, ys = x[(slice(None), *sl)], y[sl]
        xp = np.empty((C, *size), np.float32)
        xp[:] = self.channel_min[n][:, None, None, None]
        yp = np.zeros(size, np.int64)
        xp[(slice(None), *(slice(0, d) for d in xs.shape[1:]))] = xs
        yp[tuple(slice(0, d) for d in ys.shape)] = ys
        if rng.random() < 0.5:  # left-right mirror
            xp, yp = xp[..., ::-1], yp[..., ::-1]
        return np.ascontiguousarray(xp), np.ascontiguousarray(yp)


def _dice_loss(logits, target):
    """Soft Dice loss over the batch, averaged over the foreground classes (one for the one-label models;
    each compartment and the oedema for a multi-class bundle), smoothed by 1 so empty classes stay finite."""
    import torch

    p = torch.softmax(logits.float(), 1)
    losses = []
    for c in range(1, p.shape[1]):
        pc, tc = p[:, c], (target == c).float()
        losses.append(1 - (2 * (pc * tc).sum() + 1) / (pc.sum() + tc.sum() + 1))
    return torch.stack(losses).mean()


#: ``train.lr`` when the config has none (AdamW, one-cycle schedule)
DEFAULT_LR = 2e-3


def lesion_dice_weight(train_cfg: Mapping[str, Any]) -> float:
    """``train.lesion_dice_weight`` (absent: 0, no lesion-wise term) checked: a finite number ≥ 0."""
    w = train_cfg.get("lesion_dice_weight", 0.0)
    if not real_number(w) or w < 0:
        raise UsageError(f"train.lesion_dice_weight is {w!r}", "give a finite number >= 0 (0 or absent: no lesion-wise Dice term)")
    return float(w)


def _lesion_dice_loss(logits, target, lesion_channels: tuple[int, ...] = (1,)):
    """Lesion-wise soft Dice loss ("blob loss", Kofler et al. 2022).

    The batch Dice of :func:`_dice_loss` weighs each lesion by its voxels, so a small faint bleed next to
    a large one barely moves it. Here every lesion (connected component of the lesion classes
    ``lesion_channels`` together, per sample, 8-connected in 2D and 26 in 3D; other classes such as
    oedema count as background) gets its own soft Dice of the lesion probability (the sum of those
    channels' softmax), computed with the other lesions' voxels left out, so finding them is neither
    rewarded nor penalised twice. The lesions of a sample are averaged, so each counts the same whatever
    its size, and then the samples holding a lesion. 0 (with a gradient graph) for a batch without lesions.
    """
    import torch
    from scipy import ndimage

    p = torch.softmax(logits.float(), 1)[:, list(lesion_channels)].sum(1)
    fg = np.isin(target.cpu().numpy(), lesion_channels)
    structure = np.ones((3,) * (fg.ndim - 1), bool)
    per_sample = []
    for b in range(fg.shape[0]):
        comps, n = ndimage.label(fg[b], structure)
        if not n:
            continue
        ids = torch.from_numpy(comps.ravel().astype(np.int64)).to(p.device)
        pb = p[b].reshape(-1)
        inside = torch.zeros(n + 1, device=p.device, dtype=p.dtype).index_add(0, ids, pb)  # Σ p per lesion; [0]: background
        size = torch.bincount(ids, minlength=n + 1).to(p.dtype)
        # lesion c's prediction is p over the background and lesion c: Σ = inside[0] + inside[c]; overlap inside[c]
        dice = 1 - (2 * inside[1:] + 1) / (inside[0] + inside[1:] + size[1:] + 1)
        per_sample.append(dice.mean())
    return torch.stack(per_sample).mean() if per_sample else p.sum() * 0.0


def validate(net, files: list[Path], settings: RunSettings, every: int = 6) -> float:
    """The checkpoint-selection score over validation cases, on the network grid, with the inference
    engine and threshold rule: per case, the mean of the any-lesion Dice (the lesion classes together,
    as the one-label models were always scored) and the mean Dice of the classes the case holds. For a
    one-label model both are the same number, so its score is the Dice it always was; for a
    multi-class bundle a checkpoint that finds the bleeds but confuses their compartments (or misses
    the oedema) scores lower.

    2D/2.5D models are scored on the slices with lesion plus every ``every``-th other slice (each with
    its context slices: :meth:`.WindowPlan.on_slices`), which keeps validation quick without hiding
    false positives.
    """
    m = settings.model
    predictor = softmax_predictor(net, m.out_channels, settings.precision)
    lesion = np.asarray(m.lesion_channels)  # the cases' label values are the channel indices
    scores = []
    net.eval()
    for f in files:
        d = np.load(f)
        x, y = d["x"], d["y"]
        plan = plan_windows(x, spatial_dims=m.spatial_dims, patch=m.patch, context=m.context, overlap=settings.overlap,
                            fast=False, size_divisor=int(getattr(net, "size_divisor", 16)))
        ks = slice(None)
        if m.spatial_dims == 2:
            present = np.flatnonzero(y.reshape(y.shape[0], -1).any(1))
            ks = np.array(sorted(set(range(0, y.shape[0], every)) | {int(k) for k in present}))
            plan = plan.on_slices(ks)
        probs = sliding_window(x, predictor, plan, batch_size=settings.batch_size, device=settings.device)[:, ks]
        pred = labels_from_probabilities({c: probs[c] for c in range(1, probs.shape[0])}, settings.threshold,
                                         lesion_values=m.lesion_channels)
        truth = y[ks]
        any_lesion = _dice(np.isin(pred, lesion), np.isin(truth, lesion))
        # classes the case holds (a stray speck of an absent class is a false positive the any-lesion
        # Dice already counts; scoring absent classes 1 or 0 would make the score jump with it)
        per_class = [_dice(pred == c, truth == c) for c in range(1, m.out_channels) if (truth == c).any()]
        scores.append((any_lesion + float(np.mean(per_class))) / 2 if per_class else any_lesion)
    return float(np.mean(scores))


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks; 1 when both are empty."""
    s = int(pred.sum()) + int(truth.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & truth).sum()) / s


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(config_path: Path, output_dir: Path, log=print) -> dict:
    """Train the config's bundle into ``output_dir`` (resuming from its checkpoint); the written model.json."""
    import torch
    from tqdm import tqdm

    cfg = load_config(config_path)
    meta = copy.deepcopy(cfg["bundle"])
    tc = cfg["train"]
    lesion_dice_weight(tc)  # a bad weight or share refused before the cases are made
    edge = SkullEdgeNegatives.from_config(tc.get("skull_edge_negatives"), meta["inputs"][0]["normalization"])
    if edge is not None and meta.get("dimensions") == "3d":
        raise UsageError("train.skull_edge_negatives is implemented for 2D/2.5D models", "remove train.skull_edge_negatives")
    output_dir = Path(output_dir)
    work = output_dir / ".training"
    work.mkdir(parents=True, exist_ok=True)
    cfg["train"]["init_from"] = _init_weights_spec(cfg, Path(config_path))
    train_files, val_files = _prepare_cases(cfg, work, log)
    settings = resolve(SegmentParams(device=tc.get("device", "auto"), precision=tc.get("precision", "auto"), heatmaps=()), meta)
    run = _Run.start(cfg, settings, work, log)
    sampler_cls = _Sampler3D if settings.model.spatial_dims == 3 else _Sampler
    hard = HardLesions.from_config(tc.get("hard_lesions"), meta["inputs"][0]["normalization"])
    if hard is not None and settings.model.spatial_dims == 3:
        raise UsageError("train.hard_lesions is implemented for 2D/2.5D models", "remove train.hard_lesions")
    balanced = bool(tc.get("class_balanced", False))
    if balanced and settings.model.spatial_dims == 3:
        raise UsageError("train.class_balanced is implemented for 2D/2.5D models", "remove train.class_balanced")
    sampler = sampler_cls(train_files, settings.model.context, tuple(tc.get("crop", settings.model.patch)), run.rng,
                          float(tc.get("lesion_fraction", 0.6)), *([hard] if hard else []),
                          **({"class_balanced": True} if balanced else {}), **({"skull_edge": edge} if edge else {}))
    if hard is not None:
        log(f"hard lesions: {len(sampler.hard)} in {len({n for n, _ in sampler.hard})} training cases, "
            f"{hard.share:.0%} of the lesion crops")
    bs, steps = int(tc.get("batch_size", 12)), int(tc["steps"])
    val_every, ck_every = int(tc.get("val_every", 250)), int(tc.get("checkpoint_every", 100))
    t0 = time.time()
    bar = tqdm(range(run.step, steps), initial=run.step, total=steps, desc="train", dynamic_ncols=True, mininterval=5,
               disable=not sys.stderr.isatty())  # logs get one line per validation instead
    loss_avg = None
    for step in bar:
        loss = run.train_step(*sampler.batch(bs))
        loss_avg = loss if loss_avg is None else 0.95 * loss_avg + 0.05 * loss
        run.step = done = step + 1
        if done % val_every == 0 or done == steps:
            d = validate(run.net, val_files, settings)
            run.history.append({"step": done, "loss": round(loss_avg, 4), "val_dice": round(d, 4),
                                "minutes": round((time.time() - t0) / 60, 1)})
            if d > run.best:
                run.best = d
                torch.save(run.net.state_dict(), work / "best.pt")
            bar.set_postfix(loss=f"{loss_avg:.3f}", val_dice=f"{d:.3f}", best=f"{run.best:.3f}")
            log(f"step {done}: loss {loss_avg:.4f}, validation Dice {d:.4f} (best {run.best:.4f})")
        else:
            bar.set_postfix(loss=f"{loss_avg:.3f}", best=f"{run.best:.3f}")
        if done % ck_every == 0 or done == steps:
            run.save_checkpoint()
    bar.close()
    state = torch.load(work / "best.pt", map_location="cpu", weights_only=True)
    return write_bundle(output_dir, meta, state, cfg, run.history, run.best, (time.time() - t0) / 60, settings.device,
                        settings.precision, run.net)


def context_slices(value: Any) -> int:
    """``train.init_from.context_slices``: the starting weights' neighbouring slices on each side (≥ 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"train.init_from.context_slices must be a whole number ≥ 0, not {value!r}",
                         "give the context_slices of the bundle the weights come from (e.g. 1)")
    return value


def expand_output_classes(state: Mapping[str, Any], target: Mapping[str, Any], class_map: list[int]) -> dict:
    """``state`` (a trained network's weights) reshaped for a network with more output classes.

    ``class_map[c]`` names the trained class whose output weights start new class ``c`` (e.g. a
    one-label hemorrhage model seeds the bleed compartments from its hemorrhage channel and the oedema
    from its background: ``[0, 1, 1, 1, 0]``). It is for changing the class count: only the tensors
    whose shape differs from ``target``'s in the first dimension (the output layers) are re-indexed;
    every other tensor must match ``target`` exactly.
    """
    import torch

    out = {}
    for name, value in state.items():
        want = target[name].shape if name in target else None
        if want is None or value.shape == want:
            out[name] = value
        elif value.shape[0] > max(class_map) and want[0] == len(class_map) and value.shape[1:] == want[1:]:
            out[name] = value[torch.as_tensor(class_map)].clone()
        else:
            raise UsageError(f"train.init_from: {name} has shape {tuple(value.shape)}, the network needs {tuple(want)}",
                             "start from weights of the same architecture (only the class count may differ)")
    return out


def expand_input_context(state: Mapping[str, Any], target: Mapping[str, Any], n_inputs: int, from_context: int) -> dict:
    """``state`` (a 2.5D network trained with ``from_context`` neighbouring slices on each side) reshaped
    for a network that sees more neighbours.

    A 2.5D network's input holds, channel by channel, each modality's ``2·context + 1`` slices in order
    (:func:`~UNetSegmentLib.engine.inference.slice_with_context`). The trained kernels go to the same
    slices (the centre and its trained neighbours); the new outer slices start at zero, so the expanded
    network's output is the trained network's exactly until training moves them. Only tensors whose
    second dimension is the input channel count change; every other tensor must match ``target``.
    """
    import torch

    out = {}
    old_width = 2 * from_context + 1
    for name, value in state.items():
        want = target[name].shape if name in target else None
        if want is None or value.shape == want:
            out[name] = value
            continue
        new_width, rest = divmod(want[1], n_inputs) if len(want) > 1 else (0, 1)
        if (rest or value.shape[1] != n_inputs * old_width or new_width < old_width or (new_width - old_width) % 2
                or value.shape[0] != want[0] or value.shape[2:] != want[2:]):
            raise UsageError(f"train.init_from: {name} has shape {tuple(value.shape)}, the network needs {tuple(want)}",
                             "start from weights of the same architecture (only the context slices may differ)")
        grown = torch.zeros(want, dtype=value.dtype)
        pad = (new_width - old_width) // 2
        for m in range(n_inputs):
            grown[:, m * new_width + pad: m * new_width + pad + old_width] = value[:, m * old_width:(m + 1) * old_width]
        out[name] = grown
    return out


def _init_weights_spec(cfg: dict, config_path: Path) -> dict | None:
    """``train.init_from: {file, sha256}`` (file relative to the config) checked and made absolute.

    Fine-tuning starts from a published bundle's weights; the checksum makes the run reproducible
    (the same start, or a clear refusal), also after the output directory's weights were replaced.
    """
    spec = cfg["train"].get("init_from")
    if not spec:
        return None
    if "context_slices" in spec and "class_map" in spec:  # each widening checks that every other tensor fits
        raise UsageError("train.init_from has both class_map and context_slices: one start can widen the outputs "
                         "or the input slices, not both",
                         "widen one at a time: fine-tune with one, then start a second run from its bundle with the other")
    if "context_slices" in spec:  # refused before the cases are made
        widest = ModelSettings.from_meta(cfg["bundle"]).context
        if context_slices(spec["context_slices"]) > widest:
            raise UsageError(f"train.init_from.context_slices is {spec['context_slices']}, more than the "
                             f"{widest} neighbouring slices the bundle's network sees",
                             "widen bundle.context_slices (a 2.5D model), or give the starting bundle's own value")
    path = (config_path.parent / spec["file"]).resolve()
    if not path.is_file() or sha256_file(path) != spec["sha256"]:
        raise UsageError(f"the starting weights {path} are missing or are not the ones the config names "
                         f"(sha256 {spec['sha256'][:12]}…)",
                         f"restore them, e.g. git show {spec.get('git', 'HEAD')}:{spec.get('repo_path', spec['file'])} > {path}")
    return {**spec, "path": str(path)}


def selection_split(data: dict) -> str:
    """The split the best checkpoint is chosen on: ``tune`` when the config has one, else ``val`` (older configs)."""
    return "tune" if "tune_seed" in data else "val"


def _prepare_cases(cfg: dict, work: Path, log) -> tuple[list[Path], list[Path]]:
    """The training cases and the checkpoint-selection cases of ``cfg`` on the network grid (cached).

    The best checkpoint is chosen on the **tune** split when the config has one (``tune_seed``), so the
    reported validation split never influences the weights; older configs select on ``val``.
    """
    data, meta = cfg["data"], cfg["bundle"]
    cache = Path(os.path.expandvars(data.get("cache_dir", str(work / "cache"))))
    split = selection_split(data)
    train_seeds, select_seeds = list(split_seeds(data, "train")), list(split_seeds(data, split))
    val_seeds = set(split_seeds(data, "val"))
    extra = extra_cases(data)
    seen = set(train_seeds)
    for e in extra:
        if seen & set(e.seeds):
            raise UsageError(f"extra_train seeds {e.seeds[0]}…{e.seeds[-1]} overlap other training seeds",
                             "choose disjoint seed ranges")
        seen |= set(e.seeds)
    if seen & (set(select_seeds) | val_seeds):
        raise UsageError("training seeds overlap the tune or validation seeds", "choose disjoint seed ranges")
    extra_validation_sets(data)  # a bad or overlapping extra validation set is refused before hours of training
    log(f"preparing {len(seen)} training and {len(select_seeds)} {split} (checkpoint selection) cases in {cache}")
    train = build_cache(data["generator"], train_seeds, meta, cache / "train", TRAINING, log=log)
    for e in extra:
        train += build_cache(data["generator"], e.seeds, meta, cache / e.folder(data["generator"], meta), e.settings, log=log)
    return train, build_cache(data["generator"], select_seeds, meta, cache / split, VALIDATION, log=log)


class _Run:
    """Network, optimiser, schedule and random state of one training run, and its checkpoint."""

    def __init__(self, net, opt, sched, rng: np.random.Generator, settings: RunSettings, checkpoint: Path, config_sha: str):
        self.net, self.opt, self.sched, self.rng, self.settings = net, opt, sched, rng, settings
        self.checkpoint, self.config_sha = checkpoint, config_sha
        self.step, self.best, self.history = 0, -1.0, []
        self.lesion_dice_weight = 0.0

    @classmethod
    def start(cls, cfg: dict, settings: RunSettings, work: Path, log) -> "_Run":
        """Seeded, on the settings' device; resumed from ``work``'s checkpoint when there is one."""
        import torch

        tc, arch = cfg["train"], cfg["bundle"]["architecture"]
        seed = int(tc.get("seed", 0))
        torch.manual_seed(seed)
        net = build_network(arch["name"], **arch["kwargs"]).to(settings.device)
        steps, lr = int(tc["steps"]), float(tc.get("lr", DEFAULT_LR))
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=float(tc.get("weight_decay", 1e-4)))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        cfg_sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
        run = cls(net, opt, sched, np.random.default_rng(seed), settings, work / "checkpoint.pt", cfg_sha)
        run.lesion_dice_weight = lesion_dice_weight(tc)
        if run.checkpoint.exists():
            run._resume(work, log)
        elif tc.get("init_from"):
            state = load_weights(Path(tc["init_from"]["path"]))
            class_map = tc["init_from"].get("class_map")
            if class_map is not None:
                state = expand_output_classes(state, net.state_dict(), class_map)
            from_context = tc["init_from"].get("context_slices")  # checked by _init_weights_spec
            if from_context is not None:
                state = expand_input_context(state, net.state_dict(), len(cfg["bundle"]["inputs"]), from_context)
            net.load_state_dict(state)
            log(f"initialised from {tc['init_from']['path']} (sha256 {tc['init_from']['sha256'][:12]}…"
                + (f", output classes from {class_map}" if class_map is not None else "")
                + (f", {from_context} context slices each side widened to "
                   f"{cfg['bundle'].get('context_slices')}" if from_context is not None else "") + ")")
        return run

    def _resume(self, work: Path, log) -> None:
        import torch

        st = torch.load(self.checkpoint, map_location=self.settings.device, weights_only=False)  # our own file
        if st.get("config_sha") != self.config_sha:
            raise UsageError(f"{self.checkpoint} was written with another config",
                             f"use the same config to resume, or delete {work} to start over")
        self.net.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        self.step, self.best, self.history = st["step"], st["best"], st["history"]
        log(f"resumed from {self.checkpoint} at step {self.step} (best validation Dice {self.best:.4f})")

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimiser step on a batch (cross-entropy + soft Dice, plus ``train.lesion_dice_weight`` × the
        lesion-wise Dice of :func:`_lesion_dice_loss` when set; autocast as the settings' precision)."""
        import torch

        device, amp = self.settings.device, autocast_dtype(self.settings.precision)
        self.net.train()
        xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with torch.autocast(device_type=device_type(device), dtype=amp, enabled=amp is not None):
            logits = self.net(xt)
        logits = logits[0] if isinstance(logits, (list, tuple)) else logits
        loss = torch.nn.functional.cross_entropy(logits.float(), yt) + _dice_loss(logits, yt)
        if self.lesion_dice_weight:
            loss = loss + self.lesion_dice_weight * _lesion_dice_loss(logits, yt, tuple(self.settings.model.lesion_channels))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return float(loss.item())

    def save_checkpoint(self) -> None:
        import torch

        _save_checkpoint(self.checkpoint, {
            "model": self.net.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "step": self.step,
            "best": self.best, "history": self.history, "config_sha": self.config_sha})


def write_bundle(output_dir: Path, meta: dict, state: dict, cfg: dict, history: list, best: float, minutes: float,
                 device, precision: str, net) -> dict:
    meta = copy.deepcopy(meta)
    meta["architecture"]["parameters"] = count_parameters(net)
    meta["training"] = {
        "generator": cfg["data"]["generator"], "train_cases": cfg["data"]["train_cases"], "val_cases": cfg["data"]["val_cases"],
        "train_seed": cfg["data"]["train_seed"], "val_seed": cfg["data"]["val_seed"], "steps": cfg["train"]["steps"],
        "batch_size": cfg["train"].get("batch_size", 12), "crop": cfg["train"].get("crop"), "seed": cfg["train"].get("seed", 0),
        "selection_split": selection_split(cfg["data"]), "lr": float(cfg["train"].get("lr", DEFAULT_LR)),
        "loss": "cross-entropy + soft Dice" + (f" + {w} x lesion-wise Dice" if (w := lesion_dice_weight(cfg["train"])) else ""),
        **({"extra_train": [e.record() for e in extra_cases(cfg["data"])]} if cfg["data"].get("extra_train") else {}),
        **({"skull_edge_negatives": float(cfg["train"]["skull_edge_negatives"])} if cfg["train"].get("skull_edge_negatives") else {}),
        "best_val_dice_network_grid": round(best, 4), "minutes": round(minutes, 1), "device": str(device),
        "precision": precision, "host": f"{platform.machine()} {os.cpu_count()} CPU(s)", "history": history,
    }
    init = cfg["train"].get("init_from")
    if init:
        meta["training"]["init_from"] = {k: init[k] for k in ("version", "sha256", "minutes", "class_map", "context_slices") if k in init}
    return write_bundle_files(output_dir, state, meta, "generated model.json")
