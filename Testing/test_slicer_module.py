"""The Slicer module (logic, panel, self-test) end to end on Slicer's own MRML code.

The scene, nodes, module logics, ``slicer.util`` and the views are Slicer's (``slicer-core``,
``trame-slicer``); only the Qt half is imitated (Testing/slicer_standin, listed in Testing/README.md).
The worker really runs (this Python, tiny-blob, CPU); the tests compare the scene with the core's
own outputs, and check positions in world coordinates (sampling the segmentation, rendering views).
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_standin  # noqa: E402

STANDIN = slicer_standin.install()

import slicer  # noqa: E402  (Slicer's own, from slicer-core)
import vtk  # noqa: E402

from UNetSegmentLib.image import Image  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.analysis.lesions import COLUMNS  # noqa: E402
from UNetSegmentLib.io.outputs import CONTRACT_FILES  # noqa: E402
from UNetSegmentLib.params import FIELD, HELP, SegmentParams  # noqa: E402
from UNetSegmentLib.settings import resolve  # noqa: E402
from UNetSegmentLib.phantom import head_with_blob  # noqa: E402
from UNetSegmentLib.analysis.rethreshold import load_run, rederive_run  # noqa: E402
from UNetSegmentLib.models.bundle import load_bundle  # noqa: E402
from UNetSegmentLib.slicer import scene as sc  # noqa: E402
from UNetSegmentLib.slicer.logic import RunRequest, SegmentationLogic  # noqa: E402
from UNetSegmentLib.slicer import process as worker_process  # noqa: E402
from UNetSegmentLib.slicer.process import WarmWorker  # noqa: E402
from UNetSegmentLib.slicer.widget import PARAMETER_WIDGETS, Panel, guess_channel_volumes  # noqa: E402
from UNetSegmentLib.serving.worker import STAGES  # noqa: E402
from UNetSegmentLib.resources import resource_path  # noqa: E402

CPU = SegmentParams(device="cpu", heatmaps=("gradcam",))
OBLIQUE = np.array([[-1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])


@pytest.fixture(autouse=True, scope="module")
def standin_modules():
    """The Qt imitation (qt/ctk/ScriptedLoadableModule) exists only while this file's tests run."""
    slicer_standin.install()
    yield
    slicer_standin.uninstall()


@pytest.fixture(autouse=True)
def fresh_scene(request):
    """A closed scene per test, except for the tests sharing the module's one real run."""
    if "oblique_run" not in request.fixturenames:
        STANDIN.reset()
    yield STANDIN
    WarmWorker.shutdown_all()  # each logic's warm worker (≈ 0.4 GB) ends with its test


# --- reading the real scene -------------------------------------------------------------------------
def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def node_ids() -> list[str]:
    scene = slicer.mrmlScene
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def column(table, name) -> list:
    """A table node's column as Python values (int/float columns as numbers, string columns as text)."""
    arr = table.GetTable().GetColumnByName(name)
    assert arr is not None, f"no column {name}"
    if isinstance(arr, vtk.vtkStringArray):
        return [arr.GetValue(i) for i in range(arr.GetNumberOfValues())]
    return [arr.GetValue(i) for i in range(arr.GetNumberOfTuples())]


def tag(segment, name="TerminologyEntry") -> str:
    value = vtk.reference("")
    segment.GetTag(name, value)
    return str(value)


def has_surface(seg) -> bool:
    return bool(seg.GetSegmentation().ContainsRepresentation(sc.CLOSED_SURFACE))


def add_head(name="CT head", **kw):
    image, blob = head_with_blob(**kw)
    node = slicer.util.addVolumeFromArray(image.array, image.ijk_to_ras, name)
    return node, image, blob


def add_transform(rotation_deg=20.0, translation=(15.0, -7.0, 4.0), name="moved"):
    """A linear transform node: rotation about S, then a translation (RAS mm)."""
    a = np.deg2rad(rotation_deg)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = translation
    t = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    t.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(m))
    return t, m


def world_mask(seg, segment_id, probe_ijk_to_ras, shape) -> np.ndarray:
    """The segment sampled on an untransformed probe grid given in world RAS (Slicer resamples through
    the segmentation's parent transforms, as the views do)."""
    probe = slicer.util.addVolumeFromArray(np.zeros(shape, np.uint8), probe_ijk_to_ras, "world probe")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "world probe labels")
        assert slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(seg, ids, label, probe)
        out = np.array(slicer.util.arrayFromVolume(label), copy=True) > 0
        slicer.mrmlScene.RemoveNode(label)
        return out
    finally:
        slicer.mrmlScene.RemoveNode(probe)


def blob_in_world(image: Image, blob: np.ndarray, to_world: np.ndarray):
    """The blob's voxel centres in world RAS, and the input's grid as seen in world (ijk→world)."""
    grid = to_world @ image.ijk_to_ras
    return image.ijk_to_ras_points(np.argwhere(blob)[:, ::-1]) @ to_world[:3, :3].T + to_world[:3, 3], grid


def reference_geometry(seg) -> np.ndarray:
    """The segmentation's "Reference image geometry" parameter as a 4×4 IJK→RAS (its own frame)."""
    conv = slicer.vtkSegmentationConverter
    geometry = slicer.vtkOrientedImageData()
    assert conv.DeserializeImageGeometry(
        seg.GetSegmentation().GetConversionParameter(conv.GetReferenceImageGeometryParameterName()), geometry)
    m = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def run_logic(logic, request, timeout=120):
    out = {}
    logic.finished.connect(lambda r: out.setdefault("result", r))
    logic.failed.connect(lambda ev: out.setdefault("error", ev))
    logic.cancelled.connect(lambda: out.setdefault("cancelled", True))
    logic.start(request)
    assert STANDIN.run_until(lambda: bool(out), timeout), "the run did not end"
    return out


def slice_planes_contain(point, tol=1e-3) -> bool:
    """Every slice view's plane passes through ``point`` (world RAS)."""
    for node in STANDIN.slice_nodes():
        ras_to_slice = vtk.vtkMatrix4x4()
        ras_to_slice.DeepCopy(node.GetSliceToRAS())
        ras_to_slice.Invert()
        if abs(ras_to_slice.MultiplyPoint((*point, 1.0))[2]) > tol:
            return False
    return True


def camera_focal_point():
    view_node = STANDIN.views["3d"].get_view_node()
    return slicer.modules.cameras.logic().GetViewActiveCameraNode(view_node).GetFocalPoint()


@pytest.fixture(scope="module")
def oblique_run():
    """One real run on an oblique, flipped head with a study item; shared by the read-only tests."""
    STANDIN.reset()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    node, image, blob = add_head(direction=OBLIQUE, origin=(40.0, -30.0, 12.5))
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1"), "Study 1")
    sh.SetItemParent(sh.GetItemByDataNode(node), study)
    before = np.array(slicer.util.arrayFromVolume(node), copy=True)
    writes = []
    node.AddObserver(slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, lambda *a: writes.append(1))
    logic = SegmentationLogic(dependency_check=lambda: True)
    out = run_logic(logic, RunRequest([node], "tiny-blob", CPU))
    assert "result" in out, out
    return dict(logic=logic, result=out["result"], node=node, image=image, blob=blob, before=before, study=study, sh=sh,
                writes=writes)


def test_run_builds_segmentation_equal_to_core_labels_with_reference_geometry(oblique_run):
    r, node = oblique_run["result"], oblique_run["node"]
    seg = r.segmentation
    core_labels = read_image(r.run.folder / "segmentation.nii.gz")
    assert seg.IsA("vtkMRMLSegmentationNode") and has_surface(seg)  # shown in 3D
    ref = seg.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert ref is node  # reference geometry = the input
    assert np.allclose(core_labels.ijk_to_ras, ijk_to_ras(node), atol=1e-4)  # the core saw the same (oblique) grid
    lab = r.bundle.labels[0]
    sid = sc.segment_id(lab["value"])
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, node)
    assert np.array_equal(mask, (core_labels.array == lab["value"]).astype(np.uint8))  # voxel for voxel
    blob = oblique_run["blob"]
    assert 2 * (mask.astype(bool) & blob).sum() / (mask.sum() + blob.sum()) > 0.8
    segment = seg.GetSegmentation().GetSegment(sid)
    assert segment.GetName() == lab["name"] and np.allclose(segment.GetColor(), lab["color"])
    assert tag(segment) == lab["terminology"]


def test_run_never_modifies_the_input(oblique_run):
    node = oblique_run["node"]
    assert np.array_equal(slicer.util.arrayFromVolume(node), oblique_run["before"])
    assert oblique_run["writes"] == []  # no voxel was written after the test's own addVolumeFromArray
    assert np.allclose(ijk_to_ras(node), oblique_run["image"].ijk_to_ras)


def test_outputs_are_placed_under_the_input_study(oblique_run):
    r, sh = oblique_run["result"], oblique_run["sh"]
    for n in [r.segmentation, r.table, *r.heatmaps.values()]:
        assert sh.GetItemParent(sh.GetItemByDataNode(n)) == oblique_run["study"], n.GetName()


def test_heatmaps_are_volumes_with_heat_colours_in_the_foreground(oblique_run):
    r, node = oblique_run["result"], oblique_run["node"]
    assert set(r.heatmaps) == {"probability", "gradcam"}
    prob = r.heatmaps["probability"]
    core_prob = read_image(r.run.folder / "probability.nrrd")
    assert np.array_equal(slicer.util.arrayFromVolume(prob), core_prob.array)
    assert np.allclose(ijk_to_ras(prob), ijk_to_ras(node))
    d = prob.GetDisplayNode()
    assert d.GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"
    assert not d.GetAutoWindowLevel() and (d.GetWindowLevelMin(), d.GetWindowLevelMax()) == (0.0, 1.0)
    assert d.GetApplyThreshold() == 1 and d.GetLowerThreshold() == sc.HEATMAP_DISPLAY_FLOOR
    assert r.heatmaps["gradcam"].GetDisplayNode().GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    # the layers were set at the end of the run; the display tests below may change them again
    assert np.array_equal(slicer.util.arrayFromVolume(r.heatmaps["gradcam"]), read_image(r.run.folder / "gradcam.nrrd").array)


def test_overlay_layers_opacity_and_heatmap_switch(oblique_run):
    r, logic, node = oblique_run["result"], oblique_run["logic"], oblique_run["node"]
    logic.show_heatmap(r, "gradcam", 0.7)
    assert STANDIN.foreground_ids() == {r.heatmaps["gradcam"].GetID()} and STANDIN.background_ids() == {node.GetID()}
    logic.set_overlay_opacity(0.25)
    assert STANDIN.foreground_opacities() == {0.25}


def test_table_node_holds_the_core_lesion_table_and_is_shown(oblique_run):
    r = oblique_run["result"]
    t = r.table
    with open(r.run.folder / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:-1]  # the core's CSV without its total row
    assert [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())] == list(COLUMNS)
    assert t.GetNumberOfRows() == len(rows) == 1
    assert column(t, "lesion") == [1] and column(t, "label") == [rows[0]["label"]]
    for c in ("volume_ml", "centroid_r", "centroid_a", "centroid_s", "inside_r", "max_inplane_diameter_mm",
              "abc2_ml", "abc2_a_mm", "abc2_b_mm", "abc2_c_mm"):
        assert column(t, c)[0] == pytest.approx(float(rows[0][c]), abs=1e-5), c
    assert t.GetColumnUnitLabel("volume_ml") == "mL" and t.GetColumnUnitLabel("volume_mm3") == "mm3"
    assert t.GetColumnUnitLabel("max_inplane_diameter_mm") == "mm"
    assert t.GetUseColumnTitleAsColumnHeader()
    assert slicer.app.applicationLogic().GetSelectionNode().GetActiveTableID() == t.GetID()
    assert STANDIN.layout_manager.tableWidget(0).tableView().mrmlTableNode() is t  # propagated to the table view


def test_clicking_a_row_jumps_slices_and_3d_to_the_inside_point_in_ras(oblique_run):
    r, logic = oblique_run["result"], oblique_run["logic"]
    summary = json.loads((r.run.folder / "summary.json").read_text())
    lesion = summary["lesions"][0]
    view = STANDIN.layout_manager.tableWidget(0).tableView()
    view.setMRMLTableNode(r.table)
    view.connect("selectionChanged()", lambda: logic.jump_to_table_row(r, view.selectionModel().selectedIndexes()[0].row()))
    view.click_row(0)
    expected = (lesion["inside_r"], lesion["inside_a"], lesion["inside_s"])
    assert slice_planes_contain(expected)
    for node in STANDIN.slice_nodes():  # centred jump: the point is each view's centre
        m = node.GetSliceToRAS()
        assert [m.GetElement(r, 3) for r in range(3)] == pytest.approx(expected, abs=1e-3)
    assert camera_focal_point() == pytest.approx(expected, abs=1e-6)
    # the inside point is a lesion voxel of the segmentation
    ijk = np.rint(np.linalg.inv(ijk_to_ras(oblique_run["node"])) @ np.array([*expected, 1.0]))[:3].astype(int)
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(r.segmentation, sc.segment_id(1), oblique_run["node"])
    assert mask[ijk[2], ijk[1], ijk[0]] == 1


def test_jump_goes_through_the_input_parent_transform(oblique_run):
    """Lesion points are in the input's frame: the jump follows the input's transform, not the output's."""
    r, logic, node = oblique_run["result"], oblique_run["logic"], oblique_run["node"]
    tnode, _ = add_transform(0.0, (10.0, -5.0, 2.5), "shift")
    other, _ = add_transform(30.0, (-40.0, 8.0, 0.0), "a frame of the user's output node")
    node.SetAndObserveTransformNodeID(tnode.GetID())
    r.segmentation.SetAndObserveTransformNodeID(other.GetID())
    try:
        point = logic.jump_to_lesion(r, 1)
    finally:
        node.SetAndObserveTransformNodeID(None)
        r.segmentation.SetAndObserveTransformNodeID(None)
    row = r.lesions.rows[0]
    assert point == pytest.approx((row["inside_r"] + 10.0, row["inside_a"] - 5.0, row["inside_s"] + 2.5))
    assert slice_planes_contain(point)


def test_live_threshold_rederives_segmentation_and_table_without_a_new_run(oblique_run, tmp_path):
    r, logic, node = oblique_run["result"], oblique_run["logic"], oblique_run["node"]
    folder_files = sorted(p.name for p in r.run.folder.iterdir())
    for t in (0.9, 0.2, r.run.threshold):
        logic.set_threshold(r, t)
        expected = rederive_run(load_run(r.run.folder), r.bundle, t, intensity=oblique_run["image"])
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(r.segmentation, sc.segment_id(1), node)
        assert np.array_equal(mask, (expected.labels.array > 0).astype(np.uint8)), t
        assert column(r.table, "voxels") == [row["voxels"] for row in expected.table.rows]
    assert sorted(p.name for p in r.run.folder.iterdir()) == folder_files  # no new run, no new files
    # back at the run's threshold the segmentation is the run's own
    core = read_image(r.run.folder / "segmentation.nii.gz")
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(r.segmentation, sc.segment_id(1), node),
                          (core.array > 0).astype(np.uint8))


def test_export_table_and_export_all_write_the_cli_files(oblique_run, tmp_path):
    r, logic = oblique_run["result"], oblique_run["logic"]
    logic.export_table(r, str(tmp_path / "t.csv"))
    logic.export_table(r, str(tmp_path / "t.tsv"))
    assert (tmp_path / "t.csv").read_text() == (r.run.folder / "lesions.csv").read_text()
    assert (tmp_path / "t.tsv").read_text() == (r.run.folder / "lesions.tsv").read_text()
    # the worker leaves the report out (the views show the result: a faster click); export renders it
    assert not (r.run.folder / "report.png").exists()
    assert json.loads((r.run.folder / "summary.json").read_text())["report"]["file"] is None
    logic.export_all(r, str(tmp_path / "all"))
    written = {p.name for p in (tmp_path / "all").iterdir()}
    assert written == {p.name for p in r.run.folder.iterdir()} | {"report.png"} and written <= set(CONTRACT_FILES)
    assert (tmp_path / "all" / "lesions.csv").read_text() == (r.run.folder / "lesions.csv").read_text()
    assert np.array_equal(read_image(tmp_path / "all" / "segmentation.nii.gz").array,
                          read_image(r.run.folder / "segmentation.nii.gz").array)
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["report"] == {"file": "report.png"} and "report.png" in summary["files_sha256"]
    run_summary = json.loads((r.run.folder / "summary.json").read_text())  # the run's own, not a new one
    assert {k: v for k, v in summary.items() if k not in ("report", "files_sha256")} == \
        {k: v for k, v in run_summary.items() if k not in ("report", "files_sha256")}
    for f, digest in run_summary["files_sha256"].items():  # the copied files are the run's, byte for byte
        assert summary["files_sha256"][f] == digest, f
    with pytest.raises(Exception, match="already holds outputs"):
        logic.export_all(r, str(tmp_path / "all"))


def test_cancel_stops_within_a_second_and_leaves_the_scene_as_it_was(tmp_path):
    node, _, _ = add_head(shape_kji=(48, 200, 200), spacing=(0.6, 0.6, 2.0))
    before = node_ids()
    logic = SegmentationLogic(dependency_check=lambda: True)
    state = {}
    logic.progress.connect(lambda ev: state.update(inference=True) if ev["stage"] == "inference" and ev["fraction"] > 0 else None)
    logic.cancelled.connect(lambda: state.setdefault("cancelled", time.monotonic()))
    logic.start(RunRequest([node], "tiny-blob", SegmentParams(device="cpu", heatmaps=())))
    work = logic._pending.work
    assert STANDIN.run_until(lambda: state.get("inference"), 120)
    t0 = time.monotonic()
    logic.cancel()
    assert STANDIN.run_until(lambda: "cancelled" in state, 5)
    # the worker stopped itself: its own CancelledError event (a kill by the client's fallback leaves
    # none). test_worker.py times the worker's exit (< 1 s); here the bound only guards against hangs,
    # since the shared CI machine's load adds to the client's 100 ms polling.
    assert logic._error_event["kind"] == "CancelledError"
    assert any(r in logic._error_event["message"] for r in ("cancel on stdin", "stop file"))
    assert state["cancelled"] - t0 < 3.0
    assert node_ids() == before and not logic.is_running()
    assert not Path(work).exists()


def run_and_wait(logic, request, timeout_s=300):
    out = {}
    done = logic.finished.connect(lambda r: out.setdefault("result", r))
    failed = logic.failed.connect(lambda ev: out.setdefault("error", ev))
    logic.start(request)
    assert STANDIN.run_until(lambda: bool(out), timeout_s)
    logic.finished.disconnect(done)
    logic.failed.disconnect(failed)
    return out


def test_the_second_run_goes_to_the_same_warm_worker_and_close_ends_it():
    node, _, _ = add_head()
    logic = SegmentationLogic(dependency_check=lambda: True)
    first = run_and_wait(logic, RunRequest([node], "tiny-blob", CPU))
    proc = logic.worker.proc
    second = run_and_wait(logic, RunRequest([node], "tiny-blob", CPU))
    assert "result" in first and "result" in second, (first, second)
    assert logic.worker.starts == 1 and logic.worker.proc is proc and proc.poll() is None  # one process, kept
    assert first["result"].segmentation is not second["result"].segmentation  # each run its own nodes
    logic.close()
    assert proc.wait(timeout=10) is not None and logic.worker.proc is None


def test_a_crashed_worker_is_a_clear_error_and_the_next_run_starts_a_fresh_one():
    node, _, _ = add_head(shape_kji=(48, 200, 200), spacing=(0.6, 0.6, 2.0))
    before = node_ids()
    logic = SegmentationLogic(dependency_check=lambda: True)
    state = {}
    logic.progress.connect(lambda ev: state.update(inference=True) if ev["stage"] == "inference" else None)
    logic.failed.connect(lambda ev: state.setdefault("error", ev))
    logic.start(RunRequest([node], "tiny-blob", SegmentParams(device="cpu", heatmaps=())))
    assert STANDIN.run_until(lambda: state.get("inference"), 120)
    logic.worker.proc.kill()  # as a crash would end it
    assert STANDIN.run_until(lambda: "error" in state, 10)
    err = state["error"]
    assert err["kind"] == "WorkerStopped" and "stopped unexpectedly" in err["message"] and "Segment again" in err["fix"]
    assert node_ids() == before and not logic.is_running()
    again = run_and_wait(logic, RunRequest([node], "tiny-blob", CPU))
    assert "result" in again and logic.worker.starts == 2
    logic.close()


def test_a_worker_that_left_when_idle_is_replaced_by_the_next_run(monkeypatch):
    node, _, _ = add_head()
    logic = SegmentationLogic(dependency_check=lambda: True)
    logic.worker.idle_timeout_s = 0.5
    monkeypatch.setattr(worker_process, "RETIRE_MARGIN_S", -1e9)  # the client never retires it first
    assert "result" in run_and_wait(logic, RunRequest([node], "tiny-blob", CPU))
    proc = logic.worker.proc
    proc.wait(timeout=60)  # it says "exit" after 0.5 s idle and ends
    again = run_and_wait(logic, RunRequest([node], "tiny-blob", CPU))
    assert "result" in again, again
    assert logic.worker.starts == 2 and logic.worker.proc is not proc
    logic.close()


def test_wrong_number_of_inputs_is_a_clear_error_before_any_run():
    node, _, _ = add_head()
    logic = SegmentationLogic(dependency_check=lambda: True)
    with pytest.raises(Exception, match=r"expects 1 input volume\(s\) \(CT\), got 2"):
        logic.start(RunRequest([node, node], "tiny-blob", CPU))
    assert not logic.is_running()


def test_roi_restricts_the_run_and_results_land_on_the_full_grid():
    node, image, blob = add_head()
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    ras = image.ijk_to_ras_points(np.argwhere(blob)[:, ::-1])
    lo, hi = ras.min(0) - 6, ras.max(0) + 6
    roi.SetXYZ(*((lo + hi) / 2))
    roi.SetRadiusXYZ(*((hi - lo) / 2))
    logic = SegmentationLogic(dependency_check=lambda: True)
    out = run_logic(logic, RunRequest([node], "tiny-blob", SegmentParams(device="cpu", heatmaps=()), roi_node=roi))
    r = out["result"]
    cropped = read_image(r.run.folder / "probability.nrrd")
    assert cropped.array.size < image.array.size / 4  # the worker only saw the box
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(r.segmentation, sc.segment_id(1), node).astype(bool)
    assert mask.shape == image.array.shape and 2 * (mask & blob).sum() / (mask.sum() + blob.sum()) > 0.8
    row = r.lesions.rows[0]
    centroid_ijk = np.argwhere(mask)[:, ::-1].mean(0)
    assert (row["centroid_i"], row["centroid_j"], row["centroid_k"]) == pytest.approx(tuple(centroid_ijk), abs=1e-6)
    assert slicer.util.arrayFromVolume(r.heatmaps["probability"]).shape == image.array.shape


def test_rerun_into_a_chosen_segmentation_updates_it_and_reuses_result_nodes():
    node, _, _ = add_head()
    logic = SegmentationLogic(dependency_check=lambda: True)
    first = run_logic(logic, RunRequest([node], "tiny-blob", SegmentParams(device="cpu", heatmaps=())))["result"]
    seg = first.segmentation
    user_sid = seg.GetSegmentation().AddEmptySegment("mine", "my segment", [0, 1, 0])
    n_nodes = len(node_ids())
    second = run_logic(logic, RunRequest([node], "tiny-blob", SegmentParams(device="cpu", threshold=0.9, heatmaps=()),
                                         output_segmentation=seg))["result"]
    assert second.segmentation is seg and second.table is first.table
    assert second.heatmaps["probability"] is first.heatmaps["probability"]
    assert len(node_ids()) == n_nodes  # nothing new
    assert seg.GetSegmentation().GetSegment(user_sid) is not None  # the user's own segment is kept
    core = read_image(second.run.folder / "segmentation.nii.gz")
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sc.segment_id(1), node), (core.array > 0).astype(np.uint8))


# --- the panel ------------------------------------------------------------------------------------
class ScriptedDialogs:
    def __init__(self, answers=()):
        self.answers = list(answers)
        self.errors = []
        self.confirms = []

    def error(self, text, details=""):
        self.errors.append(text)

    def confirm(self, text):
        self.confirms.append(text)
        return self.answers.pop(0) if self.answers else True

    def save_file(self, *a):
        return self.answers.pop(0)

    def directory(self, *a):
        return self.answers.pop(0)

    def model_source(self):
        return self.answers.pop(0)


def make_panel(logic=None, dialogs=None):
    root = slicer.util.loadUI(str(resource_path("UI", "UNetSegment.ui")))
    ui = slicer.util.childWidgetVariables(root)
    root.setMRMLScene(slicer.mrmlScene)
    logic = logic or SegmentationLogic(dependency_check=lambda: True)
    return Panel(ui, logic, dialogs or ScriptedDialogs()), ui, logic


def run_tiny_blob(panel, ui, gradcam: bool):
    """Segment with the tiny-blob model on the CPU through the panel's button; the panel's result."""
    panel.refresh_models(select="tiny-blob")
    ui.deviceComboBox.setCurrentIndex(1)  # cpu
    ui.gradcamCheckBox.checked = gradcam
    ui.segmentButton.click()
    assert STANDIN.run_until(lambda: panel.result is not None, 120)
    return panel.result


def test_panel_defaults_and_tooltips_come_from_the_core_and_the_model_card():
    add_head()
    panel, ui, _ = make_panel()
    d, b = SegmentParams(), load_bundle("tiny-blob")
    assert ui.modelComboBox.currentText in panel.model_keys and panel.bundle is not None
    panel.refresh_models(select="tiny-blob")
    s = resolve(d, b, hardware=False)  # what a CLI run without these flags uses
    assert ui.deviceComboBox.currentText == d.device and ui.precisionComboBox.currentText == d.precision
    assert ui.connectivityComboBox.currentText == str(d.connectivity)
    for name in ("precision", "connectivity"):
        combo = getattr(ui, PARAMETER_WIDGETS[name])
        assert [combo.itemText(i) for i in range(combo.count())] == [str(c) for c in FIELD[name].choices]
    assert (s.threshold, s.overlap, s.min_lesion_ml, s.tta) == (b.meta["threshold"], b.meta["inference"]["overlap"],
                                                                 b.meta["inference"]["min_lesion_ml"], b.meta["inference"]["tta"])
    assert ui.thresholdSlider.value == s.threshold and ui.overlapSlider.value == s.overlap
    assert ui.minLesionSpinBox.value == s.min_lesion_ml and ui.ttaCheckBox.checked is s.tta
    assert ui.gradcamCheckBox.checked == ("gradcam" in d.heatmaps) and ui.uncertaintyCheckBox.checked == ("uncertainty" in d.heatmaps)
    for name, widget in PARAMETER_WIDGETS.items():
        assert getattr(ui, widget).toolTip == HELP[name] == FIELD[name].help, name
    assert ui.gradcamCheckBox.toolTip == HELP["heatmaps"]
    p = panel.parameters()
    assert (p.device, p.precision, p.threshold, p.overlap, p.min_lesion_ml, p.connectivity, p.tta, p.heatmaps) == \
           (d.device, d.precision, s.threshold, s.overlap, s.min_lesion_ml, d.connectivity, s.tta, d.heatmaps)


def test_panel_shows_each_model_s_own_defaults_including_tta(tmp_path, monkeypatch):
    """The model card's threshold, overlap, minimum lesion size and TTA, as the CLI resolves them."""
    from conftest import write_bundle

    monkeypatch.setenv("UNETSEGMENT_MODELS", str(tmp_path / "models"))
    inference = {"overlap": 0.5, "batch_size": 2, "tta": True, "min_lesion_ml": 0.25}
    bundle = write_bundle(tmp_path / "b", extra_meta={"threshold": 0.3, "inference": inference})
    panel, ui, logic = make_panel(dialogs=ScriptedDialogs([str(bundle)]))
    ui.importModelButton.click()
    s = resolve(SegmentParams(), logic.load_model("test-model"), hardware=False)
    assert (s.threshold, s.overlap, s.min_lesion_ml, s.tta) == (0.3, 0.5, 0.25, True)
    assert (ui.thresholdSlider.value, ui.overlapSlider.value, ui.minLesionSpinBox.value, ui.ttaCheckBox.checked) == \
           (0.3, 0.5, 0.25, True)
    p = panel.parameters()
    assert (p.threshold, p.overlap, p.min_lesion_ml, p.tta) == (0.3, 0.5, 0.25, True)


def test_panel_builds_one_selector_per_channel_titled_from_the_card_and_auto_filled():
    node, _, _ = add_head("patient CT")
    slicer.util.addVolumeFromArray(np.zeros((4, 4, 4), np.uint8), None, "labels", "vtkMRMLLabelMapVolumeNode")
    panel, ui, _ = make_panel()
    panel.refresh_models(select="tiny-blob")
    form = ui.channelsWidget.layout()
    assert [r[0] for r in form.rows] == ["CT:"]
    assert panel.channel_selectors[0].currentNode() is node  # the labelmap is not offered
    assert panel.channel_selectors[0].showChildNodeTypes is False


def test_guess_channel_volumes_matches_names_then_newest():
    class V:
        def __init__(self, n):
            self.n = n

        def GetName(self):
            return self.n

    vols = [V("patient cbv"), V("Tmax map"), V("CBF"), V("other")]
    got = guess_channel_volumes(["CBF", "CBV", "MTT", "Tmax"], vols)
    assert [v.n for v in got] == ["CBF", "patient cbv", "other", "Tmax map"]


def test_deleting_result_nodes_forgets_the_result():
    node, _, _ = add_head()
    panel, ui, logic = make_panel()
    panel.refresh_models(select="tiny-blob")
    ui.deviceComboBox.setCurrentIndex(1)
    ui.segmentButton.click()
    assert STANDIN.run_until(lambda: panel.result is not None, 120)
    slicer.mrmlScene.RemoveNode(panel.result.segmentation)
    ui.lesionTableView.click_row(0)
    assert panel.result is None and not ui.resultsCollapsibleButton.enabled


def test_segment_is_disabled_with_a_reason_until_inputs_exist():
    panel, ui, _ = make_panel()
    panel.refresh_models(select="tiny-blob")
    assert not ui.segmentButton.enabled and "Select an input volume for CT" in ui.segmentButton.toolTip
    node, _, _ = add_head()
    panel.channel_selectors[0].setCurrentNode(node)
    assert ui.segmentButton.enabled and ui.segmentButton.text == "Segment"


def test_panel_click_segment_runs_shows_results_and_row_click_jumps():
    node, _, _ = add_head()
    panel, ui, logic = make_panel()
    panel.refresh_models(select="tiny-blob")
    ui.deviceComboBox.setCurrentIndex(1)  # cpu
    ui.gradcamCheckBox.checked = False
    assert ui.segmentButton.click()
    assert ui.segmentButton.text == "Cancel" and ui.segmentButton.enabled and not ui.inputsCollapsibleButton.enabled
    seen = []
    logic.progress.connect(lambda ev: seen.append((ev["stage"], ui.progressBar.value, ui.progressBar.format)))
    assert STANDIN.run_until(lambda: panel.result is not None, 120)
    assert ui.segmentButton.text == "Segment" and ui.resultsCollapsibleButton.enabled
    assert seen and [v for _, v, _ in seen] == sorted(v for _, v, _ in seen)
    assert any(f.startswith("3/5 inference") for _, _, f in seen)  # staged: step 3 of 5 without Grad-CAM
    assert ui.lesionTableView.mrmlTableNode() is panel.result.table
    assert ui.outputSegmentationSelector.currentNode() is None  # the next run makes a new node unless one is picked
    assert "1 lesion(s)" in ui.lesionSummaryLabel.text
    assert f"(ABC/2 {panel.result.lesions.total['abc2_ml']:.2f} mL)" in ui.lesionSummaryLabel.text
    assert ui.heatmapComboBox.count() == 1 and ui.heatmapComboBox.currentText == "Probability"
    ui.lesionTableView.click_row(0)
    row = panel.result.lesions.rows[0]
    inside = (row["inside_r"], row["inside_a"], row["inside_s"])
    assert slice_planes_contain(inside) and camera_focal_point() == pytest.approx(inside, abs=1e-6)
    # the layout's table view jumps too
    slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, 0.0, 0.0, 0.0, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    assert not slice_planes_contain(inside)
    STANDIN.layout_manager.tableWidget(0).tableView().click_row(0)
    assert slice_planes_contain(inside)
    # opacity slider and live threshold slider
    ui.opacitySlider.value = 0.8
    assert STANDIN.foreground_opacities() == {0.8}
    voxels_before = column(panel.result.table, "voxels")[0]
    ui.liveThresholdSlider.value = 0.95  # typed in: applied at once, surfaces too
    assert panel.result.threshold == 0.95 and has_surface(panel.result.segmentation)
    assert column(panel.result.table, "voxels")[0] < voxels_before and "0.95" in ui.lesionSummaryLabel.text
    assert "done: 1 lesion(s)" in ui.logTextEdit.toPlainText()


def test_panel_exports_through_file_dialogs(tmp_path):
    node, _, _ = add_head()
    dialogs = ScriptedDialogs([str(tmp_path / "lesions.tsv"), str(tmp_path / "all")])
    panel, ui, logic = make_panel(dialogs=dialogs)
    panel.refresh_models(select="tiny-blob")
    ui.deviceComboBox.setCurrentIndex(1)
    ui.segmentButton.click()
    assert STANDIN.run_until(lambda: panel.result is not None, 120)
    ui.exportTableButton.click()
    assert (tmp_path / "lesions.tsv").read_text().splitlines()[0].split("\t") == list(COLUMNS)
    ui.exportAllButton.click()
    assert {"segmentation.seg.nrrd", "summary.json", "report.png", "lesions.csv"} <= {p.name for p in (tmp_path / "all").iterdir()}
    dialogs.answers = [str(tmp_path / "all"), False]  # exists: asked to replace, answer no
    ui.exportAllButton.click()
    assert "already holds" in dialogs.confirms[-1] and not dialogs.errors


def test_panel_cancel_button_stops_the_run_and_scene_is_unchanged():
    node, _, _ = add_head(shape_kji=(48, 200, 200), spacing=(0.6, 0.6, 2.0))
    panel, ui, logic = make_panel()
    panel.refresh_models(select="tiny-blob")
    ui.deviceComboBox.setCurrentIndex(1)
    before = node_ids()
    seen = []

    def cancel_at_inference(ev):  # the user clicks "Cancel" as the bar reaches inference (not a polled moment,
        if ev["stage"] == "inference" and not seen:  # which a loaded machine could step over)
            seen.append(ui.progressBar.format)
            ui.segmentButton.click()  # now "Cancel"

    logic.progress.connect(cancel_at_inference)
    ui.segmentButton.click()
    assert STANDIN.run_until(lambda: seen, 120)
    assert "inference" in seen[0]
    assert STANDIN.run_until(lambda: not logic.is_running(), 3)
    assert ui.segmentButton.text == "Segment" and "Cancelled" in ui.statusLabel.text
    assert node_ids() == before and panel.result is None


class FakeLogic(SegmentationLogic):
    """Real model handling, scripted run outcomes (the SlicerNNUnet pattern)."""

    def __init__(self, outcomes):
        super().__init__(dependency_check=lambda: True)
        self.outcomes = list(outcomes)
        self.requests = []
        self._running = False

    def is_running(self):
        return self._running

    def start(self, request):
        self.requests.append(request)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        self.failed(outcome)


def test_out_of_gpu_memory_offers_cpu_and_reruns_there():
    node, _, _ = add_head()
    oom = {"kind": "OutOfMemoryError", "exit_code": 5, "offer_cpu": True, "message": "out of GPU memory"}
    logic = FakeLogic([oom, {"kind": "CancelledError", "message": "x"}])
    dialogs = ScriptedDialogs([True])
    panel, ui, _ = make_panel(logic, dialogs)
    panel.refresh_models(select="tiny-blob")
    ui.deviceComboBox.setCurrentIndex(2)  # cuda
    ui.segmentButton.click()
    assert "Run on the CPU instead" in dialogs.confirms[0]
    assert [r.params.device for r in logic.requests] == ["cuda", "cpu"]


@pytest.mark.parametrize("run_anyway", [True, False])
def test_unusual_input_is_a_dialog_that_offers_to_run_anyway(run_anyway):
    node, _, _ = add_head()
    refusal = {"kind": "UnusualInputError", "exit_code": 3, "problem": "input CT shows no skull enclosing brain-density "
               "tissue on any axial slice", "message": "input CT shows no skull … — pass a head CT; or run anyway",
               "fix": "pass a head CT"}
    logic = FakeLogic([refusal, {"kind": "CancelledError", "message": "x"}])
    dialogs = ScriptedDialogs([run_anyway])
    panel, ui, _ = make_panel(logic, dialogs)
    panel.refresh_models(select="tiny-blob")
    ui.segmentButton.click()
    assert "does not look like what the model" in dialogs.confirms[0] and "Input CT shows no skull" in dialogs.confirms[0]
    assert "UNUSUAL INPUT" in dialogs.confirms[0]
    assert [r.params.allow_unusual_input for r in logic.requests] == ([False, True] if run_anyway else [False])
    if not run_anyway:
        assert "not changed" in ui.statusLabel.text and not dialogs.errors


def test_errors_show_a_dialog_and_go_to_the_log():
    node, _, _ = add_head()
    from UNetSegmentLib.errors import InputError

    logic = FakeLogic([InputError("input CT covers only 3% of the volume", "register the series first")])
    dialogs = ScriptedDialogs()
    panel, ui, _ = make_panel(logic, dialogs)
    panel.refresh_models(select="tiny-blob")
    ui.segmentButton.click()
    assert dialogs.errors and "covers only 3%" in dialogs.errors[0]
    assert "[error]" in ui.logTextEdit.toPlainText()
    for _ in range(600):
        panel.append_log("info", "line")
    assert len(ui.logTextEdit.lines) == 500  # capped


def test_a_bad_panel_value_is_an_error_dialog_and_nothing_runs():
    add_head()
    logic, dialogs = FakeLogic([]), ScriptedDialogs()
    panel, ui, _ = make_panel(logic, dialogs)
    panel.refresh_models(select="tiny-blob")
    ui.thresholdSlider.maximum = 1.0  # the .ui file stops at 0.99; a threshold of 1 would label nothing
    ui.thresholdSlider.value = 1.0
    ui.segmentButton.click()
    assert logic.requests == [] and len(dialogs.errors) == 1
    assert "threshold=1.0 is out of range" in dialogs.errors[0] and "< 1" in dialogs.errors[0]
    assert "[error]" in ui.logTextEdit.toPlainText()


def test_missing_dependencies_ask_before_anything_runs():
    node, _, _ = add_head()
    logic = SegmentationLogic(dependency_check=lambda: False)
    panel, ui, _ = make_panel(logic)
    panel.refresh_models(select="tiny-blob")
    ui.segmentButton.click()
    assert not logic.is_running() and "Packages missing" in ui.statusLabel.text


def test_import_model_validates_and_selects_it(tmp_path, monkeypatch):
    from conftest import write_bundle

    monkeypatch.setenv("UNETSEGMENT_MODELS", str(tmp_path / "models"))
    bundle = write_bundle(tmp_path / "b", channels=("CBF", "CBV", "MTT", "Tmax"))
    dialogs = ScriptedDialogs([str(bundle), str(tmp_path / "missing")])
    panel, ui, _ = make_panel(dialogs=dialogs)
    ui.importModelButton.click()
    assert ui.modelComboBox.currentText == "test-model"
    assert [r[0] for r in ui.channelsWidget.layout().rows] == ["CBF:", "CBV:", "MTT:", "Tmax:"]
    ui.importModelButton.click()
    assert dialogs.errors and "not imported" in dialogs.errors[-1]


# --- "Run on": this computer or a server ------------------------------------------------------------
class RecordingProcess:
    """Records how the logic made and started it; ends only when stopped (as a cancelled run)."""

    def __init__(self, made, on_event, on_finished, client=None):
        self.on_event, self.on_finished, self.client = on_event, on_finished, client
        self.request, self.running = None, False
        made.append(self)

    def start(self, request_path, stop_file):
        self.request, self.running = json.loads(Path(request_path).read_text()), True

    def stop(self):
        def end():
            self.running = False
            self.on_event({"event": "error", "kind": "CancelledError", "exit_code": 130, "message": "run cancelled"})
            self.on_finished(130)

        __import__("qt").QTimer.singleShot(0, end)  # later, on the GUI thread, as a real process ends

    def is_running(self):
        return self.running


def test_run_on_server_makes_the_logic_use_a_server_process_with_that_url_and_token(tmp_path):
    node, _, _ = add_head()
    (tmp_path / "token").write_text("s3cret-token\n")
    local, remote = [], []
    logic = SegmentationLogic(dependency_check=lambda: True, process_factory=lambda *a: RecordingProcess(local, *a),
                              server_process_factory=lambda *a: RecordingProcess(remote, *a))
    panel, ui, _ = make_panel(logic)
    panel.refresh_models(select="tiny-blob")
    assert ui.runOnComboBox.currentText == "This computer" and not ui.serverUrlLineEdit.enabled  # the default
    assert ui.deviceComboBox.enabled
    ui.runOnComboBox.setCurrentIndex(1)
    assert ui.runOnComboBox.currentText == "Server" and ui.serverUrlLineEdit.enabled and ui.serverTokenFilePathLineEdit.enabled
    assert not ui.deviceComboBox.enabled and "server" in ui.deviceComboBox.toolTip  # the server owns its devices
    assert not ui.segmentButton.enabled and "server URL" in ui.segmentButton.toolTip
    ui.serverUrlLineEdit.text = " http://127.0.0.1:8765/ "
    ui.serverTokenFilePathLineEdit.currentPath = str(tmp_path / "token")
    assert ui.segmentButton.enabled and "http://127.0.0.1:8765" in ui.segmentButton.toolTip
    ui.segmentButton.click()
    (proc,) = remote
    assert not local and proc.running and logic.is_running() and ui.segmentButton.text == "Cancel"
    assert proc.client.url == "http://127.0.0.1:8765" and proc.client.token == "s3cret-token"
    assert Path(proc.request["inputs"][0]).is_file() and proc.request["model"] == str(load_bundle("tiny-blob").root)
    assert "on the server http://127.0.0.1:8765" in ui.logTextEdit.toPlainText()
    ui.segmentButton.click()  # Cancel
    assert STANDIN.run_until(lambda: not logic.is_running(), 5) and "Cancelled" in ui.statusLabel.text
    # kept in the settings: a new panel (next Slicer session) comes up the same
    panel2, ui2, _ = make_panel(logic)
    assert ui2.runOnComboBox.currentText == "Server" and ui2.serverUrlLineEdit.text == "http://127.0.0.1:8765/"
    assert ui2.serverTokenFilePathLineEdit.currentPath == str(tmp_path / "token")
    # back on this computer: the local worker again, no server fields in the request
    ui.runOnComboBox.setCurrentIndex(0)
    ui.segmentButton.click()
    assert len(local) == 1 and len(remote) == 1 and panel.last_request.server_url is None
    ui.segmentButton.click()
    assert STANDIN.run_until(lambda: not logic.is_running(), 5)
    assert slicer.util.settingsValue("UNetSegment/RunOn") == "local"


def test_bad_or_unreachable_server_is_an_error_and_the_scene_is_unchanged(tmp_path):
    import socket

    node, _, _ = add_head()
    dialogs = ScriptedDialogs()
    panel, ui, logic = make_panel(dialogs=dialogs)
    panel.refresh_models(select="tiny-blob")
    before = node_ids()
    ui.runOnComboBox.setCurrentIndex(1)
    ui.serverUrlLineEdit.text = "gpu-box:8000"  # no scheme: refused before anything runs
    ui.segmentButton.click()
    assert not logic.is_running() and "not an http(s) URL" in dialogs.errors[-1]
    ui.serverUrlLineEdit.text = "http://127.0.0.1:8000"
    ui.serverTokenFilePathLineEdit.currentPath = str(tmp_path / "missing-token")
    ui.segmentButton.click()
    assert not logic.is_running() and "cannot read token file" in dialogs.errors[-1]
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui.serverUrlLineEdit.text = f"http://127.0.0.1:{port}"
    ui.serverTokenFilePathLineEdit.currentPath = ""
    t0 = time.monotonic()
    ui.segmentButton.click()
    assert time.monotonic() - t0 < 2.0 and logic.is_running()  # the click never waits for the network
    assert STANDIN.run_until(lambda: not logic.is_running(), 15)
    assert "cannot reach the UNetSegment server" in dialogs.errors[-1] and "Failed" in ui.statusLabel.text
    assert node_ids() == before and panel.result is None and ui.segmentButton.text == "Segment"


def test_segment_on_a_live_server_gives_the_same_nodes_as_the_local_run(tmp_path, monkeypatch):
    """Tiny-blob on a real local server (uvicorn on 127.0.0.1, token file) through the panel, against
    the same panel's local run; HTTP never happens on the GUI thread, callbacks only there."""
    import threading
    import urllib.request

    from UNetSegmentLib.serving.server import InferenceServer, ServerConfig

    node, _, _ = add_head()
    panel, ui, logic = make_panel()
    local = run_tiny_blob(panel, ui, gradcam=False)
    panel.result = None

    http_threads, callback_threads, stages = [], [], []
    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda *a, **k: http_threads.append(threading.current_thread()) or real_urlopen(*a, **k))
    logic.progress.connect(lambda ev: (callback_threads.append(threading.current_thread()), stages.append(ev["stage"])))
    logic.finished.connect(lambda r: callback_threads.append(threading.current_thread()))
    (tmp_path / "token").write_text("panel-test-token-" + "y" * 20)
    cfg = ServerConfig(token="panel-test-token-" + "y" * 20, params=SegmentParams(heatmaps=(), threads=1),
                       work_dir=tmp_path / "serve-work")
    with InferenceServer(cfg) as srv:
        ui.runOnComboBox.setCurrentIndex(1)
        ui.serverUrlLineEdit.text = srv.url
        ui.serverTokenFilePathLineEdit.currentPath = str(tmp_path / "token")
        ui.segmentButton.click()
        assert ui.segmentButton.text == "Cancel"
        assert STANDIN.run_until(lambda: not logic.is_running(), 120)
        remote = panel.result
        assert remote is not None, ui.logTextEdit.toPlainText()
        assert not srv.manager.jobs  # the server's copy was deleted after the download
    assert http_threads and threading.main_thread() not in http_threads
    assert callback_threads and set(callback_threads) == {threading.main_thread()}
    assert stages[0] == "upload" and stages[-1] == "download"
    assert set(stages) <= {"upload", "queued", "download", *STAGES}  # engine stages named as the local worker's
    assert f"connected to the server {srv.url}" in ui.logTextEdit.toPlainText()

    assert remote.segmentation is not local.segmentation  # a second set of nodes, equal to the first
    sid = sc.segment_id(1)
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(remote.segmentation, sid, node),
                          slicer.util.arrayFromSegmentBinaryLabelmap(local.segmentation, sid, node))
    seg_l, seg_r = local.segmentation.GetSegmentation().GetSegment(sid), remote.segmentation.GetSegmentation().GetSegment(sid)
    assert seg_r.GetName() == seg_l.GetName() and tag(seg_r) == tag(seg_l)
    assert set(remote.heatmaps) == set(local.heatmaps) == {"probability"}
    np.testing.assert_allclose(slicer.util.arrayFromVolume(remote.heatmaps["probability"]),
                               slicer.util.arrayFromVolume(local.heatmaps["probability"]), atol=1e-5)
    tr, tl = remote.table, local.table
    assert tr.GetNumberOfRows() == tl.GetNumberOfRows() >= 1
    for c in range(tl.GetNumberOfColumns()):
        name = tl.GetColumnName(c)
        assert tr.GetColumnName(c) == name
        got, want = column(tr, name), column(tl, name)
        if want and isinstance(want[0], str):
            assert got == want, name
        else:
            assert got == pytest.approx(want, abs=1e-6), name
    assert remote.summary["parameters"]["threshold"] == local.summary["parameters"]["threshold"]
    # the server writes the CLI's whole set; the local worker leaves the report for export to render
    assert {p.name for p in remote.run.folder.iterdir()} == {p.name for p in local.run.folder.iterdir()} | {"report.png"}
    assert "1 lesion(s)" in ui.lesionSummaryLabel.text and ui.resultsCollapsibleButton.enabled


# --- the module file and its self-test --------------------------------------------------------------
def test_module_metadata_and_selftest_pass_on_slicer_code():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))
    import UNetSegment as module

    parent = type("Parent", (), {})()
    m = module.UNetSegment(parent)
    assert parent.title == "UNetSegment" and parent.categories == ["Segmentation"] and parent.dependencies == []
    for word in ("Inputs", "Outputs", "Heatmaps", "Grad-CAM", "Probability", "Uncertainty", "5.10"):
        assert word in parent.helpText
    assert parent.acknowledgementText.strip() and parent.contributors
    assert Path(parent.icon.path) == resource_path("Icons", "UNetSegment.png")
    assert "UNetSegment" in slicer.selfTests
    slicer.selfTests["UNetSegment"]()
    STANDIN.reset()
    widget = module.UNetSegmentWidget()
    widget.setup()
    assert Path(widget.resourcePath("UI/UNetSegment.ui")).is_file()  # developer mode's "Edit UI" finds it
    assert widget.panel.bundle is not None and widget.ui.segmentButton.text == "Segment"
    assert not widget.ui.segmentButton.enabled  # no volume yet
    node, _, _ = add_head()
    widget.enter()  # volumes loaded meanwhile fill the empty selector
    assert widget.panel.channel_selectors[0].currentNode() is node and widget.ui.segmentButton.enabled
    widget.cleanup()
    del m


# --- first-use dependency check ---------------------------------------------------------------------
def test_missing_slicer_packages_or_pytorch_extension_are_clear_errors(monkeypatch):
    from UNetSegmentLib.slicer import install

    monkeypatch.setattr(install, "missing_requirements", lambda *a, **k: [install.Missing("numpy>=1.24", "numpy", "1.19.0", True)])
    with pytest.raises(RuntimeError, match="Slicer 5.10 or later"):
        install.ensure_dependencies(confirm=lambda *a: True)
    monkeypatch.setattr(install, "missing_requirements", lambda *a, **k: [])
    monkeypatch.setattr(install, "torch_installed", lambda: False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension is not installed
    with pytest.raises(RuntimeError, match="'PyTorch' extension"):
        install.ensure_dependencies(confirm=lambda *a: True)


def test_requirement_check_reads_versions():
    from UNetSegmentLib.slicer.install import missing_requirements

    versions = {"numpy": "2.4.6", "slicerio": "1.3.0"}

    def version_of(name):
        if name not in versions:
            import importlib.metadata as md

            raise md.PackageNotFoundError(name)
        return versions[name]

    got = missing_requirements(["numpy>=1.24", "slicerio>=1.4", "pynrrd>=1.0"], version_of)
    assert [(m.name, m.installed, m.slicer_owned) for m in got] == [("slicerio", "1.3.0", False), ("pynrrd", None, False)]


# --- transformed inputs, chosen outputs, selectors, live threshold: what Slicer's own code checks -----
def run_transformed(roi=None, heatmaps=(), **request_kw):
    """A head under a rotated and translated parent transform, run through the logic."""
    node, image, blob = add_head(direction=OBLIQUE, origin=(40.0, -30.0, 12.5))
    transform, to_world = add_transform()
    node.SetAndObserveTransformNodeID(transform.GetID())
    logic = SegmentationLogic(dependency_check=lambda: True)
    out = run_logic(logic, RunRequest([node], "tiny-blob", SegmentParams(device="cpu", heatmaps=heatmaps),
                                      roi_node=roi, **request_kw))
    assert "result" in out, out
    return logic, out["result"], node, image, blob, to_world


def assert_segment_on_the_blob_in_world(seg, image, blob, to_world, min_dice=0.8):
    """Sample the segment on the input's grid as placed in the world (an untransformed probe volume)."""
    _, world_grid = blob_in_world(image, blob, to_world)
    got = world_mask(seg, sc.segment_id(1), world_grid, blob.shape)
    assert got.any(), "the segment is not where the lesion is in world coordinates"
    assert dice(got, blob) > min_dice, f"world Dice {dice(got, blob):.2f}"


def test_transformed_input_segmentation_rerun_and_live_threshold_lie_on_the_lesion_in_world():
    """Defects 4 and 5: reference geometry transformed twice; re-run/live threshold displaced by T⁻¹."""
    logic, r, node, image, blob, to_world = run_transformed()
    seg = r.segmentation
    assert seg.GetTransformNodeID() == node.GetTransformNodeID()
    assert np.allclose(reference_geometry(seg), image.ijk_to_ras, atol=1e-4)  # in the input's frame, once
    assert_segment_on_the_blob_in_world(seg, image, blob, to_world)
    core = read_image(r.run.folder / "segmentation.nii.gz")
    # in the input's own frame the segment is the core's label map, voxel for voxel
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sc.segment_id(1), node),
                          (core.array > 0).astype(np.uint8))
    logic.set_threshold(r, r.run.threshold)  # live threshold
    assert_segment_on_the_blob_in_world(seg, image, blob, to_world)
    again = run_logic(logic, RunRequest([node], "tiny-blob", SegmentParams(device="cpu", heatmaps=()),
                                        output_segmentation=seg))["result"]  # re-run into the same node
    assert again.segmentation is seg
    assert np.allclose(reference_geometry(seg), image.ijk_to_ras, atol=1e-4)
    assert_segment_on_the_blob_in_world(seg, image, blob, to_world)
    # the row click lands on the lesion in world coordinates
    point = logic.jump_to_table_row(again, 0)
    inside_local = np.array([again.lesions.rows[0][f"inside_{c}"] for c in "ras"])
    assert point == pytest.approx(tuple(to_world[:3, :3] @ inside_local + to_world[:3, 3]), abs=1e-4)
    assert slice_planes_contain(point)


@pytest.mark.parametrize("roi_moved", [False, True], ids=["roi-in-world", "roi-with-its-own-transform"])
def test_roi_crop_on_a_transformed_input_covers_the_lesion(roi_moved):
    """Defect 6: the ROI's world bounds were used on the input's local grid."""
    image, blob = head_with_blob(direction=OBLIQUE, origin=(40.0, -30.0, 12.5))
    _, to_world = add_transform()
    world_pts, _ = blob_in_world(image, blob, to_world)
    lo, hi = world_pts.min(0) - 6, world_pts.max(0) + 6
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    centre = (lo + hi) / 2
    if roi_moved:  # the ROI node sits under its own transform: place it so that its world box is the same
        roi_t, roi_m = add_transform(35.0, (-20.0, 11.0, -6.0), "ROI frame")
        roi.SetAndObserveTransformNodeID(roi_t.GetID())
        centre = np.linalg.inv(roi_m) @ np.array([*centre, 1.0])
        roi.SetXYZ(*centre[:3])
        roi.SetRadiusXYZ(*(np.linalg.norm(hi - lo) / 2,) * 3)  # a cube around the lesion, whatever its rotation
    else:
        roi.SetXYZ(*centre)
        roi.SetRadiusXYZ(*((hi - lo) / 2))
    logic, r, node, image, blob, to_world = run_transformed(roi=roi)
    cropped = read_image(r.run.folder / "probability.nrrd")
    assert cropped.array.size < image.array.size / 2  # the worker only saw the box
    assert_segment_on_the_blob_in_world(r.segmentation, image, blob, to_world)


def test_a_closed_surface_output_segmentation_is_refused_before_anything_changes():
    """Defect 7: the node was emptied and its geometry overwritten before the import failed."""
    node, _, _ = add_head()
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    seg.CreateDefaultDisplayNodes()
    seg.GetSegmentation().SetSourceRepresentationName(sc.CLOSED_SURFACE)  # as loading an STL/OBJ model makes it
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*ijk_to_ras(node)[:3, 3])
    sphere.SetRadius(10.0)
    sphere.Update()
    sid = seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "my model", [0.2, 0.4, 1.0])
    # one of this module's own segment IDs too, as after an earlier run that was exported to STL and reloaded
    seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Lesion", [1.0, 0.0, 0.0], sc.segment_id(1))
    geometry = seg.GetSegmentation().GetConversionParameter("Reference image geometry")
    ids, points = list(seg.GetSegmentation().GetSegmentIDs()), seg.GetClosedSurfaceInternalRepresentation(sid).GetNumberOfPoints()
    before = node_ids()
    logic = SegmentationLogic(dependency_check=lambda: True)
    from UNetSegmentLib.errors import InputError

    with pytest.raises(InputError, match="Closed surface.*pick another output segmentation"):
        logic.start(RunRequest([node], "tiny-blob", CPU, output_segmentation=seg))
    assert not logic.is_running() and node_ids() == before
    assert list(seg.GetSegmentation().GetSegmentIDs()) == ids
    assert seg.GetSegmentation().GetConversionParameter("Reference image geometry") == geometry
    assert seg.GetClosedSurfaceInternalRepresentation(sid).GetNumberOfPoints() == points
    with pytest.raises(InputError):  # the scene builder refuses it too, whoever calls it
        sc.update_segmentation(seg, Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), load_bundle("tiny-blob").labels,
                               node, "x")
    assert list(seg.GetSegmentation().GetSegmentIDs()) == ids


def test_channel_guesses_only_pick_volumes_the_selector_lists():
    """Defect 8: a vector or DTI volume named like the channel was guessed; the selector showed none."""
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "CT colour")
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "CT tensor")
    node, _, _ = add_head("scan")
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "CT newest vector")
    panel, ui, _ = make_panel()
    panel.refresh_models(select="tiny-blob")
    assert panel.channel_selectors[0].currentNode() is node
    assert ui.segmentButton.enabled


def test_live_threshold_updates_segments_in_place_and_builds_surfaces_on_release():
    """Defect 10: every step removed and re-added the segments and rebuilt the 3D surfaces."""
    node, _, _ = add_head()
    panel, ui, logic = make_panel()
    panel.refresh_models(select="tiny-blob")
    ui.deviceComboBox.setCurrentIndex(1)
    ui.gradcamCheckBox.checked = False
    ui.segmentButton.click()
    assert STANDIN.run_until(lambda: panel.result is not None, 120)
    seg, sid = panel.result.segmentation, sc.segment_id(1)
    display = seg.GetDisplayNode()
    display.SetSegmentOpacity2DFill(sid, 0.15)
    display.SetSegmentVisibility3D(sid, False)
    removed = []
    seg.AddObserver(slicer.vtkSegmentation.SegmentRemoved, lambda *a: removed.append(1))
    seg.GetSegmentation().AddObserver(slicer.vtkSegmentation.SegmentRemoved, lambda *a: removed.append(1))
    voxels = column(panel.result.table, "voxels")[0]
    assert ui.liveThresholdSlider.tracking is False
    ui.liveThresholdSlider.drag_to(0.95)
    assert ui.liveThresholdSlider.value != 0.95  # CTK: the value before the drag until the release
    assert STANDIN.run_until(lambda: panel.result.threshold == 0.95, 5)  # updated while dragging…
    assert not has_surface(seg)  # …without the 3D surfaces
    assert column(panel.result.table, "voxels")[0] < voxels
    ui.liveThresholdSlider.release()
    assert has_surface(seg)  # built once, on release
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, node)
    expected = rederive_run(panel.result.run, panel.result.bundle, 0.95, intensity=panel.result.inputs[0])
    assert np.array_equal(mask, (expected.labels.array > 0).astype(np.uint8))
    assert not removed  # the segment stayed: the user's display settings with it
    assert display.GetSegmentOpacity2DFill(sid) == pytest.approx(0.15) and not display.GetSegmentVisibility3D(sid)
    # dragged away and back to where it started: CTK emits no valueChanged, the surfaces come back once it rests
    ui.liveThresholdSlider.drag_to(0.6)
    assert STANDIN.run_until(lambda: panel.result.threshold == 0.6 and not has_surface(seg), 5)
    ui.liveThresholdSlider.drag_to(0.95)
    ui.liveThresholdSlider.release()
    assert STANDIN.run_until(lambda: panel.result.threshold == 0.95 and has_surface(seg), 5)


def test_per_lesion_heatmap_checkbox_rescales_the_gradcam_node_and_back():
    """Issue 16: a small lesion next to a large one is visible with per-lesion Grad-CAM scaling."""
    from UNetSegmentLib.analysis.heatmap_scale import per_lesion
    from UNetSegmentLib.errors import UsageError

    image, blob = head_with_blob()
    arr = image.array.copy()
    k, j, i = np.mgrid[: arr.shape[0], : arr.shape[1], : arr.shape[2]]
    small = ((i - 30) / 4.0) ** 2 + ((j - 60) / 4.0) ** 2 + ((k - 6) / 1.5) ** 2 < 1  # a second, smaller lesion
    assert not (small & blob).any()
    arr[small] = 70
    node = slicer.util.addVolumeFromArray(arr, image.ijk_to_ras, "CT two lesions")
    before = np.array(arr, copy=True)
    panel, ui, logic = make_panel()
    assert ui.perLesionHeatmapCheckBox.checked and "small lesion next to a large one" in ui.perLesionHeatmapCheckBox.toolTip
    r = run_tiny_blob(panel, ui, gradcam=True)
    assert r.lesions.n_lesions == 2 and r.heatmap_scale == "lesion"
    cam_node = r.heatmaps["gradcam"]
    stored = read_image(r.run.folder / "gradcam.nrrd").array
    scaled = per_lesion(r.run.heatmaps["gradcam"], r.labels, connectivity=r.lesions.connectivity).array
    assert not np.allclose(scaled, stored, atol=1e-3)  # the weaker lesion's neighbourhood is lifted
    ui.heatmapComboBox.setCurrentIndex(ui.heatmapComboBox.findText("Grad-CAM"))
    assert STANDIN.foreground_ids() == {cam_node.GetID()}
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(cam_node), scaled)  # checked by default
    ui.perLesionHeatmapCheckBox.click()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(cam_node), stored)  # volume scale: the stored map
    ui.perLesionHeatmapCheckBox.click()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(cam_node), scaled)
    assert r.heatmaps["gradcam"] is cam_node and STANDIN.foreground_ids() == {cam_node.GetID()}
    np.testing.assert_array_equal(r.run.heatmaps["gradcam"].array, stored)  # the run's own map is kept
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)  # the input is not touched
    # a new threshold changes the lesions: their neighbourhoods follow
    ui.liveThresholdSlider.value = 0.95
    rescaled = per_lesion(r.run.heatmaps["gradcam"], r.labels, connectivity=r.lesions.connectivity).array
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(cam_node), rescaled)
    with pytest.raises(UsageError, match="heatmap scale"):
        logic.set_heatmap_scale(r, "global")


def test_compare_with_prior_adds_the_registered_prior_and_the_comparison_and_row_click_jumps():
    prior_node, prior_img, _ = add_head("CT prior")
    K, J, I = prior_img.array.shape
    k, j, i = np.mgrid[:K, :J, :I]
    grown = ((i - I * 0.62) / (I * 0.13)) ** 2 + ((j - J * 0.45) / (J * 0.12)) ** 2 + ((k - K / 2) / max(2.0, K * 0.2)) ** 2 < 1
    current_arr = prior_img.array.copy()
    current_arr[grown] = 70
    current_node = slicer.util.addVolumeFromArray(current_arr, prior_img.ijk_to_ras, "CT current")
    dialogs = ScriptedDialogs()
    panel, ui, logic = make_panel(dialogs=dialogs)
    panel.refresh_models(select="tiny-blob")
    ui.deviceComboBox.setCurrentIndex(1)  # cpu
    ui.gradcamCheckBox.checked = False
    panel.channel_selectors[0].setCurrentNode(current_node)
    assert not ui.compareCollapsibleButton.enabled  # nothing to compare before a result
    assert ui.segmentButton.click()
    assert STANDIN.run_until(lambda: panel.result is not None, 120)
    assert ui.compareCollapsibleButton.enabled and not ui.compareButton.enabled
    assert "Select the prior scan" in ui.compareButton.toolTip
    # the current scan itself is refused with the fix, before anything runs
    ui.priorVolumeSelector.setCurrentNode(current_node)
    assert ui.compareButton.click()
    assert dialogs.errors and "is the current scan itself" in dialogs.errors[-1] and not logic.is_running()
    ui.priorVolumeSelector.setCurrentNode(prior_node)
    before = set(node_ids())
    assert ui.compareButton.click()
    assert STANDIN.run_until(lambda: panel.comparison is not None, 180)
    c = panel.comparison
    added = {slicer.mrmlScene.GetNodeByID(n).GetClassName() for n in set(node_ids()) - before}
    assert {"vtkMRMLScalarVolumeNode", "vtkMRMLTableNode"} <= added
    assert column(c.table, "status") == ["grown", "grown"]  # the lesion, then the total
    assert column(c.table, "current_lesion") == ["1", "total"]
    assert np.allclose(ijk_to_ras(c.prior_registered), ijk_to_ras(current_node), atol=1e-4)
    registered = slicer.util.arrayFromVolume(c.prior_registered).astype(float)
    assert np.abs(registered[~grown] - prior_img.array[~grown]).mean() < 5.0  # the same head, in the same place
    assert STANDIN.foreground_ids() == {c.prior_registered.GetID()} and STANDIN.background_ids() == {current_node.GetID()}
    assert "hematoma expansion: YES" in ui.compareSummaryLabel.text and ui.compareTableView.mrmlTableNode() is c.table
    row = c.comparison["lesions"][0]
    centroid = (row["centroid_r"], row["centroid_a"], row["centroid_s"])
    assert not slice_planes_contain(centroid)
    ui.compareTableView.click_row(0)
    assert ui.statusLabel.text.startswith("Centred on the compared lesion") and slice_planes_contain(centroid)
    # the prior as an earlier result folder (not segmented again); a folder that is not one is refused
    from UNetSegmentLib.cli import main as cli_main
    from UNetSegmentLib.io.writers import write_image as write

    folder = Path(slicer.util.tempDirectory("prior-run-"))
    write(prior_img, folder / "prior.nrrd")
    assert cli_main(["segment", str(folder / "prior.nrrd"), "-o", str(folder / "run"), "--model", "tiny-blob", "-q",
                     "--heatmap", "none", "--device", "cpu"]) == 0
    dialogs.answers = [str(folder)]
    assert ui.comparePriorFolderButton.click()
    assert "not a UNetSegment output folder" in dialogs.errors[-1] and not logic.is_running()
    dialogs.answers = [str(folder / "run")]
    assert ui.comparePriorFolderButton.click()
    assert STANDIN.run_until(lambda: panel.comparison is not c, 180)
    again = panel.comparison
    assert column(again.table, "status") == ["grown", "grown"]
    assert again.comparison["lesions"][0]["prior_ml"] == pytest.approx(row["prior_ml"], rel=1e-6)
    assert again.comparison["prior"]["folder"] == str((folder / "run").resolve())


def test_a_compartment_model_gives_one_segment_per_class_its_table_columns_and_a_live_threshold(tmp_path):
    """A multi-class bundle (compartments + perilesional oedema, ``"lesion": false``) through the real
    scene: one segment per class with its name, colour and terminology, voxel for voxel the core's
    labels; the table's compartment and oedema columns; the live threshold moves the lesions only."""
    from conftest import COMPARTMENT_NAMES, write_compartment_bundle

    bundle_dir = write_compartment_bundle(tmp_path / "compartments")
    node, _, _ = add_head()
    logic = SegmentationLogic(dependency_check=lambda: True)
    r = run_logic(logic, RunRequest([node], str(bundle_dir), SegmentParams(device="cpu", heatmaps=())))["result"]
    core = read_image(r.run.folder / "segmentation.nii.gz").array
    assert set(np.unique(core)) >= {1, 4}
    segmentation = r.segmentation.GetSegmentation()
    for lab in r.bundle.labels:
        sid = sc.segment_id(lab["value"])
        segment = segmentation.GetSegment(sid)
        assert segment.GetName() == COMPARTMENT_NAMES[lab["value"]] and np.allclose(segment.GetColor(), lab["color"])
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(r.segmentation, sid, node)
        assert np.array_equal(mask, (core == lab["value"]).astype(np.uint8)), lab["name"]
    assert column(r.table, "compartment") == [COMPARTMENT_NAMES[1]] * r.table.GetNumberOfRows()
    oedema = column(r.table, "perilesional_oedema_ml")
    assert oedema and all(v > 0 for v in oedema)
    # each class's own probability is an overlay of its own, after P(lesion)
    from UNetSegmentLib.io.class_maps import read_class_probabilities

    assert list(r.heatmaps) == ["probability", "class-1", "class-2", "class-3", "class-4"]
    assert r.heatmaps["class-3"].GetName().endswith(f"P({COMPARTMENT_NAMES[3]})")
    maps = read_class_probabilities(r.run.folder / "class_probabilities.nrrd")
    assert np.allclose(slicer.util.arrayFromVolume(r.heatmaps["class-4"]), maps[4].array)
    from UNetSegmentLib.slicer.widget import heatmap_title

    assert [heatmap_title(k, r.bundle.labels) for k in r.heatmaps] == [
        "Probability", *(f"Probability: {COMPARTMENT_NAMES[v]}" for v in (1, 2, 3, 4))]
    logic.set_threshold(r, 0.8)
    raised = slicer.util.arrayFromSegmentBinaryLabelmap(r.segmentation, sc.segment_id(1), node)
    assert 0 < raised.sum() < (core == 1).sum()  # fewer lesion voxels at a higher threshold
    kept = slicer.util.arrayFromSegmentBinaryLabelmap(r.segmentation, sc.segment_id(4), node)
    assert not ((core == 4) & (kept == 0)).any()  # the network's oedema stays: the threshold decides lesions only
    # every segment as a fresh run at 0.8 would have it: the engine's rule on the class maps
    from UNetSegmentLib.analysis.lesions import remove_small_lesions
    from UNetSegmentLib.engine.labels import labels_from_probabilities

    rule = labels_from_probabilities({v: m.array for v, m in maps.items()}, 0.8, r.run.probability.array, (1, 2, 3))
    fresh = remove_small_lesions(r.run.probability.with_array(rule), r.run.min_lesion_ml, r.run.connectivity, (1, 2, 3))
    for v in (1, 4):
        shown = slicer.util.arrayFromSegmentBinaryLabelmap(r.segmentation, sc.segment_id(v), node)
        assert np.array_equal(shown, (fresh.array == v).astype(np.uint8)), v
