"""Stand-in Qt/CTK/qMRML widgets and a tiny event loop (QTimer), with PythonQt's conventions:
properties read and written as attributes (``button.text = 'x'``; setting a value property emits
its change signal, as Qt's setters do), signals connected by signature (``connect("clicked()", f)``).
"""
from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace

# --- event loop -----------------------------------------------------------------------------------
_timers: list = []


def process_events() -> None:
    """Fire every due timer once (what a turn of Qt's event loop does for them)."""
    now = time.monotonic()
    for t in list(_timers):
        if t._active and now >= t._due:
            if t._single:
                t._active = False
                _timers.remove(t)
            else:
                t._due = now + t._interval / 1000.0
            t._emit("timeout")


def run_until(predicate, timeout: float = 60.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process_events()
        if predicate():
            return True
        time.sleep(step)
    process_events()
    return bool(predicate())


def reset() -> None:
    for t in _timers:  # stopped, not just forgotten: isActive() is False and start() arms them again
        t._active = False
    _timers.clear()
    QSettings.store.clear()


class QSettings:
    """Application settings: one store per process (``slicer.util.settingsValue`` reads it too)."""

    store: dict = {}

    def __init__(self, *a):
        pass

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value

    def contains(self, key):
        return key in self.store

    def remove(self, key):
        self.store.pop(key, None)


class QObject:
    def __init__(self, *args, **kwargs):
        self._slots = {}
        self._blocked = False

    def connect(self, signature, slot):
        name = signature.split("(", 1)[0]
        self._slots.setdefault(name, []).append(slot)
        return True

    def blockSignals(self, b):
        old, self._blocked = self._blocked, bool(b)
        return old

    def signalsBlocked(self):
        return self._blocked

    def _emit(self, name, *args):
        if self._blocked:
            return
        for slot in list(self._slots.get(name, [])):
            slot(*args)

    def emit_signal(self, name, *args):
        """Stand-in helper: what a user action makes Qt emit."""
        self._emit(name, *args)


class QTimer(QObject):
    def __init__(self, *a):
        super().__init__()
        self._interval, self._single, self._active, self._due = 0, False, False, 0.0

    def setInterval(self, ms):
        self._interval = int(ms)

    def setSingleShot(self, b):
        self._single = bool(b)

    def start(self, ms=None):
        if ms is not None:
            self._interval = int(ms)
        self._active = True
        self._due = time.monotonic() + self._interval / 1000.0
        if self not in _timers:
            _timers.append(self)

    def stop(self):
        self._active = False
        if self in _timers:
            _timers.remove(self)

    def isActive(self):
        return self._active

    @staticmethod
    def singleShot(ms, fn):
        t = QTimer()
        t.setSingleShot(True)
        t.connect("timeout()", fn)
        t.start(ms)


# --- layouts --------------------------------------------------------------------------------------
class QLayout:
    def __init__(self, *a):
        self.items = []

    def addWidget(self, w, *a):
        self.items.append(w)

    def addLayout(self, layout, *a):
        self.items.append(layout)

    def addItem(self, item):
        self.items.append(item)

    def count(self):
        return len(self.items)


class QVBoxLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QGridLayout(QLayout):
    pass


class QFormLayout(QLayout):
    def __init__(self, *a):
        super().__init__()
        self.rows = []  # (label, field)

    def addRow(self, label, field=None):
        self.rows.append((label, field))

    def rowCount(self):
        return len(self.rows)

    def removeRow(self, i):
        del self.rows[i]


# --- widgets --------------------------------------------------------------------------------------
class QWidget(QObject):
    def __init__(self, *a):
        super().__init__()
        self.objectName = ""
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self._layout = None
        self.properties = {}

    def layout(self):
        return self._layout

    def setLayout(self, layout):
        self._layout = layout

    def setEnabled(self, b):
        self.enabled = bool(b)

    def isEnabled(self):
        return self.enabled

    def setVisible(self, b):
        self.visible = bool(b)

    def setToolTip(self, t):
        self.toolTip = t

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False


class QFrame(QWidget):
    pass


class QLabel(QWidget):
    def __init__(self, text="", *a):
        super().__init__()
        self.text = text
        self.wordWrap = False

    def setText(self, t):
        self.text = t


class QAbstractButton(QWidget):
    def __init__(self, text="", *a):
        super().__init__()
        self.text = text
        self._checked = False
        self.checkable = False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, b):
        if bool(b) != self._checked:
            self._checked = bool(b)
            self._emit("toggled", self._checked)

    def setChecked(self, b):
        self.checked = b

    def isChecked(self):
        return self._checked

    def click(self):
        """Stand-in helper: a user click (ignored when disabled, as in Qt)."""
        if not self.enabled:
            return False
        if self.checkable or isinstance(self, QCheckBox):
            self.checked = not self._checked
        self._emit("clicked")
        return True


class QPushButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    pass


class QComboBox(QWidget):
    def __init__(self, *a):
        super().__init__()
        self._items = []
        self._index = -1

    def addItem(self, text, data=None):
        self._items.append(str(text))
        if self._index < 0:
            self._index = 0
            self._emit("currentIndexChanged", 0)

    def clear(self):
        self._items = []
        if self._index != -1:
            self._index = -1
            self._emit("currentIndexChanged", -1)

    def count(self):
        return len(self._items)

    def itemText(self, i):
        return self._items[i]

    def findText(self, t):
        return self._items.index(t) if t in self._items else -1

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, i):
        self.setCurrentIndex(i)

    def setCurrentIndex(self, i):
        assert -1 <= i < len(self._items), f"index {i} out of range ({len(self._items)} items)"
        if i != self._index:
            self._index = i
            self._emit("currentIndexChanged", i)

    @property
    def currentText(self):
        return self._items[self._index] if self._index >= 0 else ""


class QLineEdit(QWidget):
    def __init__(self, *a):
        super().__init__()
        self._text = ""
        self.placeholderText = ""
        self.readOnly = False

    @property
    def text(self):
        return self._text

    @text.setter
    def text(self, t):
        self.setText(t)

    def setText(self, t):
        t = "" if t is None else str(t)
        if t != self._text:  # QLineEdit::setText emits textChanged (not textEdited)
            self._text = t
            self._emit("textChanged", t)


class ctkPathLineEdit(QWidget):
    def __init__(self, *a):
        super().__init__()
        self._path = ""
        self.filters = ""
        self.nameFilters = []

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, p):
        self.setCurrentPath(p)

    def setCurrentPath(self, p):
        p = "" if p is None else str(p)
        if p != self._path:
            self._path = p
            self._emit("currentPathChanged", p)


class QProgressBar(QWidget):
    def __init__(self, *a):
        super().__init__()
        self.value = 0
        self.format = "%p%"
        self.minimum, self.maximum = 0, 100


class QPlainTextEdit(QWidget):
    def __init__(self, *a):
        super().__init__()
        self.lines = []
        self.readOnly = False
        self.maximumBlockCount = 0

    def appendPlainText(self, text):
        self.lines.extend(str(text).split("\n"))
        if self.maximumBlockCount and len(self.lines) > self.maximumBlockCount:
            del self.lines[: len(self.lines) - self.maximumBlockCount]

    def toPlainText(self):
        return "\n".join(self.lines)


class _ValueWidget(QWidget):
    def __init__(self, *a):
        super().__init__()
        self._value = 0.0
        self.minimum, self.maximum, self.singleStep, self.decimals = 0.0, 99.99, 1.0, 2
        self.suffix = ""

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        self.setValue(v)

    def setValue(self, v):
        v = min(max(float(v), float(self.minimum)), float(self.maximum))
        if v != self._value:
            self._value = v
            self._emit("valueChanged", v)


class QDoubleSpinBox(_ValueWidget):
    pass


class QSpinBox(_ValueWidget):
    pass


class ctkSliderWidget(_ValueWidget):
    """CTK's behaviour with ``tracking`` off (ctkSliderWidget.cpp): while the handle is dragged it
    emits ``valueIsChanging`` and ``value`` still returns the value from before the drag; on release
    ``valueChanged`` is emitted only if the value changed. A value set in code emits both at once."""

    def __init__(self, *a):
        super().__init__()
        self.tracking = True
        self._dragging = False
        self._changing_to = None

    def setValue(self, v):
        v = min(max(float(v), float(self.minimum)), float(self.maximum))
        if v != self._value:
            if not self.tracking:
                self._emit("valueIsChanging", v)
            self._value = v
            self._emit("valueChanged", v)

    def drag_to(self, v):
        """Harness helper: the user drags the handle to ``v`` (button still down)."""
        v = min(max(float(v), float(self.minimum)), float(self.maximum))
        if self.tracking:
            self.setValue(v)
            return
        self._dragging = True
        self._changing_to = v
        self._emit("valueIsChanging", v)

    def release(self):
        """Harness helper: the user lets go of the handle."""
        if not self._dragging:
            return
        self._dragging = False
        v, self._changing_to = self._changing_to, None
        if v != self._value:
            self._value = v
            self._emit("valueChanged", v)


class ctkCollapsibleButton(QWidget):
    def __init__(self, *a):
        super().__init__()
        self.text = ""
        self.collapsed = False


class QFileDialog:
    answers: list = []  # scripted answers, consumed in order

    @classmethod
    def _next(cls, kind, *args):
        assert cls.answers, f"unexpected file dialog {kind}{args}"
        return cls.answers.pop(0)

    @classmethod
    def getSaveFileName(cls, *args):
        return cls._next("save", *args)

    @classmethod
    def getExistingDirectory(cls, *args):
        return cls._next("directory", *args)

    @classmethod
    def getOpenFileName(cls, *args):
        return cls._next("open", *args)


class QIcon:
    def __init__(self, path=""):
        from pathlib import Path

        assert Path(path).is_file(), f"icon {path} does not exist"
        self.path = path


class QMessageBox:
    Ok, Cancel, Yes, No, Retry, Close = 0x400, 0x400000, 0x4000, 0x10000, 0x80000, 0x200000
    Information, Warning, Critical, Question = 1, 2, 3, 4


# --- qMRML widgets --------------------------------------------------------------------------------
class qMRMLWidget(QWidget):
    def __init__(self, *a):
        super().__init__()
        self.scene = None
        self.scene_receivers = []

    def setMRMLScene(self, scene):
        self.scene = scene
        for w in self.scene_receivers:
            w.setMRMLScene(scene)


class qMRMLNodeComboBox(QWidget):
    def __init__(self, *a):
        super().__init__()
        self.nodeTypes = []
        self.showChildNodeTypes = True
        self.noneEnabled = False
        self.addEnabled = True
        self.removeEnabled = True
        self.renameEnabled = False
        self.noneDisplay = "None"
        self.scene = None
        self._current = None

    def setMRMLScene(self, scene):
        self.scene = scene
        if self._current is None and not self.noneEnabled:
            nodes = self.nodes()
            if nodes:
                self.setCurrentNode(nodes[0])

    def nodes(self):
        """Nodes the combo box lists (its node types; child classes only with showChildNodeTypes)."""
        if self.scene is None:
            return []
        out = []
        for i in range(self.scene.GetNumberOfNodes()):
            n = self.scene.GetNthNode(i)
            if n.GetHideFromEditors():
                continue
            if self.showChildNodeTypes:
                ok = any(n.IsA(t) for t in self.nodeTypes)
            else:  # qMRMLNodeComboBox: exact class names only
                ok = n.GetClassName() in self.nodeTypes
            if ok:
                out.append(n)
        return out

    def currentNode(self):
        if self._current is not None and self.scene is not None and not self.scene.IsNodePresent(self._current):
            self._current = None
        return self._current

    def setCurrentNode(self, node):
        if node is not None:
            assert self.scene is not None, "setCurrentNode before setMRMLScene"
            assert node in self.nodes(), f"{node.GetName()} ({node.GetClassName()}) is not listed by a combo box of {self.nodeTypes}"
        if node is not self._current:
            self._current = node
            self._emit("currentNodeChanged", node)

    def setCurrentNodeID(self, nid):
        self.setCurrentNode(self.scene.GetNodeByID(nid) if nid else None)


class _Index:
    def __init__(self, row, column=0):
        self._row, self._column = row, column

    def row(self):
        return self._row

    def column(self):
        return self._column


class _SelectionModel:
    def __init__(self):
        self.indexes = []

    def selectedIndexes(self):
        return list(self.indexes)


class _ProxyModel:
    def mapToSource(self, index):
        return index


class qMRMLTableView(QWidget):
    def __init__(self, *a):
        super().__init__()
        self.scene = None
        self.table_node = None
        self._selection = _SelectionModel()
        self._proxy = _ProxyModel()

    def setMRMLScene(self, scene):
        self.scene = scene

    def setMRMLTableNode(self, node):
        self.table_node = node

    def mrmlTableNode(self):
        return self.table_node

    def selectionModel(self):
        return self._selection

    def sortFilterProxyModel(self):
        return self._proxy

    def click_row(self, mrml_row: int):
        """Stand-in helper: the user clicks an MRML row. Without UseColumnTitleAsColumnHeader the
        model's row 0 is the header row, so model row = MRML row + 1 (qMRMLTableModel)."""
        assert self.table_node is not None, "no table node shown"
        model_row = mrml_row if self.table_node.GetUseColumnTitleAsColumnHeader() else mrml_row + 1
        self._selection.indexes = [_Index(model_row, 0)]
        self._emit("selectionChanged")


# --- .ui loading ----------------------------------------------------------------------------------
WIDGET_CLASSES = {c.__name__: c for c in (
    QWidget, QFrame, QLabel, QPushButton, QCheckBox, QComboBox, QLineEdit, QProgressBar, QPlainTextEdit, QDoubleSpinBox,
    QSpinBox, ctkSliderWidget, ctkCollapsibleButton, ctkPathLineEdit, qMRMLWidget, qMRMLNodeComboBox, qMRMLTableView)}
LAYOUT_CLASSES = {c.__name__: c for c in (QVBoxLayout, QHBoxLayout, QGridLayout, QFormLayout)}


def _value(prop):
    child = list(prop)[0]
    tag, text = child.tag, (child.text or "")
    if tag == "bool":
        return text == "true"
    if tag == "number":
        return int(text)
    if tag == "double":
        return float(text)
    if tag == "stringlist":
        return [s.text or "" for s in child]
    return text


def load_ui(path):
    """Build stand-in widgets from a Qt Designer file; unknown widget classes fail loudly."""
    root_el = ET.parse(path).getroot()
    named = {}

    def build_widget(el):
        cls = el.get("class")
        assert cls in WIDGET_CLASSES, f"{path}: widget class {cls} is not in the stand-in (typo in the .ui?)"
        w = WIDGET_CLASSES[cls]()
        w.objectName = el.get("name")
        assert w.objectName not in named, f"{path}: duplicate widget name {w.objectName}"
        named[w.objectName] = w
        for child in el:
            if child.tag == "property":
                v = _value(child)
                name = child.get("name")
                if isinstance(getattr(type(w), name, None), property) or hasattr(w, name):
                    setattr(w, name, v)
                else:
                    w.properties[name] = v
            elif child.tag == "layout":
                w.setLayout(build_layout(child))
        return w

    def build_layout(el):
        cls = el.get("class")
        assert cls in LAYOUT_CLASSES, f"{path}: layout class {cls}"
        lay = LAYOUT_CLASSES[cls]()
        rows = {}
        for item in el.findall("item"):
            for child in item:
                obj = build_widget(child) if child.tag == "widget" else build_layout(child) if child.tag == "layout" else None
                if obj is None:
                    continue
                if isinstance(lay, QFormLayout):
                    r = int(item.get("row", len(rows)))
                    rows.setdefault(r, [None, None])[0 if item.get("column") == "0" and item.get("colspan") is None else 1] = obj
                else:
                    lay.addWidget(obj) if isinstance(obj, QWidget) else lay.addLayout(obj)
        for r in sorted(rows):
            lay.addRow(*rows[r])
        return lay

    top = root_el.find("widget")
    root = build_widget(top)
    for c in root_el.findall("./connections/connection"):
        if c.findtext("signal", "").startswith("mrmlSceneChanged") and c.findtext("slot", "").startswith("setMRMLScene"):
            root.scene_receivers.append(named[c.findtext("receiver")])
    root.named = named
    return root


def child_widget_variables(widget):
    return SimpleNamespace(**widget.named)


def make_module(name, classes):
    import types

    m = types.ModuleType(name)
    for k, v in classes.items():
        setattr(m, k, v)
    return m


QT_NAMES = {
    "QObject": QObject, "QTimer": QTimer, "QWidget": QWidget, "QFrame": QFrame, "QLabel": QLabel,
    "QPushButton": QPushButton, "QCheckBox": QCheckBox, "QComboBox": QComboBox, "QProgressBar": QProgressBar,
    "QPlainTextEdit": QPlainTextEdit, "QDoubleSpinBox": QDoubleSpinBox, "QSpinBox": QSpinBox,
    "QVBoxLayout": QVBoxLayout, "QHBoxLayout": QHBoxLayout, "QFormLayout": QFormLayout, "QGridLayout": QGridLayout,
    "QFileDialog": QFileDialog, "QMessageBox": QMessageBox, "QIcon": QIcon, "QLineEdit": QLineEdit, "QSettings": QSettings,
}
CTK_NAMES = {"ctkSliderWidget": ctkSliderWidget, "ctkCollapsibleButton": ctkCollapsibleButton, "ctkPathLineEdit": ctkPathLineEdit}
