"""One ``segment`` run from files to files: the unit shared by the CLI, the Slicer worker, batch and server."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path

import numpy as np
from typing import Sequence

from . import __version__
from .bundle import Bundle, default_model_name, load_bundle
from .errors import InputError, OutputError, UsageError
from .inference import CancelToken, ProgressFn, resolve_device, resolve_precision
from .io.readers import read_image
from .lesions import analyze_lesions, remove_small_lesions
from .io.dicom_seg import write_dicom_seg
from .io.writers import write_image, write_json, write_seg_nrrd
from .outputs import StagedOutput
from .report import render_report
from .params import HEATMAP_KINDS, SegmentParams
from .pipeline import SegmentResult, segment


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
) -> dict:
    """Read inputs, segment, write the contract's files atomically; returns the summary dict."""
    params = params or SegmentParams()
    bad = [h for h in params.heatmaps if h not in HEATMAP_KINDS]
    if bad:
        raise UsageError(f"unknown heatmap kind {bad[0]!r}", f"use {', '.join(HEATMAP_KINDS)} or none")
    t_all = time.perf_counter()
    resolve_precision(params.precision, resolve_device(params.device))  # refuse a bad device before any work
    bundle = load_bundle(model or default_model_name())
    paths = map_inputs(inputs, bundle.channel_names)
    t = time.perf_counter()
    images = [read_image(p) for p in paths]
    t_read = time.perf_counter() - t
    stage = StagedOutput(output_dir, overwrite)
    stage.check()  # refuse before the heavy work
    result = segment(images, bundle, params, progress=progress, cancel=cancel)
    result.timings = {"read_s": t_read, **result.timings}
    try:
        with stage:
            summary = write_outputs(stage.path, result, bundle, params, paths)
            summary["timings_s"]["total_s"] = round(time.perf_counter() - t_all, 4)
            write_json(summary, stage.path / "summary.json")
    except (OSError, RuntimeError) as e:  # disk full, quota, permissions changed mid-run: nothing is left behind
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][:200]
        raise OutputError(
            f"cannot write outputs in {output_dir}: {reason}",
            "free disk space or choose another --output-dir; no output of this run was kept",
        ) from None
    return summary


def write_outputs(folder: Path, result: SegmentResult, bundle: Bundle, params: SegmentParams, paths: Sequence[Path]) -> dict:
    """Write every volume/table/report of one result into ``folder``; return the summary dict."""
    t = time.perf_counter()
    min_ml = params.min_lesion_ml if params.min_lesion_ml is not None else bundle.inference_default("min_lesion_ml", 0.0)
    ref = remove_small_lesions(result.labels, min_ml, params.connectivity)
    table = analyze_lesions(
        ref,
        intensity=result.inputs[0],
        probability=result.class_probabilities,
        label_names={l["value"]: l["name"] for l in bundle.labels},
        connectivity=params.connectivity,
        min_lesion_ml=min_ml,
        modality=bundle.meta["inputs"][0]["modality"],
    )
    table.write_csv(folder / "lesions.csv")
    table.write_tsv(folder / "lesions.tsv")
    segments = [
        {"value": l["value"], "name": l["name"], "color": l["color"], "terminology": l.get("terminology")}
        for l in bundle.labels
    ]
    write_seg_nrrd(ref, segments, folder / "segmentation.seg.nrrd")
    write_image(ref, folder / "segmentation.nii.gz")
    d = ref.direction
    if np.abs(d.T @ d - np.eye(3)).max() > 1e-4:
        result.warnings.append("the input grid is sheared (gantry tilt): segmentation.nii.gz cannot store that and was "
                               "written on the nearest orthogonal grid; use segmentation.seg.nrrd or the .nrrd files")
    write_image(result.probability, folder / "probability.nrrd")
    for kind, img in result.heatmaps.items():
        write_image(img, folder / f"{kind}.nrrd")
    dicom_seg = None
    if Path(paths[0]).is_dir():  # DICOM series input: also a DICOM SEG referencing it
        try:
            absent = write_dicom_seg(ref, Path(paths[0]), bundle.labels, folder / "segmentation.dcm",
                                     model_name=bundle.name, model_version=bundle.version)
        except Exception as e:  # noqa: BLE001 - the SEG is an extra; never lose the run over it
            absent = f"DICOM SEG could not be written: {e}"
            result.warnings.append(absent)
        dicom_seg = {"file": None, "absent_because": absent} if absent else {"file": "segmentation.dcm"}
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    render_report(
        folder / "report.png",
        image=result.inputs[0],
        labels=ref,
        probability=result.probability,
        gradcam=result.heatmaps.get("gradcam"),
        table=table,
        model_name=bundle.name,
        model_version=bundle.version,
        input_name=", ".join(Path(p).name for p in paths),
        created=created,
        window=tuple(bundle.meta.get("display", {}).get("window", (0, 80))),
        label_colors={l["value"]: tuple(l["color"]) for l in bundle.labels},
        parameters={**params.as_dict(), "threshold": result.extra.get("threshold"), "min_lesion_ml": min_ml},
        modality=bundle.meta["inputs"][0]["modality"],
    )
    timings = dict(result.timings)
    timings["write_s"] = time.perf_counter() - t
    summary = build_summary(result, bundle, params, paths, timings, created)
    summary.update(table.summary_dict())
    if dicom_seg is not None:
        summary["dicom_seg"] = dicom_seg
    return summary


def build_summary(result: SegmentResult, bundle: Bundle, params: SegmentParams, paths: Sequence[Path], timings: dict,
                  created: str) -> dict:
    ref = result.labels
    return {
        "unetsegment_version": __version__,
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
        "parameters": {**params.as_dict(), **{k: result.extra[k] for k in ("threshold", "overlap", "batch_size") if k in result.extra}},
        "network_grid_shape_kji": result.extra.get("network_grid_shape_kji"),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "heatmaps": {k: f"{k}.nrrd" for k in result.heatmaps},
        "gradcam_layer": result.extra.get("gradcam_layer"),
        "cam_method": result.extra.get("cam_method"),
        "uncertainty": result.extra.get("uncertainty_kind"),
        "warnings": list(result.warnings),
        "timings_s": {k: round(float(v), 4) for k, v in timings.items()},
    }
