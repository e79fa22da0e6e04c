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
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from UNetSegmentLib.settings import RunSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))



def lesion(p: np.ndarray, threshold: float) -> np.ndarray:
    """Lesion voxels by the engine's threshold rule, from class probabilities [C, ...] or a P(not background) map."""
    from UNetSegmentLib.engine.labels import labels_from_probabilities

    maps = {c: p[c] for c in range(1, p.shape[0])} if p.ndim == 4 else {1: p}
    return labels_from_probabilities(maps, threshold) > 0

def prepare(out: Path, model: str | None) -> None:
    from UNetSegmentLib.demo import demo_case
    from UNetSegmentLib.engine.acceleration import prepare_network
    from UNetSegmentLib.engine.preprocess import prepare_inputs
    from UNetSegmentLib.io.readers import read_image
    from UNetSegmentLib.models.bundle import default_model_name, load_bundle

    b = load_bundle(model or default_model_name())
    s = _settings(b.meta, "cpu", "fp32", "fast")
    vol = prepare_inputs([read_image(demo_case()[0])], s.model).volume
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "volume.npz", volume=vol)
    probs = _infer(vol, prepare_network(b.build_network().eval(), s.model.spatial_dims, "cpu"), s)
    np.savez_compressed(out / "reference.npz", foreground=probs[1:].sum(0).astype(np.float32))
    shutil.copy(b.root / "model.json", out / "model.json")
    shutil.copy(b.root / b.meta["weights"]["file"], out / b.meta["weights"]["file"])
    print(f"prepared {out}: volume {vol.shape}, model {b.name} {b.version}")


def _settings(meta: dict, device: str, precision: str, engine: str) -> "RunSettings":
    """The run settings of one variant: the model's defaults (overlap, batch size, …) as a run resolves them."""
    from UNetSegmentLib.params import SegmentParams
    from UNetSegmentLib.settings import resolve

    return resolve(SegmentParams(device=device, precision=precision, engine=engine, tta=False), meta)


def _infer(vol: np.ndarray, network, s: "RunSettings", *, fitted: bool = True, batch_size: int | None = None) -> np.ndarray:
    """Class probabilities [out_channels, K, J, I] of ``network`` (on ``s.device``) on ``vol``, on the plan of ``s``'s
    engine (``fitted=False``: the fast plan's training-size windows, the out-of-memory fallback's second step)."""
    from UNetSegmentLib.engine.inference import sliding_window, softmax_predictor
    from UNetSegmentLib.engine.pipeline import plan_for

    plan = plan_for(vol, s, network)
    return sliding_window(vol, softmax_predictor(network, s.model.out_channels, s.precision),
                          plan if fitted else plan.without_fitted_windows(), batch_size=batch_size or s.batch_size,
                          device=s.device)


def run(d: Path, device: str = "cuda") -> None:
    import torch
    from safetensors.torch import load_file

    from UNetSegmentLib.engine.acceleration import prepare_network
    from UNetSegmentLib.engine.fallback import Attempt, run_with_fallback
    from UNetSegmentLib.engine.heatmaps import cam_layer_name, gradcam
    from UNetSegmentLib.engine.pipeline import plan_for
    from UNetSegmentLib.models.networks import build_network

    meta = json.loads((d / "model.json").read_text())
    vol = np.load(d / "volume.npz")["volume"]
    ref = np.load(d / "reference.npz")["foreground"]
    arch = meta["architecture"]
    net = build_network(arch["name"], **arch["kwargs"])
    net.load_state_dict(load_file(str(d / meta["weights"]["file"])))
    on_gpu = device != "cpu"
    half = "fp16" if on_gpu else "fp32"  # a CPU dry run checks the script, not the GPU
    plain32, plain16, fast16 = (_settings(meta, device, p, e) for p, e in (("fp32", "plain"), (half, "plain"), (half, "fast")))
    dev = plain32.device  # "cuda:0", or "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    name = torch.cuda.get_device_name(dev) if on_gpu else "none (CPU dry run)"
    print(f"GPU {name}, torch {torch.__version__}, volume {vol.shape}, model {meta['name']} {meta['version']}")
    plain_net = net.to(dev).eval()
    dims = plain32.model.spatial_dims
    fast_net = prepare_network(plain_net, dims, dev)
    thr = plain32.threshold

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

    variants = {"plain fp32": lambda: _infer(vol, plain_net, plain32)}
    if half != "fp32":  # (a CPU dry run has no second plain variant)
        variants[f"plain {half}"] = lambda: _infer(vol, plain_net, plain16)
    variants[f"fast {half}"] = lambda: _infer(vol, fast_net, fast16)
    variants[f"fast {half} batch 32"] = lambda: _infer(vol, fast_net, fast16, batch_size=32)
    results = {}
    for label, fn in variants.items():
        t, p = timed(fn)
        results[label] = p
        print(f"{label:>20}: {t:6.3f} s   max |Δp| vs CPU fp32 {np.abs(p[1:].sum(0) - ref).max():.2e}   "
              f"label Dice vs CPU {dice(lesion(p, thr), lesion(ref, thr)):.5f}")
    target = lesion(results[f"fast {half}"], thr)
    layer, plan = cam_layer_name(fast_net, meta), plan_for(vol, fast16, fast_net)  # the windows "fast" ran
    t, cam = timed(lambda: gradcam(vol, fast_net, plan, target, layer=layer, batch_size=fast16.batch_size, device=dev), n=2)
    print(f"{'Grad-CAM (fast)':>20}: {t:6.3f} s   peak {cam.max():.2f}, on {int(target.sum())} lesion voxels")

    if not on_gpu:
        return
    # out-of-memory fallback, for real: cap this process's GPU memory, then ask for more than fits
    total = torch.cuda.get_device_properties(dev).total_memory

    def attempt(a: Attempt):
        n = fast_net if a.device.startswith("cuda") else prepare_network(net.cpu(), dims, a.device)
        return _infer(vol, n, _settings(meta, a.device, a.precision, "fast"), fitted=a.fit_window, batch_size=a.batch_size)

    for cap_mib, batch, fit in ((256, 128, False), (4, 8, True)):
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap_mib * 2**20 / total)
        warnings: list[str] = []
        t0 = time.perf_counter()
        p, used = run_with_fallback(attempt, Attempt(dev, "fp16", batch, fit), lambda: "fp32", warnings)
        print(f"OOM fallback (GPU capped at {cap_mib} MiB, batch {batch}, {'fitted' if fit else 'patch'} windows): ran on "
              f"{used.device} at batch {used.batch_size} in {time.perf_counter() - t0:.2f} s; "
              f"label Dice vs CPU {dice(lesion(p, thr), lesion(ref, thr)):.5f}")
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
