"""Demos for every bundled model, the synthetic perfusion case, per-channel intensity checks and the
perfusion report's channel, and the fetch-sample hints."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from UNetSegmentLib.serving import job
from UNetSegmentLib.models.bundle import available_models, bundled_models_dir, load_bundle
from UNetSegmentLib.engine.checks import check_for_model
from UNetSegmentLib.cli import build_parser, main
from UNetSegmentLib.demo import demo_inputs, run_demo
from UNetSegmentLib.io import sample
from UNetSegmentLib.params import SegmentParams
from UNetSegmentLib.phantom import PERFUSION_CHANNELS, perfusion_phantom
from UNetSegmentLib.analysis.report import percentile_window

BUNDLED = sorted(p.name for p in bundled_models_dir().iterdir() if (p / "model.json").is_file())
CHEAP = SegmentParams(heatmaps=(), device="cpu")  # no Grad-CAM: the demos' own figures are what is checked


def _spec(channel: str) -> dict:
    return next(s for s in load_bundle("mr-perfusion-lesion").meta["inputs"] if s["name"] == channel)


def test_every_bundled_model_is_listed():
    assert set(BUNDLED) <= set(available_models()) and "mr-perfusion-lesion" in BUNDLED


@pytest.mark.parametrize("model", [m for m in BUNDLED if m != "mr-perfusion-lesion"])
def test_demo_runs_for_every_ct_model(model, tmp_path):
    summary = run_demo(tmp_path / "out", model, params=CHEAP)
    assert summary["model"]["name"] == model
    assert (tmp_path / "out" / "report.png").is_file() and (tmp_path / "out" / "summary.json").is_file()
    assert summary["n_lesions"] >= 1  # the synthetic hemorrhage is there to be found


def test_perfusion_demo_from_the_command_line(tmp_path, capsys, monkeypatch):
    """`demo --model mr-perfusion-lesion` (4 inputs) makes its case in the core and segments the core;
    the report shows Tmax with a window from its own percentiles; the table says its intensity is Tmax."""
    seen = {}

    def spy(path, **kw):  # the real report, with its arguments kept for the checks below
        seen.update(kw)
        return real(path, **kw)

    real = job.render_report
    monkeypatch.setattr(job, "render_report", spy)
    out = tmp_path / "out"
    assert main(["demo", "--model", "mr-perfusion-lesion", "-o", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "demo case for mr-perfusion-lesion" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    case = tmp_path / "cache" / next(p.name for p in (tmp_path / "cache").iterdir())
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "label.nii.gz"))) > 0
    found = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz"))) > 0
    dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
    assert summary["n_lesions"] == 1 and dice > 0.8, dice
    assert not [w for w in summary["warnings"] if "do not look like" in w]  # valid maps raise no warning
    # the intensity columns describe Tmax, and say so
    tmax = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "Tmax.nii.gz")))
    assert summary["intensity_channel"] == "Tmax" and summary["intensity_unit"] == "s"
    assert summary["columns"]["mean_intensity"]["unit"] == "s" and "(Tmax)" in summary["columns"]["mean_intensity"]["description"]
    assert summary["lesions"][0]["mean_intensity"] == pytest.approx(float(tmax[found].mean()), rel=1e-4)
    # the report shows Tmax, windowed from its own percentiles (not a fixed 0–10)
    assert np.array_equal(np.asarray(seen["image"].array), tmax)
    lo, hi = np.percentile(tmax[tmax != 0], [1, 99])
    assert seen["window"] == pytest.approx((lo, hi), rel=1e-4) and seen["intensity_label"] == "Tmax s"


def test_demo_refuses_a_model_without_a_demo_case(tmp_path):
    from conftest import write_bundle

    from UNetSegmentLib.models.bundle import load_bundle as load
    from UNetSegmentLib.errors import UsageError

    b = load(write_bundle(tmp_path / "b", channels=("T1", "FLAIR")))
    with pytest.raises(UsageError, match="has no demo case"):
        demo_inputs(b, tmp_path)


def test_perfusion_phantom_is_deterministic_and_plausible():
    maps, label = perfusion_phantom(seed=5)
    again, label2 = perfusion_phantom(seed=5)
    assert set(maps) == set(PERFUSION_CHANNELS) and np.array_equal(label.array, label2.array)
    assert all(np.array_equal(maps[c].array, again[c].array) for c in PERFUSION_CHANNELS)
    core = label.array > 0
    assert 15 < core.sum() * label.voxel_volume_mm3 / 1000 < 40  # ~25 mL
    brain = maps["CBF"].array > 0
    healthy = brain & ~core
    assert np.median(maps["CBF"].array[core]) < 0.35 * np.median(maps["CBF"].array[healthy])
    assert np.median(maps["Tmax"].array[core]) > 6 > 2 > np.median(maps["Tmax"].array[healthy])
    normal, empty = perfusion_phantom(seed=5, lesion=False)
    assert not empty.array.any()


def test_normal_perfusion_maps_pass_the_intensity_check():
    """A normal Tmax map (brain 0–2 s) once triggered 'do not look like MR (model expects about 0…40)'."""
    maps, _ = perfusion_phantom(seed=3, lesion=False)
    tmax = maps["Tmax"].array
    assert np.percentile(tmax[tmax > 0], 99) < 2.0  # really a normal map
    for c in PERFUSION_CHANNELS:
        assert check_for_model(maps[c], c, _spec(c), "2.5d", None) == [], c


@pytest.mark.parametrize("channel,scale", [("Tmax", 1000.0), ("MTT", 1000.0), ("CBF", 0.01), ("CBV", 0.01)])
def test_maps_in_the_wrong_units_are_flagged(channel, scale):
    maps, _ = perfusion_phantom(seed=3, lesion=False)
    img = maps[channel].with_array(maps[channel].array * scale)
    (w,) = check_for_model(img, channel, _spec(channel), "2.5d", None)
    assert f"do not look like MR {channel}" in w and "right units" in w


def test_percentile_window_ignores_the_zero_background():
    maps, _ = perfusion_phantom(seed=1)
    a = maps["Tmax"].array
    lo, hi = percentile_window(maps["Tmax"], (1, 99))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(a[a != 0], [1, 99])))
    assert percentile_window(maps["Tmax"].with_array(np.zeros_like(a)), (1, 99)) == (0.0, 1.0)


def test_fetch_sample_hints_name_only_its_own_options():
    """Every `unetsegment fetch-sample ...` in a fallback hint uses options its --help lists."""
    sub = build_parser()._subparsers._group_actions[0].choices["fetch-sample"]
    options = {o for a in sub._actions for o in a.option_strings}
    hints = [sample._MANUAL_FIX]
    hints += re.findall(r'"(install dpkg[^"]*)"', open(sample.__file__, encoding="utf-8").read())
    used = [opt for h in hints for cmd in re.findall(r"`unetsegment fetch-sample ([^`]*)`", h) for opt in re.findall(r"--[a-z-]+", cmd)]
    assert used and set(used) <= options
    assert "`source`" not in " ".join(hints)


def test_fetch_sample_source_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fetch-sample", "--help"])
    assert "--source" in capsys.readouterr().out
    assert main(["fetch-sample", "--cache-dir", str(tmp_path), "--source", str(tmp_path / "missing.deb")]) == 3
    assert "--source" in capsys.readouterr().err
