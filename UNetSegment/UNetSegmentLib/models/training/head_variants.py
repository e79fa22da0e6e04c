"""The same head CT acquired and stored in other ways, and cut or changed as real scans are.

Used to check that what reads head CTs (the input-domain check, the model) accepts every variant a
user may bring: partial coverage (posterior fossa only, cut at the vertex), a child-sized head, a
craniectomy bone gap, flipped storage, low-dose noise, thick slices, a 512² in-plane grid, an oblique
acquisition.
"""
from __future__ import annotations

import numpy as np

from ...image import Image, make_ijk_to_ras, resample
from ...phantom import oblique_direction


def _flip_ij(J: int, I: int) -> np.ndarray:
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    f[0, 3], f[1, 3] = I - 1, J - 1
    return f


def head_ct_variants(ct: Image, seed: int = 3) -> dict[str, Image]:
    """Named variants of ``ct`` (HU, axial slices along k); the input is not modified."""
    a = ct.array
    K, J, I = a.shape
    m_small = ct.ijk_to_ras.copy()
    m_small[:3, :3] *= 0.65  # a child's head: 65 % of the adult size
    crani = a.copy()
    kk, jj, ii = np.mgrid[:K, :J, :I]
    crani[(ii > I * 0.55) & (kk > K * 0.35) & (jj > J * 0.2) & (jj < J * 0.85) & (crani > 150)] = 25  # bone flap off
    low_dose = ct.with_array((a + np.random.default_rng(seed).normal(0, 25, a.shape)).astype(np.float32))
    thick = resample(ct, (max(1, K // 4), J, I), ct.ijk_to_ras @ np.diag([1, 1, 4.0, 1]), order=1, fill=-1000.0)
    fine = resample(ct, (max(1, K // 2), 2 * J, 2 * I), ct.ijk_to_ras @ np.diag([0.5, 0.5, 2.0, 1]), order=1, fill=-1000.0)
    centre = ct.ijk_to_ras_points((np.array(ct.shape_ijk) - 1) / 2)[0]
    m_obl = make_ijk_to_ras(ct.spacing, oblique_direction(20.0, flip_i=False) @ ct.direction, (0, 0, 0))
    m_obl[:3, 3] = centre - m_obl[:3, :3] @ ((np.array(ct.shape_ijk) - 1) / 2)
    return {
        "posterior fossa only": Image(a[: max(1, K // 4)].copy(), ct.ijk_to_ras),
        "cut at the vertex": Image(a[: int(K * 0.6)].copy(), ct.ijk_to_ras),
        "child-sized head (65 %)": Image(a.copy(), m_small),
        "craniectomy bone gap": ct.with_array(crani),
        "flipped i/j storage": Image(a[:, ::-1, ::-1].copy(), ct.ijk_to_ras @ _flip_ij(J, I)),
        "low dose (noise σ 25 HU)": low_dose,
        "thick slices (4×)": thick,
        "512² in-plane (2×)": fine,
        "oblique 20°": resample(ct, a.shape, m_obl, order=1, fill=-1000.0),
    }
