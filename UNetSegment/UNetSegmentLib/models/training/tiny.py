"""The ``tiny-blob`` model: a 2D U-Net (base 8) trained for a few minutes to find bright blobs in a head.

It exists so that tests, the Slicer self-test and the demo never depend on the default model's
quality. Training data are 2D axial phantoms made on the fly: an elliptical head (skull ring
≈ 700–1500 HU, brain 20–45 HU, darker CSF spots), air outside, 0–3 hyperdense blobs (50–90 HU)
inside the brain, Gaussian noise and slight blur.

Run: ``python -m UNetSegmentLib.models.training.tiny --output-dir Resources/Models/tiny-blob``
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from ...engine.preprocess import normalize
from ..bundle import save_weights, sha256_file
from ..networks import build_network, count_parameters

SPACING_MM = 1.5
PATCH = 160
NORMALIZATION = {"type": "ct", "clip": [-20.0, 120.0], "mean": 40.0, "std": 40.0}
ARCH = {"name": "unet", "kwargs": {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "base_channels": 8,
                                   "depth": 4, "norm": "batch", "upsample": "transpose"}}


def phantom_slice(rng: np.random.Generator, size: int = PATCH) -> tuple[np.ndarray, np.ndarray]:
    """One 2D slice (HU, float32) and its blob mask at ``SPACING_MM``."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = size / 2 + rng.normal(0, 8, 2)
    ay, ax = rng.uniform(45, 75), rng.uniform(38, 62)  # head semi-axes in pixels
    th = rng.uniform(-0.4, 0.4)
    u = ((yy - cy) * np.cos(th) + (xx - cx) * np.sin(th)) / ay
    v = (-(yy - cy) * np.sin(th) + (xx - cx) * np.cos(th)) / ax
    r = np.sqrt(u * u + v * v)
    skull = rng.uniform(3, 6) / min(ay, ax)
    img = np.full((size, size), -1000.0, np.float32)
    img[r < 1.0 + skull * 0.6] = 40.0  # scalp
    img[r < 1.0] = rng.uniform(700, 1500)
    brain = r < 1.0 - skull
    img[brain] = rng.uniform(20, 45)
    for _ in range(rng.integers(0, 4)):  # CSF / ventricles: darker spots
        m = _ellipse(yy, xx, rng, cy, cx, ay * 0.4, ax * 0.4, 3, 10) & brain
        img[m] = rng.uniform(0, 15)
    mask = np.zeros((size, size), bool)
    n_blobs = rng.choice([0, 1, 1, 2, 3])
    for _ in range(n_blobs):
        m = _ellipse(yy, xx, rng, cy, cx, ay * 0.6, ax * 0.6, 2, 14) & ndimage.binary_erosion(brain, iterations=2)
        img[m] = rng.uniform(50, 90)
        mask |= m
    img = ndimage.gaussian_filter(img, rng.uniform(0.3, 1.0))
    img += rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    return img.astype(np.float32), mask


def _ellipse(yy, xx, rng, cy, cx, sy, sx, rmin, rmax) -> np.ndarray:
    py, px = cy + rng.uniform(-sy, sy), cx + rng.uniform(-sx, sx)
    ry, rx = rng.uniform(rmin, rmax, 2)
    return ((yy - py) / ry) ** 2 + ((xx - px) / rx) ** 2 < 1.0


def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(phantom_slice(rng) for _ in range(n)))
    x = np.stack([normalize(a, NORMALIZATION) for a in xs])[:, None]
    return x, np.stack(ys).astype(np.int64)


def train(output_dir: Path, steps: int = 500, seed: int = 0, batch_size: int = 12) -> dict:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_network(ARCH["name"], **ARCH["kwargs"])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.time()
    net.train()
    for step in range(steps):
        x, y = batch(rng, batch_size)
        logits = net(torch.from_numpy(x))
        yt = torch.from_numpy(y)
        p = torch.softmax(logits, 1)[:, 1]
        inter = (p * yt).sum()
        dice = 1 - (2 * inter + 1) / (p.sum() + yt.sum() + 1)
        loss = torch.nn.functional.cross_entropy(logits, yt) + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} dice-loss {dice.item():.3f} {time.time() - t0:.0f}s", flush=True)
    net.eval()
    val_rng = np.random.default_rng(10_000 + seed)  # validation phantoms: another seed
    x, y = batch(val_rng, 48)
    with torch.no_grad():
        pred = torch.softmax(net(torch.from_numpy(x)), 1)[:, 1].numpy() >= 0.5
    dice = float(2 * (pred & (y > 0)).sum() / max(1, pred.sum() + (y > 0).sum()))
    output_dir.mkdir(parents=True, exist_ok=True)
    wfile = output_dir / "model.safetensors"
    save_weights(net.state_dict(), wfile)
    meta = {
        "schema_version": 1,
        "name": "tiny-blob",
        "version": "1.0.0",
        "title": "Tiny bright-blob finder (test model)",
        "description": "2D U-Net (base 8) trained for a few minutes on synthetic head phantoms to find hyperdense "
                       "blobs (50-90 HU) inside the brain. For tests, the Slicer self-test and the demo only; not a clinical model.",
        "architecture": {**ARCH, "parameters": count_parameters(net), "cam_layer": "decoder.0"},
        "dimensions": "2d",
        "slice_plane": "axial",
        "inputs": [{"name": "CT", "modality": "CT", "normalization": NORMALIZATION, "expected_range": [-1100, 3100]}],
        "target_spacing": [SPACING_MM, SPACING_MM, SPACING_MM],
        "patch_size": [PATCH, PATCH],
        "labels": [{"value": 1, "name": "blob", "color": [0.9, 0.2, 0.2],
                    "code": {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"},
                    "terminology": "Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically Altered Structure~SCT^52988006^Lesion~^^~Anatomic codes - DICOM master list~^^~^^"}],
        "threshold": 0.5,
        "inference": {"overlap": 0.25, "batch_size": 8, "tta": False, "min_lesion_ml": 0.0},
        "anatomy": {"name": "head", "extent_mm": [90, 330]},
        "display": {"window": [0, 80]},
        "weights": {"file": wfile.name, "sha256": sha256_file(wfile)},
        "training": {"data": "on-the-fly 2D head phantoms (UNetSegmentLib.models.training.tiny)", "steps": steps,
                     "batch_size": batch_size, "seed": seed, "minutes_cpu": round((time.time() - t0) / 60, 1)},
        "metrics": {"validation_dice_phantoms": round(dice, 4), "validation_cases": "48 phantom slices, seed 10000+seed"},
        "license": "Apache-2.0",
        "intended_use": "Software testing only. Research use only, not for diagnosis.",
    }
    (output_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"validation Dice on phantoms: {dice:.3f}; wrote {output_dir}")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    train(a.output_dir, a.steps, a.seed)


if __name__ == "__main__":
    main()
