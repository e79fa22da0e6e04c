"""The ``segment`` command-line contract: files, grids, exit codes, overwrite and staging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, ct_phantom, oblique_direction, write_bundle

from UNetSegmentLib.cli import main
from UNetSegmentLib.image import to_sitk
from UNetSegmentLib.io.readers import read_image
from UNetSegmentLib.io.outputs import STAGING_PREFIX

CLI = [sys.executable, "-m", "UNetSegmentLib.cli"]


@pytest.fixture
def ct_file(tmp_path) -> Path:
    img, _ = ct_phantom(shape_kji=(12, 48, 40), direction=oblique_direction(), spacing=(1.4, 1.6, 3.5))
    p = tmp_path / "ct.nii.gz"
    sitk.WriteImage(to_sitk(img), str(p))
    return p


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_segment_writes_the_contract_on_the_input_grid(tmp_path, ct_file, tiny_bundle):
    out = tmp_path / "out"
    before = ct_file.read_bytes()
    assert main(["segment", str(ct_file), "--output-dir", str(out), "--model", str(tiny_bundle), "-q"]) == 0
    assert ct_file.read_bytes() == before
    names = set(os.listdir(out))
    assert {"segmentation.seg.nrrd", "segmentation.nii.gz", "probability.nrrd", "summary.json"} <= names
    assert not [n for n in names if n.startswith(".")]
    ref = read_image(ct_file)
    for f in ("segmentation.nii.gz", "probability.nrrd", "segmentation.seg.nrrd"):
        img = read_image(out / f)
        assert img.same_grid(ref, atol=1e-5), f
    prob = sitk.ReadImage(str(out / "probability.nrrd"))
    assert prob.GetPixelID() == sitk.sitkFloat32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == "test-model" and summary["device"] == "cpu"
    assert summary["geometry"]["shape_ijk"] == list(ref.shape_ijk)
    assert {"read_s", "preprocess_s", "inference_s", "write_s", "total_s"} <= set(summary["timings_s"])


def test_seg_nrrd_reads_back_in_slicerio_with_segment_metadata(tmp_path, ct_file, tiny_bundle):
    import slicerio

    out = tmp_path / "out"
    assert main(["segment", str(ct_file), "-o", str(out), "--model", str(tiny_bundle), "-q"]) == 0
    seg = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))
    ref = read_image(ct_file)
    np.testing.assert_allclose(seg["ijkToLPS"], ref.ijk_to_lps, atol=1e-5)
    assert [s["name"] for s in seg["segments"]] == ["lesion1"]
    assert seg["segments"][0]["labelValue"] == 1 and seg["segments"][0]["layer"] == 0
    lab = read_image(out / "segmentation.nii.gz").array
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), lab)


def test_existing_outputs_refused_without_overwrite_and_stale_files_removed_with_it(tmp_path, ct_file, tiny_bundle):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "uncertainty.nrrd").write_text("stale from an earlier run")
    stale_stage = out / f"{STAGING_PREFIX}999999-x"
    stale_stage.mkdir()
    r = run_cli("segment", ct_file, "-o", out, "--model", tiny_bundle)
    assert r.returncode == 6 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert (out / "uncertainty.nrrd").read_text() == "stale from an earlier run"
    r = run_cli("segment", ct_file, "-o", out, "--model", tiny_bundle, "--overwrite", "--heatmap", "none")
    assert r.returncode == 0, r.stderr
    assert not (out / "uncertainty.nrrd").exists()  # stale contract file of the earlier run
    assert (out / "notes.txt").read_text() == "mine"  # never touched
    assert not stale_stage.exists()


@pytest.mark.parametrize(
    "case,code",
    [("missing", 3), ("2d", 3), ("4d", 3), ("device", 5), ("model", 4), ("usage", 2), ("names", 3), ("count", 3)],
)
def test_errors_are_one_line_with_documented_exit_codes(tmp_path, ct_file, tiny_bundle, case, code):
    out = tmp_path / "o"
    args = ["segment", ct_file, "-o", out, "--model", tiny_bundle]
    if case == "missing":
        args[1] = tmp_path / "nope.nii.gz"
    elif case == "2d":
        p = tmp_path / "flat.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(p))
        args[1] = p
    elif case == "4d":
        p = tmp_path / "four.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 8, 8), np.int16), isVector=False), str(p))
        args[1] = p
    elif case == "device":
        args += ["--device", "nonsense"]
    elif case == "model":
        args[-1] = tmp_path / "no-model"
    elif case == "usage":
        args += ["--threshold", "7"]
    elif case == "names":
        args[1] = f"CBF={ct_file}"
    elif case == "count":
        args.insert(2, ct_file)
    r = run_cli(*args)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    if code != 2:
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("unetsegment: error:")
    assert not out.exists() or not [f for f in os.listdir(out) if not f.startswith(".")]


def test_named_inputs_map_to_channels_in_bundle_order(tmp_path):
    bundle = write_bundle(tmp_path / "b2", channels=("CBF", "CBV"))
    a, _ = ct_phantom(shape_kji=(8, 32, 32), seed=1)
    b, _ = ct_phantom(shape_kji=(8, 32, 32), seed=2)
    pa, pb = tmp_path / "a.nrrd", tmp_path / "b.mha"
    sitk.WriteImage(to_sitk(a), str(pa))
    sitk.WriteImage(to_sitk(b), str(pb))
    assert main(["segment", f"CBV={pb}", f"cbf={pa}", "-o", str(tmp_path / "o1"), "--model", str(bundle), "-q"]) == 0
    assert main(["segment", str(pa), str(pb), "-o", str(tmp_path / "o2"), "--model", str(bundle), "-q"]) == 0
    s1 = json.loads((tmp_path / "o1" / "summary.json").read_text())
    assert [i["channel"] for i in s1["inputs"]] == ["CBF", "CBV"]
    assert s1["inputs"][0]["path"] == str(pa.resolve())
    p1 = read_image(tmp_path / "o1" / "probability.nrrd").array
    p2 = read_image(tmp_path / "o2" / "probability.nrrd").array
    np.testing.assert_array_equal(p1, p2)


def test_models_list_show_verify_import(tmp_path, tiny_bundle, monkeypatch, capsys):
    monkeypatch.setenv("UNETSEGMENT_MODELS", str(tmp_path / "user-models"))
    assert main(["models", "verify", str(tiny_bundle)]) == 0
    assert "sha256 matches" in capsys.readouterr().out
    assert main(["models", "import", str(tiny_bundle)]) == 0
    assert main(["models", "list"]) == 0
    assert "test-model" in capsys.readouterr().out
    assert main(["models", "show", "test-model"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "test-model"
    assert main(["models", "import", str(tiny_bundle)]) == 4  # already there, no --overwrite


# the command-line contract with the default model: Testing/test_contract.py (self-contained)


def test_dicom_series_input_also_writes_a_dicom_seg(tmp_path):
    from dicom_utils import write_ct_series

    img, mask = ct_phantom(shape_kji=(10, 96, 96), spacing=(1.0, 1.0, 3.0))
    folder = tmp_path / "series"
    write_ct_series(img, folder)
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--model", "tiny-blob", "-q", "--heatmap", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_lesions"] >= 1
    assert summary["dicom_seg"] == {"file": "segmentation.dcm"}
    import highdicom as hd

    seg = hd.seg.segread(str(out / "segmentation.dcm"))
    assert seg.SegmentSequence[0].SegmentLabel == "blob"
    # a negative scan: no DICOM SEG, and the summary says why
    neg, _ = ct_phantom(shape_kji=(10, 96, 96), spacing=(1.0, 1.0, 3.0), blob=False, seed=3)
    write_ct_series(neg, tmp_path / "neg")
    out2 = tmp_path / "out2"
    assert main(["segment", str(tmp_path / "neg"), "-o", str(out2), "--model", "tiny-blob", "-q", "--heatmap", "none"]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["n_lesions"] == 0 and s2["total_volume_ml"] == 0
    assert not (out2 / "segmentation.dcm").exists() and "no lesion" in s2["dicom_seg"]["absent_because"]
    rows = (out2 / "lesions.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and rows[1].startswith("total,")
    assert (out2 / "report.png").exists() and (out2 / "segmentation.seg.nrrd").exists()


def test_the_console_command_exits_at_once_after_segment_with_everything_written_and_printed(tmp_path, ct_file,
                                                                                            tiny_bundle):
    """``segment`` ends without the interpreter's teardown (cli.FAST_EXIT_COMMANDS): the outputs are
    complete and their digests match, the result lines reach a pipe, and the exit codes stay those of
    the documented errors."""
    from UNetSegmentLib.io.outputs import file_digests

    out = tmp_path / "out"
    r = run_cli("segment", ct_file, "-o", out, "--model", tiny_bundle, "-q")
    assert r.returncode == 0, r.stderr
    assert "model test-model" in r.stdout and str(out) in r.stdout  # stdout flushed before the exit
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files_sha256"] == file_digests(out) and "report.png" in summary["files_sha256"]
    bad = run_cli("segment", tmp_path / "missing.nii.gz", "-o", tmp_path / "o2", "--model", tiny_bundle)
    assert bad.returncode == 3 and "input not found" in bad.stderr
    # a reader that goes away before the result is printed (``| head -1``): the run is still complete, exit 0
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    p = subprocess.Popen(CLI + ["segment", str(ct_file), "-o", str(tmp_path / "o3"), "--model", str(tiny_bundle), "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and "error" not in err, err
    assert json.loads((tmp_path / "o3" / "summary.json").read_text())["files_sha256"] == file_digests(tmp_path / "o3")


@pytest.mark.parametrize("flag, bad", [("--threshold-sweep", "0"), ("--threshold-sweep", "0.4,1"), ("--threshold-sweep", "a"),
                                       ("--min-lesion-sweep", "-0.1")])
def test_evaluate_sweep_values_are_checked_before_any_work(capsys, flag, bad):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", "tiny-blob", "--cases", "no-such-folder", flag, bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and repr(bad) in err, err  # names the flag and the value it refused
