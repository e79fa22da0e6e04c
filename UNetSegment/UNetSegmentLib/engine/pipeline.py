"""``segment()``: the one place that knows the order of the stages.

read (caller) → align channels → canonical axes → network grid → normalise → sliding window →
probabilities back on the input grid → labels. Pure with respect to its inputs: arrays are never
modified in place, nothing is written to disk (see :mod:`outputs` for that).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .acceleration import default_threads, prepare_network
from ..models.bundle import Bundle
from .checks import check_for_model, check_memory, check_volume
from ..errors import InputError, UsageError
from .fallback import Attempt, run_with_fallback
from ..image import Image, resample
from .heatmaps import cam_layer_name, entropy_map, gradcam
from .inference import CancelToken, ProgressFn, resolve_device, resolve_precision, sliding_window
from ..params import ENGINES, SegmentParams
from .preprocess import align_inputs, canonical_grid, network_grid, to_network_input


@dataclass
class SegmentResult:
    labels: Image  # uint8 label values of the bundle, input grid
    probability: Image  # float32 foreground probability (1 − background), input grid
    class_probabilities: dict[int, Image]  # label value -> float32 probability, input grid
    heatmaps: dict[str, Image]  # "gradcam" / "uncertainty" -> float32 0–1, input grid
    inputs: list[Image]  # the (aligned) original inputs, for intensity statistics
    device: str
    precision: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def segment(
    inputs: list[Image],
    bundle: Bundle,
    params: SegmentParams | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    network=None,
) -> SegmentResult:
    """Run ``bundle`` on ``inputs`` (one :class:`Image` per model channel, in the bundle's order)."""
    params = params or SegmentParams()
    if params.engine not in ENGINES:
        raise UsageError(f"unknown engine {params.engine!r}", f"use one of {', '.join(ENGINES)}")
    cancel = cancel or CancelToken()
    report = progress or (lambda stage, frac, msg="": None)
    names = bundle.channel_names
    if len(inputs) != len(names):
        raise InputError(
            f"model {bundle.name} expects {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}",
            "give one volume per channel, e.g. " + " ".join(f"{n}=PATH" for n in names),
        )
    timings: dict[str, float] = {}
    warnings: list[str] = []
    t = time.perf_counter()

    import torch

    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device)

    report("preprocess", 0.0, "")
    for img, n, spec in zip(inputs, names, bundle.meta["inputs"]):
        warnings += check_volume(img, n)
        warnings += check_for_model(img, n, spec, bundle.dimensions, bundle.meta.get("anatomy"))
    check_memory(int(np.prod(inputs[0].array.shape)) * len(inputs), 1 + len(bundle.labels))
    aligned = align_inputs(inputs, names)
    ref = aligned[0]
    canon, amap = zip(*(canonical_grid(im) for im in aligned))
    canon = list(canon)
    in_plane = bundle.dimensions != "3d"
    grid = network_grid(canon[0], bundle.meta["target_spacing"], in_plane_only=in_plane)
    net_grid = grid if grid is not None else canon[0]
    volume = np.stack([to_network_input(im, c["normalization"], grid) for im, c in zip(canon, bundle.meta["inputs"])])
    timings["preprocess_s"] = time.perf_counter() - t
    cancel.check()

    t = time.perf_counter()
    if network is None:
        network = bundle.build_network()
    spatial_dims = 3 if bundle.dimensions == "3d" else 2
    fast = params.engine == "fast"
    timings["load_model_s"] = time.perf_counter() - t
    cam_layer = cam_layer_name(network, bundle.meta, params.gradcam_layer) if "gradcam" in params.heatmaps else None
    context = int(bundle.meta.get("context_slices", 0)) if bundle.dimensions == "2.5d" else 0
    overlap = params.overlap if params.overlap is not None else bundle.inference_default("overlap", 0.5)
    batch_size = params.batch_size or bundle.inference_default("batch_size", 4)
    threshold = params.threshold if params.threshold is not None else float(bundle.meta["threshold"])
    nets: dict = {}

    def net_on(dev):
        """The network on ``dev``: weights stay fp32 (autocast runs fp16/bf16 where chosen); the fast engine
        runs a folded, channels-last copy made there (same layer names, so Grad-CAM hooks it too)."""
        if dev.type == "cpu":  # the cores really available (affinity, container quota, OMP_NUM_THREADS), or as asked
            torch.set_num_threads(int(params.threads or default_threads()))
        if str(dev) not in nets:
            nets[str(dev)] = prepare_network(network, spatial_dims, dev) if fast else network.to(dev).eval()
        return nets[str(dev)]

    def release(gpu) -> None:  # before a CPU fallback: nothing of this run stays on the GPU
        nets.pop(str(gpu), None)
        if not fast:
            network.to("cpu")

    def infer(a: Attempt):
        t0 = time.perf_counter()
        out = sliding_window(
            volume, net_on(a.device), bundle.meta["patch_size"], spatial_dims=spatial_dims, context=context,
            out_channels=1 + len(bundle.labels), overlap=overlap, batch_size=a.batch_size, device=a.device,
            precision=a.precision, tta=params.tta, tta_axes=tuple(bundle.inference_default("tta_axes", ["i"])),
            progress=report, cancel=cancel, return_tta_variance=params.tta,
            crop_to_content=fast, fit_window=fast and a.fit_window, channels_last=fast,
        )
        timings["inference_s"] = time.perf_counter() - t0
        return out

    first = Attempt(device, precision, int(batch_size), fast and spatial_dims == 2)

    def cpu_precision() -> str:  # keep what was asked where the CPU has it
        return params.precision if params.precision in ("fp32", "bf16") else resolve_precision("auto", torch.device("cpu"))

    (probs, tta_var), used = run_with_fallback(infer, first, cpu_precision, warnings, release)
    cancel.check()
    heat_net: dict[str, np.ndarray] = {}
    if "gradcam" in params.heatmaps:
        target = _target_classes(probs, threshold)

        def explain(a: Attempt):
            t0 = time.perf_counter()
            out = gradcam(
                volume, net_on(a.device), bundle.meta["patch_size"], target, layer=cam_layer, method=params.cam_method,
                spatial_dims=spatial_dims, context=context, overlap=overlap, batch_size=a.batch_size, device=a.device,
                progress=report, cancel=cancel, crop_to_content=fast, fit_window=fast and a.fit_window, channels_last=fast,
                precision=a.precision,
            )
            timings["gradcam_s"] = time.perf_counter() - t0
            return out

        heat_net["gradcam"], _ = run_with_fallback(explain, used, cpu_precision, warnings, release)
    if "uncertainty" in params.heatmaps:
        # with TTA: 4·variance of the foreground probability across passes (0–1); else normalised entropy
        heat_net["uncertainty"] = np.clip(4.0 * tta_var, 0, 1) if tta_var is not None else entropy_map(probs)
    del volume

    t = time.perf_counter()
    report("postprocess", 0.0, "")
    class_probs = {}
    for idx, lab in enumerate(bundle.labels, start=1):
        class_probs[lab["value"]] = _to_input_grid(probs[idx], net_grid, canon[0], amap[0], ref,
                                                   floor=PROBABILITY_FLOOR if threshold > 2 * PROBABILITY_FLOOR else 0.0)
    if len(class_probs) == 1:  # one label: P(foreground) is that label's map (no second full-size copy)
        fg = next(iter(class_probs.values())).array
    else:
        fg = np.zeros(ref.array.shape, np.float32)
        for p in class_probs.values():
            fg += p.array
        np.clip(fg, 0.0, 1.0, out=fg)
    labels = _labels_from_probabilities(class_probs, fg, threshold)
    timings["postprocess_s"] = time.perf_counter() - t
    extra: dict[str, Any] = {"threshold": threshold, "overlap": overlap, "batch_size": used.batch_size, "engine": params.engine,
                             "network_grid_shape_kji": list(net_grid.array.shape)}
    heatmaps = {k: _to_input_grid(v, net_grid, canon[0], amap[0], ref) for k, v in heat_net.items()}
    if "uncertainty" in heatmaps:
        extra["uncertainty_kind"] = "tta_variance (4·variance of P(lesion) across mirror passes, 0–1)" if tta_var is not None \
            else "predictive_entropy (of the blended class probabilities, normalised by log(classes), 0–1)"
    if "gradcam" in heatmaps:
        extra["gradcam_layer"] = cam_layer
        extra["cam_method"] = params.cam_method
    report("done", 1.0, "")
    return SegmentResult(
        labels=Image(labels, ref.ijk_to_ras),
        probability=Image(fg, ref.ijk_to_ras),
        class_probabilities=class_probs,
        heatmaps=heatmaps,
        inputs=aligned,
        device=str(used.device),
        precision=used.precision,
        timings=timings,
        warnings=warnings,
        extra=extra,
    )


def _target_classes(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Output channel to explain per voxel: the most probable foreground class where P(fg) ≥ threshold, else 0."""
    fg = (1.0 - probs[0]) >= threshold
    if probs.shape[0] == 2:
        return fg.astype(np.uint8)
    return np.where(fg, 1 + np.argmax(probs[1:], axis=0), 0).astype(np.int16)


#: map values below this are reported as 0: far under any threshold and any visible colour, and the
#: stored probability.nrrd of a 512×512×300 CT shrinks from 178 MB of float noise to a few MB
PROBABILITY_FLOOR = 1e-3


def _to_input_grid(arr: np.ndarray, net_grid: Image, canon_ref: Image, amap, ref: Image, floor: float = PROBABILITY_FLOOR) -> Image:
    """Probability on the network grid → canonical input grid (linear) → input axes (exact).

    One full-size float32 array per map at the end (clipped in place), never float64; values below
    ``floor`` become 0."""
    src = arr
    if arr.shape != canon_ref.array.shape or not np.allclose(net_grid.ijk_to_ras, canon_ref.ijk_to_ras, atol=1e-6):
        arr = resample(Image(arr, net_grid.ijk_to_ras), canon_ref.array.shape, canon_ref.ijk_to_ras, order=1, fill=0.0).array
    out = np.ascontiguousarray(amap.invert(arr), dtype=np.float32)
    if np.shares_memory(out, src):
        out = out.copy()
    np.clip(out, 0.0, 1.0, out=out)
    if floor > 0:
        out[out < floor] = 0.0
    return Image(out, ref.ijk_to_ras)


def _labels_from_probabilities(class_probs: dict[int, Image], fg: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground where P(not background) ≥ threshold; among labels, the most probable."""
    values = list(class_probs)
    if len(values) == 1:
        return (fg >= threshold).astype(np.uint8) * np.uint8(values[0])
    stack = np.stack([class_probs[v].array for v in values])
    best = np.asarray(values, np.uint8)[np.argmax(stack, axis=0)]
    return np.where(fg >= threshold, best, 0).astype(np.uint8)
