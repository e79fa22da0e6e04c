#!/usr/bin/env python3
"""BLAST-CT's network against ours on the same head CT, one process (issue #19's speed comparison).

BLAST-CT (Monteiro et al., Lancet Digital Health 2020; ``pip install blast-ct``, 2.1.0) segments the
same four classes as ct-hemorrhage 2.x with a 3D DeepMedic (three pathways at 1×, 3× and 5×
down-sampling, 8 convolution layers each, two 1×1×1 fully connected layers) and, by default, an
ensemble of 15 such models. Its pip package ships no weights and they cannot be downloaded here, so
its network is timed with random weights: inference time does not depend on the weights. It is
installed without its dependencies (``pip install --no-deps blast-ct==2.1.0``; ``make bench-blast``
does that) and built from its own config (``blast_ct/data/config.json``): input patches of 110³ at
1 mm, each giving the central output patch; patch centres on BLAST-CT's own grid
(``FullImageToOverlappingPatchesNiftiDataset.get_center_points``), the volume padded so that every
input patch lies inside.

Both sides read the same CT. BLAST-CT's side: resampling to 1 mm isotropic and its intensity window
(−15–100 HU), then its network over every patch (batch ``--batch-size``; BLAST-CT's GPU batch of 32
does not fit a laptop's memory at 110³). Ours: :func:`segment` at its defaults (fast engine,
automatic precision) with the default heatmaps and without, and in fp32. One DeepMedic model is timed
over the whole volume; the ensemble's time is that × ``--ensemble`` (BLAST-CT runs every model of the
ensemble on every batch, ``ModelInferenceEnsemble``, and also reloads each model's weights per batch,
which is not counted: the projection is on BLAST-CT's side of fair).

usage: python bench/blast_ct_speed.py [--case PATH] [--model NAME|PATH] [--ensemble N] [--batch-size N]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))

from UNetSegmentLib.demo import demo_case  # noqa: E402
from UNetSegmentLib.engine.pipeline import segment  # noqa: E402
from UNetSegmentLib.image import Image  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.models.bundle import default_model_name, load_bundle  # noqa: E402
from UNetSegmentLib.params import SegmentParams  # noqa: E402
from UNetSegmentLib.settings import resolve  # noqa: E402


def blast_network():
    """BLAST-CT's DeepMedic as its packaged config builds it (random weights), and that config."""
    try:
        import blast_ct
        from blast_ct.models.deepmedic import DeepMedic
    except ImportError:
        sys.exit("blast-ct is not installed: `make bench-blast`, or .venv/bin/pip install --no-deps blast-ct==2.1.0")
    cfg = json.loads((Path(blast_ct.__file__).parent / "data" / "config.json").read_text())
    dm = cfg["model"]["DeepMedic"]
    torch.manual_seed(0)
    net = DeepMedic(cfg["data"]["input_channels"], cfg["data"]["num_classes"], feature_maps=dm["feature_maps"],
                    fully_connected=dm["fully_connected"]).eval()
    return net, cfg


def blast_volume(img: Image, cfg: dict) -> np.ndarray:
    """``img`` as BLAST-CT prepares it: its own ``rescale`` to the config's resolution (SimpleITK, linear),
    then its intensity window scaled to 0–1."""
    from blast_ct.nifti.rescale import rescale

    import SimpleITK as sitk

    from UNetSegmentLib.image import to_sitk

    vol = sitk.GetArrayFromImage(rescale(cfg["data"]["resolution"], to_sitk(img))).astype(np.float32)
    lo, hi = cfg["data"]["transformation"]["IntensityWindowNormalization"].values()
    return (np.clip(vol, lo, hi) - lo) / (hi - lo)


def blast_patches(vol: np.ndarray, in_size: tuple[int, ...], out_size: tuple[int, ...]):
    """(number of patches, a generator of them): BLAST-CT's input patches over ``vol`` (centres on its grid,
    ``get_center_points``; the volume padded so that every patch lies inside), made one at a time."""
    centres = list(itertools.product(*((ps * i + ps // 2 for i in range(s // ps + 1)) for s, ps in zip(vol.shape, out_size))))
    half = [i // 2 for i in in_size]
    pad = [(h, h + i) for h, i in zip(half, in_size)]
    padded = np.pad(vol, pad, constant_values=float(vol.min()))
    return len(centres), (padded[tuple(slice(c + p[0] - h, c + p[0] - h + i) for c, p, h, i in zip(cen, pad, half, in_size))]
                          for cen in centres)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default=None, help="input CT (default: the demo case)")
    ap.add_argument("--model", default=None, help="our model (default: the default model)")
    ap.add_argument("--ensemble", type=int, default=15, help="models in BLAST-CT's default ensemble (get_model_paths(15))")
    ap.add_argument("--batch-size", type=int, default=2)
    a = ap.parse_args()
    case = Path(a.case) if a.case else demo_case()[0]
    bundle = load_bundle(a.model or default_model_name())
    net, cfg = blast_network()
    in_size = tuple(cfg["test"]["input_patch_size"])
    out_size = tuple(net.get_output_size(in_size))
    print(f"case {case}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads for both")
    print(f"BLAST-CT DeepMedic: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, input patch {in_size} "
          f"→ output {out_size}; ours: {bundle.name} {bundle.version}, {bundle.meta['architecture'].get('parameters', 0) / 1e6:.2f} M")

    t0 = time.perf_counter()
    vol = blast_volume(read_image(case), cfg)
    n_patches, patches = blast_patches(vol, in_size, out_size)
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while batch := list(itertools.islice(patches, a.batch_size)):
            net(torch.from_numpy(np.stack(batch))[:, None])
    t_net = time.perf_counter() - t0
    print(f"BLAST-CT: 1 mm volume {vol.shape}, {n_patches} patches; read+resample+window {t_prep:.1f} s; "
          f"one model {t_net:.1f} s (fp32, batch {a.batch_size}); ensemble of {a.ensemble}: {t_net * a.ensemble:.0f} s")

    img = read_image(case)
    network = bundle.build_network()
    times = {}
    for name, params in (("defaults (Grad-CAM + uncertainty)", SegmentParams()), ("no heatmaps", SegmentParams(heatmaps=())),
                         ("fp32, defaults", SegmentParams(precision="fp32"))):
        s = resolve(params, bundle)
        segment([img], bundle, network=network, settings=s)  # warm (the network is prepared once)
        t0 = time.perf_counter()
        res = segment([read_image(case)], bundle, network=network, settings=s)
        times[name] = (time.perf_counter() - t0, res.timings.get("inference_s", 0.0), res.precision)
    for name, (total, inf, prec) in times.items():
        print(f"ours, {name}: {total:.2f} s in all (read to labels), network pass {inf:.2f} s ({prec})")
    ours_total = times["defaults (Grad-CAM + uncertainty)"][0]
    print(f"ratio (BLAST-CT one model, network only / ours in all, with heatmaps): {t_net / ours_total:.1f}")
    print(f"ratio (BLAST-CT ensemble of {a.ensemble} / ours in all, with heatmaps): {t_net * a.ensemble / ours_total:.0f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
