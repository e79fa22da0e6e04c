"""Why the model decided: Grad-CAM and uncertainty maps, computed on the network grid.

Grad-CAM (class activation maps, Zhou et al. 2016; gradients per Selvaraju et al. 2017), in its
segmentation form (Vinogradova et al. 2020): the score explained is the sum of the lesion class
logit over a *target region* (default: the voxels predicted as lesion); ``g = ∂score/∂A`` is its
gradient at a chosen layer's activations ``A``. Two ways to combine them (``method``):

* ``"hirescam"`` (default; Draelos & Carin 2020): ``ReLU(Σ_c g_c ⊙ A_c)``, element-wise. The map
  shows where the activations that actually raised the score are. It tells lesions apart: aimed at
  one lesion, it stays on that lesion.
* ``"gradcam"`` (Selvaraju's channel weights): ``ReLU(Σ_c mean(g_c) · A_c)``. Averaging the gradient
  over space makes it class- but not instance-discriminative: a channel that detects "bright blob"
  lights up at *every* blob, so aimed at one lesion it also paints the others (measured: at
  ``decoder.0`` of the tiny model, 56 % of its near-lesion mass sat on the non-targeted lesion).
  Kept for comparison with the literature.
* ``"gradinput"`` (gradient × input, Shrikumar et al. 2016): ``ReLU(Σ_c ∂score/∂x_c · x_c)`` at the
  network's *input* voxels (``layer`` is ignored), summed over the input channels (for a 2.5D model
  the neighbouring slices' share lands on the centre slice). ``x`` is the normalised input, whose zero
  is the normalisation's mean (40 HU for the CT models: brain), so this is the first-order share of
  each voxel's departure from brain density in the score — at the input resolution. It needs the
  backward pass through the whole network.

The map is computed window by window on the run's own :class:`.windows.WindowPlan` — the windows
that made the prediction it explains — with the same Gaussian blending as inference, only on windows
that contain target voxels (elsewhere there is nothing to explain); each window's map is up-sampled
to the window and the blended map normalised to 0–1 over the volume. Where each window covers its
region's whole slice (the fast engine's fitted 2D/2.5D windows: nothing overlaps, so a window's
prediction is final), :func:`predict_and_explain` explains in the inference pass itself: the
window's targets come from its own probabilities and the backward pass follows its forward pass,
which saves Grad-CAM's second forward pass (on the sample CT 0.45 → 0.15 s, the same map).

The default layer is a deep decoder stage (``decoder.0``, right after the bottleneck): coarse but
semantic. The last block before the 1×1 output convolution would only reproduce a rescaled logit,
i.e. duplicate the probability map.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np

from ..errors import ModelError
from ..params import FIELD
from .device import autocast_dtype
from .inference import CancelToken, ProgressFn, run_plan
from .windows import Region, WindowPlan


def cam_layer_name(network, bundle_meta: dict | None = None, override: str | None = None) -> str:
    name = override or (bundle_meta or {}).get("architecture", {}).get("cam_layer") or getattr(network, "default_cam_layer", None)
    if not name:
        raise ModelError("this network names no Grad-CAM layer", "set architecture.cam_layer in model.json or pass --gradcam-layer")
    try:
        network.get_submodule(name)
    except AttributeError:
        raise ModelError(f"Grad-CAM layer {name!r} does not exist in the network", "use a module name such as decoder.0") from None
    return name


def gradcam(
    volume: np.ndarray,
    network,
    plan: WindowPlan,
    target_mask: np.ndarray,
    *,
    layer: str,
    method: str = "hirescam",
    batch_size: int = 4,
    device: str = "cpu",
    precision: str = "fp32",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """Grad-CAM [K, J, I] in 0–1 on the grid of ``volume`` [C, K, J, I] for the voxels in ``target_mask``.

    ``plan``: the windows inference ran (:func:`.windows.plan_windows`); only those holding a target
    voxel are run. ``target_mask``: bool (explain output channel 1 there) or an integer map of output
    channels (e.g. each foreground voxel's predicted class): the score is Σ_c Σ_{voxels with value c}
    logit_c. ``layer``: the module whose activations are combined (:func:`cam_layer_name`);
    ``method``: ``hirescam`` or ``gradcam`` (module docstring). ``batch_size``/``device``/``progress``/
    ``cancel``: as :func:`.inference.sliding_window`. ``precision`` bf16/fp16 runs the forward and
    backward passes under autocast (a 0–1 display map needs no fp32 gradients; about twice as fast on
    bf16 CPUs); the map is combined in fp32.
    """
    method = FIELD["cam_method"].check(method)  # the one definition of what is allowed (UsageError)
    target = np.ascontiguousarray(target_mask)
    target = target.astype(np.uint8) if target.dtype == bool else target.astype(np.int16)
    if not target.any():
        return np.zeros(volume.shape[1:], np.float32)
    explain = _window_explainer(network, layer, method, precision, plan.spatial_dims)

    def has_target(region: Region, start) -> bool:
        return bool(_window_masks(target[region.box], [start], region.roi_kji(plan.spatial_dims)).any())

    def fn(x, starts, region: Region):
        masks = _window_masks(target[region.box], starts, region.roi_kji(plan.spatial_dims))
        return explain(x, masks[:, 0] if plan.spatial_dims == 2 else masks)

    with _frozen(network):
        out = run_plan(volume, plan, fn, 1, np.zeros(1, np.float32), batch_size=batch_size, device=device,
                       keep=has_target, progress=progress, cancel=cancel, stage="gradcam")[0]
    return _normalised(out)


def _normalised(cam: np.ndarray) -> np.ndarray:
    """The map divided by its peak (0–1); all zero stays zero."""
    peak = float(cam.max())
    return (cam / peak).astype(np.float32) if peak > 0 else cam


@contextlib.contextmanager
def _frozen(network):
    """``network`` in eval mode with no parameter gradients (the map needs only the activations'), restored after."""
    was_training = network.training
    grad_flags = [p.requires_grad for p in network.parameters()]
    for p in network.parameters():
        p.requires_grad_(False)
    network.eval()
    try:
        yield network
    finally:
        network.train(was_training)
        for p, flag in zip(network.parameters(), grad_flags):
            p.requires_grad_(flag)


def explains_in_one_pass(plan: WindowPlan, method: str, tta: bool) -> bool:
    """Whether :func:`predict_and_explain` may replace inference followed by :func:`gradcam`: 2D/2.5D plans
    whose windows each cover their region's whole slice (the fast engine's fitted windows), so that a
    window's prediction is the final one and its targets are known as soon as it ran; not with TTA
    (the prediction is a mean over mirrored passes) nor for ``gradinput`` (its graph starts at the input)."""
    return (not tta and method in ("hirescam", "gradcam") and plan.spatial_dims == 2 and bool(plan.regions)
            and all(r.roi[0] >= r.box[1].stop - r.box[1].start and r.roi[1] >= r.box[2].stop - r.box[2].start
                    for r in plan.regions))


def predict_and_explain(
    volume: np.ndarray,
    network,
    plan: WindowPlan,
    targets: Callable[[np.ndarray], np.ndarray],
    *,
    out_channels: int,
    fill: np.ndarray,
    layer: str,
    method: str = "hirescam",
    temperature: float = 1.0,
    batch_size: int = 4,
    device: str = "cpu",
    precision: str = "fp32",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Inference and Grad-CAM in one pass over ``plan`` (:func:`explains_in_one_pass`): each window's
    forward pass gives its class probabilities (softmax of the logits / ``temperature``) and, where
    ``targets(probabilities [out_channels, j, i]) → output channel per voxel`` (0: none) marks
    voxels, the backward pass from ``layer`` gives its map — without the second forward pass that
    :func:`gradcam` makes. ``fill``: per channel, the probabilities of voxels no window covers.

    Returns (probabilities [out_channels, K, J, I], Grad-CAM [K, J, I] 0–1, seconds spent on the
    explanation's backward passes). The same maps as :func:`.inference.sliding_window` then
    :func:`gradcam` with the targets of the whole result, up to float rounding."""
    import torch

    method = FIELD["cam_method"].check(method)
    amp = autocast_dtype(precision)
    scale = 1.0 / float(temperature)
    capture = _LayerCapture(network.get_submodule(layer))
    spent = [0.0]

    def fn(x, _starts, region: Region):
        bj, bi = region.box[1].stop - region.box[1].start, region.box[2].stop - region.box[2].start
        with capture, torch.enable_grad(), torch.autocast(device_type=x.device.type, dtype=amp, enabled=amp is not None):
            logits = network(x)
            if isinstance(logits, (list, tuple)):  # deep supervision: the full-resolution head
                logits = logits[0]
            probs = torch.softmax(logits.detach().float() * scale, dim=1).cpu().numpy()
            t0 = time.perf_counter()
            masks = np.zeros((len(probs), *probs.shape[2:]), np.int16)
            for n, p in enumerate(probs):  # what the window's voxels are, as the whole result will say
                masks[n, :bj, :bi] = targets(p[:, :bj, :bi])
            cam = np.zeros((len(probs), 1, *probs.shape[2:]), np.float32)
            if masks.any():
                m = torch.from_numpy(masks).to(x.device)
                score = sum((logits[:, c].float() * (m == c)).sum() for c in np.unique(masks) if c > 0)
                (grad,) = torch.autograd.grad(score, capture.activation)
                cam = _combine(grad, capture.activation, method, tuple(x.shape[2:]), 2)
            spent[0] += time.perf_counter() - t0
        return np.concatenate([probs, cam], axis=1)

    with _frozen(network):
        out = run_plan(volume, plan, fn, out_channels + 1, np.append(np.asarray(fill, np.float32), 0.0),
                       batch_size=batch_size, device=device, progress=progress, cancel=cancel)
    return out[:out_channels], _normalised(out[out_channels]), spent[0]


class _LayerCapture:
    """Within ``with``: a forward hook on ``module`` that starts the autograd graph at its output (nothing
    before the layer is recorded, so the backward pass costs only the layers after it)."""

    def __init__(self, module) -> None:
        self.module, self.activation, self._handle = module, None, None

    def _hook(self, _m, _inp, out):
        out = out.detach().requires_grad_(True)
        self.activation = out
        return out

    def __enter__(self) -> "_LayerCapture":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _combine(grad, act, method: str, size: tuple[int, ...], spatial_dims: int) -> np.ndarray:
    """ReLU of the gradient-weighted activations (HiResCAM: element-wise; Grad-CAM: channel-averaged
    gradients), summed over channels and up-sampled to the window: [B, 1, ...] float32."""
    import torch.nn.functional as F

    w = grad if method in ("hirescam", "gradinput") else grad.mean(dim=tuple(range(2, act.ndim)), keepdim=True)
    cam = F.relu((w.float() * act.float()).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=size, mode="bilinear" if spatial_dims == 2 else "trilinear", align_corners=False)
    return cam.float().cpu().numpy()


def _window_masks(target: np.ndarray, starts, roi_kji) -> np.ndarray:
    """[B, k, j, i]: the part of ``target`` (one region's) each window covers; zero where it reaches past it."""
    masks = np.zeros((len(starts), *roi_kji), target.dtype)
    for n, (k, j, i) in enumerate(starts):
        m = target[k : k + roi_kji[0], j : j + roi_kji[1], i : i + roi_kji[2]]
        masks[n, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    return masks


def _window_explainer(network, layer: str, method: str, precision: str, spatial_dims: int):
    """``explain(x, masks)``: the CAM of a batch of windows [B, 1, ...] for their target masks."""
    import torch

    amp = autocast_dtype(precision)
    capture = _LayerCapture(network.get_submodule(layer))

    def explain(x, masks: np.ndarray) -> np.ndarray:
        m = torch.from_numpy(masks).to(x.device)
        on_input = method == "gradinput"
        with contextlib.ExitStack() as stack:
            if not on_input:
                stack.enter_context(capture)
            with torch.enable_grad(), torch.autocast(device_type=x.device.type, dtype=amp, enabled=amp is not None):
                if on_input:
                    x = x.detach().requires_grad_(True)
                logits = network(x)
                if isinstance(logits, (list, tuple)):
                    logits = logits[0]
                score = sum((logits[:, c].float() * (m == c)).sum() for c in np.unique(masks) if c > 0)
                act = x if on_input else capture.activation
                (grad,) = torch.autograd.grad(score, act)
        return _combine(grad, act, method, tuple(x.shape[2:]), spatial_dims)

    return explain


def entropy_map(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy of class probabilities [C, ...], normalised to 0–1 by log(C)."""
    p = np.clip(probs.astype(np.float32, copy=False), 1e-7, 1.0)
    h = -(p * np.log(p)).sum(0)
    return np.clip(h / np.log(probs.shape[0]), 0.0, 1.0).astype(np.float32)
