"""UNetSegment core: U-Net lesion segmentation without Slicer.

Everything numeric lives here and imports in plain Python (no ``slicer``/``qt``). The folders follow
the data: ``io`` (read, write) → ``engine`` (grid, windows, inference, heatmaps, pipeline) →
``analysis`` (lesion table, report, re-threshold, evaluation), with ``models`` (networks, bundles,
training) and ``serving`` (job, worker, cohorts, server, client) around them; ``params`` and
``settings`` say what a run uses; ``slicer`` adapts it all to Slicer.

The stable public names are importable from here (lazily: ``import UNetSegmentLib`` loads no torch)::

    from UNetSegmentLib import SegmentParams, load_bundle, read_image, segment, segment_files
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name → the module that defines it
_PUBLIC = {
    "Image": "image",
    "SegmentParams": "params",
    "RunSettings": "settings",
    "resolve": "settings",
    "load_bundle": "models.bundle",
    "read_image": "io.readers",
    "write_image": "io.writers",
    "segment": "engine.pipeline",
    "SegmentResult": "engine.pipeline",
    "CancelToken": "engine.inference",
    "segment_files": "serving.job",
    "analyze_lesions": "analysis.lesions",
    "UNetSegmentError": "errors",
    "ServerClient": "serving.client",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
