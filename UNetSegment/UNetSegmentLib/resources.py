"""Where the extension's ``Resources/`` folder (UI, icons, models, requirements) lives — the one place that knows.

The design puts ``Resources/`` at the repository's top level, beside the module folder::

    source tree                          packaged extension (see UNetSegment/CMakeLists.txt)
    <repo>/UNetSegment/UNetSegment.py    <ext>/lib/Slicer-X.Y/qt-scripted-modules/UNetSegment.py
    <repo>/UNetSegment/UNetSegmentLib/   <ext>/lib/Slicer-X.Y/qt-scripted-modules/UNetSegmentLib/
    <repo>/Resources/                    <ext>/lib/Slicer-X.Y/Resources/

so in both layouts it is ``<folder holding UNetSegmentLib>/../Resources``. The template layout
(``Resources/`` inside the module folder) is accepted as a fallback.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resources_dir() -> Path:
    """The ``Resources`` folder of this installation (the first candidate that exists)."""
    candidates = (_PACKAGE_DIR.parent.parent / "Resources", _PACKAGE_DIR.parent / "Resources")
    for cand in candidates:
        if cand.is_dir():
            return cand
    return candidates[0]


def resource_path(*parts: str) -> Path:
    """``resources_dir() / parts...`` (not checked for existence)."""
    return resources_dir().joinpath(*parts)
