"""Grad-CAM and uncertainty: honest tests with the trained tiny-blob model."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import ct_phantom
from scipy import ndimage

from UNetSegmentLib.models.bundle import load_bundle
from UNetSegmentLib.errors import ModelError
from UNetSegmentLib.engine.heatmaps import cam_layer_name, entropy_map, gradcam
from UNetSegmentLib.engine.inference import sliding_window, softmax_predictor
from UNetSegmentLib.engine.windows import WindowPlan, plan_windows
from UNetSegmentLib.errors import UsageError
from UNetSegmentLib.image import Image, make_ijk_to_ras
from UNetSegmentLib.params import SegmentParams
from UNetSegmentLib.settings import resolve
from UNetSegmentLib.engine.pipeline import segment
from UNetSegmentLib.engine.preprocess import normalize


@pytest.fixture(scope="module")
def blob_model():
    b = load_bundle("tiny-blob")
    return b, b.build_network()


def two_blob_slices(n=3, size=160):
    """Normalised 2D head slices with two bright blobs, left (A) and right (B)."""
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - 80) / 62.0) ** 2 + ((xx - 80) / 52.0) ** 2
    hu = np.full((size, size), -1000.0, np.float32)
    hu[head < 1.0] = 1000.0
    hu[head < 0.85] = 32.0
    a = ((yy - 70) / 7.0) ** 2 + ((xx - 50) / 7.0) ** 2 < 1
    b = ((yy - 95) / 7.0) ** 2 + ((xx - 110) / 7.0) ** 2 < 1
    hu[a | b] = 75.0
    rng = np.random.default_rng(0)
    vol = np.stack([hu + rng.normal(0, 3, hu.shape) for _ in range(n)]).astype(np.float32)
    spec = load_bundle("tiny-blob").meta["inputs"][0]["normalization"]
    return normalize(vol, spec)[None], np.broadcast_to(a, (n, size, size)), np.broadcast_to(b, (n, size, size))


def _plain_plan(vol, bundle, overlap=0.25) -> WindowPlan:
    """The plain engine's 2D plan with the model's training patch (what the old API ran)."""
    return plan_windows(vol, spatial_dims=2, patch=bundle.meta["patch_size"], context=0, overlap=overlap, fast=False,
                        size_divisor=16)


def _near(mask, px=6):
    return ndimage.binary_dilation(mask, iterations=px)


def test_gradcam_concentrates_on_the_targeted_lesion(blob_model):
    bundle, net = blob_model
    vol, a, b = two_blob_slices()
    kw = dict(layer=cam_layer_name(net, bundle.meta), batch_size=4)
    plan = _plain_plan(vol, bundle)
    cam_a = gradcam(vol, net, plan, a, **kw)
    cam_b = gradcam(vol, net, plan, b, **kw)
    assert cam_a.max() == pytest.approx(1.0) and cam_a.min() >= 0
    mass_a_near_a = cam_a[_near(a)].sum()
    mass_a_near_b = cam_a[_near(b)].sum()
    mass_b_near_b = cam_b[_near(b)].sum()
    mass_b_near_a = cam_b[_near(a)].sum()
    # each map explains its own lesion: most of its near-lesion mass sits at the targeted one
    assert mass_a_near_a > 3 * mass_a_near_b
    assert mass_b_near_b > 3 * mass_b_near_a
    # and the peak of each map lies near its target
    k, y, x = np.unravel_index(np.argmax(cam_a), cam_a.shape)
    assert _near(a, 10)[k, y, x]


def test_channel_averaged_gradcam_is_not_instance_discriminative(blob_model):
    """Why hirescam is the default: Selvaraju's averaged weights also paint the other lesion."""
    bundle, net = blob_model
    vol, a, b = two_blob_slices(n=1)
    cam = gradcam(vol, net, _plain_plan(vol, bundle), a, layer="decoder.0", method="gradcam")
    assert cam.max() == pytest.approx(1.0)
    assert cam[_near(b)].sum() > 0.5 * cam[_near(a)].sum()
    with pytest.raises(UsageError, match="cam_method='nope' is not allowed"):
        SegmentParams(cam_method="nope")


def test_gradcam_refuses_an_unknown_method(blob_model):
    """The method is checked against the one parameter definition, before any window is run."""
    bundle, net = blob_model
    vol, a, _ = two_blob_slices(n=1)
    with pytest.raises(UsageError, match="cam_method='nope' is not allowed"):
        gradcam(vol, net, _plain_plan(vol, bundle), a, layer="decoder.0", method="nope")


def test_default_layer_is_deep_and_not_a_copy_of_the_probability(blob_model):
    bundle, net = blob_model
    assert cam_layer_name(net, bundle.meta) == "decoder.0"
    vol, a, b = two_blob_slices(n=1)
    import torch

    with torch.no_grad():
        prob = torch.softmax(net(torch.from_numpy(vol[:, 0][None])), 1)[0, 1].numpy()
    cam = gradcam(vol, net, _plain_plan(vol, bundle), a | b, layer="decoder.0")[0]
    corr = np.corrcoef(cam.ravel(), prob.ravel())[0, 1]
    assert corr < 0.95  # a deep stage gives a coarser, different map than the output
    with pytest.raises(ModelError, match="does not exist"):
        cam_layer_name(net, bundle.meta, "decoder.99")


def test_gradcam_without_target_is_zero_and_runs_no_window(blob_model):
    bundle, net = blob_model
    vol, a, _ = two_blob_slices(n=2)
    calls = []
    handle = net.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        cam = gradcam(vol, net, _plain_plan(vol, bundle), np.zeros_like(a), layer="decoder.0")
    finally:
        handle.remove()
    assert cam.shape == a.shape and not cam.any()
    assert calls == [], "no window is run"


def test_entropy_map_bounds():
    p = np.array([[0.5, 1.0, 0.0], [0.5, 0.0, 1.0]], np.float32)
    h = entropy_map(p)
    np.testing.assert_allclose(h, [1.0, 0.0, 0.0], atol=1e-5)


def test_pipeline_heatmaps_on_the_input_grid_for_a_flipped_oblique_volume():
    img, mask = ct_phantom(shape_kji=(10, 90, 80), spacing=(1.2, 1.3, 4.0),
                           direction=np.array([[-1, 0, 0], [0, 0.97, -0.24], [0, 0.24, 0.97]]))
    r = segment([img], load_bundle("tiny-blob"), SegmentParams(heatmaps=("gradcam", "uncertainty")))
    for kind in ("gradcam", "uncertainty"):
        h = r.heatmaps[kind]
        assert h.same_grid(img) and h.array.dtype == np.float32
        assert 0 <= h.array.min() and h.array.max() <= 1
    assert r.heatmaps["gradcam"].array[mask].mean() > 3 * r.heatmaps["gradcam"].array[~mask].mean()
    assert "entropy" in r.extra["uncertainty_kind"]
    r2 = segment([img], load_bundle("tiny-blob"), SegmentParams(heatmaps=("uncertainty",), tta=True))
    assert "tta_variance" in r2.extra["uncertainty_kind"] and "gradcam" not in r2.heatmaps


def test_tiny_blob_finds_the_blob_in_any_orientation():
    """The shipped test model works through the whole geometry path (flips, permutations, tilt)."""
    base, mask = ct_phantom(shape_kji=(12, 96, 96), spacing=(1.0, 1.0, 3.0))
    for d in (np.eye(3), np.diag([-1, -1, 1]), np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])):
        img = Image(base.array, make_ijk_to_ras((1.0, 1.0, 3.0), d, (0, 0, 0)))
        r = segment([img], load_bundle("tiny-blob"), SegmentParams(heatmaps=()))
        pred = r.labels.array > 0
        dice = 2 * (pred & mask).sum() / (pred.sum() + mask.sum())
        assert dice > 0.7, (d, dice)


@pytest.mark.parametrize("dims,patch", [("2.5d", (32, 32)), ("3d", (8, 32, 32))])
def test_gradcam_runs_for_2p5d_and_3d_models(tmp_path, dims, patch):
    from conftest import write_bundle

    img, mask = ct_phantom(shape_kji=(10, 40, 40))
    b = load_bundle(write_bundle(tmp_path / dims, dims=dims, patch=patch, context=1))
    r = segment([img], b, SegmentParams(heatmaps=("gradcam", "uncertainty"), threshold=0.3))
    cam = r.heatmaps["gradcam"]
    assert cam.same_grid(img) and 0 <= cam.array.min() and cam.array.max() <= 1
    assert (cam.array > 0).any() == bool(r.labels.array.any())


class _Recording:
    """Wraps a network (same layer names under ``net.``) and records every window it is run on."""

    def __new__(cls, net):
        import torch

        class Recording(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net, self.seen = net, []

            def forward(self, x):
                self.seen += [w.detach().float().cpu().numpy().tobytes() for w in x]
                return self.net(x)

        return Recording()


@pytest.mark.parametrize("dims,context,patch", [("2.5d", 1, (32, 32)), ("3d", 0, (8, 32, 32))])
def test_gradcam_runs_the_windows_inference_ran(dims, context, patch):
    """One plan: Grad-CAM's windows are exactly the inference windows that hold a target voxel (same
    boxes, same fitted sizes, same 2.5D context), none re-planned."""
    import torch

    from UNetSegmentLib.models.networks import build_network

    torch.manual_seed(0)
    spatial = 3 if dims == "3d" else 2
    net = build_network("unet", spatial_dims=spatial, in_channels=2 * context + 1, out_channels=2, base_channels=4,
                        depth=2).eval()
    rng = np.random.default_rng(5)
    vol = np.full((1, 20, 72, 80), -1.5, np.float32)
    vol[0, 3:17, 10:60, 12:70] = rng.normal(size=(14, 50, 58))  # a body of noise: every window's content differs
    target = np.zeros(vol.shape[1:], bool)
    target[8:11, 20:30, 30:40] = True
    plan = plan_windows(vol, spatial_dims=spatial, patch=patch, context=context, overlap=0.25, fast=True,
                        size_divisor=net.size_divisor)
    rec = _Recording(net)
    sliding_window(vol, softmax_predictor(rec, 2), plan, batch_size=3)
    inference_windows = list(rec.seen)
    rec.seen.clear()
    cam = gradcam(vol, rec, plan, target, layer="net.decoder.0", batch_size=2)
    assert cam.max() == pytest.approx(1.0)

    def has_target(region, start):
        k, j, i = start
        r = region.roi_kji(spatial)
        return bool(target[region.box][k : k + r[0], j : j + r[1], i : i + r[2]].any())

    assert len(inference_windows) == plan.n_windows() + 1, "the plan's windows and one uniform background window"
    assert 0 < len(rec.seen) == plan.n_windows(has_target) < plan.n_windows()
    assert len(set(rec.seen)) == len(rec.seen) and set(rec.seen) <= set(inference_windows)


def test_heatmaps_do_not_depend_on_how_the_volume_is_stored():
    """The same anatomy stored with flipped i/j axes (the NIfTI/RAS way) and permuted axes gives the same
    labels and the same Grad-CAM and uncertainty maps in physical space, as labels already do."""
    from UNetSegmentLib.image import resample

    up, _ = ct_phantom(shape_kji=(12, 72, 64), spacing=(1.1, 1.0, 3.0))
    m = up.ijk_to_ras
    k, j, i = up.array.shape
    stored = np.ascontiguousarray(np.flip(up.array, axis=(1, 2)).transpose(0, 2, 1))  # j, i flipped, then swapped
    new = np.eye(4)
    new[:3, 0], new[:3, 1], new[:3, 2] = -m[:3, 1], -m[:3, 0], m[:3, 2]
    new[:3, 3] = (m @ np.array([i - 1, j - 1, 0, 1.0]))[:3]
    other = Image(stored, new)
    params = SegmentParams(heatmaps=("gradcam", "uncertainty"), device="cpu")
    a = segment([up], load_bundle("tiny-blob"), params)
    b = segment([other], load_bundle("tiny-blob"), params)
    assert a.labels.array.any()
    back = lambda im: resample(im, up.array.shape, up.ijk_to_ras, order=0).array  # noqa: E731 - exact: same voxel centres
    np.testing.assert_array_equal(back(b.labels), a.labels.array)
    for kind in ("gradcam", "uncertainty"):
        np.testing.assert_allclose(back(b.heatmaps[kind]), a.heatmaps[kind].array, atol=1e-6)


def test_one_pass_prediction_and_explanation_equal_the_two_passes(monkeypatch, tmp_path):
    """With fitted windows (one per slice) the fast engine's Grad-CAM rides on the inference pass: the
    same probabilities and the same map as inference followed by a separate Grad-CAM, for a bundle
    whose lesion labels are several classes and one label is context (the compartment case)."""
    from conftest import write_compartment_bundle

    from UNetSegmentLib.engine import pipeline
    from UNetSegmentLib.engine.heatmaps import explains_in_one_pass

    bundle = load_bundle(str(write_compartment_bundle(tmp_path / "classes")))
    net = bundle.build_network()
    img, mask = ct_phantom(shape_kji=(10, 90, 80), spacing=(1.2, 1.3, 4.0),
                           direction=np.array([[-1, 0, 0], [0, 0.97, -0.24], [0, 0.24, 0.97]]))
    s = resolve(SegmentParams(), bundle)
    used = []
    real = pipeline.predict_and_explain
    monkeypatch.setattr(pipeline, "predict_and_explain", lambda *a, **k: used.append(1) or real(*a, **k))
    fused = segment([img], bundle, network=net, settings=s)
    assert used, "the fast engine's fitted plan explains in the inference pass"
    monkeypatch.setattr(pipeline, "explains_in_one_pass", lambda *a: False)
    separate = segment([img], bundle, network=net, settings=s)
    assert (fused.labels.array == 1).any() and (fused.labels.array == 4).any(), "a lesion and its context rim"
    assert np.array_equal(fused.labels.array, separate.labels.array)
    np.testing.assert_allclose(fused.probability.array, separate.probability.array, atol=1e-6)
    for v in fused.class_probabilities:
        np.testing.assert_allclose(fused.class_probabilities[v].array, separate.class_probabilities[v].array, atol=1e-6)
    np.testing.assert_allclose(fused.heatmaps["gradcam"].array, separate.heatmaps["gradcam"].array, atol=1e-5)
    assert 0.9 < fused.heatmaps["gradcam"].array.max() <= 1.0  # 1 on the network grid, resampled to the input's
    assert fused.heatmaps["gradcam"].array[mask].mean() > 3 * fused.heatmaps["gradcam"].array[~mask].mean()
    assert fused.timings["gradcam_s"] > 0
    plan = plan_windows(np.zeros((1, 4, 64, 64), np.float32), spatial_dims=2, patch=(32, 32), context=0, overlap=0.25,
                        fast=False, size_divisor=16)
    assert not explains_in_one_pass(plan, "hirescam", False), "overlapping training-size windows: two passes"
    fitted = plan_windows(np.pad(np.ones((1, 4, 40, 40), np.float32), ((0, 0), (0, 0), (12, 12), (12, 12))),
                          spatial_dims=2, patch=(32, 32), context=0, overlap=0.25, fast=True, size_divisor=16)
    assert explains_in_one_pass(fitted, "hirescam", False)
    assert not explains_in_one_pass(fitted, "hirescam", True), "TTA: the prediction is a mean of mirrored passes"
    assert not explains_in_one_pass(fitted, "gradinput", False), "gradient × input needs the graph from the input"


def test_one_pass_equals_two_passes_for_a_2p5d_model_with_a_temperature(monkeypatch, tmp_path):
    """The same for 2.5D context slices (the slab boxes hold the neighbours their windows read) and a
    calibrated model (softmax of logits / T; Grad-CAM explains the raw logits in both paths)."""
    from conftest import write_bundle

    from UNetSegmentLib.engine import pipeline

    folder = write_bundle(tmp_path / "b", dims="2.5d", context=1, n_labels=2, seed=3,
                          extra_meta={"calibration": {"temperature": 1.7}})
    bundle = load_bundle(str(folder))
    net = bundle.build_network()
    img, _ = ct_phantom(shape_kji=(11, 70, 64), spacing=(1.5, 1.5, 3.0))
    s = resolve(SegmentParams(threshold=0.3), bundle)
    assert s.model.temperature == pytest.approx(1.7)
    used = []
    real = pipeline.predict_and_explain
    monkeypatch.setattr(pipeline, "predict_and_explain", lambda *a, **k: used.append(1) or real(*a, **k))
    fused = segment([img], bundle, network=net, settings=s)
    assert used
    monkeypatch.setattr(pipeline, "explains_in_one_pass", lambda *a: False)
    separate = segment([img], bundle, network=net, settings=s)
    assert (fused.labels.array > 0).any() and fused.heatmaps["gradcam"].array.max() > 0
    assert np.array_equal(fused.labels.array, separate.labels.array)
    np.testing.assert_allclose(fused.probability.array, separate.probability.array, atol=1e-6)
    np.testing.assert_allclose(fused.heatmaps["gradcam"].array, separate.heatmaps["gradcam"].array, atol=1e-5)
