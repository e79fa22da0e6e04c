"""Read volumes (NIfTI, NRRD/.seg.nrrd, MHA/MHD, DICOM series folders) into :class:`Image`.

Every failure becomes an :class:`InputError` naming the file, the problem and the fix.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.checks import check_read_memory
from ..errors import InputError
from ..image import LPS_TO_RAS, Image, from_sitk

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: relative tolerance on the spread of DICOM slice positions before we call a series incomplete
DICOM_SPACING_TOLERANCE = 0.1
#: a deflate stream expands at most 1032-fold: a .gz declaring more data than that is cut short
MAX_DEFLATE_RATIO = 1032
#: decompressed bytes read past what a NIfTI header declares before the completeness check stops
GZIP_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class VolumeHeader:
    """What a volume's header declares, read without its voxels (see :func:`read_header`)."""

    size: tuple[int, ...]  # voxels per axis, ITK order (i, j, k[, t]); a DICOM series: (columns, rows, frames)
    bytes_per_voxel: int  # all components together, as stored

    @property
    def voxels(self) -> int:
        return math.prod(self.size)

    @property
    def nbytes(self) -> int:
        return self.voxels * self.bytes_per_voxel


#: called with a volume's header before its voxels are read; raises to refuse (e.g. a model's memory budget)
HeaderCheck = Callable[[VolumeHeader], None]


def read_image(path: str | os.PathLike, before_pixels: HeaderCheck | None = None) -> Image:
    """Read one 3D scalar volume (file or DICOM series folder) as an :class:`Image` in RAS.

    The header comes first: ``before_pixels`` and the reader's own memory check see the declared size
    and refuse before any voxel is allocated or decompressed (a 1 KB header may claim 1200³ voxels).
    """
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}", "check the path and that the file exists")
    if p.is_dir():
        files = _dicom_series_files(p)
        _check_header(_dicom_header(files, p), p.name, before_pixels)
        img, tilt_step = _read_dicom_series(p, files)
        image = _to_volume(img, p.name)
        if tilt_step is not None:  # gantry tilt: the exact, sheared geometry
            m = image.ijk_to_ras.copy()
            m[:3, 2] = LPS_TO_RAS[:3, :3] @ tilt_step
            image = Image(image.array, m)
        return image
    head = _read_head(p)
    _check_header(read_header(p), p.name, before_pixels)
    _check_complete(p, head)
    with _itk_read_errors(p.name):
        img = sitk.ReadImage(str(p))
    return _to_volume(img, p.name)


@contextlib.contextmanager
def _itk_read_errors(name: str):
    """An ITK read failure (with what ITK printed) as one :class:`InputError` naming the file."""
    try:
        with _captured_stderr() as err:
            yield
    except RuntimeError as e:
        reason = _itk_reason(str(e) + "\n" + err.text())
        raise InputError(
            f"cannot read {name}: corrupt, truncated or not a volume ({reason})",
            "check that it is a complete NIfTI, NRRD, MHA or DICOM file",
        ) from None


def read_header(path: str | os.PathLike) -> VolumeHeader:
    """Sizes and voxel type of a volume file or DICOM series folder, without reading its voxels."""
    import SimpleITK as sitk

    p = Path(path)
    if p.is_dir():
        return _dicom_header(_dicom_series_files(p), p)
    r = sitk.ImageFileReader()
    r.SetFileName(str(p))
    with _itk_read_errors(p.name):
        r.ReadImageInformation()
    kind = sitk.GetPixelIDValueAsString(r.GetPixelID())
    bits = re.search(r"(\d+)-bit", kind)
    per_component = (int(bits.group(1)) // 8 if bits else 8) * (2 if kind.startswith("complex") else 1)
    return VolumeHeader(tuple(int(n) for n in r.GetSize()), per_component * max(1, r.GetNumberOfComponents()))


def _check_header(header: VolumeHeader, name: str, before_pixels: HeaderCheck | None) -> None:
    if before_pixels is not None:
        before_pixels(header)
    check_read_memory(header.size, header.bytes_per_voxel, name)


def _dicom_header(files: list[str], folder: Path) -> VolumeHeader:
    """The series' declared size: rows × columns × frames summed over its files (pydicom, pixels not read)."""
    import pydicom

    rows = cols = frames = bpv = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True, specific_tags=[
                "Rows", "Columns", "NumberOfFrames", "BitsAllocated", "SamplesPerPixel"])
            n = int(ds.get("NumberOfFrames", 1) or 1)
            rows, cols = max(rows, int(ds.get("Rows", 0) or 0)), max(cols, int(ds.get("Columns", 0) or 0))
            bpv = max(bpv, -(-int(ds.get("BitsAllocated", 16) or 16) // 8) * int(ds.get("SamplesPerPixel", 1) or 1))
        except (OSError, ValueError, TypeError, pydicom.errors.InvalidDicomError) as e:
            raise InputError(f"cannot read the DICOM header of {Path(f).name} in {folder}: {e}", "check the files") from None
        frames += max(n, 1)
    return VolumeHeader((cols, rows, frames), max(bpv, 1))


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
    return from_sitk(img, pixels(img))


class _ImagePixels:
    """Holds a SimpleITK image for the numpy array made from its pixel buffer (numpy keeps this
    object as the array's base, so the image lives as long as the array)."""

    def __init__(self, img) -> None:
        import SimpleITK as sitk

        view = sitk.GetArrayViewFromImage(img)  # makes the buffer the image's own (MakeUnique)
        self.image = img
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], False)  # writable: nothing else shares the buffer
        self.__array_interface__ = interface


def pixels(img) -> np.ndarray:
    """A read SimpleITK image's voxels as a writable K, J, I array on the image's own buffer: no copy
    of the volume (``GetArrayFromImage`` copies it; ``GetArrayViewFromImage`` alone would not keep
    the image alive)."""
    return np.asarray(_ImagePixels(img))


def _itk_reason(msg: str) -> str:
    """The informative line of an ITK exception (its last line is often a generic 'Reason: …')."""
    lines = [l.strip() for l in msg.strip().splitlines() if l.strip()]
    for key in ("not read completely", "expected", "fread", "Could not create IO object", "Unable to determine", "ERROR"):
        for l in lines:
            if key in l:
                return l[:200]
    return lines[-1][:200] if lines else "unknown reason"


def _read_head(p: Path) -> bytes:
    """The first bytes of a (gzipped) file, enough for a NIfTI-1/-2 header; a broken gzip is refused here."""
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            return f.read(544)
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise InputError(f"{p.name} is truncated or corrupt ({e})", "copy the file again from its source") from None


def _check_complete(p: Path, head: bytes | None = None) -> None:
    """SimpleITK reads some truncated NIfTI files silently: check the data size the header promises.

    A gzip stream is decompressed (streamed, which also catches a cut stream) up to the declared size
    plus :data:`GZIP_SLACK_BYTES`, never further: a small file inflating to gigabytes costs no more
    than its header declares (and that passed the memory check).
    """
    name = p.name.lower()
    if not (name.endswith(".gz") or name.endswith(".nii")):
        return
    head = _read_head(p) if head is None else head
    need = _nifti_expected_size(head) if ".nii" in name else None
    if not name.endswith(".gz"):
        total = p.stat().st_size
    else:
        stored = p.stat().st_size
        if need is not None and need > MAX_DEFLATE_RATIO * stored + len(head):
            raise InputError(f"{p.name} is truncated: its header promises {need} bytes, more than {stored} compressed "
                             "bytes can hold", "copy the file again from its source")
        cap = None if need is None else need + GZIP_SLACK_BYTES
        total = 0
        try:
            with gzip.open(p, "rb") as f:
                while chunk := f.read(1 << 22 if cap is None else min(1 << 22, cap - total)):
                    total += len(chunk)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise InputError(f"{p.name} is truncated or corrupt ({e})", "copy the file again from its source") from None
    if ".nii" in name:
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


def _dicom_series_files(folder: Path) -> list[str]:
    """The files of the folder's one DICOM series (refused: no series, several, or a single slice)."""
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
    return list(files)


def _read_dicom_series(folder: Path, files: list[str]):
    """The series as a SimpleITK image plus its true slice step (LPS mm), which ITK drops for gantry tilt."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
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


def quiet_itk() -> None:
    """Turn off ITK's own warnings (e.g. GDCM on a folder without DICOM), process-wide.

    They go straight to stderr (interleaved across the workers of a cohort) and repeat what our
    one-line errors, or a case's error row, already say.
    """
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    except ImportError:
        pass


# --- DICOM references per slice ------------------------------------------------------------------
@dataclass(frozen=True)
class DicomSliceRef:
    """The source image behind one k index: what a PACS viewer calls "image N" of the series."""

    instance_number: int | None  # (0020,0013); None when the file has none
    sop_instance_uid: str  # (0008,0018)


def dicom_slice_refs(folder: str | os.PathLike, image: Image) -> list[DicomSliceRef]:
    """InstanceNumber and SOPInstanceUID of the file behind each k index of ``image`` (``folder`` as read).

    Each file is placed by its ImagePositionPatient on ``image``'s grid — not by file name, file
    order or InstanceNumber — so whatever sorting or flip lies between the files and the array
    (ITK orders slices along the normal; a series may number them head-to-feet) is accounted for.
    Raises :class:`InputError` when the files do not cover each k index exactly once.
    """
    import pydicom
    import SimpleITK as sitk

    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise InputError(f"folder {folder} holds {len(ids)} DICOM series", "give a folder holding exactly one series")
    files = reader.GetGDCMSeriesFileNames(str(folder), ids[0])
    inv = np.linalg.inv(image.ijk_to_lps)
    K = image.array.shape[0]
    by_k: dict[int, DicomSliceRef] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True,
                             specific_tags=["ImagePositionPatient", "InstanceNumber", "SOPInstanceUID"])
        ipp = ds.get("ImagePositionPatient")
        uid = ds.get("SOPInstanceUID")
        if ipp is None or uid is None:
            raise InputError(f"{Path(f).name} has no ImagePositionPatient or SOPInstanceUID", "export the series again")
        z = float((inv[:3, :3] @ np.asarray(ipp, dtype=np.float64) + inv[:3, 3])[2])
        k = int(round(z))
        if abs(z - k) > 0.1 or not 0 <= k < K or k in by_k:
            raise InputError(f"{Path(f).name} is not one of the {K} slices of the volume read from {folder}",
                             "give a folder holding one complete series")
        number = ds.get("InstanceNumber")
        by_k[k] = DicomSliceRef(int(number) if number not in (None, "") else None, str(uid))
    if len(by_k) != K:
        raise InputError(f"the series in {folder} has {len(by_k)} images for {K} slices", "export the complete series again")
    return [by_k[k] for k in range(K)]
