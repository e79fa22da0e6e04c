"""Read volumes (NIfTI, NRRD/.seg.nrrd, MHA/MHD, DICOM series folders) into :class:`Image`.

Every failure becomes an :class:`InputError` naming the file, the problem and the fix.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image import LPS_TO_RAS, Image, from_sitk

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: relative tolerance on the spread of DICOM slice positions before we call a series incomplete
DICOM_SPACING_TOLERANCE = 0.1


def read_image(path: str | os.PathLike) -> Image:
    """Read one 3D scalar volume (file or DICOM series folder) as an :class:`Image` in RAS."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}", "check the path and that the file exists")
    if p.is_dir():
        img, tilt_step = _read_dicom_series(p)
        image = _to_volume(img, p.name)
        if tilt_step is not None:  # gantry tilt: the exact, sheared geometry
            m = image.ijk_to_ras.copy()
            m[:3, 2] = LPS_TO_RAS[:3, :3] @ tilt_step
            image = Image(image.array, m)
        return image
    _check_complete(p)
    try:
        with _captured_stderr() as err:
            img = sitk.ReadImage(str(p))
    except RuntimeError as e:
        reason = _itk_reason(str(e) + "\n" + err.text())
        raise InputError(
            f"cannot read {p.name}: corrupt, truncated or not a volume ({reason})",
            "check that it is a complete NIfTI, NRRD, MHA or DICOM file",
        ) from None
    return _to_volume(img, p.name)


class _Captured:
    def __init__(self) -> None:
        self._text = ""

    def text(self) -> str:
        return self._text


@contextlib.contextmanager
def _captured_stderr():
    """Capture what ITK's C++ code writes to fd 2 (e.g. MetaIO's "data not read completely"), so the
    CLI keeps to one line and the message can name the real reason."""
    cap = _Captured()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreter): nothing to capture
        yield cap
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield cap
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            cap._text = tmp.read().decode("utf-8", "replace")


def _to_volume(img, name: str) -> Image:
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {img.GetNumberOfComponentsPerPixel()} components per voxel (vector/RGB image)",
            "give one scalar volume per channel",
        )
    dim = img.GetDimension()
    size = img.GetSize()
    if dim == 4:
        if size[3] == 1:
            img = img[:, :, :, 0]
        else:
            raise InputError(
                f"{name} is a 4D image {size}; UNetSegment reads one 3D volume per model channel",
                "split it into one 3D file per channel (e.g. CBF=cbf.nii.gz CBV=cbv.nii.gz ...)",
            )
    elif dim == 2:
        raise InputError(
            f"{name} is a 2D image {size}, not a volume",
            "give a 3D volume (NIfTI, NRRD, MHA or a DICOM series folder)",
        )
    elif dim != 3:
        raise InputError(f"{name} has {dim} dimensions", "give a 3D volume")
    if min(img.GetSize()) == 0:
        raise InputError(f"{name} is empty (size {img.GetSize()})", "give a volume with voxels")
    spacing = np.asarray(img.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{name} has invalid voxel spacing {tuple(spacing)}", "fix the file's header")
    arr = sitk.GetArrayFromImage(img)
    return from_sitk(img, arr)


def _itk_reason(msg: str) -> str:
    """The informative line of an ITK exception (its last line is often a generic 'Reason: …')."""
    lines = [l.strip() for l in msg.strip().splitlines() if l.strip()]
    for key in ("not read completely", "expected", "fread", "Could not create IO object", "Unable to determine", "ERROR"):
        for l in lines:
            if key in l:
                return l[:200]
    return lines[-1][:200] if lines else "unknown reason"


def _check_complete(p: Path) -> None:
    """SimpleITK reads some truncated NIfTI files silently: check the data size the header promises.

    For gzip files the whole stream is decompressed (which also catches a cut gzip stream).
    """
    name = p.name.lower()
    if not (name.endswith(".gz") or name.endswith(".nii")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            head = f.read(544)
            total = len(head)
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise InputError(f"{p.name} is truncated or corrupt ({e})", "copy the file again from its source") from None
    if ".nii" in name:
        need = _nifti_expected_size(head)
        if need is not None and total < need:
            raise InputError(
                f"{p.name} is truncated: {total} bytes of image data where its header promises {need}",
                "copy the file again from its source",
            )


def _nifti_expected_size(head: bytes) -> int | None:
    """vox_offset + voxels × bytes per voxel from a NIfTI-1/-2 header (None if not NIfTI)."""
    if len(head) < 348:
        return None
    for endian in ("<", ">"):
        size = np.frombuffer(head[:4], dtype=f"{endian}i4")[0]
        if size == 348:
            dim = np.frombuffer(head[40:56], dtype=f"{endian}i2").astype(np.int64)
            bitpix = int(np.frombuffer(head[72:74], dtype=f"{endian}i2")[0])
            offset = float(np.frombuffer(head[108:112], dtype=f"{endian}f4")[0])
        elif size == 540 and len(head) >= 544:
            dim = np.frombuffer(head[16:80], dtype=f"{endian}i8")
            bitpix = int(np.frombuffer(head[14:16], dtype=f"{endian}i2")[0])
            offset = float(np.frombuffer(head[168:176], dtype=f"{endian}i8")[0])
        else:
            continue
        nd = int(dim[0])
        if not 1 <= nd <= 7 or bitpix <= 0:
            return None
        return int(offset) + int(np.prod(np.maximum(dim[1 : nd + 1], 0))) * bitpix // 8
    return None


def _read_dicom_series(folder: Path):
    """The series as a SimpleITK image plus its true slice step (LPS mm), which ITK drops for gantry tilt."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"no DICOM series found in folder {folder}", "point to a folder holding one DICOM series")
    if len(ids) > 1:
        raise InputError(
            f"folder {folder} holds {len(ids)} DICOM series: {', '.join(ids)}",
            "put each series in its own folder and give that folder",
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), ids[0])
    if len(files) < 2:
        raise InputError(f"the DICOM series in {folder} has a single slice", "give a 3D series")
    reader.SetFileNames(files)
    try:
        with _captured_stderr() as err:
            img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"cannot read the DICOM series in {folder}: {_itk_reason(str(e) + err.text())}", "check the files") from None
    return img, _slice_step(img, files, folder)


def _slice_step(img, files, folder: Path) -> np.ndarray | None:
    """Refuse series with missing slices; return the slice step (LPS) when it is not along the normal.

    ITK builds an orthogonal grid from the in-plane axes and the slice normal; a gantry-tilted series
    steps obliquely, so each slice would be misplaced. The true step makes a sheared IJK→RAS matrix.
    """
    import SimpleITK as sitk

    pos = []
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        r.ReadImageInformation()
        if not r.HasMetaDataKey("0020|0032"):
            return None
        pos.append([float(v) for v in r.GetMetaData("0020|0032").split("\\")])
    pos = np.asarray(pos)
    steps = np.diff(pos, axis=0)
    step = (pos[-1] - pos[0]) / (len(pos) - 1)
    gap = float(np.linalg.norm(step))
    if gap <= 0 or np.max(np.linalg.norm(steps - step, axis=1)) > DICOM_SPACING_TOLERANCE * gap:
        lens = np.linalg.norm(steps, axis=1)
        raise InputError(
            f"the DICOM series in {folder} has uneven slice spacing (gaps {lens.min():.3g}–{lens.max():.3g} mm): slices are missing or duplicated",
            "export the complete series again",
        )
    normal = np.asarray(img.GetDirection()).reshape(3, 3)[:, 2]
    if np.linalg.norm(step / gap - normal * np.sign(np.dot(step, normal))) > 1e-3:
        return step
    return None


def is_volume_path(p: Path) -> bool:
    return p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES)
