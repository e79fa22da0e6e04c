"""Weight-space interpolation between a bundle and a fine-tuned copy of it (WiSE-FT).

Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models") show that the straight line between
a network's weights and the weights of its fine-tuned copy often holds points that keep most of what
the fine-tuning gained while keeping the original's behaviour elsewhere; here that is the faint
bleeds a fine-tune learns against the false lesions it makes. Both ends must share the architecture
and have been trained from the same weights (a fine-tune of ``start``), so that their parameters live
in one basin; the interpolated network costs nothing at inference.

``weights = (1 - alpha) * start + alpha * end`` for every floating-point tensor, BatchNorm running
statistics included; integer counters (``num_batches_tracked``) are taken from ``end``. The written
bundle is ``end``'s model.json with the new version, the new weights' digest, the interpolation
recorded under ``training.interpolation``, and no ``calibration``: a temperature fitted to either
end does not hold for the mix and must be fitted again (``calibrate``).

``python -m UNetSegmentLib.models.training.interpolate --start DIR --end DIR --alpha 0.5 --version 1.2.8 --output-dir DIR``
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import ModelError, UsageError
from ...io.writers import write_text
from ..bundle import Bundle, load_bundle, load_weights, save_weights, sha256_file, validate_meta


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float in [0, 1]; anything else refused, naming the value."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise UsageError(f"--alpha {alpha!r} is not a number from 0 to 1",
                         "give the share of the fine-tuned weights, e.g. --alpha 0.5 (0: start's weights, 1: end's)")
    return float(alpha)


def interpolate_states(start: Mapping[str, Any], end: Mapping[str, Any], alpha: float) -> dict:
    """``(1 - alpha) * start + alpha * end`` for float tensors; other tensors from ``end``.

    The two state dicts must hold the same names with the same shapes.
    """
    alpha = check_alpha(alpha)
    if set(start) != set(end):
        only = sorted(set(start) ^ set(end))
        raise ModelError(f"the two networks' weights differ in their tensors ({', '.join(only[:4])}"
                         f"{'…' if len(only) > 4 else ''})", "interpolate a bundle with a fine-tuned copy of itself")
    out = {}
    for name, b in end.items():
        a = start[name]
        if tuple(a.shape) != tuple(b.shape):
            raise ModelError(f"weight {name} has shape {tuple(a.shape)} in start and {tuple(b.shape)} in end",
                             "interpolate a bundle with a fine-tuned copy of itself")
        out[name] = (a.double() * (1 - alpha) + b.double() * alpha).to(b.dtype) if b.is_floating_point() else b.clone()
    return out


def _same_network(start: Bundle, end: Bundle) -> None:
    for key in ("architecture", "inputs", "labels", "dimensions", "context_slices", "target_spacing"):
        a, b = copy.deepcopy(start.meta.get(key)), copy.deepcopy(end.meta.get(key))
        if key == "architecture":  # the Grad-CAM layer and the parameter count may be recorded on one side only
            for d in (a, b):
                d.pop("cam_layer", None)
                d.pop("parameters", None)
        if a != b:
            raise ModelError(f"the two bundles differ in {key}",
                             "interpolate a bundle with a fine-tuned copy of itself (train.init_from)")


def interpolate_bundle(start_dir: Path, end_dir: Path, alpha: float, output_dir: Path, version: str) -> dict:
    """Write the interpolated bundle into ``output_dir`` (new or empty); its model.json."""
    alpha = check_alpha(alpha)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UsageError(f"{output_dir} already holds files", "give a new or empty --output-dir")
    start, end = load_bundle(start_dir), load_bundle(end_dir)
    _same_network(start, end)
    init = end.meta.get("training", {}).get("init_from", {})
    start_sha = start.meta["weights"]["sha256"]
    if init.get("sha256") not in (None, start_sha):
        raise ModelError(f"{end.name} {end.version} was fine-tuned from weights {init['sha256'][:12]}…, not from "
                         f"{start.name} {start.version} ({start_sha[:12]}…)",
                         "give the bundle it was fine-tuned from as --start")
    state = interpolate_states(load_weights(start.weights_path), load_weights(end.weights_path), alpha)
    output_dir.mkdir(parents=True, exist_ok=True)
    wfile = output_dir / "model.safetensors"
    save_weights(state, wfile)
    meta = copy.deepcopy(end.meta)
    meta["version"] = version
    meta.pop("calibration", None)
    meta["weights"] = {"file": wfile.name, "sha256": sha256_file(wfile)}
    meta.setdefault("training", {})["interpolation"] = {
        "method": "WiSE-FT (Wortsman et al. 2022): (1 - alpha) * start + alpha * end",
        "alpha": alpha,
        "start": {"name": start.name, "version": start.version, "sha256": start_sha},
        "end": {"name": end.name, "version": end.version, "sha256": end.meta["weights"]["sha256"]},
    }
    validate_meta(meta, "interpolated model.json")
    write_text(output_dir / "model.json", json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, type=Path, help="the bundle the fine-tune started from (alpha 0)")
    ap.add_argument("--end", required=True, type=Path, help="the fine-tuned bundle (alpha 1)")
    ap.add_argument("--alpha", required=True, type=float, help="share of the fine-tuned weights, 0 to 1")
    ap.add_argument("--version", required=True, help="version of the written bundle, e.g. 1.2.8")
    ap.add_argument("--output-dir", required=True, type=Path, help="new or empty folder for the bundle")
    a = ap.parse_args(argv)
    meta = interpolate_bundle(a.start, a.end, a.alpha, a.output_dir, a.version)
    print(f"{meta['name']} {meta['version']}: alpha {a.alpha} between {a.start} and {a.end} -> {a.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
