"""One ``segment`` run from files to files: the unit shared by the CLI, the Slicer worker, batch and server."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..analysis.lesions import analyze_lesions, split_small_lesions
from ..analysis.report import percentile_window, preload_drawing, render_report
from ..engine.checks import check_memory
from ..engine.inference import CancelToken, ProgressFn
from ..engine.pipeline import SegmentResult, segment
from ..errors import InputError, OutputError, UsageError
from ..image import Image
from ..io.class_maps import CLASS_PROBABILITIES_FILE, write_class_probabilities
from ..io.dicom_seg import write_dicom_seg
from ..io.dicom_sr import NOT_DICOM, write_measurement_report
from ..io.outputs import StagedOutput, file_digests
from ..io.readers import HeaderCheck, VolumeHeader, dicom_slice_refs, read_image
from ..io.writers import write_image, write_json, write_seg_nrrd
from ..models.bundle import Bundle, default_model_name, load_bundle
from ..models.terminology import label_codes, label_terminology
from ..params import SegmentParams
from ..settings import context_label_values, lesion_label_values, resolve, resolved_parameters
from .model_cache import ModelCache


def map_inputs(tokens: Sequence[str], channels: Sequence[str]) -> list[Path]:
    """Map ``PATH`` / ``NAME=PATH`` tokens to the bundle's channels (in its order)."""
    if not tokens:
        raise UsageError("no input given", "give one volume per model channel: " + " ".join(channels))
    named: dict[str, str] = {}
    positional: list[str] = []
    lower = {c.lower(): c for c in channels}
    for t in tokens:
        if "=" in t and not Path(t).exists():
            key, path = t.split("=", 1)
            if key.lower() not in lower:
                raise InputError(f"unknown input name {key!r}; this model's channels are {', '.join(channels)}", "use NAME=PATH with one of those names")
            name = lower[key.lower()]
            if name in named:
                raise InputError(f"input {name} given twice", "give each channel once")
            named[name] = path
        else:
            positional.append(t)
    if named and positional:
        raise InputError("mixing NAME=PATH and plain paths", "name every input or none")
    if named:
        missing = [c for c in channels if c not in named]
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)} for this model", "add " + " ".join(f"{m}=PATH" for m in missing))
        return [Path(named[c]) for c in channels]
    if len(positional) != len(channels):
        raise InputError(
            f"this model expects {len(channels)} input(s) ({', '.join(channels)}), got {len(positional)}",
            "give one volume per channel, in that order, or as NAME=PATH",
        )
    return [Path(p) for p in positional]


def segment_files(
    inputs: Sequence[str],
    output_dir: str | os.PathLike,
    model: str | None = None,
    params: SegmentParams | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    models: ModelCache | None = None,
    report: bool = True,
) -> dict:
    """Read inputs, segment, write the contract's files atomically; returns the summary dict.

    ``models``: a :class:`.model_cache.ModelCache` whose network for ``model`` is reused (a long-lived
    process); else the bundle's network is built for this run. ``report=False`` leaves out
    ``report.png`` (for a caller that shows the result itself and renders the report on export)."""
    params = params or SegmentParams()
    t_all = time.perf_counter()
    bundle, network = models.get(model) if models is not None else (load_bundle(model or default_model_name()), None)
    settings = resolve(params, bundle)  # once; a bad device is refused here, before any voxel is read
    t_setup = time.perf_counter() - t_all  # the bundle, and PyTorch's import (device and precision are resolved)
    paths = map_inputs(inputs, bundle.channel_names)
    t = time.perf_counter()
    budget = _memory_budget(len(paths), settings.model.out_channels)
    images = [read_image(p, before_pixels=budget) for p in paths]
    t_read = time.perf_counter() - t
    stage = StagedOutput(output_dir, overwrite)
    stage.check()  # refuse before the heavy work
    # while the network runs (it releases the GIL); beside an import or a read both would wait
    drawing = preload_drawing() if report else None
    result = segment(images, bundle, progress=progress, cancel=cancel, settings=settings, network=network)
    result.timings = {"setup_s": t_setup, "read_s": t_read, **result.timings}
    # a stop asked after the last window is honoured too (exit 130, no outputs), not silently ignored
    if cancel is not None:
        cancel.check()
    if drawing is not None:
        drawing.join()  # long done by now; joined so that nothing of this run outlives it
    try:
        with stage:
            summary = write_outputs(stage.path, result, bundle, params, paths, report=report)
            summary["timings_s"]["total_s"] = round(time.perf_counter() - t_all, 4)
            if cancel is not None:
                cancel.check()  # the last moment before the commit: the staged files are dropped
            write_json(summary, stage.path / "summary.json")
    except (OSError, RuntimeError) as e:  # disk full, quota, permissions changed mid-run: nothing is left behind
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][:200]
        raise OutputError(
            f"cannot write outputs in {output_dir}: {reason}",
            "free disk space or choose another --output-dir; no output of this run was kept",
        ) from None
    return summary


def _memory_budget(n_inputs: int, n_classes: int) -> HeaderCheck:
    """Refuse, from the headers alone, inputs whose run would not fit in memory (the pipeline's estimate:
    the first volume's voxels once per channel), before any voxel is read."""
    declared: list[int] = []

    def check(header: VolumeHeader) -> None:
        declared.append(header.voxels)
        check_memory(max(sum(declared), declared[0] * n_inputs), n_classes)

    return check


#: the timings of writing the outputs (and the run's total), which a re-derived run measures anew
WRITE_TIMINGS = ("write_s", "table_s", "volumes_s", "report_s", "total_s")


def write_outputs(folder: Path, result: SegmentResult, bundle: Bundle, params: SegmentParams, paths: Sequence[Path],
                  report: bool = True) -> dict:
    """Write every volume/table/report of one result into ``folder``; return the summary dict.

    ``report=False``: no ``report.png`` (``summary.json`` says so under ``report``)."""
    t = time.perf_counter()
    settings = result.settings or resolve(params, bundle, hardware=False)
    min_ml, connectivity = settings.min_lesion_ml, settings.connectivity
    used = resolved_parameters(params, settings, result.extra.get("batch_size"))
    lesion_values, context_values = settings.model.lesion_values, context_label_values(bundle.labels)
    ref, dropped_ml = split_small_lesions(result.labels, min_ml, connectivity, lesion_values)
    show = display_channel(bundle)  # the channel a reader expects (e.g. Tmax): report and intensity columns
    segments = [segment_meta(l) for l in bundle.labels]  # one terminology per label for every file
    # a DICOM series' slice references are read before the volume files' thread starts (which reads the
    # same series for a DICOM SEG): one GDCM scan of the folder at a time, the warnings in their order
    dicom_refs = _dicom_refs(ref, paths[0], result.warnings)
    d = ref.direction
    sheared = ("the input grid is sheared (gantry tilt): segmentation.nii.gz cannot store that and was written on "
               "the nearest orthogonal grid; use segmentation.seg.nrrd or the .nrrd files")
    if np.abs(d.T @ d - np.eye(3)).max() > 1e-4 and sheared not in result.warnings:  # once, also when re-derived
        result.warnings.append(sheared)
    # the volume files (compression and file writes, which release the GIL) are written while the
    # lesion table is measured: two cores, one wait
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="unetsegment-volumes") as pool:
        volumes = pool.submit(_write_volumes, folder, result, bundle, ref, segments, paths[0])
        table = analyze_lesions(
            ref,
            intensity=result.inputs[show],
            probability=result.probability,  # P(lesion): the map the threshold was applied to (as a re-derived table)
            label_names={l["value"]: l["name"] for l in bundle.labels},
            connectivity=connectivity,
            min_lesion_ml=min_ml,
            modality=bundle.meta["inputs"][show]["modality"],
            intensity_channel=bundle.channel_names[show],
            intensity_unit=channel_unit(bundle, show),
            dicom_slices=dicom_refs,
            lesion_values=lesion_values,
            perilesional_values=context_values,
        )
        table.dropped_ml = dropped_ml
        table.write_csv(folder / "lesions.csv")
        table.write_tsv(folder / "lesions.tsv")
        t_table = time.perf_counter()
        class_maps, dicom_seg, failed = volumes.result()
    if failed:
        result.warnings.append(failed)
    dicom_sr = _write_sr(ref, paths[0], folder, table, bundle, show, result.warnings)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t_volumes = time.perf_counter()
    if report:
        write_report(folder / "report.png", bundle, result.inputs, ref, result.probability, result.heatmaps.get("gradcam"),
                     table, paths, created, used, result.extra.get("unusual_input"))
    timings = dict(result.timings)
    end = time.perf_counter()
    # write_s: all of the outputs; its parts: the lesion table (analysis, CSV, TSV), then the rest of the
    # volume files (segmentation, maps, DICOM: written alongside the table, this is the wait after it), the report
    timings.update({"write_s": end - t, "table_s": t_table - t, "volumes_s": t_volumes - t_table,
                    "report_s": end - t_volumes if report else 0.0})
    summary = build_summary(result, bundle, used, paths, timings, created)
    summary.update(table.summary_dict())
    summary["segments"] = segment_totals(ref, segments, table, lesion_values)
    if class_maps is not None:
        summary["class_probabilities"] = class_maps
    if dicom_seg is not None:
        summary["dicom_seg"] = dicom_seg
    summary["dicom_sr"] = dicom_sr
    summary["report"] = {"file": "report.png"} if report else {"file": None, "absent_because": "not asked for (rendered on export)"}
    summary["files_sha256"] = file_digests(folder)  # ties every file to this summary (and its run_id)
    return summary


def _write_volumes(folder: Path, result: SegmentResult, bundle: Bundle, ref: Image, segments: list[dict],
                   source: str) -> tuple[dict | None, dict | None, str | None]:
    """The run's volume files: the segmentation (``.seg.nrrd``, ``.nii.gz``, and a DICOM SEG for a
    DICOM series input), ``probability.nrrd``, the per-class maps and the heatmaps. Returns
    ``summary.json``'s entries for the class maps and the DICOM SEG (None where there is none; one
    not written says why under ``absent_because``), and the warning of a DICOM SEG that failed."""
    write_seg_nrrd(ref, segments, folder / "segmentation.seg.nrrd")
    write_image(ref, folder / "segmentation.nii.gz")
    write_image(result.probability, folder / "probability.nrrd")
    class_maps = _write_class_maps(folder, result, bundle)
    for kind, img in result.heatmaps.items():
        write_image(img, folder / f"{kind}.nrrd")
    if not Path(source).is_dir():
        return class_maps, None, None
    failed = None
    try:  # DICOM series input: also a DICOM SEG referencing it
        absent = write_dicom_seg(ref, Path(source), segments, folder / "segmentation.dcm",
                                 model_name=bundle.name, model_version=bundle.version)
    except Exception as e:  # noqa: BLE001 - the SEG is an extra; never lose the run over it
        absent = failed = f"DICOM SEG could not be written: {e}"
    return class_maps, {"file": None, "absent_because": absent} if absent else {"file": "segmentation.dcm"}, failed


def _write_class_maps(folder: Path, result: SegmentResult, bundle: Bundle) -> dict | None:
    """``class_probabilities.nrrd`` for a bundle with several labels (:mod:`..io.class_maps`), when
    ``result`` carries every label's map (a run re-derived from files written before there was such
    a file has none); the ``summary.json`` entry naming it, or None."""
    names = {int(l["value"]): l["name"] for l in bundle.labels}
    if len(names) < 2 or set(result.class_probabilities) != set(names):
        return None
    write_class_probabilities(result.class_probabilities, names, folder / CLASS_PROBABILITIES_FILE)
    return {"file": CLASS_PROBABILITIES_FILE, "components": [{"value": v, "name": n} for v, n in names.items()],
            "meaning": "each label's softmax probability on the input grid (probability.nrrd is P(lesion), their lesion "
                       "labels summed)"}


def write_report(path: Path, bundle: Bundle, inputs: Sequence, labels, probability, gradcam, table,
                 paths: Sequence, created: str, parameters: dict, unusual_input) -> None:
    """``report.png`` of one run: the display channel of ``inputs`` with ``labels`` (after small-lesion
    removal), its probability and Grad-CAM maps, the lesion ``table`` and the run's ``parameters``."""
    show = display_channel(bundle)
    render_report(
        path,
        image=inputs[show],
        labels=labels,
        probability=probability,
        gradcam=gradcam,
        table=table,
        model_name=bundle.name,
        model_version=bundle.version,
        input_name=", ".join(Path(p).name for p in paths),
        created=created,
        window=display_window(bundle, inputs[show]),
        label_colors={l["value"]: tuple(l["color"]) for l in bundle.labels},
        parameters=parameters,
        modality=bundle.meta["inputs"][show]["modality"],
        intensity_label=_intensity_label(bundle, show),
        unusual_input=unusual_input,
        lesion_values=lesion_label_values(bundle.labels),
    )


def _write_sr(labels: Image, source: str, folder: Path, table, bundle: Bundle, show: int, warnings: list) -> dict:
    """``measurements.dcm`` (TID 1500 SR) for a DICOM series input; ``summary.json``'s account of it."""
    if not Path(source).is_dir():
        return {"file": None, "absent_because": NOT_DICOM}
    try:
        absent = write_measurement_report(labels, Path(source), folder / "segmentation.dcm", table.rows,
                                          folder / "measurements.dcm", model_name=bundle.name,
                                          model_version=bundle.version, intensity_unit=channel_unit(bundle, show))
    except Exception as e:  # noqa: BLE001 - the SR is an extra; never lose the run over it
        absent = f"DICOM SR could not be written: {e}"
        warnings.append(absent)
    return {"file": None, "absent_because": absent} if absent else {"file": "measurements.dcm"}


def segment_totals(labels: Image, segments: Sequence[dict], table, lesion_values: Sequence[int]) -> list[dict]:
    """``summary.json``'s ``segments``: each label's codes, whether it is a lesion label, its volume in the
    final segmentation (mL) and, for lesion labels, how many lesions have it as their ``label``
    (their majority compartment) — the per-class totals of a multi-class model."""
    arr = np.asarray(labels.array)
    counts = {v: int(np.count_nonzero(arr == v)) for v in {int(seg["value"]) for seg in segments}}
    voxel_ml = labels.voxel_volume_mm3 / 1000.0
    out = []
    for seg in segments:
        v = int(seg["value"])
        lesion = v in lesion_values
        out.append({"value": v, "name": seg["name"], "category": seg["category"], "code": seg["code"],
                    "terminology": seg["terminology"], "lesion": lesion, "volume_ml": float(counts[v] * voxel_ml),
                    "lesions": sum(1 for r in table.rows if r["label"] == seg["name"]) if lesion else None})
    return out


def segment_meta(label: dict) -> dict:
    """A bundle label as the writers take it, with its codes from :func:`.terminology.label_codes`."""
    category, code = label_codes(label)
    return {"value": label["value"], "name": label["name"], "color": label["color"], "category": category, "code": code,
            "terminology": label_terminology(label)}


def display_channel(bundle: Bundle) -> int:
    """Index of the channel the report shows and the intensity columns describe: ``display.channel``, else 0."""
    name = bundle.meta.get("display", {}).get("channel")
    return bundle.channel_names.index(name) if name in bundle.channel_names else 0


def channel_unit(bundle: Bundle, index: int) -> str | None:
    """A channel's unit: its ``unit`` in model.json, else HU for CT, else None."""
    spec = bundle.meta["inputs"][index]
    return spec.get("unit") or ("HU" if spec.get("modality", "").upper() == "CT" else None)


def display_window(bundle: Bundle, image) -> tuple[float, float]:
    """``display.window`` when fixed; with ``display.window_percentiles`` the image's own percentiles."""
    display = bundle.meta.get("display", {})
    if "window_percentiles" in display:
        return percentile_window(image, display["window_percentiles"])
    return tuple(float(v) for v in display.get("window", (0, 80)))


def _intensity_label(bundle: Bundle, index: int) -> str:
    """'HU' for a CT model, else e.g. 'Tmax s': what the report's intensity figures are."""
    unit = channel_unit(bundle, index)
    if len(bundle.channel_names) == 1 and unit:
        return unit
    return " ".join(x for x in (bundle.channel_names[index], unit) if x)


def _dicom_refs(labels, path, warnings: list[str]) -> list | None:
    """Per-k DICOM references of a series input (None for files; a warning when they cannot be matched)."""
    if not Path(path).is_dir():
        return None
    try:
        return dicom_slice_refs(path, labels)
    except (InputError, ImportError) as e:  # an extra: never lose the run over it (ImportError: no pydicom)
        warnings.append(f"DICOM references not added to the lesion table: {e}")
        return None


def build_summary(result: SegmentResult, bundle: Bundle, parameters: dict, paths: Sequence[Path], timings: dict,
                  created: str) -> dict:
    ref = result.labels
    return {
        "unetsegment_version": __version__,
        "run_id": uuid.uuid4().hex,
        "created": created,
        "research_use_only": "Research use only — not for diagnosis.",
        "inputs": [
            {"channel": c, "path": str(Path(p).resolve())} for c, p in zip(bundle.channel_names, paths)
        ],
        "geometry": {
            "shape_ijk": list(ref.shape_ijk),
            "spacing_mm": [float(s) for s in ref.spacing],
            "ijk_to_ras": ref.ijk_to_ras.tolist(),
            "ijk_to_lps": ref.ijk_to_lps.tolist(),
        },
        "model": {"name": bundle.name, "version": bundle.version, "path": str(bundle.root), "dimensions": bundle.dimensions},
        "device": result.device,
        "precision": result.precision,
        "parameters": parameters,
        "network_grid_shape_kji": result.extra.get("network_grid_shape_kji"),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "heatmaps": {k: f"{k}.nrrd" for k in result.heatmaps},
        "gradcam_layer": result.extra.get("gradcam_layer"),
        "cam_method": result.extra.get("cam_method"),
        "uncertainty": result.extra.get("uncertainty_kind"),
        "unusual_input": result.extra.get("unusual_input"),
        "input_domain": result.extra.get("input_domain"),
        "warnings": list(result.warnings),
        "timings_s": {k: round(float(v), 4) for k, v in timings.items()},
    }
