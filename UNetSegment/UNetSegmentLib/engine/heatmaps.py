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

The map is up-sampled to the window It is computed window by window with the same
Gaussian blending as inference, only on windows that contain target voxels (elsewhere there is
nothing to explain), and normalised to 0–1 over the volume.

The default layer is a deep decoder stage (``decoder.0``, right after the bottleneck): coarse but
semantic. The last block before the 1×1 output convolution would only reproduce a rescaled logit,
i.e. duplicate the probability map.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ModelError
from .acceleration import memory_format, plan_content
from .inference import CancelToken, ProgressFn, autocast_dtype, blend_windows


CAM_METHODS = ("hirescam", "gradcam")


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
    roi: Sequence[int],
    target_mask: np.ndarray,
    *,
    layer: str,
    method: str = "hirescam",
    spatial_dims: int,
    context: int = 0,
    overlap: float = 0.25,
    batch_size: int = 4,
    device=None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    crop_to_content: bool = False,
    fit_window: bool = False,
    channels_last: bool = False,
    precision: str = "fp32",
) -> np.ndarray:
    """Grad-CAM [K, J, I] in 0–1 on the grid of ``volume`` [C, K, J, I] for the voxels in ``target_mask``.

    ``target_mask``: bool (explain output channel 1 there) or an integer map of output channels
    (e.g. each foreground voxel's predicted class): the score is Σ_c Σ_{voxels with value c} logit_c.
    ``crop_to_content``/``fit_window``/``channels_last``: the fast path of :func:`inference.sliding_window`,
    so that the network sees the same windows as when it made the prediction being explained.
    ``precision`` bf16/fp16 runs the forward and backward passes under autocast (a 0–1 display map
    needs no fp32 gradients; about twice as fast on bf16 CPUs); the map is combined in fp32.
    """
    import torch
    import torch.nn.functional as F

    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; use one of {CAM_METHODS}")
    roi_kji = (1, *roi) if spatial_dims == 2 else tuple(roi)
    target = np.ascontiguousarray(target_mask)
    target = target.astype(np.uint8) if target.dtype == bool else target.astype(np.int16)
    if not target.any():
        return np.zeros(volume.shape[1:], np.float32)
    full_shape, box, pad_value = volume.shape[1:], None, None
    if crop_to_content:
        plan = plan_content(volume, roi, network, spatial_dims, context, fit_window)
        # never drop a target voxel: crop only when the box holds them all
        if plan.box is not None and np.count_nonzero(target[plan.box]) == np.count_nonzero(target):
            box, pad_value, roi = plan.box, plan.background, plan.roi
            roi_kji = (1, *roi) if spatial_dims == 2 else tuple(roi)
            volume, target = volume[(slice(None), *box)], target[box]
    fmt = memory_format(spatial_dims) if channels_last else None
    amp = autocast_dtype(precision)
    module = network.get_submodule(layer)
    store: dict = {}

    def hook(_m, _inp, out):
        # the graph starts here: nothing before the layer is recorded and no weight gradients are
        # computed, so the backward pass costs only the layers after it
        out = out.detach().requires_grad_(True)
        store["act"] = out
        return out

    def keep(start) -> bool:
        k0, j0, i0 = start
        return bool(target[k0 : k0 + roi_kji[0], j0 : j0 + roi_kji[1], i0 : i0 + roi_kji[2]].any())

    padded_target = _pad_to(target, roi_kji)

    def explain(x, starts):
        masks = np.stack([padded_target[k : k + roi_kji[0], j : j + roi_kji[1], i : i + roi_kji[2]] for k, j, i in starts])
        m = torch.from_numpy(masks[:, 0] if spatial_dims == 2 else masks).to(x.device)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        with torch.enable_grad(), torch.autocast(device_type=x.device.type, dtype=amp, enabled=amp is not None):
            logits = network(x)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            score = sum((logits[:, c].float() * (m == c)).sum() for c in np.unique(masks) if c > 0)
            act = store["act"]
            (grad,) = torch.autograd.grad(score, act)
        w = grad if method == "hirescam" else grad.mean(dim=tuple(range(2, act.ndim)), keepdim=True)
        cam = F.relu((w.float() * act.float()).sum(1, keepdim=True)).detach()
        mode = "bilinear" if spatial_dims == 2 else "trilinear"
        cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode=mode, align_corners=False)
        return cam.float().cpu().numpy()

    handle = module.register_forward_hook(hook)
    was_training = network.training
    grad_flags = [p.requires_grad for p in network.parameters()]
    for p in network.parameters():
        p.requires_grad_(False)
    network.eval()
    try:
        out = blend_windows(
            volume, roi, explain, spatial_dims=spatial_dims, out_channels=1, context=context, overlap=overlap,
            batch_size=batch_size, device=device, pad_value=pad_value, keep_window=keep, progress=progress, cancel=cancel,
            stage="gradcam",
        )[0]
    finally:
        handle.remove()
        network.train(was_training)
        for p, flag in zip(network.parameters(), grad_flags):
            p.requires_grad_(flag)
    if box is not None:
        full = np.zeros(full_shape, np.float32)
        full[box] = out
        out = full
    peak = float(out.max())
    return (out / peak).astype(np.float32) if peak > 0 else out.astype(np.float32)


def _pad_to(mask: np.ndarray, roi_kji: Sequence[int]) -> np.ndarray:
    pad = [(0, max(0, r - s)) for s, r in zip(mask.shape, roi_kji)]
    return np.pad(mask, pad) if any(p[1] for p in pad) else mask


def entropy_map(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy of class probabilities [C, ...], normalised to 0–1 by log(C)."""
    p = np.clip(probs.astype(np.float32, copy=False), 1e-7, 1.0)
    h = -(p * np.log(p)).sum(0)
    return np.clip(h / np.log(probs.shape[0]), 0.0, 1.0).astype(np.float32)
