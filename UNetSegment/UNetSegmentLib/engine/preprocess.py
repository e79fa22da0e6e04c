"""What the network sees: each channel normalised as the bundle declares, on the network grid.

:func:`network_input` is the one definition of the network's input, shared by inference, training
and the benchmarks: canonical axes and grid from :mod:`.grid`, intensities from :func:`normalize`
(CT window, z-score per channel).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from ..image import Image
from ..settings import ModelSettings
from .grid import GridMapping, align_inputs, map_grid


class PreparedInputs(NamedTuple):
    volume: np.ndarray  # the network's input [C, K, J, I], float32
    mapping: GridMapping  # the way back to the input grid
    aligned: list[Image]  # the inputs on the first one's grid (for intensity statistics)


def prepare_inputs(images: Sequence[Image], model: ModelSettings) -> PreparedInputs:
    """Channels (one per model input, in order) → what the network sees: aligned on the first channel,
    canonical axes, the model's spacing, normalised; with the mapping that brings results back."""
    aligned = align_inputs(list(images), list(model.channels))
    mapping = map_grid(aligned[0], model.target_spacing, model.in_plane_only)
    return PreparedInputs(network_input(aligned, mapping, model.normalizations), mapping, aligned)


def network_input(images: Sequence[Image], mapping: GridMapping, normalizations: Sequence[dict]) -> np.ndarray:
    """The channels (on ``mapping``'s reference grid) as the network's float32 input [C, K, J, I]."""
    return np.stack([mapping.to_network(normalize(mapping.to_canonical(im).array, spec))
                     for im, spec in zip(images, normalizations)])


def normalize(array: np.ndarray, spec: dict) -> np.ndarray:
    """Float32 copy normalised as the bundle's input spec says; NaN/Inf become the background value."""
    integer = np.asarray(array).dtype.kind in "uib"
    a = np.asarray(array, dtype=np.float32)
    bad = np.zeros((), bool) if integer else ~np.isfinite(a)  # integers are always finite
    kind = spec["type"]
    if kind == "ct":
        lo, hi = spec["clip"]
        out = np.array(a, dtype=np.float32, copy=True) if np.may_share_memory(a, array) else a
        if bad.any():
            out[bad] = lo
        np.clip(out, lo, hi, out=out)  # in place on this function's own copy: the same float32 steps
        out -= np.float32(spec["mean"])
        out /= np.float32(spec["std"])
    elif kind == "zscore":
        if bad.any():
            a = np.where(bad, 0.0, a).astype(np.float32)
        mask = a != 0 if spec.get("mask", "nonzero") == "nonzero" else np.ones(a.shape, bool)
        vals = a[mask] if mask.any() else a.ravel()
        if "clip_percentiles" in spec:
            lo, hi = np.percentile(vals, spec["clip_percentiles"])
            a = np.clip(a, lo, hi)
            vals = np.clip(vals, lo, hi)
        mu, sd = float(vals.mean()), float(vals.std())
        out = (a - mu) / (sd if sd > 1e-8 else 1.0)
        if spec.get("mask", "nonzero") == "nonzero":
            out = np.where(mask, out, 0.0)
    elif kind == "none":
        out = np.where(bad, 0.0, a)
    else:  # the schema rejects this; keep the error explicit for programmatic use
        raise ValueError(f"unknown normalization {kind!r}")
    return out.astype(np.float32, copy=False)
