"""The threshold rule, in one place: which voxels are lesion, and of which label.

A voxel is lesion where P(any lesion label) ≥ the threshold; a lesion voxel gets its most probable
lesion label. Most bundles have only lesion labels (one, or several compartments of one finding). A
bundle may also segment context that is not a lesion (``"lesion": false`` in ``model.json``'s labels,
e.g. the oedema around a bleed): such a label is given where the voxel is not lesion and the network's
most probable class is that label — the network's own decision, which the live threshold (a
lesion-detection setting) leaves alone. Used on the input grid by the pipeline and the re-threshold of
a finished run, on the network grid by the trainer's validation and by Grad-CAM (which voxels to explain).
"""
from __future__ import annotations

from typing import Collection, Mapping

import numpy as np


def foreground_probability(class_probs: Mapping[int, np.ndarray],
                           lesion_values: Collection[int] | None = None) -> np.ndarray:
    """P(lesion): the one lesion label's map (no copy), or the lesion labels' maps summed and clipped to 1.

    ``lesion_values``: the labels that are lesions (default: all of ``class_probs``)."""
    maps = [p for v, p in class_probs.items() if lesion_values is None or v in lesion_values]
    if len(maps) == 1:
        return maps[0]
    fg = np.zeros(next(iter(class_probs.values())).shape, np.float32)
    for p in maps:
        fg += p
    np.clip(fg, 0.0, 1.0, out=fg)
    return fg


def labels_from_probabilities(class_probs: Mapping[int, np.ndarray], threshold: float,
                              foreground: np.ndarray | None = None,
                              lesion_values: Collection[int] | None = None) -> np.ndarray:
    """uint8 label map: the most probable lesion label where P(lesion) ≥ ``threshold``; elsewhere a
    non-lesion label where it is the most probable class of all (background included); else 0.

    ``class_probs``: label value → its probability map (every label but the background);
    ``foreground``: P(lesion) when the caller has it already (else :func:`foreground_probability`);
    ``lesion_values``: the labels that are lesions (default: all)."""
    values = list(class_probs)
    lesions = [v for v in values if lesion_values is None or v in lesion_values]
    context = [v for v in values if v not in lesions]
    fg = foreground_probability(class_probs, lesions) if foreground is None else foreground
    if len(lesions) == 1:
        out = (fg >= threshold).astype(np.uint8) * np.uint8(lesions[0])
    else:
        stack = np.stack([class_probs[v] for v in lesions])
        best = np.asarray(lesions, np.uint8)[np.argmax(stack, axis=0)]
        out = np.where(fg >= threshold, best, 0).astype(np.uint8)
    if context:  # the most probable class of all, and strictly more probable than the background
        background = 1.0 - np.clip(sum(class_probs[v] for v in values), 0.0, 1.0)
        best = np.zeros(out.shape, np.float32)
        for v in values:
            best = np.maximum(best, class_probs[v])
        for v in context:
            p = class_probs[v]
            out[(out == 0) & (p >= best) & (p > background)] = v
    return out
