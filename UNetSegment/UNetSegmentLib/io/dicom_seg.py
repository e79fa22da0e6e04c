"""Write a label map as a DICOM Segmentation (BINARY) that references its source CT series (highdicom).

The label grid must be the grid of the source series (as :func:`..readers.read_image` read it):
each source file is matched to a slice k of the label grid by its ImagePositionPatient, and the
write is refused when any file does not lie on the grid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..image import Image
from .writers import atomic_path

NO_LESION = "no lesion: DICOM SEG needs at least one non-empty segment"
#: oldest highdicom with what this writer uses (CIELabColor.from_rgb, SegmentDescription(display_color=));
#: it needs pydicom >= 3, which 3D Slicer ships from 5.12 on (5.10 ships pydicom 2.4.4)
MIN_HIGHDICOM = (0, 27)
#: how far (in voxels) a source file's position may sit off the label grid
GRID_TOLERANCE_VOXELS = 0.01
SLICE_TOLERANCE_VOXELS = 0.1


def write_dicom_seg(
    labels: Image,
    source_folder: Path,
    segments: list[dict],
    out_path: Path,
    *,
    model_name: str,
    model_version: str,
    series_number: int | None = None,
) -> str | None:
    """Write ``labels`` (integer ``array[k, j, i]``) as a DICOM SEG referencing the series in ``source_folder``.

    ``segments``: dicts with ``value`` (label value), ``name``, ``color`` (RGB 0..1) and optional
    ``code`` ``{"scheme", "value", "meaning"}`` (default SCT 52988006 "Lesion") and ``category`` (default
    SCT 49755003 "Morphologically Altered Structure"; see :mod:`..terminology`). Empty segments are
    left out (segment numbers are then 1..n in the order given). Returns ``None`` when written, or
    the reason nothing was written (all segments empty, or :func:`unavailable_reason`). ``series_number``
    defaults to the source's SeriesNumber + 1000.
    """
    absent = unavailable_reason()
    if absent:
        return absent
    import highdicom as hd
    from pydicom.sr.codedict import codes

    arr = np.asarray(labels.array)
    default_category = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
    kept = [s for s in segments if np.any(arr == int(s["value"]))]
    if not kept:
        return NO_LESION
    sources = source_datasets(labels, Path(source_folder))

    pixels = np.zeros(arr.shape, np.uint8 if len(kept) < 256 else np.uint16)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"UNetSegment {model_name}"[:64], version=str(model_version)[:64], family=codes.cid7162.ArtificialIntelligence
    )
    for number, s in enumerate(kept, start=1):
        pixels[arr == int(s["value"])] = number
        c = s.get("code")
        prop = hd.sr.CodedConcept(c["value"], c["scheme"], c["meaning"]) if c else codes.SCT.Lesion
        cat = s.get("category")
        category = hd.sr.CodedConcept(cat["value"], cat["scheme"], cat["meaning"]) if cat else default_category
        rgb = [int(round(255 * min(max(float(v), 0.0), 1.0))) for v in s["color"]]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(s["name"])[:64],
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*rgb),
            )
        )
    if series_number is None:
        series_number = int(getattr(sources[0], "SeriesNumber", None) or 0) + 1000
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **new_instance(series_number, model_version, f"UNetSegment {model_name}"),
        manufacturer_model_name=f"UNetSegment {model_name}"[:64],
        device_serial_number="0",
        content_label="UNETSEGMENT",
        content_description=f"{model_name} {model_version} automatic segmentation"[:64],
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp)
    return None


def new_instance(series_number: int, model_version: str, description: str) -> dict:
    """The identity of a new single-instance series we write (SEG, SR): fresh UIDs, manufacturer, versions."""
    import highdicom as hd

    return {"series_instance_uid": hd.UID(), "series_number": series_number, "sop_instance_uid": hd.UID(),
            "instance_number": 1, "manufacturer": "UNetSegment",
            "software_versions": f"UNetSegment {__version__}, model {model_version}"[:64],
            "series_description": description[:64]}


def unavailable_reason() -> str | None:
    """Why no DICOM SEG can be written in this Python (highdicom missing or too old), else None."""
    import importlib.metadata as md

    try:
        version = md.version("highdicom")
    except md.PackageNotFoundError:
        return ("DICOM SEG not written: highdicom is not installed (pip install 'highdicom>=0.27'; in 3D Slicer it "
                "needs Slicer 5.12 or later, whose pydicom 3 it requires)")
    have = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if have < MIN_HIGHDICOM:
        return (f"DICOM SEG not written: highdicom {version} is older than "
                f"{'.'.join(map(str, MIN_HIGHDICOM))} (pip install 'highdicom>=0.27', which needs pydicom 3)")
    return None


def source_datasets(labels: Image, folder: Path) -> list:
    """The source series' headers in label-k order, each file checked to lie on the label grid."""
    import pydicom
    import SimpleITK as sitk

    if not folder.is_dir():
        raise InputError(f"DICOM source folder not found: {folder}", "give the folder of the series the labels were computed on")
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"no DICOM series found in folder {folder}", "give the folder of the series the labels were computed on")
    problems = []
    for sid in ids:
        files = reader.GetGDCMSeriesFileNames(str(folder), sid)
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        try:
            return _match_grid(labels, datasets)
        except ValueError as e:
            problems.append(f"series {sid}: {e}")
    raise InputError(
        f"the labels do not lie on the grid of the DICOM series in {folder} ({'; '.join(problems)})",
        "export the labels computed on that very series (same slices, no resampling)",
    )


def _match_grid(labels: Image, datasets: list) -> list:
    K, J, I = labels.array.shape[:3]
    if len(datasets) != K:
        raise ValueError(f"{len(datasets)} files for {K} label slices")
    lps = labels.ijk_to_lps
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    inv = np.linalg.inv(lps)
    by_k: dict[int, object] = {}
    for ds in datasets:
        if (int(ds.Rows), int(ds.Columns)) != (J, I):
            raise ValueError(f"slice size {ds.Rows}x{ds.Columns} (rows x columns), labels {J}x{I}")
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        if not np.allclose(iop, np.r_[lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]], atol=1e-4):
            raise ValueError(f"orientation {list(np.round(iop, 4))} differs from the labels' i/j axes")
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=np.float64), spacing[[1, 0]], rtol=1e-4, atol=1e-5):
            raise ValueError(f"pixel spacing {list(ds.PixelSpacing)} differs from the labels' {list(spacing[[1, 0]])}")
        ijk = inv[:3, :3] @ np.asarray(ds.ImagePositionPatient, dtype=np.float64) + inv[:3, 3]
        k = int(round(ijk[2]))
        if (np.max(np.abs(ijk[:2])) > GRID_TOLERANCE_VOXELS or abs(ijk[2] - k) > SLICE_TOLERANCE_VOXELS
                or not 0 <= k < K or k in by_k):
            raise ValueError(f"file {ds.SOPInstanceUID} at {list(ds.ImagePositionPatient)} is not slice k of the label grid (ijk {np.round(ijk, 3).tolist()})")
        by_k[k] = ds
    return [by_k[k] for k in range(K)]
