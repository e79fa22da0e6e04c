#!/usr/bin/env python3
"""Our engine vs MONAI's inferers on the sample head CT, same network and weights, one process.

MONAI is run as a user would run it: ``SliceInferer`` (2D/2.5D bundles) or
``sliding_window_inference`` (3D) with roi = the bundle's patch size, the same batch size, MONAI's
defaults for everything else (overlap 0.25, mode "constant"), fp32, on the whole volume. Both sides
share reading and our pre-processing (MONAI gets the network-grid tensor we feed our own engine) and
both resample probabilities back to the input grid, so the ratio compares full pipelines.

Prints both times, ``ratio: X`` (MONAI time / ours, ours at its default settings, probabilities
only — no heatmaps), the same ratio at equal precision and windows, max |Δprobability|, ΔDice, and
the cost of Grad-CAM relative to one inference pass.

usage: python bench/inference_vs_monai.py [--model NAME|PATH] [--case PATH] [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))

from UNetSegmentLib.bundle import default_model_name, load_bundle  # noqa: E402
from UNetSegmentLib.demo import demo_case  # noqa: E402
from UNetSegmentLib.image import Image, resample  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.params import SegmentParams  # noqa: E402
from UNetSegmentLib.pipeline import segment  # noqa: E402
from UNetSegmentLib.preprocess import canonical_grid, network_grid, to_network_input  # noqa: E402


def monai_pipeline(image: Image, bundle, net) -> np.ndarray:
    """Foreground probability on the input grid, with MONAI doing the windowed inference."""
    from monai.inferers import SliceInferer, sliding_window_inference

    canon, amap = canonical_grid(image)
    grid = network_grid(canon, bundle.meta["target_spacing"], in_plane_only=bundle.dimensions != "3d")
    x = to_network_input(canon, bundle.meta["inputs"][0]["normalization"], grid)
    g = grid if grid is not None else canon
    ctx = int(bundle.meta.get("context_slices", 0)) if bundle.dimensions == "2.5d" else 0
    if ctx:  # 2.5D as a MONAI user builds it: neighbouring slices stacked as channels, then SliceInferer
        K = x.shape[0]
        x = np.stack([x[np.clip(np.arange(K) + d, 0, K - 1)] for d in range(-ctx, ctx + 1)])
    else:
        x = x[None]
    xt = torch.from_numpy(np.ascontiguousarray(x))[None]  # B, C, K, J, I
    bs = bundle.inference_default("batch_size", 4)
    patch = list(bundle.meta["patch_size"])
    with torch.inference_mode():
        if bundle.dimensions == "3d":
            logits = sliding_window_inference(xt, patch, bs, net)
        else:
            logits = SliceInferer(roi_size=patch, sw_batch_size=bs, spatial_dim=0, progress=False)(xt, net)
        fg = 1.0 - torch.softmax(logits.float(), 1)[0, 0].numpy()
    if fg.shape != canon.array.shape or grid is not None:
        fg = resample(Image(fg, g.ijk_to_ras), canon.array.shape, canon.ijk_to_ras, order=1, fill=0.0).array
    return np.clip(amap.invert(fg), 0, 1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--case", default=None, help="input volume (default: the demo case on the sample head CT)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    import monai

    bundle = load_bundle(a.model or default_model_name())
    case = Path(a.case) if a.case else demo_case()[0]
    net = bundle.build_network()
    threshold = float(bundle.meta["threshold"])
    print(f"model {bundle.name} {bundle.version} ({bundle.dimensions}, patch {bundle.meta['patch_size']}), case {case}")
    print(f"CPU {cpu_name()}, torch {torch.__version__} threads {torch.get_num_threads()}, MONAI {monai.__version__}")

    def ours(params: SegmentParams):
        img = read_image(case)
        return segment([img], bundle, params, network=net)

    def theirs():
        img = read_image(case)
        return monai_pipeline(img, bundle, net)

    t_monai, p_monai = timed(theirs, a.repeats)
    t_ours, r_ours = timed(lambda: ours(SegmentParams(heatmaps=())), a.repeats)
    eq = SegmentParams(precision="fp32", overlap=0.25, heatmaps=())
    t_eq, r_eq = timed(lambda: ours(eq), a.repeats)
    p_ours = r_ours.probability.array
    d_prob = float(np.abs(p_ours - p_monai).max())
    d_prob_eq = float(np.abs(r_eq.probability.array - p_monai).max())
    dice_ours_monai = dice(p_ours >= threshold, p_monai >= threshold)
    truth = Path(case).parent / "label.nii.gz"
    print(f"MONAI  (fp32, overlap 0.25): {t_monai:.2f} s")
    print(f"ours   (defaults, {r_ours.precision}): {t_ours:.2f} s")
    print(f"ours   (fp32, overlap 0.25): {t_eq:.2f} s")
    print(f"max |Δprobability| ours-default vs MONAI: {d_prob:.2e}; at equal settings: {d_prob_eq:.2e}")
    print(f"Dice(ours, MONAI) of the label maps: {dice_ours_monai:.4f}")
    if truth.exists():
        gt = read_image(truth).array > 0
        d1, d2 = dice(p_ours >= threshold, gt), dice(p_monai >= threshold, gt)
        print(f"Dice vs truth: ours {d1:.4f}, MONAI {d2:.4f}, ΔDice {d1 - d2:+.4f}")
    t_cam, r_cam = timed(lambda: ours(SegmentParams()), 1)
    print(f"ours with Grad-CAM ({r_cam.extra.get('cam_method')}): inference {r_cam.timings['inference_s']:.2f} s, "
          f"Grad-CAM {r_cam.timings.get('gradcam_s', 0):.2f} s (×{r_cam.timings.get('gradcam_s', 0) / r_cam.timings['inference_s']:.2f} of inference)")
    print(f"ratio at equal precision and windows: {t_monai / t_eq:.2f}")
    print(f"ratio: {t_monai / t_ours:.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
