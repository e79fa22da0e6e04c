#!/usr/bin/env python3
"""The engine on a CUDA GPU in fp16 vs the CPU, on the sample head CT, from plain .npy arrays.

A GPU machine may have torch but not SimpleITK, so the work is split:

* ``--prepare DIR`` (here, full stack): writes the demo case's network-grid input ``volume.npz``
  [C, K, J, I], the CPU fast-engine foreground probability ``reference.npz`` (fp32, the reference) and the
  bundle (``model.json`` + weights) into DIR;
* ``--run DIR`` (on the GPU machine; needs torch, numpy, scipy, safetensors): runs the engine there
  — plain fp32, plain fp16, fast fp16 and Grad-CAM — timed with CUDA synchronisation (best of 3
  after a warm-up), and prints max |Δp| and label Dice against the CPU reference. Then it caps the
  process's GPU memory (256 MiB, then 4 MiB) and asks for more than fits, to show the out-of-memory
  fallback at work (smaller batches, then patch windows, then the CPU) and that its answer is unchanged.

usage: python bench/gpu_check.py --prepare DIR [--model NAME]   |   python bench/gpu_check.py --run DIR
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))


def prepare(out: Path, model: str | None) -> None:
    from UNetSegmentLib.models.bundle import default_model_name, load_bundle
    from UNetSegmentLib.demo import demo_case
    from UNetSegmentLib.engine.inference import sliding_window
    from UNetSegmentLib.engine.acceleration import prepare_network
    from UNetSegmentLib.io.readers import read_image
    from UNetSegmentLib.engine.preprocess import canonical_grid, network_grid, to_network_input
    import torch

    b = load_bundle(model or default_model_name())
    canon, _ = canonical_grid(read_image(demo_case()[0]))
    grid = network_grid(canon, b.meta["target_spacing"], in_plane_only=b.dimensions != "3d")
    vol = np.stack([to_network_input(canon, b.meta["inputs"][0]["normalization"], grid)])
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "volume.npz", volume=vol)
    net = b.build_network().eval()
    probs, _ = sliding_window(vol, prepare_network(net, 2 if b.dimensions != "3d" else 3, torch.device("cpu")),
                              b.meta["patch_size"], **_engine_kw(b.meta), precision="fp32",
                              crop_to_content=True, fit_window=True, channels_last=True)
    np.savez_compressed(out / "reference.npz", foreground=probs[1:].sum(0).astype(np.float32))
    shutil.copy(b.root / "model.json", out / "model.json")
    shutil.copy(b.root / b.meta["weights"]["file"], out / b.meta["weights"]["file"])
    print(f"prepared {out}: volume {vol.shape}, model {b.name} {b.version}")


def _engine_kw(meta: dict) -> dict:
    dims = 3 if meta["dimensions"] == "3d" else 2
    ctx = int(meta.get("context_slices", 0)) if meta["dimensions"] == "2.5d" else 0
    return dict(spatial_dims=dims, context=ctx, out_channels=1 + len(meta["labels"]),
                overlap=float(meta.get("inference", {}).get("overlap", 0.25)),
                batch_size=int(meta.get("inference", {}).get("batch_size", 4)))


def run(d: Path, device: str = "cuda") -> None:
    import torch
    from safetensors.torch import load_file

    from UNetSegmentLib.engine.acceleration import prepare_network
    from UNetSegmentLib.engine.fallback import Attempt, run_with_fallback
    from UNetSegmentLib.engine.heatmaps import gradcam
    from UNetSegmentLib.engine.inference import sliding_window
    from UNetSegmentLib.models.networks import build_network

    meta = json.loads((d / "model.json").read_text())
    vol = np.load(d / "volume.npz")["volume"]
    ref = np.load(d / "reference.npz")["foreground"]
    arch = meta["architecture"]
    net = build_network(arch["name"], **arch["kwargs"])
    net.load_state_dict(load_file(str(d / meta["weights"]["file"])))
    dev = torch.device(device)
    half = "fp16" if dev.type == "cuda" else "fp32"  # a CPU dry run checks the script, not the GPU
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "none (CPU dry run)"
    print(f"GPU {name}, torch {torch.__version__}, volume {vol.shape}, model {meta['name']} {meta['version']}")
    plain_net = net.to(dev).eval()
    dims = 3 if meta["dimensions"] == "3d" else 2
    fast_net = prepare_network(plain_net, dims, dev)
    kw = _engine_kw(meta)
    thr = float(meta["threshold"])

    def timed(fn, n=3):
        fn()
        sync()
        best, out = float("inf"), None
        for _ in range(n):
            t = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best, out

    def dice(a, b):
        s = a.sum() + b.sum()
        return 1.0 if s == 0 else float(2 * (a & b).sum() / s)

    variants = {
        "plain fp32": lambda: sliding_window(vol, plain_net, meta["patch_size"], **kw, device=dev, precision="fp32")[0],
        "plain fp16": lambda: sliding_window(vol, plain_net, meta["patch_size"], **kw, device=dev, precision=half)[0],
        "fast fp16": lambda: sliding_window(vol, fast_net, meta["patch_size"], **kw, device=dev, precision=half,
                                            crop_to_content=True, fit_window=True, channels_last=True)[0],
        "fast fp16 batch 32": lambda: sliding_window(vol, fast_net, meta["patch_size"], **{**kw, "batch_size": 32}, device=dev,
                                                     precision=half, crop_to_content=True, fit_window=True, channels_last=True)[0],
    }
    results = {}
    for name, fn in variants.items():
        t, p = timed(fn)
        results[name] = p
        print(f"{name:>20}: {t:6.3f} s   max |Δp| vs CPU fp32 {np.abs(p[1:].sum(0) - ref).max():.2e}   "
              f"label Dice vs CPU {dice(p[1:].sum(0) >= thr, ref >= thr):.5f}")
    target = results["fast fp16"][1:].sum(0) >= thr
    t, cam = timed(lambda: gradcam(vol, fast_net, meta["patch_size"], target, layer=arch.get("cam_layer", "decoder.0"),
                                   spatial_dims=kw["spatial_dims"], context=kw["context"], overlap=kw["overlap"],
                                   batch_size=kw["batch_size"], device=dev, crop_to_content=True, fit_window=True,
                                   channels_last=True), n=2)
    print(f"{'Grad-CAM (fast)':>20}: {t:6.3f} s   peak {cam.max():.2f}, on {int(target.sum())} lesion voxels")

    if dev.type != "cuda":
        return
    # out-of-memory fallback, for real: cap this process's GPU memory, then ask for more than fits
    total = torch.cuda.get_device_properties(0).total_memory

    def attempt(a: Attempt):
        n = fast_net if a.device.type == "cuda" else prepare_network(net.cpu(), dims, a.device)
        return sliding_window(vol, n, meta["patch_size"], **{**kw, "batch_size": a.batch_size}, device=a.device,
                              precision=a.precision, crop_to_content=True, fit_window=a.fit_window, channels_last=True)[0]

    for cap_mib, batch, fit in ((256, 128, False), (4, 8, True)):
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap_mib * 2**20 / total)
        warnings: list[str] = []
        t0 = time.perf_counter()
        p, used = run_with_fallback(attempt, Attempt(dev, "fp16", batch, fit), lambda: "fp32", warnings)
        print(f"OOM fallback (GPU capped at {cap_mib} MiB, batch {batch}, {'fitted' if fit else 'patch'} windows): ran on "
              f"{used.device} at batch {used.batch_size} in {time.perf_counter() - t0:.2f} s; "
              f"label Dice vs CPU {dice(p[1:].sum(0) >= thr, ref >= thr):.5f}")
        for w in warnings:
            print("  warning:", w)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prepare", type=Path)
    g.add_argument("--run", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of the script")
    a = ap.parse_args()
    if a.prepare:
        prepare(a.prepare, a.model)
    else:
        run(a.run, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
