"""The ``segment`` command-line contract that other tools rely on, checked against the installed CLI
with the default model (formerly an external script beside the repository; now self-contained).

One oblique, flipped, anisotropic CT-like volume with one bright blob; the checks: the output files,
every volume on the input's grid, the .seg.nrrd header, the lesion table's 32 columns (in order) and
its agreement with the label map, refusal to overwrite, and one-line errors with the documented exit
codes. Segmentation quality is not judged here.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

#: the contract's first 32 columns, spelled out here on purpose: other tools read them by name
CONTRACT_COLUMNS = (
    "lesion,label,voxels,volume_mm3,volume_ml,centroid_r,centroid_a,centroid_s,centroid_i,centroid_j,"
    "centroid_k,inside_r,inside_a,inside_s,slice_axis,slice_index,slice_first,slice_last,n_slices,"
    "largest_area_slice,largest_area_mm2,max_inplane_diameter_mm,extent_r_mm,extent_a_mm,extent_s_mm,"
    "mean_intensity,std_intensity,max_intensity,mean_probability,max_probability,side,touches_border").split(",")


def _cli() -> list[str]:
    """The installed ``unetsegment`` entry point (``make test`` installs it), else the module."""
    exe = Path(sys.executable).parent / "unetsegment"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "UNetSegmentLib.cli"]


def run(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    return subprocess.run(_cli() + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)


def synthetic_ct(path: Path) -> sitk.Image:
    rng = np.random.default_rng(7)
    k, j, i = np.mgrid[:40, :96, :96]
    head = ((i - 48) / 40.0) ** 2 + ((j - 48) / 44.0) ** 2 + ((k - 20) / 26.0) ** 2
    arr = np.full(head.shape, -1000.0)
    arr[head < 1.0] = 1000.0  # skull
    arr[head < 0.85] = 30.0  # brain
    blob = ((i - 60) / 7.0) ** 2 + ((j - 40) / 6.0) ** 2 + ((k - 22) / 3.0) ** 2 < 1.0
    arr[blob] = 70.0  # hyperdense lesion
    arr += rng.normal(0, 4, arr.shape)
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing((0.9, 0.9, 3.0))
    a = np.deg2rad(12.0)
    img.SetDirection((-1, 0, 0, 0, np.cos(a), -np.sin(a), 0, np.sin(a), np.cos(a)))  # flipped + oblique
    img.SetOrigin((40.0, -30.0, 12.5))
    sitk.WriteImage(img, str(path))
    return img


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def nrrd_header(path: Path) -> dict[str, str]:
    text = path.read_bytes()[: 1 << 16].split(b"\n\n", 1)[0].decode("latin-1")
    return dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line and not line.startswith("#"))


@pytest.fixture(scope="module")
def contract_run(tmp_path_factory):
    """One default-model run: (input path, input image, output folder)."""
    tmp = tmp_path_factory.mktemp("contract")
    src = tmp / "ct.nii.gz"
    ref = synthetic_ct(src)
    before = src.read_bytes()
    out = tmp / "out"
    r = run("segment", src, "--output-dir", out)
    assert r.returncode == 0, r.stderr[-1500:]
    assert src.read_bytes() == before, "the input file was changed"
    return src, ref, out


def test_contract_files_and_grids(contract_run):
    _, ref, out = contract_run
    names = os.listdir(out)
    assert {"segmentation.seg.nrrd", "segmentation.nii.gz", "probability.nrrd", "summary.json"} <= set(names)
    assert not [f for f in names if f.startswith(".")], names  # no temporary files left
    for f in ("segmentation.nii.gz", "probability.nrrd", "gradcam.nrrd", "uncertainty.nrrd"):
        if (out / f).exists():
            assert same_grid(sitk.ReadImage(str(out / f)), ref), f
    p = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "probability.nrrd")))
    assert p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1
    json.loads((out / "summary.json").read_text())


def test_contract_seg_nrrd_header_and_geometry(contract_run):
    _, ref, out = contract_run
    h = nrrd_header(out / "segmentation.seg.nrrd")
    need = ["Segment0_ID", "Segment0_Name", "Segment0_Color", "Segment0_LabelValue", "Segment0_Layer", "space",
            "space origin"]
    assert not [k for k in need if k not in h]
    seg = sitk.ReadImage(str(out / "segmentation.seg.nrrd"))
    assert np.allclose(seg.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    assert np.allclose(seg.GetDirection(), ref.GetDirection(), atol=1e-5)


def test_contract_lesion_table(contract_run):
    _, ref, out = contract_run
    with open(out / "lesions.csv", newline="") as f:
        header = next(csv.reader(f))
    with open(out / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # the 32 contract columns first, in order; later issues append named, unique columns after them
    assert header[: len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    extra = header[len(CONTRACT_COLUMNS):]
    assert all(extra) and len(set(extra)) == len(extra) and not set(extra) & set(CONTRACT_COLUMNS), extra
    assert rows and rows[-1]["lesion"] == "total"
    body = [r for r in rows if r["lesion"] != "total"]
    assert body, "the default model finds the synthetic blob"
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz"))) > 0
    assert sum(int(float(r["voxels"])) for r in body) == int(lab.sum())
    r = body[0]
    lps = ref.TransformContinuousIndexToPhysicalPoint((float(r["centroid_i"]), float(r["centroid_j"]), float(r["centroid_k"])))
    ras = np.array([-lps[0], -lps[1], lps[2]])
    assert np.linalg.norm(ras - [float(r["centroid_r"]), float(r["centroid_a"]), float(r["centroid_s"])]) < 1e-3


def test_contract_overwrite_policy(contract_run, tmp_path):
    src, _, out = contract_run
    r = run("segment", src, "--output-dir", out)
    assert r.returncode == 6 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = run("segment", src, "--output-dir", out, "--overwrite")
    assert r.returncode == 0, r.stderr[-500:]


def test_contract_errors_are_one_line_with_documented_codes(tmp_path):
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(flat))
    ct = tmp_path / "ct.nii.gz"
    synthetic_ct(ct)
    cases = [
        (("segment", flat, "-o", tmp_path / "o1"), (3,)),  # 2D input
        (("segment", tmp_path / "missing.nii.gz", "-o", tmp_path / "o2"), (3,)),  # missing input
        (("segment", ct, "-o", tmp_path / "o3", "--device", "nonsense"), (2, 5)),  # unknown device
    ]
    for args, codes in cases:
        r = run(*args)
        assert r.returncode in codes and "Traceback" not in r.stdout + r.stderr, (args, r.returncode, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("unetsegment: error: "), r.stderr
