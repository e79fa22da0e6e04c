"""A grid of generated slices per bleed kind and mimic, for the compartment model's card (and a look).

Each bleed kind (grouped by class: IPH, EAH, IVH) and each mimic on three backgrounds (the real
sample CT, a deformed copy, an MNI152 pseudo-CT). A cell shows the axial slice where the
painted class covers most voxels (for a mimic: where it changed the CT most), in a 0–80 HU brain
window, with the label outlined in its class colour (oedema in its own). The grid is made from
:func:`..synth_compartments.synthesize_compartments` directly, without reslicing, so it shows what
the generator paints.

usage: python -m UNetSegmentLib.models.training.compartment_grid OUT.png [--seed N]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ...analysis.report import radiological_axial
from ...engine.grid import canonical_grid
from ...image import Image
from ...io.writers import atomic_path
from ...synth_compartments import BLEED_KINDS, CLASSES, KIND_CLASS, MIMICS, Bleed, synthesize_compartments

#: outline colours per class (RGB 0–1): fresh blood red, extra-axial orange, ventricular magenta, oedema cyan
CLASS_COLOURS = {1: (0.90, 0.10, 0.10), 2: (1.00, 0.60, 0.00), 3: (0.85, 0.20, 0.85), 4: (0.20, 0.80, 0.95)}


def _cell(ct: Image, painted: Image, label: Image, mimic: bool) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(CT slice, label slice, extent) of the axial plane that shows the painting best, radiological view."""
    canon = canonical_grid(painted)[0]
    c, lab = canon.array.astype(np.float32), canonical_grid(label)[0].array
    if mimic:  # the slice it changed most among those that show most of the head (not the vertex)
        head = (c > -200).sum(axis=(1, 2))
        score = (np.abs(c - canonical_grid(ct)[0].array.astype(np.float32)) > 5).sum(axis=(1, 2)) * (head >= 0.6 * head.max())
    else:
        score = ((lab > 0) & (lab != 4)).sum(axis=(1, 2)) + 0.1 * (lab == 4).sum(axis=(1, 2))
    K, J, I = c.shape
    ras = canon.ijk_to_ras_points(np.array([[(I - 1) / 2, (J - 1) / 2, int(np.argmax(score))]], float))
    ct_slice, extent = radiological_axial(painted, ras)
    return ct_slice, radiological_axial(label, ras)[0], extent


def render(cells: list[tuple[str, np.ndarray, np.ndarray, tuple]], n_cols: int, path: Path) -> None:
    """``cells`` (title, CT slice, label slice, extent) in rows of ``n_cols``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows = -(-len(cells) // n_cols)
    fig = Figure(figsize=(2.0 * n_cols, 2.15 * n_rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    for n, (title, ct, lab, extent) in enumerate(cells):
        ax = fig.add_subplot(n_rows, n_cols, n + 1)
        ax.imshow(ct, cmap="gray", vmin=0, vmax=80, interpolation="nearest", extent=extent, origin="upper")
        for v, colour in CLASS_COLOURS.items():
            if (lab == v).any():
                ax.contour(lab == v, levels=[0.5], colors=[colour], linewidths=0.7, extent=extent, origin="upper")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=7)
    legend = ", ".join(f"{CLASSES[v]} {name}" for v, name in ((1, "red"), (2, "orange"), (3, "magenta"), (4, "cyan")))
    fig.suptitle(f"Generated bleeds and mimics on three backgrounds (0–80 HU, anterior up, patient's right on the left;\n"
                 f"outlines: {legend}; mimics are never labelled)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def build(seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray, tuple]]:
    """The grid's cells: each bleed kind on the three backgrounds (one row per background), then each mimic."""
    from ...io.sample import load_sample
    from ...synth import brain_mask
    from .backgrounds import deformed_ct, mni_pseudo_ct

    real = load_sample()
    rng = np.random.default_rng(seed)
    backgrounds = [("real", real), ("deformed", deformed_ct(real, rng)), ("MNI152", mni_pseudo_ct(rng))]
    brains = [brain_mask(bg) for _, bg in backgrounds]
    cells = []
    for n, ((bg_name, bg), brain) in enumerate(zip(backgrounds, brains)):
        for kind in sorted(BLEED_KINDS, key=lambda k: KIND_CLASS[k]):
            r = np.random.default_rng([seed, n, BLEED_KINDS.index(kind)])
            bleed = Bleed(kind, fluid_level=(n == 0) if kind == "intraparenchymal" else None, density_hu=float(r.uniform(50, 85)))
            painted, label = synthesize_compartments(bg, r, [bleed], brain=brain)
            cells.append((f"{CLASSES[KIND_CLASS[kind]]}: {kind} ({bg_name})", *_cell(bg, painted, label, mimic=False)))
    for n, ((bg_name, bg), brain) in enumerate(zip(backgrounds, brains)):
        for m in MIMICS:
            painted, label = synthesize_compartments(bg, np.random.default_rng([seed, n, 100 + MIMICS.index(m)]), [], (m,), brain=brain)
            cells.append((f"{m.replace('_', ' ')} ({bg_name})", *_cell(bg, painted, label, mimic=True)))
    return cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    render(build(a.seed), len(BLEED_KINDS), a.output)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
