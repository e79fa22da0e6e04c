"""Stand-in MRML scene and nodes: the getters/setters the UNetSegment adapters call, holding real values.

Geometry is kept as numpy (K,J,I arrays + 4×4 IJK→RAS) and exchanged through real ``vtk`` objects
(vtkMatrix4x4, vtkStringArray, vtkTable, vtkGeneralTransform), so mistakes in those calls fail as
they would in Slicer. Checks that Slicer would make (or whose absence would silently break the
result) raise ``AssertionError`` with the reason.
"""
from __future__ import annotations

import itertools

import numpy as np
import vtk

# colour node IDs every Slicer scene has (vtkMRMLColorLogic; slicer_conventions.md §5)
SCENE_COLOR_IDS = (
    "vtkMRMLColorTableNodeGrey", "vtkMRMLColorTableNodeRainbow", "vtkMRMLColorTableNodeIron",
    "vtkMRMLColorTableNodeLabels", "vtkMRMLColorTableNodeRandom",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeFileMagma.txt", "vtkMRMLColorTableNodeFilePlasma.txt",
    "vtkMRMLColorTableNodeFileCividis.txt", "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLPETProceduralColorNodePET-Rainbow2",
)


def _matrix_to_array(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _array_to_matrix(a, m) -> None:
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r][c]))


class vtkMRMLNode:
    display_class = None

    def __init__(self):
        self.scene = None
        self._id = None
        self._name = ""
        self._attributes = {}
        self._refs = {}
        self.modified = 0

    def GetClassName(self):
        return type(self).__name__

    def IsA(self, name):
        return any(c.__name__ == name for c in type(self).__mro__)

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name):
        self._name = name

    def SetAttribute(self, k, v):
        self._attributes[k] = v

    def GetAttribute(self, k):
        return self._attributes.get(k)

    def SetNodeReferenceID(self, role, node_id):
        self._refs[role] = node_id

    def GetNodeReferenceID(self, role):
        return self._refs.get(role)

    def GetNodeReference(self, role):
        nid = self._refs.get(role)
        return self.scene.GetNodeByID(nid) if (nid and self.scene) else None

    def StartModify(self):
        return 0

    def EndModify(self, was):
        self.Modified()
        return 0

    def Modified(self):
        self.modified += 1


class vtkMRMLTransformableNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._transform_id = None

    def SetAndObserveTransformNodeID(self, tid):
        self._transform_id = tid

    def GetTransformNodeID(self):
        return self._transform_id

    def GetParentTransformNode(self):
        return self.scene.GetNodeByID(self._transform_id) if self._transform_id else None


class vtkMRMLStorableNode(vtkMRMLTransformableNode):
    pass


class vtkMRMLDisplayNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self.color_node_id = None
        self.visibility = True

    def SetAndObserveColorNodeID(self, cid):
        assert cid in SCENE_COLOR_IDS, f"colour node {cid!r} does not exist in a Slicer scene"
        self.color_node_id = cid

    def GetColorNodeID(self):
        return self.color_node_id


class vtkMRMLScalarVolumeDisplayNode(vtkMRMLDisplayNode):
    def __init__(self):
        super().__init__()
        self.auto_window_level = True
        self.window_min, self.window_max = 0.0, 0.0
        self.apply_threshold = 0
        self.lower_threshold, self.upper_threshold = -1e30, 1e30

    def AutoWindowLevelOff(self):
        self.auto_window_level = False

    def AutoWindowLevelOn(self):
        self.auto_window_level = True

    def GetAutoWindowLevel(self):
        return int(self.auto_window_level)

    def SetWindowLevelMinMax(self, lo, hi):
        self.window_min, self.window_max = float(lo), float(hi)

    def GetWindowLevelMin(self):
        return self.window_min

    def GetWindowLevelMax(self):
        return self.window_max

    def SetApplyThreshold(self, on):
        self.apply_threshold = int(on)

    def GetApplyThreshold(self):
        return self.apply_threshold

    def SetLowerThreshold(self, v):
        self.lower_threshold = float(v)

    def SetUpperThreshold(self, v):
        self.upper_threshold = float(v)

    def GetLowerThreshold(self):
        return self.lower_threshold

    def GetUpperThreshold(self):
        return self.upper_threshold

    def image_changed(self, arr):
        """Slicer recomputes the window from the histogram while auto W/L is on."""
        if self.auto_window_level and arr.size:
            self.window_min, self.window_max = float(arr.min()), float(arr.max())


class vtkMRMLLabelMapVolumeDisplayNode(vtkMRMLScalarVolumeDisplayNode):
    pass


class vtkMRMLSegmentationDisplayNode(vtkMRMLDisplayNode):
    pass


class vtkMRMLDisplayableNode(vtkMRMLStorableNode):
    def __init__(self):
        super().__init__()
        self._display = None

    def CreateDefaultDisplayNodes(self):
        if self._display is None and self.display_class is not None:
            self._display = self.scene.AddNewNodeByClass(self.display_class.__name__)

    def GetDisplayNode(self):
        return self._display


class _ImageData:
    def __init__(self, node):
        self.node = node

    def GetDimensions(self):
        k, j, i = self.node._array.shape[:3]
        return (i, j, k)


class vtkMRMLVolumeNode(vtkMRMLDisplayableNode):
    def __init__(self):
        super().__init__()
        self._array = None
        self._ijk_to_ras = np.eye(4)
        self.array_writes = 0  # times voxels were replaced through slicer.util

    def GetImageData(self):
        return None if self._array is None else _ImageData(self)

    def GetIJKToRASMatrix(self, m):
        _array_to_matrix(self._ijk_to_ras, m)

    def SetIJKToRASMatrix(self, m):
        self._ijk_to_ras = _matrix_to_array(m)

    def ijk_to_ras(self):
        return self._ijk_to_ras.copy()


class vtkMRMLScalarVolumeNode(vtkMRMLVolumeNode):
    display_class = vtkMRMLScalarVolumeDisplayNode


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    display_class = vtkMRMLLabelMapVolumeDisplayNode


class vtkSegment:
    def __init__(self, name, color):
        self._name = name
        self._color = tuple(float(c) for c in color)
        self.tags = {}
        self.mask = None  # uint8 K,J,I on the segmentation's reference geometry, or None (empty)

    def GetName(self):
        return self._name

    def SetName(self, n):
        self._name = n

    def GetColor(self):
        return self._color

    def SetColor(self, *rgb):
        self._color = tuple(float(c) for c in (rgb[0] if len(rgb) == 1 else rgb))

    def GetTerminologyEntryTagName(self):
        return "TerminologyEntry"

    def SetTag(self, key, value):
        self.tags[key] = value


class vtkSegmentation:
    def __init__(self):
        self.segments = {}

    def AddEmptySegment(self, segment_id="", name="", color=(0.5, 0.5, 0.5)):
        sid = segment_id or f"Segment_{len(self.segments) + 1}"
        base, n = sid, 1
        while sid in self.segments:
            sid, n = f"{base}_{n}", n + 1
        self.segments[sid] = vtkSegment(name or sid, color)
        return sid

    def GetSegment(self, sid):
        return self.segments.get(sid)

    def RemoveSegment(self, sid):
        self.segments.pop(sid, None)

    def GetNumberOfSegments(self):
        return len(self.segments)

    def GetNthSegmentID(self, n):
        return list(self.segments)[n]

    def GetSegmentIdBySegmentName(self, name):
        return next((k for k, s in self.segments.items() if s.GetName() == name), "")


class vtkMRMLSegmentationNode(vtkMRMLDisplayableNode):
    display_class = vtkMRMLSegmentationDisplayNode

    def __init__(self):
        super().__init__()
        self._segmentation = vtkSegmentation()
        self.reference_geometry = None  # (shape_kji, ijk_to_ras)
        self.closed_surface = False

    def GetSegmentation(self):
        return self._segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume):
        self.reference_geometry = (volume._array.shape[:3], volume.ijk_to_ras())
        self.SetNodeReferenceID("referenceImageGeometryRef", volume.GetID())

    def CreateClosedSurfaceRepresentation(self):
        self.closed_surface = True
        return True


class vtkMRMLTableNode(vtkMRMLStorableNode):
    def __init__(self):
        super().__init__()
        self._table = vtk.vtkTable()
        self.units = {}
        self.column_title_as_header = False
        self.locked = False

    def GetTable(self):
        return self._table

    def AddColumn(self, array=None):
        array = array if array is not None else vtk.vtkStringArray()
        if self._table.GetNumberOfColumns():
            assert array.GetNumberOfTuples() == self._table.GetNumberOfRows(), "columns of different length"
        self._table.AddColumn(array)
        return array

    def RemoveAllColumns(self):
        while self._table.GetNumberOfColumns():
            self._table.RemoveColumn(0)

    def GetNumberOfRows(self):
        return self._table.GetNumberOfRows()

    def GetNumberOfColumns(self):
        return self._table.GetNumberOfColumns()

    def GetColumnName(self, c):
        return self._table.GetColumn(c).GetName()

    def GetCellText(self, row, col):
        return self._table.GetValue(row, col).ToString()

    def SetColumnUnitLabel(self, name, unit):
        self.units[name] = unit

    def SetUseColumnTitleAsColumnHeader(self, on):
        self.column_title_as_header = bool(on)

    def GetUseColumnTitleAsColumnHeader(self):
        return self.column_title_as_header

    def SetLocked(self, on):
        self.locked = bool(on)

    def column(self, name) -> list:
        """Stand-in helper: the values of a column as Python values."""
        arr = self._table.GetColumnByName(name)
        return [arr.GetValue(r) for r in range(arr.GetNumberOfTuples())]


class vtkMRMLMarkupsROINode(vtkMRMLDisplayableNode):
    def __init__(self):
        super().__init__()
        self.bounds = [0.0] * 6

    def GetRASBounds(self, b):
        b[:] = list(self.bounds)


class vtkMRMLTransformNode(vtkMRMLDisplayableNode):
    def __init__(self):
        super().__init__()
        self.matrix = np.eye(4)  # to parent (world)

    @staticmethod
    def GetTransformBetweenNodes(source, target, general_transform):
        assert target is None, "stand-in supports transforms to world only"
        m = vtk.vtkMatrix4x4()
        _array_to_matrix(source.matrix, m)
        general_transform.Identity()
        general_transform.Concatenate(m)


class vtkMRMLLinearTransformNode(vtkMRMLTransformNode):
    pass


class vtkMRMLSliceCompositeNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self.background_id = self.foreground_id = self.label_id = None
        self.foreground_opacity = 0.0
        self.label_opacity = 1.0

    def SetBackgroundVolumeID(self, i):
        self.background_id = i

    def SetForegroundVolumeID(self, i):
        self.foreground_id = i

    def SetLabelVolumeID(self, i):
        self.label_id = i

    def SetForegroundOpacity(self, o):
        self.foreground_opacity = float(o)

    def SetLabelOpacity(self, o):
        self.label_opacity = float(o)

    def GetForegroundVolumeID(self):
        return self.foreground_id

    def GetBackgroundVolumeID(self):
        return self.background_id

    def GetForegroundOpacity(self):
        return self.foreground_opacity


class vtkMRMLSliceNode(vtkMRMLNode):
    DefaultJumpSlice, CenteredJumpSlice, OffsetJumpSlice = -1, 0, 1

    @staticmethod
    def JumpAllSlices(scene, r, a, s, mode=-1, viewGroup=-1, exclude=None):
        scene.jumps.append((float(r), float(a), float(s), mode))


class vtkMRMLViewNode(vtkMRMLNode):
    pass


class vtkMRMLCameraNode(vtkMRMLTransformableNode):
    def __init__(self):
        super().__init__()
        self.focal_point = (0.0, 0.0, 0.0)

    def SetFocalPoint(self, r, a, s):
        self.focal_point = (float(r), float(a), float(s))

    def GetFocalPoint(self):
        return self.focal_point


class vtkMRMLColorTableNode(vtkMRMLNode):
    pass


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    pass


class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    """Items: 1 is the scene; each data node gets an item under the scene when added."""

    def __init__(self):
        super().__init__()
        self._next = itertools.count(2)
        self.parent = {}  # item -> parent item
        self.data = {}  # item -> node
        self.names = {1: "Scene"}

    @staticmethod
    def GetSubjectHierarchyNode(scene):
        return scene.subject_hierarchy

    def create_item(self, name, parent=1, node=None):
        """Stand-in helper (e.g. a patient or study item)."""
        item = next(self._next)
        self.parent[item], self.names[item] = parent, name
        if node is not None:
            self.data[item] = node
        return item

    def GetItemByDataNode(self, node):
        return next((i for i, n in self.data.items() if n is node), 0)

    def GetItemParent(self, item):
        return self.parent.get(item, 0)

    def SetItemParent(self, item, parent):
        assert item in self.parent, f"no subject hierarchy item {item}"
        self.parent[item] = parent

    def GetItemDataNode(self, item):
        return self.data.get(item)


NODE_CLASSES = {c.__name__: c for c in (
    vtkMRMLScalarVolumeNode, vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeDisplayNode, vtkMRMLLabelMapVolumeDisplayNode,
    vtkMRMLSegmentationNode, vtkMRMLSegmentationDisplayNode, vtkMRMLTableNode, vtkMRMLMarkupsROINode,
    vtkMRMLLinearTransformNode, vtkMRMLTransformNode, vtkMRMLSliceCompositeNode, vtkMRMLSliceNode, vtkMRMLViewNode,
    vtkMRMLCameraNode, vtkMRMLColorTableNode, vtkMRMLScriptedModuleNode)}


class vtkMRMLScene:
    def __init__(self):
        self.Clear()

    def Clear(self, *_):
        self.nodes = {}
        self.counter = itertools.count(1)
        self.jumps = []
        self.log = []  # ("add"/"remove", class, id, name)
        self.subject_hierarchy = vtkMRMLSubjectHierarchyNode()
        for cid in SCENE_COLOR_IDS:
            self._add(vtkMRMLColorTableNode(), cid, cid)
        for view in ("Red", "Yellow", "Green"):
            self._add(vtkMRMLSliceCompositeNode(), f"vtkMRMLSliceCompositeNode{view}", f"SliceComposite{view}")
        self.view_node = self._add(vtkMRMLViewNode(), "vtkMRMLViewNode1", "View1")
        self.camera = self._add(vtkMRMLCameraNode(), "vtkMRMLCameraNode1", "Camera")
        self.log.clear()

    def _add(self, node, node_id, name):
        node.scene, node._id, node._name = self, node_id, name
        self.nodes[node_id] = node
        self.log.append(("add", type(node).__name__, node_id, name))
        if isinstance(node, vtkMRMLStorableNode):  # data nodes get a subject hierarchy item, as in Slicer
            self.subject_hierarchy.create_item(name, 1, node)
        return node

    def AddNewNodeByClass(self, cls, name=""):
        assert cls in NODE_CLASSES, f"stand-in scene cannot create {cls}"
        return self._add(NODE_CLASSES[cls](), f"{cls}{next(self.counter)}", name)

    def AddNode(self, node):
        return self._add(node, f"{type(node).__name__}{next(self.counter)}", node.GetName())

    def RemoveNode(self, node):
        if node is None or node.GetID() not in self.nodes:
            return
        self.nodes.pop(node.GetID())
        self.log.append(("remove", type(node).__name__, node.GetID(), node.GetName()))
        display = getattr(node, "_display", None)
        if display is not None:
            self.RemoveNode(display)
        item = self.subject_hierarchy.GetItemByDataNode(node)
        self.subject_hierarchy.data.pop(item, None)
        self.subject_hierarchy.parent.pop(item, None)

    def GetNodeByID(self, nid):
        return self.nodes.get(nid)

    def IsNodePresent(self, node):
        return node in self.nodes.values()

    def GenerateUniqueName(self, name):
        names = {n.GetName() for n in self.nodes.values()}
        if name not in names:
            return name
        for i in itertools.count(1):
            if f"{name}_{i}" not in names:
                return f"{name}_{i}"

    def GetNodesByClass(self, cls):
        return [n for n in self.nodes.values() if n.IsA(cls)]

    def GetNumberOfNodesByClass(self, cls):
        return len(self.GetNodesByClass(cls))

    def GetNthNodeByClass(self, i, cls):
        return self.GetNodesByClass(cls)[i]

    def GetFirstNodeByName(self, name):
        return next((n for n in self.nodes.values() if n.GetName() == name), None)

    # --- stand-in helpers -----------------------------------------------------------------------
    def user_nodes(self, cls="vtkMRMLNode"):
        """Nodes a test or the module added (not the scene's built-in colour/view nodes)."""
        builtin = (vtkMRMLColorTableNode, vtkMRMLSliceCompositeNode, vtkMRMLViewNode, vtkMRMLCameraNode)
        return [n for n in self.nodes.values() if n.IsA(cls) and not isinstance(n, builtin)]

    def composite_nodes(self):
        return self.GetNodesByClass("vtkMRMLSliceCompositeNode")
