"""Compartment-labelled bleeds, oedema and mimics (UNetSegmentLib.synth_compartments), and the
compartment case generator, on the analytic head phantom of test_synth and on the real head CT."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from test_synth import GEOMETRIES, make_phantom

from UNetSegmentLib import synth
from UNetSegmentLib.errors import UsageError
from UNetSegmentLib.synth_compartments import BLEED_KINDS, CLASSES, KIND_CLASS, MIMICS, Bleed, synthesize_compartments


@pytest.fixture(scope="module")
def phantom():
    spacing, direction = GEOMETRIES["flipped_oblique"]
    img, _ = make_phantom(spacing, direction)
    return img, synth.brain_mask(img)


def _ml(img, mask) -> float:
    return float(np.count_nonzero(mask)) * img.voxel_volume_mm3 / 1000.0


@pytest.mark.parametrize("kind", BLEED_KINDS)
def test_each_kind_gets_its_class(phantom, kind):
    img, brain = phantom
    before = img.array.copy()
    volume = 6.0 if kind != "subarachnoid" else 2.0
    out, label = synthesize_compartments(img, np.random.default_rng(3), [Bleed(kind, volume)], brain=brain)
    np.testing.assert_array_equal(img.array, before)  # input untouched
    values = set(np.unique(label.array).tolist()) - {0}
    assert KIND_CLASS[kind] in values and values <= {KIND_CLASS[kind], 4}
    bleed = label.array == KIND_CLASS[kind]
    assert abs(_ml(img, bleed) - volume) <= max(img.voxel_volume_mm3 / 1000.0, 0.01 * volume) + 1e-9
    assert not (bleed & ~brain).any()
    assert out.array[bleed].mean() > before[bleed].mean() + 10.0  # hyperdense
    if kind == "subarachnoid":  # in CSF spaces, never in the ventricles (the phantom's 5 HU ellipsoids)
        assert not (bleed & (before < 15)).any()


def test_oedema_is_a_labelled_hypodense_rim_that_never_covers_blood(phantom):
    img, brain = phantom
    for seed in range(8):  # IPH carries an oedema rim 60 % of the time
        out, label = synthesize_compartments(img, np.random.default_rng(seed), [Bleed("intraparenchymal", 8.0, False)], brain=brain)
        oedema = label.array == 4
        if oedema.any():
            break
    else:
        pytest.fail("no oedema rim in 8 seeds")
    iph = label.array == 1
    assert not (oedema & iph).any()
    assert (ndimage.binary_dilation(iph, iterations=8) & oedema).sum() == oedema.sum()  # around the bleed
    assert out.array[oedema].mean() < img.array[oedema].mean() - 5.0  # darker than the brain it was


def _thickness_and_width(img, lab) -> tuple[float, float]:
    """(2 × the deepest point's distance to the lesion's edge, 2 × the farthest voxel from its centroid), mm."""
    thick = 2.0 * float(ndimage.distance_transform_edt(lab, sampling=img.spacing[::-1]).max())
    ras = img.ijk_to_ras_points(np.argwhere(lab)[:, ::-1].astype(np.float64))
    return thick, 2.0 * float(np.linalg.norm(ras - ras.mean(axis=0), axis=1).max())


def test_epidural_is_a_thick_lens_and_subdural_a_thin_crescent(head_ct):
    brain = synth.brain_mask(head_ct)
    thickness = {}
    for kind in ("epidural", "subdural"):
        _, label = synthesize_compartments(head_ct, np.random.default_rng(1), [Bleed(kind, 20.0)], brain=brain)
        lab = label.array == 2
        assert ndimage.label(lab, np.ones((3, 3, 3)))[1] == 1
        thickness[kind] = _thickness_and_width(head_ct, lab)[0]
    assert thickness["epidural"] >= 10.0 and thickness["epidural"] > 2.0 * thickness["subdural"], thickness
    for seed, volume in ((1, 40.0), (5, 13.0), (7, 60.0)):  # a lens, never a cone reaching into the brain
        _, label = synthesize_compartments(head_ct, np.random.default_rng(seed), [Bleed("epidural", volume)], brain=brain)
        thick, width = _thickness_and_width(head_ct, label.array == 2)
        assert thick <= 0.75 * width, (seed, volume, thick, width)


def test_fluid_level_makes_the_dependent_part_denser(phantom):
    img, brain = phantom
    outs = [synthesize_compartments(img, np.random.default_rng(5), [Bleed("intraparenchymal", 10.0, level)], brain=brain)
            for level in (False, True)]
    lab = outs[1][1].array == 1
    np.testing.assert_array_equal(outs[0][1].array == 1, lab)  # the same bleed, only its density differs
    idx = np.argwhere(lab)
    a = img.ijk_to_ras_points(idx[:, ::-1].astype(np.float64))[:, 1]
    diff = outs[1][0].array[lab].astype(float) - outs[0][0].array[lab].astype(float)
    assert diff[a <= np.percentile(a, 20)].mean() > 5.0 and diff[a >= np.percentile(a, 80)].mean() < -3.0


@pytest.mark.parametrize("mimic", MIMICS)
def test_mimics_change_the_ct_but_are_never_labelled(head_ct, mimic):
    brain = synth.brain_mask(head_ct)
    out, label = synthesize_compartments(head_ct, np.random.default_rng(2), [], (mimic,), brain=brain)
    assert not label.array.any()
    changed = np.abs(out.array.astype(float) - head_ct.array) > 5
    assert changed.sum() > 20
    if mimic.endswith("calcification"):
        assert out.array[changed].max() >= 100  # denser than any blood
    elif mimic == "dense_sinus":
        assert 55 <= np.median(out.array[changed]) <= 80  # as dense as blood: the mimic to learn


def test_bleeds_keep_away_from_mimics(head_ct):
    """Calcifications next to bleeds and their oedema stay unlabelled."""
    brain = synth.brain_mask(head_ct)
    bleeds = [Bleed("intraparenchymal", 15.0, False), Bleed("contusion", 5.0), Bleed("intraventricular", 4.0)]
    mimics = ("basal_ganglia_calcification", "choroid_calcification", "pineal_calcification")
    for seed in range(2):
        out, label = synthesize_compartments(head_ct, np.random.default_rng(seed), bleeds, mimics, brain=brain)
        assert (out.array > 140).sum() > (head_ct.array > 140).sum()  # the calcifications are there
        assert not (out.array[label.array > 0] >= 140).any()


def test_bad_kinds_are_refused(phantom):
    img, brain = phantom
    with pytest.raises(UsageError, match="unknown bleed kind"):
        synthesize_compartments(img, np.random.default_rng(0), [Bleed("hygroma")], brain=brain)
    with pytest.raises(UsageError, match="unknown mimic"):
        synthesize_compartments(img, np.random.default_rng(0), [], ("tumour",), brain=brain)
    with pytest.raises(UsageError, match="volume must be positive"):
        Bleed("epidural", -2.0)
    with pytest.raises(UsageError, match="contrast"):
        Bleed("subdural", density_hu=60.0, contrast_hu=15.0)


def test_single_label_cases_are_unchanged_by_the_class_machinery(phantom):
    """The one-label generator paints what it always painted: label 1 only, the rim not labelled."""
    img, brain = phantom
    _, label = synth.synthesize_hemorrhage(img, np.random.default_rng(0), "intraparenchymal", 8.0, brain=brain)
    assert set(np.unique(label.array).tolist()) == {0, 1}


def test_compartment_case_generator_is_deterministic_and_labels_bleed_classes():
    from UNetSegmentLib.models.training.cases import ct_hemorrhage_compartments_case

    seen: set[int] = set()
    for seed in range(6):
        (ct,), label = ct_hemorrhage_compartments_case(seed)
        assert ct.same_grid(label) and label.array.dtype == np.uint8
        assert set(np.unique(label.array).tolist()) <= {0, *CLASSES}
        seen |= set(np.unique(label.array).tolist())
        if seed == 0:
            np.testing.assert_array_equal(ct_hemorrhage_compartments_case(0)[1].array, label.array)
    assert {1, 2} <= seen, seen


def test_one_label_cases_can_carry_unlabelled_mimics():
    """``Settings.mimic_fraction`` paints mimics into one-label cases and leaves them out of the label."""
    from UNetSegmentLib.models.training.cases import TRAINING, ct_hemorrhage_case

    quiet = replace(TRAINING, negative_fraction=1.0, noise_hu=(0.0, 0.0), hu_shift=(0.0, 0.0))
    (with_mimics,), label = ct_hemorrhage_case(11, replace(quiet, mimic_fraction=1.0))
    (plain,), plain_label = ct_hemorrhage_case(11, quiet)
    assert not label.array.any() and not plain_label.array.any()  # negatives: mimics are not bleeds
    assert with_mimics.same_grid(plain)
    inside = ndimage.binary_erosion(synth.brain_mask(plain), iterations=3)
    # a calcification (this seed draws one): ≥ 60 HU above the same head without mimics, inside the brain
    assert ((with_mimics.array - plain.array) > 60)[inside].sum() > 5
