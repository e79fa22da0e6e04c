"""A stand-in for the parts of 3D Slicer (``slicer``, ``slicer.util``, ``slicer.ScriptedLoadableModule``,
``qt``, ``ctk``) that UNetSegment's adapters call, so that the module's logic, panel and self-test
run under plain pytest. ``vtk`` is the real PyPI wheel.

``install()`` registers the modules in ``sys.modules`` and returns the :class:`StandIn` handle that
tests use to look at the scene (nodes, arrays, colour tables, slice-view layers, jumps, camera),
to script dialog answers and to run the event loop. What it proves and what it cannot is written
in ``Testing/README.md``.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import types
import unittest
from pathlib import Path

import numpy as np
import vtk

from . import mrml, qtlike


class _Logic:
    def __init__(self, **methods):
        for k, v in methods.items():
            setattr(self, k, v)


class LayoutManager:
    TABLE_LAYOUT_OFFSET = 1000

    def __init__(self, scene):
        self.scene = scene
        self.layout = 3  # four-up
        self.threeDViewCount = 1
        self._table_view = qtlike.qMRMLTableView()
        self._three_d = types.SimpleNamespace(threeDView=lambda: types.SimpleNamespace(mrmlViewNode=lambda: scene.view_node))

    def setLayout(self, layout):
        self.layout = int(layout)

    def has_table_view(self):
        return self.layout >= self.TABLE_LAYOUT_OFFSET

    def tableWidget(self, i):
        if not self.has_table_view() or i != 0:
            return None
        return types.SimpleNamespace(tableView=lambda: self._table_view)

    def threeDWidget(self, i):
        return self._three_d if i == 0 else None

    def sliceViewNames(self):
        return ["Red", "Yellow", "Green"]


class StandIn:
    """Handle on the installed stand-in (one per test session; :meth:`reset` between tests)."""

    def __init__(self):
        self.scene = mrml.vtkMRMLScene()
        self.tmp = Path(tempfile.mkdtemp(prefix="slicer-standin-"))
        self.dialogs = []  # (kind, text) of every message box shown
        self.confirm_answers = []  # scripted answers for confirm*Display (default True, as in --testing)
        self.pip_calls = []
        self.active_table_id = None
        self.table_selection_propagated = 0
        self.layout_manager = LayoutManager(self.scene)

    def reset(self):
        self.scene.Clear()
        self.dialogs.clear()
        self.confirm_answers.clear()
        self.pip_calls.clear()
        self.active_table_id = None
        self.layout_manager = LayoutManager(self.scene)  # fresh views: no connections from earlier tests
        qtlike.reset()
        qtlike.QFileDialog.answers = []

    # event loop
    def process_events(self):
        qtlike.process_events()

    def run_until(self, predicate, timeout=60.0):
        return qtlike.run_until(predicate, timeout)

    # views
    def foreground_ids(self):
        return {c.GetForegroundVolumeID() for c in self.scene.composite_nodes()}

    def background_ids(self):
        return {c.GetBackgroundVolumeID() for c in self.scene.composite_nodes()}

    def foreground_opacities(self):
        return {c.GetForegroundOpacity() for c in self.scene.composite_nodes()}


def _build(standin: StandIn):
    scene = standin.scene

    # --- slicer.util ------------------------------------------------------------------------------
    util = types.ModuleType("slicer.util")

    def arrayFromVolume(node):
        return node._array  # a live view, as in Slicer

    def arrayFromVTKMatrix(m):
        return mrml._matrix_to_array(m)

    def vtkMatrixFromArray(a):
        m = vtk.vtkMatrix4x4()
        mrml._array_to_matrix(np.asarray(a), m)
        return m

    def updateVolumeFromArray(node, a):
        a = np.asarray(a)
        assert a.dtype not in (np.int64, np.uint64), "VTK rejects long long voxel arrays (cast to int32/int16)"
        assert a.ndim in (3, 4), f"volume array must be 3D or 4D, got {a.shape}"
        node._array = np.array(a, copy=True)
        node.array_writes += 1
        d = node.GetDisplayNode()
        if d is not None and hasattr(d, "image_changed"):
            d.image_changed(node._array)

    def addVolumeFromArray(a, ijkToRAS=None, name=None, nodeClassName=None):
        node = scene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
        if ijkToRAS is not None:
            node.SetIJKToRASMatrix(ijkToRAS if isinstance(ijkToRAS, vtk.vtkMatrix4x4) else vtkMatrixFromArray(ijkToRAS))
        updateVolumeFromArray(node, a)
        node.CreateDefaultDisplayNodes()
        d = node.GetDisplayNode()
        if d is not None and hasattr(d, "image_changed"):
            d.image_changed(node._array)
        return node

    def setSliceViewerLayers(background="keep-current", foreground="keep-current", label="keep-current",
                             foregroundOpacity=None, labelOpacity=None, fit=False, rotateToVolumePlane=False):
        def _id(x):
            return x.GetID() if isinstance(x, mrml.vtkMRMLNode) else x
        for c in scene.composite_nodes():
            if background != "keep-current":
                c.SetBackgroundVolumeID(_id(background))
            if foreground != "keep-current":
                c.SetForegroundVolumeID(_id(foreground))
            if foregroundOpacity is not None:
                c.SetForegroundOpacity(foregroundOpacity)
            if label != "keep-current":
                c.SetLabelVolumeID(_id(label))
            if labelOpacity is not None:
                c.SetLabelOpacity(labelOpacity)

    def arrayFromSegmentBinaryLabelmap(seg, segment_id, referenceVolumeNode=None):
        assert seg.reference_geometry is not None or referenceVolumeNode is not None, \
            "no reference geometry (Slicer raises RuntimeError)"
        shape, ijk = seg.reference_geometry
        if referenceVolumeNode is not None:
            assert np.allclose(referenceVolumeNode.ijk_to_ras(), ijk) and referenceVolumeNode._array.shape[:3] == shape, \
                "stand-in: resampling to another reference volume is not modelled"
        s = seg.GetSegmentation().GetSegment(segment_id)
        assert s is not None, f"no segment {segment_id}"
        return np.zeros(shape, np.uint8) if s.mask is None else s.mask.copy()

    def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
        return tempfile.mkdtemp(prefix=key, dir=str(standin.tmp))

    def launchConsoleProcess(args, useStartupEnvironment=True, updateEnvironment=None, cwd=None):
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, cwd=cwd)

    def _message(kind):
        def show(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
            standin.dialogs.append((kind, text))
            logging.getLogger("slicer-standin").info("%s: %s", kind, text)
        return show

    def _confirm(kind):
        def ask(text, windowTitle=None, parent=None, **kwargs):
            standin.dialogs.append((kind, text))
            return standin.confirm_answers.pop(0) if standin.confirm_answers else True
        return ask

    class VTKObservationMixin:
        def __init__(self):
            self.Observations = []

        def addObserver(self, obj, event, method, *a, **k):
            self.Observations.append((obj, event, method))

        def removeObservers(self, method=None):
            self.Observations = []

    for name, fn in dict(
        arrayFromVolume=arrayFromVolume, arrayFromVTKMatrix=arrayFromVTKMatrix, vtkMatrixFromArray=vtkMatrixFromArray,
        updateVolumeFromArray=updateVolumeFromArray, addVolumeFromArray=addVolumeFromArray,
        setSliceViewerLayers=setSliceViewerLayers, arrayFromSegmentBinaryLabelmap=arrayFromSegmentBinaryLabelmap,
        tempDirectory=tempDirectory, launchConsoleProcess=launchConsoleProcess,
        loadUI=qtlike.load_ui, childWidgetVariables=qtlike.child_widget_variables,
        errorDisplay=_message("error"), warningDisplay=_message("warning"), infoDisplay=_message("info"),
        confirmYesNoDisplay=_confirm("confirmYesNo"), confirmOkCancelDisplay=_confirm("confirmOkCancel"),
        settingsValue=lambda key, default=None, converter=None, settings=None: qtlike.QSettings.store.get(key, default),
        getNodesByClass=lambda cls: scene.GetNodesByClass(cls),
        getNode=lambda name: scene.GetFirstNodeByName(name),
        pip_install=lambda req, **kw: standin.pip_calls.append((req, kw)),
        VTKObservationMixin=VTKObservationMixin,
    ).items():
        setattr(util, name, fn)

    # --- slicer -------------------------------------------------------------------------------------
    sl = types.ModuleType("slicer")
    sl.util = util
    sl.mrmlScene = scene
    for cname, c in {**mrml.NODE_CLASSES, "vtkMRMLNode": mrml.vtkMRMLNode, "vtkMRMLDisplayableNode": mrml.vtkMRMLDisplayableNode,
                     "vtkMRMLVolumeNode": mrml.vtkMRMLVolumeNode, "vtkMRMLSubjectHierarchyNode": mrml.vtkMRMLSubjectHierarchyNode,
                     "vtkSegmentation": mrml.vtkSegmentation}.items():
        setattr(sl, cname, c)
    sl.qMRMLNodeComboBox = qtlike.qMRMLNodeComboBox
    sl.qMRMLTableView = qtlike.qMRMLTableView
    sl.qMRMLWidget = qtlike.qMRMLWidget

    def import_labelmap(label_node, seg, ids):
        shape, ijk = seg.reference_geometry or (None, None)
        assert shape is not None, "segmentation has no reference geometry"
        arr = label_node._array
        assert arr.shape[:3] == tuple(shape) and np.allclose(label_node.ijk_to_ras(), ijk), \
            "stand-in: the label map must be on the segmentation's reference grid"
        segmentation = seg.GetSegmentation()
        for n in range(ids.GetNumberOfValues()):
            sid = ids.GetValue(n)
            if segmentation.GetSegment(sid) is None:
                segmentation.AddEmptySegment(sid, sid)
            segmentation.GetSegment(sid).mask = (arr == n + 1).astype(np.uint8)
        return True

    sl.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: _Logic(ImportLabelmapToSegmentationNode=import_labelmap)),
        tables=types.SimpleNamespace(logic=lambda: _Logic(
            GetLayoutWithTable=lambda layout: layout if layout >= LayoutManager.TABLE_LAYOUT_OFFSET
            else layout + LayoutManager.TABLE_LAYOUT_OFFSET)),
        cameras=types.SimpleNamespace(logic=lambda: _Logic(
            GetViewActiveCameraNode=lambda view: scene.camera if view is scene.view_node else None)),
    )

    def set_active_table(tid):
        standin.active_table_id = tid

    def propagate():
        standin.table_selection_propagated += 1

    selection = _Logic(SetActiveTableID=set_active_table)
    app_logic = _Logic(GetSelectionNode=lambda: selection, PropagateTableSelection=propagate)
    sl.app = types.SimpleNamespace(
        layoutManager=lambda: standin.layout_manager,
        applicationLogic=lambda: app_logic,
        processEvents=qtlike.process_events,
        testingEnabled=lambda: True,
        temporaryPath=str(standin.tmp),
        connect=lambda *a: None,
    )
    sl.selfTests = {}

    # --- slicer.ScriptedLoadableModule ------------------------------------------------------------------
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            sl.selfTests[type(self).__name__] = self.runTest

        def runTest(self, msec=100, **kwargs):
            test = getattr(sys.modules[type(self).__module__], type(self).__name__ + "Test")()
            test.runTest()

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.layout = qtlike.QVBoxLayout()

        def setup(self):
            pass

        def onReload(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, methodName="runTest"):
            super().__init__(methodName)

        def delayDisplay(self, message, msec=1000):
            logging.getLogger("slicer-standin").info(message)
            qtlike.process_events()

    for k, v in dict(ScriptedLoadableModule=ScriptedLoadableModule, ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
                     ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
                     ScriptedLoadableModuleTest=ScriptedLoadableModuleTest).items():
        setattr(slm, k, v)
    sl.ScriptedLoadableModule = slm

    qt = qtlike.make_module("qt", qtlike.QT_NAMES)
    ctk = qtlike.make_module("ctk", qtlike.CTK_NAMES)
    return {"slicer": sl, "slicer.util": util, "slicer.ScriptedLoadableModule": slm, "qt": qt, "ctk": ctk}


_INSTANCE: StandIn | None = None
_MODULES: dict = {}


def install() -> StandIn:
    """Register the stand-in modules and return the handle (one handle per process)."""
    global _INSTANCE
    if _INSTANCE is None:
        _INSTANCE = StandIn()
        _MODULES.update(_build(_INSTANCE))
    sys.modules.update(_MODULES)
    return _INSTANCE


def uninstall() -> None:
    """Take the stand-in modules out of ``sys.modules`` again (other test files see no ``slicer``)."""
    for name, module in _MODULES.items():
        if sys.modules.get(name) is module:
            del sys.modules[name]
    sys.modules.pop("UNetSegment", None)  # the module file, imported against the stand-in
