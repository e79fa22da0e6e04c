"""``segment()``: the one place that knows the order of the stages.

resolve the settings (:func:`.settings.resolve`) → check the inputs → align channels → network grid
(:mod:`.grid`) → normalise (:mod:`.preprocess`) → plan the windows once (:mod:`.windows`) → sliding
window (:mod:`.inference`), and Grad-CAM on the same plan (:mod:`.heatmaps`; with the fast engine's
fitted windows in the same pass, :func:`.heatmaps.predict_and_explain`) → maps back on the input
grid → labels (:mod:`.labels`). Pure with respect to its inputs: arrays are never modified in
place, nothing is written to disk (see :mod:`..serving.job` for that).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, UnusualInputError
from ..image import Image
from ..models.bundle import Bundle
from ..params import SegmentParams
from ..settings import RunSettings, on_hardware, resolve
from .acceleration import prepare_network
from .checks import check_for_model, check_memory, check_volume
from .device import cpu_fallback_precision
from .domain import DomainVerdict, check_domain
from .fallback import Attempt, LighterOnGpuOom, run_with_fallback
from .grid import PROBABILITY_FLOOR, GridMapping
from .heatmaps import cam_layer_name, entropy_map, explains_in_one_pass, gradcam, predict_and_explain
from .inference import (CancelToken, ProgressFn, outside_answer, sliding_window, softmax_predictor, tta_flips,
                        with_mirror_tta)
from .labels import foreground_probability, labels_from_probabilities
from .preprocess import prepare_inputs
from .windows import WindowPlan, plan_windows


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
    settings: RunSettings | None = None  # what the run used (None for a result read back from files)


def segment(
    inputs: list[Image],
    bundle: Bundle,
    params: SegmentParams | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    network=None,
    settings: RunSettings | None = None,
) -> SegmentResult:
    """Run ``bundle`` on ``inputs`` (one :class:`Image` per model channel, in the bundle's order).

    ``params``: what the user set (resolved here with :func:`.settings.resolve`), or ``settings``
    already resolved; ``progress(stage, fraction, message)`` and ``cancel`` as in
    :func:`.inference.sliding_window`; ``network``: a built network to reuse (else the bundle's)."""
    s = on_hardware(settings) if settings is not None else resolve(params, bundle)
    cancel = cancel or CancelToken()
    report = progress or (lambda stage, frac, msg="": None)
    timings: dict[str, float] = {}
    warnings: list[str] = []
    t = time.perf_counter()
    report("preprocess", 0.0, "")
    _check_inputs(inputs, bundle, s.model.out_channels, warnings)  # first: broken geometry, memory
    # the network's input is made while the domain check looks at the image (both mostly in numpy and
    # ITK, which release the GIL: two cores, one wait); a refusal still comes before any inference. A
    # refused input waits for its preparation to end (a thread is not stopped midway): a fraction of a
    # second on a head CT, and its memory is within what _check_inputs has already allowed for the run
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="unetsegment-prepare") as pool:
        prepared = pool.submit(prepare_inputs, inputs, s.model)
        domain = _check_domain(inputs, bundle, s.allow_unusual_input, warnings)
        volume, mapping, aligned = prepared.result()
    timings["preprocess_s"] = time.perf_counter() - t
    cancel.check()

    t = time.perf_counter()
    runner = _NetworkRunner(network if network is not None else bundle.build_network(), s)
    timings["load_model_s"] = time.perf_counter() - t
    cam_layer = cam_layer_name(runner.network, bundle.meta, s.gradcam_layer) if "gradcam" in s.heatmaps else None
    plan = plan_for(volume, s, runner.network)
    heat_net: dict[str, np.ndarray] = {}

    def explained(probs: np.ndarray) -> np.ndarray:
        return _explained_channels(probs, s.threshold, s.model.lesion_channels)

    def infer(a: Attempt) -> np.ndarray:
        t0 = time.perf_counter()
        out = sliding_window(volume, runner.predictor(a), _plan_for(plan, a), batch_size=a.batch_size, device=a.device,
                             progress=report, cancel=cancel)
        timings["inference_s"] = time.perf_counter() - t0
        return out

    def infer_and_explain(a: Attempt) -> np.ndarray:
        """Inference with Grad-CAM in the same pass where the plan allows it (:func:`.heatmaps.explains_in_one_pass`)."""
        ran = _plan_for(plan, a)
        if cam_layer is None or not explains_in_one_pass(ran, s.cam_method, s.tta):
            return infer(a)
        t0 = time.perf_counter()
        predictor = runner.predictor(a)
        out, cam, explain_s = predict_and_explain(
            volume, runner.network_on(a.device), ran, explained, out_channels=predictor.out_channels,
            fill=outside_answer(predictor, ran, a.device),
            layer=cam_layer, method=s.cam_method, temperature=s.model.temperature, batch_size=a.batch_size,
            device=a.device, precision=a.precision, progress=report, cancel=cancel)
        heat_net["gradcam"] = cam
        # gradcam_s: the explanation's own work (its targets and backward passes); the forward pass is inference's
        timings["inference_s"], timings["gradcam_s"] = time.perf_counter() - t0 - explain_s, explain_s
        report("gradcam", 1.0, "explained in the inference pass")
        return out

    first = Attempt(s.device, s.precision, s.batch_size, plan.fitted_windows())
    fallback_precision = lambda: cpu_fallback_precision(s.precision)  # noqa: E731
    run = LighterOnGpuOom(infer_and_explain, infer, warnings, "GPU out of memory with Grad-CAM in the inference pass: "
                          "inference and Grad-CAM ran one after the other")
    out, used = run_with_fallback(run, first, fallback_precision, warnings, runner.release)
    probs, tta_var = (out[:-1], out[-1]) if s.tta else (out, None)
    cancel.check()
    if "gradcam" in s.heatmaps and "gradcam" not in heat_net:
        def explain(a: Attempt) -> np.ndarray:
            t0 = time.perf_counter()
            cam = gradcam(volume, runner.network_on(a.device), _plan_for(plan, a), explained(probs),
                          layer=cam_layer, method=s.cam_method, batch_size=a.batch_size, device=a.device,
                          precision=a.precision, progress=report, cancel=cancel)
            timings["gradcam_s"] = time.perf_counter() - t0
            return cam

        heat_net["gradcam"], _ = run_with_fallback(explain, used, fallback_precision, warnings, runner.release)
    if "uncertainty" in s.heatmaps:
        # with TTA: 4·variance of the foreground probability across passes (0–1); else normalised entropy
        heat_net["uncertainty"] = np.clip(4.0 * tta_var, 0, 1) if tta_var is not None else entropy_map(probs)
    del volume

    t = time.perf_counter()
    report("postprocess", 0.0, "")
    result = _on_input_grid(probs, heat_net, mapping, bundle, s)
    timings["postprocess_s"] = time.perf_counter() - t
    result.inputs, result.device, result.precision = aligned, str(used.device), used.precision
    result.timings, result.warnings = timings, warnings
    result.extra.update({"batch_size": used.batch_size, "network_grid_shape_kji": list(mapping.network.shape_kji),
                         "input_domain": {"verdict": domain.verdict, "seen": domain.seen, "measures": domain.measures}})
    if domain.verdict == "refuse":  # run anyway at the user's request: every output says so
        result.extra["unusual_input"] = domain.seen
    if "gradcam" in result.heatmaps:
        result.extra.update({"gradcam_layer": "input" if s.cam_method == "gradinput" else cam_layer,
                             "cam_method": s.cam_method})
    if "uncertainty" in result.heatmaps:
        result.extra["uncertainty_kind"] = ("tta_variance (4·variance of P(lesion) across mirror passes, 0–1)" if tta_var is not None
                                            else "predictive_entropy (of the blended class probabilities, normalised by log(classes), 0–1)")
    report("done", 1.0, "")
    return result


def plan_for(volume: np.ndarray, settings: RunSettings, network) -> WindowPlan:
    """The run's window plan on ``volume`` (network grid), for ``network``'s pooling factor."""
    m = settings.model
    return plan_windows(volume, spatial_dims=m.spatial_dims, patch=m.patch, context=m.context, overlap=settings.overlap,
                        fast=settings.fast, size_divisor=int(getattr(network, "size_divisor", 16)))


def _check_inputs(inputs: list[Image], bundle: Bundle, out_channels: int, warnings: list[str]) -> None:
    """Refuse inputs the model cannot take; one line per warning about those it can."""
    names = bundle.channel_names
    if len(inputs) != len(names):
        raise InputError(
            f"model {bundle.name} expects {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}",
            "give one volume per channel, e.g. " + " ".join(f"{n}=PATH" for n in names),
        )
    for img, n, spec in zip(inputs, names, bundle.meta["inputs"]):
        warnings += check_volume(img, n)
        warnings += check_for_model(img, n, spec, bundle.dimensions, bundle.meta.get("anatomy"),
                                    domain_checked=bool(bundle.meta.get("domain")))
    check_memory(int(np.prod(inputs[0].array.shape)) * len(inputs), out_channels)


def _check_domain(inputs: list[Image], bundle: Bundle, allow: bool, warnings: list[str]) -> DomainVerdict:
    """The model family's input-domain check (:mod:`.domain`): refuse, or with ``allow`` warn and go on."""
    verdict = check_domain(inputs, bundle.channel_names, bundle.meta)
    if verdict.verdict == "refuse":
        if not allow:
            raise UnusualInputError(verdict.seen, verdict.fix)
        warnings.append(f"UNUSUAL INPUT, run anyway as asked: {verdict.seen}; these results are not findings")
    elif verdict.verdict == "warn":
        warnings.append(verdict.seen)
    return verdict


def _plan_for(plan: WindowPlan, attempt: Attempt) -> WindowPlan:
    """The plan an attempt runs: after a GPU ran out of memory with fitted windows, the training-size ones."""
    return plan if attempt.fit_window else plan.without_fitted_windows()


class _NetworkRunner:
    """The network on each device a run tries (weights stay fp32; autocast runs fp16/bf16 where chosen).
    The fast engine runs a folded, channels-last copy made there (same layer names, so Grad-CAM hooks it too)."""

    def __init__(self, network, settings: RunSettings):
        self.network, self.settings = network, settings
        self._on: dict[str, Any] = {}

    def network_on(self, device: str):
        import torch

        if device == "cpu":  # the cores really available (affinity, container quota, OMP_NUM_THREADS), or as asked
            torch.set_num_threads(int(self.settings.threads))
        if device not in self._on:
            dims = self.settings.model.spatial_dims
            self._on[device] = (prepare_network(self.network, dims, device) if self.settings.fast
                                else self.network.to(device).eval())
        return self._on[device]

    def predictor(self, attempt: Attempt):
        """Softmax of the network on the attempt's device and precision; with TTA, mirrored and averaged."""
        s = self.settings
        p = softmax_predictor(self.network_on(attempt.device), s.model.out_channels, attempt.precision,
                              s.model.temperature)
        return (with_mirror_tta(p, tta_flips(s.model.spatial_dims, s.model.tta_axes), s.model.lesion_channels)
                if s.tta else p)

    def release(self, gpu: str) -> None:
        """Before a CPU fallback: nothing of this run stays on the GPU."""
        self._on.pop(gpu, None)
        if not self.settings.fast:
            self.network.to("cpu")


def _explained_channels(probs: np.ndarray, threshold: float, lesion_channels: tuple[int, ...] | None = None) -> np.ndarray:
    """Per voxel of the network grid, the output channel Grad-CAM explains: that of the voxel's lesion
    label by the threshold rule (:func:`.labels.labels_from_probabilities`), 0 where it is background
    or context that is not a lesion (oedema: the maps explain the findings)."""
    out = labels_from_probabilities({c: probs[c] for c in range(1, probs.shape[0])}, threshold,
                                    lesion_values=lesion_channels)
    if lesion_channels is not None:
        out[~np.isin(out, np.asarray(lesion_channels, np.uint8))] = 0
    return out


def _on_input_grid(probs: np.ndarray, heat_net: dict[str, np.ndarray], mapping: GridMapping, bundle: Bundle,
                   s: RunSettings) -> SegmentResult:
    """Class probabilities and heatmaps brought back to the input grid, and the labels there."""
    floor = PROBABILITY_FLOOR if s.threshold > 2 * PROBABILITY_FLOOR else 0.0
    class_probs = {lab["value"]: mapping.to_input(probs[idx], floor=floor) for idx, lab in enumerate(bundle.labels, start=1)}
    arrays = {v: im.array for v, im in class_probs.items()}
    fg = foreground_probability(arrays, s.model.lesion_values)
    labels = labels_from_probabilities(arrays, s.threshold, fg, s.model.lesion_values)
    ref = mapping.reference
    return SegmentResult(
        labels=Image(labels, ref.ijk_to_ras),
        probability=Image(fg, ref.ijk_to_ras),
        class_probabilities=class_probs,
        heatmaps={k: mapping.to_input(v) for k, v in heat_net.items()},
        inputs=[], device="", precision="",
        extra={"threshold": s.threshold, "overlap": s.overlap, "engine": s.engine},
        settings=s,
    )
