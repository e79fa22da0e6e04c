"""The module's logic: run the worker on MRML volumes, load its outputs into the scene, and the
interactive follow-ups (live threshold, jump to lesion, exports). Usable without the panel.

Nothing is added to the scene before the worker reports ``done``; a cancelled or failed run leaves
the scene as it was and removes its temporary folder.

A request with a ``server_url`` runs on a UNetSegment server (``unetsegment serve``) instead of a
local worker: same request file, events and outcome (:class:`~.process.ServerProcess`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..analysis.followup import ChangeRules
from ..analysis.heatmap_scale import SCALES as HEATMAP_SCALES
from ..analysis.heatmap_scale import LesionScaling, lesion_scaling
from ..analysis.lesions import LesionTable
from ..analysis.rethreshold import RunOutputs, export_run, load_run, rederive_run, table_from_summary
from ..engine.grid import align_inputs
from ..settings import lesion_label_values
from ..engine.roi import Box, box_from_ras_corners, crop, uncrop
from ..errors import InputError, UsageError
from ..image import Image
from ..io.writers import write_raw_nrrd
from ..models.bundle import Bundle, available_models, import_model, load_bundle
from ..params import SegmentParams
from ..serving.client import ServerClient
from ..serving.job import display_channel
from ..serving.worker import error_event
from . import scene
from .followup import CompareResult, show_comparison
from .process import ProcessProtocol, ServerProcess, WarmRun, WarmWorker
from .signals import Signal
from .volumes import image_from_volume, roi_corners_in_frame

HEATMAP_ORDER = ("probability", "gradcam", "uncertainty")
#: the heatmap kind of one label's own probability map (multi-class bundles; listed after HEATMAP_ORDER)
CLASS_KIND_PREFIX = "class-"
#: the maps that :meth:`SegmentationLogic.set_heatmap_scale` rescales (explanations stored to the volume's peak)
PER_LESION_KINDS = ("gradcam",)
#: seconds one HTTP request to a server may take (uploads and downloads have their own, longer limit)
SERVER_TIMEOUT_S = 10.0


def class_kind(value: int) -> str:
    """The heatmap kind showing label ``value``'s own probability (``class_probabilities.nrrd``)."""
    return f"{CLASS_KIND_PREFIX}{int(value)}"


def class_kind_value(kind: str) -> int | None:
    """The label value a :func:`class_kind` names, or None for the other kinds."""
    return int(kind[len(CLASS_KIND_PREFIX):]) if kind.startswith(CLASS_KIND_PREFIX) else None


def run_maps(run: RunOutputs) -> dict[str, Image]:
    """Every map a run offers as an overlay, in display order: P(lesion), the explanations, then
    (multi-class bundles) each label's own probability."""
    maps = {"probability": run.probability, **run.heatmaps}
    ordered = {k: maps[k] for k in HEATMAP_ORDER if k in maps}
    ordered.update({class_kind(v): img for v, img in run.class_probabilities.items()})
    return ordered


def class_map_label(kind: str, labels: list[dict]) -> str | None:
    """The name of the label whose own probability a heatmap ``kind`` shows; None for the other kinds."""
    value = class_kind_value(kind)
    if value is None:
        return None
    return next((str(l["name"]) for l in labels if int(l["value"]) == value), str(value))


@dataclass
class RunRequest:
    input_nodes: list  # one scalar volume node per model channel, in the model's order
    model: str  # model name or bundle folder
    params: SegmentParams = field(default_factory=SegmentParams)
    roi_node: object | None = None  # vtkMRMLMarkupsROINode restricting the run
    output_segmentation: object | None = None  # existing node to update; None: create one
    server_url: str | None = None  # run on this UNetSegment server; None/"": a local worker process
    server_token_file: str | None = None  # file holding the server's bearer token (optional)
    #: how the Grad-CAM node is scaled: 'volume' (as stored: the volume's peak is 1) or 'lesion' (each
    #: lesion's neighbourhood to its own peak, so a small lesion next to a large one is visible)
    heatmap_scale: str = "volume"


@dataclass
class RunResult:
    """One finished run and the nodes showing it."""

    request: RunRequest
    bundle: Bundle
    run: RunOutputs  # on the first input's full grid
    inputs: list[Image]  # the inputs as read from the scene (for intensity statistics, export)
    input_paths: list[str]
    work_dir: Path
    roi_box: Box | None
    segmentation: object = None
    heatmaps: dict = field(default_factory=dict)  # kind -> volume node
    table: object = None
    lesions: LesionTable | None = None  # what the table node shows
    threshold: float = 0.5
    summary: dict = field(default_factory=dict)
    labels: Image | None = None  # the label map shown (at ``threshold``)
    heatmap_scale: str = "volume"  # how the Grad-CAM node is scaled now (see RunRequest.heatmap_scale)
    scaled_heatmaps: dict = field(default_factory=dict)  # kind -> (labels, its LesionScaling or None) last shown

    @property
    def reference_volume(self):
        return self.request.input_nodes[0]

    @property
    def intensity_image(self) -> Image:
        """The channel the intensity columns describe (the model card's ``display.channel``, e.g. Tmax),
        on the first input's grid, as the CLI measures it."""
        show = display_channel(self.bundle)
        return align_inputs(self.inputs, self.bundle.channel_names)[show] if show else self.inputs[0]


@dataclass(frozen=True)
class PendingRun:
    """A started run until its worker ends: what loading its outputs (or cleaning up) needs."""

    request: RunRequest
    bundle: Bundle
    images: list[Image]  # the inputs as read from the scene
    paths: list[str]  # where they were written for the worker
    box: Box | None  # the ROI's box on the first input's grid (its file is that crop)
    work: Path  # the run's temporary folder


@dataclass(frozen=True)
class PendingCompare:
    """A started comparison until its worker ends."""

    result: RunResult  # the current scan's run
    prior_name: str  # the prior volume node's name, or the earlier output folder's
    work: Path


class SegmentationLogicProtocol(Protocol):
    """What the panel needs from a logic (tests hand it a fake)."""

    progress: Signal
    log: Signal
    finished: Signal
    failed: Signal
    cancelled: Signal

    def available_models(self) -> dict: ...
    def load_model(self, name_or_path: str) -> Bundle: ...
    def import_model(self, path: str) -> Bundle: ...
    def ensure_dependencies(self) -> bool: ...
    def start(self, request: RunRequest) -> None: ...
    def cancel(self) -> None: ...
    def is_running(self) -> bool: ...
    def set_threshold(self, result: RunResult, threshold: float, surfaces: bool = True) -> None: ...
    def show_heatmap(self, result: RunResult, kind: str, opacity: float) -> None: ...
    def set_heatmap_scale(self, result: RunResult, scale: str) -> None: ...
    def set_overlay_opacity(self, opacity: float) -> None: ...
    def jump_to_table_row(self, result: RunResult, row: int): ...
    def export_table(self, result: RunResult, path: str) -> None: ...
    def export_all(self, result: RunResult, folder: str, overwrite: bool = False) -> dict: ...
    def start_compare(self, result: RunResult, prior, rules: ChangeRules | None = None, affine: bool = False) -> None: ...
    def jump_to_comparison_row(self, compared: CompareResult, row: int): ...


def _check_heatmap_scale(scale) -> None:
    if scale not in HEATMAP_SCALES:
        raise UsageError(f"unknown heatmap scale {scale!r}", f"use one of {', '.join(HEATMAP_SCALES)}")


def _lesion_scaling(result: RunResult, kind: str) -> LesionScaling | None:
    """How ``kind``'s node shows the map now: None as stored, else the Grad-CAM at 'lesion' scale
    rescaled around the current lesions (:func:`~UNetSegmentLib.analysis.heatmap_scale.lesion_scaling`;
    computed once per label map, so toggling the scale back and forth does not repeat it)."""
    if kind not in PER_LESION_KINDS or result.heatmap_scale != "lesion" or result.labels is None:
        return None
    cached = result.scaled_heatmaps.get(kind)
    if cached is None or cached[0] is not result.labels:
        connectivity = result.lesions.connectivity if result.lesions is not None else 26
        cached = (result.labels, lesion_scaling(run_maps(result.run)[kind], result.labels, connectivity=connectivity,
                                                lesion_values=lesion_label_values(result.bundle.labels)))
        result.scaled_heatmaps[kind] = cached
    return cached[1]


def _update_map_node(node, result: RunResult, kind: str, name: str):
    """Create (``node`` None) or update ``kind``'s heatmap node with the map as shown now; a per-lesion
    scaling is applied to the node's own copy of the map, not to a second volume-sized array."""
    scaling = _lesion_scaling(result, kind)
    node = scene.update_heatmap(node, run_maps(result.run)[kind], kind, name)
    if scaling is not None:
        scene.edit_voxels(node, scaling.apply_in_place)
    return node


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "input"


class SegmentationLogic:
    """Runs segmentations in a worker process; see the module docstring."""

    def __init__(self, process_factory: Callable[[Callable, Callable], ProcessProtocol] | None = None,
                 dependency_check: Callable[[], bool] | None = None,
                 server_process_factory: Callable[[Callable, Callable, ServerClient], ProcessProtocol] | None = None):
        self.progress = Signal("dict")  # worker progress events
        self.log = Signal("str", "str")  # level, message
        self.finished = Signal("RunResult")
        self.failed = Signal("dict")  # worker error event fields
        self.cancelled = Signal()
        self.compared = Signal("CompareResult")  # a finished "compare with prior" (failures: ``failed``)
        #: the local worker process, kept warm between runs (see :class:`.process.WarmWorker`)
        self.worker = WarmWorker()
        self.process_factory = process_factory or (lambda on_event, on_finished: WarmRun(self.worker, on_event, on_finished))
        #: used for requests with a ``server_url``: (on_event, on_finished, ServerClient) -> process
        self.server_process_factory = server_process_factory or ServerProcess
        self._dependency_check = dependency_check
        self._bundles: dict[str, Bundle] = {}
        self._pending: PendingRun | None = None
        self._compare_pending: PendingCompare | None = None
        self._process: ProcessProtocol | None = None
        self._done_event: dict | None = None
        self._error_event: dict | None = None
        self._cancel_requested = False
        self.last_result: RunResult | None = None

    # --- models -----------------------------------------------------------------------------
    def available_models(self) -> dict:
        return available_models()

    def load_model(self, name_or_path: str) -> Bundle:
        key = str(name_or_path)
        if key not in self._bundles:
            self._bundles[key] = load_bundle(key)
        return self._bundles[key]

    def import_model(self, path: str) -> Bundle:
        b = import_model(path, overwrite=True)
        self._bundles.pop(b.name, None)
        return b

    def ensure_dependencies(self) -> bool:
        if self._dependency_check is not None:
            return self._dependency_check()
        from .install import ensure_dependencies

        return ensure_dependencies()

    # --- running ----------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self._process is not None and self._process.is_running()

    def close(self) -> None:
        """Module cleanup and reload: stop a run and end the warm worker process."""
        self.cancel()
        self.worker.shutdown()

    def start(self, request: RunRequest) -> None:
        """Write the inputs to a temporary folder and start the worker (returns at once)."""
        import slicer

        if self.is_running():
            raise RuntimeError("a segmentation is already running")
        _check_heatmap_scale(request.heatmap_scale)
        bundle = self.load_model(request.model)
        channels = bundle.channel_names
        nodes = list(request.input_nodes)
        if len(nodes) != len(channels) or any(n is None for n in nodes):
            given = sum(n is not None for n in nodes)
            raise InputError(f"model {bundle.name} expects {len(channels)} input volume(s) ({', '.join(channels)}), "
                             f"got {given}", "pick one volume per channel")
        # a bad URL or unreadable token file is an error before anything is written (nothing is sent yet;
        # whether the server answers is found out by the process's background thread)
        client = (ServerClient(request.server_url, token_file=request.server_token_file or None, timeout=SERVER_TIMEOUT_S)
                  if request.server_url else None)
        scene.check_output_segmentation(request.output_segmentation)  # before anything is written
        images = [image_from_volume(n) for n in nodes]
        box = None
        if request.roi_node is not None:  # the ROI's corners in the input's local frame (both may be transformed)
            box = box_from_ras_corners(images[0], roi_corners_in_frame(request.roi_node, nodes[0]))
        work = Path(slicer.util.tempDirectory("UNetSegment-"))
        paths = []
        for i, (img, ch) in enumerate(zip(images, channels)):
            p = work / f"input{i}-{_safe_name(ch)}.nrrd"
            write_raw_nrrd(crop(img, box) if (box is not None and i == 0) else img, p)
            paths.append(str(p))
        out, stop = work / "out", work / "stop"
        req = {"inputs": paths, "output_dir": str(out), "model": str(bundle.root), "params": request.params.as_dict(),
               "overwrite": False, "stop_file": str(stop),
               "report": False}  # the views show the result; export_all renders the report when asked
        (work / "request.json").write_text(json.dumps(req, indent=2), encoding="utf-8")
        self._pending = PendingRun(request, bundle, images, paths, box, work)
        self._done_event = self._error_event = None
        self._cancel_requested = False
        self.log("info", f"starting {bundle.name} on {', '.join(n.GetName() for n in nodes)}"
                 + (f" within ROI {request.roi_node.GetName()}" if request.roi_node is not None else "")
                 + (f" on the server {client.url}" if client is not None else ""))
        if client is None:
            self._process = self.process_factory(self._on_event, self._on_finished)
        else:
            self._process = self.server_process_factory(self._on_event, self._on_finished, client)
        self._process.start(str(work / "request.json"), str(stop))

    def cancel(self) -> None:
        """Ask the worker to stop; ``cancelled`` is emitted once it has exited (within ~1 s)."""
        if self.is_running():
            self._cancel_requested = True
            self.log("info", "cancelling…")
            self._process.stop()

    def _on_event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "progress":
            self.progress(ev)
        elif kind == "log":
            self.log(ev.get("level", "info"), ev.get("message", ""))
        elif kind == "started" and ev.get("pid") is None:  # a server run
            self.log("info", f"connected to the {ev.get('python', 'server')} (model version {ev.get('version', '?')})")
        elif kind == "started":
            self.log("info", f"worker started (pid {ev.get('pid')}, Python {ev.get('python', '?')})")
        elif kind == "done":
            self._done_event = ev
        elif kind == "error":
            self._error_event = ev

    def start_compare(self, result: RunResult, prior, rules: ChangeRules | None = None, affine: bool = False) -> None:
        """Compare ``result`` (the current scan as segmented) with ``prior`` — the prior scan's volume node
        (segmented with the same model and parameters) or an earlier ``segment`` output folder (path) — in
        a local worker (returns at once); the prior is registered to the current scan and ``compared``
        delivers the :class:`.followup.CompareResult`."""
        import slicer

        if self.is_running():
            raise RuntimeError("a segmentation or comparison is already running")
        if prior is None or prior == "":
            raise InputError("no prior scan selected", "pick the earlier scan of this patient as the prior")
        if prior in result.request.input_nodes:
            raise InputError(f"the prior scan {prior.GetName()} is the current scan itself",
                             "pick the earlier scan of this patient as the prior")
        work = Path(slicer.util.tempDirectory("UNetSegment-compare-"))
        if isinstance(prior, (str, Path)):
            if not (Path(prior) / "summary.json").is_file():
                raise InputError(f"{prior} is not a UNetSegment output folder (no summary.json)",
                                 "pick the folder an earlier Segment's Export all… or `unetsegment segment` wrote")
            prior_path, prior_name = Path(prior), Path(prior).name
        else:
            prior_path, prior_name = work / f"prior-{_safe_name(prior.GetName())}.nrrd", prior.GetName()
            write_raw_nrrd(image_from_volume(prior), prior_path)
        out, stop = work / "out", work / "stop"
        req = {"kind": "compare", "prior": str(prior_path), "inputs": [str(result.work_dir / "out")],
               "output_dir": str(out), "model": str(result.bundle.root), "params": result.request.params.as_dict(),
               "rules": dataclasses.asdict(rules or ChangeRules()), "affine": bool(affine), "overwrite": False,
               "stop_file": str(stop)}
        (work / "request.json").write_text(json.dumps(req, indent=2), encoding="utf-8")
        self._compare_pending = PendingCompare(result, prior_name, work)
        self._done_event = self._error_event = None
        self._cancel_requested = False
        self.log("info", f"comparing {result.reference_volume.GetName()} with the prior {prior_name}")
        self._process = self.process_factory(self._on_event, self._on_finished)  # always local: it registers scans
        self._process.start(str(work / "request.json"), str(stop))

    def _finish_compare(self, code: int) -> None:
        pending, self._compare_pending = self._compare_pending, None
        self._process = None
        if self._cancel_requested or (self._error_event or {}).get("kind") == "CancelledError" or self._done_event is None:
            shutil.rmtree(pending.work, ignore_errors=True)
            if self._cancel_requested or (self._error_event or {}).get("kind") == "CancelledError":
                self.log("info", "comparison cancelled; the scene was not changed")
                self.cancelled()
                return
            ev = self._error_event or {"kind": "InternalError", "exit_code": code,
                                       "message": f"the worker exited with status {code} without a result"}
            self.log("error", ev.get("message", ""))
            self.failed(ev)
            return
        created: list = []
        try:
            compared = show_comparison(Path(self._done_event["output_dir"]), pending.result.reference_volume,
                                       pending.prior_name, pending.work, created)
        except Exception as e:  # noqa: BLE001 - shown to the user as one error
            import slicer

            for node in created:
                slicer.mrmlScene.RemoveNode(node)
            ev = error_event(e, pending.result.request.params.device)
            self.log("error", ev["message"])
            self.failed(ev)
            return
        self.log("info", f"comparison done: {compared.summary_text()}")
        self.compared(compared)

    def jump_to_comparison_row(self, compared: CompareResult, row: int):
        """Centre the views on a comparison row's lesion (the registered prior is shown over the current scan)."""
        p = compared.point_of_row(row)
        return None if p is None else scene.jump_to(p, compared.reference_volume)

    def _on_finished(self, code: int) -> None:
        if self._compare_pending is not None:
            self._finish_compare(code)
            return
        pending, self._pending = self._pending, None
        self._process = None
        if self._cancel_requested or (self._error_event or {}).get("kind") == "CancelledError":
            shutil.rmtree(pending.work, ignore_errors=True)
            self.log("info", "cancelled; the scene was not changed")
            self.cancelled()
            return
        if self._done_event is None:
            shutil.rmtree(pending.work, ignore_errors=True)
            ev = self._error_event or {"kind": "InternalError", "exit_code": code,
                                       "message": f"the worker exited with status {code} without a result"}
            self.log("error", ev.get("message", ""))
            self.failed(ev)
            return
        try:
            result = self._load(pending, Path(self._done_event["output_dir"]))
        except Exception as e:  # noqa: BLE001 - shown to the user as one error
            ev = error_event(e, pending.request.params.device)
            self.log("error", ev["message"])
            self.failed(ev)
            return
        self.last_result = result
        t = result.summary.get("timings_s", {}).get("total_s")
        self.log("info", f"done: {result.lesions.n_lesions} lesion(s), {result.lesions.total_volume_ml:.2f} mL"
                 + (f" in {t:.1f} s" if t else ""))
        self.finished(result)

    # --- loading into the scene ---------------------------------------------------------------
    def _load(self, pending: PendingRun, out_dir: Path) -> RunResult:
        run = load_run(out_dir)
        full, box = pending.images[0], pending.box
        if box is not None:  # put the ROI run back on the input's grid
            run = dataclasses.replace(
                run, labels=uncrop(run.labels, full, box), probability=uncrop(run.probability, full, box),
                heatmaps={k: uncrop(v, full, box) for k, v in run.heatmaps.items()},
                class_probabilities={v: uncrop(m, full, box) for v, m in run.class_probabilities.items()})
        result = RunResult(pending.request, pending.bundle, run, pending.images, pending.paths, pending.work, box,
                           threshold=run.threshold, summary=run.summary, heatmap_scale=pending.request.heatmap_scale)
        if box is not None:  # the worker's table indexes the crop: measure again on the full grid
            derived = rederive_run(run, pending.bundle, run.threshold, intensity=result.intensity_image)
            labels, lesions = derived.labels, derived.table
        else:
            labels, lesions = run.labels, table_from_summary(run.summary)
        created = []
        try:
            self._show(result, labels, lesions, created)
        except Exception:
            import slicer

            for node in created:
                slicer.mrmlScene.RemoveNode(node)
            raise
        return result

    def _show(self, result: RunResult, labels: Image, lesions: LesionTable, created: list) -> None:
        ref = result.reference_volume
        base = f"{ref.GetName()} {result.bundle.name}" + (" UNUSUAL INPUT" if result.summary.get("unusual_input") else "")
        seg = result.request.output_segmentation
        is_new = seg is None
        seg = scene.update_segmentation(seg, labels, result.bundle.labels, ref, f"{base} segmentation")
        if is_new:
            created.append(seg)
        result.labels, result.lesions = labels, lesions
        for kind in run_maps(result.run):
            role = scene.REF_ROLE.format(kind)
            old = None if is_new else seg.GetNodeReference(role)
            label = class_map_label(kind, result.bundle.labels)
            title = kind if label is None else f"P({label})"
            node = _update_map_node(old, result, kind, f"{base} {title}")
            if old is None:
                created.append(node)
            seg.SetNodeReferenceID(role, node.GetID())
            result.heatmaps[kind] = node
        old_table = None if is_new else seg.GetNodeReference(scene.REF_ROLE.format("table"))
        table = scene.update_table(old_table, lesions, f"{base} lesions")
        if old_table is None:
            created.append(table)
        seg.SetNodeReferenceID(scene.REF_ROLE.format("table"), table.GetID())
        for node in [seg, table, *result.heatmaps.values()]:
            scene.place_in_study(node, ref)
        for node in result.heatmaps.values():  # the segmentation got its frame in update_segmentation
            scene.follow_input_transform(node, ref)
        result.segmentation, result.table = seg, table
        scene.show_overlay(ref, result.heatmaps["probability"], 0.5)
        scene.show_table(table)

    # --- after a run ----------------------------------------------------------------------------
    def set_threshold(self, result: RunResult, threshold: float, surfaces: bool = True) -> None:
        """Re-derive segmentation and table from the probability map at ``threshold`` (no new run).

        Segments are updated in place (their display settings stay); ``surfaces=False`` skips the 3D
        surfaces (slider still moving), which the next call with ``surfaces=True`` rebuilds.
        """
        derived = rederive_run(result.run, result.bundle, float(threshold), intensity=result.intensity_image)
        scene.update_segmentation(result.segmentation, derived.labels, result.bundle.labels, result.reference_volume,
                                  result.segmentation.GetName(), surfaces=surfaces)
        scene.update_table(result.table, derived.table, result.table.GetName())
        result.lesions, result.threshold, result.labels = derived.table, float(threshold), derived.labels
        if surfaces and result.heatmap_scale == "lesion":  # the lesions changed: so did their neighbourhoods
            self._update_scaled_heatmaps(result)

    def show_heatmap(self, result: RunResult, kind: str, opacity: float) -> None:
        scene.show_overlay(result.reference_volume, result.heatmaps.get(kind), opacity)

    def set_heatmap_scale(self, result: RunResult, scale: str) -> None:
        """Show the Grad-CAM scaled per lesion (``'lesion'``) or as stored (``'volume'``).

        The run's own map (``result.run.heatmaps``) is never changed, so switching back restores it."""
        _check_heatmap_scale(scale)
        if scale != result.heatmap_scale:
            result.heatmap_scale = scale
            self._update_scaled_heatmaps(result)

    def _update_scaled_heatmaps(self, result: RunResult) -> None:
        import slicer

        for kind in PER_LESION_KINDS:
            node = result.heatmaps.get(kind)
            if node is not None and slicer.mrmlScene.IsNodePresent(node):  # the user may have deleted it
                _update_map_node(node, result, kind, node.GetName())

    def set_overlay_opacity(self, opacity: float) -> None:
        scene.set_overlay_opacity(opacity)

    def jump_to_lesion(self, result: RunResult, lesion_id: int):
        p = scene.lesion_point(result.lesions, lesion_id)
        return None if p is None else scene.jump_to(p, result.reference_volume)  # points are in the input's frame

    def jump_to_table_row(self, result: RunResult, row: int):
        lesion_id = scene.lesion_id_of_row(result.table, row)
        return None if lesion_id is None else self.jump_to_lesion(result, lesion_id)

    def export_table(self, result: RunResult, path: str) -> None:
        """The shown table as CSV (``.csv``) or TSV (``.tsv``/``.txt``), with the total row, as the CLI writes it."""
        if str(path).lower().endswith((".tsv", ".txt")):
            result.lesions.write_tsv(path)
        else:
            result.lesions.write_csv(path)

    def export_all(self, result: RunResult, folder: str, overwrite: bool = False) -> dict:
        """The CLI's file set for what is shown (current threshold) into ``folder``."""
        return export_run(result.run, folder, bundle=result.bundle, threshold=result.threshold, inputs=result.inputs,
                          input_paths=result.input_paths, overwrite=overwrite, rewrite=result.roi_box is not None)

    def discard(self, result: RunResult) -> None:
        """Forget a result's temporary folder (its nodes stay in the scene)."""
        shutil.rmtree(result.work_dir, ignore_errors=True)
