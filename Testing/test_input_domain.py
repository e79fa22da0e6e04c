"""The input-domain check (engine/domain.py): the models refuse what they cannot read (exit 3, one
line naming what was seen and the fix), run anyway on request with every output marked, and accept
every head CT variant they were validated on (bench/input_domain.py measures both error kinds on
the full set)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from UNetSegmentLib.engine.domain import check_domain
from UNetSegmentLib.errors import UnusualInputError
from UNetSegmentLib.image import Image
from UNetSegmentLib.models.bundle import load_bundle
from UNetSegmentLib.models.training.head_variants import head_ct_variants
from UNetSegmentLib.phantom import head_with_blob, perfusion_phantom

from conftest import oblique_direction

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "UNetSegmentLib.cli"]


@pytest.fixture(scope="module")
def ct_model():
    return load_bundle("ct-hemorrhage")


@pytest.fixture(scope="module")
def perfusion_model():
    return load_bundle("mr-perfusion-lesion")


def chest_ct() -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"


def verdict(bundle, *images: Image):
    return check_domain(list(images), bundle.channel_names, bundle.meta)


# --- refused ------------------------------------------------------------------------------------
def test_chest_ct_is_refused_by_the_cli_with_exit_3_naming_what_was_seen(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(CLI + ["segment", "--model", "ct-hemorrhage", "--output-dir", str(out), str(chest_ct())],
                       capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    line = [l for l in r.stderr.splitlines() if l.startswith("unetsegment: error")]
    assert len(line) == 1 and "no skull" in line[0] and "--allow-unusual-input" in line[0]
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_run_anyway_marks_summary_report_and_warnings_and_keeps_the_table(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(CLI + ["segment", "--model", "ct-hemorrhage", "--output-dir", str(out), "--heatmap", "none",
                              "--allow-unusual-input", str(chest_ct())], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert "no skull" in s["unusual_input"]
    assert s["input_domain"]["verdict"] == "refuse" and s["input_domain"]["measures"]["cranial_mm"] == 0
    assert s["parameters"]["allow_unusual_input"] is True
    assert any(w.startswith("UNUSUAL INPUT") for w in s["warnings"])
    assert (out / "lesions.csv").read_text().count("\n") == s["n_lesions"] + 2  # header + rows + total
    assert (out / "report.png").stat().st_size > 0


def test_report_draws_the_unusual_input_banner(tmp_path, head_ct):
    from UNetSegmentLib.analysis.lesions import analyze_lesions
    from UNetSegmentLib.analysis.report import render_report

    img = head_ct
    lab = img.with_array(np.zeros(img.array.shape, np.uint8))
    table = analyze_lesions(lab, img, None)
    kw = dict(image=img, labels=lab, probability=None, gradcam=None, table=table, model_name="m", model_version="1",
              input_name="x", created="now")
    plain = render_report(tmp_path / "a.png", **kw)
    marked = render_report(tmp_path / "b.png", **kw, unusual_input="input CT shows no skull")
    assert marked.unusual_input and not plain.unusual_input
    assert marked.height_px > plain.height_px


def test_mni152_t1_mr_is_refused_as_another_modality(ct_model):
    nilearn = pytest.importorskip("nilearn.datasets")
    t1 = nilearn.load_mni152_template(resolution=2)
    img = Image(np.asarray(t1.get_fdata(), np.float32).transpose(2, 1, 0).copy(), t1.affine)  # nibabel's affine is IJK→RAS
    v = verdict(ct_model, img)
    assert v.verdict == "refuse" and "no air" in v.seen and "another modality" in v.seen


@pytest.mark.parametrize("channel", ["CBF", "Tmax"])
def test_a_perfusion_map_given_as_ct_is_refused(ct_model, channel):
    maps, _ = perfusion_phantom(seed=1)
    v = verdict(ct_model, maps[channel])
    assert v.verdict == "refuse" and "no air" in v.seen


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_noise_is_refused(ct_model, head_ct, kind):
    rng = np.random.default_rng(0)
    shape = head_ct.array.shape
    arr = rng.normal(0, 500, shape) if kind == "normal" else rng.uniform(-1024, 3071, shape)
    assert verdict(ct_model, head_ct.with_array(arr.astype(np.float32))).verdict == "refuse"


def test_cranial_slices_are_those_the_check_counts_on_the_network_grid_axis(ct_model, head_ct):
    from UNetSegmentLib.engine.domain import cranial_slices
    from UNetSegmentLib.engine.grid import canonical_grid

    spec = ct_model.meta["domain"]
    cranial = cranial_slices(head_ct, spec)
    assert cranial.shape == (canonical_grid(head_ct)[0].array.shape[0],)
    assert int(cranial.sum()) == verdict(ct_model, head_ct).measures["cranial_slices"] > 0
    k_flip = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, head_ct.array.shape[0] - 1], [0, 0, 0, 1.0]])
    flipped = Image(head_ct.array[::-1].copy(), head_ct.ijk_to_ras @ k_flip)  # stored upside down, same anatomy
    assert np.array_equal(cranial_slices(flipped, spec), cranial)
    noise = np.random.default_rng(0).normal(0, 500, head_ct.array.shape).astype(np.float32)
    assert not cranial_slices(head_ct.with_array(noise), spec).any()


def test_ct_stored_without_its_rescale_is_refused_with_the_fix(ct_model, head_ct):
    v = verdict(ct_model, head_ct.with_array(head_ct.array.astype(np.float32) + 1024))
    assert v.verdict == "refuse" and "RescaleIntercept" in v.fix


def test_perfusion_model_refuses_a_ct_and_noise_and_accepts_its_maps(perfusion_model, head_ct):
    maps, _ = perfusion_phantom(seed=2)
    chans = [maps[c] for c in perfusion_model.channel_names]
    assert verdict(perfusion_model, *chans).verdict == "ok"
    ct_like = [resample_like(head_ct, chans[0])] + chans[1:]
    v = verdict(perfusion_model, *ct_like)
    assert v.verdict == "refuse" and "looks like a CT" in v.seen
    rng = np.random.default_rng(0)
    noisy = [chans[0].with_array(rng.normal(0, 1, chans[0].array.shape).astype(np.float32))] + chans[1:]
    v = verdict(perfusion_model, *noisy)
    assert v.verdict == "refuse" and "negative" in v.seen
    ms = chans[:2] + [chans[2].with_array(chans[2].array * 1000.0)] + chans[3:]  # MTT in ms
    assert verdict(perfusion_model, *ms).verdict == "refuse"


def resample_like(src: Image, ref: Image) -> Image:
    from UNetSegmentLib.image import resample

    return resample(src, ref.array.shape, ref.ijk_to_ras, order=1, fill=-1000.0)


def test_refusal_is_an_input_error_in_the_api(ct_model, head_ct):
    from UNetSegmentLib import SegmentParams, segment

    noise = head_ct.with_array(np.random.default_rng(1).normal(0, 500, head_ct.array.shape).astype(np.float32))
    with pytest.raises(UnusualInputError) as e:
        segment([noise], ct_model, SegmentParams(heatmaps=()))
    assert e.value.exit_code == 3


def test_run_anyway_on_mr_says_no_air_once(ct_model, head_ct):
    """The domain check owns the CT modality rule: overriding it does not repeat it as an intensity warning."""
    from UNetSegmentLib import SegmentParams, segment

    mr = head_ct.with_array(((head_ct.array.astype(np.float32) + 1000) / 2.0).clip(0, None))  # air at 0, like an MR
    res = segment([mr], ct_model, SegmentParams(heatmaps=(), allow_unusual_input=True))
    assert [w for w in res.warnings if "air" in w] == [w for w in res.warnings if w.startswith("UNUSUAL INPUT")]
    assert len([w for w in res.warnings if w.startswith("UNUSUAL INPUT")]) == 1


# --- accepted -----------------------------------------------------------------------------------
def test_head_ct_variants_are_accepted(ct_model, head_ct):
    verdicts = {name: verdict(ct_model, img) for name, img in head_ct_variants(head_ct).items()}
    refused = {n: v.seen for n, v in verdicts.items() if v.verdict == "refuse"}
    assert not refused
    assert verdict(ct_model, head_ct).verdict == "ok"


@pytest.mark.parametrize("size", ["contract", "conftest", "small"])
def test_small_synthetic_head_phantoms_are_accepted(ct_model, size):
    if size == "contract":  # the shared contract check's phantom: ≈ 80 mm across, 3 mm oblique slices
        img, _ = head_with_blob((40, 96, 96), (0.9, 0.9, 3.0), oblique_direction(12.0))
    elif size == "conftest":
        img, _ = head_with_blob((24, 64, 64), (1.5, 1.5, 3.0))
    else:
        img, _ = head_with_blob()
    assert verdict(ct_model, img).verdict == "ok"


def test_dicom_series_of_a_head_is_accepted(tmp_path, head_ct):
    from dicom_utils import write_ct_series

    folder = tmp_path / "dcm"
    write_ct_series(head_ct, folder)
    r = subprocess.run(CLI + ["segment", "--model", "ct-hemorrhage", "--output-dir", str(tmp_path / "o"), "--heatmap",
                              "none", str(folder)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["unusual_input"] is None and s["input_domain"]["verdict"] == "ok"


def test_swapped_header_axes_give_an_orientation_warning(ct_model, head_ct):
    a = head_ct.array
    swapped = Image(np.ascontiguousarray(a.transpose(0, 2, 1)[:, :, :]), head_ct.ijk_to_ras)  # A-P stored as L-R
    v = verdict(ct_model, swapped)
    assert v.verdict == "warn" and "orientation" in v.seen


def test_thresholds_come_from_the_bundle(ct_model, head_ct):
    meta = json.loads(json.dumps(ct_model.meta))
    meta["domain"]["min_cranial_mm"] = 10_000.0
    v = check_domain([head_ct], ct_model.channel_names, meta)
    assert v.verdict == "warn" and "only" in v.seen
    assert check_domain([head_ct], ["CT"], {"inputs": meta["inputs"]}).verdict == "ok"  # no domain: no check


def test_cli_help_documents_the_override():
    r = subprocess.run(CLI + ["segment", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert "--allow-unusual-input" in r.stdout


@pytest.mark.parametrize("model,config", [("ct-hemorrhage", "ct-hemorrhage"), ("mr-perfusion-lesion", "mr-perfusion-lesion")])
def test_shipped_thresholds_are_the_training_configs(model, config):
    import yaml

    cfg = yaml.safe_load((ROOT / "Resources" / "Training" / f"{config}.yaml").read_text(encoding="utf-8"))
    assert load_bundle(model).meta["domain"] == cfg["bundle"]["domain"]


def test_enclosed_region_equals_filling_the_holes_slice_by_slice():
    """The skull's inside by one labelling is binary_fill_holes with an in-plane structure, voxel for voxel."""
    from scipy import ndimage

    from UNetSegmentLib.engine.domain import _enclosed

    rng = np.random.default_rng(7)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    for _ in range(50):
        wall = ndimage.binary_dilation(rng.random((int(rng.integers(1, 6)), 40, 50)) > rng.uniform(0.85, 0.97),
                                       iterations=int(rng.integers(0, 3)))
        expected = ndimage.binary_fill_holes(wall, structure=in_plane) & ~wall
        assert np.array_equal(_enclosed(wall), expected)
    ring = np.zeros((3, 20, 20), bool)
    ring[:, 4:16, 4] = ring[:, 4:16, 15] = ring[:, 4, 4:16] = ring[:, 15, 4:16] = True
    assert _enclosed(ring)[:, 5:15, 5:15].all() and _enclosed(ring).sum() == 3 * 100


def test_ring_closing_equals_scipys_closing_with_a_disk():
    """The bone ring's closing by running max/min filters over the disk's rectangles is scipy's
    binary_closing with the in-plane disk, voxel for voxel, for every radius and density."""
    from scipy import ndimage

    from UNetSegmentLib.engine.domain import close_in_plane, disk_rectangles

    assert disk_rectangles(3) == [(0, 3), (2, 2), (3, 0)]
    rng = np.random.default_rng(11)
    for _ in range(120):
        r = int(rng.integers(1, 9))
        mask = rng.random((int(rng.integers(1, 4)), int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.uniform(0.02, 0.6)
        disk = np.zeros((1, 2 * r + 1, 2 * r + 1), bool)
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disk[0] = yy ** 2 + xx ** 2 <= r * r
        assert np.array_equal(close_in_plane(mask, r), ndimage.binary_closing(mask, structure=disk)), r


def test_percentiles_of_large_volumes_come_from_an_even_sample_without_non_finite_values():
    from UNetSegmentLib.engine.checks import PERCENTILE_SAMPLES, finite_sample

    small = np.array([1.0, np.nan, 3.0, np.inf], np.float32)
    assert finite_sample(small).tolist() == [1.0, 3.0]
    big = np.arange(5 * PERCENTILE_SAMPLES, dtype=np.float32)
    sample = finite_sample(big)
    assert sample.size == PERCENTILE_SAMPLES and np.array_equal(sample, finite_sample(big))  # the same every time
    assert abs(np.percentile(sample, 99.5) - np.percentile(big, 99.5)) < 1e-3 * big.size
    assert finite_sample(np.arange(10, dtype=np.int16)).size == 10  # integers are all finite
    # a regular stride that divides the rows would see a few columns only: here air every 32nd column
    rows = np.full((40, 512, 512), 40.0, np.float32)
    rows[:, :, ::32] = -1000.0
    got = finite_sample(rows)
    assert abs((got == -1000.0).mean() - 1 / 32) < 0.005
