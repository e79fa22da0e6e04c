"""The threshold rule, in one place: which voxels are lesion, and of which label.

A voxel is foreground where P(not background) ≥ the threshold; a foreground voxel gets the most
probable label. Used on the input grid by the pipeline and the re-threshold of a finished run, on
the network grid by the trainer's validation and by Grad-CAM (which voxels to explain).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def foreground_probability(class_probs: Mapping[int, np.ndarray]) -> np.ndarray:
    """P(not background): the one label's map (no copy), or the labels' maps summed and clipped to 1."""
    maps = list(class_probs.values())
    if len(maps) == 1:
        return maps[0]
    fg = np.zeros(maps[0].shape, np.float32)
    for p in maps:
        fg += p
    np.clip(fg, 0.0, 1.0, out=fg)
    return fg


def labels_from_probabilities(class_probs: Mapping[int, np.ndarray], threshold: float,
                              foreground: np.ndarray | None = None) -> np.ndarray:
    """uint8 label map: the most probable label value where P(not background) ≥ ``threshold``, else 0.

    ``class_probs``: label value → its probability map; ``foreground``: P(not background) when the
    caller has it already (else :func:`foreground_probability`)."""
    fg = foreground_probability(class_probs) if foreground is None else foreground
    values = list(class_probs)
    if len(values) == 1:
        return (fg >= threshold).astype(np.uint8) * np.uint8(values[0])
    stack = np.stack([class_probs[v] for v in values])
    best = np.asarray(values, np.uint8)[np.argmax(stack, axis=0)]
    return np.where(fg >= threshold, best, 0).astype(np.uint8)
