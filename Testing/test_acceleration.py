"""The fast engine's transformations against the plain path they replace (tolerances stated per test).

Speed is measured by ``bench/inference_vs_monai.py``, not here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from UNetSegmentLib.engine import acceleration as acc
from UNetSegmentLib.engine.heatmaps import gradcam
from UNetSegmentLib.engine.inference import sliding_window, softmax_predictor, tta_flips, with_mirror_tta
from UNetSegmentLib.engine.windows import (
    WindowPlan,
    align_box,
    background_values,
    body_mask,
    fitted_window,
    is_full,
    plan_windows,
)
from UNetSegmentLib.models.networks import build_network


def _bn_net(dims: int = 2, in_ch: int = 3, seed: int = 0, arch: str = "unet", **kw):
    """A U-Net with batch norm whose running statistics are far from (0, 1), as after training."""
    torch.manual_seed(seed)
    net = build_network(arch, spatial_dims=dims, in_channels=in_ch, out_channels=2, base_channels=4, depth=2,
                        norm="batch", **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return net.eval()


@pytest.mark.parametrize("dims,arch,kw", [(2, "unet", {}), (3, "unet", {}), (2, "residual_unet", {}),
                                          (2, "unet", {"upsample": "interpolate"}), (2, "attention_unet", {}),
                                          (2, "unetplusplus", {}), (2, "multipath_unet", {"paths": 1})])
def test_fold_batchnorm_matches_the_original_network(dims, arch, kw):
    net = _bn_net(dims, in_ch=1, arch=arch, **kw)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = acc.fold_batchnorm(net)
    n_bn = sum(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)) for m in folded.modules())
    assert n_bn == 0, "every BatchNorm that follows a convolution is folded"
    x = torch.randn(2, 1, *([8] if dims == 3 else []), 16, 16)
    with torch.no_grad():
        a, b = net(x), folded(x)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())  # stated tolerance: 1e-4
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "the original is left untouched"
    assert any(isinstance(m, torch.nn.BatchNorm2d) or isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())


def test_fold_batchnorm_uses_the_pairs_a_block_names():
    """Blocks are found by their ``conv_norm_pairs()`` hook, not by attribute names: a block naming no
    pair keeps its BatchNorm, and a custom block naming its own pair gets it folded."""
    from torch import nn

    class Named(nn.Module):
        def __init__(self, pairs):
            super().__init__()
            self.a, self.b, self.pairs = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), pairs

        def conv_norm_pairs(self):
            return self.pairs

        def forward(self, x):
            return self.b(self.a(x))

    for pairs, folded_bn in ((("a", "b"),), 0), ((), 1):
        net = Named(pairs).eval()
        net.b.running_mean.fill_(0.3)
        net.b.running_var.fill_(2.0)
        f = acc.fold_batchnorm(net)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in f.modules()) == folded_bn
        x = torch.randn(1, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(net(x), f(x), atol=1e-5)


def test_memory_format_per_dimension():
    assert acc.memory_format(2) == torch.channels_last and acc.memory_format(3) == torch.channels_last_3d


def test_prepare_network_is_channels_last_and_equivalent_in_fp32():
    net = _bn_net(2)
    prep = acc.prepare_network(net, 2, "cpu")
    w = prep.get_submodule("encoder.0.conv1").weight
    assert w.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        a = net(x)
        b = prep(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert prep.get_submodule("decoder.0") is not None, "layer names survive (Grad-CAM hooks them by name)"


def _head(shape=(12, 80, 96), arc=True) -> np.ndarray:
    """[1, K, J, I] normalised-CT-like volume: background -1.5, an ellipse 'head', a thin detached arc."""
    K, J, I = shape
    v = np.full((1, K, J, I), -1.5, np.float32)
    k, j, i = np.mgrid[:K, :J, :I]
    head = ((j - 34) / 20.0) ** 2 + ((i - 50) / 24.0) ** 2 + ((k - 6) / 5.0) ** 2 < 1
    v[0][head] = 0.5
    if arc:
        v[0, 3:7, 74, 30:70] = 3.0  # a head-rest: a separate piece, ~3 % of the head
    return v


def _plan(v: np.ndarray, net, dims: int, roi, context: int = 0, fast: bool = True, overlap: float = 0.25) -> WindowPlan:
    return plan_windows(v, spatial_dims=dims, patch=roi, context=context, overlap=overlap, fast=fast,
                        size_divisor=net.size_divisor)


def _predict(net, v, plan, tta: bool = False, **kw) -> np.ndarray:
    p = softmax_predictor(net, 2)
    if tta:
        p = with_mirror_tta(p, tta_flips(plan.spatial_dims, ("i",)))
    return sliding_window(v, p, plan, **kw)


def _content_box(v: np.ndarray, margin):
    body = body_mask(v)
    return None if body is None else body.box(margin)


def test_content_box_keeps_the_body_and_drops_detached_small_pieces():
    v = _head()
    box = _content_box(v, (0, 0, 0))
    head = v[0] == 0.5
    for axis, b in enumerate(box):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(head.any(axis=other))
        assert b.start <= idx[0] and b.stop >= idx[-1] + 1, "the whole head is inside"
        assert b.start >= idx[0] - 1 and b.stop <= idx[-1] + 2, "and the box is tight (stride-2 rounding)"
    assert box[1].stop < 74, "the head-rest arc is left out"
    grown = _content_box(v, (2, 8, 8))
    assert grown[1].start == box[1].start - 8 and grown[0].start == max(0, box[0].start - 2)
    assert _content_box(np.full((1, 4, 8, 8), 7.0, np.float32), (1, 1, 1)) is None
    assert body_mask(v, min_part=0.01).box((0, 0, 0))[1].stop >= 75, "a lower min_part keeps the arc"


def test_align_box_and_fitted_window():
    box = (slice(1, 9), slice(19, 70), slice(3, 60))
    assert align_box(box, 16, in_plane_only=True) == (slice(1, 9), slice(16, 70), slice(0, 60))
    assert align_box(box, 4, in_plane_only=False) == (slice(0, 9), slice(16, 70), slice(0, 60))
    assert fitted_window((256, 256), (239, 209), 16) == (240, 224)
    assert fitted_window((256, 256), (700, 100), 16) == (256, 112), "beyond the largest side: the training patch slides"
    assert is_full((slice(0, 4), slice(0, 8), slice(0, 8)), (4, 8, 8)) and not is_full(box, (9, 70, 60))


@pytest.mark.parametrize("dims,context", [(2, 0), (2, 1), (3, 0)])
def test_fast_sliding_window_matches_the_plain_path(dims, context):
    """Crop + aligned fitted windows + folded channels-last network vs the plain engine, fp32, on a
    random-weight net (the shipped model is compared in test_default_model.py).

    Stated tolerances: inside the body box mean |Δp| ≤ 0.02 and max |Δp| ≤ 0.25 (random weights react
    to the other window borders far more than a trained net: 0.07 on the real CT); outside it the
    plain path also sees only background, and a random net answers it near-uniformly: max |Δp| ≤ 0.15."""
    v = _head(arc=False)
    if dims == 3:
        v = v[:, :, :64, :80]
    in_ch = 2 * context + 1 if dims == 2 else 1
    net = _bn_net(dims, in_ch=in_ch, seed=3)
    roi = (32, 32) if dims == 2 else (8, 32, 32)
    plain = _predict(net, v, _plan(v, net, dims, roi, context, fast=False), batch_size=4)
    plan = _plan(v, net, dims, roi, context)
    assert plan.fitted_windows() == (dims == 2)
    fast = _predict(acc.prepare_network(net, dims, "cpu"), v, plan, batch_size=4)
    assert fast.shape == plain.shape
    inside = np.zeros(v.shape[1:], bool)
    inside[plan.without_fitted_windows().regions[0].box] = True  # the body's box
    d = np.abs(fast - plain)
    assert d[:, inside].mean() < 0.02 and d[:, inside].max() < 0.25
    far = ~inside  # grow the box by the receptive field's reach before comparing "outside"
    from scipy import ndimage

    far &= ~ndimage.binary_dilation(inside, iterations=8)
    if far.any():
        assert d[:, far].max() < 0.15
    assert np.isfinite(fast).all() and np.allclose(fast.sum(0), 1, atol=1e-5)


def test_fast_path_with_tta_variance_and_two_channels():
    """Multi-channel input and the TTA variance channel go through the crop and back."""
    v = np.concatenate([_head(arc=False), _head(arc=False) * 0.5], 0)
    net = _bn_net(2, in_ch=2, seed=7)
    plain = _predict(net, v, _plan(v, net, 2, (32, 32), fast=False, overlap=0.5), tta=True)
    fast = _predict(net, v, _plan(v, net, 2, (32, 32), overlap=0.5), tta=True)
    (p_plain, var_plain), (p_fast, var_fast) = (plain[:-1], plain[-1]), (fast[:-1], fast[-1])
    assert p_fast.shape == p_plain.shape and var_fast.shape == var_plain.shape == v.shape[1:]
    assert np.abs(p_fast - p_plain).mean() < 0.02 and (var_fast >= 0).all()


def test_3d_volume_smaller_than_the_window():
    v = _head(shape=(6, 20, 24), arc=False)  # the ellipse lies outside so small a volume: add a body
    v[0, 1:5, 4:16, 5:19] = 0.5
    net = _bn_net(3, in_ch=1, seed=8)
    plan = _plan(v, net, 3, (8, 32, 32), overlap=0.5)
    assert plan.regions[0].roi == (8, 32, 32), "a 3D plan keeps the training window; the region is padded to it"
    out = _predict(net, v, plan)
    assert out.shape == (2, 6, 20, 24) and np.allclose(out.sum(0), 1, atol=1e-5)


def test_background_is_the_commonest_border_value():
    ct = _head(arc=False)  # air (the minimum) all around
    z = np.where(ct > -1.5, ct * 2 - 1, 0.0).astype(np.float32)  # z-scored map: 0 outside, negatives inside
    assert background_values(ct)[0] == -1.5 and background_values(z)[0] == 0.0
    noise = np.random.default_rng(0).normal(size=(1, 4, 16, 16)).astype(np.float32)
    assert background_values(noise)[0] == noise.min(), "no common border value: the minimum (nothing cropped)"
    assert _content_box(noise, (0, 0, 0)) == (slice(0, 4), slice(0, 16), slice(0, 16))


def test_fast_path_on_fitted_windows_matches_plain_on_the_same_windows():
    """With the original network run on the same plan (same aligned boxes and fitted windows), the only
    difference is the folded channels-last network: max |Δp| ≤ 1e-4 in fp32."""
    v = _head(arc=False)
    net = _bn_net(2, in_ch=3, seed=4)
    plan = _plan(v, net, 2, (32, 32), context=1)
    assert plan.fitted_windows()
    fast = _predict(acc.prepare_network(net, 2, "cpu"), v, plan, batch_size=4)
    ref = _predict(net, v, plan, batch_size=4)
    assert np.abs(fast - ref).max() < 1e-4


def test_all_background_volume_gets_the_uniform_answer_without_windows():
    v = np.full((1, 5, 40, 40), -1.5, np.float32)
    net = _bn_net(2, in_ch=1, seed=5)
    plan = _plan(v, net, 2, (32, 32), overlap=0.5)
    assert plan.regions == () and not plan.whole
    fast = _predict(net, v, plan)
    plain = _predict(net, v, _plan(v, net, 2, (32, 32), fast=False, overlap=0.5))
    assert np.allclose(fast, fast[:, :1, :1, :1]), "one value per channel"
    centre = plain[:, 2, 20, 20]
    assert np.abs(fast[:, 2, 20, 20] - centre).max() < 0.05


def test_fast_gradcam_folded_channels_last_matches_the_original_network_on_the_same_windows():
    """Grad-CAM through the folded channels-last copy = through the original (same crop and windows):
    max |Δ| ≤ 1e-3 of the peak; and it stays on the explained blob. (On the shipped model the fast and
    plain engines' maps are compared in test_default_model.py.)"""
    v = _head(arc=False)
    v[0, 4:8, 30:38, 44:52] = 2.0  # a bright blob to explain
    net = _bn_net(2, in_ch=1, seed=6)
    target = np.zeros(v.shape[1:], bool)
    target[4:8, 30:38, 44:52] = True
    plan = _plan(v, net, 2, (32, 32))
    ref = gradcam(v, net, plan, target, layer="decoder.0", batch_size=4)
    fast = gradcam(v, acc.prepare_network(net, 2, "cpu"), plan, target, layer="decoder.0", batch_size=4)
    assert fast.shape == ref.shape == v.shape[1:] and fast.max() == pytest.approx(1.0)
    assert np.abs(fast - ref).max() < 1e-3
    assert fast[target].mean() > 2 * fast[~target].mean()


def test_usable_cores_respects_the_affinity_mask():
    import os

    n = acc.usable_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
