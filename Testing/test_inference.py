"""Sliding-window engine: coverage, blending, padding, 2.5D context, TTA, cancel, devices; the window
plan (:mod:`.engine.windows`) and the threshold rule (:mod:`.engine.labels`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from UNetSegmentLib.analysis.rethreshold import labels_at_threshold
from UNetSegmentLib.engine.device import resolve_device, resolve_precision
from UNetSegmentLib.engine.inference import (
    CancelToken,
    run_plan,
    slice_with_context,
    sliding_window,
    softmax_predictor,
    tta_flips,
    uniform_answer,
    with_mirror_tta,
)
from UNetSegmentLib.engine.labels import foreground_probability, labels_from_probabilities
from UNetSegmentLib.engine.windows import (
    CONTENT_MARGIN,
    SLAB_SLICES,
    WindowPlan,
    body_mask,
    gaussian_importance,
    plan_windows,
    window_starts,
)
from UNetSegmentLib.errors import CancelledError, DeviceError
from UNetSegmentLib.image import Image, make_ijk_to_ras


class Pointwise(torch.nn.Module):
    """Logits [0, a·x + b] per voxel: any correct tiling/blending reproduces the full-volume pass."""

    def __init__(self, in_ch: int, dims: int):
        super().__init__()
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        self.conv = conv(in_ch, 1, 1)
        torch.nn.init.normal_(self.conv.weight)

    def forward(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), self.conv(x)], 1)


class Counting(torch.nn.Module):
    """``inner`` that counts the windows it is run on."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.windows = inner, 0

    def forward(self, x):
        self.windows += x.shape[0]
        return self.inner(x)


def _full(net, vol, dims):
    with torch.no_grad():
        x = torch.from_numpy(vol)
        if dims == 2:  # slices as a batch
            out = net(x.permute(1, 0, 2, 3))
            return torch.softmax(out, 1).permute(1, 0, 2, 3).numpy()
        return torch.softmax(net(x[None]), 1)[0].numpy()


def _plain(vol: np.ndarray, dims: int, roi, overlap: float = 0.5, context: int = 0) -> WindowPlan:
    """The plain engine's plan: training-size windows over the whole volume."""
    return plan_windows(vol, spatial_dims=dims, patch=roi, context=context, overlap=overlap, fast=False, size_divisor=1)


def _fast(vol: np.ndarray, dims: int, roi, context: int = 0, overlap: float = 0.25, divisor: int = 16) -> WindowPlan:
    return plan_windows(vol, spatial_dims=dims, patch=roi, context=context, overlap=overlap, fast=True, size_divisor=divisor)


def _run(net, vol, plan, **kw) -> np.ndarray:
    return sliding_window(vol, softmax_predictor(net, 2), plan, **kw)


def _head(shape=(20, 80, 96)) -> np.ndarray:
    """[1, K, J, I] normalised-CT-like volume: background −1.5 and an ellipsoid 'head' in slices 3–16."""
    K, J, I = shape
    v = np.full((1, K, J, I), -1.5, np.float32)
    k, j, i = np.mgrid[:K, :J, :I]
    v[0][((j - 37) / 20.0) ** 2 + ((i - 50) / 24.0) ** 2 + ((k - 9.5) / 7.0) ** 2 < 1] = 0.5
    return v


# --- windows and blending ------------------------------------------------------------------------
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
    probs = _run(net, vol, _plain(vol, dims, roi, overlap), batch_size=3)
    assert probs.shape == (2, *shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, _full(net, vol, dims), atol=1e-5)


def test_context_slices_become_channels_with_edge_clamp():
    class SecondMinusFirst(torch.nn.Module):  # logit = next slice − previous slice (channels 2 and 0)
        def forward(self, x):
            return torch.stack([torch.zeros_like(x[:, 0]), x[:, 2] - x[:, 0]], 1)

    vol = np.arange(5, dtype=np.float32)[None, :, None, None] * np.ones((1, 5, 16, 16), np.float32)
    probs = _run(SecondMinusFirst(), vol, _plain(vol, 2, (16, 16), context=1))
    expected_logit = np.array([1, 2, 2, 2, 1], np.float32)  # clamped at both ends
    np.testing.assert_allclose(probs[1, :, 0, 0], 1 / (1 + np.exp(-expected_logit)), atol=1e-6)
    two = np.stack([vol[0], -vol[0]])
    np.testing.assert_array_equal(slice_with_context(two, 0, 1)[:, 0, 0], [0, 0, 1, 0, 0, -1])


def test_tta_on_a_mirror_symmetric_net_changes_nothing_and_reports_zero_variance():
    torch.manual_seed(0)
    net = Pointwise(1, 3).eval()
    vol = np.random.default_rng(1).normal(size=(1, 8, 16, 16)).astype(np.float32)
    plan = _plain(vol, 3, (8, 16, 16))
    p0 = _run(net, vol, plan)
    tta = with_mirror_tta(softmax_predictor(net, 2), tta_flips(3))
    assert tta.out_channels == 3, "the mean of the copies, plus their variance"
    out = sliding_window(vol, tta, plan)
    p1, var = out[:-1], out[-1]
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
    out = sliding_window(vol, with_mirror_tta(softmax_predictor(LeftRamp(), 2), tta_flips(2)), _plain(vol, 2, (8, 16)))
    assert float(out[-1].max()) > 0.1


def test_cancel_stops_between_windows():
    token = CancelToken()
    calls = []

    def progress(stage, frac, msg=""):
        calls.append(frac)
        token.cancel()

    vol = np.zeros((1, 4, 64, 64), np.float32)
    with pytest.raises(CancelledError):
        _run(Pointwise(1, 2).eval(), vol, _plain(vol, 2, (16, 16)), batch_size=1, progress=progress, cancel=token)
    assert len(calls) == 1


def test_skipped_windows_are_background():
    """``run_plan``'s ``keep`` drops windows; voxels no window covers get ``fill``."""
    vol = np.zeros((1, 2, 32, 32), np.float32)
    predictor = softmax_predictor(Pointwise(1, 2).eval(), 2)
    plan = _plain(vol, 2, (16, 16), overlap=0.0)
    with torch.inference_mode():
        probs = run_plan(vol, plan, lambda x, s, r: predictor(x).numpy(), 2, np.array([1.0, 0.0], np.float32),
                         batch_size=4, device="cpu", keep=lambda region, s: s[2] == 0)
    assert np.all(probs[0, :, :, 16:] == 1.0) and np.all(probs[1, :, :, 16:] == 0.0)
    assert not np.all(probs[0, :, :, :16] == 1.0), "the kept windows ran"
    assert plan.n_windows(lambda region, s: s[2] == 0) == 2 * 2 and plan.n_windows() == 2 * 2 * 2


def test_gaussian_importance_is_cached_and_positive():
    w = gaussian_importance((1, 16, 16))
    assert w is gaussian_importance((1, 16, 16))
    assert w.min() > 0 and w.max() == 1.0 and w.shape == (1, 16, 16)


def test_devices_and_precisions():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda:0")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    assert resolve_precision("auto", "cuda:0") == "fp16" and resolve_precision("auto", "cuda:1") == "fp16"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp16", "cuda:0") == "fp16"
    with pytest.raises(DeviceError):
        resolve_precision("fp16", "cpu")
    with pytest.raises(DeviceError):
        resolve_precision("int8", "cpu")


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    torch.manual_seed(0)
    net = Pointwise(1, 2).eval()
    vol = np.random.default_rng(2).normal(size=(1, 2, 16, 16)).astype(np.float32)
    plan = _plain(vol, 2, (16, 16))
    p32 = sliding_window(vol, softmax_predictor(net, 2, "fp32"), plan)
    p16 = sliding_window(vol, softmax_predictor(net, 2, "bf16"), plan)
    np.testing.assert_allclose(p16, p32, atol=2e-2)


# --- the window plan -----------------------------------------------------------------------------
def test_plain_plan_is_one_region_over_the_whole_volume_with_the_training_patch():
    vol = _head()
    plan = _plain(vol, 2, (32, 32), overlap=0.25, context=1)
    assert plan.shape == vol.shape[1:] and plan.spatial_dims == 2 and plan.context == 1 and plan.overlap == 0.25
    assert len(plan.regions) == 1 and plan.whole and not plan.fitted_windows()
    (region,) = plan.regions
    assert region.box == tuple(slice(0, s) for s in vol.shape[1:]) and region.roi == (32, 32) and region.write_k is None
    assert region.written == region.box
    np.testing.assert_array_equal(plan.pad_value, [-1.5]), "padded with the channel's minimum"
    assert plan.without_fitted_windows() is plan
    assert plan.n_windows() == 20 * len(window_starts(80, 32, 0.25)) * len(window_starts(96, 32, 0.25))


def test_fast_3d_plan_is_one_aligned_box_around_the_body():
    vol = _head(shape=(40, 80, 96))
    plan = _fast(vol, 3, (16, 32, 32), divisor=8)
    assert len(plan.regions) == 1 and not plan.whole and not plan.fitted_windows()
    (region,) = plan.regions
    assert region.roi == (16, 32, 32) and region.write_k is None
    body = vol[0] != -1.5
    for axis, b in enumerate(region.box):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(body.any(axis=other))
        assert b.start % 8 == 0, "the box starts on the pooling grid"
        assert b.start <= max(0, idx[0] - CONTENT_MARGIN + 1)
        assert b.stop >= min(vol.shape[1 + axis], idx[-1] + 1 + CONTENT_MARGIN)
        assert b.start > idx[0] - CONTENT_MARGIN - 8 - 2, "and no more than the margin and the alignment"
    np.testing.assert_array_equal(plan.pad_value, [-1.5])
    assert plan.without_fitted_windows() is plan


@pytest.mark.parametrize("context", [0, 1])
def test_fast_2d_plan_is_slabs_with_fitted_windows(context):
    vol = _head()
    plan = _fast(vol, 2, (32, 32), context=context, divisor=16)
    assert plan.fitted_windows() and not plan.whole and plan.regions
    coarse = plan.without_fitted_windows()
    assert coarse is plan.coarse and len(coarse.regions) == 1 and coarse.regions[0].roi == (32, 32)
    box = coarse.regions[0].written  # the slices the fallback writes; with context its box also reads their neighbours
    lo, hi = max(0, box[0].start - context), min(vol.shape[1], box[0].stop + context)
    assert coarse.regions[0].box[0] == slice(lo, hi)
    body_k = np.flatnonzero((vol[0] != -1.5).any(axis=(1, 2)))
    assert box[0].start <= body_k[0] and box[0].stop > body_k[-1], "the slabs cover every body slice"
    written = [r.write_k for r in plan.regions]
    assert all(a[1] <= b[0] for a, b in zip(written, written[1:])), "nothing is run twice"
    covered = np.zeros(vol.shape[1], bool)
    for k0, k1 in written:
        covered[k0:k1] = True
    assert covered[body_k].all(), "every body slice is written (slabs of background only are left out)"
    assert covered[box[0].start : box[0].stop].sum() == covered.sum()
    for r in plan.regions:
        k0, k1 = r.write_k
        assert 0 < k1 - k0 <= SLAB_SLICES and (k0 - box[0].start) % SLAB_SLICES == 0
        assert r.box[0] == slice(max(0, k0 - context), min(vol.shape[1], k1 + context)), "context slices are read"
        assert r.written == (slice(k0, k1), r.box[1], r.box[2])
        extent = (r.box[1].stop - r.box[1].start, r.box[2].stop - r.box[2].start)
        assert all(w % 16 == 0 and w >= e for w, e in zip(r.roi, extent)), "one fitted window covers the slab's box"
        assert r.box[1].start % 16 == 0 and r.box[2].start % 16 == 0
        assert len(r.window_grid(2, plan.overlap).starts) == k1 - k0, "one window per written slice"
    assert plan.n_windows() == covered.sum()


def test_all_background_volume_has_no_regions_and_gets_the_uniform_answer_without_windows():
    vol = np.full((1, 5, 40, 40), -1.5, np.float32)
    assert body_mask(vol) is None
    plan = _fast(vol, 2, (32, 32))
    assert plan.regions == () and plan.whole is False and plan.n_windows() == 0
    torch.manual_seed(0)
    net = Counting(Pointwise(1, 2).eval())
    out = _run(net, vol, plan)
    assert net.windows == 1, "only the one uniform window"
    expected = _full(net.inner, vol, 2)[:, 0, 0, 0]
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None, None], out.shape), atol=1e-6)
    with torch.inference_mode():  # as sliding_window calls it
        np.testing.assert_allclose(uniform_answer(softmax_predictor(net.inner, 2), plan, "cpu"), expected, atol=1e-6)


def test_on_slices_runs_only_those_slices_and_matches_the_full_plan_there():
    torch.manual_seed(0)
    vol = np.random.default_rng(3).normal(size=(1, 9, 20, 24)).astype(np.float32)
    net = Counting(Pointwise(3, 2).eval())
    plan = _plain(vol, 2, (16, 16), context=1)
    part = plan.on_slices([0, 4, 8])
    assert [r.write_k for r in part.regions] == [(0, 1), (4, 5), (8, 9)]
    assert [r.box[0] for r in part.regions] == [slice(0, 2), slice(3, 6), slice(7, 9)]
    assert part.whole is False and part.coarse is None and part.n_windows() == 3 * plan.n_windows() // 9
    full = _run(net.inner, vol, plan)
    out = _run(net, vol, part)
    assert net.windows == part.n_windows() + 1, "the sampled slices' windows and one uniform window"
    np.testing.assert_allclose(out[:, [0, 4, 8]], full[:, [0, 4, 8]], atol=1e-6)
    with pytest.raises(ValueError, match="2D/2.5D"):
        _plain(vol, 3, (4, 16, 16)).on_slices([1])


def test_run_plan_with_keep_on_a_fast_plan_runs_exactly_the_kept_windows():
    """What the old engine refused (``keep_window`` with the crop) is now one rule: ``keep`` filters the
    windows of each region of any plan, and nothing else runs."""
    vol = _head()
    plan = _fast(vol, 2, (32, 32), context=1)
    keep = lambda region, start: start[0] % 2 == 0  # noqa: E731
    net = Counting(Pointwise(3, 2).eval())
    predictor = softmax_predictor(net, 2)
    with torch.inference_mode():
        run_plan(vol, plan, lambda x, s, r: predictor(x).numpy(), 2, np.array([1.0, 0.0], np.float32), batch_size=3,
                 device="cpu", keep=keep)
    assert net.windows == plan.n_windows(keep) and 0 < plan.n_windows(keep) < plan.n_windows()


# --- the threshold rule --------------------------------------------------------------------------
def test_labels_from_probabilities_one_label():
    p = np.array([0.0, 0.39, 0.4, 0.9], np.float32)
    np.testing.assert_array_equal(labels_from_probabilities({3: p}, 0.4), [0, 0, 3, 3])
    assert labels_from_probabilities({3: p}, 0.4).dtype == np.uint8
    assert foreground_probability({3: p}) is p


def test_labels_from_probabilities_several_labels_most_probable_where_not_background():
    a = np.array([0.1, 0.3, 0.2, 0.6, 0.25], np.float32)
    b = np.array([0.1, 0.2, 0.3, 0.3, 0.25], np.float32)
    # P(not background) = a + b = 0.2, 0.5, 0.5, 0.9, 0.5
    np.testing.assert_array_equal(labels_from_probabilities({1: a, 2: b}, 0.5), [0, 1, 2, 1, 1])
    np.testing.assert_allclose(foreground_probability({1: a, 2: b}), [0.2, 0.5, 0.5, 0.9, 0.5], atol=1e-7)
    np.testing.assert_array_equal(labels_from_probabilities({1: a, 2: b}, 0.95), [0, 0, 0, 0, 0])
    fg = np.ones(5, np.float32)  # the caller's P(not background) is used as given
    np.testing.assert_array_equal(labels_from_probabilities({1: a, 2: b}, 0.95, fg), [1, 1, 2, 1, 1])
    over = foreground_probability({1: np.full(2, 0.7, np.float32), 2: np.full(2, 0.6, np.float32)})
    assert over.max() == 1.0, "clipped to 1"


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.77])
def test_rethreshold_gives_the_pipeline_labels_for_a_one_label_model(threshold):
    p = np.random.default_rng(4).uniform(size=(3, 8, 9)).astype(np.float32)
    prob = Image(p, make_ijk_to_ras((1.0, 1.0, 2.0)))
    out = labels_at_threshold(prob, threshold, [1])
    assert out.same_grid(prob) and out.array.dtype == np.uint8
    np.testing.assert_array_equal(out.array, labels_from_probabilities({1: p}, threshold))
