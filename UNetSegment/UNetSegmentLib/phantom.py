"""A small synthetic CT-like head with one hyperdense blob, for the Slicer self-test and adapter tests.

The bundled ``tiny-blob`` model finds the blob (it was trained on similar 2D phantoms), so a run on
this volume exercises every output: a non-empty segmentation, heatmaps and one lesion row.
"""
from __future__ import annotations

import numpy as np

from .image import Image, make_ijk_to_ras


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
