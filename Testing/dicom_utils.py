"""Make small DICOM CT series from an :class:`Image` (test data for the DICOM reader, SEG and SR writers),
and find Debian's ``dciodvfy`` to validate what we write."""
from __future__ import annotations

import datetime
import functools
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from UNetSegmentLib.image import Image


def _ds(x: float) -> str:
    """A DS value (at most 16 characters) as precise as fits."""
    for digits in range(12, 0, -1):
        s = f"{x:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(x)


def write_ct_series(
    image: Image,
    folder: Path,
    shuffle_names: bool = False,
    *,
    prefix: str = "CT",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    rescale: tuple[float, float] = (1.0, 0.0),
    seed: int = 0,
) -> list[Path]:
    """Write ``image`` as one CT Image Storage file per k slice; return the paths in k order.

    Geometry comes from ``image.ijk_to_lps``: row direction = i, column direction = j,
    ImagePositionPatient of slice k = voxel (0, 0, k). ``PixelSpacing`` is (row spacing = step
    along j, column spacing = step along i). Stored values are ``round((v - intercept) / slope)``
    as signed 16-bit. ``shuffle_names`` gives the files names in a random order (so only the
    headers, not the names, tell the slice order).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = image.ijk_to_lps
    sp = np.linalg.norm(m[:3, :3], axis=0)
    row_dir, col_dir = m[:3, 0] / sp[0], m[:3, 1] / sp[1]
    if abs(float(np.dot(row_dir, col_dir))) > 1e-6:
        raise ValueError("DICOM needs orthogonal i and j axes")
    slope, intercept = rescale
    stored = np.rint((np.asarray(image.array, dtype=np.float64) - intercept) / slope)
    if stored.min(initial=0) < -32768 or stored.max(initial=0) > 32767:
        raise ValueError("values do not fit signed 16 bit with this rescale")
    stored = stored.astype("<i2")
    K, J, I = stored.shape
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    now = datetime.datetime(2024, 1, 2, 3, 4, 5)
    order = list(range(K))
    if shuffle_names:
        random.Random(seed).shuffle(order)
    paths = []
    for k in range(K):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "A0001"
        ds.Modality = "CT"
        ds.Manufacturer = "UNetSegment tests"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = f"synthetic CT {series_number}"
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "PHANTOM001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = _ds(sp[2])
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in m[:3, :3] @ [0.0, 0.0, k] + m[:3, 3]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(m[:3, :3] @ [0.0, 0.0, k] + m[:3, 3], np.cross(row_dir, col_dir))))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = J, I
        ds.PixelSpacing = [_ds(sp[1]), _ds(sp[0])]  # [between rows (j), between columns (i)]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{prefix}{order[k] + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@functools.lru_cache(maxsize=None)
def dciodvfy_path() -> str:
    """Path of dciodvfy; installs Debian's dicom3tools if needed. Fails the test (never skips) when it cannot."""
    exe = shutil.which("dciodvfy")
    log = ""
    if exe is None and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmds in ([["apt-get", "install", "-y", "dicom3tools"]],
                     [["apt-get", "update"], ["apt-get", "install", "-y", "dicom3tools"]]):
            for c in cmds:
                r = subprocess.run(c, capture_output=True, text=True, env=env, timeout=900)
                log += f"$ {' '.join(c)} -> {r.returncode}\n{r.stdout[-1000:]}{r.stderr[-1000:]}"
            exe = shutil.which("dciodvfy")
            if exe:
                break
    if exe is None:
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed and `apt-get install -y dicom3tools` "
                    f"did not install it (needs root and apt access). Install it and rerun.\n{log}")
    return exe
