"""Memory before reading (issue 14, item 12): headers are read first and oversized inputs are refused
before a voxel is allocated or decompressed — NIfTI (.nii/.nii.gz), NRRD (attached and detached), MHA/MHD,
DICOM series — in the CLI (exit 3, one line, low peak RSS of the child) and in the server's jobs.

The declared sizes are far beyond any test machine (the run's estimate is hundreds of GiB), so the
tests do not depend on how much memory the machine has.
"""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, ct_phantom

from UNetSegmentLib.engine.checks import LIMITS
from UNetSegmentLib.errors import InputError
from UNetSegmentLib.image import to_sitk
from UNetSegmentLib.io import readers
from UNetSegmentLib.io.readers import GZIP_SLACK_BYTES, read_header, read_image

#: peak RSS allowed for a CLI run that refuses a hostile input (Python + torch + SimpleITK imported)
MAX_RSS_MB = 600
ZEROS_MEMBER = 64 << 20  # one gzip member of 64 MiB of zeros (~64 KB compressed)
_GZIP_OPEN = gzip.open


@lru_cache(maxsize=1)
def _zeros_member() -> bytes:
    return gzip.compress(bytes(ZEROS_MEMBER), compresslevel=9)


def _nifti_header(size_ijk: tuple[int, int, int]) -> bytes:
    """A valid NIfTI-1 header (uint8, 1 mm) from SimpleITK, with its dims patched to ``size_ijk``."""
    small = Path(os.environ.get("TMPDIR", "/tmp")) / f"hdr-{os.getpid()}.nii"
    sitk.WriteImage(sitk.Image([2, 2, 2], sitk.sitkUInt8), str(small))
    head = bytearray(small.read_bytes()[:352])
    small.unlink()
    struct.pack_into("<4h", head, 42, *size_ijk, 1)  # dim[1..4]
    return bytes(head)


def write_gzip_bomb(path: Path, size_ijk: tuple[int, int, int], data_bytes: int) -> Path:
    """A .nii.gz whose header declares ``size_ijk`` uint8 voxels and whose stream inflates to ``data_bytes``
    zeros: gzip members of zeros written one after the other (a streamed writer, ~1 MB per GiB)."""
    with open(path, "wb") as f:
        f.write(gzip.compress(_nifti_header(size_ijk)))
        for _ in range(data_bytes // ZEROS_MEMBER):
            f.write(_zeros_member())
    return path


def _nii(path: Path, size_ijk: tuple[int, int, int]) -> Path:
    path.write_bytes(_nifti_header(size_ijk) + bytes(64))
    return path


def _nrrd(path: Path, detached: bool) -> Path:
    head = "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 1200 1200 1200\n" \
           "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nendian: little\nencoding: raw\n"
    if detached:
        (path.parent / "tiny.raw").write_bytes(bytes(64))
        path.write_text(head + "data file: tiny.raw\n")
    else:
        path.write_bytes(head.encode() + b"\n" + bytes(64))
    assert path.stat().st_size < 1024
    return path


def _meta(path: Path, detached: bool) -> Path:
    head = "ObjectType = Image\nNDims = 3\nDimSize = 1200 1200 1200\nElementType = MET_FLOAT\nElementSpacing = 1 1 1\n" \
           "BinaryData = True\nBinaryDataByteOrderMSB = False\n"
    if detached:
        (path.parent / "tiny.raw").write_bytes(bytes(64))
        path.write_text(head + "ElementDataFile = tiny.raw\n")
    else:
        path.write_bytes((head + "ElementDataFile = LOCAL\n").encode() + bytes(64))
    return path


def _dicom(folder: Path) -> Path:
    """A 3-file CT series whose headers claim 50000 × 50000 pixels per slice; the pixel data stay tiny."""
    import pydicom
    from dicom_utils import write_ct_series

    img, _ = ct_phantom(shape_kji=(3, 8, 8))
    for f in write_ct_series(img, folder):
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 50000
        ds.save_as(f)
    return folder


HOSTILE = {
    "1 MB .nii.gz inflating to 1 GiB, header 2048³": lambda t: write_gzip_bomb(t / "bomb.nii.gz", (2048,) * 3, 1 << 30),
    ".nii header 2048³": lambda t: _nii(t / "big.nii", (2048,) * 3),
    "1 KB NRRD 1200³": lambda t: _nrrd(t / "big.nrrd", detached=False),
    "NHDR 1200³ + tiny data file": lambda t: _nrrd(t / "big.nhdr", detached=True),
    "MHA 1200³": lambda t: _meta(t / "big.mha", detached=False),
    "MHD 1200³ + tiny data file": lambda t: _meta(t / "big.mhd", detached=True),
    "DICOM series of 50000² slices": lambda t: _dicom(t / "series"),
}


def readers_available() -> int | None:
    """Available memory as the CLI sees it."""
    from UNetSegmentLib.engine.checks import _available_memory

    return _available_memory()


#: runs the CLI and writes the process's own peak RSS (VmHWM of its memory map) to the file named first:
#: ``ru_maxrss`` of a child started by a large parent (pytest after heavy tests) can report the parent's
#: peak, since Linux carries the pre-exec high-water mark over
_MEASURED_CLI = """
import atexit, sys
out = sys.argv.pop(1)
def _peak():
    with open("/proc/self/status") as f:
        kb = next((line.split()[1] for line in f if line.startswith("VmHWM:")), None)
    if kb:
        with open(out, "w") as g:
            g.write(kb)
atexit.register(_peak)
sys.argv[0] = "unetsegment"
from UNetSegmentLib.cli import main
sys.exit(main())
"""


def run_cli_measured(args: list[str]) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in MB) of one CLI run, the child's own (VmHWM; ``wait4`` without /proc)."""
    import tempfile

    env = dict(os.environ, PYTHONPATH=str(REPO / "UNetSegment"))
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak_kb"
        with open(os.devnull, "wb") as null, subprocess.Popen([sys.executable, "-c", _MEASURED_CLI, str(peak_file), *args],
                                                               env=env, stdout=null, stderr=subprocess.PIPE) as p:
            err = p.stderr.read().decode()
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
        if peak_file.is_file():
            return p.returncode, err, int(peak_file.read_text()) / 1024
    rss_mb = usage.ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
    return p.returncode, err, rss_mb


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="peak RSS of a child needs wait4")
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_cli_refuses_oversized_inputs_before_reading_them(tmp_path, kind):
    src = HOSTILE[kind](tmp_path)
    avail = readers_available() or 0
    if "1200³" in kind and 1200**3 * LIMITS.bytes_per_voxel_estimate < LIMITS.memory_fraction * avail:
        pytest.skip(f"{avail / 2**30:.0f} GiB available: this machine could segment a 1200³ volume")
    code, err, rss_mb = run_cli_measured(["segment", str(src), "-o", str(tmp_path / "out"), "--model", "tiny-blob", "-q"])
    assert code == 3, err
    assert err.count("\n") == 1 and "GiB of memory" in err and "crop the volume" in err, err
    assert rss_mb < MAX_RSS_MB, f"peak RSS {rss_mb:.0f} MB: the volume was read before the check"
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_headers_are_read_without_the_voxels(tmp_path):
    assert read_header(_nrrd(tmp_path / "a.nrrd", detached=False)).size == (1200, 1200, 1200)
    h = read_header(_meta(tmp_path / "b.mha", detached=False))
    assert h.size == (1200, 1200, 1200) and h.bytes_per_voxel == 4
    h = read_header(write_gzip_bomb(tmp_path / "c.nii.gz", (2048,) * 3, 0))
    assert h.voxels == 2048**3 and h.bytes_per_voxel == 1
    h = read_header(_dicom(tmp_path / "series"))
    assert h.size == (50000, 50000, 3) and h.bytes_per_voxel == 2


def test_reader_refuses_a_declared_size_beyond_memory_without_a_model(tmp_path, monkeypatch):
    """The reader's own check (every caller: rethreshold, evaluate, the Slicer worker), here with 8 GiB free."""
    from UNetSegmentLib.engine import checks

    monkeypatch.setattr(checks, "_available_memory", lambda: 8 << 30)
    with pytest.raises(InputError, match=r"big.nrrd declares 1200 × 1200 × 1200 voxels: reading it needs about 12.9 GiB"):
        read_image(_nrrd(tmp_path / "big.nrrd", detached=False))


class _CountingGzip:
    """gzip.open stand-in that counts the decompressed bytes the reader asks for."""

    inflated = 0

    def __init__(self, *a, **kw):
        self._f = _GZIP_OPEN(*a, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def read(self, n=-1):
        data = self._f.read(n)
        _CountingGzip.inflated += len(data)
        return data


def test_gzip_stream_is_inflated_no_further_than_the_header_declares(tmp_path, monkeypatch):
    """A small header (32³ voxels) in front of 256 MiB of zeros: the check stops after the declared data."""
    p = write_gzip_bomb(tmp_path / "long.nii.gz", (32, 32, 32), 256 << 20)
    assert p.stat().st_size < 1 << 20
    monkeypatch.setattr(readers.gzip, "open", _CountingGzip)
    _CountingGzip.inflated = 0
    img = read_image(p)
    assert img.array.shape == (32, 32, 32) and not img.array.any()
    assert _CountingGzip.inflated <= 352 + 32**3 + GZIP_SLACK_BYTES + 544


def test_gzip_declaring_more_than_deflate_can_hold_is_truncated_without_inflating(tmp_path, monkeypatch):
    p = write_gzip_bomb(tmp_path / "cut.nii.gz", (1024, 1024, 64), 0)  # 64 MiB declared, ~100 bytes stored
    monkeypatch.setattr(readers.gzip, "open", _CountingGzip)
    _CountingGzip.inflated = 0
    with pytest.raises(InputError, match="is truncated: its header promises"):
        read_image(p)
    assert _CountingGzip.inflated <= 544


def test_normal_inputs_still_read(tmp_path):
    img, _ = ct_phantom(shape_kji=(6, 20, 24))
    for name in ("a.nii.gz", "a.nii", "a.nrrd", "a.mha", "a.mhd"):
        sitk.WriteImage(to_sitk(img), str(tmp_path / name))
        back = read_image(tmp_path / name)
        assert back.array.shape == (6, 20, 24) and np.array_equal(back.array, img.array), name


def test_server_jobs_refuse_through_the_same_reader(tmp_path):
    """Uploads are read by the same ``segment_files`` → ``read_image`` path: the job fails with the memory
    message (InputError) before the voxels are read."""
    from test_server import TOKEN, raw

    from UNetSegmentLib.params import SegmentParams
    from UNetSegmentLib.serving.server import InferenceServer, ServerConfig
    from UNetSegmentLib.serving.client import ServerClient

    cfg = ServerConfig(token=TOKEN, max_upload_bytes=1 << 20, max_queued=2, retention_s=3600,
                       params=SegmentParams(heatmaps=(), threads=1), work_dir=tmp_path / "work")
    src = _nrrd(tmp_path / "big.nrrd", detached=False)
    with InferenceServer(cfg) as s:
        code, body, _ = raw("POST", s.url + "/jobs", files=[("CT", src)], fields={"model": "tiny-blob"})
        assert code == 202, body
        st = ServerClient(s.url, token=TOKEN).wait(body["id"], poll_s=0.05, timeout=120)
    assert st["status"] == "failed" and st["error_type"] == "InputError" and "GiB of memory" in st["error"], st
