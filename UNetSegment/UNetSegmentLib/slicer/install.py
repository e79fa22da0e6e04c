"""First-use dependency check and (after asking) installation inside Slicer.

* torch comes only through the **PyTorch** extension (declared in the extension's DEPENDS), whose
  ``PyTorchUtils`` picks the CUDA or CPU build for the machine. It is imported lazily: a missing
  extension is a clear message, not a module that fails to load.
* The core's other requirements (``Resources/requirements.txt``, the same list as ``pyproject.toml``
  without torch) are installed with ``slicer.util.pip_install`` under a constraints file that pins
  the packages Slicer ships (numpy, scipy, SimpleITK, vtk, requests, pydicom) at their installed
  versions, so none of them is replaced.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..resources import resource_path

#: distributions Slicer ships; never installed or upgraded by this module
SLICER_OWNED = ("numpy", "scipy", "SimpleITK", "vtk", "requests", "pydicom")
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
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*$", req)
    if not m:
        raise ValueError(f"unsupported requirement {req!r} (only NAME or NAME>=VERSION)")
    return m.group(1), m.group(2)


def _version_tuple(v: str) -> tuple:
    parts = []
    for p in re.split(r"[.+-]", v):
        m = re.match(r"^(\d+)", p)
        if not m:
            break
        parts.append(int(m.group(1)))
    return tuple(parts)


@dataclass
class Missing:
    requirement: str
    name: str
    installed: str | None  # None: not installed; else too old
    slicer_owned: bool


def missing_requirements(requirements: list[str] | None = None, version_of: Callable[[str], str] = md.version) -> list[Missing]:
    """Requirements that are not installed or too old in this Python."""
    out = []
    for req in requirements if requirements is not None else read_requirements():
        name, minimum = _split(req)
        try:
            have = version_of(name)
        except md.PackageNotFoundError:
            have = None
        if have is None or (minimum and _version_tuple(have) < _version_tuple(minimum)):
            out.append(Missing(req, name, have, _norm(name) in {_norm(s) for s in SLICER_OWNED}))
    return out


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def pytorch_utils_logic():
    """``PyTorchUtils.PyTorchUtilsLogic()``, or a RuntimeError saying to install the PyTorch extension."""
    try:
        import PyTorchUtils  # the "PyTorch" extension
    except ModuleNotFoundError:
        raise RuntimeError("UNetSegment needs the 'PyTorch' extension: install it from the Extensions Manager, "
                           "then restart Slicer.") from None
    return PyTorchUtils.PyTorchUtilsLogic()


def constraints_for_slicer_packages(version_of: Callable[[str], str] = md.version) -> str:
    """pip constraints text pinning the Slicer-owned packages that are installed."""
    lines = []
    for name in SLICER_OWNED:
        try:
            lines.append(f"{name}=={version_of(name)}")
        except md.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def status_text(missing: list[Missing], torch_ok: bool) -> str:
    parts = []
    if not torch_ok:
        parts.append("PyTorch (through the PyTorch extension)")
    parts += [f"{m.requirement}" + (f" (have {m.installed})" if m.installed else "") for m in missing]
    return ", ".join(parts)


def ensure_dependencies(confirm: Callable[[str, str], bool] | None = None) -> bool:
    """Check torch and the requirements; ask, then install what is missing. True when all are present.

    Packages Slicer ships are never installed: if one is missing or too old, this raises with the
    reason. ``confirm(text, details)`` asks the user (default: ``slicer.util.confirmOkCancelDisplay``).
    """
    import slicer

    missing = missing_requirements()
    owned = [m for m in missing if m.slicer_owned]
    if owned:
        raise RuntimeError("this Slicer's own " + ", ".join(f"{m.name} {m.installed or '(missing)'}" for m in owned)
                           + " does not meet UNetSegment's needs (" + ", ".join(m.requirement for m in owned)
                           + "): use Slicer 5.10 or later")
    torch_ok = torch_installed()
    if not missing and torch_ok:
        return True
    if confirm is None:
        def confirm(text, details):
            return slicer.util.confirmOkCancelDisplay(text, "UNetSegment: install Python packages", detailedText=details)
    details = status_text(missing, torch_ok)
    if not confirm("UNetSegment needs Python packages that are not installed yet. Install them now? "
                   "This may take several minutes (PyTorch is large).", details):
        return False
    if not torch_ok:
        tl = pytorch_utils_logic()
        if tl.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            return False
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as f:
            f.write(constraints_for_slicer_packages())
        slicer.util.pip_install(["-c", f.name] + [m.requirement for m in missing])
    importlib.invalidate_caches()
    return not missing_requirements() and torch_installed()
