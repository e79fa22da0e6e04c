"""The shipped ct-hemorrhage model on the real head CT: found lesions, and the same answer whatever the storage
orientation (flipped, axis-permuted) — the geometry path is exact for those — and still found on thick slices."""
from __future__ import annotations

import numpy as np
import pytest

from UNetSegmentLib.models.bundle import load_bundle
from UNetSegmentLib.analysis.evaluate import score_case
from UNetSegmentLib.image import Image
from UNetSegmentLib.params import SegmentParams
from UNetSegmentLib.engine.pipeline import segment
from UNetSegmentLib.synth import make_demo_case
from UNetSegmentLib.models.training.cases import Settings, reslice


@pytest.fixture(scope="module")
def case(head_ct):
    ct, label = make_demo_case(head_ct, seed=2026)
    k = np.flatnonzero(label.array.reshape(label.array.shape[0], -1).any(1))
    sl = slice(max(0, k.min() - 4), k.max() + 5)  # the slab holding the lesions keeps the test quick
    m = ct.ijk_to_ras.copy()
    m[:3, 3] = ct.ijk_to_ras_points([[0, 0, sl.start]])[0]
    return Image(ct.array[sl], m), Image(label.array[sl], m)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle("ct-hemorrhage")


def _run(img, bundle):
    return segment([img], bundle, SegmentParams(heatmaps=()))


def test_finds_the_demo_hemorrhage(case, bundle):
    ct, truth = case
    r = score_case("demo", truth, _run(ct, bundle).labels)
    assert all(l["detected"] for l in r.true_lesions if l["volume_ml"] >= 0.5)
    assert r.dice > 0.85


def test_same_answer_for_flipped_and_permuted_storage(case, bundle):
    ct, _ = case
    ref = _run(ct, bundle).labels.array
    # stored right-left and anterior-posterior flipped
    m = ct.ijk_to_ras.copy()
    m[:3, 0] *= -1
    m[:3, 1] *= -1
    m[:3, 3] = ct.ijk_to_ras_points([[ct.shape_ijk[0] - 1, ct.shape_ijk[1] - 1, 0]])[0]
    flipped = Image(np.ascontiguousarray(ct.array[:, ::-1, ::-1]), m)
    out = _run(flipped, bundle).labels.array
    np.testing.assert_array_equal(out[:, ::-1, ::-1], ref)
    # stored with i and j swapped
    p = ct.ijk_to_ras.copy()
    p[:3, [0, 1]] = p[:3, [1, 0]]
    swapped = Image(np.ascontiguousarray(ct.array.transpose(0, 2, 1)), p)
    np.testing.assert_array_equal(_run(swapped, bundle).labels.array.transpose(0, 2, 1), ref)


def test_thick_oblique_reslice_still_finds_the_hemorrhage(case, bundle):
    ct, truth = case
    rng = np.random.default_rng(7)
    thick, lab = reslice(ct, rng, Settings(rotation_deg=12, thickness_mm=(4.5, 5.0)), label=truth)
    r = score_case("thick", lab, _run(thick, bundle).labels)
    big = [l for l in r.true_lesions if l["volume_ml"] >= 5]
    assert big and all(l["detected"] for l in big)
    assert r.dice > 0.7


def test_fast_engine_matches_the_plain_engine_on_the_real_ct(case, bundle):
    """The fast engine (body crop on the pooling grid, per-slab fitted windows, folded channels-last
    net) vs the plain one, fp32. Stated tolerance: labels Dice ≥ 0.999; |Δp| ≤ 0.01 at 99.99 % of
    voxels and ≤ 0.3 anywhere (single voxels at the edge of small slabs; on the demo CT: 8 voxels
    changed label, max 0.18); the Grad-CAM maps correlate ≥ 0.95."""
    ct, _ = case
    fast = segment([ct], bundle, SegmentParams(precision="fp32", engine="fast"))
    plain = segment([ct], bundle, SegmentParams(precision="fp32", engine="plain"))
    a, b = fast.labels.array > 0, plain.labels.array > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.999
    d = np.abs(fast.probability.array - plain.probability.array)
    assert np.percentile(d, 99.99) <= 0.01 and d.max() <= 0.3
    ga, gb = fast.heatmaps["gradcam"].array.ravel(), plain.heatmaps["gradcam"].array.ravel()
    assert np.corrcoef(ga, gb)[0, 1] >= 0.95


def test_perfusion_model_finds_an_unseen_infarct_core():
    """The shipped 4-channel model on a synthetic perfusion case from a seed used neither in training
    (2000–2099) nor in validation (950000–950019)."""
    from UNetSegmentLib.models.training.perfusion import CHANNELS, synthesize_perfusion_case

    maps, label = synthesize_perfusion_case(np.random.default_rng(424242), lesion=True)
    b = load_bundle("mr-perfusion-lesion")
    assert b.channel_names == list(CHANNELS)
    r = segment([maps[c] for c in CHANNELS], b, SegmentParams(heatmaps=("gradcam",)))
    s = score_case("perfusion", label, r.labels)
    assert s.dice > 0.8 and all(l["detected"] for l in s.true_lesions if l["volume_ml"] >= 0.5)
    cam = r.heatmaps["gradcam"].array
    assert cam[label.array > 0].mean() > cam[label.array == 0].mean(), "Grad-CAM sits on the core"
