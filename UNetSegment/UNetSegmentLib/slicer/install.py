"""First-use dependency check and (after asking) installation inside Slicer.

Importing this module, checking what is missing and looking at the bundled models need nothing
that Slicer does not ship (a fresh Slicer has no jsonschema, safetensors, ...): the panel comes up
and offers to install them.

* torch comes only through the **PyTorch** extension (declared in the extension's DEPENDS), whose
  ``PyTorchUtils`` picks the CUDA or CPU build for the machine. It is imported lazily: a missing
  extension is a clear message, not a module that fails to load.
* The core's other requirements (``Resources/requirements.txt``, pyproject's dependencies without
  torch) are installed by ``python -m pip install`` in a **separate process** (PythonSlicer, i.e.
  Slicer's own Python) whose output lines reach the GUI thread through a timer, so the GUI never
  waits. pip runs under a constraints file pinning every Slicer-owned package that is installed
  (:data:`SLICER_OWNED`, plus highdicom where Slicer ships it) at its installed version: none of
  them is ever replaced.
* Optional requirements (:data:`OPTIONAL`) are left out, with the reason shown, when a
  Slicer-owned package they need is too old: Slicer 5.10 ships pydicom 2.4.4 and highdicom >= 0.27
  needs pydicom >= 3, so there the DICOM SEG export is unavailable (summary.json says why);
  Slicer >= 5.12 ships highdicom 0.27 with pydicom 3.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from ..resources import resource_path
from .signals import Signal

#: distributions Slicer ships (numpy and scipy pinned together, SimpleITK with Slicer's IO class,
#: vtk, requests, pydicom, Pillow, packaging): never installed or upgraded by this module
SLICER_OWNED = ("numpy", "scipy", "SimpleITK", "vtk", "requests", "pydicom", "pillow", "packaging")
#: distributions some Slicer versions ship (highdicom 0.27 since 5.12): pinned where installed
SLICER_OWNED_WHERE_SHIPPED = ("highdicom",)
#: optional requirement -> (Slicer-owned distribution it needs, minimum version, what is lost without it)
OPTIONAL = {"highdicom": ("pydicom", "3.0.1", "DICOM SEG export (segmentation.dcm)")}
TORCH_REQUIREMENT = ">=2.2"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path | None = None) -> list[str]:
    """Requirement lines (comments and blanks dropped)."""
    p = path or resource_path("requirements.txt")
    out = []
    for line in Path(p).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _split(req: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME>=VERSION`` -> (name, minimum); anything else is refused (the file stays simple)."""
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$", req)
    if not m:
        raise ValueError(f"unsupported requirement {req!r} in requirements.txt (only NAME or NAME>=VERSION)")
    return m.group(1), m.group(2)


def _version_tuple(v: str) -> tuple:
    parts = []
    for p in re.split(r"[.+-]", v):
        m = re.match(r"^(\d+)", p)
        if not m:
            break
        parts.append(int(m.group(1)))
    return tuple(parts)


def _at_least(have: str, minimum: str | None) -> bool:
    return minimum is None or _version_tuple(have) >= _version_tuple(minimum)


def _installed(name: str, version_of: Callable[[str], str]) -> str | None:
    try:
        return version_of(name)
    except md.PackageNotFoundError:
        return None


def _is_slicer_owned(name: str) -> bool:
    return _norm(name) in {_norm(s) for s in SLICER_OWNED}


@dataclass
class Missing:
    requirement: str
    name: str
    installed: str | None  # None: not installed; else too old
    slicer_owned: bool


@dataclass
class Skipped:
    """An optional requirement that cannot be installed in this Slicer, and what is lost."""

    requirement: str
    reason: str


def missing_requirements(requirements: list[str] | None = None, version_of: Callable[[str], str] = md.version) -> list[Missing]:
    """Requirements that are not installed or too old in this Python."""
    out = []
    for req in requirements if requirements is not None else read_requirements():
        name, minimum = _split(req)
        have = _installed(name, version_of)
        if have is None or not _at_least(have, minimum):
            out.append(Missing(req, name, have, _is_slicer_owned(name)))
    return out


def optional_skip_reason(name: str, version_of: Callable[[str], str] = md.version) -> str | None:
    """Why optional requirement ``name`` cannot be installed next to Slicer's own packages (None: it can)."""
    rule = OPTIONAL.get(_norm(name))
    if rule is None:
        return None
    needs, minimum, feature = rule
    have = _installed(needs, version_of)
    if have is not None and not _at_least(have, minimum):
        return (f"{feature} is unavailable: {name} needs {needs} >= {minimum} and this Slicer ships {needs} {have} "
                "(Slicer 5.12 or later ships both)")
    return None


@dataclass
class DependencyReport:
    """What the module's worker still needs in this Python (see :func:`check_dependencies`)."""

    missing: list[Missing] = field(default_factory=list)  # to install
    skipped: list[Skipped] = field(default_factory=list)  # optional, not installable in this Slicer
    torch_ok: bool = True

    @property
    def blocked(self) -> list[Missing]:
        """Slicer-owned packages that are missing or too old: only another Slicer version helps."""
        return [m for m in self.missing if m.slicer_owned]

    @property
    def to_install(self) -> list[Missing]:
        return [m for m in self.missing if not m.slicer_owned]

    @property
    def ok(self) -> bool:
        return not self.missing and self.torch_ok

    def text(self) -> str:
        """One line for the panel: what is missing, or '' when nothing is."""
        parts = [] if self.torch_ok else ["PyTorch (through the PyTorch extension)"]
        parts += [m.requirement + (f" (have {m.installed})" if m.installed else "") for m in self.missing]
        return ", ".join(parts)

    def notes(self) -> list[str]:
        return [s.reason for s in self.skipped]


def torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # an import hook refused it, or sys.modules["torch"] is None
        return False


def check_dependencies(requirements: list[str] | None = None, version_of: Callable[[str], str] = md.version,
                       torch_ok: bool | None = None) -> DependencyReport:
    """Missing requirements (installable or Slicer-owned), optional ones left out with why, and torch."""
    report = DependencyReport(torch_ok=torch_installed() if torch_ok is None else torch_ok)
    for m in missing_requirements(requirements, version_of):
        reason = optional_skip_reason(m.name, version_of)
        if reason:
            report.skipped.append(Skipped(m.requirement, reason))
        else:
            report.missing.append(m)
    return report


def pytorch_utils_logic():
    """``PyTorchUtils.PyTorchUtilsLogic()``, or a RuntimeError saying to install the PyTorch extension."""
    try:
        import PyTorchUtils  # the "PyTorch" extension
    except ModuleNotFoundError:
        raise RuntimeError("UNetSegment needs the 'PyTorch' extension: install it from the Extensions Manager, "
                           "then restart Slicer.") from None
    return PyTorchUtils.PyTorchUtilsLogic()


def constraints_for_slicer_packages(version_of: Callable[[str], str] = md.version) -> str:
    """pip constraints text pinning the Slicer-owned packages that are installed (``pip freeze`` of those names)."""
    lines = []
    for name in SLICER_OWNED + SLICER_OWNED_WHERE_SHIPPED:
        have = _installed(name, version_of)
        if have is not None:
            lines.append(f"{name}=={have}")
    return "\n".join(lines) + "\n"


def pip_python() -> str:
    """Slicer's Python (``PythonSlicer``, which Slicer puts on PATH), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def pip_install_command(requirements: Sequence[str], constraints_file: str | os.PathLike, python: str | None = None) -> list[str]:
    """``python -m pip install`` of ``requirements`` under ``constraints_file``, one progress line per step."""
    return [python or pip_python(), "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check",
            "-c", str(constraints_file), *requirements]


def write_constraints(version_of: Callable[[str], str] = md.version, folder: str | os.PathLike | None = None) -> Path:
    with tempfile.NamedTemporaryFile("w", prefix="unetsegment-", suffix="-constraints.txt", delete=False,
                                     dir=folder, encoding="utf-8") as f:
        f.write(constraints_for_slicer_packages(version_of))
    return Path(f.name)


def _launch(command: list[str]):
    """Start ``command`` with stdout+stderr merged into one text pipe (no console window on Windows)."""
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, encoding="utf-8", errors="replace", bufsize=1, creationflags=flags)


class InstallProcess:
    """One pip process: a reader thread queues its lines; :meth:`poll` (GUI thread) delivers them.

    In Slicer a ``qt.QTimer`` calls :meth:`poll` every :data:`~.process.POLL_MS` ms (:meth:`start` with
    ``use_timer=True``), so the GUI never waits. Scripts and tests call :meth:`wait` instead.
    """

    def __init__(self, command: list[str], on_line: Callable[[str], None], on_finished: Callable[[int], None],
                 launch: Callable[[list[str]], Any] = _launch):
        self.command = command
        self.on_line = on_line
        self.on_finished = on_finished
        self.launch = launch
        self.proc = None
        self.code: int | None = None
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._timer = None

    def start(self, use_timer: bool = True) -> None:
        from .process import poll_timer, read_lines_in_background

        self.proc = self.launch(self.command)
        self._queue, self._reader = read_lines_in_background(self.proc, "unetsegment-pip-reader")
        if use_timer:
            self._timer = poll_timer(self.poll)

    def is_running(self) -> bool:
        return self.proc is not None and self.code is None

    def poll(self) -> None:
        """Deliver queued lines; at the end of output reap the process and report its exit code."""
        while self.code is None:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                if self._timer is not None:
                    self._timer.stop()
                    self._timer = None
                self.code = int(self.proc.wait())
                self.on_finished(self.code)
                return
            self.on_line(line.rstrip("\r\n"))

    def wait(self) -> int:
        """Block until pip ends (scripts and tests only; the GUI uses the timer)."""
        self._reader.join()
        self.poll()
        return int(self.code)


class DependencyInstaller:
    """Installs missing requirements in the background, one run at a time.

    ``log(level, line)`` carries pip's output; ``finished(report)`` the dependency check made after
    pip ended (``report.ok`` tells whether everything is there now).
    """

    def __init__(self) -> None:
        self.log = Signal("str", "str")
        self.finished = Signal("DependencyReport")
        self.process: InstallProcess | None = None
        self.constraints: Path | None = None  # the file pip reads (removed when pip ends)
        self.constraints_text = ""

    def is_running(self) -> bool:
        return self.process is not None and self.process.is_running()

    def start(self, report: DependencyReport, python: str | None = None, use_timer: bool = True,
              launch: Callable[[list[str]], Any] = _launch, version_of: Callable[[str], str] = md.version,
              recheck: Callable[[], DependencyReport] | None = None) -> InstallProcess:
        if self.is_running():
            raise RuntimeError("Python packages are being installed already: wait for it to finish (see the log)")
        requirements = [m.requirement for m in report.to_install]
        if not requirements:
            raise ValueError("nothing to install")
        self.constraints = write_constraints(version_of)
        self.constraints_text = self.constraints.read_text(encoding="utf-8")
        command = pip_install_command(requirements, self.constraints, python)
        self.log.emit("info", "Installing " + ", ".join(requirements) + " (Slicer's own packages pinned: "
                      + " ".join(self.constraints_text.split()) + ")")
        for note in report.notes():
            self.log.emit("warning", note)

        def done(code: int) -> None:
            self.constraints.unlink(missing_ok=True)
            importlib.invalidate_caches()
            after = (recheck or check_dependencies)()
            if code != 0:
                self.log.emit("error", f"pip ended with exit code {code}: nothing was changed in Slicer's own packages; "
                                       "see the lines above for the reason")
            self.finished.emit(after)

        self.process = InstallProcess(command, lambda line: self.log.emit("info", line), done, launch)
        self.process.start(use_timer=use_timer)
        return self.process


#: the module's one installer (the panel shows its log and re-enables Segment when it finishes)
INSTALLER = DependencyInstaller()


def confirm_install(text: str, details: str) -> bool:
    import slicer

    return bool(slicer.util.confirmOkCancelDisplay(text, "UNetSegment: install Python packages", detailedText=details))


def ensure_dependencies(confirm: Callable[[str, str], bool] | None = None,
                        installer: DependencyInstaller | None = None, use_timer: bool = True) -> bool:
    """True when everything is installed. Otherwise ask, then install: PyTorch through the PyTorch
    extension (its own dialog), the rest in the background (:data:`INSTALLER`); returns False
    meanwhile, and the installer's ``finished`` says when Segment can run.

    Packages Slicer ships are never installed: if one is missing or too old, this raises with the
    reason. ``confirm(text, details)`` asks the user (default: ``slicer.util.confirmOkCancelDisplay``).
    """
    installer = installer or INSTALLER
    report = check_dependencies()
    if report.blocked:
        owned = report.blocked
        raise RuntimeError("this Slicer's own " + ", ".join(f"{m.name} {m.installed or '(missing)'}" for m in owned)
                           + " does not meet UNetSegment's needs (" + ", ".join(m.requirement for m in owned)
                           + "): use Slicer 5.10 or later")
    if report.ok:
        return True
    if installer.is_running():
        return False
    details = report.text() + "".join(f"\n{n}" for n in report.notes())
    if not (confirm or confirm_install)(
            "UNetSegment needs Python packages that are not installed yet. Install them now? "
            "This may take several minutes (PyTorch is large); Slicer stays usable meanwhile.", details):
        return False
    if not report.torch_ok:
        tl = pytorch_utils_logic()
        if tl.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            return False
    if report.to_install:
        installer.start(report, use_timer=use_timer)
        return False
    importlib.invalidate_caches()
    return check_dependencies().ok


# --- model.json without jsonschema ------------------------------------------------------------
#: keywords that only describe (no constraint)
_ANNOTATIONS = {"$schema", "$id", "title", "description"}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "null":
        return value is None
    return isinstance(value, _TYPES[name])


def schema_errors(value: Any, schema: dict, path: str = "") -> list[str]:
    """JSON Schema (2020-12) errors for the keywords the bundle schema uses, without jsonschema.

    A keyword this does not know raises ``ValueError``, so a schema change cannot silently weaken
    the check. The full validation (with jsonschema) runs in the worker before every run.
    """
    where = path or "(top level)"
    unknown = set(schema) - _ANNOTATIONS - _KNOWN
    if unknown:
        raise ValueError(f"schema keyword(s) {sorted(unknown)} at {where} not supported without jsonschema")
    types = schema.get("type")
    if types is not None and not any(_is_type(value, t) for t in ([types] if isinstance(types, str) else types)):
        return [f"{where}: {value!r} is not of type {types!r}"]
    errors: list[str] = []
    for keys, check in _GROUPS:
        if any(k in schema for k in keys):
            errors += check(value, schema, path, where)
    return errors


def _check_object(value, schema, path, where) -> list[str]:
    if not isinstance(value, dict):
        return []
    out = [f"{where}: {k!r} is a required property" for k in schema.get("required", []) if k not in value]
    props, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    extra = schema.get("additionalProperties", True)
    for k, v in value.items():
        at = f"{path}/{k}" if path else k
        matched = [p for p in patterns if re.search(p, k)]
        for sub in ([props[k]] if k in props else []) + [patterns[p] for p in matched]:
            out += schema_errors(v, sub, at)
        if k not in props and not matched:
            if extra is False:
                out.append(f"{where}: additional property {k!r} is not allowed")
            elif isinstance(extra, dict):
                out += schema_errors(v, extra, at)
    return out


def _check_array(value, schema, path, where) -> list[str]:
    if not isinstance(value, list):
        return []
    out = []
    if "minItems" in schema and len(value) < schema["minItems"]:
        out.append(f"{where}: {value!r} has fewer than {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        out.append(f"{where}: {value!r} has more than {schema['maxItems']} items")
    if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
        out.append(f"{where}: {value!r} has non-unique elements")
    if "items" in schema:
        for i, v in enumerate(value):
            out += schema_errors(v, schema["items"], f"{path}/{i}" if path else str(i))
    return out


def _check_number(value, schema, path, where) -> list[str]:
    if not _is_type(value, "number"):
        return []
    out = []
    for key, bad in (("minimum", lambda x, b: x < b), ("maximum", lambda x, b: x > b),
                     ("exclusiveMinimum", lambda x, b: x <= b), ("exclusiveMaximum", lambda x, b: x >= b)):
        if key in schema and bad(value, schema[key]):
            out.append(f"{where}: {value!r} violates {key} {schema[key]}")
    return out


def _check_string(value, schema, path, where) -> list[str]:
    if not isinstance(value, str):
        return []
    out = []
    if "minLength" in schema and len(value) < schema["minLength"]:
        out.append(f"{where}: {value!r} is shorter than {schema['minLength']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
    return out


def _check_choice(value, schema, path, where) -> list[str]:
    out = []
    if "const" in schema and not _same(value, schema["const"]):
        out.append(f"{where}: {schema['const']!r} was expected")
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        out.append(f"{where}: {value!r} is not one of {schema['enum']!r}")
    if "oneOf" in schema:
        passing = sum(not schema_errors(value, s, path) for s in schema["oneOf"])
        if passing != 1:
            out.append(f"{where}: {value!r} is valid under {passing} of the oneOf schemas (exactly 1 expected)")
    return out


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or _is_type(a, "number") and _is_type(b, "number") and a == b


#: keyword groups and their checkers (each runs once when any of its keywords is present)
_GROUPS = ((("required", "properties", "patternProperties", "additionalProperties"), _check_object),
           (("items", "minItems", "maxItems", "uniqueItems"), _check_array),
           (("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"), _check_number),
           (("minLength", "pattern"), _check_string), (("const", "enum", "oneOf"), _check_choice))
_KNOWN = {"type"} | {k for keys, _ in _GROUPS for k in keys}


@lru_cache(maxsize=1)
def _bundle_schema() -> dict:
    from ..models.bundle import SCHEMA_PATH

    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def preview_bundle(folder: str | os.PathLike):
    """A bundled or imported model's metadata for the panel, checked without jsonschema.

    For a fresh Slicer where jsonschema is not installed yet: ``model.json`` is checked against
    the bundle schema by :func:`schema_errors` and the weights file must exist. The worker loads
    the bundle with the full check (jsonschema, cross-field rules, sha256) before every run.
    """
    from ..errors import ModelError
    from ..models.bundle import Bundle

    root = Path(folder)
    mj = root / "model.json"
    try:
        meta = json.loads(mj.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{mj} cannot be read: {e}", "fix or replace model.json") from None
    errors = schema_errors(meta, _bundle_schema())
    if errors:
        raise ModelError(f"{mj} is invalid at {errors[0]}", "fix model.json to match the bundle schema (see docs)")
    if not (root / meta["weights"]["file"]).is_file():
        raise ModelError(f"weights file {meta['weights']['file']} missing from {root}", "copy the complete bundle")
    return Bundle(root=root.resolve(), meta=meta)
