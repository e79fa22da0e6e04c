"""3D Slicer for plain pytest: Slicer's own non-Qt code plus a thin imitation of its Qt half.

Real (from the ``slicer-core`` and ``trame-slicer`` wheels): the MRML scene and every node class,
``slicer.util`` (array helpers, ``addVolumeFromArray``, ``arrayFromSegmentBinaryLabelmap``,
``setSliceViewerLayers``, ``launchConsoleProcess`` …), the module logics (Segmentations, Volumes,
Tables, Cameras, Transforms, Terminologies, Colors, Subject hierarchy), the segmentation converters,
the application logic, and slice/3D views rendered offscreen by the real displayable managers
(``trame_slicer.views.DirectViewFactory``).

Imitated (Slicer implements them in Qt, which no wheel provides; each is listed with its reason in
``Testing/README.md``): the ``qt``/``ctk``/qMRML widgets and ``.ui`` loading (``qtlike``), the
layout manager (a fixed four-up of real views), message boxes, ``slicer.app``'s event loop and
settings, ``slicer.ScriptedLoadableModule`` (Qt widgets around a ``unittest.TestCase``), and
``pip_install`` (recorded; the real resolver runs in ``test_fresh_slicer_python.py``).

``install()`` registers the modules and returns the :class:`StandIn` handle that tests use to look
at dialogs, run the event loop and render the views to PNG.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import types
import unittest
from pathlib import Path

import numpy as np

from . import qtlike

#: colour tables that Slicer loads from its ``ColorFiles`` folder (not shipped in the wheel): name → matplotlib map
_FILE_COLOURS = {"Inferno": "inferno", "Viridis": "viridis", "Magma": "magma", "Plasma": "plasma"}
VIEW_SIZE = (480, 480)
#: node classes the subject hierarchy's plugins own (they get an item when added to the scene)
_SH_DATA_CLASSES = ("vtkMRMLVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLTransformNode",
                    "vtkMRMLMarkupsNode", "vtkMRMLModelNode")


def _add_file_colour_nodes(scene) -> None:
    """The perceptual colour tables Slicer loads from its ``ColorFiles`` folder, which the wheel does not ship.

    Added as Slicer's colour logic adds file colour nodes (a singleton tag from the file name, so the
    node ID is Slicer's, e.g. ``vtkMRMLColorTableNodeFileInferno.txt``), with matplotlib's colours.
    """
    import slicer
    from matplotlib import colormaps

    for name, cmap in _FILE_COLOURS.items():
        tag = slicer.vtkMRMLColorLogic.GetFileColorNodeSingletonTag(f"{name}.txt")
        if scene.GetSingletonNode(tag, "vtkMRMLColorTableNode") is not None:
            continue
        rgba = np.asarray(colormaps[cmap](np.linspace(0, 1, 256)))
        node = slicer.vtkMRMLColorTableNode()
        node.SetTypeToFile()
        node.SetName(name)
        node.SetSingletonTag(tag)
        node.SetNumberOfColors(256)
        for i, (r, g, b, _) in enumerate(rgba):
            node.SetColor(i, f"{name}{i}", float(r), float(g), float(b), 1.0)
        scene.AddNode(node)


class _Module:
    """``slicer.modules.<name>``: what scripted code reaches through it is the module's logic."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class _SliceWidget:
    def __init__(self, view):
        self.view = view

    def mrmlSliceNode(self):
        return self.view.get_view_node()

    def sliceLogic(self):
        return self.view.logic if hasattr(self.view, "logic") else None


class _ThreeDWidget:
    def __init__(self, view):
        self.view = view

    def threeDView(self):
        return types.SimpleNamespace(mrmlViewNode=self.view.get_view_node, resetFocalPoint=self.view.reset_camera)


class LayoutManager:
    """Slicer's qSlicerLayoutManager reduced to what the module uses: a fixed set of real views
    (Red/Yellow/Green slice views, one 3D view) and, once a layout with a table is set, a table view
    node (as qMRMLLayoutManager adds it) whose table the imitated ``qMRMLTableView`` shows."""

    def __init__(self, views: dict, scene):
        self.views = views
        self.scene = scene
        self.layout = 3  # SlicerLayoutFourUpView
        self.threeDViewCount = 1
        self._table_view = qtlike.qMRMLTableView()
        self._table_view_node = None
        self._shown_table_id = None

    def setLayout(self, layout):
        self.layout = int(layout)
        if self._table_view_node is None:  # a layout with a table view (Tables logic's GetLayoutWithTable)
            self._table_view_node = self.scene.AddNewNodeByClass("vtkMRMLTableViewNode", "TableView1")
            self._table_view.setMRMLScene(self.scene)

    def tableWidget(self, i):
        if self._table_view_node is None or i != 0:
            return None
        tid = self._table_view_node.GetTableNodeID()  # set by the application logic's PropagateTableSelection
        if tid != self._shown_table_id:
            self._shown_table_id = tid
            self._table_view.setMRMLTableNode(self.scene.GetNodeByID(tid) if tid else None)
        return types.SimpleNamespace(tableView=lambda: self._table_view)

    def threeDWidget(self, i):
        return _ThreeDWidget(self.views["3d"]) if i == 0 else None

    def sliceViewNames(self):
        return ["Red", "Yellow", "Green"]

    def sliceWidget(self, name):
        return _SliceWidget(self.views[{"Red": "axial", "Yellow": "sagittal", "Green": "coronal"}[name]])


class _Environment:
    """``QProcessEnvironment`` as ``slicer.util.startupEnvironment`` reads it."""

    def keys(self):
        return list(os.environ)

    def value(self, key):
        return os.environ.get(key, "")


def EventLoopRendering():
    """The render scheduling of Slicer's views (``ctkVTKAbstractView::scheduleRender``, Qt): a render
    request starts a single-shot timer and the view renders once when the event loop next turns, however
    many requests came meanwhile. trame-slicer's ``DirectRendering`` renders on every displayable-manager
    update instead, which would charge a scene change for renders Slicer never makes."""
    from trame_slicer.views.render_scheduler import ScheduledRenderStrategy

    class _EventLoopRendering(ScheduledRenderStrategy):
        def __init__(self):
            super().__init__()
            self._timer = qtlike.QTimer()
            self._timer.setSingleShot(True)
            self._timer.connect("timeout()", self._render)

        def schedule_render(self):
            if not self._timer.isActive():
                self._timer.start(0)

        def did_render(self):  # rendered meanwhile (e.g. a screenshot): the request is served
            self._timer.stop()

        def _render(self):
            if self.abstract_view is not None:
                self.abstract_view.render()

    return _EventLoopRendering()


class StandIn:
    """Handle on the installed harness (one per test session; :meth:`reset` between tests)."""

    def __init__(self):
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

        import slicer

        self.tmp = Path(tempfile.mkdtemp(prefix="slicer-harness-"))
        self.app = SlicerApp()
        self.scene = self.app.scene
        self.logics = {
            "segmentations": self.app.segmentations_logic, "volumes": self.app.volumes_logic,
            "terminologies": self.app.terminologies_logic, "subjecthierarchy": self.app.subject_hierarchy_logic,
            "colors": self.app.color_logic, "data": self.app.data_logic,
            "tables": self.app.register_module_logic(slicer.vtkSlicerTablesLogic(), logic_name="Tables"),
            "cameras": self.app.register_module_logic(slicer.vtkSlicerCamerasModuleLogic(), logic_name="Cameras"),
            "transforms": self.app.register_module_logic(slicer.vtkSlicerTransformLogic(), logic_name="Transforms"),
        }
        _add_file_colour_nodes(self.scene)
        import vtk

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_added(scene, event, node):
            self._add_subject_hierarchy_item(scene, node)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_about_to_be_removed(scene, event, node):
            self._remove_subject_hierarchy_item(scene, node)

        self._observers = (on_node_added, on_node_about_to_be_removed)  # kept alive with the handle
        self.scene.AddObserver(self.scene.NodeAddedEvent, on_node_added)
        self.scene.AddObserver(self.scene.NodeAboutToBeRemovedEvent, on_node_about_to_be_removed)
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        self.views = {}
        for name, layout in (("axial", ViewLayoutDefinition.axial_view()), ("sagittal", ViewLayoutDefinition.sagittal_view()),
                             ("coronal", ViewLayoutDefinition.coronal_view()), ("3d", ViewLayoutDefinition.threed_view())):
            view = self.app.view_manager.create_view(layout)
            view.render_window().SetSize(*VIEW_SIZE)
            view.set_scheduled_render(EventLoopRendering())
            self.views[name] = view
        self.dialogs = []  # (kind, text) of every message box shown
        self.confirm_answers = []  # scripted answers for confirm*Display (default True, as in --testing)
        self.pip_calls = []
        self.layout_manager = LayoutManager(self.views, self.scene)

    def _add_subject_hierarchy_item(self, scene, node):
        """qSlicerSubjectHierarchyPluginLogic (Qt) gives every new data node an item under the scene …"""
        import slicer

        if node.GetHideFromEditors() or not any(node.IsA(c) for c in _SH_DATA_CLASSES):
            return
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if sh is not None and not sh.GetItemByDataNode(node):
            sh.CreateItem(sh.GetSceneItemID(), node)

    def _remove_subject_hierarchy_item(self, scene, node):
        """… and removes a data node's item when the node leaves the scene (the item, not its children)."""
        import slicer

        if node is None or node.IsA("vtkMRMLSubjectHierarchyNode"):
            return
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        item = sh.GetItemByDataNode(node) if sh is not None else 0
        if item:
            sh.RemoveItem(item, False, False)

    def reset(self):
        """A closed scene, as File → Close scene leaves it (singletons such as views and colours stay)."""
        for c in self.composite_nodes():  # no layer keeps pointing at a node about to go
            c.SetBackgroundVolumeID(None)
            c.SetForegroundVolumeID(None)
            c.SetLabelVolumeID(None)
        self.scene.Clear(0)
        _add_file_colour_nodes(self.scene)
        self.dialogs.clear()
        self.confirm_answers.clear()
        self.pip_calls.clear()
        self.layout_manager = LayoutManager(self.views, self.scene)
        qtlike.reset()
        qtlike.QFileDialog.answers = []

    # event loop
    def process_events(self):
        qtlike.process_events()

    def run_until(self, predicate, timeout=60.0):
        return qtlike.run_until(predicate, timeout)

    # views
    def composite_nodes(self):
        return [self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]

    def slice_nodes(self):
        return [self.views[n].get_view_node() for n in ("axial", "sagittal", "coronal")]

    def foreground_ids(self):
        return {c.GetForegroundVolumeID() for c in self.composite_nodes()}

    def background_ids(self):
        return {c.GetBackgroundVolumeID() for c in self.composite_nodes()}

    def foreground_opacities(self):
        return {c.GetForegroundOpacity() for c in self.composite_nodes()}

    def render(self, name: str) -> np.ndarray:
        """Render view ``name`` (axial, sagittal, coronal, 3d) and return its pixels, row 0 at the top (H, W, 3)."""
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy

        view = self.views[name]
        view.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(view.render_window())
        grab.ReadFrontBufferOff()
        grab.Update()
        img = grab.GetOutput()
        w, h, _ = img.GetDimensions()
        rgb = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[:, :, :3]
        return np.ascontiguousarray(rgb[::-1])

    def save_png(self, name: str, path) -> Path:
        from matplotlib import image as mpimg

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mpimg.imsave(path, self.render(name))
        return path

    def ras_to_pixel(self, name: str, ras) -> tuple[int, int]:
        """Where a world RAS point lands in a slice view's rendered image (row, column; row 0 at the top)."""
        import vtk

        slice_node = self.views[name].get_view_node()
        xy_to_ras = vtk.vtkMatrix4x4()
        xy_to_ras.DeepCopy(slice_node.GetXYToRAS())
        xy_to_ras.Invert()
        x, y, _, _ = xy_to_ras.MultiplyPoint((*[float(v) for v in ras], 1.0))
        height = self.views[name].render_window().GetSize()[1]
        return int(round(height - 1 - y)), int(round(x))

    def fit_slice_views(self):
        for name in ("axial", "sagittal", "coronal"):
            self.views[name].fit_view_to_content()

    def fit_3d(self, show_slices: bool = True):
        """Show the three slice planes in 3D (the anatomy around the surfaces) and frame everything."""
        for node in self.slice_nodes():
            node.SetSliceVisible(bool(show_slices))
        view = self.views["3d"]
        view.reset_camera()
        camera = self.logics["cameras"].GetViewActiveCameraNode(view.get_view_node())
        camera.GetCamera().Azimuth(35.0)  # from the front-left, a little above: the planes are seen edge-on otherwise
        camera.GetCamera().Elevation(20.0)
        camera.ResetClippingRange()
        view.render()


def _build(standin: StandIn) -> dict:
    import slicer
    import slicer.util as util

    # --- slicer: the application singletons that qSlicerApplication provides ------------------------
    slicer.mrmlScene = standin.scene
    slicer.modules = types.SimpleNamespace(**{name: _Module(logic) for name, logic in standin.logics.items()})
    slicer.app = types.SimpleNamespace(
        layoutManager=lambda: standin.layout_manager,
        applicationLogic=lambda: standin.app.app_logic,
        processEvents=qtlike.process_events,
        testingEnabled=lambda: True,
        temporaryPath=str(standin.tmp),
        applicationName="Slicer",
        startupEnvironment=_Environment,
        connect=lambda *a: None,
        pauseRender=lambda: None,
        resumeRender=lambda: None,
    )
    slicer.selfTests = {}
    slicer.qMRMLNodeComboBox = qtlike.qMRMLNodeComboBox
    slicer.qMRMLTableView = qtlike.qMRMLTableView
    slicer.qMRMLWidget = qtlike.qMRMLWidget

    # --- slicer.util: the few functions that are Qt dialogs, Qt file paths or pip -----------------------
    def _message(kind):
        def show(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
            standin.dialogs.append((kind, text))
            logging.getLogger("slicer-harness").info("%s: %s", kind, text)
        return show

    def _confirm(kind):
        def ask(text, windowTitle=None, parent=None, **kwargs):
            standin.dialogs.append((kind, text))
            return standin.confirm_answers.pop(0) if standin.confirm_answers else True
        return ask

    def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
        return tempfile.mkdtemp(prefix=key, dir=str(tempDir or standin.tmp))

    qt_bound = dict(
        loadUI=qtlike.load_ui, childWidgetVariables=qtlike.child_widget_variables,
        errorDisplay=_message("error"), warningDisplay=_message("warning"), infoDisplay=_message("info"),
        confirmYesNoDisplay=_confirm("confirmYesNo"), confirmOkCancelDisplay=_confirm("confirmOkCancel"),
        settingsValue=lambda key, default=None, converter=None, settings=None: qtlike.QSettings.store.get(key, default),
        tempDirectory=tempDirectory,
        pip_install=lambda req, **kw: standin.pip_calls.append((req, kw)),
    )
    for name, fn in qt_bound.items():
        assert hasattr(util, name), f"slicer.util has no {name}: the harness would invent an API"
        setattr(util, name, fn)

    # --- slicer.ScriptedLoadableModule: Qt panels around a unittest.TestCase --------------------------
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            slicer.selfTests[type(self).__name__] = self.runTest

        def runTest(self, msec=100, **kwargs):
            test = getattr(sys.modules[type(self).__module__], type(self).__name__ + "Test")()
            test.runTest()

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.layout = qtlike.QVBoxLayout()
            self.moduleName = type(self).__name__.removesuffix("Widget")

        def resourcePath(self, filename):
            """Slicer's: ``Resources/<filename>`` beside the module's file."""
            module_file = sys.modules[type(self).__module__].__file__
            return os.path.join(os.path.dirname(module_file), "Resources", filename)

        def setup(self):
            pass

        def onReload(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            """One parameter node per module, tagged with its name (as Slicer's)."""
            name = type(self).__name__.removesuffix("Logic")
            node = standin.scene.GetSingletonNode(name, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(name)
                node.SetAttribute("ModuleName", name)
                node = standin.scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, methodName="runTest"):
            super().__init__(methodName)

        def delayDisplay(self, message, msec=1000):
            logging.getLogger("slicer-harness").info(message)
            qtlike.process_events()

    for k, v in dict(ScriptedLoadableModule=ScriptedLoadableModule, ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
                     ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
                     ScriptedLoadableModuleTest=ScriptedLoadableModuleTest).items():
        setattr(slm, k, v)
    slicer.ScriptedLoadableModule = slm

    qt = qtlike.make_module("qt", qtlike.QT_NAMES)
    ctk = qtlike.make_module("ctk", qtlike.CTK_NAMES)
    return {"slicer.ScriptedLoadableModule": slm, "qt": qt, "ctk": ctk}


_INSTANCE: StandIn | None = None
_MODULES: dict = {}


def install() -> StandIn:
    """Set up Slicer's application singletons and the Qt imitation; return the handle (one per process)."""
    global _INSTANCE
    if _INSTANCE is None:
        _INSTANCE = StandIn()
        _MODULES.update(_build(_INSTANCE))
    sys.modules.update(_MODULES)
    return _INSTANCE


def uninstall() -> None:
    """Take the Qt imitation out of ``sys.modules`` again (the real ``slicer`` package stays importable)."""
    for name, module in _MODULES.items():
        if sys.modules.get(name) is module:
            del sys.modules[name]
    sys.modules.pop("UNetSegment", None)  # the module file, imported against the harness
