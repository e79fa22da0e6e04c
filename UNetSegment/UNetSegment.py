"""UNetSegment: a U-Net lesion segmenter behind one button (3D Slicer scripted module).

Thin by design: metadata, the widget shell, the logic class and the self-test. Everything else is in
``UNetSegmentLib`` — numerics in the core, Slicer adapters in ``UNetSegmentLib.slicer``.
"""
import importlib
import os
import sys
import time

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from UNetSegmentLib.resources import resource_path  # noqa: E402
from UNetSegmentLib.slicer.logic import SegmentationLogic  # noqa: E402

HELP_TEXT = """
<p>Segments lesions with a U-Net in one click. <b>Requires 3D Slicer 5.10 or later</b> and the
<b>PyTorch</b> extension. Research use only — not for diagnosis.</p>
<p><b>Inputs.</b> Pick a <i>model</i> (bundled, or imported with <i>Import model…</i> from a bundle
folder or .zip, which is validated first). The model card decides the inputs: one volume per
channel (e.g. <i>CT</i>, or <i>CBF/CBV/MTT/Tmax</i>), filled in from the scene. Optional: a markups
ROI to restrict the run, device (auto/CPU/CUDA) and precision. <i>Advanced</i> holds the same
parameters as the <code>unetsegment segment</code> command line (threshold, window overlap, TTA,
minimum lesion size, connectivity, heatmaps), preset to the model's defaults, and <i>Run on</i>:
this computer, or a UNetSegment server (<code>unetsegment serve</code>; its URL and, if it needs
one, a token file), which runs the model on its own device.</p>
<p><b>Segment</b> runs the model in a separate process or on the server (the GUI stays responsive);
the button turns into <b>Cancel</b>, which stops the run within a second and leaves the scene unchanged.</p>
<p><b>Outputs.</b> A segmentation (new, or the node chosen under <i>Outputs</i>, updated on re-run)
with the model's segment names, colours and terminology, shown in 2D and 3D; heatmaps as volumes
shown over the input; a lesion table (volume, centroid, slices, diameter, intensity, side, …).
Click a table row to centre all views on that lesion. <i>Export table…</i> writes CSV/TSV,
<i>Export all…</i> the command line's full file set.</p>
<p><b>Heatmaps.</b> <i>Probability</i>: the model's lesion probability per voxel (0–1); the
segmentation is where it reaches the threshold. The <i>live threshold</i> slider re-derives the
segmentation and the table from it without running the model again. <i>Grad-CAM</i>: where the
network looked to decide "lesion" (attribution, not probability). <i>Uncertainty</i>: where the
model is unsure (predictive entropy, or test-time-augmentation variance with TTA on). Low values
are transparent; use the opacity slider to see the anatomy underneath.</p>
"""

ACKNOWLEDGEMENT_TEXT = """
UNetSegment follows the structure of SlicerNNUnet (Kitware) and the process handling of
SlicerMONAIAuto3DSeg and SlicerTotalSegmentator. PyTorch is provided by the SlicerPyTorch extension.
"""


class UNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UNetSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []  # PyTorchUtils is imported lazily: a hard dependency would block loading
        self.parent.contributors = ["UNetSegment developers"]
        self.parent.helpText = HELP_TEXT
        self.parent.acknowledgementText = ACKNOWLEDGEMENT_TEXT
        # the icon is in the top-level Resources/, not where Slicer looks by default (beside this file)
        self.parent.icon = qt.QIcon(str(resource_path("Icons", "UNetSegment.png")))


class UNetSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None

    def setup(self):
        from UNetSegmentLib.slicer.widget import Panel

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resource_path("UI", "UNetSegment.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UNetSegmentLogic()
        self.panel = Panel(self.ui, self.logic)

    def resourcePath(self, filename):
        """Resources/ is beside this file when packaged, at the repository's top level in the source tree
        (Slicer's own resourcePath looks only beside the file; "Edit UI" in developer mode uses this)."""
        return str(resource_path(filename))

    def enter(self):
        if self.panel is not None and not self.logic.is_running():
            self.panel.refresh_inputs()  # volumes loaded since the panel was last shown

    def cleanup(self):
        if self.logic is not None:
            self.logic.close()  # also ends the warm worker process
        if self.panel is not None:
            self.panel.close()
        self.removeObservers()

    def onReload(self):
        """Reload the library too (``imp`` is gone in Python 3.12: use importlib)."""
        for name in sorted((m for m in sys.modules if m == "UNetSegmentLib" or m.startswith("UNetSegmentLib.")),
                           key=len, reverse=True):
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)


class UNetSegmentLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """Usable without the widget; see ``UNetSegmentLib.slicer.logic.SegmentationLogic``."""

    def __init__(self, process_factory=None, dependency_check=None, server_process_factory=None):
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentationLogic.__init__(self, process_factory, dependency_check, server_process_factory)

    def runAndWait(self, request, timeoutSeconds=600.0):
        """Start a run and process events until it ends (for tests and scripts; the GUI never waits)."""
        outcome = {}
        ids = [self.finished.connect(lambda r: outcome.setdefault("result", r)),
               self.failed.connect(lambda ev: outcome.setdefault("error", ev)),
               self.cancelled.connect(lambda: outcome.setdefault("cancelled", True))]
        try:
            self.start(request)
            deadline = time.monotonic() + timeoutSeconds
            while not outcome and time.monotonic() < deadline:
                slicer.app.processEvents()
                time.sleep(0.02)
        finally:
            for signal, i in zip((self.finished, self.failed, self.cancelled), ids):
                signal.disconnect(i)
        if "error" in outcome:
            raise RuntimeError(outcome["error"].get("message", "segmentation failed"))
        if "result" not in outcome:
            self.cancel()
            raise RuntimeError("segmentation did not finish in time" if not outcome else "segmentation was cancelled")
        return outcome["result"]


class UNetSegmentTest(ScriptedLoadableModuleTest):
    """Self-test: synthetic head with a hyperdense blob → tiny-blob model → segmentation, heatmap, table, export."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentSyntheticHead()

    def test_SegmentSyntheticHead(self):
        import tempfile

        import numpy as np

        from UNetSegmentLib.io.outputs import CONTRACT_FILES
        from UNetSegmentLib.params import SegmentParams
        from UNetSegmentLib.phantom import head_with_blob
        from UNetSegmentLib.slicer import scene
        from UNetSegmentLib.slicer.logic import RunRequest

        t0 = time.monotonic()
        self.delayDisplay("Building a synthetic head CT with a hyperdense blob")
        image, blob = head_with_blob()
        volume = slicer.util.addVolumeFromArray(image.array, image.ijk_to_ras, "UNetSegment test CT")
        before = np.array(slicer.util.arrayFromVolume(volume), copy=True)

        self.delayDisplay("Segmenting with the tiny-blob model on the CPU")
        logic = UNetSegmentLogic(dependency_check=lambda: True)
        result = logic.runAndWait(RunRequest([volume], "tiny-blob", SegmentParams(device="cpu", heatmaps=("gradcam",))),
                                  timeoutSeconds=120)

        seg = result.segmentation
        segment_id = scene.segment_id(result.bundle.labels[0]["value"])
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, volume) > 0
        dice = 2.0 * (mask & blob).sum() / (mask.sum() + blob.sum())
        self.assertGreater(dice, 0.7, f"blob Dice {dice:.2f}")
        self.assertEqual(seg.GetSegmentation().GetSegment(segment_id).GetName(), result.bundle.labels[0]["name"])

        prob = result.heatmaps["probability"]
        self.assertEqual(prob.GetDisplayNode().GetColorNodeID(), "vtkMRMLColorTableNodeFileInferno.txt")
        p = slicer.util.arrayFromVolume(prob)
        self.assertGreater(float(p[blob].mean()), 0.5)
        self.assertIn("gradcam", result.heatmaps)

        table = result.table
        self.assertEqual(table.GetNumberOfRows(), 1)
        self.assertEqual(table.GetCellText(0, 0), "1")
        point = logic.jump_to_table_row(result, 0)
        row = result.lesions.rows[0]
        self.assertAlmostEqual(point[0], row["inside_r"], places=3)

        out = tempfile.mkdtemp(prefix="UNetSegmentTest-")
        logic.export_all(result, out)
        for f in ("segmentation.seg.nrrd", "segmentation.nii.gz", "probability.nrrd", "gradcam.nrrd",
                  "lesions.csv", "lesions.tsv", "report.png", "summary.json"):
            self.assertTrue(os.path.isfile(os.path.join(out, f)), f)
        self.assertTrue(set(os.listdir(out)) <= set(CONTRACT_FILES))
        logic.export_table(result, os.path.join(out, "table.tsv"))
        self.assertTrue(os.path.isfile(os.path.join(out, "table.tsv")))

        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before), "the input volume was modified")
        logic.discard(result)
        self.delayDisplay(f"UNetSegment self-test passed in {time.monotonic() - t0:.1f} s")
