"""Weight-space interpolation between a bundle and a fine-tuned copy of it (WiSE-FT).

Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models") show that the straight line between
a network's weights and the weights of its fine-tuned copy often holds points that keep most of what
the fine-tuning gained while keeping the original's behaviour elsewhere; here that is the faint
bleeds a fine-tune learns against the false lesions it makes. Both ends must share the architecture
and have been trained from the same weights (a fine-tune of ``start``), so that their parameters live
in one basin; the interpolated network costs nothing at inference.

``weights = (1 - alpha) * start + alpha * end`` for every floating-point tensor, BatchNorm running
statistics included; integer counters (``num_batches_tracked``) are taken from ``end``. The written
bundle is ``end``'s model.json with the new version, the new weights' digest, ``training`` replaced
by ``training.interpolation`` (both ends, with the fine-tune's own record under ``end``: the mix was
not trained), and no ``calibration``: a temperature fitted to either
end does not hold for the mix and must be fitted again (``calibrate``).

``python -m UNetSegmentLib.models.training.interpolate --start DIR --end DIR --alpha 0.5 --version 1.2.8 --output-dir DIR``
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import ModelError, UNetSegmentError, UsageError
from ..bundle import Bundle, load_bundle, load_weights, validate_meta, write_bundle_files
from .trainer import real_number


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float in [0, 1]; anything else refused, naming the value."""
    if not real_number(alpha) or not 0 <= alpha <= 1:
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
        if tuple(a.shape) != tuple(b.shape) or a.is_floating_point() != b.is_floating_point():
            raise ModelError(f"weight {name} is {a.dtype} {tuple(a.shape)} in start and {b.dtype} {tuple(b.shape)} in end",
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
    """Write the interpolated bundle into ``output_dir`` (new or empty); its model.json.

    The bundle is assembled in a sibling folder and moved into place only when complete, so a refused
    or interrupted run leaves ``output_dir`` as it was."""
    alpha = check_alpha(alpha)
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UsageError(f"{output_dir} already exists and is not an empty folder", "give a new or empty --output-dir")
    start, end = load_bundle(start_dir), load_bundle(end_dir)
    _same_network(start, end)
    end_training = end.meta.get("training") or {}
    init_sha = (end_training.get("init_from") or {}).get("sha256")
    start_sha = start.meta["weights"]["sha256"]
    if init_sha != start_sha:
        said = f"weights {init_sha[:12]}…" if init_sha else "no recorded weights (model.json training.init_from)"
        raise ModelError(f"{end.name} {end.version} was fine-tuned from {said}, not from "
                         f"{start.name} {start.version} ({start_sha[:12]}…)",
                         "give as --end a bundle trained with train.init_from = --start's weights")
    state = interpolate_states(load_weights(start.weights_path), load_weights(end.weights_path), alpha)
    meta = copy.deepcopy(end.meta)
    meta["version"] = version
    meta.pop("calibration", None)
    # the mix was not trained: the fine-tune's record (steps, history, best Dice) is kept as the end's
    meta["training"] = {"interpolation": {
        "method": "WiSE-FT (Wortsman et al. 2022): (1 - alpha) * start + alpha * end",
        "alpha": alpha,
        "start": {"name": start.name, "version": start.version, "sha256": start_sha},
        "end": {"name": end.name, "version": end.version, "sha256": end.meta["weights"]["sha256"], "training": end_training},
    }}
    meta["weights"] = {"file": "model.safetensors", "sha256": "0" * 64}
    validate_meta(meta, "interpolated model.json")  # a bad --version refused before anything is written
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = output_dir.parent / f".{output_dir.name}.{uuid.uuid4().hex[:12]}"
    work.mkdir()  # a plain mkdir: the folder gets the mode the umask gives (mkdtemp's would be 0700)
    try:
        meta = write_bundle_files(work, state, meta, "interpolated model.json")
        if output_dir.exists():
            output_dir.rmdir()  # empty (checked above)
        os.replace(work, output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, type=Path, help="the bundle the fine-tune started from (alpha 0)")
    ap.add_argument("--end", required=True, type=Path, help="the fine-tuned bundle (alpha 1)")
    ap.add_argument("--alpha", required=True, type=float, help="share of the fine-tuned weights, 0 to 1")
    ap.add_argument("--version", required=True, help="version of the written bundle, e.g. 1.2.8")
    ap.add_argument("--output-dir", required=True, type=Path, help="new or empty folder for the bundle")
    a = ap.parse_args(argv)
    try:
        meta = interpolate_bundle(a.start, a.end, a.alpha, a.output_dir, a.version)
    except UNetSegmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{meta['name']} {meta['version']}: alpha {a.alpha} between {a.start} and {a.end} -> {a.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
