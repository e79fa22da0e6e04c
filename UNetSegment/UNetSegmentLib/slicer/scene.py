"""Build and update the MRML nodes that show a result: segmentation, heatmap overlays, lesion table.

Every function takes core values (:class:`~UNetSegmentLib.image.Image`, the bundle's ``labels``,
:class:`~UNetSegmentLib.analysis.lesions.LesionTable`) and touches only nodes this module created or the
user chose as output. Input volumes are read, never changed.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..analysis.lesions import COLUMNS, LesionTable
from ..image import Image
from .volumes import labelmap_node_without_display, to_world, update_volume

#: colour table per heatmap kind (IDs Slicer adds to every scene; see slicer_conventions.md §5)
HEATMAP_COLORS = {
    "probability": "vtkMRMLColorTableNodeFileInferno.txt",
    "gradcam": "vtkMRMLPETProceduralColorNodePET-Heat",
    "uncertainty": "vtkMRMLColorTableNodeFileViridis.txt",
}
#: heatmap values below this are transparent in the slice views (hides the zero background)
HEATMAP_DISPLAY_FLOOR = 0.05
#: node reference roles linking a segmentation to the result nodes of its run
REF_ROLE = "UNetSegment{}"
UNITS = {"_mm3": "mm3", "_ml": "mL", "_mm2": "mm2", "_mm": "mm"}


def segment_id(label_value: int) -> str:
    return f"UNetSegment_label_{int(label_value)}"


# --- segmentation -----------------------------------------------------------------------------
#: Slicer's names of the two segmentation representations this module uses (vtkSegmentationConverter)
BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"


def check_output_segmentation(seg_node) -> None:
    """Refuse, before anything is changed, a chosen output node whose segments are not label maps.

    A segmentation whose source representation is a closed surface (e.g. loaded from STL/OBJ) cannot
    take a label-map import: Slicer would fail after this module had already edited the node.
    """
    if seg_node is None or seg_node.GetSegmentation().GetNumberOfSegments() == 0:
        return
    source = seg_node.GetSegmentation().GetSourceRepresentationName()
    if source != BINARY_LABELMAP:
        from ..errors import InputError

        raise InputError(f"the output segmentation {seg_node.GetName()} stores its segments as '{source}', "
                         "not as label maps", "pick another output segmentation, or none to create a new one")


def update_segmentation(seg_node, labels: Image, labels_meta: Sequence[dict], reference_volume, name: str,
                        surfaces: bool = True):
    """Create (``seg_node`` None) or update the segmentation holding one segment per model label.

    Segment names, colours and terminology come from the model card. Segments the user added to
    a chosen existing node are left alone; this module's segments are updated in place (their
    display settings stay). ``labels`` lie on ``reference_volume``'s grid, in its local frame: a new
    node takes the volume's parent transform *before* its reference geometry is set (else the
    transform would be applied twice), and the temporary label map gets the same parent, so the
    import resamples through the right transform whatever frame a chosen node is in.
    ``surfaces=False`` drops the 3D closed surface instead of rebuilding it (live threshold while the
    slider moves); call :func:`show_surfaces` afterwards.
    """
    import slicer
    import vtk

    check_output_segmentation(seg_node)
    if seg_node is not None and seg_node.GetSegmentation().GetNumberOfSegments() == 0:
        # an empty node keeps whatever source representation it had (e.g. from an emptied model import)
        seg_node.GetSegmentation().SetSourceRepresentationName(BINARY_LABELMAP)
    if seg_node is None:
        seg_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(name))
        seg_node.CreateDefaultDisplayNodes()
        follow_input_transform(seg_node, reference_volume)
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    segmentation = seg_node.GetSegmentation()
    if not surfaces:
        seg_node.RemoveClosedSurfaceRepresentation()
    values = [int(l["value"]) for l in labels_meta]
    ids = vtk.vtkStringArray()
    for meta in labels_meta:
        sid = segment_id(meta["value"])
        if segmentation.GetSegment(sid) is None:
            segmentation.AddEmptySegment(sid, meta["name"], [float(c) for c in meta["color"]])
            segment = segmentation.GetSegment(sid)
            if meta.get("terminology"):
                segment.SetTag(segment.GetTerminologyEntryTagName(), meta["terminology"])
        ids.InsertNextValue(sid)
    # ImportLabelmapToSegmentationNode maps label value v to ids[v-1]: renumber the labels 1..n
    arr = np.asarray(labels.array)
    if arr.dtype.kind not in "ui":
        arr = arr.astype(np.int64)
    lut = np.zeros(max(values + [int(np.max(arr, initial=0))]) + 1, np.uint8 if len(values) < 256 else np.uint16)
    for n, v in enumerate(values, start=1):
        lut[v] = n
    compact = lut[arr]  # indexing by the label map itself: no widened copy of it
    tmp = labelmap_node_without_display(labels.with_array(compact))
    try:
        follow_input_transform(tmp, reference_volume)
        ok = slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(tmp, seg_node, ids)
    finally:
        slicer.mrmlScene.RemoveNode(tmp)
    if ok is False:
        raise RuntimeError("Slicer could not import the label map into the segmentation")
    if surfaces:
        show_surfaces(seg_node)
    return seg_node


def show_surfaces(seg_node) -> None:
    """Build (or rebuild) the closed surfaces the 3D views show."""
    seg_node.CreateClosedSurfaceRepresentation()


def place_in_study(node, input_volume) -> None:
    """Put ``node`` beside the input volume in the subject hierarchy (under its study)."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    if sh is None:
        return
    input_item = sh.GetItemByDataNode(input_volume)
    if not input_item:
        return
    parent = sh.GetItemParent(input_item)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:  # Slicer's Qt plugin logic adds items for new nodes; without it (or before it ran) make one
        sh.CreateItem(parent, node)


def follow_input_transform(node, input_volume) -> None:
    """Outputs this module owns live in the input's local frame: give them the input's parent
    transform (or none, once the input has none any more)."""
    tid = input_volume.GetTransformNodeID()
    if node.GetTransformNodeID() != tid:
        node.SetAndObserveTransformNodeID(tid)


# --- heatmaps ---------------------------------------------------------------------------------
def update_heatmap(node, image: Image, kind: str, name: str):
    """Create or update a float 0–1 heatmap volume with its colour table and transparent floor."""
    import slicer

    img = image.with_array(np.asarray(image.array, dtype=np.float32))
    if node is None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(name))
    update_volume(node, img)
    display = node.GetDisplayNode()
    new_display = display is None
    if new_display:  # made here, window fixed first: the default display node's automatic window/level
        # would first scan every voxel (60 ms for a 256² × 108 map) for a window replaced at once
        display = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    display.SetAndObserveColorNodeID(HEATMAP_COLORS.get(kind, HEATMAP_COLORS["probability"]))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetApplyThreshold(1)
    display.SetLowerThreshold(HEATMAP_DISPLAY_FLOOR)
    display.SetUpperThreshold(1.0)
    if new_display:
        node.SetAndObserveDisplayNodeID(display.GetID())
    return node


def edit_voxels(node, edit: Callable[[np.ndarray], None]) -> None:
    """``edit(voxels)`` on the voxel array of a volume node this module made (its own copy, K, J, I),
    in place, then tell its observers (views) that it changed."""
    import slicer

    edit(slicer.util.arrayFromVolume(node))
    slicer.util.arrayFromVolumeModified(node)


def show_overlay(background, foreground, opacity: float | None = None) -> None:
    """Input as background, heatmap as foreground layer of every slice view."""
    import slicer

    slicer.util.setSliceViewerLayers(background=background, foreground=foreground, foregroundOpacity=opacity)


def set_overlay_opacity(opacity: float) -> None:
    import slicer

    slicer.util.setSliceViewerLayers(foregroundOpacity=float(opacity))


# --- lesion table -----------------------------------------------------------------------------
def _column_kind(values: list) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "string"
    if all(isinstance(v, (bool, np.bool_)) for v in present):
        return "string"
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in present):
        return "int" if len(present) == len(values) else "double"
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) for v in present):
        return "double"
    return "string"


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    return str(v)


def update_table(table_node, lesion_table: LesionTable, name: str):
    """Create or refill a table node: one row per lesion, the core's :data:`COLUMNS` as columns."""
    rows = lesion_table.to_records()[:-1]  # lesions only; the total goes to the summary line
    return update_rows_table(table_node, COLUMNS, rows, name)


def update_rows_table(table_node, columns: Sequence[str], rows: Sequence[dict], name: str):
    """Create or refill a locked table node with ``rows`` (dicts) under ``columns``, typed per column."""
    import slicer
    import vtk

    if table_node is None:
        table_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName(name))
    was = table_node.StartModify()
    try:
        table_node.RemoveAllColumns()
        for c in columns:
            values = [r.get(c) for r in rows]
            kind = _column_kind(values)
            arr = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}[kind]()
            arr.SetName(c)
            for v in values:
                if kind == "string":
                    arr.InsertNextValue(_text(v))
                elif kind == "int":
                    arr.InsertNextValue(int(v))
                else:
                    arr.InsertNextValue(float("nan") if v is None else float(v))
            table_node.AddColumn(arr)
            for suffix, unit in UNITS.items():
                if c.endswith(suffix):
                    table_node.SetColumnUnitLabel(c, unit)
                    break
        table_node.SetUseColumnTitleAsColumnHeader(True)
        table_node.SetLocked(True)
    finally:
        table_node.EndModify(was)
    table_node.Modified()
    return table_node


def lesion_id_of_row(table_node, row: int) -> int | None:
    """The lesion number in MRML row ``row`` (rows are keyed by the ``lesion`` column, not position)."""
    if row is None or row < 0 or row >= table_node.GetNumberOfRows():
        return None
    text = table_node.GetCellText(row, COLUMNS.index("lesion"))
    return int(text) if text.strip().lstrip("-").isdigit() else None


def show_table(table_node) -> None:
    """Switch to a layout with a table view and show ``table_node`` in it."""
    import slicer

    lm = slicer.app.layoutManager()
    if lm is None:
        return
    lm.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(lm.layout))
    slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table_node.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()


# --- navigation -------------------------------------------------------------------------------
def lesion_point(lesion_table: LesionTable, lesion_id: int) -> tuple[float, float, float] | None:
    """The lesion's inside point (RAS, always a lesion voxel; a crescent's centroid is not)."""
    for r in lesion_table.rows:
        if int(r["lesion"]) == int(lesion_id):
            return (float(r["inside_r"]), float(r["inside_a"]), float(r["inside_s"]))
    return None


def jump_to(ras, frame_node=None) -> tuple[float, float, float]:
    """Centre every slice view and the 3D views' cameras on ``ras`` (in ``frame_node``'s local frame)."""
    import slicer

    r, a, s = to_world(frame_node, ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    lm = slicer.app.layoutManager()
    if lm is not None:
        cameras = slicer.modules.cameras.logic()
        for i in range(lm.threeDViewCount):
            camera = cameras.GetViewActiveCameraNode(lm.threeDWidget(i).threeDView().mrmlViewNode())
            if camera is not None:
                camera.SetFocalPoint(r, a, s)
    return (r, a, s)
