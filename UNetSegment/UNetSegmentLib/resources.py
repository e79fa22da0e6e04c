"""Where the extension's ``Resources/`` folder (UI, icons, models, requirements) lives — the one place that knows.

The design puts ``Resources/`` at the repository's top level, beside the module folder; the
packaged extension has it inside the module folder (see UNetSegment/CMakeLists.txt)::

    source tree / build tree             packaged extension (Linux, Windows; macOS inside Slicer.app/Contents/
                                         Extensions-<rev>/UNetSegment/)
    <repo>/UNetSegment/UNetSegment.py    <ext>/lib/Slicer-X.Y/qt-scripted-modules/UNetSegment.py
    <repo>/UNetSegment/UNetSegmentLib/   <ext>/lib/Slicer-X.Y/qt-scripted-modules/UNetSegmentLib/
    <repo>/Resources/                    <ext>/lib/Slicer-X.Y/qt-scripted-modules/Resources/

so it is ``<module folder>/Resources`` (where Slicer's ``ScriptedLoadableModuleWidget.resourcePath``
looks too) or ``<module folder>/../Resources``: the first that holds this module's UI file.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
#: a file every copy of the resources holds (a ``Resources`` folder of another module does not)
MARKER = ("UI", "UNetSegment.ui")


def resource_candidates(module_dir: Path | None = None) -> tuple[Path, Path]:
    """Packaged layout first (beside the module file), then the source/build-tree layout."""
    d = module_dir or _PACKAGE_DIR.parent
    return d / "Resources", d.parent / "Resources"


def resources_dir() -> Path:
    """The ``Resources`` folder of this installation (the first candidate holding the module's UI file)."""
    candidates = resource_candidates()
    for cand in candidates:
        if cand.joinpath(*MARKER).is_file():
            return cand
    return candidates[-1]


def resource_path(*parts: str) -> Path:
    """``resources_dir() / parts...`` (not checked for existence)."""
    return resources_dir().joinpath(*parts)
