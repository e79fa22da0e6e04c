"""Resolve once, end to end: the model's defaults reach every front end the same way.

The model's ``inference.tta`` used to be applied only by the Slicer panel; the CLI ignored it. Now
``settings.resolve`` is the one place, and the summary states what was used."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, ct_phantom, write_bundle

from UNetSegmentLib.io.writers import write_image
from UNetSegmentLib.params import SegmentParams
from UNetSegmentLib.serving.job import segment_files
from UNetSegmentLib.settings import resolve


def _case(tmp_path, tta: bool):
    bundle = write_bundle(tmp_path / "bundle", extra_meta={"inference": {"overlap": 0.25, "batch_size": 2, "tta": tta,
                                                                          "min_lesion_ml": 0.01}})
    img, _ = ct_phantom(shape_kji=(6, 32, 32))
    write_image(img, tmp_path / "ct.nrrd")
    return bundle, tmp_path / "ct.nrrd"


def test_model_tta_default_is_used_by_the_python_api(tmp_path):
    bundle, ct = _case(tmp_path, tta=True)
    s = segment_files([str(ct)], tmp_path / "out", str(bundle), SegmentParams(heatmaps=("uncertainty",), device="cpu"))
    assert s["parameters"]["tta"] is True and s["parameters"]["min_lesion_ml"] == 0.01
    assert s["uncertainty"].startswith("tta_variance")  # the mirror passes really ran


def test_model_tta_default_is_used_by_the_cli_and_no_tta_overrides_it(tmp_path):
    bundle, ct = _case(tmp_path, tta=True)
    base = [sys.executable, "-m", "UNetSegmentLib.cli", "segment", str(ct), "--model", str(bundle), "--device", "cpu",
            "--heatmap", "uncertainty", "-q"]
    env = {"PYTHONPATH": str(REPO / "UNetSegment"), "PATH": "/usr/bin:/bin"}
    for extra, want in (([], True), (["--no-tta"], False)):
        out = tmp_path / f"out{len(extra)}"
        r = subprocess.run([*base, "-o", str(out), *extra], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["parameters"]["tta"] is want
        assert summary["uncertainty"].startswith("tta_variance" if want else "predictive_entropy")


def test_resolve_is_the_only_place_defaults_come_from(tmp_path):
    bundle, _ = _case(tmp_path, tta=False)
    from UNetSegmentLib.models.bundle import load_bundle

    b = load_bundle(str(bundle))
    s = resolve(SegmentParams(), b, hardware=False)
    assert (s.threshold, s.overlap, s.batch_size, s.tta, s.min_lesion_ml) == (0.5, 0.25, 2, False, 0.01)
    s = resolve(SegmentParams(threshold=0.3, overlap=0.5, batch_size=1, tta=True, min_lesion_ml=0.0), b, hardware=False)
    assert (s.threshold, s.overlap, s.batch_size, s.tta, s.min_lesion_ml) == (0.3, 0.5, 1, True, 0.0)
    assert s.model.context == 0 and s.model.spatial_dims == 2 and s.model.out_channels == 2
