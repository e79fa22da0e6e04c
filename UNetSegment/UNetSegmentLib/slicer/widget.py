"""The module panel's behaviour, on top of the widgets loaded from ``Resources/UI/UNetSegment.ui``.

:class:`Panel` gets the ``ui`` namespace (``slicer.util.childWidgetVariables``), a logic that
follows :class:`~.logic.SegmentationLogicProtocol` and a :class:`Dialogs`; tests pass fakes for
the last two. Run parameters come from the core's one definition: tooltips and choices from
:data:`~UNetSegmentLib.params.FIELD` (the CLI's flags), the model's defaults from
:func:`~UNetSegmentLib.settings.resolve` (what the CLI uses when a flag is not given).
"Run on" (this computer or a server URL with an optional token file) is kept in ``qt.QSettings``.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

from ..analysis.lesion_table import compartment_breakdown
from ..engine.acceleration import usable_cores
from ..errors import UNetSegmentError, UsageError
from ..io.outputs import CONTRACT_FILES
from ..params import FIELD, HEATMAP_KINDS, SegmentParams
from ..serving.worker import STAGES, error_event
from ..settings import resolve
from . import install
from .logic import RunRequest, RunResult, SegmentationLogicProtocol, class_map_label

#: the device combo's items (the device field takes any of auto, cpu, mps, cuda, cuda:N)
DEVICES = ("auto", "cpu", "cuda", "mps")
#: run parameter → the panel widget that sets it (``ui`` attribute); heatmaps: one check box per kind
PARAMETER_WIDGETS = {"device": "deviceComboBox", "precision": "precisionComboBox", "threshold": "thresholdSlider",
                     "min_lesion_ml": "minLesionSpinBox", "connectivity": "connectivityComboBox",
                     "overlap": "overlapSlider", "tta": "ttaCheckBox"}
LIVE_THRESHOLD_DELAY_MS = 150
#: surfaces left out while the live-threshold slider moved are rebuilt once it rests this long
LIVE_SURFACES_DELAY_MS = 1000
LOG_MAX_LINES = 500
HEATMAP_TITLES = {"probability": "Probability", "gradcam": "Grad-CAM", "uncertainty": "Uncertainty"}
#: "Run on" choices: (settings value, combo box text)
RUN_ON = (("local", "This computer"), ("server", "Server"))
#: QSettings keys of the "Run on" choice, the server URL and the token file
RUN_ON_SETTING = "UNetSegment/RunOn"
SERVER_URL_SETTING = "UNetSegment/ServerURL"
SERVER_TOKEN_FILE_SETTING = "UNetSegment/ServerTokenFile"
SERVER_DEVICE_TOOLTIP = "The server runs on its own device(s) (unetsegment serve --device)"


def heatmap_title(kind: str, labels: list[dict]) -> str:
    """The overlay list's entry for a heatmap kind; a label's own map is "Probability: <label name>"."""
    label = class_map_label(kind, labels)
    return HEATMAP_TITLES.get(kind, kind) if label is None else f"Probability: {label}"


def read_setting(key: str, default: str = "") -> str:
    import slicer

    value = slicer.util.settingsValue(key, default)
    return default if value is None else str(value)


def write_setting(key: str, value: str) -> None:
    import qt

    qt.QSettings().setValue(key, value)


#: what a channel selector lists: exactly this class (no labelmaps, vector, tensor or DTI volumes)
CHANNEL_NODE_CLASS = "vtkMRMLScalarVolumeNode"


def selectable_volumes() -> list:
    """The volumes a channel selector offers (``qMRMLNodeComboBox`` with ``showChildNodeTypes`` off
    lists nodes of exactly its class that are not hidden from editors): guesses come from these only."""
    import slicer

    return [n for n in slicer.util.getNodesByClass(CHANNEL_NODE_CLASS)
            if n.GetClassName() == CHANNEL_NODE_CLASS and not n.GetHideFromEditors()]


def guess_channel_volumes(channels: Sequence[str], volumes: Sequence) -> list:
    """Pick a scene volume for each channel: a name containing the channel's name, else the newest unused."""
    chosen, used = [], set()
    for ch in channels:
        pat = re.compile(rf"(^|[^A-Za-z0-9]){re.escape(ch)}([^A-Za-z0-9]|$)", re.IGNORECASE)
        match = next((v for v in volumes if id(v) not in used and pat.search(v.GetName() or "")), None)
        if match is None:
            match = next((v for v in reversed(list(volumes)) if id(v) not in used), None)
        if match is not None:
            used.add(id(match))
        chosen.append(match)
    return chosen


def fill_combo(combo, items: Sequence[str], current: str) -> None:
    """Replace a combo box's items and select ``current``."""
    combo.clear()
    for it in items:
        combo.addItem(it)
    combo.setCurrentIndex(list(items).index(current))


class Dialogs:
    """Message boxes and file pickers (Slicer's in the module; scripted answers in tests)."""

    def error(self, text: str, details: str = "") -> None:
        import slicer

        slicer.util.errorDisplay(text, windowTitle="UNetSegment", detailedText=details)

    def confirm(self, text: str) -> bool:
        import slicer

        return bool(slicer.util.confirmYesNoDisplay(text, windowTitle="UNetSegment"))

    def save_file(self, title: str, default: str, filters: str) -> str:
        import qt

        return qt.QFileDialog.getSaveFileName(None, title, default, filters) or ""

    def directory(self, title: str) -> str:
        import qt

        return qt.QFileDialog.getExistingDirectory(None, title) or ""

    def model_source(self) -> str:
        import qt

        path = qt.QFileDialog.getOpenFileName(None, "Import model: pick model.json of a bundle folder, or a bundle .zip",
                                              "", "Model bundle (model.json *.zip)") or ""
        return str(Path(path).parent) if path.endswith("model.json") else path


def load_panel_model(logic: SegmentationLogicProtocol, key: str):
    """The model's bundle for the panel. On a fresh Slicer, before the Python packages are installed
    (no jsonschema), its model.json is checked without them (:func:`.install.preview_bundle`); the
    worker checks the bundle in full before every run."""
    try:
        return logic.load_model(key)
    except ModuleNotFoundError:
        folder = logic.available_models().get(key)
        if folder is None:
            raise
        return install.preview_bundle(folder)


class Panel:
    def __init__(self, ui, logic: SegmentationLogicProtocol, dialogs: Dialogs | None = None):
        self.ui = ui
        self.logic = logic
        self.dialogs = dialogs or Dialogs()
        self.bundle = None
        self.model_keys: list[str] = []
        self.channel_selectors: list = []
        self.result: RunResult | None = None
        self.last_request: RunRequest | None = None
        self.layout_table_view = None
        self._live_timer = None
        self._surface_timer = None
        self._live_value = 0.5
        self._surfaces_stale = False
        self.comparison = None  # the last CompareResult shown
        self._comparing = False
        self._setup_controls()
        logic.progress.connect(self.on_progress)
        logic.log.connect(self.append_log)
        logic.finished.connect(self.on_finished)
        logic.failed.connect(self.on_failed)
        logic.cancelled.connect(self.on_cancelled)
        logic.compared.connect(self.on_compared)
        self._installer_ids = (install.INSTALLER.log.connect(self.on_install_log),
                               install.INSTALLER.finished.connect(self.on_dependencies_checked))
        if getattr(ui, "installDependenciesButton", None) is not None:
            ui.installDependenciesButton.connect("clicked()", self.on_install_dependencies)
        self.dependencies = install.check_dependencies()
        self.refresh_models()
        self.on_dependencies_checked(self.dependencies)

    def close(self) -> None:
        """Disconnect from the module-wide installer (call from the widget's cleanup)."""
        install.INSTALLER.log.disconnect(self._installer_ids[0])
        install.INSTALLER.finished.disconnect(self._installer_ids[1])

    # --- Python packages ------------------------------------------------------------------------
    def on_dependencies_checked(self, report: install.DependencyReport) -> None:
        """Show what is missing with the way to install it, or that everything is there."""
        self.dependencies = report
        installing = install.INSTALLER.is_running()
        button = getattr(self.ui, "installDependenciesButton", None)
        if button is not None:
            button.visible = not report.ok
            button.enabled = not installing and not report.blocked
        notes = " ".join(report.notes())
        if installing:
            text = "Installing Python packages in the background (progress in the log)…"
        elif report.blocked:
            text = f"This Slicer's own Python packages are too old ({report.text()}): use Slicer 5.10 or later."
        elif not report.ok:
            text = f"Python packages missing: {report.text()}. Click 'Install dependencies' (or Segment) to install them."
        else:
            text = self.ui.statusLabel.text if not str(self.ui.statusLabel.text).startswith(("Python packages", "Installing")) \
                else "Python packages installed: ready to segment."
        self.ui.statusLabel.text = text
        self.ui.statusLabel.toolTip = notes
        if notes:
            self.append_log("warning", notes)
        self.update_state()

    def on_install_log(self, level: str, line: str) -> None:
        """A line of pip's output: into the log, and the latest step into the status line."""
        self.append_log(level, line)
        if install.INSTALLER.is_running() and line.strip():
            self.ui.statusLabel.text = f"Installing Python packages: {line.strip()[:100]}"

    def on_install_dependencies(self) -> None:
        """Ask, then install the missing packages (torch through the PyTorch extension; the rest in the background)."""
        try:
            ready = self.logic.ensure_dependencies()
        except Exception as e:  # noqa: BLE001 - e.g. no PyTorch extension, or Slicer's own packages too old
            self.show_error(str(e))
            return
        self.on_dependencies_checked(install.check_dependencies() if ready else self.dependencies)

    # --- setup --------------------------------------------------------------------------------
    def _setup_controls(self) -> None:
        ui, d = self.ui, SegmentParams()
        for name, items in (("device", DEVICES), ("precision", FIELD["precision"].choices),
                            ("connectivity", FIELD["connectivity"].choices)):
            fill_combo(getattr(ui, PARAMETER_WIDGETS[name]), [str(it) for it in items], str(getattr(d, name)))
        for name, widget in PARAMETER_WIDGETS.items():
            getattr(ui, widget).toolTip = FIELD[name].help
        self.heatmap_boxes = {"gradcam": ui.gradcamCheckBox, "uncertainty": ui.uncertaintyCheckBox}
        assert set(self.heatmap_boxes) == set(HEATMAP_KINDS)
        for kind, box in self.heatmap_boxes.items():
            box.checked = kind in d.heatmaps
            box.toolTip = FIELD["heatmaps"].help
        ui.runOnComboBox.clear()
        for _, text in RUN_ON:
            ui.runOnComboBox.addItem(text)
        keys = [k for k, _ in RUN_ON]
        run_on = read_setting(RUN_ON_SETTING, "local")
        ui.runOnComboBox.setCurrentIndex(keys.index(run_on) if run_on in keys else 0)
        ui.serverUrlLineEdit.text = read_setting(SERVER_URL_SETTING)
        ui.serverTokenFilePathLineEdit.currentPath = read_setting(SERVER_TOKEN_FILE_SETTING)
        self._apply_run_on()
        ui.logTextEdit.maximumBlockCount = LOG_MAX_LINES
        ui.progressBar.visible = False
        ui.resultsCollapsibleButton.enabled = False
        ui.compareCollapsibleButton.enabled = False
        ui.modelComboBox.connect("currentIndexChanged(int)", self.on_model_changed)
        ui.importModelButton.connect("clicked()", self.on_import_model)
        ui.segmentButton.connect("clicked()", self.on_segment_clicked)
        ui.runOnComboBox.connect("currentIndexChanged(int)", self.on_run_on_changed)
        ui.serverUrlLineEdit.connect("textChanged(QString)", self.on_server_changed)
        ui.serverTokenFilePathLineEdit.connect("currentPathChanged(QString)", self.on_server_changed)
        ui.heatmapComboBox.connect("currentIndexChanged(int)", self.on_heatmap_changed)
        ui.opacitySlider.connect("valueChanged(double)", self.on_opacity_changed)
        ui.perLesionHeatmapCheckBox.connect("toggled(bool)", self.on_heatmap_scale_toggled)
        # tracking off: ctkSliderWidget emits valueIsChanging while dragged, valueChanged once released
        ui.liveThresholdSlider.tracking = False
        ui.liveThresholdSlider.connect("valueIsChanging(double)", self.on_live_threshold_changed)
        ui.liveThresholdSlider.connect("valueChanged(double)", self.on_live_threshold_released)
        ui.lesionTableView.connect("selectionChanged()", lambda: self.on_table_selection(self.ui.lesionTableView))
        ui.exportTableButton.connect("clicked()", self.on_export_table)
        ui.exportAllButton.connect("clicked()", self.on_export_all)
        ui.priorVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda *_: self.update_state())
        ui.compareButton.connect("clicked()", self.on_compare_clicked)
        ui.comparePriorFolderButton.connect("clicked()", self.on_compare_with_folder)
        ui.compareTableView.connect("selectionChanged()", self.on_compare_selection)

    # --- where the model runs -----------------------------------------------------------------
    def on_server(self) -> bool:
        """True when "Run on" is Server."""
        return RUN_ON[max(0, self.ui.runOnComboBox.currentIndex)][0] == "server"

    def server_url(self) -> str:
        return str(self.ui.serverUrlLineEdit.text or "").strip() if self.on_server() else ""

    def server_token_file(self) -> str:
        return str(self.ui.serverTokenFilePathLineEdit.currentPath or "").strip() if self.on_server() else ""

    def _apply_run_on(self) -> None:
        ui, server = self.ui, self.on_server()
        for w in (ui.serverUrlLabel, ui.serverUrlLineEdit, ui.serverTokenFileLabel, ui.serverTokenFilePathLineEdit):
            w.enabled = server
        ui.deviceComboBox.enabled = not server  # the server owns its devices (and threads)
        ui.deviceComboBox.toolTip = SERVER_DEVICE_TOOLTIP if server else FIELD["device"].help

    def on_run_on_changed(self, index: int) -> None:
        if 0 <= index < len(RUN_ON):
            write_setting(RUN_ON_SETTING, RUN_ON[index][0])
        self._apply_run_on()
        self.update_state()

    def on_server_changed(self, *_) -> None:
        write_setting(SERVER_URL_SETTING, str(self.ui.serverUrlLineEdit.text or "").strip())
        write_setting(SERVER_TOKEN_FILE_SETTING, str(self.ui.serverTokenFilePathLineEdit.currentPath or "").strip())
        self.update_state()

    def refresh_models(self, select: str | None = None) -> None:
        models = self.logic.available_models()
        self.model_keys = list(models)
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        for name in self.model_keys:
            combo.addItem(name)
        combo.blockSignals(False)
        if self.model_keys:
            preferred = select if select in self.model_keys else self.model_keys[0]
            combo.setCurrentIndex(self.model_keys.index(preferred))
            self.on_model_changed(self.model_keys.index(preferred))
        else:
            self.bundle = None
            self.update_state()

    # --- model and inputs ---------------------------------------------------------------------
    def on_model_changed(self, index: int) -> None:
        self.bundle = None
        if 0 <= index < len(self.model_keys):
            try:
                self.bundle = load_panel_model(self.logic, self.model_keys[index])
            except UNetSegmentError as e:
                self.show_error(str(e))
        self._build_channel_selectors()
        self._apply_model_defaults()
        self.update_state()

    def _build_channel_selectors(self) -> None:
        import slicer

        form = self.ui.channelsWidget.layout()
        while form.rowCount() > 0:
            form.removeRow(0)
        self.channel_selectors = []
        if self.bundle is None:
            return
        guesses = guess_channel_volumes(self.bundle.channel_names, selectable_volumes())
        for spec, guess in zip(self.bundle.meta["inputs"], guesses):
            combo = slicer.qMRMLNodeComboBox()
            combo.nodeTypes = [CHANNEL_NODE_CLASS]
            combo.showChildNodeTypes = False  # no labelmaps, vector or tensor volumes (see selectable_volumes)
            combo.noneEnabled = True
            combo.addEnabled = False
            combo.removeEnabled = False
            combo.setMRMLScene(slicer.mrmlScene)
            combo.toolTip = f"{spec['name']} volume ({spec.get('modality', '')}) for model {self.bundle.name}"
            combo.setCurrentNode(guess)
            combo.connect("currentNodeChanged(vtkMRMLNode*)", lambda *_: self.update_state())
            form.addRow(f"{spec['name']}:", combo)
            self.channel_selectors.append(combo)

    def refresh_inputs(self) -> None:
        """Fill channel selectors that are still empty from the scene (e.g. volumes loaded meanwhile)."""
        if self.bundle is None:
            return
        volumes = selectable_volumes()
        taken = [c.currentNode() for c in self.channel_selectors if c.currentNode() is not None]
        free = [v for v in volumes if all(v is not t for t in taken)]
        empty = [(ch, c) for ch, c in zip(self.bundle.channel_names, self.channel_selectors) if c.currentNode() is None]
        for (ch, combo), guess in zip(empty, guess_channel_volumes([ch for ch, _ in empty], free)):
            combo.setCurrentNode(guess)
        self.update_state()

    def _result_alive(self) -> bool:
        """False once the result's nodes were deleted (e.g. the scene was closed)."""
        import slicer

        r = self.result
        if r is not None and all(slicer.mrmlScene.IsNodePresent(n) for n in (r.segmentation, r.table)):
            return True
        if r is not None:
            self.result = None
            self.ui.lesionSummaryLabel.text = "No result yet"
            self.update_state()
        return False

    def _apply_model_defaults(self) -> None:
        """Advanced controls show the model's defaults, resolved as for a CLI run without those flags
        (``hardware=False``: nothing imports torch, so this works before PyTorch is installed)."""
        b = self.bundle
        if b is None:
            self.ui.modelInfoLabel.text = "No model: import one with 'Import model…'."
            return
        s = resolve(SegmentParams(), b, hardware=False)
        self.ui.thresholdSlider.value = s.threshold
        self.ui.overlapSlider.value = s.overlap
        self.ui.minLesionSpinBox.value = s.min_lesion_ml
        self.ui.ttaCheckBox.checked = s.tta
        self.ui.modelInfoLabel.text = (f"<b>{b.meta.get('title', b.name)}</b> ({b.name} {b.version}, {b.dimensions}) — "
                                       f"inputs: {', '.join(b.channel_names)}; labels: "
                                       f"{', '.join(l['name'] for l in b.labels)}. {b.meta.get('intended_use', '')}")

    def on_import_model(self) -> None:
        source = self.dialogs.model_source()
        if not source:
            return
        try:
            b = self.logic.import_model(source)
        except UNetSegmentError as e:
            self.show_error(f"The model was not imported: {e}")
            return
        self.append_log("info", f"imported model {b.name} {b.version}")
        self.refresh_models(select=b.name)

    def selected_inputs(self) -> list:
        return [c.currentNode() for c in self.channel_selectors]

    def parameters(self) -> SegmentParams:
        """The run parameters as set in the panel (same fields and meaning as the CLI flags), validated:
        :class:`UsageError` names a bad value (see :meth:`checked_parameters`)."""
        ui = self.ui
        return SegmentParams(
            device=ui.deviceComboBox.currentText,
            precision=ui.precisionComboBox.currentText,
            threshold=round(float(ui.thresholdSlider.value), 4),
            min_lesion_ml=float(ui.minLesionSpinBox.value),
            connectivity=int(ui.connectivityComboBox.currentText),
            overlap=round(float(ui.overlapSlider.value), 4),
            tta=bool(ui.ttaCheckBox.checked),
            heatmaps=tuple(k for k in HEATMAP_KINDS if self.heatmap_boxes[k].checked),
            threads=usable_cores(),  # the worker runs at a lower CPU priority: Slicer's GUI goes first
        )

    def checked_parameters(self) -> SegmentParams | None:
        """:meth:`parameters`, or ``None`` after showing what is wrong with a value."""
        try:
            return self.parameters()
        except UsageError as e:
            self.show_error(f"Check the Advanced settings: {e}")
            return None

    def why_disabled(self) -> str:
        """Why Segment cannot be clicked now ('' when it can)."""
        if self.logic.is_running():
            return ""
        if install.INSTALLER.is_running():
            return "Installing Python packages (progress in the log); Segment is available when it is done."
        if self.bundle is None:
            return "Choose a model (or import one with 'Import model…')."
        missing = [ch for ch, c in zip(self.bundle.channel_names, self.channel_selectors) if c.currentNode() is None]
        if missing:
            return f"Select an input volume for {', '.join(missing)}."
        nodes = self.selected_inputs()
        if len({n.GetID() for n in nodes}) != len(nodes):
            return "Each channel needs its own volume."
        if self.on_server() and not self.server_url():
            return "Enter the server URL (Advanced: Run on Server), or run on this computer."
        return ""

    def update_state(self) -> None:
        running = self.logic.is_running()
        reason = self.why_disabled()
        b = self.ui.segmentButton
        b.text = "Cancel" if running else "Segment"
        b.enabled = running or not reason
        b.toolTip = ("Stop the run; the scene stays as it was" if running else
                     reason or (f"Run the model on the selected volume(s) on the server {self.server_url()}" if self.on_server()
                                else "Run the model on the selected volume(s) in a separate process"))
        for w in (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton):
            w.enabled = not running
        self.ui.resultsCollapsibleButton.enabled = self.result is not None and not running
        self.ui.compareCollapsibleButton.enabled = self.result is not None and not running
        prior = self.ui.priorVolumeSelector.currentNode()
        self.ui.compareButton.enabled = self.result is not None and prior is not None and not running
        self.ui.comparePriorFolderButton.enabled = self.result is not None and not running
        self.ui.compareButton.toolTip = (
            "Segment first: the comparison uses the current result" if self.result is None else
            "Select the prior scan" if prior is None else
            "Segment the prior scan with the same model, register it to the current scan and match the lesions")

    # --- run --------------------------------------------------------------------------------
    def on_segment_clicked(self) -> None:
        if self.logic.is_running():
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling…"
            return
        reason = self.why_disabled()
        if reason:
            self.show_error(reason)
            return
        params = self.checked_parameters()  # before installing anything: a bad value needs no packages
        if params is None:
            return
        try:
            if not self.logic.ensure_dependencies():
                self.append_log("warning", "required Python packages are not installed; nothing was run")
                self.ui.statusLabel.text = ("Installing Python packages in the background (progress in the log)…"
                                            if install.INSTALLER.is_running() else
                                            "Packages missing: click Segment (or 'Install dependencies') to install them.")
                self.update_state()
                return
        except Exception as e:  # noqa: BLE001 - e.g. no PyTorch extension
            self.show_error(str(e))
            return
        request = RunRequest(
            input_nodes=self.selected_inputs(),
            model=str(self.bundle.root),
            params=params,
            roi_node=self.ui.roiSelector.currentNode(),
            output_segmentation=self.ui.outputSegmentationSelector.currentNode(),
            server_url=self.server_url() or None,
            server_token_file=self.server_token_file() or None,
            heatmap_scale=self.heatmap_scale(),
        )
        self.start(request)

    def start(self, request: RunRequest) -> None:
        self.last_request = request
        try:
            self.logic.start(request)
        except Exception as e:  # noqa: BLE001 - input/geometry problems found before the run
            ev = error_event(e, request.params.device)
            self.append_log("error", ev["message"])
            self.show_error(ev["message"])
            self.update_state()
            return
        if not self.logic.is_running():  # ended already (a logic that reports synchronously)
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = True
        self.ui.statusLabel.text = "Starting…"
        self.update_state()

    def on_progress(self, ev: dict) -> None:
        stages = [s for s in STAGES if s != "gradcam" or self.last_request is None or "gradcam" in self.last_request.params.heatmaps]
        stage = ev.get("stage", "")
        if stage not in stages:  # a server run's own steps: upload, queued, download
            overall = ev.get("overall")
            if overall is None:  # before the engine (upload, queued) or after it (download)
                overall = 1.0 if stage == "download" else 0.0
            self.ui.progressBar.value = int(round(100 * float(overall)))
            self.ui.progressBar.format = f"{stage} %p%"
            message = str(ev.get("message") or stage)
            self.ui.statusLabel.text = message[:1].upper() + message[1:]
            return
        n = stages.index(stage) + 1
        self.ui.progressBar.value = int(round(100 * float(ev.get("overall") or 0.0)))
        self.ui.progressBar.format = f"{n}/{len(stages)} {stage} %p%"
        eta = ev.get("eta_s")
        self.ui.statusLabel.text = (f"Step {n} of {len(stages)}: {stage} {100 * float(ev.get('fraction', 0)):.0f}%"
                                    + (f", about {eta:.0f} s left" if eta else ""))

    def on_finished(self, result: RunResult) -> None:
        import slicer

        self.result = result
        self.ui.progressBar.visible = False
        ui = self.ui
        ui.heatmapComboBox.blockSignals(True)
        ui.heatmapComboBox.clear()
        self.heatmap_kinds = list(result.heatmaps)
        for kind in self.heatmap_kinds:
            ui.heatmapComboBox.addItem(heatmap_title(kind, result.bundle.labels))
        ui.heatmapComboBox.setCurrentIndex(0)
        ui.heatmapComboBox.blockSignals(False)
        ui.liveThresholdSlider.blockSignals(True)
        ui.liveThresholdSlider.value = result.threshold
        ui.liveThresholdSlider.blockSignals(False)
        ui.opacitySlider.blockSignals(True)
        ui.opacitySlider.value = 0.5
        ui.opacitySlider.blockSignals(False)
        ui.lesionTableView.setMRMLScene(slicer.mrmlScene)
        ui.lesionTableView.setMRMLTableNode(result.table)
        if result.heatmap_scale != self.heatmap_scale():  # toggled while the model ran
            self.on_heatmap_scale_toggled()
        self._connect_layout_table_view()
        self._show_summary()
        ui.statusLabel.text = "Done."
        self.update_state()

    def _connect_layout_table_view(self) -> None:
        import slicer

        lm = slicer.app.layoutManager()
        tw = lm.tableWidget(0) if lm is not None else None
        view = tw.tableView() if tw is not None else None
        if view is not None and view is not self.layout_table_view:
            view.connect("selectionChanged()", lambda: self.on_table_selection(view))
            self.layout_table_view = view

    def _show_summary(self) -> None:
        t = self.result.lesions
        unusual = self.result.summary.get("unusual_input")
        self.ui.lesionSummaryLabel.text = ((f"UNUSUAL INPUT (run anyway): {unusual}. These results are not findings. "
                                            if unusual else "")
                                           + f"{t.n_lesions} lesion(s), total {t.total_volume_ml:.2f} mL"
                                           + (f" (ABC/2 {t.total['abc2_ml']:.2f} mL)" if t.n_lesions else "")
                                           + (f" — {breakdown}" if (breakdown := compartment_breakdown(t.rows, t.total)) else "")
                                           + f" at threshold {self.result.threshold:.2f}. "
                                           "Research use only — not for diagnosis.")

    def on_failed(self, ev: dict) -> None:
        self.ui.progressBar.visible = False
        self.ui.statusLabel.text = "Failed."
        self.update_state()
        if self._comparing:  # a comparison: no segmentation to offer again
            self._comparing = False
            fix = ev.get("fix")
            self.show_error(ev.get("message", "The comparison failed."), details=f"Fix: {fix}" if fix else "")
            return
        if ev.get("kind") == "UnusualInputError" and self.last_request is not None:
            self._offer_unusual_run(ev)
            return
        if ev.get("offer_cpu") and self.last_request is not None:
            if self.dialogs.confirm(f"{ev.get('message', 'The GPU ran out of memory.')}\n\nRun on the CPU instead (slower)?"):
                self.ui.deviceComboBox.setCurrentIndex(list(DEVICES).index("cpu"))
                params = self.checked_parameters()
                if params is not None:
                    self.start(dataclasses.replace(self.last_request, params=params))
            return
        fix = ev.get("fix")
        self.show_error(ev.get("message", "The segmentation failed."), details=f"Fix: {fix}" if fix else "")

    def _offer_unusual_run(self, ev: dict) -> None:
        """The input-domain refusal as a dialog: what was seen, and the choice to run anyway (marked)."""
        seen = str(ev.get("problem") or ev.get("message", ""))
        self.append_log("error", str(ev.get("message", seen)))
        text = (f"This input does not look like what the model {self.bundle.name} reads:\n\n{seen[:1].upper() + seen[1:]}."
                "\n\nRun anyway? The segmentation, table and report will be marked UNUSUAL INPUT; "
                "they are not findings.")
        if self.dialogs.confirm(text):
            params = dataclasses.replace(self.last_request.params, allow_unusual_input=True)
            self.start(dataclasses.replace(self.last_request, params=params))
        else:
            self.ui.statusLabel.text = "Not run: the input is not what the model reads; the scene was not changed."

    def on_cancelled(self) -> None:
        self._comparing = False
        self.ui.progressBar.visible = False
        self.ui.statusLabel.text = "Cancelled; the scene was not changed."
        self.update_state()

    # --- results ------------------------------------------------------------------------------
    def on_heatmap_changed(self, index: int) -> None:
        if self.result is not None and 0 <= index < len(self.heatmap_kinds):
            self.logic.show_heatmap(self.result, self.heatmap_kinds[index], float(self.ui.opacitySlider.value))

    def heatmap_scale(self) -> str:
        """'lesion' while "Per-lesion heatmap scale" is checked, else 'volume'."""
        return "lesion" if self.ui.perLesionHeatmapCheckBox.checked else "volume"

    def on_heatmap_scale_toggled(self, *_) -> None:
        """Rescale the shown Grad-CAM (each lesion's neighbourhood to its own peak, or the volume's)."""
        if not self._result_alive():
            return
        try:
            self.logic.set_heatmap_scale(self.result, self.heatmap_scale())
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Could not rescale the heatmap: {e}")

    def on_opacity_changed(self, value: float) -> None:
        if self.result is not None:
            self.logic.set_overlay_opacity(float(value))

    def on_live_threshold_changed(self, value: float) -> None:
        """While the slider is dragged: coalesce moves, then update the 2D label maps only.

        The value comes from the signal: with tracking off, CTK's ``value`` still holds the value from
        before the drag until the handle is released.
        """
        import qt

        if self.result is None:
            return
        self._live_value = float(value)
        if self._live_timer is None:
            self._live_timer = qt.QTimer()
            self._live_timer.setSingleShot(True)
            self._live_timer.setInterval(LIVE_THRESHOLD_DELAY_MS)
            self._live_timer.connect("timeout()", lambda: self.apply_live_threshold(self._live_value, surfaces=False))
            # a drag that ends where it started emits no valueChanged: rebuild the surfaces once it rests
            self._surface_timer = qt.QTimer()
            self._surface_timer.setSingleShot(True)
            self._surface_timer.setInterval(LIVE_SURFACES_DELAY_MS)
            self._surface_timer.connect("timeout()", self.rebuild_stale_surfaces)
        self._live_timer.start()
        self._surface_timer.start()

    def on_live_threshold_released(self, value: float) -> None:
        """Slider released (or a value typed): label maps and the 3D surfaces, at once."""
        for timer in (self._live_timer, self._surface_timer):
            if timer is not None:
                timer.stop()
        self.apply_live_threshold(float(value), surfaces=True)

    def rebuild_stale_surfaces(self) -> None:
        if self._surfaces_stale and self._result_alive():
            self.apply_live_threshold(self.result.threshold, surfaces=True)

    def apply_live_threshold(self, value: float, surfaces: bool = True) -> None:
        if not self._result_alive():
            return
        value = round(float(value), 4)
        try:
            self.logic.set_threshold(self.result, value, surfaces=surfaces)
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Could not re-derive the segmentation: {e}")
            return
        self._surfaces_stale = not surfaces
        self._show_summary()

    def on_table_selection(self, view) -> None:
        if not self._result_alive():
            return
        indexes = view.selectionModel().selectedIndexes()
        if not indexes:
            return
        row = view.sortFilterProxyModel().mapToSource(indexes[0]).row()
        point = self.logic.jump_to_table_row(self.result, row)
        if point is not None:
            self.ui.statusLabel.text = "Centred on lesion at R {:.1f}, A {:.1f}, S {:.1f}".format(*point)

    # --- compare with prior -------------------------------------------------------------------
    def on_compare_clicked(self) -> None:
        self._start_compare(self.ui.priorVolumeSelector.currentNode())

    def on_compare_with_folder(self) -> None:
        """The prior as an earlier result: a folder written by Export all… or `unetsegment segment`."""
        folder = self.dialogs.directory("Earlier UNetSegment result (output folder of the prior scan)")
        if folder:
            self._start_compare(folder)

    def _start_compare(self, prior) -> None:
        if self.result is None or self.logic.is_running():
            return
        try:
            self.logic.start_compare(self.result, prior)
        except Exception as e:  # noqa: BLE001 - one dialog with the problem and the fix
            self.show_error(str(e))
            return
        self._comparing = True
        self.ui.statusLabel.text = "Comparing with the prior scan…"
        self.update_state()

    def on_compared(self, compared) -> None:
        import slicer

        self._comparing = False
        self.comparison = compared
        self.ui.progressBar.visible = False
        self.ui.compareSummaryLabel.text = compared.summary_text()
        self.ui.compareTableView.setMRMLScene(slicer.mrmlScene)
        self.ui.compareTableView.setMRMLTableNode(compared.table)
        self.ui.statusLabel.text = "Compared."
        self.update_state()

    def on_compare_selection(self) -> None:
        view = self.ui.compareTableView
        indexes = view.selectionModel().selectedIndexes()
        if self.comparison is None or not indexes:
            return
        row = view.sortFilterProxyModel().mapToSource(indexes[0]).row()
        point = self.logic.jump_to_comparison_row(self.comparison, row)
        if point is not None:
            self.ui.statusLabel.text = "Centred on the compared lesion at R {:.1f}, A {:.1f}, S {:.1f}".format(*point)

    def on_export_table(self) -> None:
        if self.result is None:
            return
        path = self.dialogs.save_file("Export lesion table", "lesions.csv", "CSV (*.csv);;TSV (*.tsv)")
        if not path:
            return
        try:
            self.logic.export_table(self.result, path)
        except Exception as e:  # noqa: BLE001
            self.show_error(f"The table was not written: {e}")
            return
        self.append_log("info", f"wrote {path}")

    def on_export_all(self) -> None:
        if self.result is None:
            return
        folder = self.dialogs.directory("Export all outputs to folder")
        if not folder:
            return
        overwrite = False
        existing = [f for f in CONTRACT_FILES if (Path(folder) / f).exists()]
        if existing:
            if not self.dialogs.confirm(f"{folder} already holds {', '.join(existing)}. Replace them?"):
                return
            overwrite = True
        try:
            self.logic.export_all(self.result, folder, overwrite=overwrite)
        except Exception as e:  # noqa: BLE001
            self.show_error(f"Nothing was exported: {e}")
            return
        self.append_log("info", f"exported the file set to {folder}")

    # --- feedback -----------------------------------------------------------------------------
    def append_log(self, level: str, message: str) -> None:
        for line in str(message).rstrip().splitlines() or [""]:
            self.ui.logTextEdit.appendPlainText(f"[{level}] {line}" if level != "info" else line)

    def show_error(self, text: str, details: str = "") -> None:
        self.append_log("error", text)
        self.dialogs.error(text, details)
