"""Re-deriving a finished run at another threshold, and the ROI crop: equal to what the core does itself."""
from __future__ import annotations

import json

import numpy as np
import pytest

from UNetSegmentLib.models.bundle import load_bundle
from UNetSegmentLib.errors import InputError
from UNetSegmentLib.image import Image
from UNetSegmentLib.io.readers import read_image
from UNetSegmentLib.io.writers import write_image
from UNetSegmentLib.serving.job import segment_files
from UNetSegmentLib.io.outputs import CONTRACT_FILES
from UNetSegmentLib.params import SegmentParams
from UNetSegmentLib.phantom import head_with_blob
from UNetSegmentLib.analysis.rethreshold import export_run, labels_at_threshold, load_run, rederive_run, table_from_summary
from UNetSegmentLib.engine.roi import box_from_ras_bounds, crop, uncrop

from conftest import oblique_direction


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same input segmented at the model's threshold and at 0.8 (min lesion 0.05 mL)."""
    d = tmp_path_factory.mktemp("rethreshold")
    image, _ = head_with_blob(direction=oblique_direction(), seed=3)
    ct = d / "ct.nrrd"
    write_image(image, ct)
    base = segment_files([str(ct)], d / "base", "tiny-blob", SegmentParams(device="cpu", heatmaps=(), min_lesion_ml=0.05))
    high = segment_files([str(ct)], d / "high", "tiny-blob",
                         SegmentParams(device="cpu", heatmaps=(), min_lesion_ml=0.05, threshold=0.8))
    return d, image, ct, base, high


def test_rederive_equals_a_fresh_run_at_that_threshold(runs):
    d, image, _, _, _ = runs
    run = load_run(d / "base")
    derived = rederive_run(run, load_bundle("tiny-blob"), 0.8, intensity=image)
    fresh = read_image(d / "high" / "segmentation.nii.gz")
    assert np.array_equal(derived.labels.array, fresh.array)
    assert derived.table.to_text(",") == (d / "high" / "lesions.csv").read_text()


def test_rederive_at_the_run_threshold_reproduces_the_run(runs):
    d, image, _, _, _ = runs
    run = load_run(d / "base")
    derived = rederive_run(run, load_bundle("tiny-blob"), run.threshold, intensity=image)
    assert np.array_equal(derived.labels.array, run.labels.array)
    assert derived.table.to_text(",") == (d / "base" / "lesions.csv").read_text()
    assert table_from_summary(run.summary).to_text(",") == (d / "base" / "lesions.csv").read_text()


def test_export_copies_at_the_run_threshold_and_rewrites_at_another(runs, tmp_path):
    d, image, ct, _, _ = runs
    run, bundle = load_run(d / "base"), load_bundle("tiny-blob")
    export_run(run, tmp_path / "same")
    for f in CONTRACT_FILES:
        if (d / "base" / f).exists():
            assert (tmp_path / "same" / f).read_bytes() == (d / "base" / f).read_bytes(), f
    summary = export_run(run, tmp_path / "other", bundle=bundle, threshold=0.8, inputs=[image], input_paths=[str(ct)])
    assert summary["parameters"]["threshold"] == 0.8 and summary["rederived_from"]["threshold"] == run.threshold
    assert np.array_equal(read_image(tmp_path / "other" / "segmentation.nii.gz").array,
                          read_image(d / "high" / "segmentation.nii.gz").array)
    assert (tmp_path / "other" / "lesions.csv").read_text() == (d / "high" / "lesions.csv").read_text()
    assert json.loads((tmp_path / "other" / "summary.json").read_text())["lesions"] == \
        json.loads((d / "high" / "summary.json").read_text())["lesions"]
    with pytest.raises(Exception, match="already holds outputs"):
        export_run(run, tmp_path / "other", bundle=bundle, threshold=0.8, inputs=[image])


def test_multi_label_rethreshold_keeps_labels_and_fills_new_voxels_from_the_nearest():
    prob = np.zeros((1, 1, 8), np.float32)
    prob[0, 0, :] = [0.1, 0.6, 0.9, 0.4, 0.45, 0.9, 0.6, 0.1]
    previous = np.array([[[0, 1, 1, 0, 0, 2, 2, 0]]], np.uint8)
    p, prev = Image(prob, np.eye(4)), Image(previous, np.eye(4))
    assert labels_at_threshold(p, 0.5, [1, 2], prev).array.tolist() == previous.tolist()
    assert labels_at_threshold(p, 0.35, [1, 2], prev).array.tolist() == [[[0, 1, 1, 1, 2, 2, 2, 0]]]
    assert labels_at_threshold(p, 0.85, [1, 2], prev).array.tolist() == [[[0, 0, 1, 0, 0, 2, 0, 0]]]


def test_roi_box_crop_and_uncrop_keep_the_grid():
    image, blob = head_with_blob(direction=oblique_direction(20.0))
    ijk = np.argwhere(blob)[:, ::-1]
    ras = image.ijk_to_ras_points(ijk)
    lo, hi = ras.min(0), ras.max(0)
    box = box_from_ras_bounds(image, [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]])
    part = crop(image, box)
    assert part.array.shape == tuple(s.stop - s.start for s in box)
    assert np.array_equal(part.array, image.array[box])  # same voxels ...
    first = np.array([box[2].start, box[1].start, box[0].start])
    assert np.allclose(part.ijk_to_ras_points([0, 0, 0]), image.ijk_to_ras_points(first))  # ... at the same place
    assert blob[box].sum() == blob.sum()  # the RAS box of the blob holds the whole blob
    back = uncrop(part.with_array(blob[box].astype(np.uint8)), image, box)
    assert back.same_grid(image) and np.array_equal(back.array.astype(bool), blob)
    with pytest.raises(InputError, match="does not overlap"):
        box_from_ras_bounds(image, [1e4, 1e4 + 1, 0, 1, 0, 1])
