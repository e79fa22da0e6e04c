"""The lesion table as a DICOM Comprehensive 3D SR measurement report (TID 1500; highdicom), for PACS.

One TID 1411 *Volumetric ROI measurements* group per lesion, referencing its segment in the DICOM
SEG written beside it (``segmentation.dcm``) and the source series. Each group holds the lesion's
volume twice — measured (SNOMED CT *Volume*: the sum of its voxel volumes) and estimated by ABC/2
(Kothari et al. 1996; its own concept, so that readers which ignore method modifiers, such as dcmqi's
``tid1500reader`` behind Slicer's QuantitativeReporting, still tell the two apart) —,
the ABC/2 diameters, the centroid (patient coordinates, LPS, as DICOM stores them), the slice range
(0-based k of the series grid and the InstanceNumbers of the first and last image), the mean density
and the model's mean probability. Standard codes (SNOMED CT, DCM, UCUM) where DICOM has them;
the rest under the private coding scheme :data:`SCHEME` (declared in the SR's Coding Scheme
Identification Sequence).

A lesion is one row of ``lesions.csv``: a connected component of the lesion labels (for a model with
compartments, of its compartments together). The SEG has one segment per label, so each lesion
references the segment of its ``label`` (its majority compartment; its volume counts all of its
voxels), lesions of one label share that segment and are told apart by their tracking identifier
("lesion N", N as in ``lesions.csv``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .dicom_seg import source_datasets, new_instance, unavailable_reason
from .writers import atomic_path
from ..image import Image

#: the private coding scheme of the concepts DICOM has no code for
SCHEME = "99UNETSEG"
SCHEME_NAME = "UNetSegment measurement concepts"
NO_SEG = "no DICOM SEG to reference (the SR's measurements point at segments of segmentation.dcm)"
NOT_DICOM = "the input is not a DICOM series, so there is no series for a DICOM SR to reference"
#: lesion-table intensity unit → UCUM code and meaning
_UCUM_UNITS = {"HU": ("[hnsf'U]", "Hounsfield unit"), "s": ("s", "second")}


def write_measurement_report(
    labels: Image,
    source_folder: Path,
    seg_path: Path,
    rows: Sequence[Mapping],
    out_path: Path,
    *,
    model_name: str,
    model_version: str,
    intensity_unit: str | None,
    series_number: int | None = None,
    changes: Mapping[int, Mapping] | None = None,
) -> str | None:
    """Write ``rows`` (the lesion table's rows, :data:`..analysis.lesions.COLUMNS`) as a TID 1500 SR.

    ``labels`` must lie on the grid of the DICOM series in ``source_folder`` (as for the SEG);
    ``seg_path`` is the DICOM SEG written from them. Returns None when written, else why nothing was
    (highdicom unavailable, or no SEG). ``series_number`` defaults to the source's SeriesNumber + 1001.
    ``changes`` (``compare``): lesion number → its comparison row (:mod:`..analysis.followup`); each
    lesion's group then also holds the prior volume, the change in mL and %, its status and the
    hematoma-expansion flag.
    """
    absent = unavailable_reason()
    if absent:
        return absent.replace("DICOM SEG", "DICOM SR", 1)
    if not Path(seg_path).is_file():
        return NO_SEG
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = source_datasets(labels, Path(source_folder))
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    segment_of = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    algorithm = hd.sr.AlgorithmIdentification(name=f"UNetSegment {model_name}"[:64], version=str(model_version)[:64])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"UNetSegment {model_name}"[:64], manufacturer_name="UNetSegment",
            model_name=str(model_version)[:64]),
    )
    groups = [_lesion_group(row, segment_of, seg, sources, algorithm, intensity_unit,
                            (changes or {}).get(int(row["lesion"])))
              for row in rows if str(row["label"]) in segment_of]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion if sources[0].Modality == "CT" else codes.DCM.ImagingProcedure,
        imaging_measurements=groups,
    )
    if series_number is None:
        series_number = int(getattr(sources[0], "SeriesNumber", None) or 0) + 1001
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg],
        content=report,
        **new_instance(series_number, model_version, f"UNetSegment {model_name} measurements"),
    )
    sr.CodingSchemeIdentificationSequence = [_scheme_item()]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        sr.save_as(tmp)
    return None


def _lesion_group(row: Mapping, segment_of: Mapping, seg, sources: list, algorithm, intensity_unit: str | None,
                  change: Mapping | None = None):
    """One lesion's TID 1411 group: its measurements (and its change against a prior scan), referencing its
    label's segment."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    s = segment_of[str(row["label"])]
    referenced = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=int(s.SegmentNumber),
        source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID),
    )
    finding = s.SegmentedPropertyTypeCodeSequence[0]
    category = s.SegmentedPropertyCategoryCodeSequence[0]
    mm, ml = _ucum("mm", "millimeter"), _ucum("ml", "milliliter")
    k_unit = _ucum("{slice}", "slice")

    def measure(name, value, unit, **kw):
        return None if value is None else hd.sr.Measurement(name=name, value=float(value), unit=unit,
                                                            algorithm_id=algorithm, **kw)

    lps = (-float(row["centroid_r"]), -float(row["centroid_a"]), float(row["centroid_s"]))
    first, last = int(row["slice_first"]), int(row["slice_last"])
    unit_code = _UCUM_UNITS.get(intensity_unit or "", ("1", "no units"))
    density_name = (codes.DCM.MeanAttenuationCoefficient if intensity_unit == "HU"
                    else _private("MEANINT", "Mean intensity of the input channel"))
    measurements = [
        measure(codes.SCT.Volume, row["volume_ml"], ml),  # the sum of the lesion's voxel volumes
        measure(_private("ABC2VOL", "Volume estimated by ABC/2 (Kothari 1996)"), row.get("abc2_ml"), ml),
        measure(_private("ABC2A", "ABC/2 A: largest diameter on the largest-area slice"), row.get("abc2_a_mm"), mm),
        measure(_private("ABC2B", "ABC/2 B: largest diameter perpendicular to A"), row.get("abc2_b_mm"), mm),
        measure(_private("ABC2C", "ABC/2 C: weighted slice count x slice thickness"), row.get("abc2_c_mm"), mm),
        *(measure(_private(f"CENTROID{axis}", f"Centroid {axis} (patient, LPS)"), value, mm)
          for axis, value in zip("XYZ", lps)),
        measure(_private("SLICEFIRST", "First slice holding the lesion (0-based k)"), first, k_unit),
        measure(_private("SLICELAST", "Last slice holding the lesion (0-based k)"), last, k_unit),
        measure(_private("INSTFIRST", "InstanceNumber of the first slice"), _instance(sources, first), _ucum("1", "no units")),
        measure(_private("INSTLAST", "InstanceNumber of the last slice"), _instance(sources, last), _ucum("1", "no units")),
        measure(density_name, row.get("mean_intensity"), _ucum(*unit_code)),
        measure(codes.DCM.Probability, row.get("mean_probability"), _ucum("1", "no units"), derivation=codes.SCT.Mean),
    ]
    evaluations = []
    if change is not None:
        measurements += [
            measure(_private("PRIORVOL", "Volume of the matched lesion(s) on the prior scan"), change["prior_ml"], ml),
            measure(_private("VOLCHANGE", "Volume change since the prior scan"), change["change_ml"], ml),
            measure(_private("VOLCHANGEPCT", "Volume change since the prior scan, percent"), change.get("change_pct"),
                    _ucum("%", "percent")),
        ]
        evaluations = [
            hd.sr.QualitativeEvaluation(_private("CHANGESTATUS", "Change status since the prior scan"),
                                        _private(f"STATUS_{str(change['status']).upper()}", str(change["status"]))),
            hd.sr.QualitativeEvaluation(_private("HEMEXP", "Hematoma expansion"),
                                        codes.SCT.Yes if change["expansion"] else codes.SCT.No),
        ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {row['lesion']}"),
        referenced_segment=referenced,
        finding_type=hd.sr.CodedConcept(finding.CodeValue, finding.CodingSchemeDesignator, finding.CodeMeaning),
        finding_category=hd.sr.CodedConcept(category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning),
        algorithm_id=algorithm,
        measurements=[m for m in measurements if m is not None],
        qualitative_evaluations=evaluations or None,
    )


def _instance(sources: list, k: int) -> int | None:
    number = getattr(sources[k], "InstanceNumber", None)
    return None if number is None else int(number)


def _private(value: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value, SCHEME, meaning)


def _ucum(value: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value, "UCUM", meaning)


def _scheme_item():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "UNetSegment"
    return item
