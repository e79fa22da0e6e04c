"""Sliding-window engine: coverage, blending, padding, 2.5D context, TTA, cancel, devices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from UNetSegmentLib.errors import CancelledError, DeviceError
from UNetSegmentLib.engine.inference import (
    CancelToken,
    gaussian_importance,
    resolve_device,
    resolve_precision,
    sliding_window,
    tta_flips,
    window_starts,
)


class Pointwise(torch.nn.Module):
    """Logits [0, a·x + b] per voxel: any correct tiling/blending reproduces the full-volume pass."""

    def __init__(self, in_ch: int, dims: int):
        super().__init__()
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        self.conv = conv(in_ch, 1, 1)
        torch.nn.init.normal_(self.conv.weight)

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), self.conv(x)], 1)


def _full(net, vol, dims):
    with torch.no_grad():
        x = torch.from_numpy(vol)
        if dims == 2:  # slices as a batch
            out = net(x.permute(1, 0, 2, 3))
            return torch.softmax(out, 1).permute(1, 0, 2, 3).numpy()
        return torch.softmax(net(x[None]), 1)[0].numpy()


@pytest.mark.parametrize("size,roi,overlap", [(100, 32, 0.25), (32, 32, 0.5), (10, 32, 0.5), (97, 16, 0.0), (50, 1, 0.5)])
def test_window_starts_cover_the_axis(size, roi, overlap):
    s = window_starts(size, roi, overlap)
    assert s[0] == 0 and (s[-1] + roi >= size)
    covered = np.zeros(max(size, roi), bool)
    for a in s:
        covered[a : a + roi] = True
    assert covered[:size].all()
    if len(s) > 1:
        assert max(np.diff(s)) <= max(1, int(roi * (1 - overlap)))


@pytest.mark.parametrize("dims,roi,shape", [(2, (16, 16), (3, 40, 37)), (3, (8, 16, 16), (11, 40, 21)), (2, (32, 32), (2, 20, 9))])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_sliding_window_matches_full_volume(dims, roi, shape, overlap):
    torch.manual_seed(0)
    net = Pointwise(2, dims).eval()
    vol = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    probs, var = sliding_window(vol, net, roi, spatial_dims=dims, out_channels=2, overlap=overlap, batch_size=3)
    assert probs.shape == (2, *shape) and probs.dtype == np.float32 and var is None
    np.testing.assert_allclose(probs, _full(net, vol, dims), atol=1e-5)


def test_context_slices_become_channels_with_edge_clamp():
    class SecondMinusFirst(torch.nn.Module):  # logit = next slice − previous slice (channels 2 and 0)
        def forward(self, x):
            return torch.stack([torch.zeros_like(x[:, 0]), x[:, 2] - x[:, 0]], 1)

    vol = np.arange(5, dtype=np.float32)[None, :, None, None] * np.ones((1, 5, 16, 16), np.float32)
    probs, _ = sliding_window(vol, SecondMinusFirst(), (16, 16), spatial_dims=2, context=1, out_channels=2)
    expected_logit = np.array([1, 2, 2, 2, 1], np.float32)  # clamped at both ends
    np.testing.assert_allclose(probs[1, :, 0, 0], 1 / (1 + np.exp(-expected_logit)), atol=1e-6)


def test_tta_on_a_mirror_symmetric_net_changes_nothing_and_reports_zero_variance():
    torch.manual_seed(0)
    net = Pointwise(1, 3).eval()
    vol = np.random.default_rng(1).normal(size=(1, 8, 16, 16)).astype(np.float32)
    p0, _ = sliding_window(vol, net, (8, 16, 16), spatial_dims=3, out_channels=2)
    p1, var = sliding_window(vol, net, (8, 16, 16), spatial_dims=3, out_channels=2, tta=True, return_tta_variance=True)
    np.testing.assert_allclose(p0, p1, atol=1e-5)
    assert var.shape == vol.shape[1:] and float(var.max()) < 1e-6
    assert len(tta_flips(2)) == 4 and len(tta_flips(3)) == 8 and len(tta_flips(2, ("i",))) == 2
    assert tta_flips(2, ("i",)) == [(), (3,)] and tta_flips(3, ("k",)) == [(), (2,)] and tta_flips(2, ("k",)) == [()]


def test_tta_variance_is_positive_for_an_asymmetric_net():
    class LeftRamp(torch.nn.Module):
        def forward(self, x):
            ramp = torch.linspace(-3, 3, x.shape[-1]).expand_as(x[:, :1])
            return torch.cat([torch.zeros_like(ramp), ramp], 1)

    vol = np.zeros((1, 1, 8, 16), np.float32)
    _, var = sliding_window(vol, LeftRamp(), (8, 16), spatial_dims=2, out_channels=2, tta=True, return_tta_variance=True)
    assert float(var.max()) > 0.1


def test_cancel_stops_between_windows():
    token = CancelToken()
    calls = []

    def progress(stage, frac, msg=""):
        calls.append(frac)
        token.cancel()

    vol = np.zeros((1, 4, 64, 64), np.float32)
    with pytest.raises(CancelledError):
        sliding_window(vol, Pointwise(1, 2).eval(), (16, 16), spatial_dims=2, out_channels=2, batch_size=1,
                       progress=progress, cancel=token)
    assert len(calls) == 1


def test_skipped_windows_are_background():
    vol = np.zeros((1, 2, 32, 32), np.float32)
    probs, _ = sliding_window(vol, Pointwise(1, 2).eval(), (16, 16), spatial_dims=2, out_channels=2, overlap=0.0,
                              keep_window=lambda s: s[2] == 0)
    assert np.all(probs[0, :, :, 16:] == 1.0) and np.all(probs[1, :, :, 16:] == 0.0)


def test_gaussian_importance_is_cached_and_positive():
    w = gaussian_importance((1, 16, 16))
    assert w is gaussian_importance((1, 16, 16))
    assert w.min() > 0 and w.max() == 1.0 and w.shape == (1, 16, 16)


def test_devices_and_precisions():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(DeviceError):
        resolve_precision("fp16", cpu)
    with pytest.raises(DeviceError):
        resolve_precision("int8", cpu)


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    torch.manual_seed(0)
    net = Pointwise(1, 2).eval()
    vol = np.random.default_rng(2).normal(size=(1, 2, 16, 16)).astype(np.float32)
    p32, _ = sliding_window(vol, net, (16, 16), spatial_dims=2, out_channels=2, precision="fp32")
    p16, _ = sliding_window(vol, net, (16, 16), spatial_dims=2, out_channels=2, precision="bf16")
    np.testing.assert_allclose(p16, p32, atol=2e-2)
