"""Re-derive a finished run's segmentation at another threshold without running the network again.

The Slicer module's live threshold slider and its "Export all…" use this: the probability map the
run wrote (``probability.nrrd``, P(lesion) on the input grid: the lesion labels' probabilities summed)
is thresholded the same way :func:`..engine.labels.labels_from_probabilities` says, small lesions are
removed with :func:`.lesions.remove_small_lesions` and the table is recomputed with
:func:`.lesions.analyze_lesions`, with the arguments :func:`.job.write_outputs` uses. For one-label
models the result equals a fresh ``segment --threshold T`` run exactly. For models with several labels
the run's ``class_probabilities.nrrd`` (each label's own map, :mod:`..io.class_maps`) gives each voxel
its label by the engine's own rule, so the result equals a fresh run exactly too (up to map values
below the 0.001 storage floor, which only thresholds ≤ 0.002 could see); for runs written
before that file existed, which label a voxel gets comes from the run's own label map where that had
one, else from the nearest voxel of a lesion label, and labels that are not lesions (oedema) keep the
run's voxels wherever they do not become lesion, since the network, not the threshold, decides them.
``mean/max_probability`` describe P(lesion).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..engine.labels import labels_from_probabilities
from ..engine.pipeline import SegmentResult
from ..errors import InputError
from ..image import Image
from ..io.class_maps import CLASS_PROBABILITIES_FILE, read_class_probabilities
from ..io.outputs import CONTRACT_FILES, StagedOutput
from ..io.readers import read_image
from ..io.writers import write_json
from ..models.bundle import Bundle
from ..params import FIELD, HEATMAP_KINDS, SegmentParams
from ..settings import context_label_values, lesion_label_values
from .lesions import LesionTable, analyze_lesions, remove_small_lesions


@dataclass
class RunOutputs:
    """A finished run read back from its output folder."""

    folder: Path
    labels: Image  # segmentation.nii.gz (after the run's small-lesion removal)
    probability: Image  # probability.nrrd
    heatmaps: dict[str, Image]  # gradcam / uncertainty, when written
    summary: dict  # summary.json
    class_probabilities: dict[int, Image] = field(default_factory=dict)  # label value -> map (multi-class runs)

    @property
    def threshold(self) -> float:
        return float(self.summary["parameters"]["threshold"])

    @property
    def min_lesion_ml(self) -> float:
        return float(self.summary.get("min_lesion_ml") or 0.0)

    @property
    def connectivity(self) -> int:
        return int(self.summary.get("connectivity") or self.summary["parameters"]["connectivity"])


def load_run(folder: str | os.PathLike) -> RunOutputs:
    """Read the volumes and ``summary.json`` a ``segment`` run wrote into ``folder``."""
    d = Path(folder)
    if not (d / "summary.json").is_file():
        raise InputError(f"{d} holds no complete run (summary.json missing)", "run the segmentation again")
    summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    heat = {k: read_image(d / f"{k}.nrrd") for k in HEATMAP_KINDS if (d / f"{k}.nrrd").is_file()}
    classes = _class_maps(d / CLASS_PROBABILITIES_FILE)
    return RunOutputs(d, read_image(d / "segmentation.nii.gz"), read_image(d / "probability.nrrd"), heat, summary, classes)


def _class_maps(path: Path) -> dict[int, Image]:
    """The run's per-class maps, or none (a run written before the file existed, or a damaged file:
    the run stays usable, re-thresholds fall back to the label map's compartments, with a warning)."""
    if not path.is_file():
        return {}
    try:
        return read_class_probabilities(path)
    except InputError as e:
        warnings.warn(f"{e.problem}; the per-class maps are left out", RuntimeWarning, stacklevel=3)
        return {}


def table_from_summary(summary: dict) -> LesionTable:
    """The run's lesion table as written to ``summary.json`` (exactly what ``lesions.csv`` holds)."""
    from .lesions import COLUMNS

    rows = [{c: l.get(c) for c in COLUMNS} for l in summary.get("lesions", [])]
    total = {c: summary.get("total", {}).get(c) for c in COLUMNS}
    midline = {"method": summary.get("side_method", ""), "midline_r": summary.get("midline_r")}
    return LesionTable(rows, total, midline, int(summary.get("connectivity", 26)), float(summary.get("min_lesion_ml") or 0.0))


def labels_at_threshold(probability: Image, threshold: float, label_values: Sequence[int],
                        previous: Image | None = None, lesion_values: Sequence[int] | None = None,
                        class_probabilities: Mapping[int, Image] | None = None) -> Image:
    """The raw label map (before small-lesion removal) at ``threshold``; see the module docstring.

    ``lesion_values``: the labels that are lesions (default: all). ``class_probabilities``: each
    label's own map, when the run wrote them: the engine's rule applies to them as in a fresh run.
    Without them, voxels of the labels that are not lesions (context such as oedema, which the network
    decides by itself, not by the threshold) keep the run's label wherever they do not become lesion."""
    values = [int(v) for v in label_values]
    lesions = [v for v in values if lesion_values is None or v in lesion_values]
    fg = np.asarray(probability.array, dtype=np.float32)
    if len(values) > 1 and class_probabilities and set(class_probabilities) == set(values):
        maps = {v: np.asarray(class_probabilities[v].array, dtype=np.float32) for v in values}
        return probability.with_array(labels_from_probabilities(maps, float(threshold), fg, lesions))
    prev = np.zeros(fg.shape, np.uint8) if previous is None else np.asarray(previous.array)
    if len(values) == 1:
        return probability.with_array(labels_from_probabilities({values[0]: fg}, float(threshold)))
    keep = labels_from_probabilities({1: fg}, float(threshold)) > 0  # the rule; which label: below
    prev_lesion = np.isin(prev, lesions)
    if len(lesions) == 1 or not prev_lesion.any():
        arr = np.where(keep, lesions[0], 0)
    else:
        from scipy import ndimage

        idx = ndimage.distance_transform_edt(~prev_lesion, return_distances=False, return_indices=True)
        arr = np.where(keep, prev[tuple(idx)], 0)
    context = ~keep & ~prev_lesion & (prev != 0)
    arr = np.where(context, prev, arr)
    return probability.with_array(arr.astype(np.uint8))


@dataclass
class Rederived:
    labels: Image  # after small-lesion removal, as written to segmentation.*
    table: LesionTable
    threshold: float
    raw_labels: Image = field(repr=False)  # before small-lesion removal


def rederive(probability: Image, threshold: float, labels_meta: Sequence[dict], *, intensity: Image | None = None,
             min_lesion_ml: float = 0.0, connectivity: int = 26, modality: str | None = None,
             previous: Image | None = None, class_probabilities: Mapping[int, Image] | None = None) -> Rederived:
    """Label map and lesion table at ``threshold`` (``labels_meta``: the bundle's ``labels``;
    ``previous``, ``class_probabilities``: see :func:`labels_at_threshold`)."""
    values = [int(l["value"]) for l in labels_meta]
    lesion_values = lesion_label_values(labels_meta)
    raw = labels_at_threshold(probability, threshold, values, previous, lesion_values, class_probabilities)
    ref = remove_small_lesions(raw, min_lesion_ml, connectivity, lesion_values)
    table = analyze_lesions(
        ref,
        intensity=intensity,
        probability={v: probability for v in lesion_values},
        label_names={int(l["value"]): l["name"] for l in labels_meta},
        connectivity=connectivity,
        min_lesion_ml=min_lesion_ml,
        modality=modality,
        lesion_values=lesion_values,
        perilesional_values=context_label_values(labels_meta),
    )
    return Rederived(ref, table, float(threshold), raw)


def rederive_run(run: RunOutputs, bundle: Bundle, threshold: float, intensity: Image | None = None) -> Rederived:
    """:func:`rederive` with the run's own minimum lesion size, connectivity and modality."""
    return rederive(run.probability, threshold, bundle.labels, intensity=intensity, min_lesion_ml=run.min_lesion_ml,
                    connectivity=run.connectivity, modality=bundle.meta["inputs"][0]["modality"], previous=run.labels,
                    class_probabilities=run.class_probabilities)


def _add_report(run: RunOutputs, folder: Path, bundle: Bundle | None, inputs, input_paths) -> dict:
    """Render the report a run was written without into ``folder`` (a copy of the run); the summary
    there names it and its digest, and stays the run's (same ``run_id``, timings, warnings)."""
    from ..io.outputs import file_digests
    from ..serving.job import write_report

    if bundle is None or not inputs:
        raise InputError("rendering the report needs the model and the input volumes", "pass bundle and inputs")
    s = run.summary
    paths = list(input_paths) if input_paths else [i["path"] for i in s.get("inputs", [])]
    write_report(folder / "report.png", bundle, list(inputs), run.labels, run.probability, run.heatmaps.get("gradcam"),
                 table_from_summary(s), paths, s.get("created", ""), s["parameters"], s.get("unusual_input"))
    summary = {**s, "report": {"file": "report.png"}}
    summary["files_sha256"] = file_digests(folder)
    write_json(summary, folder / "summary.json")
    return summary


def export_run(run: RunOutputs, dest: str | os.PathLike, *, bundle: Bundle | None = None, threshold: float | None = None,
               inputs: Sequence[Image] | None = None, input_paths: Sequence[str] | None = None,
               overwrite: bool = False, rewrite: bool = False) -> dict:
    """Write the CLI's file set for ``run`` into ``dest`` (staged: all files or none); returns the summary.

    At the run's own threshold (or ``threshold`` None) the files are copied unchanged; a run written
    without its report (the Slicer module's: ``"report": false``) gets it rendered from the run's own
    files, and ``summary.json`` (same ``run_id``) names it. At another threshold, or with ``rewrite``
    (e.g. ``run`` was put back from an ROI crop onto the full grid), they are written again by
    :func:`.job.write_outputs` from the re-derived label map (``bundle`` and ``inputs`` — the run's
    input images, for the intensity columns and the report — are then required).
    """
    same = threshold is None or abs(float(threshold) - run.threshold) < 1e-9
    if threshold is None:
        threshold = run.threshold
    with StagedOutput(dest, overwrite) as stage:
        if same and not rewrite:
            for f in CONTRACT_FILES:
                if (run.folder / f).is_file():
                    shutil.copy2(run.folder / f, stage.path / f)
            if (run.folder / "report.png").is_file():
                return run.summary
            return _add_report(run, stage.path, bundle, inputs, input_paths)
        if bundle is None or not inputs:
            raise InputError("re-deriving the outputs needs the model and the input volumes", "pass bundle and inputs")
        from ..serving.job import WRITE_TIMINGS, write_outputs

        raw = labels_at_threshold(run.probability, float(threshold), [l["value"] for l in bundle.labels], run.labels,
                                  lesion_label_values(bundle.labels), run.class_probabilities)
        s = run.summary
        p = dict(s["parameters"])
        p["heatmaps"] = tuple(p.get("heatmaps") or ())
        p["threshold"] = float(threshold)
        p["min_lesion_ml"] = run.min_lesion_ml
        params = SegmentParams.from_mapping({k: v for k, v in p.items() if k in FIELD})
        extra = {"threshold": float(threshold), "network_grid_shape_kji": s.get("network_grid_shape_kji"),
                 "gradcam_layer": s.get("gradcam_layer"), "cam_method": s.get("cam_method"),
                 "uncertainty_kind": s.get("uncertainty"), "unusual_input": s.get("unusual_input"),
                 "input_domain": s.get("input_domain")}
        result = SegmentResult(
            labels=raw, probability=run.probability,
            class_probabilities=dict(run.class_probabilities),  # none for runs written before the file existed
            heatmaps=dict(run.heatmaps), inputs=list(inputs), device=s.get("device", ""),
            precision=s.get("precision", ""),
            timings={k: v for k, v in s.get("timings_s", {}).items() if k not in WRITE_TIMINGS},
            warnings=list(s.get("warnings", [])), extra=extra,
        )
        paths = list(input_paths) if input_paths else [i["path"] for i in s.get("inputs", [])]
        summary = write_outputs(stage.path, result, bundle, params, paths)
        summary["rederived_from"] = {"threshold": run.threshold, "folder": str(run.folder)}
        write_json(summary, stage.path / "summary.json")
        return summary
