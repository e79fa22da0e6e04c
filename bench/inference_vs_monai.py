#!/usr/bin/env python3
"""Our engine vs MONAI's inferers on the sample head CT, same network and weights, one process.

MONAI is run as a user would run it: ``SliceInferer`` (2D/2.5D bundles) or
``sliding_window_inference`` (3D) with roi = the bundle's patch size, the same batch size, MONAI's
defaults for everything else (overlap 0.25, mode "constant"), fp32, on the whole volume. Both sides
share reading and our pre-processing (MONAI gets the network-grid tensor we feed our own engine) and
both resample probabilities back to the input grid, so the ratio compares full pipelines.

Prints both times, ``ratio: X`` (MONAI time / ours, ours at its default settings — the fast engine
and automatic precision —, probabilities only, no heatmaps), the same ratio at equal precision and
windows (our plain engine in fp32: pure engine overhead), max |Δprobability|, ΔDice, the cost of
Grad-CAM relative to one inference pass, an ablation of the engine's speed-ups (each step's time
on the network-grid volume), and the forward pass's effective GFLOP/s next to this machine's
measured fp32 and bf16 matrix-multiply throughput.

``--cases DIR`` also runs both on every case folder of DIR (``image.nii.gz`` + ``label.nii.gz``,
e.g. the evaluation cases of ``make evaluate``) and checks that they find the same lesions.

usage: python bench/inference_vs_monai.py [--model NAME|PATH] [--case PATH] [--repeats N] [--cases DIR]
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

from UNetSegmentLib.models.bundle import default_model_name, load_bundle  # noqa: E402
from UNetSegmentLib.demo import demo_case  # noqa: E402
from UNetSegmentLib.image import Image, resample  # noqa: E402
from UNetSegmentLib.engine.inference import resolve_precision  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.params import SegmentParams  # noqa: E402
from UNetSegmentLib.engine.pipeline import segment  # noqa: E402
from UNetSegmentLib.engine.preprocess import canonical_grid, network_grid, to_network_input  # noqa: E402


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
    ap.add_argument("--cases", type=Path, default=None, help="also compare the lesions found on these case folders")
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
    eq = SegmentParams(precision="fp32", overlap=0.25, heatmaps=(), engine="plain")
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
    ablation(case, bundle, net, a.repeats)
    if a.cases:
        compare_lesions(a.cases, bundle, net, lambda img: segment([img], bundle, SegmentParams(heatmaps=()), network=net),
                        lambda img: monai_pipeline(img, bundle, net))
    print(f"precision of ours: {r_ours.precision}; threads: {torch.get_num_threads()}")
    print(f"ratio at equal precision and windows: {t_monai / t_eq:.2f}")
    print(f"ratio: {t_monai / t_ours:.2f}")
    return 0


def matmul_tflops(dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def counted_flops(fn) -> float:
    """Forward FLOPs of ``fn()`` as torch's FlopCounterMode counts them (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def ablation(case: Path, bundle, net, repeats: int) -> None:
    """The engine's speed-ups one at a time, on the network-grid volume of ``case`` (engine time only)."""
    from UNetSegmentLib.engine.acceleration import prepare_network
    from UNetSegmentLib.engine.inference import sliding_window

    canon, _ = canonical_grid(read_image(case))
    grid = network_grid(canon, bundle.meta["target_spacing"], in_plane_only=bundle.dimensions != "3d")
    vol = np.stack([to_network_input(canon, bundle.meta["inputs"][0]["normalization"], grid)])
    dims = 3 if bundle.dimensions == "3d" else 2
    ctx = int(bundle.meta.get("context_slices", 0)) if bundle.dimensions == "2.5d" else 0
    bs = bundle.inference_default("batch_size", 4)
    kw = dict(spatial_dims=dims, context=ctx, out_channels=1 + len(bundle.labels), overlap=0.25)
    fast_net = prepare_network(net, dims, torch.device("cpu"))
    bf16 = "bf16" if resolve_precision("auto", torch.device("cpu")) == "bf16" else "fp32"
    fast = dict(crop_to_content=True, fit_window=True, channels_last=True)
    steps = [
        ("plain engine, fp32 (MONAI's windows)", net, dict(precision="fp32", batch_size=bs)),
        (f"+ {bf16} autocast", net, dict(precision=bf16, batch_size=bs)),
        ("+ folded BatchNorm, channels-last", fast_net, dict(precision=bf16, batch_size=bs, channels_last=True)),
        ("+ body crop, fitted windows (= fast)", fast_net, dict(precision=bf16, batch_size=bs, **fast)),
    ] + [(f"  fast, batch {b}", fast_net, dict(precision=bf16, batch_size=b, **fast)) for b in (1, 8, 16) if b != bs]
    print(f"ablation (engine only, network-grid volume {vol.shape[1:]}, best of {repeats}):")
    base = None
    for name, n, opts in steps:
        t, _ = timed(lambda: sliding_window(vol, n, bundle.meta["patch_size"], **kw, **opts), repeats)
        base = base or t
        print(f"  {name:<42} {t:6.2f} s  ×{base / t:4.2f}")
    fp32_tf, bf16_tf = matmul_tflops(torch.float32), matmul_tflops(torch.bfloat16)
    opts = dict(precision=bf16, batch_size=bs, **fast)
    t_fast, _ = timed(lambda: sliding_window(vol, fast_net, bundle.meta["patch_size"], **kw, **opts), 1)
    flops = counted_flops(lambda: sliding_window(vol, fast_net, bundle.meta["patch_size"], **kw, **opts))
    t_plain, _ = timed(lambda: sliding_window(vol, net, bundle.meta["patch_size"], **kw, precision="fp32", batch_size=bs), 1)
    flops_plain = counted_flops(lambda: sliding_window(vol, net, bundle.meta["patch_size"], **kw, precision="fp32", batch_size=bs))
    print(f"forward pass: fast engine {flops / 1e9:.0f} GFLOP in {t_fast:.2f} s = {flops / t_fast / 1e9:.0f} GFLOP/s ({bf16}); "
          f"plain fp32 {flops_plain / 1e9:.0f} GFLOP in {t_plain:.2f} s = {flops_plain / t_plain / 1e9:.0f} GFLOP/s")
    print(f"this CPU's matmul throughput (2048², {torch.get_num_threads()} threads): fp32 {fp32_tf * 1e3:.0f} GFLOP/s, "
          f"bf16 {bf16_tf * 1e3:.0f} GFLOP/s")


def compare_lesions(cases_dir: Path, bundle, net, ours_fn, monai_fn) -> None:
    """Ours (defaults) vs MONAI on every case folder: Dice vs truth and the true lesions ≥ 0.5 mL each finds."""
    from UNetSegmentLib.analysis.evaluate import score_case
    from UNetSegmentLib.analysis.lesions import remove_small_lesions

    thr = float(bundle.meta["threshold"])
    rows, same = [], True
    for c in sorted(p for p in cases_dir.iterdir() if (p / "image.nii.gz").exists()):
        img, truth = read_image(c / "image.nii.gz"), read_image(c / "label.nii.gz")
        r = ours_fn(img)
        p_monai = monai_fn(img)
        min_ml = float(bundle.inference_default("min_lesion_ml", 0.0))  # as `unetsegment evaluate` does, for both
        ours_lab = remove_small_lesions(r.labels, min_ml)
        monai_lab = remove_small_lesions(Image((p_monai >= thr).astype(np.uint8), img.ijk_to_ras), min_ml)
        so, sm = score_case(c.name, truth, ours_lab), score_case(c.name, truth, monai_lab)
        found_o = [l["detected"] for l in so.true_lesions if l["volume_ml"] >= 0.5]
        found_m = [l["detected"] for l in sm.true_lesions if l["volume_ml"] >= 0.5]
        same &= found_o == found_m
        rows.append((c.name, so.dice, sm.dice, sum(found_o), sum(found_m), len(found_o)))
    print(f"evaluation cases ({cases_dir}): case, Dice ours / MONAI, true lesions ≥ 0.5 mL found ours / MONAI")
    for name, do, dm, fo, fm, n in rows:
        print(f"  {name:<14} {do:.4f} / {dm:.4f}   {fo}/{n} / {fm}/{n}")
    dd = [r[1] - r[2] for r in rows]
    print(f"mean ΔDice (ours − MONAI) {np.mean(dd):+.4f}, max |ΔDice| {np.max(np.abs(dd)):.4f}; same lesions found: {same}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
