"""The bad-input matrix: every row is refused (typed error, exit code, one line naming problem and fix)
or accepted with a warning (processed, warning printed and in summary.json). Every row also checks
that the input files are byte-identical afterwards, that no partial output is left and that the CLI
printed no traceback. Thresholds: ``UNetSegmentLib.engine.checks.LIMITS``."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO, ct_phantom, write_bundle
from dicom_utils import write_ct_series

from UNetSegmentLib.engine import checks
from UNetSegmentLib.models.bundle import sha256_file
from UNetSegmentLib.cli import main
from UNetSegmentLib.image import Image, make_ijk_to_ras, to_sitk
from UNetSegmentLib.io.outputs import CONTRACT_FILES, STAGING_PREFIX

HEAD = {"anatomy": {"name": "head", "extent_mm": [60, 330]}}
CT_RANGE = {"expected_range": [-1100, 3100]}


def _write(img: Image, path: Path) -> Path:
    sitk.WriteImage(to_sitk(img), str(path))
    return path


def _ct(tmp: Path, name="ct.nii.gz", **kw) -> Path:
    img, _ = ct_phantom(shape_kji=kw.pop("shape", (8, 48, 48)), **kw)
    return _write(img, tmp / name)


@dataclass
class Row:
    name: str
    setup: Callable[[Path], tuple[list, list]]  # tmp -> (argv after "segment", files to hash)
    code: int  # expected exit code
    match: str  # in the error line (refused) or in a warning (accepted)


def _bundle(tmp: Path, **kw) -> Path:
    return write_bundle(tmp / "bundle", extra_meta={**HEAD, **kw.pop("extra_meta", {})}, input_extra=CT_RANGE, **kw)


def _std(tmp: Path, inputs: list, **kw) -> list:
    return [*map(str, inputs), "-o", str(tmp / "out"), "--model", str(kw.get("model") or _bundle(tmp)), "-q",
            "--heatmap", "none", *kw.get("extra", [])]


# --- refused: inputs ---------------------------------------------------------------------------
def r_missing(t):
    return _std(t, [t / "nope.nii.gz"]), []


def r_garbage_nii(t):
    p = t / "junk.nii"
    p.write_bytes(b"\x00" * 100 + b"not a nifti")
    return _std(t, [p]), [p]


def r_truncated_niigz(t):
    p = _ct(t)
    cut = t / "cut.nii.gz"
    cut.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return _std(t, [cut]), [cut]


def r_truncated_nii(t):
    """SimpleITK reads this silently: the decompressed size is checked against the header."""
    p = _ct(t, "ct.nii")
    cut = t / "cut.nii"
    cut.write_bytes(p.read_bytes()[:-1000])
    return _std(t, [cut]), [cut]


def r_truncated_nrrd(t):
    img, _ = ct_phantom(shape_kji=(8, 48, 48))
    p = t / "ct.nrrd"
    sitk.WriteImage(to_sitk(img), str(p), useCompression=False)
    cut = t / "cut.nrrd"
    cut.write_bytes(p.read_bytes()[:-2000])
    return _std(t, [cut]), [cut]


def r_corrupt_nrrd_header(t):
    p = t / "bad.nrrd"
    p.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4\nencoding: raw\n\n" + b"\0" * 64)
    return _std(t, [p]), [p]


def r_corrupt_dicom(t):
    d = t / "dicom"
    d.mkdir()
    (d / "IM0001.dcm").write_bytes(b"DICM" * 50)
    return _std(t, [d]), [d / "IM0001.dcm"]


def r_dicom_two_series(t):
    img, _ = ct_phantom(shape_kji=(6, 32, 32))
    d = t / "dicom"
    files = write_ct_series(img, d, prefix="A") + write_ct_series(img, d, prefix="B", series_number=2)
    return _std(t, [d]), files


def r_dicom_missing_slice(t):
    img, _ = ct_phantom(shape_kji=(8, 32, 32))
    d = t / "dicom"
    files = write_ct_series(img, d)
    files[4].unlink()
    files.pop(4)
    return _std(t, [d]), files


def r_2d(t):
    p = t / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(p))
    return _std(t, [p]), [p]


def r_4d(t):
    p = t / "four.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8, 4], sitk.sitkInt16), str(p))
    return _std(t, [p]), [p]


def r_zero_size(t):
    p = t / "empty.nrrd"
    p.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 0 8 8\nencoding: raw\n\n")
    return _std(t, [p]), [p]


def r_spacing_zero(t):
    p = t / "zero.nrrd"
    p.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 8 8 8\n"
                  b"space directions: (0,0,0) (0,1,0) (0,0,1)\nencoding: raw\nendian: little\nspace origin: (0,0,0)\n\n"
                  + b"\0" * 1024)
    return _std(t, [p]), [p]


def r_spacing_implausible(t):
    return _std(t, [_ct(t, spacing=(1.0, 1.0, 80.0))]), []


def r_too_many_nan(t):
    img, _ = ct_phantom(shape_kji=(8, 48, 48))
    a = img.array.astype(np.float32)
    a[:2] = np.nan
    return _std(t, [_write(Image(a, img.ijk_to_ras), t / "nan.nrrd")]), []


def r_wrong_count(t):
    p = _ct(t)
    return _std(t, [p, p]), [p]


def r_wrong_name(t):
    p = _ct(t)
    return _std(t, [f"CBF={p}"]), [p]


def r_no_overlap(t):
    a = _ct(t, "a.nii.gz")
    b = _ct(t, "b.nii.gz", origin=(900.0, 900.0, 900.0))
    bundle = write_bundle(t / "b2", channels=("CBF", "CBV"))
    return _std(t, [a, b], model=bundle), [a, b]


def r_memory(t):
    return _std(t, [_ct(t)]), []


def r_single_slice_3d(t):
    p = _ct(t, shape=(1, 48, 48))
    return _std(t, [p], model=_bundle(t, dims="3d", patch=(16, 32, 32))), [p]


# --- refused: models -----------------------------------------------------------------------------
def _edit(folder: Path, fn):
    meta = json.loads((folder / "model.json").read_text())
    fn(meta)
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def r_no_model_json(t):
    b = _bundle(t)
    (b / "model.json").unlink()
    return _std(t, [_ct(t)], model=b), []


def r_schema(t):
    return _std(t, [_ct(t)], model=_edit(_bundle(t), lambda m: m.pop("labels"))), []


def r_sha(t):
    b = _bundle(t)
    return _std(t, [_ct(t)], model=_edit(b, lambda m: m["weights"].update(sha256="0" * 64))), []


def r_shapes(t):
    b = _bundle(t)
    other = write_bundle(t / "other", base=8)
    (b / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    return _std(t, [_ct(t)], model=_edit(b, lambda m: m["weights"].update(sha256=sha256_file(b / "model.safetensors")))), []


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def r_pickle(t):
    b = _bundle(t)
    with open(b / "model.pt", "wb") as f:
        pickle.dump({"w": _Payload(t / "MARKER")}, f)
    return _std(t, [_ct(t)], model=_edit(b, lambda m: m["weights"].update(file="model.pt", sha256=sha256_file(b / "model.pt")))), []


# --- refused: device and output ------------------------------------------------------------------
def r_unknown_device(t):
    return _std(t, [_ct(t)], extra=["--device", "tpu"]), []


def r_cuda_without_gpu(t):
    return _std(t, [_ct(t)], extra=["--device", "cuda"]), []


def r_output_is_a_file(t):
    p = _ct(t)
    (t / "out").write_text("a file, not a folder")
    return _std(t, [p]), [p, t / "out"]


def r_output_not_writable(t):
    p = _ct(t)
    return [str(p), "-o", "/proc/unetsegment-out", "--model", str(_bundle(t)), "-q"], [p]


def r_existing_outputs(t):
    p = _ct(t)
    (t / "out").mkdir()
    (t / "out" / "summary.json").write_text("{}")
    return _std(t, [p]), [p, t / "out" / "summary.json"]


def r_disk_full(t):
    return _std(t, [_ct(t)]), []


# --- accepted with a warning ---------------------------------------------------------------------
def a_constant(t):
    img, _ = ct_phantom(shape_kji=(8, 48, 48))
    return _std(t, [_write(img.with_array(np.full(img.array.shape, 30, np.int16)), t / "const.nii.gz")]), []


def a_few_nan(t):
    img, _ = ct_phantom(shape_kji=(8, 48, 48))
    a = img.array.astype(np.float32)
    a[4, 20, 20:25] = np.nan
    return _std(t, [_write(Image(a, img.ijk_to_ras), t / "nan.nrrd")]), []


def a_thick(t):
    return _std(t, [_ct(t, spacing=(0.5, 0.5, 5.0), shape=(6, 96, 96))]), []


def a_tilted(t):
    a = np.deg2rad(15)
    d = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return _std(t, [_ct(t, direction=d)]), []


def a_skewed(t):
    d = np.array([[1, 0.2, 0], [0, 1, 0], [0, 0, 1.0]])
    d /= np.linalg.norm(d, axis=0)
    img, _ = ct_phantom(shape_kji=(8, 48, 48))
    m = make_ijk_to_ras((1.5, 1.5, 3.0), d, (0, 0, 0))
    p = t / "skew.nrrd"  # NRRD keeps non-orthogonal space directions
    import nrrd

    lps = np.diag([-1, -1, 1]) @ m[:3, :3]
    nrrd.write(str(p), img.array.transpose(2, 1, 0), {"space": "left-posterior-superior", "space directions": lps.T,
                                                       "space origin": np.zeros(3)})
    return _std(t, [p]), [p]


def a_single_slice_2d(t):
    return _std(t, [_ct(t, shape=(1, 48, 48))]), []


def a_not_ct(t):
    img, _ = ct_phantom(shape_kji=(8, 48, 48))
    a = ((img.array.astype(np.float32) + 1000) / 2000.0).astype(np.float32)  # 0..1, like an MR
    return _std(t, [_write(img.with_array(a), t / "mr.nii.gz")]), []


def a_not_head(t):
    return _std(t, [_ct(t, spacing=(8.0, 8.0, 3.0), shape=(8, 96, 96))]), []


ROWS = [
    Row("missing file", r_missing, 3, "input not found"),
    Row("corrupt NIfTI", r_garbage_nii, 3, "junk.nii"),
    Row("truncated .nii.gz", r_truncated_niigz, 3, "truncated or corrupt"),
    Row("truncated .nii (SimpleITK reads it silently)", r_truncated_nii, 3, "header promises"),
    Row("truncated NRRD", r_truncated_nrrd, 3, "cannot read cut.nrrd"),
    Row("corrupt NRRD header", r_corrupt_nrrd_header, 3, "cannot read bad.nrrd"),
    Row("corrupt DICOM", r_corrupt_dicom, 3, "no DICOM series"),
    Row("DICOM folder with two series", r_dicom_two_series, 3, "holds 2 DICOM series"),
    Row("DICOM series with a missing slice", r_dicom_missing_slice, 3, "uneven slice spacing"),
    Row("2D image", r_2d, 3, "2D image"),
    Row("4D image", r_4d, 3, "4D image"),
    Row("zero-size array", r_zero_size, 3, "empty.nrrd"),
    Row("spacing 0", r_spacing_zero, 3, "zero.nrrd"),
    Row("spacing beyond plausible bounds", r_spacing_implausible, 3, "implausible voxel spacing"),
    Row("NaN in more than 1% of voxels", r_too_many_nan, 3, "NaN/Inf voxels"),
    Row("wrong number of inputs", r_wrong_count, 3, "expects 1 input"),
    Row("unknown input name", r_wrong_name, 3, "unknown input name 'CBF'"),
    Row("inputs that do not overlap", r_no_overlap, 3, "covers only"),
    Row("volume beyond the memory budget", r_memory, 3, "GiB of memory"),
    Row("single slice for a 3D model", r_single_slice_3d, 3, "single slice; this model is 3D"),
    Row("model folder without model.json", r_no_model_json, 4, "no model.json"),
    Row("model.json failing the schema", r_schema, 4, "'labels' is a required property"),
    Row("weights with the wrong sha256", r_sha, 4, "sha256"),
    Row("weights whose shapes do not match", r_shapes, 4, "wrong shape"),
    Row("pickle that would run code", r_pickle, 4, "cannot load weights"),
    Row("unknown device", r_unknown_device, 5, "unknown device 'tpu'"),
    Row("CUDA requested without a GPU", r_cuda_without_gpu, 5, "no CUDA GPU"),
    Row("output path is a file", r_output_is_a_file, 6, "not a folder"),
    Row("output folder not writable", r_output_not_writable, 6, "cannot create output folder"),
    Row("existing outputs without --overwrite", r_existing_outputs, 6, "--overwrite"),
    Row("disk full during write", r_disk_full, 6, "No space left on device"),
    Row("constant volume", a_constant, 0, "is constant"),
    Row("a few NaN voxels", a_few_nan, 0, "NaN/Inf voxels"),
    Row("thick slices / anisotropy", a_thick, 0, "thick slices"),
    Row("gantry-tilted direction", a_tilted, 0, "gantry-tilted by 15.0°"),
    Row("non-orthogonal axes", a_skewed, 0, "non-orthogonal"),
    Row("single slice for a 2D model", a_single_slice_2d, 0, "single slice; processed as one 2D image"),
    Row("intensities unlike the modality", a_not_ct, 0, "do not look like CT"),
    Row("body unlike the training anatomy", a_not_head, 0, "unlike the head"),
]


def _digest(files) -> dict:
    return {str(f): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files if Path(f).is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_matrix(row, tmp_path, capsys, monkeypatch):
    args, files = row.setup(tmp_path)
    if row.setup is r_memory:
        monkeypatch.setattr(checks, "_available_memory", lambda: 1 << 20)
    if row.setup is r_disk_full:
        import UNetSegmentLib.serving.job as job

        real = job.write_image
        calls = []

        def full_disk(img, path, **kw):
            calls.append(path)
            if len(calls) == 2:  # the second file: some outputs are already staged
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(img, path, **kw)

        monkeypatch.setattr(job, "write_image", full_disk)
    before = _digest(files)
    existing = set(os.listdir(tmp_path / "out")) if (tmp_path / "out").is_dir() else set()
    code = main(["segment", *args])
    out, err = capsys.readouterr()
    assert code == row.code, err
    assert "Traceback" not in out + err
    assert _digest(files) == before  # inputs byte-identical
    if row.code:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("unetsegment: error:") and " — " in lines[0], err
        assert row.match in lines[0], lines[0]
        left = set(os.listdir(tmp_path / "out")) - existing if (tmp_path / "out").is_dir() else set()
        assert not left, f"partial outputs left: {left}"
    else:
        assert any(row.match in line for line in out.splitlines() if line.startswith("warning:")), out
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert any(row.match in w for w in summary["warnings"])
        assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".")]
    assert not (tmp_path / "MARKER").exists()


def test_matrix_has_at_least_30_rows():
    assert len(ROWS) >= 30


def _cli_env():
    return dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_interrupted_run_leaves_no_outputs_and_no_temporary_files(tmp_path, sig, code):
    p = _ct(tmp_path, shape=(60, 192, 192), spacing=(0.5, 0.5, 1.0))
    out = tmp_path / "out"
    slow = _bundle(tmp_path, patch=(32, 32), target_spacing=(0.5, 0.5, 1.0))  # ~2000 windows: runs far past the signal
    proc = subprocess.Popen([sys.executable, "-m", "UNetSegmentLib.cli", "segment", str(p), "-o", str(out),
                             "--model", str(slow), "-q", "--batch-size", "1"],
                            env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as in a terminal: a test runner (or Dask) may ignore SIGINT, and children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not out.exists():  # the folder appears after imports and reading, right before inference
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)  # an ignored signal would run on for many minutes
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert not out.exists() or os.listdir(out) == []


def test_killed_run_staging_is_removed_by_the_next_run(tmp_path):
    p = _ct(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f"{STAGING_PREFIX}{dead.stdout.strip()}-abc"
    stale.mkdir()
    (stale / "probability.nrrd").write_bytes(b"half written")
    assert main(["segment", str(p), "-o", str(out), "--model", str(_bundle(tmp_path)), "-q", "--heatmap", "none"]) == 0
    assert not stale.exists()
    assert {f for f in os.listdir(out)} <= set(CONTRACT_FILES)
